//! Token usage for every stream (SPEC 4b, `force_usage`).
//!
//! OpenAI-style APIs only report a stream's token counts when the request asks for
//! `stream_options.include_usage`; most clients do not, so their streams would be recorded and
//! counted without tokens. The gateway therefore adds the option on the way up ([`usage_body`]),
//! reads the extra usage-only chunk like any other, and keeps that chunk from a client that did not
//! ask for it ([`UsageFilter`]): such a client may read `choices[0]` of every chunk and would break
//! on `"choices": []`. An upstream that rejects the option — its 400 names `stream_options` and the
//! same request without it succeeds — is not sent it for a while (the registry's learned facts).

use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::web::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::capture::{find_key, has_usage_object, key_values};

/// What is added when the client did not ask for usage itself.
const INCLUDE_USAGE: &str = "\"include_usage\":true";
/// The member added to a body without `stream_options` (`INCLUDE_USAGE` inside it).
const STREAM_OPTIONS: &str = "\"stream_options\":{\"include_usage\":true}";

/// Paths whose streams carry a usage chunk on request.
fn usage_path(path: &str) -> bool {
    path == "/v1/chat/completions" || path == "/v1/completions"
}

/// Members of a JSON object text in their original order, each value as its raw text.
fn members(text: &str) -> Option<Vec<(String, &RawValue)>> {
    let raw: BTreeMap<String, &RawValue> = serde_json::from_str(text).ok()?;
    let mut v: Vec<(String, &RawValue)> = raw.into_iter().collect();
    v.sort_by_key(|(_, r)| r.get().as_ptr() as usize - text.as_ptr() as usize);
    Some(v)
}

/// Byte offset of `inner` (a sub-slice of `outer`) in `outer`.
fn offset(outer: &str, inner: &str) -> usize {
    inner.as_ptr() as usize - outer.as_ptr() as usize
}

/// `text` (a JSON object) with one more member inserted before its closing brace.
fn append_member(text: &str, member: &str, empty: bool) -> Option<String> {
    let close = text.rfind('}')?;
    let mut out = String::with_capacity(text.len() + member.len() + 1);
    if empty {
        // `{ }`: replace the whole object so no stray comma is needed.
        out.push_str(&text[..text.find('{')?]);
        out.push('{');
        out.push_str(member);
        out.push_str(&text[close..]);
    } else {
        out.push_str(&text[..close]);
        out.push(',');
        out.push_str(member);
        out.push_str(&text[close..]);
    }
    Some(out)
}

/// How the gateway asks for usage in a body: the range of its `stream_options` value and that
/// value's replacement, or (no range) a `stream_options` member to append.
pub type UsageEdit = (Option<std::ops::Range<usize>>, String);

/// The edit that makes a body ask for usage, when the gateway should: a stream request to
/// `/v1/chat/completions` or `/v1/completions` whose JSON body does not already say
/// `stream_options.include_usage: true`. Every byte outside `stream_options` is kept, and so are
/// the client's other `stream_options` members. `stream_options` is where admission's one parse
/// found the top-level member's value (only that small value is read here).
pub fn usage_edit(
    path: &str,
    stream: bool,
    body: &[u8],
    stream_options: Option<std::ops::Range<usize>>,
) -> Option<UsageEdit> {
    if !stream || !usage_path(path) {
        return None;
    }
    let text = std::str::from_utf8(body).ok()?;
    let Some((at, opts_text)) = stream_options.and_then(|r| Some((r.clone(), text.get(r)?))) else {
        return Some((None, STREAM_OPTIONS.to_string()));
    };
    let new_opts = match members(opts_text) {
        Some(inner) => match inner.iter().rev().find(|(k, _)| k == "include_usage") {
            Some((_, v)) if v.get() == "true" => return None,
            Some((_, v)) => {
                let at = offset(opts_text, v.get());
                format!(
                    "{}true{}",
                    &opts_text[..at],
                    &opts_text[at + v.get().len()..]
                )
            }
            None => append_member(opts_text, INCLUDE_USAGE, inner.is_empty())?,
        },
        // `null` or something else that is not an object: the option replaces it.
        None => format!("{{{INCLUDE_USAGE}}}"),
    };
    Some((Some(at), new_opts))
}

/// How much of a 400 body is read to look for `stream_options`.
const ERROR_HEAD: usize = 64 * 1024;

/// For an attempt the gateway added `stream_options` to: whether the answer is a 400 whose body
/// names `stream_options` (then the caller repeats the attempt without it). Otherwise what was read
/// of the body is put back into `first`, so it is relayed unchanged.
pub async fn refuses_stream_options(
    resp: &mut awc::ClientResponse,
    first: &mut Option<Bytes>,
    wait: Duration,
) -> bool {
    if resp.status().as_u16() != 400 {
        return false;
    }
    let mut head = BytesMut::new();
    if let Some(f) = first.take() {
        head.extend_from_slice(&f);
    }
    let read = async {
        while head.len() < ERROR_HEAD {
            match resp.next().await {
                Some(Ok(chunk)) => head.extend_from_slice(&chunk),
                Some(Err(_)) => break,
                None => return true,
            }
        }
        false
    };
    if let Ok(true) = actix_rt::time::timeout(wait, read).await {
        // The body has ended: an awc payload must not be polled again, so the relay gets none.
        use actix_web::HttpMessage;
        drop(resp.take_payload());
    }
    let head = head.freeze();
    if head.windows(14).any(|w| w == b"stream_options") {
        return true;
    }
    if !head.is_empty() {
        *first = Some(head);
    }
    false
}

/// Events longer than this cannot be a usage-only chunk: they are passed on without waiting for
/// their end (and bound what is held).
const MAX_HELD: usize = 64 * 1024;

/// Drops the usage-only SSE events (`"choices": []` with a `usage` object) from a stream whose
/// usage the gateway asked for. Works on event boundaries (an event may arrive split across
/// chunks), relays everything else byte for byte, and holds back only the unfinished end of an
/// event until its blank line arrives.
#[derive(Debug)]
pub struct UsageFilter {
    /// The start of an event whose end has not arrived.
    held: BytesMut,
    /// The current event outgrew [`MAX_HELD`]: the rest of it passes as it comes.
    passing: bool,
    /// The last byte ended a line (events start at a line start).
    at_line_start: bool,
    /// The last byte was a `\r` ending a non-empty line (a `\n` after it belongs to it).
    prev_cr: bool,
    /// The last byte was a `\r` making an empty line: the event ends with it, or with a `\n` after.
    blank_cr: bool,
}

impl Default for UsageFilter {
    fn default() -> Self {
        UsageFilter {
            held: BytesMut::new(),
            passing: false,
            at_line_start: true,
            prev_cr: false,
            blank_cr: false,
        }
    }
}

#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    choices: Option<AllEmpty>,
    #[serde(default)]
    usage: Option<IgnoredAny>,
}

/// Whether every choice of a `choices` array is empty, decided while reading it: nothing is
/// collected, so probing a stream's usage chunk allocates nothing (it is read twice per stream,
/// by the usage filter and by the end watch).
struct AllEmpty(bool);

impl<'de> Deserialize<'de> for AllEmpty {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Each;
        impl<'de> serde::de::Visitor<'de> for Each {
            type Value = AllEmpty;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of choices")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<AllEmpty, A::Error> {
                let mut all = true;
                while let Some(c) = seq.next_element::<ChoiceProbe>()? {
                    all &= c.is_empty();
                }
                Ok(AllEmpty(all))
            }
        }
        d.deserialize_seq(Each)
    }
}

/// One choice of a chunk, as far as telling an empty one (SPEC 4e) matters.
#[derive(Deserialize)]
struct ChoiceProbe {
    #[serde(default)]
    delta: Option<NullsOnly>,
    #[serde(default)]
    finish_reason: Option<IgnoredAny>,
}

/// Whether every member of a `delta` object is `null` (true for `{}`), read without keeping
/// its keys or values.
struct NullsOnly(bool);

impl<'de> Deserialize<'de> for NullsOnly {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = NullsOnly;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a delta object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<NullsOnly, A::Error> {
                let mut nulls = true;
                while map.next_key::<IgnoredAny>()?.is_some() {
                    nulls &= map.next_value::<Option<IgnoredAny>>()?.is_none();
                }
                Ok(NullsOnly(nulls))
            }
        }
        d.deserialize_map(Members)
    }
}

impl ChoiceProbe {
    /// A choice that says nothing: its `delta` is empty (no member, or only `null` ones) and its
    /// `finish_reason` is null. LiteLLM puts its usage on a chunk of such choices.
    fn is_empty(&self) -> bool {
        self.finish_reason.is_none() && self.delta.as_ref().is_some_and(|d| d.0)
    }
}

/// Whether `"usage"` occurs at all (the usage filter's first, cheapest check).
fn has_usage_key(event: &[u8]) -> bool {
    find_key(event, b"\"usage\"").is_some()
}

/// Whether `"choices"` is followed by an empty array somewhere in `data` (a usage-only chunk's
/// shape). A `false` is certain for a one-line JSON object; a `true` is confirmed by parsing.
fn has_empty_choices(data: &[u8]) -> bool {
    key_values(data, b"\"choices\"").any(|v| {
        v.strip_prefix(b"[")
            .is_some_and(|r| r.trim_ascii_start().starts_with(b"]"))
    })
}

/// Whether one whole SSE event is a usage-only chunk: it carries a `usage` object and its
/// `choices` are empty — `"choices": []`, or choices whose `delta` is empty and whose
/// `finish_reason` is null (LiteLLM's shape, SPEC 4e). Every chunk of a stream that asked for
/// usage names `usage` (as `null` until the last), so the one-line events that cannot be
/// usage-only (no empty `choices`, no `usage` object) are told apart without parsing them.
pub fn is_usage_only(event: &[u8]) -> bool {
    if !has_usage_key(event) {
        return false;
    }
    let mut lines = event
        .split(|b| *b == b'\n' || *b == b'\r')
        .filter_map(|l| l.strip_prefix(b"data:"))
        .map(|rest| rest.strip_prefix(b" ").unwrap_or(rest));
    let Some(first) = lines.next() else {
        return false;
    };
    let data: std::borrow::Cow<'_, [u8]> = match lines.next() {
        None if !has_empty_choices(first) && !has_usage_object(first) => return false,
        None => std::borrow::Cow::Borrowed(first),
        Some(second) => {
            let mut joined = first.to_vec();
            for line in std::iter::once(second).chain(lines) {
                joined.push(b'\n');
                joined.extend_from_slice(line);
            }
            std::borrow::Cow::Owned(joined)
        }
    };
    usage_only_json(&data)
}

/// [`is_usage_only`] for the JSON payload of one `data:` line.
pub fn usage_only_json(data: &[u8]) -> bool {
    match serde_json::from_slice::<Probe>(data) {
        Ok(p) => p.usage.is_some() && p.choices.is_some_and(|c| c.0),
        Err(_) => false,
    }
}

/// What to send of one chunk: pieces of it (and held bytes) in order.
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
            // The common case, one run of the chunk: a slice of it, without a Vec.
            return match self.run.take() {
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

impl UsageFilter {
    /// What of `chunk` goes to the client now (possibly empty).
    pub fn push(&mut self, chunk: &Bytes) -> Bytes {
        let mut out = Out::default();
        let mut start = 0;
        let mut i = 0;
        while i < chunk.len() {
            if !self.blank_cr && !self.prev_cr {
                // Inside a line: skip to its end in one search.
                match chunk[i..].iter().position(|&b| b == b'\n' || b == b'\r') {
                    Some(0) => {}
                    Some(n) => {
                        self.at_line_start = false;
                        i += n;
                    }
                    None => {
                        self.at_line_start = false;
                        break;
                    }
                }
            }
            let b = chunk[i];
            if self.blank_cr {
                self.blank_cr = false;
                if b == b'\n' {
                    self.event_end(chunk, start, i + 1, &mut out);
                    start = i + 1;
                    i += 1;
                    continue;
                }
                // A lone `\r` ended the event; this byte starts the next one.
                self.event_end(chunk, start, i, &mut out);
                start = i;
            }
            if self.prev_cr && b == b'\n' {
                self.prev_cr = false;
                i += 1;
                continue;
            }
            self.prev_cr = false;
            match b {
                b'\n' => {
                    if self.at_line_start {
                        self.event_end(chunk, start, i + 1, &mut out);
                        start = i + 1;
                    }
                    self.at_line_start = true;
                }
                b'\r' => {
                    if self.at_line_start {
                        self.blank_cr = true;
                    } else {
                        self.at_line_start = true;
                        self.prev_cr = true;
                    }
                }
                _ => self.at_line_start = false,
            }
            i += 1;
        }
        // The unfinished rest of an event.
        if start < chunk.len() {
            if self.passing {
                out.keep(chunk, start, chunk.len());
            } else {
                self.held.extend_from_slice(&chunk[start..]);
                if self.held.len() > MAX_HELD {
                    self.passing = true;
                    let held = std::mem::take(&mut self.held).freeze();
                    out.bytes(held, chunk);
                }
            }
        }
        out.finish(chunk)
    }

    /// An event ends at `chunk[..end]`; it began in `held` (if anything is held) or at `start`.
    fn event_end(&mut self, chunk: &Bytes, start: usize, end: usize, out: &mut Out) {
        if self.passing {
            self.passing = false;
            out.keep(chunk, start, end);
        } else if self.held.is_empty() {
            if !is_usage_only(&chunk[start..end]) {
                out.keep(chunk, start, end);
            }
        } else {
            self.held.extend_from_slice(&chunk[start..end]);
            let event = std::mem::take(&mut self.held).freeze();
            if !is_usage_only(&event) {
                out.bytes(event, chunk);
            }
        }
    }

    /// At the end of the stream: an unfinished last event, unless it is a usage-only one.
    pub fn finish(&mut self) -> Option<Bytes> {
        let held = std::mem::take(&mut self.held).freeze();
        (!held.is_empty() && !is_usage_only(&held)).then_some(held)
    }

    /// Whatever is held, to be sent before an error event when the stream breaks.
    pub fn take_held(&mut self) -> Option<Bytes> {
        let held = std::mem::take(&mut self.held).freeze();
        (!held.is_empty()).then_some(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(b: &str) -> Option<String> {
        let facts = crate::facts::read(b.as_bytes()).ok()?;
        let (at, text) = usage_edit(
            "/v1/chat/completions",
            true,
            b.as_bytes(),
            facts.stream_options,
        )?;
        let mut e = crate::proxy::body::Edits::default();
        match at {
            Some(at) => e.replace(at, text),
            None => e.append(text),
        };
        e.apply(b.as_bytes()).map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn adds_include_usage_keeping_other_bytes() {
        assert_eq!(
            body(r#"{"model": "m",  "stream": true}"#).as_deref(),
            Some(r#"{"model": "m",  "stream": true,"stream_options":{"include_usage":true}}"#)
        );
        assert_eq!(
            body(r#"{"stream":true,"stream_options":{"x": 1},"n":1}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"x": 1,"include_usage":true},"n":1}"#)
        );
        assert_eq!(
            body(r#"{"stream":true,"stream_options":{"include_usage": false, "y":2}}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage": true, "y":2}}"#)
        );
        assert_eq!(
            body(r#"{"stream":true,"stream_options":{ }}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#)
        );
        assert_eq!(
            body(r#"{"stream":true,"stream_options":null}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#)
        );
        assert_eq!(
            body(r#"{"stream":true,"stream_options":{"include_usage":true}}"#),
            None
        );
        assert_eq!(body("not json"), None);
        assert!(usage_edit("/v1/embeddings", true, b"{\"stream\":true}", None).is_none());
        assert!(usage_edit("/v1/completions", false, b"{}", None).is_none());
    }

    const USAGE: &str = "data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n";

    fn run(chunks: &[&[u8]]) -> Vec<u8> {
        let mut f = UsageFilter::default();
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&f.push(&Bytes::copy_from_slice(c)));
        }
        if let Some(rest) = f.finish() {
            out.extend_from_slice(&rest);
        }
        out
    }

    #[test]
    fn drops_only_the_usage_chunk_at_any_split() {
        let a = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
        let done = "data: [DONE]\n\n";
        let full = format!("{a}{USAGE}{done}");
        let want = format!("{a}{done}");
        for i in 0..full.len() {
            for j in i..full.len() {
                let b = full.as_bytes();
                let got = run(&[&b[..i], &b[i..j], &b[j..]]);
                assert_eq!(String::from_utf8_lossy(&got), want, "split at {i},{j}");
            }
        }
        // CRLF and CR line endings.
        let crlf = full.replace('\n', "\r\n");
        assert_eq!(
            run(&[crlf.as_bytes()]),
            want.replace('\n', "\r\n").into_bytes()
        );
        let cr = full.replace('\n', "\r");
        assert_eq!(run(&[cr.as_bytes()]), want.replace('\n', "\r").into_bytes());
    }

    #[test]
    fn whole_chunks_pass_without_copy_and_usage_with_choices_stays() {
        let mut f = UsageFilter::default();
        let c = Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"total_tokens\":1}}\n\n",
        );
        let out = f.push(&c);
        assert_eq!(out, c);
        assert_eq!(out.as_ptr(), c.as_ptr());
        assert!(!is_usage_only(b"data: {\"choices\":[],\"usage\":null}\n\n"));
        assert!(is_usage_only(USAGE.as_bytes()));
        // Spacing and a JSON object split over two `data:` lines.
        assert!(is_usage_only(
            b"data: {\"choices\" : [ \t ],\"usage\":{\"total_tokens\":1}}\n\n"
        ));
        assert!(is_usage_only(
            b"data: {\"choices\":\ndata: [],\"usage\":{\"total_tokens\":1}}\n\n"
        ));
        // Every ordinary chunk names usage as null and has a choice: not usage-only.
        assert!(!is_usage_only(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"\\\"choices\\\":[]\"}}],\"usage\":null}\n\n"
        ));
        // LiteLLM's shape: one choice with an empty delta and a null finish_reason (SPEC 4e).
        assert!(is_usage_only(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":null}],\"usage\":{\"total_tokens\":1}}\n\n"
        ));
        assert!(is_usage_only(
            b"data: {\"choices\":[{\"delta\":{\"content\":null,\"role\":null}}],\"usage\":{\"total_tokens\":1}}\n\n"
        ));
        // A choice that says something keeps the chunk: a nested member, a second choice, a
        // delta that is not an object.
        assert!(!is_usage_only(
            b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"id\":null}]}}],\"usage\":{\"total_tokens\":1}}\n\n"
        ));
        assert!(!is_usage_only(
            b"data: {\"choices\":[{\"delta\":{}},{\"delta\":{\"content\":\"x\"}}],\"usage\":{\"total_tokens\":1}}\n\n"
        ));
        assert!(!is_usage_only(
            b"data: {\"choices\":[{\"delta\":\"x\"}],\"usage\":{\"total_tokens\":1}}\n\n"
        ));
        assert!(!is_usage_only(
            b"data: {\"choices\":{},\"usage\":{\"total_tokens\":1}}\n\n"
        ));
        assert!(!is_usage_only(
            b"data: {\"choices\":null,\"usage\":{\"total_tokens\":1}}\n\n"
        ));
        // A choice that says something keeps the chunk.
        assert!(!is_usage_only(
            b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"total_tokens\":1}}\n\n"
        ));
        assert!(!is_usage_only(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":{\"total_tokens\":1}}\n\n"
        ));
        assert!(!is_usage_only(
            b"data: {\"choices\":[{\"text\":\"x\",\"finish_reason\":null}],\"usage\":{\"total_tokens\":1}}\n\n"
        ));
    }

    #[test]
    fn long_events_are_not_held() {
        let mut f = UsageFilter::default();
        let big = Bytes::from(format!("data: {}", "x".repeat(MAX_HELD + 10)));
        assert_eq!(f.push(&big), big);
        let rest = Bytes::from_static(b"yz\n\n");
        assert_eq!(f.push(&rest), rest);
    }
}
