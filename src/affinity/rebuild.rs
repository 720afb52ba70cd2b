//! Rebuilding a Responses chain as one stateless request (`rebuild: true`; see the affinity
//! guide, "Rebuilding a Responses chain").
//!
//! Each owned response keeps a [`Link`]: its request's `input` and `previous_response_id`, and
//! its output items that can be sent back as input (messages and function calls; reasoning is
//! dropped — it is the old upstream's, often encrypted for it alone). When a follow-up's owner
//! cannot answer and every link of its chain is held whole, [`rebuild_body`] makes the request
//! the next candidate can answer without the old upstream: the chain's inputs and outputs,
//! oldest first, then this request's own input. Everything here is pure.

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::facts::RequestFacts;

/// One response of a chain, as kept for rebuilding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Its request's `previous_response_id`, if any.
    pub previous: Option<String>,
    /// Its request's `input`, as JSON text (a string or a list of items).
    pub input: String,
    /// Its kept output items, as a JSON array.
    pub items: String,
}

impl Link {
    /// What a link costs beyond its text (the struct, its `Arc`, its place in the eviction
    /// queue), counted so that many tiny links cannot exceed the budget by their overhead.
    pub const OVERHEAD: usize = 64;

    /// Memory the link holds, for the owner map's budget.
    pub fn bytes(&self) -> usize {
        self.input.len()
            + self.items.len()
            + self.previous.as_ref().map_or(0, String::len)
            + Self::OVERHEAD
    }

    /// The link of a live request (its `body`, received whole, and what admission's one parse
    /// found in it) and its kept output `items`: nothing is parsed again.
    pub fn from_facts(body: &[u8], facts: &RequestFacts, items: String) -> Option<Link> {
        if !facts.json {
            return None;
        }
        let input = match facts.slice(body, &facts.input) {
            Some(raw) => std::str::from_utf8(raw).ok()?.to_string(),
            None => "[]".to_string(),
        };
        Some(Link {
            previous: facts.previous_response_id.as_deref().map(str::to_string),
            input,
            items,
        })
    }

    /// The link of a stored request `body` (JSON) and its kept output `items`.
    fn from_stored(body: &[u8], items: String) -> Option<Link> {
        let fields = Fields::parse(body)?;
        let mut previous = None;
        let mut input = None;
        for (k, v) in &fields.0 {
            match k.as_str() {
                "previous_response_id" => match serde_json::from_str::<Value>(v.get()).ok()? {
                    Value::String(s) => previous = Some(s),
                    Value::Null => {}
                    _ => return None,
                },
                "input" => input = Some(v.get().to_string()),
                _ => {}
            }
        }
        Some(Link {
            previous,
            input: input.unwrap_or_else(|| "[]".into()),
            items,
        })
    }

    /// The link from a stored record (its request body and `response_items`, taken as they
    /// are: a read of many parts holds no second copy); None when the body is not a whole JSON
    /// object (cut at `record_body_bytes`).
    pub fn from_record(body: &str, items: String) -> Option<Link> {
        serde_json::from_str::<Vec<Box<RawValue>>>(&items).ok()?;
        Link::from_stored(body.as_bytes(), items)
    }
}

/// The output items of a Responses answer (its `output` array, as JSON text) that a rebuilt
/// request sends back as input: messages and function calls, without their `id` (an object of
/// the old upstream that the next one does not know); reasoning and every other item dropped.
pub fn kept_items(output: &str) -> Option<String> {
    let items: Vec<Value> = serde_json::from_str(output).ok()?;
    let kept: Vec<Value> = items
        .into_iter()
        .filter(|i| {
            matches!(
                i.get("type").and_then(Value::as_str),
                Some("message" | "function_call")
            )
        })
        .map(|mut i| {
            if let Some(o) = i.as_object_mut() {
                o.remove("id");
            }
            i
        })
        .collect();
    serde_json::to_string(&kept).ok()
}

/// What of a live request a chain link keeps: its body, what admission read in it, and
/// `record_body_bytes` (0 = no limit).
#[derive(Clone, Copy)]
pub struct RequestPart<'a> {
    /// The body as received.
    pub body: &'a [u8],
    /// What the one parse found in it.
    pub facts: &'a RequestFacts,
    /// `record_body_bytes`.
    pub limit: usize,
}

/// Keeps the chain link of response `id` owned by `upstream` (see the affinity guide): its
/// request (received whole, and within `record_body_bytes`) and its answer's `output` (None when
/// it was not read whole). Returns the kept items for the record's
/// `response_items`; nothing is kept when either part is not whole, so such a chain is never
/// rebuilt. Only a `POST /v1/responses` body has the shape this reads; others keep nothing. The
/// link goes into `owners` only when given (`rebuild: true`): otherwise memory holds no links.
pub fn keep_link(
    owners: Option<&super::Owners>,
    id: &str,
    upstream: &std::sync::Arc<str>,
    request: RequestPart<'_>,
    output: Option<&str>,
) -> Option<String> {
    let output = output?;
    let limit = request.limit;
    if limit != 0 && (request.body.len() > limit || output.len() > limit) {
        return None;
    }
    let items = kept_items(output)?;
    let link = Link::from_facts(request.body, request.facts, items.clone())?;
    if let Some(owners) = owners {
        owners.learn_link(id, upstream, link);
    }
    Some(items)
}

/// The record's `object_id` and `response_items` for the answer (`status`) of upstream `idx` of
/// `cfg` that created `seen` (a 2xx), and the chain link `owners` keep for it (with `rebuild: true`
/// only): its output only when the answer reached the client `whole`.
pub fn object_of(
    (owners, cfg, idx, status): (&super::Owners, &crate::config::Config, usize, u16),
    seen: Option<&crate::capture::objects::ObjectSeen>,
    whole: bool,
    request: RequestPart<'_>,
) -> (Option<std::sync::Arc<str>>, Option<String>) {
    let up = cfg.upstreams.get(idx).map(|u| &u.name);
    let (Some(seen), Some(up), true) = (seen, up, (200..300).contains(&status)) else {
        return (None, None);
    };
    let Some(id) = seen.id.as_deref() else {
        return (None, None);
    };
    // Another upstream owned it first: this answer did not make it this one's.
    if owners.owner_of(id, cfg).as_ref() != Some(up) {
        return (None, None);
    }
    let output = seen.output.as_deref().filter(|_| whole);
    let items = keep_link(cfg.rebuild.then_some(owners), id, up, request, output);
    (Some(id.into()), items)
}

/// `input` as a list of items: a string is one user message.
fn input_items(input: &str) -> Option<Vec<Value>> {
    match serde_json::from_str::<Value>(input).ok()? {
        Value::String(s) => Some(vec![serde_json::json!({"role": "user", "content": s})]),
        Value::Array(items) => Some(items),
        Value::Null => Some(Vec::new()),
        _ => None,
    }
}

/// The stateless request for `body` (a `POST /v1/responses` naming `previous_response_id`) given
/// its whole `chain`, oldest first: `input` = each earlier response's input then its kept output
/// items, then this request's input; `previous_response_id` removed; every other field as sent
/// (byte for byte, in its place). None when the body or a link cannot be read.
pub fn rebuild_body(body: &[u8], chain: &[std::sync::Arc<Link>]) -> Option<Vec<u8>> {
    // The one body a request path parses a second time: a rebuild is rare, and it is counted.
    crate::facts::count_parse();
    let fields = Fields::parse(body)?;
    let mut input: Vec<Value> = Vec::new();
    for link in chain {
        input.extend(
            input_items(&link.input)?
                .into_iter()
                .filter(|i| i.get("type").and_then(Value::as_str) != Some("reasoning")),
        );
        input.extend(serde_json::from_str::<Vec<Value>>(&link.items).ok()?);
    }
    let own = fields
        .0
        .iter()
        .find(|(k, _)| k == "input")
        .map_or(Some(Vec::new()), |(_, v)| input_items(v.get()))?;
    input.extend(own);
    let input = serde_json::to_string(&input).ok()?;
    let mut out = Vec::with_capacity(body.len() + input.len());
    out.push(b'{');
    let mut first = true;
    let mut put = |out: &mut Vec<u8>, k: &str, v: &str| {
        if !first {
            out.push(b',');
        }
        first = false;
        if let Ok(k) = serde_json::to_string(k) {
            out.extend_from_slice(k.as_bytes());
        }
        out.push(b':');
        out.extend_from_slice(v.as_bytes());
    };
    let mut wrote_input = false;
    for (k, v) in &fields.0 {
        match k.as_str() {
            "previous_response_id" => {}
            "input" => {
                put(&mut out, k, &input);
                wrote_input = true;
            }
            _ => put(&mut out, k, v.get()),
        }
    }
    if !wrote_input {
        put(&mut out, "input", &input);
    }
    out.push(b'}');
    Some(out)
}

/// A JSON object's members in their order, values as raw text.
struct Fields(Vec<(String, Box<RawValue>)>);

impl Fields {
    fn parse(body: &[u8]) -> Option<Fields> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let f = de.deserialize_map(FieldsVisitor).ok()?;
        de.end().ok()?;
        Some(f)
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut v = Vec::new();
        while let Some((k, val)) = map.next_entry::<String, Box<RawValue>>()? {
            v.push((k, val));
        }
        Ok(Fields(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn link(body: Value, output: Value) -> Arc<Link> {
        let items = kept_items(&output.to_string()).unwrap();
        let body = body.to_string();
        let facts = crate::facts::read(body.as_bytes()).unwrap();
        Arc::new(Link::from_facts(body.as_bytes(), &facts, items).unwrap())
    }

    #[test]
    fn rebuilds_item_by_item() {
        let l1 = link(
            json!({"model":"m","input":"hi"}),
            json!([
                {"type":"reasoning","id":"rs_1","summary":[]},
                {"type":"message","id":"msg_1","role":"assistant","content":[{"type":"output_text","text":"hello"}]}
            ]),
        );
        let l2 = link(
            json!({"model":"m","previous_response_id":"resp_1","input":[{"role":"user","content":"weather?"}]}),
            json!([{"type":"function_call","id":"fc_1","call_id":"call_1","name":"w","arguments":"{}"}]),
        );
        assert_eq!(l2.previous.as_deref(), Some("resp_1"));
        let body = br#"{"model":"m","previous_response_id":"resp_2","input":[{"type":"function_call_output","call_id":"call_1","output":"sunny"}],"store":true}"#;
        let out = rebuild_body(body, &[l1, l2]).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            json!({
                "model":"m",
                "store":true,
                "input":[
                    {"role":"user","content":"hi"},
                    {"type":"message","role":"assistant","content":[{"type":"output_text","text":"hello"}]},
                    {"role":"user","content":"weather?"},
                    {"type":"function_call","call_id":"call_1","name":"w","arguments":"{}"},
                    {"type":"function_call_output","call_id":"call_1","output":"sunny"}
                ]
            })
        );
        // Fields other than input keep their place and bytes.
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(r#"{"model":"m","input":["#), "{text}");
        assert!(text.ends_with(r#","store":true}"#), "{text}");
    }

    #[test]
    fn a_string_input_is_one_user_message() {
        let out = rebuild_body(br#"{"input":"next","previous_response_id":"r"}"#, &[]).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, json!({"input":[{"role":"user","content":"next"}]}));
    }

    #[test]
    fn unreadable_parts_are_not_rebuilt() {
        assert!(Link::from_record(r#"{"input":"cut…[truncated]"#, "[]".into()).is_none());
        assert!(Link::from_record(r#"{"input":"x"}"#, "[{".into()).is_none());
        assert!(rebuild_body(b"[1]", &[]).is_none());
    }
}
