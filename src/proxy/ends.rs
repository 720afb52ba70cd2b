//! Whether a committed stream ended where its protocol says it ends (see the rescue guide,
//! "Truthful ends").
//!
//! An upstream whose generator crashed often closes the connection (or ends its chunked body)
//! cleanly: the transport says "complete", and only the protocol can tell that the answer is
//! cut. A chat or completions stream ends with `data: [DONE]`, or else only when every choice
//! index it carried has a non-null `finish_reason`; a Responses stream ends with
//! `response.completed`, `response.incomplete`, `response.failed` or `error`. [`EndWatch`] reads
//! the events of the one SSE reader as they are relayed (nothing is held back from the client),
//! says when the end is reached (what an upstream sends after it is neither relayed nor
//! recorded), and says at a clean close whether that end was reached.

use crate::sse::{Event, Payload};

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
    /// `data: [DONE]` came (chat), or a terminal event (Responses).
    ended: bool,
    /// Bit `i`: choice index `i` was carried by a chunk with choices (usage chunks aside).
    carried: u128,
    /// Bit `i`: choice index `i` had a non-null `finish_reason`.
    finished: u128,
    /// An index too large to track came: the last chunk with choices decides instead.
    untracked: bool,
    /// Whether the last chunk with choices had a non-null `finish_reason`.
    last_finished: bool,
}

impl EndWatch {
    /// A watch for a stream of `protocol`.
    pub fn new(protocol: Protocol) -> EndWatch {
        EndWatch {
            protocol,
            ended: false,
            carried: 0,
            finished: 0,
            untracked: false,
            last_finished: false,
        }
    }

    /// Another upstream's stream follows (a continuation): judged afresh.
    pub fn restart(&mut self) {
        *self = EndWatch::new(self.protocol);
    }

    /// Reads one event; true when it is the stream's end (nothing after it counts).
    pub fn on_event(&mut self, ev: &Event<'_>, p: &Payload<'_>) -> bool {
        match self.protocol {
            Protocol::Chat => {
                if p.done {
                    self.ended = true;
                    return true;
                }
                let c = &p.choices;
                // A usage chunk (choices that say nothing) is not the answer's last chunk.
                if c.present && c.count > 0 && !p.usage_only() {
                    self.carried |= c.carried;
                    self.finished |= c.finished;
                    self.untracked |= c.untracked;
                    self.last_finished = c.finished != 0;
                }
                false
            }
            Protocol::Responses => {
                let named = ev.name.is_some_and(is_terminal_name);
                let typed = p
                    .kind
                    .as_deref()
                    .is_some_and(|k| is_terminal_name(k.as_bytes()));
                if named || typed || p.error.is_some() {
                    self.ended = true;
                }
                self.ended
            }
        }
    }

    /// Whether an in-band error event breaks this stream where it comes (see the rescue guide,
    /// "Truthful ends": "One reader (0.4)"). In a chat or completions stream an error event is
    /// no part of the answer: whatever the upstream sends after it (even `[DONE]`), the answer
    /// is cut there. A Responses stream ends with its own `error` or `response.failed` event,
    /// which is its protocol's end and is relayed as such.
    pub fn breaks_on_error(&self) -> bool {
        self.protocol == Protocol::Chat
    }

    /// The stream ended cleanly: None when its protocol's end was reached, else why it is broken.
    pub fn broken_at_end(&self) -> Option<&'static str> {
        let ended = match self.protocol {
            Protocol::Responses => self.ended,
            Protocol::Chat if self.ended => true,
            Protocol::Chat if self.untracked => self.last_finished,
            // Every choice it carried has ended.
            Protocol::Chat => self.carried != 0 && self.carried & !self.finished == 0,
        };
        (!ended).then(|| self.protocol.broken_reason())
    }
}

/// The Responses API events that end a stream.
fn is_terminal_name(name: &[u8]) -> bool {
    matches!(
        name,
        b"response.completed" | b"response.incomplete" | b"response.failed" | b"error"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::{Flow, Reader};

    fn judge(protocol: Protocol, body: &str) -> Option<&'static str> {
        // Every split of the body gives the same answer.
        let run = |parts: &[&[u8]]| {
            let mut w = EndWatch::new(protocol);
            let mut r = Reader::new(64 << 10);
            let mut on = |ev: Event<'_>| {
                w.on_event(&ev, &ev.payload());
                Flow::Continue
            };
            for p in parts {
                r.feed(p, &mut on);
            }
            r.finish(&mut on);
            w.broken_at_end()
        };
        let b = body.as_bytes();
        let whole = run(&[b]);
        for i in 0..b.len() {
            assert_eq!(run(&[&b[..i], &b[i..]]), whole, "split at {i}: {body}");
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
            judge(chat, &format!("{TEXT}{USAGE}")),
            Some("ended before [DONE]")
        );
        let crlf = format!("{TEXT}{STOP}").replace('\n', "\r\n");
        assert_eq!(judge(chat, &crlf), None);
    }

    #[test]
    fn every_choice_must_end() {
        let chat = Protocol::Chat;
        let choice = |i: u32, text: &str, finish: &str| {
            format!("data: {{\"choices\":[{{\"index\":{i},\"delta\":{{\"content\":\"{text}\"}},\"finish_reason\":{finish}}}]}}\n\n")
        };
        // Choice 1 ends, choice 0 does not: broken (0.4: every choice ends).
        let body = format!(
            "{}{}{}",
            choice(0, "a", "null"),
            choice(1, "b", "null"),
            choice(1, "", "\"stop\"")
        );
        assert_eq!(judge(chat, &body), Some("ended before [DONE]"));
        let body = format!("{body}{}", choice(0, "", "\"length\""));
        assert_eq!(judge(chat, &body), None);
    }

    #[test]
    fn the_end_is_reported_when_it_comes() {
        let mut w = EndWatch::new(Protocol::Chat);
        let mut r = Reader::new(0);
        let mut ends = Vec::new();
        r.feed(
            format!("{TEXT}data: [DONE]\n\n{TEXT}").as_bytes(),
            &mut |ev| {
                if w.on_event(&ev, &ev.payload()) {
                    ends.push(ev.end);
                    return Flow::Stop;
                }
                Flow::Continue
            },
        );
        assert_eq!(ends, [(TEXT.len() + 14) as u64]);
    }

    #[test]
    fn long_lines_are_judged_by_their_ends() {
        let big = "x".repeat(200_000);
        let body = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{big}\"}},\"finish_reason\":\"length\"}}]}}\n\n"
        );
        let run = |body: &str| {
            let mut w = EndWatch::new(Protocol::Chat);
            let mut r = Reader::new(64 << 10);
            for c in body.as_bytes().chunks(1000) {
                r.feed(c, &mut |ev| {
                    w.on_event(&ev, &ev.payload());
                    Flow::Continue
                });
            }
            w.broken_at_end()
        };
        assert_eq!(run(&body), None);
        assert!(run(&body.replace("\"length\"", "null")).is_some());
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
