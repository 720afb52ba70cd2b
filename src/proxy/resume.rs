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

use std::sync::Arc;

use actix_web::web::{Bytes, BytesMut};

use crate::ledger::Ledger;
use crate::registry::RegistryView;
use crate::sse::{self, ChatChunk, EventSplitter};

use super::continuation::{continuation, Continue, PendingContinuation, ResumePlan, Switch};

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
        let ctx = Continue::new(&plan, self.view.clone(), ledger, self.text.clone());
        let remaining = std::mem::take(&mut plan.remaining);
        self.splitter.clear();
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
