//! The response body relayed to the client once an upstream is chosen.
//!
//! It passes chunks through as they arrive (never buffering the whole body), watches for an
//! upstream that goes silent past `idle_timeout`, turns a broken or stalled SSE stream into a
//! final `data: {"error":…}` event instead of a silent truncation, and — whether the response
//! completes, breaks, or the client goes away (drop) — produces the request's record exactly once.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_rt::time::{sleep_until, Instant, Sleep};
use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use futures_util::Stream;
use std::future::Future;

use crate::capture::Capture;
use crate::proxy::RequestInfo;
use crate::registry::{AttemptResult, FailKind, RegistryView};
use crate::state::AppState;
use crate::transport;

/// Everything needed to account for the request when its body ends.
pub struct Finish {
    /// Shared state (recorder, registry, metrics).
    pub state: Arc<AppState>,
    /// The request.
    pub info: RequestInfo,
    /// The registry view the attempt came from.
    pub view: Arc<RegistryView>,
    /// Index of the relayed upstream in `view`.
    pub idx: usize,
    /// Status sent.
    pub status: u16,
    /// Upstreams tried.
    pub attempts: u32,
    /// Earlier failures (`name: reason`).
    pub failures: Vec<String>,
    /// Reply text (when recording) and token usage (always: the metrics count tokens).
    pub capture: Capture,
    /// Request start to response head.
    pub ttfb: Option<Duration>,
    /// Whether the relayed status counts as success for the upstream.
    pub committed_ok: bool,
}

enum End {
    Complete,
    Broken(String),
    ClientGone,
}

impl Finish {
    fn run(mut self, end: End) {
        let state = self.state.clone();
        let view = self.view.clone();
        let upstream = view
            .config
            .upstreams
            .get(self.idx)
            .map_or("", |u| u.name.as_str());
        let outcome = match &end {
            End::Broken(reason) => {
                log::warn!(
                    "{} {}: upstream {} broke mid-response: {reason}",
                    self.info.method,
                    self.info.path,
                    upstream
                );
                self.failures.push(format!("{upstream}: {reason}"));
                state.registry.report_for(
                    &view,
                    self.idx,
                    self.info.model.as_deref(),
                    AttemptResult::Failed {
                        kind: FailKind::Stream,
                        reason: reason.clone(),
                    },
                );
                Some(FailKind::Stream.label())
            }
            End::ClientGone => {
                log::info!(
                    "{} {}: client went away; upstream {} request cancelled",
                    self.info.method,
                    self.info.path,
                    upstream
                );
                self.committed_ok.then_some("ok")
            }
            End::Complete => self.committed_ok.then_some("ok"),
        };
        if let Some(outcome) = outcome {
            state.metrics.attempt(upstream, outcome);
        }
        let (response, usage) = self.capture.finish();
        state
            .metrics
            .tokens(upstream, usage.prompt, usage.completion);
        state
            .registry
            .add_tokens(&view, self.idx, usage.prompt, usage.completion);
        if let Some(rec) = &state.recorder {
            let error = if self.failures.is_empty() {
                None
            } else {
                Some(self.failures.join("; "))
            };
            rec.submit(self.info.into_record(
                self.status,
                Some(upstream.to_string()),
                self.attempts,
                error,
                response,
                usage,
                self.ttfb,
            ));
        }
    }
}

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
    finish: Option<Finish>,
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
        finish: Finish,
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
            finish: Some(finish),
        }
    }

    /// Accounts for a response that has no body at all (204, 304).
    pub fn finish_empty(mut self) {
        self.end(End::Complete);
    }

    fn on_chunk(&mut self, b: &Bytes) {
        self.received += b.len() as u64;
        if let Some(f) = self.finish.as_mut() {
            f.capture.feed_shared(b);
        }
        match b.len() {
            0 => {}
            1 => self.tail = [self.tail[1], b[0]],
            n => self.tail = [b[n - 2], b[n - 1]],
        }
    }

    fn end(&mut self, end: End) {
        self.done = true;
        if let Some(f) = self.finish.take() {
            f.run(end);
        }
    }

    fn fail(&mut self, reason: String) -> Poll<Option<Result<Bytes, RelayError>>> {
        let event = self.sse.then(|| error_event(&self.tail, &reason));
        self.end(End::Broken(reason.clone()));
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
            return Poll::Ready(Some(Ok(b)));
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
                    return Poll::Ready(Some(Ok(b)));
                }
                Poll::Ready(None) => {
                    let short = this.expected_len.is_some_and(|n| this.received < n);
                    if short || (this.chunked && transport::eof_seen()) {
                        return this
                            .fail("connection closed before the response was complete".into());
                    }
                    this.end(End::Complete);
                    return Poll::Ready(None);
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

impl<S> Drop for RelayBody<S> {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            f.run(End::ClientGone);
        }
    }
}
