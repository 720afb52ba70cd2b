//! Server-sent events as the rescue rules need them (SPEC 4a): where an event ends, whether it
//! is an error, and what a chat chunk says (its text, role, tool calls, logprobs, finish).
//!
//! Bytes are relayed verbatim; this module only reads them. Lines may end in `\n`, `\r\n` or
//! `\r`, and an event ends at a blank line.

use std::borrow::Cow;

use actix_web::web::{Bytes, BytesMut};
use serde::Deserialize;

/// The end (exclusive, after the blank line) of the first complete event in `buf`, if any.
pub fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    let mut line_start = 0;
    while i < buf.len() {
        let b = buf[i];
        if b == b'\n' || b == b'\r' {
            let mut next = i + 1;
            if b == b'\r' {
                if next == buf.len() {
                    // A `\r` at the very end may be the first half of `\r\n`: wait for more.
                    return None;
                }
                if buf[next] == b'\n' {
                    next += 1;
                }
            }
            if i == line_start {
                return Some(next);
            }
            line_start = next;
            i = next;
        } else {
            i += 1;
        }
    }
    None
}

/// The lines of one event, without their terminators.
fn lines(ev: &[u8]) -> impl Iterator<Item = &[u8]> {
    ev.split(|b| *b == b'\n')
        .flat_map(|l| l.split(|b| *b == b'\r'))
        .filter(|l| !l.is_empty())
}

/// `field: value` of one line (a comment or a bare field gives an empty value).
fn field(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|b| *b == b':') {
        Some(p) => {
            let v = &line[p + 1..];
            (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
        }
        None => (line, &[]),
    }
}

/// The event's `event:` name and its `data:` joined by newlines (borrowed from the event when it
/// has a single `data:` line, as nearly every event has).
pub fn parse(ev: &[u8]) -> (Option<&[u8]>, Cow<'_, [u8]>) {
    let mut name = None;
    let mut data: Option<Cow<'_, [u8]>> = None;
    for line in lines(ev) {
        let (f, v) = field(line);
        match f {
            b"event" => name = Some(v),
            b"data" => match &mut data {
                None => data = Some(Cow::Borrowed(v)),
                Some(d) => {
                    let d = d.to_mut();
                    d.push(b'\n');
                    d.extend_from_slice(v);
                }
            },
            _ => {}
        }
    }
    (name, data.unwrap_or(Cow::Borrowed(&[])))
}

/// Whether the event carries anything (an `event:` or `data:` field), not only comments.
pub fn is_substantive(ev: &[u8]) -> bool {
    lines(ev).any(|l| matches!(field(l).0, b"event" | b"data"))
}

/// The first complete event with content in `buf` (comments and keep-alives skipped).
pub fn first_event(buf: &[u8]) -> Option<&[u8]> {
    let mut rest = buf;
    while let Some(end) = event_end(rest) {
        let ev = &rest[..end];
        if is_substantive(ev) {
            return Some(ev);
        }
        rest = &rest[end..];
    }
    None
}

/// The first complete `data:` line whose payload is whole (a JSON value or `[DONE]`), for
/// upstreams that end events with a single newline: enough to judge the first event by.
pub fn first_data_line(buf: &[u8]) -> Option<&[u8]> {
    let mut rest = buf;
    while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
        let line = &rest[..nl + 1];
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if let Some(data) = text.strip_prefix(b"data:") {
            let data = data.trim_ascii();
            if data == b"[DONE]" || serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok() {
                return Some(line);
            }
        }
        rest = &rest[nl + 1..];
    }
    None
}

#[derive(Deserialize)]
struct ErrorProbe<'a> {
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default, rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
}

/// An in-band error (SPEC 4a): `event: error`, a Responses API `response.failed`/`error` event,
/// or a `data:` JSON object with a top-level `error`.
pub fn is_error_event(ev: &[u8]) -> bool {
    let (name, data) = parse(ev);
    if matches!(name, Some(b"error") | Some(b"response.failed")) {
        return true;
    }
    match serde_json::from_slice::<ErrorProbe>(&data) {
        Ok(p) => {
            p.error.is_some_and(|e| !e.is_null())
                || matches!(p.kind.as_deref(), Some("error" | "response.failed"))
        }
        Err(_) => false,
    }
}

/// A short description of an error event for the record (escaped later where logged).
pub fn error_message(ev: &[u8]) -> String {
    let (name, data) = parse(ev);
    let v: Option<serde_json::Value> = serde_json::from_slice(&data).ok();
    let msg = v.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.pointer("/response/error/message"))
            .or_else(|| v.pointer("/message"))
            .and_then(|m| m.as_str())
            .map(str::to_string)
    });
    let text = msg.unwrap_or_else(|| match name {
        Some(n) => format!("event: {}", String::from_utf8_lossy(n)),
        None => String::from_utf8_lossy(&data).into_owned(),
    });
    crate::escape::untrusted(&text).into_owned()
}

/// Collects upstream chunks and hands out whole events, so that the relay can judge each
/// before it goes to the client (resume, SPEC 4a).
#[derive(Debug, Default)]
pub struct EventSplitter {
    buf: BytesMut,
}

impl EventSplitter {
    /// Adds a chunk.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete event, if any.
    pub fn next_event(&mut self) -> Option<Bytes> {
        let end = event_end(&self.buf)?;
        Some(self.buf.split_to(end).freeze())
    }

    /// What is held.
    pub fn peek(&self) -> &[u8] {
        &self.buf
    }

    /// Bytes of an event not yet complete.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Drops what is held (the rest of a broken stream is never relayed).
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// What is held, as it is (the stream ended without a final blank line).
    pub fn take_rest(&mut self) -> Bytes {
        self.buf.split().freeze()
    }
}

/// What one chat-completion chunk says, as far as resuming it matters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChatChunk {
    /// `data: [DONE]`.
    pub done: bool,
    /// `choices[0].delta.content`.
    pub content: Option<String>,
    /// A `role` in the delta.
    pub role: bool,
    /// `tool_calls` or `function_call` in a delta.
    pub tools: bool,
    /// Non-null `logprobs` in a choice.
    pub logprobs: bool,
    /// The last non-null `finish_reason`.
    pub finish_reason: Option<String>,
    /// `choices: []` (a usage-only chunk).
    pub no_choices: bool,
    /// The data was not a chat chunk at all.
    pub unknown: bool,
}

#[derive(Deserialize)]
struct RawChunk {
    #[serde(default)]
    choices: Option<Vec<RawChoice>>,
}

#[derive(Deserialize)]
struct RawChoice {
    #[serde(default)]
    delta: Option<RawDelta>,
    #[serde(default)]
    logprobs: Option<serde_json::Value>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct RawDelta {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<serde_json::Value>,
    #[serde(default)]
    function_call: Option<serde_json::Value>,
}

/// Reads one event of a chat-completions stream.
pub fn chat_chunk(ev: &[u8]) -> ChatChunk {
    let (_, data) = parse(ev);
    let data = data.trim_ascii();
    if data == b"[DONE]" {
        return ChatChunk {
            done: true,
            ..ChatChunk::default()
        };
    }
    let Ok(raw) = serde_json::from_slice::<RawChunk>(data) else {
        return ChatChunk {
            unknown: true,
            ..ChatChunk::default()
        };
    };
    let mut out = ChatChunk::default();
    let choices = raw.choices.unwrap_or_default();
    out.no_choices = choices.is_empty();
    for (i, c) in choices.into_iter().enumerate() {
        if c.logprobs.as_ref().is_some_and(|l| !l.is_null()) {
            out.logprobs = true;
        }
        if let Some(f) = c.finish_reason {
            out.finish_reason = Some(f);
        }
        if let Some(d) = c.delta {
            if d.tool_calls.as_ref().is_some_and(|t| !t.is_null())
                || d.function_call.as_ref().is_some_and(|t| !t.is_null())
            {
                out.tools = true;
            }
            if i == 0 {
                out.role |= d.role.is_some();
                out.content = d.content;
            }
        }
    }
    out
}

/// The event with `choices[0].delta.content` replaced by `content` (everything else kept), for
/// the one chunk of a regeneration that crosses the end of the text already sent.
pub fn with_content(ev: &[u8], content: &str) -> Option<Bytes> {
    let (_, data) = parse(ev);
    let mut v: serde_json::Value = serde_json::from_slice(&data).ok()?;
    let slot = v.pointer_mut("/choices/0/delta/content")?;
    *slot = serde_json::Value::String(content.to_string());
    Some(Bytes::from(format!("data: {v}\n\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_end_at_blank_lines_of_any_style() {
        assert_eq!(event_end(b"data: a\n\ndata: b\n\n"), Some(9));
        assert_eq!(event_end(b"data: a\r\n\r\nx"), Some(11));
        assert_eq!(event_end(b"data: a\r\rx"), Some(9));
        assert_eq!(event_end(b"data: a\r"), None);
        assert_eq!(event_end(b"data: a\n"), None);
        assert_eq!(
            first_event(b": ping\n\ndata: x\n\n"),
            Some(&b"data: x\n\n"[..])
        );
        assert_eq!(first_event(b": ping\n\n"), None);
    }

    #[test]
    fn single_newline_events_are_judged_by_their_first_data_line() {
        let buf = b"data: {\"choices\":[]}\ndata: {\"x\":1}\n";
        assert_eq!(first_event(buf), None);
        assert_eq!(first_data_line(buf), Some(&b"data: {\"choices\":[]}\n"[..]));
        assert_eq!(
            first_data_line(b"data: {\"error\":{\"message\":\"x\"}}\r\n").map(is_error_event),
            Some(true)
        );
        assert_eq!(first_data_line(b"data: {\"choi"), None);
        assert_eq!(first_data_line(b": ping\ndata: {\"a\""), None);
    }

    #[test]
    fn error_events() {
        assert!(is_error_event(
            b"data: {\"error\":{\"message\":\"overloaded\"}}\n\n"
        ));
        assert!(is_error_event(b"event: error\ndata: {}\n\n"));
        assert!(is_error_event(
            b"event: response.failed\ndata: {\"type\":\"response.failed\"}\n\n"
        ));
        assert!(is_error_event(
            b"data: {\"type\":\"error\",\"message\":\"x\"}\n\n"
        ));
        assert!(!is_error_event(
            b"data: {\"error\":null,\"choices\":[]}\n\n"
        ));
        assert!(!is_error_event(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"error\"}}]}\n\n"
        ));
        assert!(!is_error_event(b"data: [DONE]\n\n"));
        assert_eq!(
            error_message(b"data: {\"error\":{\"message\":\"over\\nloaded\"}}\n\n"),
            "over\\nloaded"
        );
    }

    #[test]
    fn chat_chunks() {
        let c = chat_chunk(
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        );
        assert!(c.role);
        assert_eq!(c.content.as_deref(), Some(""));
        let c = chat_chunk(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}]}\n\n");
        assert_eq!(c.content.as_deref(), Some("Hi"));
        assert_eq!(c.finish_reason.as_deref(), Some("stop"));
        let c = chat_chunk(b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{}]}}]}\n\n");
        assert!(c.tools);
        let c = chat_chunk(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"},\"logprobs\":{\"content\":[]}}]}\n\n");
        assert!(c.logprobs);
        assert!(chat_chunk(b"data: [DONE]\n\n").done);
        assert!(chat_chunk(b"data: {\"choices\":[],\"usage\":{}}\n\n").no_choices);
        let ev = with_content(
            b"data: {\"id\":\"x\",\"choices\":[{\"delta\":{\"content\":\"Hello world\"}}]}\n\n",
            " world",
        )
        .unwrap();
        assert_eq!(chat_chunk(&ev).content.as_deref(), Some(" world"));
    }

    #[test]
    fn splitter_hands_out_whole_events() {
        let mut s = EventSplitter::default();
        s.push(b"data: a\n\nda");
        assert_eq!(s.next_event().as_deref(), Some(&b"data: a\n\n"[..]));
        assert_eq!(s.next_event(), None);
        s.push(b"ta: b\n\n");
        assert_eq!(s.next_event().as_deref(), Some(&b"data: b\n\n"[..]));
        assert_eq!(s.pending(), 0);
    }
}
