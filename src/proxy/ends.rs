//! Whether a committed stream ended where its protocol says it ends (SPEC 4e "Protocol ends").
//!
//! An upstream whose generator crashed often closes the connection (or ends its chunked body)
//! cleanly: the transport says "complete", and only the protocol can tell that the answer is
//! cut. A chat or completions stream ends with `data: [DONE]`, or at least with a non-null
//! `finish_reason` in its last chunk that has choices; a Responses stream ends with
//! `response.completed`, `response.incomplete`, `response.failed` or `error`. [`EndWatch`] reads
//! the upstream's bytes line by line as they are relayed (nothing is held back from the client)
//! and says at the end whether that end was reached.
//!
//! A line is judged whole when it is at most [`LINE_MAX`] bytes; a longer one (a huge chunk) by
//! its first and last bytes, where the event type and the `finish_reason` are.

use crate::capture::key_values;

/// Longest line kept whole to be judged.
const LINE_MAX: usize = 64 << 10;
/// What is kept of the start and of the end of a longer line.
const EDGE: usize = 4096;

/// The stream protocols whose end can be judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `/v1/chat/completions` and `/v1/completions`: `[DONE]` or a final `finish_reason`.
    Chat,
    /// `/v1/responses`: a terminal event.
    Responses,
}

impl Protocol {
    /// The protocol of a request path (without query), if its end can be judged.
    pub fn of_path(path: &str) -> Option<Protocol> {
        match path {
            "/v1/chat/completions" | "/v1/completions" => Some(Protocol::Chat),
            "/v1/responses" => Some(Protocol::Responses),
            _ => None,
        }
    }

    /// Why a stream of this protocol that ended too early is broken (the record's `error`).
    fn broken_reason(self) -> &'static str {
        match self {
            Protocol::Chat => "ended before [DONE]",
            Protocol::Responses => {
                "ended before response.completed (no terminal event of the Responses API)"
            }
        }
    }
}

/// Reads one upstream's stream for its end; see the module docs.
#[derive(Debug)]
pub struct EndWatch {
    protocol: Protocol,
    /// The line being read (its start, when it outgrew [`LINE_MAX`]).
    line: Vec<u8>,
    /// The line outgrew [`LINE_MAX`]: its last bytes, judged with its start.
    tail: Option<Vec<u8>>,
    /// `data: [DONE]` came.
    done: bool,
    /// Whether the last chunk that had choices carried a non-null `finish_reason`.
    finished: bool,
    /// A terminal Responses event came.
    terminal: bool,
}

impl EndWatch {
    /// A watch for a stream of `protocol`.
    pub fn new(protocol: Protocol) -> EndWatch {
        EndWatch {
            protocol,
            line: Vec::new(),
            tail: None,
            done: false,
            finished: false,
            terminal: false,
        }
    }

    /// Another upstream's stream follows (a continuation, SPEC 4a): judged afresh.
    pub fn restart(&mut self) {
        *self = EndWatch::new(self.protocol);
    }

    /// Reads one chunk of the upstream's body.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            if self.line.is_empty() && self.tail.is_none() {
                self.judge_line(&rest[..nl]);
            } else {
                self.push(&rest[..nl]);
                let line = std::mem::take(&mut self.line);
                match self.tail.take() {
                    None => self.judge_line(&line),
                    Some(tail) => self.judge_long(&line, &tail),
                }
                self.line = line;
                self.line.clear();
            }
            rest = &rest[nl + 1..];
        }
        self.push(rest);
    }

    /// Keeps part of a line not yet ended, bounded.
    fn push(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if let Some(tail) = self.tail.as_mut() {
            keep_last(tail, bytes);
        } else if self.line.len() + bytes.len() <= LINE_MAX {
            self.line.extend_from_slice(bytes);
        } else {
            // Too long to keep: its first EDGE bytes stay in `line`, its last ones in `tail`.
            let mut tail = Vec::with_capacity(2 * EDGE);
            let mut rest = bytes;
            if self.line.len() > EDGE {
                keep_last(&mut tail, &self.line[EDGE..]);
                self.line.truncate(EDGE);
            } else {
                let fill = (EDGE - self.line.len()).min(rest.len());
                self.line.extend_from_slice(&rest[..fill]);
                rest = &rest[fill..];
            }
            keep_last(&mut tail, rest);
            self.tail = Some(tail);
        }
    }

    /// The stream ended cleanly: None when its protocol's end was reached, else why it is broken.
    pub fn broken_at_end(&mut self) -> Option<&'static str> {
        let line = std::mem::take(&mut self.line);
        match self.tail.take() {
            None if !line.is_empty() => self.judge_line(&line),
            None => {}
            Some(tail) => self.judge_long(&line, &tail),
        }
        let ended = match self.protocol {
            Protocol::Chat => self.done || self.finished,
            Protocol::Responses => self.terminal,
        };
        (!ended).then(|| self.protocol.broken_reason())
    }

    /// One whole line (without its `\n`).
    fn judge_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(name) = line.strip_prefix(b"event:") {
            if is_terminal_name(name.trim_ascii()) {
                self.terminal = true;
            }
            return;
        }
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.trim_ascii();
        match self.protocol {
            Protocol::Chat => self.chat_data(data, None),
            Protocol::Responses => self.responses_data(data),
        }
    }

    /// A line too long to keep: judged by its start `head` and its end `tail`.
    fn judge_long(&mut self, head: &[u8], tail: &[u8]) {
        let Some(data) = head.strip_prefix(b"data:") else {
            return;
        };
        match self.protocol {
            Protocol::Chat => self.chat_data(data, Some(tail)),
            Protocol::Responses => self.responses_data(data),
        }
    }

    /// A chat chunk: `start` has its `choices` key, `end` (the last bytes of a line too long to
    /// keep; None: `start` is the whole payload) its `finish_reason`.
    fn chat_data(&mut self, start: &[u8], end: Option<&[u8]>) {
        if start == b"[DONE]" {
            self.done = true;
            return;
        }
        let has_choices = key_values(start, b"\"choices\"").next().is_some_and(|v| {
            v.strip_prefix(b"[")
                .is_some_and(|r| !r.trim_ascii_start().starts_with(b"]"))
        });
        // A usage chunk (`choices` that say nothing, SPEC 4e) is not the answer's last chunk.
        if !has_choices || (end.is_none() && is_usage_chunk(start)) {
            return;
        }
        let end = end.unwrap_or(start);
        self.finished = key_values(end, b"\"finish_reason\"").any(|v| !v.starts_with(b"null"));
    }

    /// A Responses event's payload (its start, at least): its `type`, or a top-level `error`.
    fn responses_data(&mut self, data: &[u8]) {
        let terminal = key_values(data, b"\"type\"").any(|v| {
            v.strip_prefix(b"\"")
                .and_then(|v| v.split(|b| *b == b'"').next())
                .is_some_and(is_terminal_name)
        });
        if terminal || (data.starts_with(b"{\"error\"") && !data.starts_with(b"{\"error\":null")) {
            self.terminal = true;
        }
    }
}

/// A usage chunk's payload (checked cheaply first: an ordinary chunk has no `usage` object).
fn is_usage_chunk(data: &[u8]) -> bool {
    crate::capture::has_usage_object(data) && crate::usage::usage_only_json(data)
}

/// The Responses API events that end a stream.
fn is_terminal_name(name: &[u8]) -> bool {
    matches!(
        name,
        b"response.completed" | b"response.incomplete" | b"response.failed" | b"error"
    )
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
mod tests {
    use super::*;

    fn judge(protocol: Protocol, body: &str) -> Option<&'static str> {
        // Every split of the body gives the same answer.
        let whole = {
            let mut w = EndWatch::new(protocol);
            w.feed(body.as_bytes());
            w.broken_at_end()
        };
        for i in 0..body.len() {
            let mut w = EndWatch::new(protocol);
            w.feed(&body.as_bytes()[..i]);
            w.feed(&body.as_bytes()[i..]);
            assert_eq!(w.broken_at_end(), whole, "split at {i}: {body}");
        }
        whole
    }

    const TEXT: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n";
    const STOP: &str =
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\n\n";
    const LITELLM: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":null}],\"usage\":{\"total_tokens\":3}}\n\n";

    #[test]
    fn chat_streams_end_with_done_or_a_finish_reason() {
        let chat = Protocol::Chat;
        assert_eq!(judge(chat, TEXT), Some("ended before [DONE]"));
        assert_eq!(judge(chat, ""), Some("ended before [DONE]"));
        assert_eq!(judge(chat, &format!("{TEXT}data: [DONE]\n\n")), None);
        assert_eq!(judge(chat, &format!("{TEXT}data: [DONE]")), None);
        assert_eq!(judge(chat, &format!("{TEXT}{STOP}")), None);
        assert_eq!(judge(chat, &format!("{TEXT}{STOP}{USAGE}")), None);
        assert_eq!(judge(chat, &format!("{TEXT}{STOP}{LITELLM}")), None);
        assert_eq!(
            judge(chat, &format!("{STOP}{TEXT}")),
            Some("ended before [DONE]")
        );
        assert_eq!(
            judge(chat, &format!("{TEXT}{USAGE}")),
            Some("ended before [DONE]")
        );
        let crlf = format!("{TEXT}{STOP}").replace('\n', "\r\n");
        assert_eq!(judge(chat, &crlf), None);
    }

    #[test]
    fn long_lines_are_judged_by_their_ends() {
        let big = "x".repeat(200_000);
        let body = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{big}\"}},\"finish_reason\":\"length\"}}]}}\n\n"
        );
        let mut w = EndWatch::new(Protocol::Chat);
        for c in body.as_bytes().chunks(1000) {
            w.feed(c);
            assert!(
                w.line.len() <= LINE_MAX && w.tail.as_ref().is_none_or(|t| t.len() <= 2 * EDGE)
            );
        }
        assert_eq!(w.broken_at_end(), None);
        // A short start, then one huge chunk.
        for first in [1, 6, 5000, 70_000] {
            let mut w = EndWatch::new(Protocol::Chat);
            w.feed(&body.as_bytes()[..first]);
            w.feed(&body.as_bytes()[first..]);
            assert_eq!(w.broken_at_end(), None, "{first}");
        }
        let cut = body.replace("\"length\"", "null");
        let mut w = EndWatch::new(Protocol::Chat);
        w.feed(cut.as_bytes());
        assert!(w.broken_at_end().is_some());
    }

    #[test]
    fn responses_streams_end_with_a_terminal_event() {
        let r = Protocol::Responses;
        let delta = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n";
        assert!(judge(r, delta).is_some());
        for end in [
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"output\":[{\"type\":\"message\"}]}}\n\n",
            "data: {\"type\":\"response.incomplete\",\"response\":{}}\n\n",
            "event: response.failed\ndata: {}\n\n",
            "data: {\"type\":\"error\",\"message\":\"x\"}\n\n",
            "data: {\"error\":{\"message\":\"x\"}}\n\n",
        ] {
            assert_eq!(judge(r, &format!("{delta}{end}")), None, "{end}");
        }
        assert!(judge(r, &format!("{delta}data: [DONE]\n\n")).is_some());
    }

    #[test]
    fn paths() {
        assert_eq!(Protocol::of_path("/v1/completions"), Some(Protocol::Chat));
        assert_eq!(
            Protocol::of_path("/v1/responses"),
            Some(Protocol::Responses)
        );
        assert_eq!(Protocol::of_path("/v1/embeddings"), None);
    }
}
