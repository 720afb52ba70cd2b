//! One event's data, read once for every observer: what a chat or completions chunk says (each
//! choice's index and end, the first choice's text, role, tool calls, logprobs), what a Responses
//! event says (its type, delta text, the response's id, model, usage and output), `usage`, a
//! top-level `error`, and `[DONE]`.
//!
//! Strings are borrowed from the event unless they hold escapes, and nothing is collected into a
//! vector: a streamed chunk costs one pass and no allocation for the common shapes. A payload too
//! long to keep whole is read from its two ends instead ([`Payload::read_cut`]).

use std::borrow::Cow;

use serde_json::value::RawValue;

use super::scan::Usage;

/// The most choice indices tracked (OpenAI allows `n` up to 128).
pub const MAX_CHOICES: u32 = 128;

/// One event's data; see the module docs.
#[derive(Debug, Default)]
pub struct Payload<'a> {
    /// `data: [DONE]`.
    pub done: bool,
    /// The data was a JSON object (else only `done` may be set).
    pub object: bool,
    /// The payload was too long to keep: what is here was read from its ends.
    pub cut: bool,
    /// Top-level `type` (Responses events).
    pub kind: Option<Cow<'a, str>>,
    /// A top-level `error` that is not null.
    pub error: Option<ErrorView<'a>>,
    /// Top-level `id`.
    pub id: Option<Cow<'a, str>>,
    /// Top-level `model`.
    pub model: Option<Cow<'a, str>>,
    /// Top-level `delta`, when a string (Responses text deltas).
    pub delta: Option<Cow<'a, str>>,
    /// Top-level `message`, when a string (a Responses `error` event's text).
    pub message: Option<Cow<'a, str>>,
    /// Top-level `usage`, when an object.
    pub usage: Option<Usage>,
    /// The `response` object of a Responses event.
    pub response: Option<ResponseView<'a>>,
    /// The `choices` array of a chat or completions chunk.
    pub choices: Choices<'a>,
}

/// A top-level `error` of an in-band error event.
#[derive(Debug, Default)]
pub struct ErrorView<'a> {
    /// Its `message`, when a string.
    pub message: Option<Cow<'a, str>>,
}

/// The `response` object of a Responses event.
#[derive(Debug, Default)]
pub struct ResponseView<'a> {
    /// Its `id`.
    pub id: Option<Cow<'a, str>>,
    /// Its `model`.
    pub model: Option<Cow<'a, str>>,
    /// Its `usage`.
    pub usage: Option<Usage>,
    /// Its `output` array, as raw JSON text.
    pub output: Option<&'a RawValue>,
    /// Its `error.message`, when it has one.
    pub error: Option<Cow<'a, str>>,
}

/// What a chunk's `choices` say, summed up while reading them.
#[derive(Debug, Default)]
pub struct Choices<'a> {
    /// The chunk has a `choices` array.
    pub present: bool,
    /// How many choices it holds.
    pub count: u32,
    /// The choice of index 0 (by its `index`, else the first).
    pub first: Option<ChoiceView<'a>>,
    /// Every choice says nothing: its `delta` is empty (no member, or only `null` ones) and its
    /// `finish_reason` is null. True for `[]` (a usage-only chunk's shape, LiteLLM's included).
    pub empty: bool,
    /// A choice carries `tool_calls` or `function_call` in its delta.
    pub tools: bool,
    /// A choice carries non-null `logprobs`.
    pub logprobs: bool,
    /// Bit `i`: choice index `i` (below [`MAX_CHOICES`]) is in this chunk.
    pub carried: u128,
    /// Bit `i`: choice index `i` has a non-null `finish_reason` in this chunk.
    pub finished: u128,
    /// A choice index at or above [`MAX_CHOICES`] came (it cannot be tracked).
    pub untracked: bool,
    /// The last non-null `finish_reason` of any choice (the record's `finish_reason`).
    pub finish_reason: Option<Cow<'a, str>>,
}

/// The first choice of a chunk.
#[derive(Debug, Default)]
pub struct ChoiceView<'a> {
    /// `delta.content` (chat) or `text` (completions), when a string.
    pub text: Option<Cow<'a, str>>,
    /// The delta names a `role`.
    pub role: bool,
    /// Its `finish_reason`, when not null.
    pub finish_reason: Option<Cow<'a, str>>,
}

impl<'a> Payload<'a> {
    /// Reads a payload too long to keep from its first bytes (`head`: its type, whether it has
    /// choices, a top-level error) and its last (`tail`: `finish_reason`, `usage`).
    pub fn read_cut(head: &'a [u8], tail: &'a [u8]) -> Payload<'a> {
        use super::scan::{key_values, tail_finish_reason, tail_usage};
        let first_string = |key: &'static [u8]| {
            key_values(head, key).next().and_then(|v| {
                let v = v.strip_prefix(b"\"")?;
                let end = memchr::memchr(b'"', v)?;
                std::str::from_utf8(&v[..end]).ok().map(Cow::Borrowed)
            })
        };
        let present = key_values(head, b"\"choices\"")
            .next()
            .is_some_and(|v| v.starts_with(b"["));
        let finish = tail_finish_reason(tail);
        let error = (head.starts_with(b"{\"error\"") && !head.starts_with(b"{\"error\":null"))
            .then(ErrorView::default);
        Payload {
            object: head.trim_ascii_start().starts_with(b"{"),
            cut: true,
            kind: first_string(b"\"type\""),
            error,
            usage: tail_usage(tail),
            choices: Choices {
                present,
                count: u32::from(present),
                // A cut chunk is taken as choice 0's; it is judged ended when its end holds a
                // finish reason (which choice that belongs to cannot be read: it counts for all).
                carried: u128::from(present),
                finished: if finish.is_some() { u128::MAX } else { 0 },
                finish_reason: finish.map(Cow::Owned),
                ..Choices::default()
            },
            ..Payload::default()
        }
    }

    /// A top-level non-null `error`, or a Responses `error`/`response.failed` type.
    pub fn is_error(&self) -> bool {
        self.error.is_some() || matches!(self.kind.as_deref(), Some("error" | "response.failed"))
    }

    /// The upstream's message of an error event, if it gives one.
    pub fn error_message(&self) -> Option<String> {
        let m = self
            .error
            .as_ref()
            .and_then(|e| e.message.as_deref())
            .or(self.response.as_ref().and_then(|r| r.error.as_deref()))
            .or(self.message.as_deref())?;
        Some(crate::escape::untrusted(m).into_owned())
    }

    /// A usage-only chunk: it carries `usage` and its choices say nothing (`"choices": []`, or
    /// choices whose delta is empty and whose `finish_reason` is null). Hidden from a client that
    /// did not ask for usage, and not the answer's last chunk (see the observability guide,
    /// "Models and token usage (0.2)").
    pub fn usage_only(&self) -> bool {
        !self.cut && self.usage.is_some() && self.choices.present && self.choices.empty
    }

    /// The usage the payload reports (its own, or its response's).
    pub fn reported_usage(&self) -> Option<Usage> {
        self.usage
            .or_else(|| self.response.as_ref().and_then(|r| r.usage))
    }

    /// The model the payload names (its own, or its response's).
    pub fn named_model(&self) -> Option<&str> {
        self.model
            .as_deref()
            .or_else(|| self.response.as_ref().and_then(|r| r.model.as_deref()))
    }

    /// The text this payload adds to the reply: the first choice's, or a Responses text delta.
    pub fn text(&self) -> Option<&str> {
        match self.kind.as_deref() {
            Some("response.output_text.delta") => self.delta.as_deref(),
            Some(_) => None,
            None => self.choices.first.as_ref().and_then(|c| c.text.as_deref()),
        }
    }
}
