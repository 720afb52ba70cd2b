//! The HTTP proxy's own admission steps, after the common ones every route takes
//! ([`crate::admission::admit`]: auth, paths, loop guard): one bounded read of the body, and
//! (SPEC 4d) a JSON body the gateway can read; plus the local CORS preflight, which needs none
//! of that.
//!
//! Each rule exists because the looser one let a client past a filter: a duplicate `"model"` key
//! made the meta reader give up, so `allow`/`deny` and `model_map` never saw the model that a
//! last-key-wins upstream then served; a UTF-16 body passed `deny` and a Python upstream decoded
//! it anyway.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use std::ops::Range;
use std::sync::Arc;

use actix_web::http::header::{self, HeaderValue};
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{HttpRequest, HttpResponse};
use futures_util::StreamExt;

pub use crate::config::token_label;
use crate::error::GatewayError;
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

/// Whether a `Content-Type` names JSON (`application/json`, `text/json`, `…+json`), or is absent.
fn json_or_absent(content_type: Option<&HeaderValue>) -> bool {
    let Some(v) = content_type else {
        return true;
    };
    let Ok(text) = v.to_str() else {
        return false;
    };
    let essence = text.split(';').next().unwrap_or("").trim();
    let subtype = essence.rsplit('/').next().unwrap_or("");
    subtype.eq_ignore_ascii_case("json")
        || subtype.len() > 5 && subtype[subtype.len() - 5..].eq_ignore_ascii_case("+json")
}

/// JSON between systems is UTF-8 (RFC 8259 §8.1). A body that is JSON by its `Content-Type`
/// (or has none) and whose first four bytes hold a NUL or a UTF-16/UTF-32 byte order mark is
/// JSON in another encoding: the meta reader cannot see its `model`, while a Python upstream
/// (`json.loads` detects the encoding) reads it — a way past `deny` and `model_map` (SPEC 4d).
pub fn not_utf8_json(content_type: Option<&HeaderValue>, body: &[u8]) -> Option<Refused> {
    let head = &body[..body.len().min(4)];
    let wide = head.contains(&0) || head.starts_with(b"\xFF\xFE") || head.starts_with(b"\xFE\xFF");
    (wide && json_or_absent(content_type)).then(|| {
        Refused(
            "the JSON body is not UTF-8 (UTF-16 or UTF-32, or a NUL byte); send UTF-8 JSON".into(),
        )
    })
}

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
    fn json_in_another_encoding_is_refused() {
        let json = HeaderValue::from_static("application/json; charset=utf-16");
        let problem = HeaderValue::from_static("application/problem+json");
        let text = HeaderValue::from_static("text/plain");
        let utf16le: Vec<u8> = "{\"model\":\"m\"}"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        let utf16be: Vec<u8> = "{}".encode_utf16().flat_map(u16::to_be_bytes).collect();
        for body in [
            &utf16le[..],
            &utf16be[..],
            b"\xFF\xFE{\x00}\x00",
            b"\xFE\xFF\x00{\x00}",
            b"\xFF\xFE\x00\x00{\x00\x00\x00",
            b"\x00\x00\xFE\xFF\x00\x00\x00{",
            b"{\x00",
        ] {
            assert!(not_utf8_json(None, body).is_some(), "{body:?}");
            assert!(not_utf8_json(Some(&json), body).is_some(), "{body:?}");
            assert!(not_utf8_json(Some(&problem), body).is_some(), "{body:?}");
            assert!(not_utf8_json(Some(&text), body).is_none(), "{body:?}");
        }
        assert!(not_utf8_json(None, b"{\"model\":\"m\\u0000\"}").is_none());
        assert!(not_utf8_json(None, b"").is_none());
        assert!(not_utf8_json(None, b"{}").is_none());
        let multipart = HeaderValue::from_static("multipart/form-data; boundary=x");
        assert!(not_utf8_json(Some(&multipart), b"\x00\x00").is_none());
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
