//! The response body relayed to the client once an upstream is chosen.
//!
//! It passes chunks through as they arrive (never buffering the whole body), watches for an
//! upstream that goes silent past `idle_timeout`, turns a broken or stalled SSE stream into a
//! final `data: {"error":…}` event instead of a silent truncation, and — whether the response
//! completes, breaks, or the client goes away (drop) — produces the request's record exactly once.
//!
//! An SSE body is read by one [`sse::Reader`]: each event is framed once and its payload read
//! once, then shown to every observer — the reply capture, the protocol's end ([`EndWatch`]),
//! the usage filter and, with `resume`, the continuation's judge ([`Resumer`]). When the
//! protocol's end comes, what the upstream sends after it is neither relayed nor recorded, and
//! its connection is closed (see the rescue guide, "Truthful ends"). Events are held back only
//! when an observer may drop or rewrite them (the usage filter, a continuation), and then one
//! event at a time.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_rt::time::{sleep_until, Instant, Sleep};
use actix_web::web::{Bytes, BytesMut};
use futures_util::Stream;
use std::future::Future;

use crate::capture::Capture;
use crate::ledger::{BodyEnd, Ledger};
use crate::sse;
use crate::transport;

use super::attempt::{body_of, UpstreamBody, Upstreamed};
use super::continuation::Op;
use super::ends::{EndWatch, Protocol};
use super::resume::Resumer;

mod events;

use self::events::{Events, Next};

/// What the relayed body yields.
type Item = Result<Bytes, RelayError>;

/// How long the end of an upstream's body is waited for after its protocol's end.
const DRAIN_AFTER_END: Duration = Duration::from_secs(2);

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
    /// The SSE reading (SSE bodies only).
    events: Option<Box<Events>>,
    /// A break seen in-band while events before it were still to be sent.
    break_after: Option<String>,
    /// The protocol's end went out: the body ends after this chunk.
    end_after: bool,
    /// The upstream sent bytes after its protocol's end (never relayed): its connection is
    /// closed rather than drained for reuse.
    spoke_after_end: bool,
}

/// What the relay needs besides the upstream response.
pub struct Setup {
    /// A chunk already read (stream requests).
    pub first: Option<Bytes>,
    /// `idle_timeout`.
    pub idle: Duration,
    /// The body is SSE.
    pub sse: bool,
    /// `Content-Length` and whether it is chunked.
    pub framing: (Option<u64>, bool),
    /// The protocol whose end is judged (2xx SSE of chat, completions, Responses).
    pub protocol: Option<Protocol>,
    /// Hide the usage-only chunk (the gateway added `include_usage`).
    pub hide_usage: bool,
    /// Continue the stream if it breaks.
    pub resumer: Option<Resumer>,
    /// Longest SSE line read whole (the capture's bound).
    pub line_max: usize,
}

impl RelayBody {
    /// Wraps an upstream body.
    pub fn new(mut upstream: Upstreamed, setup: Setup, ledger: Ledger, capture: Capture) -> Self {
        let now = Instant::now();
        let events = setup.sse.then(|| {
            Box::new(Events {
                reader: sse::Reader::new(setup.line_max),
                ends: setup.protocol.map(EndWatch::new),
                hide_usage: setup.hide_usage && setup.resumer.is_none(),
                resumer: setup.resumer.map(Box::new),
                held: BytesMut::new(),
                passing: false,
            })
        });
        RelayBody {
            first: setup.first,
            upstream: body_of(&mut upstream),
            idle: setup.idle,
            sleep: Box::pin(sleep_until(now + setup.idle)),
            last_data: now,
            sse: setup.sse,
            tail: [b'\n', b'\n'],
            done: false,
            expected_len: setup.framing.0,
            chunked: setup.framing.1,
            received: 0,
            capture: Some(capture),
            ledger: Some(ledger),
            events,
            break_after: None,
            end_after: false,
            spoke_after_end: false,
        }
    }

    /// Accounts for a response that has no body at all (204, 304).
    pub fn finish_empty(mut self) {
        self.end(BodyEnd::Complete);
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

    /// What of an upstream chunk goes to the client now (possibly nothing yet).
    fn on_chunk(&mut self, b: Bytes) -> Bytes {
        self.received += b.len() as u64;
        let Some(ev) = self.events.as_mut() else {
            if let Some(c) = self.capture.as_mut() {
                c.feed_shared(&b);
            }
            return b;
        };
        let read = ev.read(&b, &mut self.capture, &mut self.ledger);
        match read.next {
            Next::More => {}
            Next::Break(reason) => self.break_after = Some(reason),
            Next::End { spoke_after } => {
                self.end_after = true;
                self.spoke_after_end = spoke_after;
            }
        }
        read.out
    }

    /// The upstream's body ended cleanly: the last event (without a final blank line) is
    /// judged, and the end checked against the framing and the protocol.
    fn on_clean_end(&mut self) -> Result<Bytes, String> {
        if self.ended_short() {
            return Err("connection closed before the response was complete".into());
        }
        match self.events.as_mut() {
            Some(ev) => ev.finish(&mut self.capture, &mut self.ledger),
            None => Ok(Bytes::new()),
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

    /// A continuation in flight: pending, or its result applied (None: go on reading; Some: the
    /// stream ends with the error event).
    fn poll_continuation(&mut self, cx: &mut Context<'_>) -> Poll<Option<Poll<Option<Item>>>> {
        let Some(r) = self.events.as_mut().and_then(|e| e.resumer.as_mut()) else {
            return Poll::Ready(None);
        };
        let Some(fut) = r.pending.as_mut() else {
            return Poll::Ready(None);
        };
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
        let switch = match cont.outcome {
            Ok(switch) => switch,
            Err(reason) => return Poll::Ready(Some(self.fail(reason))),
        };
        if let Some(ledger) = self.ledger.as_mut() {
            ledger.resumed_on(&view, switch.idx, switch.first_byte);
        }
        if let Some(ev) = self.events.as_mut() {
            if let Some(r) = ev.resumer.as_mut() {
                r.switch(&switch, remaining);
            }
            ev.reader.restart();
            ev.held.clear();
            ev.passing = false;
            if let Some(w) = ev.ends.as_mut() {
                w.restart();
            }
        }
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
        Poll::Ready(None)
    }

    /// `resumes_total` for the upstream streaming now, when it is a continuation.
    fn resume_result_of_current(&self, result: &str) {
        let r = self.events.as_ref().and_then(|e| e.resumer.as_ref());
        if let (Some(r), Some(ledger)) = (r, self.ledger.as_ref()) {
            if r.continuing {
                ledger.resume_result(r.view(), r.current, result);
            }
        }
    }

    /// A break: a continuation starts (None: keep polling), or the stream ends with the error
    /// event.
    fn on_break(&mut self, reason: String) -> Option<Poll<Option<Result<Bytes, RelayError>>>> {
        let r = self.events.as_mut().and_then(|e| e.resumer.as_mut());
        let resumable = r.as_ref().is_some_and(|r| r.can_resume());
        let already_broken = self.ledger.as_ref().is_some_and(Ledger::is_broken);
        if !already_broken {
            self.resume_result_of_current("failed");
        }
        if !resumable {
            return Some(self.fail(reason));
        }
        let r = self.events.as_mut().and_then(|e| e.resumer.as_mut());
        if let (Some(r), Some(ledger)) = (r, self.ledger.as_mut()) {
            if !ledger.is_broken() {
                let public = public_reason(&reason);
                ledger.stream_broke(reason, &public);
            }
            r.start(ledger);
        }
        None
    }

    fn fail(&mut self, reason: String) -> Poll<Option<Result<Bytes, RelayError>>> {
        // What was held of an event goes out before the error event (the usage filter's).
        let held = self
            .events
            .as_mut()
            .filter(|e| e.resumer.is_none())
            .map(|e| std::mem::take(&mut e.held).freeze())
            .filter(|h| !h.is_empty());
        let event = self.sse.then(|| match held {
            Some(h) => {
                let ev: Bytes = [h.clone(), error_event(&h_tail(&h, self.tail), &reason)]
                    .concat()
                    .into();
                ev
            }
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

/// The last two bytes after `h` was sent (whose tail was `tail` before).
fn h_tail(h: &[u8], tail: [u8; 2]) -> [u8; 2] {
    match h.len() {
        0 => tail,
        1 => [tail[1], h[0]],
        n => [h[n - 2], h[n - 1]],
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
    use actix_web::http::header;
    let length = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = resp
        .headers()
        .get(header::TRANSFER_ENCODING)
        .is_some_and(|v| {
            v.as_bytes()
                .windows(7)
                .any(|w| w.eq_ignore_ascii_case(b"chunked"))
        });
    (length, chunked)
}

impl Stream for RelayBody {
    type Item = Result<Bytes, RelayError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if this.end_after {
                // The protocol's end went out: the body is whole; what follows is not read
                // (the upstream connection is closed with the body).
                this.resume_result_of_current("ok");
                this.end(BodyEnd::Complete);
                return Poll::Ready(None);
            }
            if let Some(reason) = this.break_after.take() {
                match this.on_break(reason) {
                    Some(p) => return p,
                    None => continue,
                }
            }
            match this.poll_continuation(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(p)) => return p,
                Poll::Ready(None) => {}
            }
            let next = match this.first.take() {
                Some(b) => Poll::Ready(Some(Ok(b))),
                None => {
                    transport::clear_eof();
                    Pin::new(&mut this.upstream).poll_next(cx)
                }
            };
            match next {
                Poll::Ready(Some(Ok(b))) => {
                    this.last_data = Instant::now();
                    let out = this.on_chunk(b);
                    if !out.is_empty() {
                        this.sent(&out);
                        if this.end_after {
                            // The whole answer goes out with this chunk: a client that closes
                            // right after it has it all.
                            this.resume_result_of_current("ok");
                            this.end(BodyEnd::Complete);
                        }
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(None) => match this.on_clean_end() {
                    Ok(rest) => {
                        this.sent(&rest);
                        this.resume_result_of_current("ok");
                        this.end(BodyEnd::Complete);
                        return Poll::Ready((!rest.is_empty()).then_some(Ok(rest)));
                    }
                    Err(reason) => match this.on_break(reason) {
                        Some(p) => return p,
                        None => continue,
                    },
                },
                Poll::Ready(Some(Err(e))) => {
                    match this.on_break(format!("connection broke mid-response: {e}")) {
                        Some(p) => return p,
                        None => continue,
                    }
                }
                Poll::Pending => match this.poll_idle(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => continue,
                    Poll::Ready(Some(reason)) => match this.on_break(reason) {
                        Some(p) => return p,
                        None => continue,
                    },
                },
            }
        }
    }
}

impl RelayBody {
    /// Accounts for the request, once: the first of the body's end, its break, or its drop.
    fn end(&mut self, end: BodyEnd) {
        if self.end_after && !self.done {
            self.drain_after_end();
        }
        self.done = true;
        if let (Some(ledger), Some(capture)) = (self.ledger.take(), self.capture.take()) {
            ledger.finish_body(end, capture.finish());
        }
    }

    /// After the protocol's end nothing more is relayed. An upstream that ends its body right
    /// there keeps its connection for reuse (read to the end in the background, briefly); one
    /// that sends anything more has it closed.
    fn drain_after_end(&mut self) {
        let mut upstream = std::mem::replace(&mut self.upstream, actix_http::Payload::None);
        if self.spoke_after_end {
            return;
        }
        actix_rt::spawn(async move {
            use futures_util::StreamExt;
            let drain = async {
                while let Some(Ok(b)) = upstream.next().await {
                    if !b.is_empty() {
                        // More after the end: dropped here, and the connection with it.
                        return;
                    }
                }
            };
            let _ = actix_rt::time::timeout(DRAIN_AFTER_END, drain).await;
        });
    }

    /// Whether every byte of a sized body has been relayed: a client that leaves now still got
    /// the whole answer.
    fn whole_body_sent(&self) -> bool {
        !self.sse && self.expected_len.is_some_and(|n| self.received >= n)
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        let end = if self.whole_body_sent() {
            BodyEnd::Complete
        } else {
            BodyEnd::ClientGone
        };
        self.end(end);
    }
}
