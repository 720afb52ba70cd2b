//! Reading a request body before its one parse: bounded in size (`max_body_bytes`), in an encoding
//! the gateway can read, and JSON in UTF-8 (see the security guide, "JSON is UTF-8"); plus the
//! local CORS preflight, which needs none of it.
//!
//! Each rule exists because the looser one let a client past a filter: a UTF-16 body passed
//! `deny` and a Python upstream decoded it anyway; a compressed body hid its model.

use actix_web::http::header::{self, HeaderValue};
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{HttpRequest, HttpResponse};
use futures_util::StreamExt;

use crate::error::GatewayError;
use crate::facts::Unreadable;

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
/// (`json.loads` detects the encoding) reads it — a way past `deny` and `model_map` (see the
/// security guide, "JSON is UTF-8").
pub fn not_utf8_json(content_type: Option<&HeaderValue>, body: &[u8]) -> Option<Unreadable> {
    let head = &body[..body.len().min(4)];
    let wide = head.contains(&0) || head.starts_with(b"\xFF\xFE") || head.starts_with(b"\xFE\xFF");
    (wide && json_or_absent(content_type)).then(|| {
        Unreadable(
            "the JSON body is not UTF-8 (UTF-16 or UTF-32, or a NUL byte); send UTF-8 JSON".into(),
        )
    })
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
/// and a body it cannot read could carry a model past `allow`/`deny` (see the security guide).
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
        .insert_header(("x-request-id", crate::ledger::new_request_id()))
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
}
