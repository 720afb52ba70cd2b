//! Resuming a chat stream that broke after its first byte (see the rescue guide, "Resume").
//!
//! While resume is possible the relay reads the stream event by event through the one SSE
//! reader, and hands each event and its payload to [`Resumer::judge`]:
//! it keeps the text already sent, notices what cannot be continued (tool calls, logprobs), and
//! takes an in-band error event as a break instead of relaying it. When the stream breaks and a
//! candidate is left, [`continuation`] asks the next upstream to continue the text (its
//! `prefill` dialect) or, where it cannot, to answer again; the relay then carries on from that
//! upstream in the same client stream. A regeneration is relayed only from where the text
//! already sent ends, and only if it begins with exactly that text.
//!
//! An upstream asked to continue may ignore the prefill and answer from the start. So the first
//! characters of a continuation are held back while they repeat the start of the text already
//! sent: as soon as one differs, they go out; when the first [`RESTART_CHARS`] (or all of the
//! text sent, when shorter) repeat it, the continuation is read as a regeneration instead, and
//! that upstream is not sent a prefill again until the next reload. Leading whitespace counts in
//! neither text: a restart that begins with two spaces is a restart (see the rescue guide).

use std::sync::Arc;

use actix_web::web::{Bytes, BytesMut};

use crate::ledger::Ledger;
use crate::registry::RegistryView;
use crate::sse::Payload;

use super::continuation::{continuation, Continue, PendingContinuation, ResumePlan, Switch};

/// How many characters of a continuation decide whether it starts over.
pub const RESTART_CHARS: usize = 16;

/// What one chat-completion chunk says, as far as resuming it matters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChatChunk {
    /// `data: [DONE]`.
    pub done: bool,
    /// `choices[0].delta.content`.
    pub content: Option<String>,
    /// A `role` in the first choice's delta.
    pub role: bool,
    /// `tool_calls` or `function_call` in a delta.
    pub tools: bool,
    /// Non-null `logprobs` in a choice.
    pub logprobs: bool,
    /// The last non-null `finish_reason`.
    pub finish_reason: Option<String>,
    /// The data was not a chat chunk at all.
    pub unknown: bool,
}

impl ChatChunk {
    /// The chunk an event's payload (read once by the relay) is.
    pub fn of(p: &Payload<'_>) -> ChatChunk {
        if p.done {
            return ChatChunk {
                done: true,
                ..ChatChunk::default()
            };
        }
        if !p.object {
            return ChatChunk {
                unknown: true,
                ..ChatChunk::default()
            };
        }
        let c = &p.choices;
        let first = c.first.as_ref();
        ChatChunk {
            done: false,
            content: first.and_then(|f| f.text.as_deref()).map(str::to_string),
            role: first.is_some_and(|f| f.role),
            tools: c.tools,
            logprobs: c.logprobs,
            finish_reason: c.finish_reason.as_deref().map(str::to_string),
            unknown: false,
        }
    }
}

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
    /// bytes of it so far, leading whitespace of both left out).
    Regenerate { matched: usize, started: bool },
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
            pending: None,
            continuing: false,
        }
    }

    /// The registry view the candidates come from.
    pub fn view(&self) -> &Arc<RegistryView> {
        &self.view
    }

    /// Judges one complete event of the current upstream: `ev` is its bytes, `p` its payload,
    /// `error` the message of an in-band error event.
    pub fn judge(&mut self, ev: Bytes, p: &Payload<'_>, error: Option<String>) -> Judged {
        if let Some(message) = error {
            return Judged::Break(format!("in-band error: {message}"));
        }
        if self.usage_added && p.usage_only() {
            return Judged::Drop { feed: true };
        }
        let chunk = ChatChunk::of(p);
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
    /// [`RESTART_CHARS`] characters after leading whitespace, or all of it when shorter.
    fn head(&self) -> &str {
        let text = self.text.trim_start();
        let end = text
            .char_indices()
            .nth(RESTART_CHARS)
            .map_or(text.len(), |(i, _)| i);
        &text[..end]
    }

    /// A continuation's event while it may still be starting over: held, released, or (it
    /// repeats the start of the text already sent) judged as a regeneration.
    fn probe(&mut self, ev: Bytes, chunk: ChatChunk) -> Judged {
        let ends = chunk.done || chunk.finish_reason.is_some() || chunk.tools;
        let text = self.text.trim_start();
        let head_at = self.text.len() - text.len();
        let head_len = self.head().len();
        let Segment::Probe { held, seen } = &mut self.segment else {
            return Judged::Drop { feed: false };
        };
        if let Some(c) = chunk.content.as_deref() {
            seen.push_str(c);
        }
        held.push((ev, chunk));
        let head = &self.text[head_at..head_at + head_len];
        let seen = seen.trim_start();
        let restarted = if seen.len() >= head.len() {
            seen.starts_with(head)
        } else if head.starts_with(seen) && !ends {
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
            self.segment = Segment::Regenerate {
                matched: 0,
                started: false,
            };
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

    /// A regeneration's event: dropped while its text repeats the text already sent (leading
    /// whitespace of both left out), the rest of the chunk that passes it relayed, any
    /// difference a divergence.
    fn regenerate(&mut self, ev: Bytes, chunk: ChatChunk) -> Judged {
        let target_at = self.text.len() - self.text.trim_start().len();
        let Segment::Regenerate { matched, started } = &mut self.segment else {
            return self.judge_held(ev, chunk);
        };
        if chunk.tools {
            // It turned to tools before reaching the text already sent.
            return Judged::Diverged;
        }
        let ends = chunk.done || chunk.finish_reason.is_some();
        let mut c = chunk.content.as_deref().unwrap_or("");
        if !*started {
            c = c.trim_start();
            *started = !c.is_empty();
        }
        let target = &self.text[target_at..];
        let unmatched = &target[*matched..];
        let rest = if c.len() <= unmatched.len() {
            if !unmatched.starts_with(c) {
                return Judged::Diverged;
            }
            *matched += c.len();
            if !ends {
                return Judged::Drop { feed: false };
            }
            if *matched < target.len() {
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
            match with_content(&ev, &rest) {
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
        let ctx = Continue::new(&plan, self.view.clone(), ledger, self.text.clone());
        let remaining = std::mem::take(&mut plan.remaining);
        self.plan = Some(plan);
        self.pending = Some(Box::pin(continuation(ctx, remaining)));
    }

    /// The continuing upstream took over: its events are judged from now on; `remaining` are
    /// the candidates it leaves (for a later break).
    pub fn switch(&mut self, s: &Switch, remaining: Vec<usize>) {
        self.current = s.idx;
        self.usage_added = s.usage_added;
        self.continuing = true;
        self.skip_role = self.role_sent;
        self.restarted = false;
        self.segment = if s.regenerate {
            Segment::Regenerate {
                matched: 0,
                started: false,
            }
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

/// The event with `choices[0].delta.content` replaced by `content` (everything else kept), for
/// the one chunk of a regeneration that crosses the end of the text already sent.
fn with_content(ev: &[u8], content: &str) -> Option<Bytes> {
    let mut data = Vec::new();
    for line in ev.split(|b| *b == b'\n' || *b == b'\r') {
        if let Some(v) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(v.strip_prefix(b" ").unwrap_or(v));
        }
    }
    let mut v: serde_json::Value = serde_json::from_slice(&data).ok()?;
    let slot = v.pointer_mut("/choices/0/delta/content")?;
    *slot = serde_json::Value::String(content.to_string());
    Some(Bytes::from(format!("data: {v}\n\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crossing_chunk_keeps_all_but_its_text() {
        let ev = with_content(
            b"data: {\"id\":\"x\",\"choices\":[{\"delta\":{\"content\":\"Hello world\"}}]}\n\n",
            " world",
        )
        .unwrap();
        let text = String::from_utf8(ev.to_vec()).unwrap();
        assert!(text.contains("\"content\":\" world\""), "{text}");
        assert!(text.contains("\"id\":\"x\""), "{text}");
    }

    #[test]
    fn chunks_are_read_from_the_one_payload() {
        let p = Payload::read(
            br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
        );
        let c = ChatChunk::of(&p);
        assert!(c.role && c.content.as_deref() == Some("") && !c.done);
        assert!(ChatChunk::of(&Payload::read(b"[DONE]")).done);
        assert!(ChatChunk::of(&Payload::read(b"nonsense")).unknown);
    }
}
