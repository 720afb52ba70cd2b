//! Token usage for every stream (`force_usage`: see the observability guide, "Models and token
//! usage (0.2)").
//!
//! OpenAI-style APIs only report a stream's token counts when the request asks for
//! `stream_options.include_usage`; most clients do not, so their streams would be recorded and
//! counted without tokens. The gateway therefore adds the option on the way up ([`usage_edit`]),
//! reads the extra usage-only chunk like any other, and the relay keeps that chunk from a client
//! that did not ask for it (`sse::Payload::usage_only`): such a client may read `choices[0]` of
//! every chunk and would break on `"choices": []`. An upstream that rejects the option — its 400 names `stream_options` and the
//! same request without it succeeds — is not sent it for a while (the registry's learned facts).

use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::web::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::value::RawValue;

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
}
