//! Admission: what a request must be before anything is sent upstream. The client's token
//! (SPEC §4 auth), its address, one bounded read of the body, and (SPEC 4d) a JSON body the
//! gateway can read, a path without dot segments, not a loop through chained gateways; plus the
//! local CORS preflight, which needs none of that.
//!
//! Each rule exists because the looser one let a client past a filter: a duplicate `"model"` key
//! made the meta reader give up, so `allow`/`deny` and `model_map` never saw the model that a
//! last-key-wins upstream then served; `/v1/%2e%2e/x` reached the upstream with the operator's key.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use actix_web::http::header::{self, HeaderMap};
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{HttpRequest, HttpResponse};
use futures_util::StreamExt;

pub use crate::config::token_label;
use crate::config::Config;
use crate::error::GatewayError;
use crate::headers::VIA;
use crate::ledger::RequestInfo;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

/// What the gateway reads from a JSON body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BodyMeta {
    /// Top-level `model`, when a string (shared: see [`shared_model`]).
    pub model: Option<Arc<str>>,
    /// Top-level `"stream": true`.
    pub stream: bool,
    /// Whether the body is a JSON object (so `model` can be rewritten in it).
    pub json: bool,
    /// Where the top-level `stream_options` value sits in the body (SPEC 4b `force_usage`
    /// edits it without parsing the body again).
    pub stream_options: Option<Range<usize>>,
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
    let top = TopLevel {
        base: body.as_ptr() as usize,
    };
    let meta = top
        .deserialize(&mut de)
        .and_then(|m| de.end().map(|()| m))
        .map_err(|e| Refused(format!("the request body is not valid JSON: {e}")))?;
    Ok(meta)
}

/// Deserializes the top-level object, checking keys for duplicates.
struct TopLevel {
    /// Address of the body's first byte: raw values borrowed from the body are located by it.
    base: usize,
}

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
    type Value = Option<Arc<str>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Arc<str>>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Option<Arc<str>>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`model` as a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<Arc<str>>, E> {
                Ok(Some(shared_model(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Option<Arc<str>>, E> {
                Ok(None)
            }
        }
        d.deserialize_any(V)
    }
}

/// Model names a worker keeps to share: a gateway sees a handful of models, asked for again and
/// again. Bounded: a client sending a new name every time only empties it.
const SHARED_MODELS: usize = 64;
/// Longer names are not kept (they are copied per request, as any other name would be).
const SHARED_MODEL_BYTES: usize = 128;

thread_local! {
    static MODELS: std::cell::RefCell<Vec<Arc<str>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `name` as a shared string: the worker's copy when it has one (a reference count instead of an
/// allocation per request).
pub fn shared_model(name: &str) -> Arc<str> {
    if name.len() > SHARED_MODEL_BYTES {
        return name.into();
    }
    MODELS.with(|cell| {
        let mut known = cell.borrow_mut();
        if let Some(m) = known.iter().find(|m| &***m == name) {
            return m.clone();
        }
        if known.len() >= SHARED_MODELS {
            known.clear();
        }
        let m: Arc<str> = name.into();
        known.push(m.clone());
        m
    })
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
        // The first keys live on the stack (a `Vec` here was one allocation per request).
        let mut few: [Cow<'de, str>; LINEAR_KEYS] = Default::default();
        let mut n = 0;
        let mut many: Option<HashSet<Cow<'de, str>>> = None;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let dup = match &mut many {
                Some(set) => !set.insert(key.clone()),
                None => {
                    let dup = few[..n].contains(&key);
                    if n < LINEAR_KEYS {
                        few[n] = key.clone();
                        n += 1;
                    } else {
                        let mut set: HashSet<Cow<'de, str>> =
                            few.iter_mut().map(std::mem::take).collect();
                        set.insert(key.clone());
                        many = Some(set);
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
                "stream_options" => {
                    let raw: &'de serde_json::value::RawValue = map.next_value()?;
                    let at = (raw.get().as_ptr() as usize).wrapping_sub(self.base);
                    meta.stream_options = Some(at..at + raw.get().len());
                }
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
pub(crate) fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
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

/// What is known about a request before its body is read: its record's first columns. Every
/// field shares what the request already holds (the URI's and the header's bytes, the method);
/// nothing is copied or formatted here: the record's writer does that, off the request path.
pub fn request_info(req: &HttpRequest, cfg: &Config) -> RequestInfo {
    // A header lookup when the client sends none; parsed strictly when it does (SPEC 6a).
    let (trace_parent, tracestate) = crate::trace::context::incoming(req.headers());
    RequestInfo {
        created_at: SystemTime::now(),
        started: Instant::now(),
        ip: client_ip(req, cfg),
        method: req.method().clone(),
        uri: req.uri().clone(),
        model: None,
        stream: false,
        stream_options: None,
        body: Bytes::new(),
        user_agent: req.headers().get(header::USER_AGENT).cloned(),
        client_key: None,
        body_limit: cfg.record_body_bytes,
        websocket: false,
        trace_parent,
        tracestate,
    }
}

/// Constant-time comparison; only the lengths leak, which tokens do not keep secret anyway.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// The bearer token of a request, trimmed.
fn bearer(req: &HttpRequest) -> Option<&str> {
    let v = req
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let token = if v.len() >= 7 && v[..7].eq_ignore_ascii_case("bearer ") {
        &v[7..]
    } else {
        v
    };
    Some(token.trim())
}

/// Checks the client token; returns its label (the config's own, shared, for a configured token).
pub fn authorize(req: &HttpRequest, cfg: &Config) -> Result<Option<Arc<str>>, GatewayError> {
    let token = bearer(req).filter(|t| !t.is_empty());
    if cfg.noauth {
        return Ok(token.map(|t| token_label(t).into()));
    }
    let Some(token) = token else {
        return Err(GatewayError::Unauthorized(
            "missing API key: send `Authorization: Bearer <token>`",
        ));
    };
    // Every configured token is compared, whichever matches.
    let mut found = None;
    for (i, t) in cfg.tokens.iter().enumerate() {
        if ct_eq(t.as_bytes(), token.as_bytes()) {
            found = Some(i);
        }
    }
    match found {
        Some(i) => Ok(Some(match cfg.token_labels.get(i) {
            Some(label) => label.clone(),
            None => token_label(token).into(),
        })),
        None => Err(GatewayError::Unauthorized("incorrect API key provided")),
    }
}

/// The client address: the peer, unless the peer is a trusted proxy that says otherwise.
pub fn client_ip(req: &HttpRequest, cfg: &Config) -> Option<IpAddr> {
    let peer = req.peer_addr()?.ip();
    if !cfg.is_trusted_proxy(peer) {
        return Some(peer);
    }
    // Walk X-Forwarded-For from the right: the first hop that is not a trusted proxy is the client.
    let xff: Vec<IpAddr> = req
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    if let Some(ip) = xff
        .iter()
        .rev()
        .find(|ip| !cfg.is_trusted_proxy(**ip))
        .or(xff.first())
    {
        return Some(*ip);
    }
    Some(
        req.headers()
            .get("x-real-ip")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<IpAddr>().ok())
            .unwrap_or(peer),
    )
}

/// Reads the whole body, up to `limit` bytes.
pub async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(GatewayError::BodyTooLarge(limit));
    }
    // The common case is one chunk: keep it without copying.
    let mut first: Option<Bytes> = None;
    let mut buf: Option<BytesMut> = None;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| GatewayError::BadBody(e.to_string()))?;
        let have = buf
            .as_ref()
            .map(|b| b.len())
            .or(first.as_ref().map(|b| b.len()))
            .unwrap_or(0);
        if have + chunk.len() > limit {
            return Err(GatewayError::BodyTooLarge(limit));
        }
        match (&mut buf, &first) {
            (Some(b), _) => b.extend_from_slice(&chunk),
            (None, Some(f)) => {
                let mut b =
                    BytesMut::with_capacity(declared.unwrap_or(0).max(f.len() + chunk.len()));
                b.extend_from_slice(f);
                b.extend_from_slice(&chunk);
                buf = Some(b);
            }
            (None, None) => first = Some(chunk),
        }
    }
    Ok(match buf {
        Some(b) => b.freeze(),
        None => first.unwrap_or_default(),
    })
}

/// The request's `Content-Encoding`, unless absent or `identity`: the gateway reads no other,
/// and a body it cannot read could carry a model past `allow`/`deny` (SPEC 4d).
pub fn unreadable_encoding(req: &HttpRequest) -> Option<&str> {
    let mut found = None;
    for v in req.headers().get_all(header::CONTENT_ENCODING) {
        let Ok(text) = v.to_str() else {
            return Some("(not text)");
        };
        for enc in text.split(',').map(str::trim) {
            if !enc.is_empty() && !enc.eq_ignore_ascii_case("identity") {
                found = Some(enc);
            }
        }
    }
    found
}

/// Local CORS preflight for `OPTIONS /v1/*` (no auth, nothing proxied).
pub async fn preflight(req: HttpRequest) -> HttpResponse {
    let allow_headers = req
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
        .map(|v| format!("Authorization, Content-Type, {v}"))
        .unwrap_or_else(|| {
            "Authorization, Content-Type, OpenAI-Beta, OpenAI-Organization, OpenAI-Project"
                .to_string()
        });
    HttpResponse::NoContent()
        .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
        .insert_header((
            header::ACCESS_CONTROL_ALLOW_METHODS,
            "GET, POST, PUT, PATCH, DELETE, OPTIONS",
        ))
        .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, allow_headers))
        .insert_header((header::ACCESS_CONTROL_MAX_AGE, "86400"))
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_are_shared_within_a_worker_and_bounded() {
        let a = super::shared_model("gpt-4o-mini");
        let b = super::shared_model("gpt-4o-mini");
        assert!(std::sync::Arc::ptr_eq(&a, &b));
        assert_eq!(&*a, "gpt-4o-mini");
        let long = "m".repeat(super::SHARED_MODEL_BYTES + 1);
        let (x, y) = (super::shared_model(&long), super::shared_model(&long));
        assert!(!std::sync::Arc::ptr_eq(&x, &y));
        assert_eq!(*x, *long);
        // A stream of new names empties the cache rather than growing it; names stay right.
        for i in 0..3 * super::SHARED_MODELS {
            assert_eq!(&*super::shared_model(&format!("m{i}")), format!("m{i}"));
        }
        super::MODELS.with(|m| assert!(m.borrow().len() <= super::SHARED_MODELS));
        assert_eq!(&*super::shared_model("gpt-4o-mini"), "gpt-4o-mini");
    }

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
        // Around the switch from the stack array to the hash set.
        for n in 14..=18 {
            let keys: String = (0..n).map(|i| format!("\"k{i}\":{i},")).collect();
            assert!(meta(&format!("{{{keys}\"model\":\"m\"}}")).is_ok(), "{n}");
            assert!(meta(&format!("{{{keys}\"k0\":0}}")).is_err(), "{n}");
            assert!(meta(&format!("{{{keys}\"k{}\":0}}", n - 1)).is_err(), "{n}");
        }
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

#[cfg(test)]
mod token_tests {
    use super::token_label;

    /// The label as first written: collect the characters, then pick.
    fn reference(token: &str) -> String {
        let chars: Vec<char> = token.chars().collect();
        let n = chars.len();
        if n >= 16 {
            let head: String = chars[..3].iter().collect();
            let tail: String = chars[n - 4..].iter().collect();
            format!("{head}…{tail}")
        } else if n >= 8 {
            let tail: String = chars[n - 2..].iter().collect();
            format!("…{tail}")
        } else {
            "…".to_string()
        }
    }

    #[test]
    fn token_labels() {
        assert_eq!(token_label("sk-bench-client-token"), "sk-…oken");
        assert_eq!(token_label("abcdefgh"), "…gh");
        assert_eq!(token_label("short"), "…");
        assert_eq!(token_label(""), "…");
        for t in [
            "ключ-очень-длинный-токен",
            "é1234567890123456789ü",
            "日本語のトークンです。長いもの",
            "日本語のトーク",
            "日本語のトークンです",
            "🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑",
            "sk-1234567890abcdef",
            "exactly8",
            "fifteen-chars!!",
            "sixteen-chars!!!",
        ] {
            assert_eq!(token_label(t), reference(t), "{t}");
        }
    }
}
