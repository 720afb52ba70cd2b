//! The response body relayed to the client once an upstream is chosen.
//!
//! It passes chunks through as they arrive (never buffering the whole body), watches for an
//! upstream that goes silent past `idle_timeout`, turns a broken or stalled SSE stream into a
//! final `data: {"error":…}` event instead of a silent truncation, and — whether the response
//! completes, breaks, or the client goes away (drop) — produces the request's record exactly once.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_rt::time::{sleep_until, Instant, Sleep};
use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use futures_util::Stream;
use std::future::Future;

use crate::capture::Capture;
use crate::ledger::{BodyEnd, Ledger};
use crate::transport;
use crate::usage::UsageFilter;

/// Error that makes actix abort a non-SSE response (the client sees an incomplete body).
#[derive(Debug)]
pub struct RelayError(String);

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RelayError {}

/// The streamed body; see the module docs.
pub struct RelayBody<S> {
    first: Option<Bytes>,
    upstream: S,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
    last_data: Instant,
    sse: bool,
    /// Last two bytes relayed, to close a partial SSE event before our error event.
    tail: [u8; 2],
    done: bool,
    /// `Content-Length` of the upstream body, if it had one.
    expected_len: Option<u64>,
    /// Whether the upstream body is chunked (its end is a terminator, not EOF).
    chunked: bool,
    received: u64,
    /// Reply text (when recording) and token usage (always: the metrics count tokens); taken
    /// with the ledger.
    capture: Option<Capture>,
    /// Taken when the body ends, breaks or is dropped: the request is accounted for once.
    ledger: Option<Ledger>,
    /// Keeps the usage-only chunk the gateway asked for from the client (4b, `force_usage`).
    usage_filter: Option<UsageFilter>,
}

impl<S> RelayBody<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    /// Wraps an upstream body; `first` is a chunk already read (stream requests).
    pub fn new(
        upstream: S,
        first: Option<Bytes>,
        idle: Duration,
        sse: bool,
        framing: (Option<u64>, bool),
        ledger: Ledger,
        capture: Capture,
    ) -> Self {
        let now = Instant::now();
        RelayBody {
            first,
            upstream,
            idle,
            sleep: Box::pin(sleep_until(now + idle)),
            last_data: now,
            sse,
            tail: [b'\n', b'\n'],
            done: false,
            expected_len: framing.0,
            chunked: framing.1,
            received: 0,
            capture: Some(capture),
            ledger: Some(ledger),
            usage_filter: None,
        }
    }

    /// Drops the usage-only SSE events (still read for the record and metrics) from what the
    /// client receives: the gateway added `stream_options.include_usage`, the client did not.
    pub fn with_usage_filter(mut self) -> Self {
        self.usage_filter = Some(UsageFilter::default());
        self
    }

    /// What of an upstream chunk goes to the client; None when nothing does (yet).
    fn filtered(&mut self, b: Bytes) -> Option<Bytes> {
        match &mut self.usage_filter {
            None => Some(b),
            Some(f) => Some(f.push(&b)).filter(|out| !out.is_empty()),
        }
    }

    /// Accounts for a response that has no body at all (204, 304).
    pub fn finish_empty(mut self) {
        self.end(BodyEnd::Complete);
    }

    fn on_chunk(&mut self, b: &Bytes) {
        self.received += b.len() as u64;
        if let Some(c) = self.capture.as_mut() {
            c.feed_shared(b);
        }
        match b.len() {
            0 => {}
            1 => self.tail = [self.tail[1], b[0]],
            n => self.tail = [b[n - 2], b[n - 1]],
        }
    }

    fn fail(&mut self, reason: String) -> Poll<Option<Result<Bytes, RelayError>>> {
        let held = self.usage_filter.as_mut().and_then(UsageFilter::take_held);
        let event = self.sse.then(|| match held {
            Some(h) => [h, error_event(&self.tail, &reason)].concat().into(),
            None => error_event(&self.tail, &reason),
        });
        self.end(BodyEnd::Broken(reason.clone()));
        match event {
            Some(ev) => Poll::Ready(Some(Ok(ev))),
            None => Poll::Ready(Some(Err(RelayError(reason)))),
        }
    }
}

/// `data: {"error":…}` preceded by whatever newlines close a partially relayed event.
fn error_event(tail: &[u8; 2], reason: &str) -> Bytes {
    let prefix = match tail {
        [b'\n', b'\n'] => "",
        [_, b'\n'] => "\n",
        _ => "\n\n",
    };
    let body = serde_json::json!({
        "error": {"message": format!("upstream error: {reason}"), "type": "upstream_error"}
    });
    Bytes::from(format!("{prefix}data: {body}\n\n"))
}

impl<S> Stream for RelayBody<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, RelayError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(b) = this.first.take() {
            this.last_data = Instant::now();
            this.on_chunk(&b);
            if let Some(b) = this.filtered(b) {
                return Poll::Ready(Some(Ok(b)));
            }
        }
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            transport::clear_eof();
            match Pin::new(&mut this.upstream).poll_next(cx) {
                Poll::Ready(Some(Ok(b))) => {
                    this.last_data = Instant::now();
                    this.on_chunk(&b);
                    match this.filtered(b) {
                        Some(b) => return Poll::Ready(Some(Ok(b))),
                        None => continue,
                    }
                }
                Poll::Ready(None) => {
                    let short = this.expected_len.is_some_and(|n| this.received < n);
                    if short || (this.chunked && transport::eof_seen()) {
                        return this
                            .fail("connection closed before the response was complete".into());
                    }
                    this.end(BodyEnd::Complete);
                    let rest = this.usage_filter.as_mut().and_then(UsageFilter::finish);
                    return Poll::Ready(rest.map(Ok));
                }
                Poll::Ready(Some(Err(e))) => {
                    return this.fail(format!("connection broke mid-response: {e}"));
                }
                Poll::Pending => {}
            }
            // The timer is re-armed lazily: only when it fires do we look at the last chunk time.
            match this.sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    let deadline = this.last_data + this.idle;
                    if deadline > Instant::now() {
                        this.sleep.as_mut().reset(deadline);
                        continue;
                    }
                    let idle = this.idle.as_secs_f64();
                    return this.fail(format!("no data for {idle}s (idle_timeout)"));
                }
            }
        }
    }
}

impl<S> RelayBody<S> {
    /// Accounts for the request, once: the first of the body's end, its break, or its drop.
    fn end(&mut self, end: BodyEnd) {
        self.done = true;
        if let (Some(ledger), Some(capture)) = (self.ledger.take(), self.capture.take()) {
            ledger.finish_body(end, capture.finish());
        }
    }
}

impl<S> Drop for RelayBody<S> {
    fn drop(&mut self) {
        self.end(BodyEnd::ClientGone);
    }
}
