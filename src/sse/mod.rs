//! Server-sent events, read once: [`Reader`] frames an upstream's bytes into events as they are
//! relayed, and [`Payload`] reads each event's data once for every observer (the reply capture,
//! the usage filter, the protocol end, a continuation's judge, the first event before commit).
//!
//! Before 0.4 five readers framed the same bytes, and disagreed: one skipped `event:` lines, so
//! `event: error` followed by `data: {"message":…}` broke the stream for one and was recorded
//! whole by another. Now `event:` names, CR/LF and comment lines mean the same to all of them.
//!
//! Framing follows the SSE format: lines end in `\n`, `\r\n` or `\r`; an event ends at a blank
//! line; `:` starts a comment. Upstreams that end each event with a single newline are common
//! too, so a `data:` or `event:` line that follows a `data:` line whose payload is already whole
//! (a JSON object or array, or `[DONE]`) ends the event before it. Every byte belongs to exactly
//! one event (blank lines to the event they end), and each event is reported with its byte range
//! in the stream, so a relay that holds events back can send or drop each one whole.
//!
//! Memory is bounded: a line longer than the reader's limit keeps only its first and last
//! [`EDGE`] bytes, which is where a chunk's type, `choices` and `usage` are.

mod payload;
pub mod scan;
mod visit;

pub use self::payload::{ChoiceView, Choices, ErrorView, Payload, ResponseView};
pub use self::scan::Usage;

/// What is kept of each end of a line too long to keep whole.
pub const EDGE: usize = 4096;

/// Whether the observer wants more events of the chunk being fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on.
    Continue,
    /// Stop reading this chunk (its protocol's end was reached).
    Stop,
}

/// One event, as the [`Reader`] reports it.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    /// The `event:` name, if any.
    pub name: Option<&'a [u8]>,
    /// The `data:` payload (several `data:` lines joined by `\n`), if the event has one; for a
    /// payload too long to keep, its first bytes (see `tail`).
    pub data: Option<&'a [u8]>,
    /// The last bytes of a payload too long to keep whole (`data` then holds its start).
    pub tail: Option<&'a [u8]>,
    /// The event held a comment line (`: …`): a sign of life, not content.
    pub comment: bool,
    /// Stream offset of the event's first byte.
    pub start: u64,
    /// Stream offset after its last byte (its blank line included).
    pub end: u64,
}

impl Event<'_> {
    /// Whether the event carries anything (a name or data), not only comments and blank lines.
    pub fn substantive(&self) -> bool {
        self.name.is_some() || self.data.is_some()
    }

    /// The event's payload read once (see [`Payload`]).
    pub fn payload(&self) -> Payload<'_> {
        match (self.data, self.tail) {
            (Some(d), None) => Payload::read(d),
            (Some(head), Some(tail)) => Payload::read_cut(head, tail),
            (None, _) => Payload::default(),
        }
    }

    /// Whether this is an in-band error (see the rescue guide): `event: error`, a Responses
    /// `response.failed`/`error` event, or a payload with a top-level non-null `error`.
    pub fn is_error(&self, payload: &Payload<'_>) -> bool {
        matches!(self.name, Some(b"error") | Some(b"response.failed")) || payload.is_error()
    }

    /// A short description of an error event for the record and the log (escaped there): the
    /// upstream's message when it gives one.
    pub fn error_message(&self, payload: &Payload<'_>) -> String {
        match payload.error_message() {
            Some(m) => m,
            None => match self.name {
                Some(n) => format!("event: {}", String::from_utf8_lossy(n)),
                None => String::from_utf8_lossy(self.data.unwrap_or_default()).into_owned(),
            },
        }
    }
}

/// Where the pending event's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Data {
    /// No `data:` line yet.
    None,
    /// One `data:` line inside the chunk being fed (not copied).
    InChunk(usize, usize),
    /// In [`Reader::data`].
    Owned,
}

/// Frames an upstream's bytes into events; see the module docs.
#[derive(Debug)]
pub struct Reader {
    /// Longest line kept whole.
    max_line: usize,
    /// Stream offset of the next byte fed.
    pos: u64,
    /// The unfinished line (its first bytes, once it outgrew `max_line`).
    line: Vec<u8>,
    /// The unfinished line outgrew `max_line`: its last bytes.
    line_tail: Option<Vec<u8>>,
    /// Stream offset where the unfinished line began.
    line_at: u64,
    /// The last line ended with `\r` at the end of a chunk: a `\n` first in the next chunk
    /// belongs to it.
    cr: bool,
    /// That line was blank: its event ends after the `\n` that may follow.
    blank_cr: bool,
    /// The pending event: its start, and what it has.
    start: u64,
    name: Vec<u8>,
    has_name: bool,
    data: Vec<u8>,
    at: Data,
    tail: Option<Vec<u8>>,
    comment: bool,
    /// Any line at all (so a lone blank line is reported too: every byte belongs to an event).
    lines: bool,
    /// The pending data is one whole payload already (a JSON object or array, or `[DONE]`).
    whole: bool,
}

impl Reader {
    /// A reader keeping lines up to `max_line` bytes whole.
    pub fn new(max_line: usize) -> Reader {
        Reader {
            max_line: max_line.max(2 * EDGE),
            pos: 0,
            line: Vec::new(),
            line_tail: None,
            line_at: 0,
            cr: false,
            blank_cr: false,
            start: 0,
            name: Vec::new(),
            has_name: false,
            data: Vec::new(),
            at: Data::None,
            tail: None,
            comment: false,
            lines: false,
            whole: false,
        }
    }

    /// Bounds the lines read from now on (a capture shares its bound between the text it kept
    /// and the line being read).
    pub fn set_max_line(&mut self, max_line: usize) {
        self.max_line = max_line.max(2 * EDGE);
    }

    /// Bytes held for lines and events not yet ended.
    pub fn buffered(&self) -> usize {
        self.line.len()
            + self.line_tail.as_ref().map_or(0, Vec::len)
            + self.data.len()
            + self.tail.as_ref().map_or(0, Vec::len)
    }

    /// Stream offset of the next byte.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Another upstream's stream follows (a continuation): framed afresh from `pos` on.
    pub fn restart(&mut self) {
        let pos = self.pos;
        *self = Reader::new(self.max_line);
        self.pos = pos;
        self.start = pos;
    }

    /// Whether the pending (not yet ended) event has a whole payload already: an upstream that
    /// ends events with single newlines is judged by it without waiting for the next line.
    pub fn pending(&self) -> Option<Event<'_>> {
        if !self.whole || self.at != Data::Owned {
            return None;
        }
        Some(Event {
            name: self.has_name.then_some(&self.name[..]),
            data: Some(&self.data),
            tail: None,
            comment: self.comment,
            start: self.start,
            end: self.pos,
        })
    }

    /// Reads one chunk, reporting each event that ends in it to `f` (until `f` says stop).
    pub fn feed(&mut self, chunk: &[u8], f: &mut dyn FnMut(Event<'_>) -> Flow) -> Flow {
        let base = self.pos;
        let mut i = 0;
        if self.cr {
            self.cr = false;
            if chunk.first() == Some(&b'\n') {
                i = 1;
            }
            if std::mem::take(&mut self.blank_cr)
                && self.dispatch(chunk, base + i as u64, f) == Flow::Stop
            {
                self.pos = base + i as u64;
                return Flow::Stop;
            }
        }
        while i < chunk.len() {
            let Some(k) = memchr::memchr2(b'\n', b'\r', &chunk[i..]) else {
                if self.line.is_empty() && self.line_tail.is_none() {
                    self.line_at = base + i as u64;
                }
                self.push_partial(&chunk[i..]);
                break;
            };
            let end = i + k;
            let mut next = end + 1;
            if chunk[end] == b'\r' {
                if next == chunk.len() {
                    self.cr = true;
                } else if chunk[next] == b'\n' {
                    next += 1;
                }
            }
            let flow = if self.line.is_empty() && self.line_tail.is_none() {
                self.on_line(chunk, i..end, base + i as u64, base + next as u64, f)
            } else {
                self.push_partial(&chunk[i..end]);
                self.on_owned_line(chunk, base + next as u64, f)
            };
            i = next;
            if flow == Flow::Stop {
                self.pos = base + i as u64;
                self.own_data(chunk);
                return Flow::Stop;
            }
        }
        self.pos = base + chunk.len() as u64;
        self.own_data(chunk);
        Flow::Continue
    }

    /// The stream ended: an unterminated last line and event are reported.
    pub fn finish(&mut self, f: &mut dyn FnMut(Event<'_>) -> Flow) {
        self.cr = false;
        self.blank_cr = false;
        if !self.line.is_empty() || self.line_tail.is_some() {
            let pos = self.pos;
            let _ = self.on_owned_line(&[], pos, f);
        }
        if self.lines {
            let pos = self.pos;
            let _ = self.dispatch(&[], pos, f);
        }
    }

    /// Keeps part of a line not yet ended, bounded.
    fn push_partial(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if let Some(tail) = self.line_tail.as_mut() {
            keep_last(tail, bytes);
        } else if self.line.len() + bytes.len() <= self.max_line {
            self.line.extend_from_slice(bytes);
        } else {
            let mut tail = Vec::with_capacity(2 * EDGE);
            keep_last(&mut tail, &self.line[EDGE.min(self.line.len())..]);
            self.line.truncate(EDGE);
            let fill = EDGE.saturating_sub(self.line.len()).min(bytes.len());
            self.line.extend_from_slice(&bytes[..fill]);
            keep_last(&mut tail, &bytes[fill..]);
            self.line_tail = Some(tail);
        }
    }

    /// A line that began in an earlier chunk (kept in `line`), ended at stream offset `next`.
    fn on_owned_line(
        &mut self,
        chunk: &[u8],
        next: u64,
        f: &mut dyn FnMut(Event<'_>) -> Flow,
    ) -> Flow {
        let line = std::mem::take(&mut self.line);
        let tail = self.line_tail.take();
        let line_start = self.line_at;
        let flow = self.on_content(
            chunk,
            Content::Owned(&line, tail.as_deref()),
            line_start,
            next,
            f,
        );
        self.line = line;
        self.line.clear();
        flow
    }

    /// A whole line inside the chunk (`range` of it, its terminator excluded).
    fn on_line(
        &mut self,
        chunk: &[u8],
        range: std::ops::Range<usize>,
        line_start: u64,
        next: u64,
        f: &mut dyn FnMut(Event<'_>) -> Flow,
    ) -> Flow {
        if range.len() > self.max_line {
            let bytes = &chunk[range];
            let head = &bytes[..EDGE];
            let tail = &bytes[bytes.len() - EDGE..];
            return self.on_content(chunk, Content::Owned(head, Some(tail)), line_start, next, f);
        }
        self.on_content(chunk, Content::InChunk(range), line_start, next, f)
    }

    /// One line's content: a blank line ends the event; a field is added to it.
    fn on_content(
        &mut self,
        chunk: &[u8],
        content: Content<'_>,
        line_start: u64,
        next: u64,
        f: &mut dyn FnMut(Event<'_>) -> Flow,
    ) -> Flow {
        let text: &[u8] = match &content {
            Content::InChunk(r) => &chunk[r.clone()],
            Content::Owned(head, _) => head,
        };
        if text.is_empty() && !matches!(content, Content::Owned(_, Some(_))) {
            self.lines = true;
            if self.cr && next == self.pos + chunk.len() as u64 && !chunk.is_empty() {
                // A blank line ended by `\r` at the chunk's end: its `\n` may come next.
                self.blank_cr = true;
                return Flow::Continue;
            }
            return self.dispatch(chunk, next, f);
        }
        let (field, value_at) = field_of(text);
        let starts_event = matches!(field, b"data" | b"event");
        if starts_event && self.whole {
            // The previous `data:` line was a whole payload: that event ended before this line.
            if self.dispatch(chunk, line_start, f) == Flow::Stop {
                return Flow::Stop;
            }
            self.start = line_start;
        }
        self.lines = true;
        match field {
            b"data" => {
                let value = &text[value_at..];
                let cut_tail = match &content {
                    Content::Owned(_, t) => *t,
                    Content::InChunk(_) => None,
                };
                self.add_data(chunk, &content, value_at, value, cut_tail);
            }
            b"event" => {
                self.name.clear();
                self.name.extend_from_slice(&text[value_at..]);
                self.has_name = true;
            }
            b"" => self.comment = true,
            _ => {}
        }
        Flow::Continue
    }

    /// Adds a `data:` line's value to the pending event.
    fn add_data(
        &mut self,
        chunk: &[u8],
        content: &Content<'_>,
        value_at: usize,
        value: &[u8],
        cut_tail: Option<&[u8]>,
    ) {
        match (self.at, content, cut_tail) {
            (Data::None, Content::InChunk(r), None) => {
                self.at = Data::InChunk(r.start + value_at, r.end);
            }
            (at, _, _) => {
                if let Data::InChunk(s, e) = at {
                    self.data.clear();
                    self.data.extend_from_slice(&chunk[s..e]);
                } else if at == Data::None {
                    self.data.clear();
                }
                if at != Data::None {
                    self.data.push(b'\n');
                }
                let room = self.max_line.saturating_sub(self.data.len());
                self.data.extend_from_slice(&value[..value.len().min(room)]);
                self.at = Data::Owned;
                if let Some(t) = cut_tail {
                    self.tail = Some(t.to_vec());
                }
            }
        }
        self.whole = match (self.at, &self.tail) {
            (_, Some(t)) => whole_payload(&self.data, t),
            (Data::InChunk(s, e), None) => whole_payload(&chunk[s..e], &chunk[s..e]),
            _ => whole_payload(&self.data, &self.data),
        };
    }

    /// Reports the pending event, ending at stream offset `end`, and starts the next one there.
    fn dispatch(&mut self, chunk: &[u8], end: u64, f: &mut dyn FnMut(Event<'_>) -> Flow) -> Flow {
        let data = match self.at {
            Data::None => None,
            Data::InChunk(s, e) => Some(&chunk[s..e]),
            Data::Owned => Some(&self.data[..]),
        };
        let ev = Event {
            name: self.has_name.then_some(&self.name[..]),
            data,
            tail: self.tail.as_deref(),
            comment: self.comment,
            start: self.start,
            end,
        };
        let flow = f(ev);
        self.start = end;
        self.has_name = false;
        self.at = Data::None;
        self.tail = None;
        self.comment = false;
        self.lines = false;
        self.whole = false;
        flow
    }

    /// The chunk is about to go: pending data borrowed from it is copied.
    fn own_data(&mut self, chunk: &[u8]) {
        if let Data::InChunk(s, e) = self.at {
            self.data.clear();
            self.data.extend_from_slice(&chunk[s..e]);
            self.at = Data::Owned;
        }
    }
}

/// A line's bytes: inside the chunk, or kept (with the tail of one too long to keep).
enum Content<'a> {
    InChunk(std::ops::Range<usize>),
    Owned(&'a [u8], Option<&'a [u8]>),
}

/// A line's field name and where its value starts (after `:` and one optional space); a comment
/// line (`: …`) has the empty name.
fn field_of(line: &[u8]) -> (&[u8], usize) {
    match memchr::memchr(b':', line) {
        Some(p) => {
            let v = p + 1;
            let v = if line.get(v) == Some(&b' ') { v + 1 } else { v };
            (&line[..p], v)
        }
        None => (line, line.len()),
    }
}

/// Whether a payload (its `head` and `tail`, the same slice when kept whole) is already one
/// whole value: a JSON object or array, or `[DONE]`.
fn whole_payload(head: &[u8], tail: &[u8]) -> bool {
    let (h, t) = (head.trim_ascii_start(), tail.trim_ascii_end());
    h == b"[DONE]"
        || t == b"[DONE]"
        || (h.first() == Some(&b'{') && t.last() == Some(&b'}'))
        || (h.first() == Some(&b'[') && t.last() == Some(&b']'))
}

/// Keeps the last [`EDGE`] bytes of what passes through `buf` (up to twice that held).
fn keep_last(buf: &mut Vec<u8>, bytes: &[u8]) {
    if bytes.len() >= EDGE {
        buf.clear();
        buf.extend_from_slice(&bytes[bytes.len() - EDGE..]);
        return;
    }
    if buf.len() + bytes.len() > 2 * EDGE {
        let drop = buf.len() + bytes.len() - EDGE;
        buf.drain(..drop.min(buf.len()));
    }
    buf.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests;
