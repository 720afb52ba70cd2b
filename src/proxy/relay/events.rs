//! What the one SSE reader's events do to the bytes a client is sent: each event is framed once,
//! its payload read once, and shown to every observer (capture, protocol end, usage filter,
//! continuation judge); the event's bytes then go out as they came, or are held back until the
//! event is whole when an observer may drop or rewrite it.

use actix_web::web::{Bytes, BytesMut};

use crate::capture::Capture;
use crate::ledger::Ledger;
use crate::sse::{self, Flow};

use super::super::ends::EndWatch;
use super::super::resume::{Judged, Resumer};

/// The longest SSE event held back to be judged; past it the event is relayed as it comes (and
/// a stream that can no longer be judged is not resumed).
const HOLD_MAX: usize = 64 << 10;

/// How the events of an SSE body are read and held.
pub(super) struct Events {
    pub(super) reader: sse::Reader,
    /// Judges whether the stream reached its protocol's end; None for other paths.
    pub(super) ends: Option<EndWatch>,
    /// Keeps the usage-only chunk the gateway asked for from the client (`force_usage`).
    pub(super) hide_usage: bool,
    /// Event-by-event relay that can continue a broken stream (`resume`).
    pub(super) resumer: Option<Box<Resumer>>,
    /// Bytes of the event being read, held back until it is judged.
    pub(super) held: BytesMut,
    /// The event being read outgrew [`HOLD_MAX`]: the rest of it passes as it comes.
    pub(super) passing: bool,
}

/// What a chunk's events leave the relay to do.
pub(super) enum Next {
    /// Read on.
    More,
    /// The stream broke in-band (an error event, a diverged regeneration).
    Break(String),
    /// The protocol's end went out with this chunk; `spoke_after`: the upstream sent bytes
    /// after it (never relayed).
    End {
        /// Bytes followed the end in the same chunk.
        spoke_after: bool,
    },
}

/// What one chunk gave.
pub(super) struct Read {
    /// What goes to the client now.
    pub(super) out: Bytes,
    /// What follows.
    pub(super) next: Next,
}

impl Events {
    /// Whether events are held back to be judged.
    fn holds(&self) -> bool {
        self.hide_usage || self.resumer.is_some()
    }

    /// Reads one upstream chunk: its events to the observers, what goes to the client out.
    pub(super) fn read(
        &mut self,
        b: &Bytes,
        capture: &mut Option<Capture>,
        ledger: &mut Option<Ledger>,
    ) -> Read {
        let holds = self.holds();
        let base = self.reader.position();
        if let Some(c) = capture.as_ref() {
            self.reader.set_max_line(c.line_room());
        }
        let mut out = Out::default();
        let mut broke = None;
        let mut stop = None;
        let mut cursor = base;
        let Events {
            reader,
            ends,
            resumer,
            held,
            passing,
            ..
        } = self;
        reader.feed(b, &mut |e| {
            let p = e.payload();
            if let Some(reason) = in_band_break(resumer, ends, capture, &e, &p) {
                held.clear();
                broke = Some(reason);
                return Flow::Stop;
            }
            let terminal = ends.as_mut().is_some_and(|w| w.on_event(&e, &p));
            // The event's bytes: what was held of it, and its part of this chunk.
            let from = (e.start.max(base) - base) as usize;
            let to = (e.end - base) as usize;
            cursor = e.end;
            if !holds || std::mem::take(passing) {
                // Relayed as it comes (or already on its way: it outgrew the hold).
                if let Some(c) = capture.as_mut() {
                    c.on_event(&e, &p);
                }
                held.clear();
                out.keep(b, from, to);
            } else {
                let raw = if held.is_empty() {
                    b.slice(from..to)
                } else {
                    let mut whole = std::mem::take(held);
                    whole.extend_from_slice(&b[from..to]);
                    whole.freeze()
                };
                match step(resumer, ledger, capture, raw, &e, &p) {
                    Some(Ok(bytes)) => out.bytes(bytes, b),
                    Some(Err(reason)) => {
                        broke = Some(reason);
                        return Flow::Stop;
                    }
                    None => {}
                }
            }
            if terminal {
                stop = Some(e.end);
                return Flow::Stop;
            }
            Flow::Continue
        });
        let next = if let Some(reason) = broke {
            held.clear();
            Next::Break(reason)
        } else if let Some(at) = stop {
            // Nothing after the protocol's end is relayed or recorded.
            held.clear();
            Next::End {
                spoke_after: at < base + b.len() as u64,
            }
        } else {
            let rest = (cursor.max(base) - base) as usize;
            if rest < b.len() {
                if !holds || *passing {
                    out.keep(b, rest, b.len());
                } else {
                    held.extend_from_slice(&b[rest..]);
                    if held.len() > HOLD_MAX {
                        // No event ends within a sane size: relay it as it is; a stream that
                        // can no longer be judged is not resumed.
                        *passing = true;
                        if let Some(r) = resumer.as_mut() {
                            r.give_up();
                        }
                        out.bytes(std::mem::take(held).freeze(), b);
                    }
                }
            }
            Next::More
        };
        Read {
            out: out.finish(b),
            next,
        }
    }

    /// The upstream's body ended: the last event is read, and the protocol's end checked. What
    /// still goes to the client, or why the stream is broken.
    pub(super) fn finish(
        &mut self,
        capture: &mut Option<Capture>,
        ledger: &mut Option<Ledger>,
    ) -> Result<Bytes, String> {
        let holds = self.holds();
        let mut out = BytesMut::new();
        let mut broke = None;
        let Events {
            reader,
            ends,
            resumer,
            held,
            passing,
            ..
        } = self;
        reader.finish(&mut |e| {
            let p = e.payload();
            if let Some(reason) = in_band_break(resumer, ends, capture, &e, &p) {
                held.clear();
                broke = Some(reason);
                return Flow::Stop;
            }
            if let Some(w) = ends.as_mut() {
                w.on_event(&e, &p);
            }
            let raw = std::mem::take(held).freeze();
            if !holds || *passing {
                if let Some(c) = capture.as_mut() {
                    c.on_event(&e, &p);
                }
                out.extend_from_slice(&raw);
            } else {
                match step(resumer, ledger, capture, raw, &e, &p) {
                    Some(Ok(bytes)) => out.extend_from_slice(&bytes),
                    Some(Err(reason)) => broke = Some(reason),
                    None => {}
                }
            }
            Flow::Continue
        });
        if let Some(reason) = broke {
            return Err(reason);
        }
        if let Some(reason) = self.ends.as_ref().and_then(EndWatch::broken_at_end) {
            return Err(reason.to_string());
        }
        // What a continuation still held back goes out: it did not start over.
        if let Some(rest) = self.resumer.as_mut().and_then(|r| r.release_held()) {
            if let Some(c) = capture.as_mut() {
                c.feed(&rest);
            }
            out.extend_from_slice(&rest);
        }
        Ok(out.freeze())
    }
}

/// An in-band error event in a stream whose protocol it breaks (a chat or completions stream),
/// read by no continuation's judge: the reason the stream breaks here. Every reader takes it so
/// (issue 31: the capture recorded it while the end watch took a later `[DONE]` as whole): the
/// capture notes it, the event is not relayed, and the client gets the gateway's error event
/// naming it, as when a continuation's judge finds it (see the rescue guide, "Truthful ends":
/// "One reader (0.4)").
fn in_band_break(
    resumer: &Option<Box<Resumer>>,
    ends: &Option<EndWatch>,
    capture: &mut Option<Capture>,
    e: &sse::Event<'_>,
    p: &sse::Payload<'_>,
) -> Option<String> {
    let judged_elsewhere = resumer.is_some();
    let breaks = ends.as_ref().is_some_and(EndWatch::breaks_on_error);
    if judged_elsewhere || !breaks || !e.is_error(p) {
        return None;
    }
    if let Some(c) = capture.as_mut() {
        c.on_event(e, p);
    }
    Some(format!("in-band error: {}", e.error_message(p)))
}

/// One held event judged: by the continuation's judge when the stream may be resumed, else by
/// the usage filter. Some(Ok): send these bytes; None: send nothing; Some(Err): it broke.
fn step(
    resumer: &mut Option<Box<Resumer>>,
    ledger: &mut Option<Ledger>,
    capture: &mut Option<Capture>,
    raw: Bytes,
    e: &sse::Event<'_>,
    p: &sse::Payload<'_>,
) -> Option<Result<Bytes, String>> {
    let Some(r) = resumer.as_mut() else {
        // The usage filter: the usage-only chunk is recorded, not sent.
        if let Some(c) = capture.as_mut() {
            c.on_event(e, p);
        }
        return (!p.usage_only()).then_some(Ok(raw));
    };
    let error = e.is_error(p).then(|| e.error_message(p));
    let judged = r.judge(raw, p, error);
    if r.take_restart() {
        // It answered from the start: read as a regeneration, and not sent a prefill again
        // until the next reload.
        let (view, idx) = (r.view().clone(), r.current);
        if let Some(ledger) = ledger.as_ref() {
            ledger.resume_result(&view, idx, "restarted");
        }
        if let Some(up) = view.config.upstreams.get(idx) {
            log::warn!(
                "upstream {} ignored a prefill and answered from the start; it is asked to regenerate instead until the next reload",
                up.name
            );
            view.learned.prefill_ignored(idx);
        }
    }
    match judged {
        Judged::Emit(bytes) => {
            // What a continuation sends may be rewritten: the record reads what was sent.
            if let Some(c) = capture.as_mut() {
                c.feed(&bytes);
            }
            Some(Ok(bytes))
        }
        Judged::Drop { feed } => {
            if let (true, Some(c)) = (feed, capture.as_mut()) {
                c.on_event(e, p);
            }
            None
        }
        Judged::Break(reason) => Some(Err(reason)),
        Judged::Diverged => {
            let (view, idx) = (r.view().clone(), r.current);
            if let Some(ledger) = ledger.as_mut() {
                ledger.resume_result(&view, idx, "diverged");
                ledger.unfinished(
                    &view,
                    idx,
                    "the regenerated answer does not begin with the text already sent".into(),
                );
            }
            Some(Err("regeneration diverged".into()))
        }
    }
}

/// What to send of one chunk: slices of it and other bytes, in order.
#[derive(Default)]
struct Out {
    pieces: Vec<Bytes>,
    /// The chunk range being extended: consecutive kept events are sent as one slice.
    run: Option<(usize, usize)>,
}

impl Out {
    fn keep(&mut self, chunk: &Bytes, start: usize, end: usize) {
        match &mut self.run {
            Some((_, e)) if *e == start => *e = end,
            _ => {
                self.flush(chunk);
                self.run = Some((start, end));
            }
        }
    }

    fn flush(&mut self, chunk: &Bytes) {
        if let Some((s, e)) = self.run.take() {
            if e > s {
                self.pieces.push(chunk.slice(s..e));
            }
        }
    }

    fn bytes(&mut self, b: Bytes, chunk: &Bytes) {
        self.flush(chunk);
        if !b.is_empty() {
            self.pieces.push(b);
        }
    }

    fn finish(mut self, chunk: &Bytes) -> Bytes {
        if self.pieces.is_empty() {
            // The common case, one run of the chunk: the chunk itself, or a slice of it.
            return match self.run.take() {
                Some((0, e)) if e == chunk.len() => chunk.clone(),
                Some((s, e)) if e > s => chunk.slice(s..e),
                _ => Bytes::new(),
            };
        }
        self.flush(chunk);
        match self.pieces.len() {
            0 => Bytes::new(),
            1 => self.pieces.pop().unwrap_or_default(),
            _ => {
                let mut b = BytesMut::with_capacity(self.pieces.iter().map(Bytes::len).sum());
                for p in &self.pieces {
                    b.extend_from_slice(p);
                }
                b.freeze()
            }
        }
    }
}
