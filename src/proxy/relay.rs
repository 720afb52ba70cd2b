//! The response body relayed to the client once an upstream is chosen.
//!
//! It passes chunks through as they arrive (never buffering the whole body), watches for an
//! upstream that goes silent past `idle_timeout`, turns a broken or stalled SSE stream into a
//! final `data: {"error":…}` event instead of a silent truncation, and — whether the response
//! completes, breaks, or the client goes away (drop) — produces the request's record exactly once.
//!
//! With `resume` (SPEC 4a) a chat stream is relayed event by event through a [`Resumer`], so
//! that a break can be continued on the next candidate within the same client stream.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_rt::time::{sleep_until, Instant, Sleep};
use actix_web::http::header;
use actix_web::web::{Bytes, BytesMut};
use futures_util::Stream;
use std::future::Future;

use crate::capture::Capture;
use crate::ledger::{BodyEnd, Ledger};
use crate::transport;
use crate::usage::UsageFilter;

use super::attempt::{body_of, UpstreamBody, Upstreamed};
use super::ends::{EndWatch, Protocol};
use crate::sse;

/// The longest SSE event held back to be judged (resume); past it the stream is relayed as is.
const EVENT_MAX: usize = 64 << 10;
use super::continuation::Op;
use super::resume::{Judged, Resumer};

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
pub struct RelayBody {
    first: Option<Bytes>,
    upstream: UpstreamBody,
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
    /// Event-by-event relay that can continue a broken stream (4a `resume`).
    resumer: Option<Box<Resumer>>,
    /// A break seen in-band while events before it were still to be sent.
    break_after: Option<String>,
    /// Judges whether the stream reached its protocol's end (SPEC 4e); None for other paths.
    ends: Option<EndWatch>,
}

impl RelayBody {
    /// Wraps an upstream body; `first` is a chunk already read (stream requests).
    pub fn new(
        mut upstream: Upstreamed,
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
            upstream: body_of(&mut upstream),
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
            resumer: None,
            break_after: None,
            ends: None,
        }
    }

    /// A clean end of the upstream's body counts only at the end `protocol` defines (SPEC 4e):
    /// short of it, the stream is broken like a reset.
    pub fn with_end_watch(mut self, protocol: Protocol) -> Self {
        self.ends = Some(EndWatch::new(protocol));
        self
    }

    /// Why a stream whose body ended cleanly is broken all the same (SPEC 4e), if it is.
    fn broken_at_end(&mut self) -> Option<String> {
        self.ends
            .as_mut()
            .and_then(EndWatch::broken_at_end)
            .map(str::to_string)
    }

    /// Relays event by event so that a break can be continued (SPEC 4a `resume`).
    pub fn with_resume(mut self, resumer: Resumer) -> Self {
        self.resumer = Some(Box::new(resumer));
        self
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
        if let Some(w) = self.ends.as_mut() {
            w.feed(b);
        }
        self.feed(b);
        self.sent(b);
    }

    fn feed(&mut self, b: &Bytes) {
        if let Some(c) = self.capture.as_mut() {
            c.feed_shared(b);
        }
    }

    /// Remembers the end of what went to the client.
    fn sent(&mut self, b: &[u8]) {
        match b.len() {
            0 => {}
            1 => self.tail = [self.tail[1], b[0]],
            n => self.tail = [b[n - 2], b[n - 1]],
        }
    }

    /// Whether the upstream body just ended short of its framing (cut, not complete).
    fn ended_short(&self) -> bool {
        let short = self.expected_len.is_some_and(|n| self.received < n);
        short || (self.chunked && transport::eof_seen())
    }

    /// Event mode (resume): the next bytes for the client, or the end.
    fn poll_events(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, RelayError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if let Some(reason) = self.break_after.take() {
                if let Some(p) = self.on_break(reason) {
                    return p;
                }
                continue;
            }
            let Some(r) = self.resumer.as_mut() else {
                return Poll::Ready(None);
            };
            if let Some(fut) = r.pending.as_mut() {
                let (cont, remaining) = match fut.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(c) => c,
                };
                r.pending = None;
                let view = r.view().clone();
                if let Some(ledger) = self.ledger.as_mut() {
                    for op in cont.ops {
                        match op {
                            Op::Sent(started) => ledger.sent_as(started),
                            Op::Failed(idx, f) => ledger.failed(&view, idx, f),
                            Op::Retrying(idx) => ledger.retrying(&view, idx),
                            Op::Result(idx, result) => ledger.resume_result(&view, idx, result),
                        }
                    }
                }
                match cont.outcome {
                    Ok(switch) => {
                        if let Some(ledger) = self.ledger.as_mut() {
                            ledger.resumed_on(&view, switch.idx, switch.first_byte);
                        }
                        r.switch(&switch, remaining);
                        if let Some(c) = self.capture.as_mut() {
                            c.next_segment();
                        }
                        let framing = framing_of(&switch.resp);
                        let mut resp = switch.resp;
                        self.upstream = body_of(&mut resp);
                        self.first = switch.first;
                        self.expected_len = framing.0;
                        self.chunked = framing.1;
                        self.received = 0;
                        self.last_data = Instant::now();
                        if let Some(w) = self.ends.as_mut() {
                            w.restart();
                        }
                    }
                    Err(reason) => return self.fail(reason),
                }
                continue;
            }
            let next = match self.first.take() {
                Some(b) => Poll::Ready(Some(Ok(b))),
                None => {
                    transport::clear_eof();
                    Pin::new(&mut self.upstream).poll_next(cx)
                }
            };
            match next {
                Poll::Ready(Some(Ok(b))) => {
                    self.last_data = Instant::now();
                    self.received += b.len() as u64;
                    if let Some(w) = self.ends.as_mut() {
                        w.feed(&b);
                    }
                    if let Some(out) = self.judge_events(&b) {
                        self.sent(&out);
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(None) => {
                    let short = self
                        .ended_short()
                        .then(|| "connection closed before the response was complete".to_string());
                    if let Some(reason) = short.or_else(|| self.broken_at_end()) {
                        if let Some(p) = self.on_break(reason) {
                            return p;
                        }
                        continue;
                    }
                    // A proper end; an event without its final blank line is still judged and
                    // goes out, and so does what a continuation still held back.
                    let mut out = BytesMut::new();
                    if let Some(r) = self.resumer.as_mut() {
                        let pending = r.splitter.peek();
                        if !pending.is_empty() {
                            let close: &[u8] = if pending.ends_with(b"\n") {
                                b"\n"
                            } else {
                                b"\n\n"
                            };
                            if let Some(b) = self.judge_events(&Bytes::from_static(close)) {
                                out.extend_from_slice(&b);
                            }
                        }
                    }
                    if self.break_after.is_some() {
                        // The last event broke it: what came before goes out first.
                        if out.is_empty() {
                            continue;
                        }
                        self.sent(&out);
                        return Poll::Ready(Some(Ok(out.freeze())));
                    }
                    let rest = self.resumer.as_mut().and_then(|r| r.release_held());
                    if let Some(rest) = rest {
                        self.feed(&rest);
                        out.extend_from_slice(&rest);
                    }
                    self.sent(&out);
                    self.resume_result_of_current("ok");
                    self.end(BodyEnd::Complete);
                    return Poll::Ready((!out.is_empty()).then(|| Ok(out.freeze())));
                }
                Poll::Ready(Some(Err(e))) => {
                    if let Some(p) = self.on_break(format!("connection broke mid-response: {e}")) {
                        return p;
                    }
                }
                Poll::Pending => match self.poll_idle(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => continue,
                    Poll::Ready(Some(reason)) => {
                        if let Some(p) = self.on_break(reason) {
                            return p;
                        }
                    }
                },
            }
        }
    }

    /// The idle timer: pending, re-armed (`None`: poll again), or expired with its reason. It is
    /// re-armed lazily: only when it fires is the last chunk's time looked at.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<Option<String>> {
        match self.sleep.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                let deadline = self.last_data + self.idle;
                if deadline > Instant::now() {
                    self.sleep.as_mut().reset(deadline);
                    return Poll::Ready(None);
                }
                let idle = self.idle.as_secs_f64();
                Poll::Ready(Some(format!("no data for {idle}s (idle_timeout)")))
            }
        }
    }

    /// Splits a chunk into events and judges each; what goes to the client, if anything.
    fn judge_events(&mut self, b: &Bytes) -> Option<Bytes> {
        let mut out = BytesMut::new();
        let r = self.resumer.as_mut()?;
        r.splitter.push(b);
        if r.splitter.pending() > EVENT_MAX && sse::event_end(r.splitter.peek()).is_none() {
            // No event ends within a sane size: relay the bytes as they are; this stream can no
            // longer be judged, so it will not be resumed.
            r.give_up();
            // What a continuation held back goes first, in order.
            let raw = match r.release_held() {
                Some(held) => [held, r.splitter.take_rest()].concat().into(),
                None => r.splitter.take_rest(),
            };
            if let Some(c) = self.capture.as_mut() {
                c.feed_shared(&raw);
            }
            return Some(raw);
        }
        while let Some(ev) = r.splitter.next_event() {
            let judged = r.judge(ev.clone());
            if r.take_restart() {
                // SPEC 4e: it answered from the start; read as a regeneration, and not sent a
                // prefill again until the next reload.
                let (view, idx) = (r.view().clone(), r.current);
                if let Some(ledger) = self.ledger.as_ref() {
                    ledger.resume_result(&view, idx, "restarted");
                    if let Some(up) = view.config.upstreams.get(idx) {
                        log::warn!(
                            "upstream {} ignored a prefill and answered from the start; it is asked to regenerate instead until the next reload",
                            up.name
                        );
                        view.learned.prefill_ignored(idx);
                    }
                }
            }
            match judged {
                Judged::Emit(bytes) => {
                    if let Some(c) = self.capture.as_mut() {
                        c.feed_shared(&bytes);
                    }
                    out.extend_from_slice(&bytes);
                }
                Judged::Drop { feed } => {
                    if feed {
                        if let Some(c) = self.capture.as_mut() {
                            c.feed_shared(&ev);
                        }
                    }
                }
                Judged::Break(reason) => {
                    r.splitter.clear();
                    self.break_after = Some(reason);
                    break;
                }
                Judged::Diverged => {
                    r.splitter.clear();
                    let view = r.view().clone();
                    let idx = r.current;
                    if let Some(ledger) = self.ledger.as_mut() {
                        ledger.resume_result(&view, idx, "diverged");
                        ledger.unfinished(
                            &view,
                            idx,
                            "the regenerated answer does not begin with the text already sent"
                                .into(),
                        );
                    }
                    self.break_after = Some("regeneration diverged".into());
                    break;
                }
            }
        }
        (!out.is_empty()).then(|| out.freeze())
    }

    /// `resumes_total` for the upstream streaming now, when it is a continuation.
    fn resume_result_of_current(&self, result: &str) {
        if let (Some(r), Some(ledger)) = (self.resumer.as_ref(), self.ledger.as_ref()) {
            if r.continuing {
                ledger.resume_result(r.view(), r.current, result);
            }
        }
    }

    /// A break in event mode: a continuation starts (None: keep polling), or the stream ends
    /// with the error event.
    fn on_break(&mut self, reason: String) -> Option<Poll<Option<Result<Bytes, RelayError>>>> {
        let resumable = self.resumer.as_ref().is_some_and(|r| r.can_resume());
        let already_broken = self.ledger.as_ref().is_some_and(Ledger::is_broken);
        if !already_broken {
            self.resume_result_of_current("failed");
        }
        if !resumable {
            return Some(self.fail(reason));
        }
        if let (Some(r), Some(ledger)) = (self.resumer.as_mut(), self.ledger.as_mut()) {
            if !ledger.is_broken() {
                let public = public_reason(&reason);
                ledger.stream_broke(reason, &public);
            }
            r.start(ledger);
        }
        None
    }

    fn fail(&mut self, reason: String) -> Poll<Option<Result<Bytes, RelayError>>> {
        let held = self.usage_filter.as_mut().and_then(UsageFilter::take_held);
        let event = self.sse.then(|| match held {
            Some(h) => [h, error_event(&self.tail, &reason)].concat().into(),
            None => error_event(&self.tail, &reason),
        });
        let public = public_reason(&reason);
        self.end(BodyEnd::Broken {
            reason: reason.clone(),
            public,
        });
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

/// A break's description in the gateway's own words (see the security guide): an in-band
/// error's message is the upstream's text and stays in the record and the log.
fn public_reason(reason: &str) -> String {
    if reason.starts_with("in-band error") {
        "in-band error event".to_string()
    } else {
        reason.to_string()
    }
}

/// `Content-Length` and whether the body is chunked, from a response head.
pub fn framing_of(resp: &Upstreamed) -> (Option<u64>, bool) {
    let length = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = resp
        .headers()
        .get(header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    (length, chunked)
}

impl Stream for RelayBody {
    type Item = Result<Bytes, RelayError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.resumer.is_some() {
            return this.poll_events(cx);
        }
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
                    if this.ended_short() {
                        return this
                            .fail("connection closed before the response was complete".into());
                    }
                    if let Some(reason) = this.broken_at_end() {
                        return this.fail(reason);
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
            match this.poll_idle(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => continue,
                Poll::Ready(Some(reason)) => return this.fail(reason),
            }
        }
    }
}

impl RelayBody {
    /// Accounts for the request, once: the first of the body's end, its break, or its drop.
    fn end(&mut self, end: BodyEnd) {
        self.done = true;
        if let (Some(ledger), Some(capture)) = (self.ledger.take(), self.capture.take()) {
            ledger.finish_body(end, capture.finish());
        }
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        self.end(BodyEnd::ClientGone);
    }
}
