//! The body an upstream gets: the client's JSON body with the gateway's few edits applied in one
//! copy, from the ranges the one parse of admission found ([`crate::facts`]), so no
//! body is parsed again to be edited.

use std::ops::Range;

use actix_web::web::Bytes;

use crate::config::{Prefill, Upstream};
use crate::facts::RequestFacts;
use crate::include_usage::UsageEdit;

/// Edits that turn the client's JSON body into the one an upstream gets, applied in one copy:
/// `model_map`'s model (see the configuration guide), the added `stream_options` (see the models
/// guide) and a continuation's prefill (see the rescue guide). Every other byte is kept.
#[derive(Debug, Default)]
pub struct Edits {
    /// Ranges of the body replaced by new text, not overlapping.
    replace: Vec<(Range<usize>, String)>,
    /// Members appended to the object.
    append: Vec<String>,
}

impl Edits {
    /// Replaces `at` (a range of the body) with `text`.
    pub fn replace(&mut self, at: Range<usize>, text: String) -> &mut Self {
        self.replace.push((at, text));
        self
    }

    /// Appends a member (`"key":value`) to the top-level object.
    pub fn append(&mut self, member: String) -> &mut Self {
        self.append.push(member);
        self
    }

    /// Whether nothing is to change.
    pub fn is_empty(&self) -> bool {
        self.replace.is_empty() && self.append.is_empty()
    }

    /// The edited body; None when the edits do not fit it (ranges out of bounds or overlapping,
    /// or no closing brace to append before).
    pub fn apply(mut self, body: &[u8]) -> Option<Vec<u8>> {
        self.replace.sort_by_key(|(r, _)| r.start);
        let extra: usize = self.replace.iter().map(|(_, t)| t.len()).sum::<usize>()
            + self.append.iter().map(|m| m.len() + 1).sum::<usize>();
        let mut out = Vec::with_capacity(body.len() + extra);
        let mut at = 0;
        for (r, text) in &self.replace {
            if r.start < at || r.end > body.len() || r.start > r.end {
                return None;
            }
            out.extend_from_slice(&body[at..r.start]);
            out.extend_from_slice(text.as_bytes());
            at = r.end;
        }
        if self.append.is_empty() {
            out.extend_from_slice(&body[at..]);
            return Some(out);
        }
        let close = body.iter().rposition(|&b| b == b'}')?;
        if close < at {
            return None;
        }
        out.extend_from_slice(&body[at..close]);
        // `{}` (or `{ }`) takes no comma before its first member.
        let empty = out
            .iter()
            .rev()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b == b'{');
        for (i, m) in self.append.iter().enumerate() {
            if i > 0 || !empty {
                out.push(b',');
            }
            out.extend_from_slice(m.as_bytes());
        }
        out.extend_from_slice(&body[close..]);
        Some(out)
    }
}

/// What one attempt sends beyond the client's body: the added `stream_options` and a
/// continuation's prefill (the model comes from the upstream's `model_map`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Extras<'a> {
    /// The `stream_options` edit, when this attempt adds it (see the observability guide, "Models
    /// and token usage (0.2)").
    pub usage: Option<&'a UsageEdit>,
    /// The text already sent and the upstream's dialect, for a continuation by prefill.
    pub prefill: Option<(&'a str, Prefill)>,
}

/// The body `up` gets for a request with `facts`: its `model_map` applied, and `extras`. A body
/// that needs no edit is shared, not copied; one the edits cannot fit (not a JSON object) is sent
/// as it came.
pub fn for_upstream(
    body: &Bytes,
    facts: &RequestFacts,
    up: &Upstream,
    extras: Extras<'_>,
) -> Bytes {
    let mut e = Edits::default();
    if let (Some(to), Some(at)) = (
        facts.model.as_deref().and_then(|m| up.mapped_model(m)),
        facts.model_at.clone(),
    ) {
        e.replace(at, json_string(to));
    }
    if let Some((at, text)) = extras.usage {
        match at {
            Some(at) => e.replace(at.clone(), text.clone()),
            None => e.append(text.clone()),
        };
    }
    if let Some((text, dialect)) = extras.prefill {
        if !prefill(&mut e, body, facts, text, dialect) {
            return body.clone();
        }
    }
    if e.is_empty() {
        return body.clone();
    }
    e.apply(body)
        .map(Bytes::from)
        .unwrap_or_else(|| body.clone())
}

/// Adds the prefill (one trailing assistant message in `dialect`, see the rescue guide) to `e`;
/// false when the body has no `messages` array to add it to.
fn prefill(e: &mut Edits, body: &[u8], facts: &RequestFacts, text: &str, dialect: Prefill) -> bool {
    let Some(at) = facts.messages.clone() else {
        return false;
    };
    let Some(list) = body.get(at.clone()) else {
        return false;
    };
    let Some(close) = list.iter().rposition(|&b| b == b']') else {
        return false;
    };
    if list.first() != Some(&b'[') {
        return false;
    }
    let empty = list[1..close].iter().all(u8::is_ascii_whitespace);
    let mut msg = String::with_capacity(text.len() + 48);
    if !empty {
        msg.push(',');
    }
    msg.push_str("{\"role\":\"assistant\",\"content\":");
    msg.push_str(&json_string(text));
    if dialect == Prefill::Deepseek {
        msg.push_str(",\"prefix\":true");
    }
    msg.push('}');
    // Inserted before the closing bracket: a replacement of the empty range there.
    let end = at.start + close;
    e.replace(end..end, msg);
    if dialect == Prefill::Vllm {
        if facts.names_prefill_keys {
            // The client set one of them already: a second member would be a duplicate key.
            return false;
        }
        e.append("\"continue_final_message\":true,\"add_generation_prompt\":false".into());
    }
    true
}

/// A JSON string literal for `s`.
pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The body with its top-level `model` replaced by `to` (every other byte kept), for a body
/// whose facts were read by admission.
pub fn rewrite_model(body: &[u8], facts: &RequestFacts, to: &str) -> Option<Vec<u8>> {
    let at = facts.model_at.clone()?;
    let mut e = Edits::default();
    e.replace(at, json_string(to));
    e.apply(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::read;

    fn edited(body: &str, prefill_with: Option<Prefill>, map: Option<&str>) -> String {
        let facts = read(body.as_bytes()).unwrap();
        let mut text =
            "authorization: x\nupstreams:\n  - endpoint: http://127.0.0.1:9/v1\n".to_string();
        if let Some(to) = map {
            text.push_str(&format!("    model_map: {{\"*\": {to}}}\n"));
        }
        let cfg = crate::config::parse(std::path::Path::new("t.yaml"), &text, false, &|_| None)
            .unwrap()
            .0;
        let extras = Extras {
            usage: None,
            prefill: prefill_with.map(|d| ("Hel\"lo", d)),
        };
        let out = for_upstream(
            &Bytes::from(body.to_string()),
            &facts,
            &cfg.upstreams[0],
            extras,
        );
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn prefill_dialects_append_to_messages_keeping_other_bytes() {
        let body = r#"{"model": "m", "stream":true,"messages":[{"role":"user","content":"hi"}] }"#;
        assert_eq!(
            edited(body, Some(Prefill::Message), None),
            r#"{"model": "m", "stream":true,"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"Hel\"lo"}] }"#
        );
        let v: serde_json::Value =
            serde_json::from_str(&edited(body, Some(Prefill::Vllm), Some("x"))).unwrap();
        assert_eq!(v["continue_final_message"], true);
        assert_eq!(v["add_generation_prompt"], false);
        assert_eq!(v["model"], "x");
        assert_eq!(v["messages"][1]["content"], "Hel\"lo");
        let v: serde_json::Value =
            serde_json::from_str(&edited(body, Some(Prefill::Deepseek), None)).unwrap();
        assert_eq!(v["messages"][1]["prefix"], true);
        let empty = r#"{"messages":[ ]}"#;
        assert_eq!(
            edited(empty, Some(Prefill::Message), None),
            r#"{"messages":[ {"role":"assistant","content":"Hel\"lo"}]}"#
        );
    }

    #[test]
    fn model_map_rewrites_only_the_model() {
        assert_eq!(
            edited(r#"{ "model" : "a\u0041", "x":[1, 2] }"#, None, Some("b")),
            r#"{ "model" : "b", "x":[1, 2] }"#
        );
        let e = Edits::default();
        assert!(e.is_empty());
    }
}
