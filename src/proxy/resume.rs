//! Resuming a chat stream that broke after its first byte (SPEC 4a `resume`).
//!
//! While resume is possible the relay reads the stream event by event ([`Resumer::judge`]):
//! it keeps the text already sent, notices what cannot be continued (tool calls, logprobs), and
//! takes an in-band error event as a break instead of relaying it. When the stream breaks and a
//! candidate is left, [`continuation`] asks the next upstream to continue the text (its
//! `prefill` dialect) or, where it cannot, to answer again; the relay then carries on from that
//! upstream in the same client stream. A regeneration is relayed only from where the text
//! already sent ends, and only if it begins with exactly that text.
//!
//! An upstream asked to continue may ignore the prefill and answer from the start (SPEC 4e). So
//! the first characters of a continuation are held back while they repeat the start of the text
//! already sent: as soon as one differs, they go out; when the first [`RESTART_CHARS`] (or all
//! of the text sent, when shorter) repeat it, the continuation is read as a regeneration
//! instead, and that upstream is not sent a prefill again until the next reload.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::web::{Bytes, BytesMut};
use actix_web::HttpRequest;
use serde_json::Value;

use crate::attempt::{is_failover_status, FailKind};
use crate::config::Prefill;
use crate::ledger::{AttemptFailure, Ledger};
use crate::registry::RegistryView;
use crate::sse::{self, ChatChunk, EventSplitter};
use crate::state::AppState;
use crate::trace::{Link, Propagation, Started};

use super::attempt::{self as one, Upstreamed};
use super::prefill::{mapped, prefill_body};

/// What the request path hands the relay so that a broken stream can be continued.
pub struct ResumePlan {
    /// The worker's upstream client.
    pub client: awc::Client,
    /// The client's request (method, path, query, headers).
    pub req: HttpRequest,
    /// Candidates not tried yet, in order.
    pub remaining: VecDeque<usize>,
    /// The original body with `stream_options.include_usage` added (4b), when it applies.
    pub usage_body: Option<Bytes>,
    /// Text beyond this is not resumed: it outgrew the capture, or `resume_max_bytes` (SPEC 4d),
    /// so that a first upstream cannot make the next one read an unbounded prefill.
    pub text_limit: usize,
}

/// Whether a request may be resumed at all: a chat-completions stream asking for one choice.
pub fn resumable_request(path: &str, stream: bool, body: &[u8]) -> bool {
    if !stream || path != "/v1/chat/completions" {
        return false;
    }
    #[derive(serde::Deserialize)]
    struct N {
        #[serde(default)]
        n: Option<Value>,
    }
    match serde_json::from_slice::<N>(body) {
        Ok(N { n: Some(n) }) => n.as_u64().is_some_and(|n| n <= 1) || n.is_null(),
        Ok(N { n: None }) => true,
        Err(_) => false,
    }
}

/// How many characters of a continuation decide whether it starts over (SPEC 4e).
pub const RESTART_CHARS: usize = 16;

/// How the current upstream's events are treated.
enum Segment {
    /// Relayed as they come (the first upstream, or a continuation of the text).
    Relay,
    /// A continuation by prefill whose text so far repeats the start of the text already sent:
    /// held back until it shows whether it continues the text or starts over.
    Probe {
        /// The events held, each with what it says.
        held: Vec<(Bytes, ChatChunk)>,
        /// Their text.
        seen: String,
    },
    /// A regeneration: swallowed until its text passes the text already sent (`matched`
    /// bytes of it so far).
    Regenerate { matched: usize },
}

/// What the relay does with one event.
pub enum Judged {
    /// Send these bytes (fed to the capture too).
    Emit(Bytes),
    /// Send nothing.
    Drop {
        /// Feed the capture with the event all the same (a usage-only chunk: its tokens count).
        feed: bool,
    },
    /// The stream broke in-band (an error event).
    Break(String),
    /// The regeneration does not begin with the text already sent.
    Diverged,
}

/// A continuation's result, applied to the ledger by the relay.
pub struct Continued {
    /// What happened on the way, in order.
    pub ops: Vec<Op>,
    /// The upstream that took over, or why none did.
    pub outcome: Result<Switch, String>,
}

/// One accountable step of a continuation.
pub enum Op {
    /// A request went upstream (its attempt span, when traced).
    Sent(Option<Started>),
    /// An attempt failed.
    Failed(usize, AttemptFailure),
    /// A `resumes_total` result.
    Result(usize, &'static str),
}

/// The upstream that continues the stream.
pub struct Switch {
    /// Its index in the view.
    pub idx: usize,
    /// Its response, head (and first event) read.
    pub resp: Upstreamed,
    /// What was read of its body.
    pub first: Option<Bytes>,
    /// Attempt start to first event.
    pub first_byte: Duration,
    regenerate: bool,
    usage_added: bool,
}

/// A continuation in flight: what it did, and the candidates it leaves.
pub type PendingContinuation = Pin<Box<dyn Future<Output = (Continued, VecDeque<usize>)>>>;

impl Switch {
    fn new(
        idx: usize,
        (resp, first): (Upstreamed, Option<Bytes>),
        t0: Instant,
        regenerate: bool,
        usage_added: bool,
    ) -> Switch {
        Switch {
            idx,
            resp,
            first,
            first_byte: t0.elapsed(),
            regenerate,
            usage_added,
        }
    }
}

/// The relay's resume state; see the module docs.
pub struct Resumer {
    plan: Option<ResumePlan>,
    view: Arc<RegistryView>,
    /// The upstream streaming now.
    pub current: usize,
    text: String,
    role_sent: bool,
    /// Why it can no longer be resumed, once something was sent that cannot be continued.
    blocked: bool,
    segment: Segment,
    /// A first chunk that carries only the role is dropped: the client already has one.
    skip_role: bool,
    /// The continuation just turned out to start over (taken by the relay for its accounts).
    restarted: bool,
    usage_added: bool,
    /// The current upstream's stream, split into events.
    pub splitter: EventSplitter,
    /// A continuation in flight.
    pub pending: Option<PendingContinuation>,
    /// The current upstream is a continuation (its completion counts as `resumes_total{ok}`).
    pub continuing: bool,
}

impl Resumer {
    /// Resume state for a stream committed to `view`'s upstream `idx`.
    pub fn new(plan: ResumePlan, view: Arc<RegistryView>, idx: usize, usage_added: bool) -> Self {
        Resumer {
            plan: Some(plan),
            view,
            current: idx,
            text: String::new(),
            role_sent: false,
            blocked: false,
            segment: Segment::Relay,
            skip_role: false,
            restarted: false,
            usage_added,
            splitter: EventSplitter::default(),
            pending: None,
            continuing: false,
        }
    }

    /// The registry view the candidates come from.
    pub fn view(&self) -> &Arc<RegistryView> {
        &self.view
    }

    /// Judges one complete event of the current upstream.
    pub fn judge(&mut self, ev: Bytes) -> Judged {
        if sse::is_error_event(&ev) {
            return Judged::Break(format!("in-band error: {}", sse::error_message(&ev)));
        }
        if self.usage_added && crate::usage::is_usage_only(&ev) {
            return Judged::Drop { feed: true };
        }
        let chunk = sse::chat_chunk(&ev);
        if self.skip_role && !chunk.unknown && !chunk.done {
            self.skip_role = false;
            if chunk.role
                && chunk.content.as_deref().unwrap_or("").is_empty()
                && !chunk.tools
                && chunk.finish_reason.is_none()
            {
                return Judged::Drop { feed: false };
            }
        }
        match self.segment {
            Segment::Relay => {
                self.note(&chunk);
                Judged::Emit(ev)
            }
            Segment::Probe { .. } => self.probe(ev, chunk),
            Segment::Regenerate { .. } => self.regenerate(ev, chunk),
        }
    }

    /// The start of the text already sent that a continuation must not repeat: its first
    /// [`RESTART_CHARS`] characters, or all of it when shorter.
    fn head(&self) -> &str {
        let end = self
            .text
            .char_indices()
            .nth(RESTART_CHARS)
            .map_or(self.text.len(), |(i, _)| i);
        &self.text[..end]
    }

    /// A continuation's event while it may still be starting over: held, released, or (it
    /// repeats the start of the text already sent) judged as a regeneration.
    fn probe(&mut self, ev: Bytes, chunk: ChatChunk) -> Judged {
        let ends = chunk.done || chunk.finish_reason.is_some() || chunk.tools;
        let head_len = self.head().len();
        let Segment::Probe { held, seen } = &mut self.segment else {
            return Judged::Drop { feed: false };
        };
        if let Some(c) = chunk.content.as_deref() {
            seen.push_str(c);
        }
        held.push((ev, chunk));
        let head = &self.text[..head_len];
        let restarted = if seen.len() >= head.len() {
            seen.starts_with(head)
        } else if head.starts_with(seen.as_str()) && !ends {
            // Still repeating the start of the text sent: not decided yet.
            return Judged::Drop { feed: false };
        } else {
            false
        };
        let Segment::Probe { held, .. } = std::mem::replace(&mut self.segment, Segment::Relay)
        else {
            return Judged::Drop { feed: false };
        };
        let mut out = BytesMut::new();
        if restarted {
            self.restarted = true;
            self.segment = Segment::Regenerate { matched: 0 };
            for (ev, chunk) in held {
                match self.judge_held(ev, chunk) {
                    Judged::Emit(b) => out.extend_from_slice(&b),
                    Judged::Diverged => return Judged::Diverged,
                    Judged::Drop { .. } | Judged::Break(_) => {}
                }
            }
        } else {
            for (ev, chunk) in held {
                self.note(&chunk);
                out.extend_from_slice(&ev);
            }
        }
        if out.is_empty() {
            Judged::Drop { feed: false }
        } else {
            Judged::Emit(out.freeze())
        }
    }

    /// A held event, judged by the segment it turned out to belong to.
    fn judge_held(&mut self, ev: Bytes, chunk: ChatChunk) -> Judged {
        match self.segment {
            Segment::Regenerate { .. } => self.regenerate(ev, chunk),
            _ => {
                self.note(&chunk);
                Judged::Emit(ev)
            }
        }
    }

    /// A regeneration's event: dropped while its text repeats the text already sent, the rest
    /// of the chunk that passes it relayed, any difference a divergence.
    fn regenerate(&mut self, ev: Bytes, chunk: ChatChunk) -> Judged {
        let Segment::Regenerate { matched } = &mut self.segment else {
            return self.judge_held(ev, chunk);
        };
        if chunk.tools {
            // It turned to tools before reaching the text already sent.
            return Judged::Diverged;
        }
        let ends = chunk.done || chunk.finish_reason.is_some();
        let unmatched = &self.text[*matched..];
        let c = chunk.content.as_deref().unwrap_or("");
        let rest = if c.len() <= unmatched.len() {
            if !unmatched.starts_with(c) {
                return Judged::Diverged;
            }
            *matched += c.len();
            if !ends {
                return Judged::Drop { feed: false };
            }
            if *matched < self.text.len() {
                // It ended before reaching the end of the text already sent.
                return Judged::Diverged;
            }
            String::new()
        } else if let Some(rest) = c.strip_prefix(unmatched) {
            rest.to_string()
        } else {
            return Judged::Diverged;
        };
        let out = if chunk.content.is_some() {
            match sse::with_content(&ev, &rest) {
                Some(out) => out,
                None => return Judged::Diverged,
            }
        } else {
            ev
        };
        self.segment = Segment::Relay;
        self.note(&ChatChunk {
            content: chunk.content.is_some().then_some(rest),
            ..chunk
        });
        Judged::Emit(out)
    }

    /// Whether the continuation just turned out to start over (once).
    pub fn take_restart(&mut self) -> bool {
        std::mem::take(&mut self.restarted)
    }

    /// The stream ended properly: what a continuation still held goes out (it did not start over).
    pub fn release_held(&mut self) -> Option<Bytes> {
        let Segment::Probe { held, .. } = std::mem::replace(&mut self.segment, Segment::Relay)
        else {
            return None;
        };
        let mut out = BytesMut::new();
        for (ev, chunk) in held {
            self.note(&chunk);
            out.extend_from_slice(&ev);
        }
        (!out.is_empty()).then(|| out.freeze())
    }

    /// Keeps what was sent of one relayed chunk.
    fn note(&mut self, chunk: &ChatChunk) {
        self.role_sent |= chunk.role;
        if chunk.tools || chunk.logprobs {
            self.blocked = true;
        }
        if let Some(c) = &chunk.content {
            self.text.push_str(c);
        }
        let limit = self.plan.as_ref().map_or(0, |p| p.text_limit);
        if self.text.len() > limit {
            self.blocked = true;
        }
    }

    /// The stream can no longer be read event by event (an event too long to hold): it is
    /// relayed as it comes and not resumed.
    pub fn give_up(&mut self) {
        self.blocked = true;
    }

    /// Whether a break now can be continued.
    pub fn can_resume(&self) -> bool {
        !self.blocked
            && self.pending.is_none()
            && self.plan.as_ref().is_some_and(|p| !p.remaining.is_empty())
    }

    /// Starts the continuation after a break (the ledger has accounted for the break).
    pub fn start(&mut self, ledger: &Ledger) {
        let Some(mut plan) = self.plan.take() else {
            return;
        };
        let ctx = Ctx {
            state: ledger.state().clone(),
            client: plan.client.clone(),
            req: plan.req.clone(),
            view: self.view.clone(),
            remaining: std::mem::take(&mut plan.remaining),
            body: ledger.info().body.clone(),
            usage_body: plan.usage_body.clone(),
            model: ledger.info().model.as_deref().map(str::to_string),
            text: self.text.clone(),
            trace: ledger.trace_link(),
        };
        self.splitter.clear();
        self.plan = Some(plan);
        self.pending = Some(Box::pin(continuation(ctx)));
    }

    /// The continuing upstream took over: its events are judged from now on. Returns the
    /// candidates it leaves (for a later break).
    pub fn switch(&mut self, s: &Switch, remaining: VecDeque<usize>) {
        self.current = s.idx;
        self.usage_added = s.usage_added;
        self.continuing = true;
        self.skip_role = self.role_sent;
        self.restarted = false;
        self.segment = if s.regenerate {
            Segment::Regenerate { matched: 0 }
        } else if self.text.is_empty() {
            Segment::Relay
        } else {
            Segment::Probe {
                held: Vec::new(),
                seen: String::new(),
            }
        };
        if let Some(p) = self.plan.as_mut() {
            p.remaining = remaining;
        }
    }
}

/// What a continuation needs, owned (it runs while the relay is being polled).
struct Ctx {
    state: Arc<AppState>,
    client: awc::Client,
    req: HttpRequest,
    view: Arc<RegistryView>,
    remaining: VecDeque<usize>,
    body: Bytes,
    usage_body: Option<Bytes>,
    model: Option<String>,
    text: String,
    /// The request's trace, when traced: each attempt sends its own `traceparent`.
    trace: Option<Link>,
}

/// Finds an upstream to continue the stream: each remaining candidate in turn, with the text
/// sent as a prefill (or, where the upstream cannot take one, as a regeneration).
async fn continuation(mut ctx: Ctx) -> (Continued, VecDeque<usize>) {
    let mut ops = Vec::new();
    while let Some(idx) = ctx.remaining.pop_front() {
        let Some(up) = ctx.view.config.upstreams.get(idx) else {
            continue;
        };
        let last = ctx.remaining.is_empty();
        let add_usage = ctx.usage_body.is_some()
            && up.force_usage
            && !ctx
                .state
                .stream_options_refused
                .refused(&ctx.view.config, &up.name);
        let base = match (&ctx.usage_body, add_usage) {
            (Some(b), true) => b.clone(),
            _ => ctx.body.clone(),
        };
        let base = mapped(&base, up, ctx.model.as_deref());
        let wait = one::first_byte_wait(up, true, last, base.len());
        // An upstream seen ignoring a prefill (SPEC 4e) is asked as if it had `prefill: none`.
        let takes_prefill = up.prefill != Prefill::None
            && !ctx
                .state
                .prefill_ignored
                .refused(&ctx.view.config, &up.name);
        let prefill = (!ctx.text.is_empty() && takes_prefill)
            .then(|| prefill_body(&base, &ctx.text, up.prefill))
            .flatten();
        let regenerate = !ctx.text.is_empty() && prefill.is_none();
        let body = prefill.clone().unwrap_or_else(|| base.clone());
        let (started, trace) = traced(&ctx.trace);
        ops.push(Op::Sent(started));
        let t0 = Instant::now();
        let send = one::attempt(&ctx.client, up, &ctx.req, body, true, trace);
        let got = actix_rt::time::timeout(wait, send);
        let failure = match got.await {
            Ok(Ok((resp, first))) if resp.status().is_success() => {
                let s = Switch::new(idx, (resp, first), t0, regenerate, add_usage);
                return switched(ops, s, ctx.remaining);
            }
            Ok(Ok((resp, _)))
                if prefill.is_some()
                    && resp.status().is_client_error()
                    && !is_failover_status(resp.status()) =>
            {
                // It cannot take a prefill: answer again, and relay what follows the text.
                let status = resp.status();
                drop(resp);
                ops.push(Op::Failed(
                    idx,
                    AttemptFailure {
                        quiet: true,
                        ..AttemptFailure::new(
                            FailKind::Http,
                            Some(status.as_u16()),
                            format!("prefill refused: HTTP {status}"),
                        )
                    },
                ));
                ops.push(Op::Result(idx, "rejected"));
                let (started, trace) = traced(&ctx.trace);
                ops.push(Op::Sent(started));
                let t0 = Instant::now();
                let send = one::attempt(&ctx.client, up, &ctx.req, base.clone(), true, trace);
                let again = actix_rt::time::timeout(wait, send);
                match again.await {
                    Ok(Ok((resp, first))) if resp.status().is_success() => {
                        let s = Switch::new(idx, (resp, first), t0, true, add_usage);
                        return switched(ops, s, ctx.remaining);
                    }
                    other => failure_of(other, wait),
                }
            }
            other => failure_of(other, wait),
        };
        ops.push(Op::Failed(
            idx,
            AttemptFailure {
                moving_on: !last,
                ..failure
            },
        ));
        ops.push(Op::Result(idx, "failed"));
    }
    (
        Continued {
            ops,
            outcome: Err("no candidate left to continue the stream".into()),
        },
        ctx.remaining,
    )
}

/// A continuation attempt's span and trace headers, when the request is traced.
fn traced(link: &Option<Link>) -> (Option<Started>, Option<Propagation>) {
    match link.as_ref().map(Link::attempt) {
        Some((s, p)) => (Some(s), Some(p)),
        None => (None, None),
    }
}

type AttemptOutcome =
    Result<Result<(Upstreamed, Option<Bytes>), one::AttemptError>, tokio::time::error::Elapsed>;

/// A continuation that found its upstream.
fn switched(ops: Vec<Op>, s: Switch, remaining: VecDeque<usize>) -> (Continued, VecDeque<usize>) {
    let outcome = Ok(s);
    (Continued { ops, outcome }, remaining)
}

/// The failure an unsuccessful continuation attempt amounts to.
fn failure_of(outcome: AttemptOutcome, wait: Duration) -> AttemptFailure {
    match outcome {
        Ok(Ok((resp, _))) => {
            let status = resp.status();
            AttemptFailure::new(
                FailKind::Http,
                Some(status.as_u16()),
                format!("HTTP {status}"),
            )
        }
        Ok(Err(e)) => AttemptFailure::new(e.kind, None, e.reason),
        Err(_) => AttemptFailure::new(
            FailKind::Timeout,
            None,
            format!("no first chunk within {}", one::secs(wait)),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_single_choice_chat_streams_are_resumable() {
        let p = "/v1/chat/completions";
        assert!(resumable_request(p, true, br#"{"messages":[]}"#));
        assert!(resumable_request(p, true, br#"{"n":1}"#));
        assert!(!resumable_request(p, true, br#"{"n":2}"#));
        assert!(!resumable_request(p, false, br#"{}"#));
        assert!(!resumable_request("/v1/completions", true, br#"{}"#));
    }
}
