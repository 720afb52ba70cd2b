//! Reply-text capture for the request record (`response` and the token columns: see the
//! observability guide, "Request records").
//!
//! Chunks are fed as they are relayed; nothing here may hold the stream back or fail it. An SSE
//! stream is read through the one SSE reader (`crate::sse`): the relay hands each event and its
//! payload in ([`Capture::on_event`]) and only the text is kept. JSON and text bodies are kept up
//! to the record limit and read at the end; binary is ignored.
//! The OpenAI wire shapes read from replies are in `openai`; cutting record columns is the
//! records module's (`records::columns`).

use std::borrow::Cow;

use crate::escape::cut_bytes;

use actix_web::web::Bytes;

pub mod objects;
mod openai;

use self::openai::Whole;
/// The quoted-key scanner of the reply readers, for the usage filter's cheap checks.
use crate::sse::scan::{tail_finish_reason, tail_usage};
use crate::sse::{self, Payload};

/// Appended where a kept text was cut at `record_body_bytes`.
pub const TRUNCATED: &str = "…[truncated]";

/// What a capture may hold beyond the kept text: the SSE line being read, a usage tail (at most
/// `record_body_bytes` + 64 KiB per request, however long a line or a body is: see the security
/// guide).
pub const SLACK: usize = 64 << 10;
/// The whole capture's bound when `record_body_bytes` is 0 ("no limit" on the record).
pub const UNLIMITED_CAPTURE: usize = 8 << 20;
/// The end of a JSON reply or SSE line kept to find `usage` when the rest could not be kept.
const USAGE_TAIL: usize = 4096;
/// Longest model name kept from a reply (an upstream's is untrusted).
const MAX_MODEL: usize = 256;
/// Longest `finish_reason` kept (the known ones are a few bytes; an upstream's is untrusted).
const MAX_FINISH_REASON: usize = 64;

pub use crate::sse::Usage;

/// What a finished capture gives the record (`response`, the token columns, `finish_reason`, and
/// what `complete` needs to know of the body itself: see the observability guide, "Request
/// records").
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The reply text; None for binary bodies and when only the usage was read.
    pub text: Option<String>,
    /// The token usage found.
    pub usage: Usage,
    /// The last non-null `finish_reason` seen (bounded), read only when the text is kept.
    pub finish_reason: Option<FinishReason>,
    /// An SSE error event (a top-level `error`, or a Responses API `error`/`response.failed`)
    /// came through: the client did not get the whole answer. Read only when the text is kept.
    pub error_event: bool,
    /// The object the answer created, when it was watched for (see the affinity guide).
    pub object: Option<objects::ObjectSeen>,
    /// The model that answered, as the reply names it (bounded), when it was watched for
    /// ([`Capture::watch_model`]): the trace's `gen_ai.response.model` (see the tracing guide).
    pub model: Option<String>,
    /// A whole JSON reply whose text and `finish_reason` the record writer reads
    /// ([`read_json_reply`]) instead of the request path ([`Capture::defer_json`]); `text` is
    /// None then.
    pub json: Option<Bytes>,
}

impl Reply {
    /// A reply the gateway knows the text of (a WebSocket handshake answer, say).
    pub fn with_text(text: Option<String>) -> Reply {
        Reply {
            text,
            ..Reply::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sse,
    Json,
    Text,
    Binary,
}

/// Accumulates what the record keeps of one response.
#[derive(Debug)]
pub struct Capture {
    kind: Kind,
    /// False when only the token usage is wanted (recording off: the metrics still count tokens).
    keep_text: bool,
    limit: usize,
    /// SSE: the reply text so far. JSON/text: the raw body so far (bounded).
    text: Vec<u8>,
    /// JSON/text: the body while it is a single chunk, kept without copying (the usual case for
    /// a non-stream reply); moved into `text` when a second chunk comes.
    whole: Option<Bytes>,
    /// SSE fed as bytes ([`Capture::feed`], tests and benches): its own reader. The relay reads
    /// events once and hands them in instead.
    reader: Option<Box<sse::Reader>>,
    /// JSON cut at the limit: its last bytes, where `usage` is.
    tail: Vec<u8>,
    truncated: bool,
    usage: Usage,
    /// Usage of the earlier segments of a resumed stream (the continuation's is added to it).
    earlier: Usage,
    /// SSE: the last non-null `choices[*].finish_reason` so far.
    finish_reason: Option<FinishReason>,
    /// SSE: an error event was seen.
    error_event: bool,
    /// The answer's object id (and Responses output), when this answer creates one (see the
    /// affinity guide).
    objects: Option<objects::ObjectWatch>,
    /// Read the model that answered (only when the request is traced: it costs a copy).
    want_model: bool,
    /// The model the first SSE event that names one gave.
    model: Option<String>,
    /// The text is wanted only when the answer reports no usage ([`Capture::usage_or_text`]).
    text_without_usage: bool,
    /// A whole JSON reply is read by the record writer ([`Capture::defer_json`]).
    defer_json: bool,
}

impl Capture {
    /// A capture for a response with this `Content-Type` and `Content-Encoding`; `limit` 0
    /// means unlimited. A compressed body (an upstream that ignored `identity`) is relayed as is
    /// but, like binary, not kept: its bytes are not text.
    pub fn new(
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        limit: usize,
    ) -> Capture {
        // Compared without case in place: no lower-cased copy of the header per response.
        let ct = content_type.unwrap_or("");
        let starts = |p: &str| ct.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p));
        let encoded = content_encoding
            .map(str::trim)
            .is_some_and(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"));
        let kind = if encoded {
            Kind::Binary
        } else if starts("text/event-stream") {
            Kind::Sse
        } else if ct
            .as_bytes()
            .windows(4)
            .any(|w| w.eq_ignore_ascii_case(b"json"))
        {
            Kind::Json
        } else if starts("text/") || ct.is_empty() {
            Kind::Text
        } else {
            Kind::Binary
        };
        Capture {
            kind,
            keep_text: true,
            limit: if limit == 0 {
                UNLIMITED_CAPTURE - SLACK
            } else {
                limit
            },
            text: Vec::new(),
            whole: None,
            reader: None,
            tail: Vec::new(),
            truncated: false,
            usage: Usage::default(),
            earlier: Usage::default(),
            finish_reason: None,
            error_event: false,
            want_model: false,
            model: None,
            objects: None,
            text_without_usage: false,
            defer_json: false,
        }
    }

    /// Leaves reading a whole JSON reply (one chunk, not cut, its `usage` found at its end) to
    /// the record writer: the request path only scans the end for `usage`, and the reply's text
    /// and `finish_reason` are read on the writer's thread ([`Reply::json`]). Parsing the reply
    /// was most of what recording cost a JSON request on its own path (see the benchmarks
    /// guide, "Recording nearly free"). Not for a traced request, whose span wants the model
    /// that answered and the `finish_reason` when it ends.
    pub fn defer_json(&mut self) {
        self.defer_json = true;
    }

    /// A capture for an answer that is not recorded but whose text counts when it reports no
    /// usage (a member's tokens, see the members guide): the text is kept as for a record, but a
    /// JSON answer whose `usage` is found at its end is not parsed whole.
    pub fn usage_or_text(
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        limit: usize,
    ) -> Capture {
        let mut c = Capture::new(content_type, content_encoding, limit);
        c.text_without_usage = true;
        c
    }

    /// Watch this answer for the id of the object it creates (see the affinity guide).
    pub fn watch_objects(&mut self, watch: objects::ObjectWatch) {
        if matches!(self.kind, Kind::Sse | Kind::Json) {
            self.objects = Some(watch);
        }
    }

    /// A resumed stream goes on from another upstream (`resume`: see the rescue guide): the usage
    /// read so far is kept and the next upstream's is added to it.
    pub fn next_segment(&mut self) {
        self.earlier = self.earlier.plus(std::mem::take(&mut self.usage));
    }

    /// A capture that finds only the token usage, for `openai_api_route_tokens_total` when
    /// nothing is recorded: SSE events without `"usage"` are not parsed, no text is kept.
    pub fn usage_only(
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        limit: usize,
    ) -> Capture {
        let mut c = Capture::new(content_type, content_encoding, limit);
        c.keep_text = false;
        if c.kind == Kind::Text {
            // Plain text has no usage to find.
            c.kind = Kind::Binary;
        }
        c
    }

    /// Reads the model that answered into [`Reply::model`] (a traced request's
    /// `gen_ai.response.model`).
    pub fn watch_model(&mut self) {
        self.want_model = true;
    }

    /// Feeds one relayed chunk that can be kept by reference.
    pub fn feed_shared(&mut self, chunk: &Bytes) {
        let kept = matches!(self.kind, Kind::Json | Kind::Text)
            && self.whole.is_none()
            && self.text.is_empty()
            && !self.truncated
            && chunk.len() <= self.limit.min(8192);
        if kept {
            if let Some(w) = self.objects.as_mut() {
                w.json(chunk);
            }
            self.whole = Some(chunk.clone());
        } else {
            self.feed(chunk);
        }
    }

    /// Feeds one relayed chunk.
    pub fn feed(&mut self, chunk: &[u8]) {
        if let Some(whole) = self.whole.take() {
            // Already shown to the object watch when it came.
            let watch = self.objects.take();
            self.feed(&whole);
            self.objects = watch;
        }
        if let (Kind::Json, Some(w)) = (self.kind, self.objects.as_mut()) {
            w.json(chunk);
        }
        match self.kind {
            Kind::Binary => {}
            Kind::Json if !self.keep_text => self.keep_tail(chunk),
            Kind::Json | Kind::Text => self.keep(chunk),
            Kind::Sse => {
                let mut reader = self
                    .reader
                    .take()
                    .unwrap_or_else(|| Box::new(sse::Reader::new(self.limit + SLACK)));
                reader.set_max_line(self.line_room());
                reader.feed(chunk, &mut |ev| {
                    self.on_event(&ev, &ev.payload());
                    sse::Flow::Continue
                });
                self.reader = Some(reader);
            }
        }
    }

    /// How long an SSE line may be read whole: the capture's bound, less the text it kept
    /// (see the security guide).
    pub fn line_room(&self) -> usize {
        (self.limit + SLACK).saturating_sub(self.text.len())
    }

    /// Whether this capture reads SSE events (else the relay feeds it bytes).
    pub fn is_sse(&self) -> bool {
        self.kind == Kind::Sse
    }

    /// One event of an SSE reply and its payload, read once by the relay's reader.
    pub fn on_event(&mut self, ev: &sse::Event<'_>, p: &Payload<'_>) {
        if self.kind != Kind::Sse || !ev.substantive() {
            return;
        }
        if let Some(w) = self.objects.as_mut() {
            w.sse_payload(p);
        }
        if let Some(u) = p.reported_usage() {
            self.usage = u;
        }
        // Read with recording off too: an in-band error counts for health either way.
        if ev.is_error(p) {
            self.error_event = true;
        }
        if !self.keep_text {
            return;
        }
        if self.want_model && self.model.is_none() {
            self.model = p.named_model().map(|m| cut_bytes(m, MAX_MODEL).to_string());
        }
        if let Some(r) = p.choices.finish_reason.as_deref() {
            self.saw_finish_reason(r);
        }
        if let Some(t) = p.text() {
            self.keep(t.as_bytes());
        }
    }

    /// Usage only: the top-level `usage` of a JSON reply comes last, so the tail is enough and a
    /// large body (embeddings) is neither copied whole nor parsed.
    fn keep_tail(&mut self, bytes: &[u8]) {
        push_tail(&mut self.text, bytes);
    }

    fn keep(&mut self, bytes: &[u8]) {
        if self.truncated {
            if self.kind == Kind::Json {
                push_tail(&mut self.tail, bytes);
            }
            return;
        }
        let room = self.limit.saturating_sub(self.text.len());
        let take = bytes.len().min(room);
        // Grow no further than the limit: doubling past it would hold up to twice the bound.
        if self.text.capacity() < self.text.len() + take {
            // At least 256 bytes at first: a streamed reply arrives a few bytes per chunk, and
            // doubling from 5 bytes cost a reallocation per chunk for its first chunks.
            let want = (self.text.capacity() * 2)
                .max(self.text.len() + take)
                .max(256);
            self.text
                .reserve_exact(want.min(self.limit) - self.text.len());
        }
        self.text.extend_from_slice(&bytes[..take]);
        if take < bytes.len() {
            self.truncated = true;
            if self.kind == Kind::Json {
                push_tail(&mut self.tail, &bytes[take..]);
            }
        }
    }

    /// Keeps `reason` (bounded) as the last finish reason; allocates only when it changes.
    fn saw_finish_reason(&mut self, reason: &str) {
        if self.finish_reason.as_deref() != Some(cut_bytes(reason, MAX_FINISH_REASON)) {
            self.finish_reason = Some(shared_finish_reason(reason));
        }
    }

    /// What the record keeps of the reply: its text (None for binary bodies), the usage found,
    /// the last `finish_reason`, and whether an SSE error event came through.
    pub fn finish(mut self) -> Reply {
        let earlier = self.earlier;
        if let Some(mut reader) = self.reader.take() {
            // The stream ended without a final blank line: the last event still counts.
            reader.finish(&mut |ev| {
                self.on_event(&ev, &ev.payload());
                sse::Flow::Continue
            });
        }
        let json = self.kind == Kind::Json;
        let seen = self.objects.take().map(|w| w.finish(json));
        let streamed_model = self.model.take();
        let mut reply = self.finish_segment();
        reply.object = seen;
        reply.model = reply.model.or(streamed_model);
        reply.usage = earlier.plus(reply.usage);
        reply
    }

    /// The reply as the last segment alone gives it.
    fn finish_segment(mut self) -> Reply {
        let whole = self.whole.take();
        if !self.keep_text {
            if self.kind == Kind::Json {
                let body: &[u8] = whole.as_deref().unwrap_or(&self.text);
                if let Some(u) = tail_usage(body) {
                    self.usage = u;
                }
            }
            return Reply {
                usage: self.usage,
                error_event: self.error_event,
                ..Reply::default()
            };
        }
        let mut usage = self.usage;
        let mut finish_reason = self.finish_reason.take();
        // SSE text was kept as it was read: it becomes the record's text without a copy.
        if self.kind == Kind::Sse && whole.is_none() {
            let text = into_text(std::mem::take(&mut self.text));
            return self.reply(text, usage, finish_reason);
        }
        if self.defer_json && self.kind == Kind::Json && !self.truncated && !self.want_model {
            if let Some(w) = &whole {
                // Only when the tokens are known without the text (a member's count needs the
                // text's length otherwise).
                if let Some(usage) = tail_usage(w).filter(|u| u.total.is_some()) {
                    return Reply {
                        usage,
                        error_event: self.error_event,
                        // A copy of at most 8 KiB: the relayed chunk may be a slice of a
                        // larger read buffer, which a queued record must not keep alive.
                        json: Some(Bytes::copy_from_slice(w)),
                        ..Reply::default()
                    };
                }
            }
        }
        let body: &[u8] = whole.as_deref().unwrap_or(&self.text);
        if self.text_without_usage && self.kind == Kind::Json {
            if let Some(usage) = tail_usage(body) {
                return Reply {
                    usage,
                    ..Reply::default()
                };
            }
        }
        let text = match self.kind {
            Kind::Binary => {
                return Reply {
                    usage,
                    ..Reply::default()
                }
            }
            Kind::Json if !self.truncated => match serde_json::from_slice::<Whole>(body) {
                Ok(mut w) => {
                    if let Some(u) = &w.usage {
                        usage = u.to_usage();
                    }
                    finish_reason = w.finish_reason().map(|r| shared_finish_reason(&r));
                    if self.want_model {
                        self.model = w
                            .model
                            .as_ref()
                            .map(|m| cut_bytes(&m.0, MAX_MODEL).to_string());
                    }
                    w.into_reply().unwrap_or_else(|| lossy(body))
                }
                Err(_) => lossy(body),
            },
            _ => lossy(body),
        };
        if self.truncated && self.kind == Kind::Json {
            // The text was cut, but its `usage` (at the end) still counts (see the security guide),
            // and so does the `finish_reason` before it.
            let mut end = body[body.len().saturating_sub(USAGE_TAIL)..].to_vec();
            end.extend_from_slice(&self.tail);
            if let Some(u) = tail_usage(&end) {
                usage = u;
            }
            finish_reason = tail_finish_reason(&end).map(|r| shared_finish_reason(&r));
        }
        self.reply(text, usage, finish_reason)
    }

    /// The reply of a capture that kept its text (marked when it was cut).
    fn reply(&self, mut text: String, usage: Usage, finish_reason: Option<FinishReason>) -> Reply {
        if self.truncated {
            text.push_str(TRUNCATED);
        }
        Reply {
            text: Some(text),
            usage,
            finish_reason,
            error_event: self.error_event,
            object: None,
            model: self.model.clone(),
            json: None,
        }
    }
}

/// The text and `finish_reason` of a whole JSON reply whose reading was left to the record
/// writer ([`Capture::defer_json`]): the same reading the capture does itself.
pub fn read_json_reply(body: &[u8]) -> (String, Option<FinishReason>) {
    match serde_json::from_slice::<Whole>(body) {
        Ok(mut w) => {
            let finish_reason = w.finish_reason().map(|r| shared_finish_reason(&r));
            (w.into_reply().unwrap_or_else(|| lossy(body)), finish_reason)
        }
        Err(_) => (lossy(body), None),
    }
}

/// A `finish_reason` as the record keeps it: the known values shared, others bounded copies.
pub type FinishReason = Cow<'static, str>;

/// The finish reasons OpenAI-style APIs send, kept without a copy.
const KNOWN_FINISH_REASONS: [&str; 6] = [
    "stop",
    "length",
    "tool_calls",
    "content_filter",
    "function_call",
    "eos",
];

/// `reason`, shared when it is a known one, else copied (bounded: an upstream's is untrusted).
fn shared_finish_reason(reason: &str) -> FinishReason {
    match KNOWN_FINISH_REASONS.iter().find(|k| **k == reason) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(cut_bytes(reason, MAX_FINISH_REASON).to_owned()),
    }
}

/// Keeps the last [`USAGE_TAIL`] bytes of what passes through `buf` (up to twice that held).
fn push_tail(buf: &mut Vec<u8>, bytes: &[u8]) {
    if bytes.len() >= USAGE_TAIL {
        buf.clear();
        buf.extend_from_slice(&bytes[bytes.len() - USAGE_TAIL..]);
    } else {
        if buf.len() + bytes.len() > 2 * USAGE_TAIL {
            let drop = buf.len() + bytes.len() - USAGE_TAIL;
            buf.drain(..drop.min(buf.len()));
        }
        buf.extend_from_slice(bytes);
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `bytes` as text, reusing their buffer unless they are not UTF-8.
fn into_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| lossy(e.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Reply {
        /// The text and usage, as most tests compare them.
        fn parts(self) -> (Option<String>, Usage) {
            (self.text, self.usage)
        }
    }

    #[test]
    fn usage_or_text_parses_a_json_answer_only_without_usage() {
        let with = br#"{"choices":[{"message":{"content":"hello"}}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        let mut c = Capture::usage_or_text(Some("application/json"), None, 1 << 20);
        c.feed_shared(&Bytes::from_static(with));
        assert_eq!(
            c.finish().parts(),
            (
                None,
                Usage {
                    prompt: Some(3),
                    completion: Some(2),
                    total: Some(5)
                }
            )
        );
        let without = br#"{"choices":[{"message":{"content":"hello"}}]}"#;
        let mut c = Capture::usage_or_text(Some("application/json"), None, 1 << 20);
        c.feed_shared(&Bytes::from_static(without));
        assert_eq!(c.finish().parts(), (Some("hello".into()), Usage::default()));
    }

    #[test]
    fn a_deferred_json_reply_is_read_by_the_writer_the_same_way() {
        let with = br#"{"choices":[{"message":{"content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        let mut c = Capture::new(Some("application/json"), None, 1 << 20);
        c.defer_json();
        c.feed_shared(&Bytes::from_static(with));
        let reply = c.finish();
        assert_eq!(reply.text, None, "not read on the request path");
        assert_eq!(reply.usage.total, Some(5));
        let json = reply.json.expect("left to the writer");
        assert_eq!(
            read_json_reply(&json),
            ("hello".to_string(), Some("stop".into()))
        );
        let mut direct = Capture::new(Some("application/json"), None, 1 << 20);
        direct.feed_shared(&Bytes::from_static(with));
        let direct = direct.finish();
        assert_eq!(direct.text.as_deref(), Some("hello"));
        assert_eq!(direct.finish_reason.as_deref(), Some("stop"));

        // Without usage (a member's tokens need the text's length), when traced (the span wants
        // the model) or when cut, the capture reads the reply itself.
        let without = br#"{"choices":[{"message":{"content":"hello"}}]}"#;
        let mut c = Capture::new(Some("application/json"), None, 1 << 20);
        c.defer_json();
        c.feed_shared(&Bytes::from_static(without));
        let r = c.finish();
        assert_eq!((r.text.as_deref(), r.json), (Some("hello"), None));
        let mut c = Capture::new(Some("application/json"), None, 1 << 20);
        c.defer_json();
        c.watch_model();
        c.feed_shared(&Bytes::from_static(with));
        let r = c.finish();
        assert_eq!((r.text.as_deref(), r.json), (Some("hello"), None));
        let mut c = Capture::new(Some("application/json"), None, 16);
        c.defer_json();
        c.feed_shared(&Bytes::from_static(with));
        let r = c.finish();
        assert!(r.json.is_none() && r.text.is_some_and(|t| t.ends_with(TRUNCATED)));
    }

    #[test]
    fn sse_chat_split_anywhere() {
        let body = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"lo ✓\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\ndata: [DONE]\n\n";
        for split in 1..body.len() {
            let mut c = Capture::new(Some("text/event-stream; charset=utf-8"), None, 0);
            let (a, b) = body.as_bytes().split_at(split);
            c.feed(a);
            c.feed(b);
            let (text, usage) = c.finish().parts();
            assert_eq!(text.as_deref(), Some("Hello ✓"), "split at {split}");
            assert_eq!(usage.total, Some(5));
        }
    }

    #[test]
    fn responses_api_stream_and_json() {
        let mut c = Capture::new(Some("text/event-stream"), None, 0);
        c.feed(b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n");
        c.feed(b"data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":4,\"output_tokens\":1}}}\n\n");
        let (t, u) = c.finish().parts();
        assert_eq!(t.as_deref(), Some("Hi"));
        assert_eq!(
            (u.prompt, u.completion, u.total),
            (Some(4), Some(1), Some(5))
        );

        let mut c = Capture::new(Some("application/json"), None, 0);
        c.feed(br#"{"object":"response","output":[{"type":"message","content":[{"type":"output_text","text":"Yo"}]}]}"#);
        assert_eq!(c.finish().parts().0.as_deref(), Some("Yo"));
    }

    #[test]
    fn json_chat_completion_and_other() {
        let mut c = Capture::new(Some("application/json"), None, 0);
        c.feed(br#"{"choices":[{"message":{"role":"assistant","content":"ok"}}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#);
        let (t, u) = c.finish().parts();
        assert_eq!(t.as_deref(), Some("ok"));
        assert_eq!(u.total, Some(2));
        let mut c = Capture::new(Some("application/json"), None, 0);
        c.feed(br#"{"data":[{"embedding":[0.1]}]}"#);
        assert_eq!(
            c.finish().parts().0.as_deref(),
            Some(r#"{"data":[{"embedding":[0.1]}]}"#)
        );
        let c = Capture::new(Some("audio/mpeg"), None, 0);
        assert_eq!(c.finish().parts().0, None);
    }

    #[test]
    fn json_message_content_shapes() {
        let reply = |body: &str| {
            let mut c = Capture::new(Some("application/json"), None, 0);
            c.feed(body.as_bytes());
            c.finish().parts().0
        };
        let chat = |content: &str| {
            reply(&format!(
                r#"{{"choices":[{{"message":{{"content":{content}}}}}]}}"#
            ))
        };
        assert_eq!(
            chat(r#""say \"hi\"\n\u00e9""#).as_deref(),
            Some("say \"hi\"\né")
        );
        assert_eq!(
            chat(r#"[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}},"junk",7,{"text":5},{"text":"b","extra":[1,{"k":null}]}]"#).as_deref(),
            Some("ab")
        );
        assert_eq!(chat("null").as_deref(), Some(""));
        assert_eq!(chat(r#"{"odd":true}"#).as_deref(), Some(""));
        assert_eq!(chat("12.5").as_deref(), Some(""));
        assert_eq!(
            reply(r#"{"choices":[{"message":{"role":"assistant"}}]}"#).as_deref(),
            Some("")
        );
        assert_eq!(
            reply(r#"{"choices":[{"text":"legacy"}]}"#).as_deref(),
            Some("legacy")
        );
        // Not the shape we know: the body itself is kept.
        assert_eq!(
            reply(r#"{"choices":[{"message":{"content":"x"}}],"#).as_deref(),
            Some(r#"{"choices":[{"message":{"content":"x"}}],"#)
        );
    }

    #[test]
    fn shared_chunks_give_the_same_result_as_copied_ones() {
        let body = br#"{"choices":[{"message":{"content":"caf\u00e9 ok"}}],"usage":{"prompt_tokens":2,"completion_tokens":3}}"#;
        for limit in [0, 10, 64, 1 << 20] {
            for ct in ["application/json", "text/plain"] {
                for split in 0..body.len() {
                    let (a, b) = body.split_at(split);
                    for usage_only in [false, true] {
                        let make = || {
                            if usage_only {
                                Capture::usage_only(Some(ct), None, limit)
                            } else {
                                Capture::new(Some(ct), None, limit)
                            }
                        };
                        let (mut shared, mut copied) = (make(), make());
                        for part in [a, b] {
                            shared.feed_shared(&Bytes::copy_from_slice(part));
                            copied.feed(part);
                        }
                        assert_eq!(
                            shared.finish().parts(),
                            copied.finish().parts(),
                            "{ct} limit {limit} split {split}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_answering_model_is_read_only_when_watched() {
        let chat = b"data: {\"model\":\"gpt-4o-2024\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"model\":\"other\",\"choices\":[{\"delta\":{}}]}\n\n";
        let mut c = Capture::new(Some("text/event-stream"), None, 0);
        c.feed(chat);
        assert_eq!(c.finish().model, None, "not watched: not read");
        let mut c = Capture::new(Some("text/event-stream"), None, 0);
        c.watch_model();
        c.feed(chat);
        assert_eq!(
            c.finish().model.as_deref(),
            Some("gpt-4o-2024"),
            "the first one named"
        );
        let mut c = Capture::new(Some("text/event-stream"), None, 0);
        c.watch_model();
        c.feed(b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"model\":\"gpt-5\"}}\n\n");
        assert_eq!(
            c.finish().model.as_deref(),
            Some("gpt-5"),
            "Responses stream"
        );
        let mut c = Capture::new(Some("application/json"), None, 0);
        c.watch_model();
        c.feed(br#"{"model":"m-json","choices":[{"message":{"content":"x"}}]}"#);
        assert_eq!(c.finish().model.as_deref(), Some("m-json"), "JSON answer");
        let long = format!(r#"{{"model":"{}","choices":[]}}"#, "x".repeat(1000));
        let mut c = Capture::new(Some("application/json"), None, 0);
        c.watch_model();
        c.feed(long.as_bytes());
        assert_eq!(
            c.finish().model.map(|m| m.len()),
            Some(MAX_MODEL),
            "bounded"
        );
    }

    #[test]
    fn usage_only_keeps_no_text() {
        let mut c = Capture::usage_only(Some("text/event-stream"), None, 0);
        c.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"choices\":[],\"usa");
        c.feed(b"ge\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n");
        let (t, u) = c.finish().parts();
        assert_eq!(t, None);
        assert_eq!(
            (u.prompt, u.completion, u.total),
            (Some(3), Some(2), Some(5))
        );

        // include_usage: every chunk says "usage":null, the last one has the counts.
        let mut c = Capture::usage_only(Some("text/event-stream"), None, 0);
        c.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\": null}\n\n");
        c.feed(
            b"data: {\"choices\":[],\"usage\" : {\"prompt_tokens\":6,\"completion_tokens\":1}}\n\n",
        );
        assert_eq!(c.finish().parts().1.total, Some(7));

        let mut c = Capture::usage_only(Some("text/event-stream"), None, 0);
        c.feed(b"data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":4,\"output_tokens\":1}}}\n\n");
        assert_eq!(c.finish().parts().1.total, Some(5));

        let mut c = Capture::usage_only(Some("application/json"), None, 0);
        c.feed(br#"{"choices":[{"message":{"content":"ok"}}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#);
        assert_eq!(
            c.finish().parts(),
            (
                None,
                Usage {
                    prompt: Some(1),
                    completion: Some(1),
                    total: Some(2)
                }
            )
        );

        let mut c = Capture::usage_only(Some("text/plain"), None, 0);
        c.feed(b"usage");
        assert_eq!(c.finish().parts(), (None, Usage::default()));

        // A large JSON body: only its tail is kept, fed in uneven pieces.
        let mut body = String::from(r#"{"object":"list","data":["#);
        for i in 0..5000 {
            body.push_str(&format!(
                r#"{{"embedding":[0.{i},0.5],"usage":null,"note":"say \"usage\": {{}}"}},"#
            ));
        }
        body.push_str(r#"{"x":1}],"model":"m","usage" : {"prompt_tokens":8,"total_tokens":8}}"#);
        for piece in [1, 7, 4095, 4096, 4097, 100_000] {
            let mut c = Capture::usage_only(Some("application/json"), None, 1024);
            for chunk in body.as_bytes().chunks(piece) {
                c.feed(chunk);
            }
            assert!(c.text.len() <= 8192, "kept {} bytes", c.text.len());
            let (t, u) = c.finish().parts();
            assert_eq!(t, None);
            assert_eq!(
                (u.prompt, u.completion, u.total),
                (Some(8), None, Some(8)),
                "pieces of {piece}"
            );
        }
        let mut c = Capture::usage_only(Some("application/json"), None, 0);
        c.feed(
            br#"{"choices":[{"message":{"content":"the \"usage\": {\"prompt_tokens\": 99}"}}]}"#,
        );
        assert_eq!(c.finish().parts(), (None, Usage::default()));
    }

    #[test]
    fn usage_of_a_cut_json_reply_is_still_read() {
        let text = "y".repeat(20_000);
        let body = serde_json::json!({
            "choices": [{"message": {"content": text}}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33}
        })
        .to_string();
        for split in [1, 7, 4096, body.len()] {
            let mut c = Capture::new(Some("application/json"), None, 100);
            for part in body.as_bytes().chunks(split) {
                c.feed(part);
            }
            assert!(c.text.capacity() <= 100, "text grew past the limit");
            let (reply, usage) = c.finish().parts();
            assert!(reply.unwrap().ends_with(TRUNCATED));
            assert_eq!(usage.total, Some(33), "split {split}");
        }
    }

    #[test]
    fn an_endless_sse_line_keeps_only_a_tail() {
        let mut c = Capture::new(Some("text/event-stream"), None, 1024);
        c.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
        c.feed(b"data: {\"type\":\"x\",\"pad\":\"");
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..64 {
            c.feed(&chunk);
            let line = c.reader.as_ref().map_or(0, |r| r.buffered());
            assert!(line + c.text.len() <= 1024 + SLACK, "{line}");
        }
        c.feed(
            b"\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n",
        );
        c.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\" there\"}}]}\n\n");
        let (text, usage) = c.finish().parts();
        assert_eq!(text.as_deref(), Some("hi there"));
        assert_eq!(usage.total, Some(3));
    }

    #[test]
    fn limits_and_markers() {
        let mut c = Capture::new(Some("text/plain"), None, 4);
        c.feed(b"abcdef");
        assert_eq!(c.finish().parts().0.unwrap(), format!("abcd{TRUNCATED}"));
    }

    #[test]
    fn malformed_events_are_skipped() {
        let mut c = Capture::new(Some("text/event-stream"), None, 0);
        c.feed(b"data: {not json\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n: comment\n\n");
        assert_eq!(c.finish().parts().0.as_deref(), Some("x"));
    }

    #[test]
    fn finish_reason_of_json_and_sse_replies() {
        let json = |body: &str, limit: usize| {
            let mut c = Capture::new(Some("application/json"), None, limit);
            c.feed(body.as_bytes());
            c.finish()
        };
        let chat = r#"{"choices":[{"message":{"content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1}}"#;
        assert_eq!(json(chat, 0).finish_reason.as_deref(), Some("stop"));
        // Cut at the record limit: read from the tail, like the usage.
        let long = format!(
            r#"{{"choices":[{{"message":{{"content":"{}"}},"finish_reason":"length"}}]}}"#,
            "w".repeat(10_000)
        );
        let r = json(&long, 100);
        assert!(r.text.unwrap().ends_with(TRUNCATED));
        assert_eq!(r.finish_reason.as_deref(), Some("length"));
        assert_eq!(
            json(
                r#"{"choices":[{"message":{"content":"x"},"finish_reason":null}]}"#,
                0
            )
            .finish_reason,
            None
        );
        // A key-like text inside a string is not a key.
        let inner = r#"{"choices":[{"message":{"content":"\"finish_reason\": \"fake\""}}]}"#;
        assert_eq!(json(inner, 10).finish_reason, None);
        // An untrusted value is bounded.
        let huge = format!(
            r#"{{"choices":[{{"message":{{"content":"x"}},"finish_reason":"{}"}}]}}"#,
            "é".repeat(100)
        );
        assert_eq!(
            json(&huge, 0).finish_reason.unwrap().len(),
            MAX_FINISH_REASON
        );

        let stream =
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\n\n\
            data: {\"choices\":[{\"index\":1,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n\
            data: {\"choices\":[{\"delta\":{\"content\":\"b\"},\"finish_reason\":\"stop\"}]}\n\n\
            data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n\
            data: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut c = Capture::new(Some("text/event-stream"), None, 0);
            let (a, b) = stream.as_bytes().split_at(split);
            c.feed(a);
            c.feed(b);
            let r = c.finish();
            assert_eq!(r.text.as_deref(), Some("ab"));
            assert_eq!(r.finish_reason.as_deref(), Some("stop"), "split {split}");
            assert!(!r.error_event);
        }
    }

    #[test]
    fn sse_error_events_are_noticed() {
        for event in [
            "data: {\"error\":{\"message\":\"boom\",\"type\":\"upstream_error\"}}\n\n",
            "event: error\ndata: {\"type\":\"error\",\"message\":\"boom\"}\n\n",
            "data: {\"type\":\"response.failed\",\"response\":{}}\n\n",
        ] {
            let mut c = Capture::new(Some("text/event-stream"), None, 0);
            c.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
            c.feed(event.as_bytes());
            assert!(c.finish().error_event, "{event}");
        }
        let mut c = Capture::new(Some("text/event-stream"), None, 0);
        c.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"error\":null}\n\n");
        assert!(!c.finish().error_event);
    }
}
