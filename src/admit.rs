//! What a request must be before anything is sent upstream (SPEC 4d): a JSON body the gateway
//! can read, a path without dot segments, not a loop through chained gateways, and — for what is
//! refused — a bounded number of records.
//!
//! Each rule exists because the looser one let a client past a filter: a duplicate `"model"` key
//! made the meta reader give up, so `allow`/`deny` and `model_map` never saw the model that a
//! last-key-wins upstream then served; `/v1/%2e%2e/x` reached the upstream with the operator's key.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use actix_web::http::header::HeaderMap;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

/// What the gateway reads from a JSON body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BodyMeta {
    /// Top-level `model`, when a string.
    pub model: Option<String>,
    /// Top-level `"stream": true`.
    pub stream: bool,
    /// Whether the body is a JSON object (so `model` can be rewritten in it).
    pub json: bool,
}

/// Why a body was refused; the text goes to the client in a 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reads the meta of a request body. A body whose first non-whitespace bytes are a UTF-8 BOM or
/// `{` is JSON whatever its content type, and must be one JSON object without a BOM and without
/// a duplicate top-level key; any other body (multipart, plain text, empty) has no meta.
pub fn body_meta(body: &[u8]) -> Result<BodyMeta, Refused> {
    let start = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(body.len());
    let rest = &body[start..];
    if rest.starts_with(BOM) {
        return Err(Refused(
            "the JSON body starts with a byte order mark; send plain UTF-8 JSON".into(),
        ));
    }
    if rest.first() != Some(&b'{') {
        return Ok(BodyMeta::default());
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let meta = TopLevel
        .deserialize(&mut de)
        .and_then(|m| de.end().map(|()| m))
        .map_err(|e| Refused(format!("the request body is not valid JSON: {e}")))?;
    Ok(meta)
}

/// Deserializes the top-level object, checking keys for duplicates.
struct TopLevel;

impl<'de> DeserializeSeed<'de> for TopLevel {
    type Value = BodyMeta;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<BodyMeta, D::Error> {
        d.deserialize_map(self)
    }
}

/// A key, borrowed from the body unless it had escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The value of `model`: a string, or null (no model); anything else cannot be filtered.
struct ModelValue;

impl<'de> DeserializeSeed<'de> for ModelValue {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Option<String>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`model` as a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<String>, E> {
                Ok(Some(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Option<String>, E> {
                Ok(None)
            }
        }
        d.deserialize_any(V)
    }
}

/// The value of `stream`: only the JSON literal `true` makes a stream request.
struct StreamValue;

impl<'de> DeserializeSeed<'de> for StreamValue {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        let v: serde_json::Value = serde::Deserialize::deserialize(d)?;
        Ok(v == serde_json::Value::Bool(true))
    }
}

/// Key sets up to this size are checked by a linear scan; larger ones by a hash set, so a body
/// of a million keys costs no quadratic time.
const LINEAR_KEYS: usize = 16;

impl<'de> Visitor<'de> for TopLevel {
    type Value = BodyMeta;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BodyMeta, A::Error> {
        let mut meta = BodyMeta {
            json: true,
            ..BodyMeta::default()
        };
        let mut few: Vec<Cow<'de, str>> = Vec::new();
        let mut many: Option<HashSet<Cow<'de, str>>> = None;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let dup = match &mut many {
                Some(set) => !set.insert(key.clone()),
                None => {
                    let dup = few.contains(&key);
                    few.push(key.clone());
                    if few.len() > LINEAR_KEYS {
                        many = Some(few.drain(..).collect());
                    }
                    dup
                }
            };
            if dup {
                return Err(de::Error::custom(format_args!(
                    "duplicate key {:?}",
                    crate::escape::untrusted(&key)
                )));
            }
            match key.as_ref() {
                "model" => meta.model = map.next_value_seed(ModelValue)?,
                "stream" => meta.stream = map.next_value_seed(StreamValue)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(meta)
    }
}

/// Whether a request path (as received, percent-encoded) has a `.` or `..` segment once decoded,
/// with `/` and `\` both counted as separators. Decoding is repeated (a few rounds) so that a
/// double-encoded `%252e%252e` cannot become `..` at a server that decodes again.
pub fn has_dot_segment(path: &str) -> bool {
    let mut current: Cow<'_, [u8]> = Cow::Borrowed(path.as_bytes());
    for _ in 0..4 {
        if current
            .split(|b| *b == b'/' || *b == b'\\')
            .any(|seg| seg == b"." || seg == b"..")
        {
            return true;
        }
        match percent_decode(&current) {
            Some(next) => current = Cow::Owned(next),
            None => return false,
        }
    }
    false
}

/// One round of percent-decoding, or None when there is nothing to decode.
fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    if !s.contains(&b'%') {
        return None;
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    let mut changed = false;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                changed = true;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    changed.then_some(out)
}

/// The `Via` token this gateway adds to every upstream request.
pub const VIA: &str = "1.1 openai-api-route";

/// A request that already passed through this many gateways is a loop (answered 508).
pub const MAX_VIA_HOPS: usize = 5;

/// How many times [`VIA`] appears in the request's `Via` headers.
pub fn via_hops(headers: &HeaderMap) -> usize {
    headers
        .get_all("via")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter(|hop| hop.trim().eq_ignore_ascii_case(VIA))
        .count()
}

/// Why the gateway answered a request itself; the `reason` label of
/// `openai_api_route_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// 401.
    Auth,
    /// 400.
    BadRequest,
    /// 404.
    NotFound,
    /// 405.
    Method,
    /// 408.
    Timeout,
    /// 413.
    TooLarge,
    /// 431.
    Headers,
    /// 508.
    Loop,
}

impl Rejection {
    /// Every reason, for registering the series up front.
    pub const ALL: [Rejection; 8] = [
        Rejection::Auth,
        Rejection::BadRequest,
        Rejection::NotFound,
        Rejection::Method,
        Rejection::Timeout,
        Rejection::TooLarge,
        Rejection::Headers,
        Rejection::Loop,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Auth => "auth",
            Rejection::BadRequest => "bad_request",
            Rejection::NotFound => "not_found",
            Rejection::Method => "method",
            Rejection::Timeout => "timeout",
            Rejection::TooLarge => "too_large",
            Rejection::Headers => "headers",
            Rejection::Loop => "loop",
        }
    }
}

/// Records of rejected requests allowed per second, in total.
pub const REJECTED_RECORDS_PER_SECOND: u32 = 10;

/// Lets at most [`REJECTED_RECORDS_PER_SECOND`] rejected requests a second be recorded, so an
/// unauthenticated flood cannot fill the disk or crowd real clients' records out of the queue.
/// One atomic word: the second in the high bits, the count in the low 32.
#[derive(Debug, Default)]
pub struct RejectGate(AtomicU64);

impl RejectGate {
    /// Whether one more rejected request may be recorded in second `now_sec`.
    pub fn admit(&self, now_sec: u64) -> bool {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let (sec, n) = (cur >> 32, (cur & 0xffff_ffff) as u32);
            let next = if sec == now_sec & 0xffff_ffff {
                if n >= REJECTED_RECORDS_PER_SECOND {
                    return false;
                }
                cur + 1
            } else {
                ((now_sec & 0xffff_ffff) << 32) | 1
            };
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }
}

/// `s` cut to at most `max` bytes on a char boundary (record columns `path`, `user_agent`).
pub fn cut_to(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(s: &str) -> Result<BodyMeta, Refused> {
        body_meta(s.as_bytes())
    }

    #[test]
    fn json_bodies_are_read_or_refused() {
        let m = meta(r#" {"model":"gpt-4o","stream":true,"messages":[]}"#).unwrap();
        assert_eq!(m.model.as_deref(), Some("gpt-4o"));
        assert!(m.stream && m.json);
        assert!(!meta(r#"{"stream":"true"}"#).unwrap().stream);
        assert_eq!(meta(r#"{"model":null}"#).unwrap().model, None);
        for bad in [
            r#"{"model":"gpt-3.5","model":"gpt-4o"}"#,
            r#"{"stream":false,"stream":true}"#,
            r#"{"model":"a","x":1,"x":2}"#,
            r#"{"mod\u0065l":"a","model":"b"}"#,
            "\u{feff}{\"model\":\"gpt-4o\"}",
            " \u{feff}{}",
            r#"{"model":"a",}"#,
            r#"{"model":"a"} trailing"#,
            r#"{"model":5}"#,
            r#"{"model":"a""#,
            "{",
        ] {
            assert!(meta(bad).is_err(), "{bad:?} was accepted");
        }
        // Deep nesting in a member the gateway skips costs no stack (serde_json skips it
        // iteratively): read, not refused, and no crash.
        let deep = format!(
            "{{\"a\":{}{},\"model\":\"m\"}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(meta(&deep).unwrap().model.as_deref(), Some("m"));
        let unclosed = format!("{{\"a\":{}", "[".repeat(100_000));
        assert!(meta(&unclosed).is_err());
        let many: String = (0..1000).map(|i| format!("\"k{i}\":{i},")).collect();
        assert!(meta(&format!("{{{many}\"model\":\"m\"}}")).is_ok());
        assert!(meta(&format!("{{{many}\"k999\":0}}")).is_err());
        assert_eq!(meta("hello").unwrap(), BodyMeta::default());
        assert_eq!(meta("").unwrap(), BodyMeta::default());
        assert_eq!(meta("[1]").unwrap(), BodyMeta::default());
    }

    #[test]
    fn dot_segments() {
        for bad in [
            "/v1/../admin",
            "/v1/./x",
            "/v1/%2e%2e/x",
            "/v1/%2E%2e/x",
            "/v1/.%2e/x",
            "/v1/x%2f..%2fy",
            "/v1/x%5c..%5cy",
            "/v1/x\\..\\y",
            "/v1/%252e%252e/x",
            "/v1/..",
        ] {
            assert!(has_dot_segment(bad), "{bad}");
        }
        for ok in [
            "/v1/chat/completions",
            "/v1/files/file-abc.jsonl",
            "/v1/models/meta-llama/Llama-3.1-8B",
            "/v1/x/...",
            "/v1/%2",
            "/v1/a%",
        ] {
            assert!(!has_dot_segment(ok), "{ok}");
        }
    }

    #[test]
    fn reject_gate_allows_ten_a_second() {
        let g = RejectGate::default();
        assert_eq!((0..100).filter(|_| g.admit(7)).count(), 10);
        assert_eq!((0..100).filter(|_| g.admit(8)).count(), 10);
        assert!(!g.admit(8));
    }

    #[test]
    fn via_counting() {
        let mut h = HeaderMap::new();
        h.append(
            actix_web::http::header::VIA,
            actix_web::http::header::HeaderValue::from_static(
                "1.1 openai-api-route, 1.1 other, 1.1 openai-api-route",
            ),
        );
        h.append(
            actix_web::http::header::VIA,
            actix_web::http::header::HeaderValue::from_static("1.1 openai-api-route"),
        );
        assert_eq!(via_hops(&h), 3);
    }
}
