//! One upstream attempt: the URL and headers, the send, the response head and (for streams) the
//! first chunk, each failure typed. Whether an answer is a failure at all is decided in
//! [`crate::attempt`]; what to do about it, in the loop of [`super::proxy`].

use std::time::Duration;

use actix_web::http::header;
use actix_web::http::Method;
use actix_web::web::Bytes;
use actix_web::HttpRequest;
use awc::error::SendRequestError;
use futures_util::StreamExt;

use crate::attempt::{is_failover_status, FailKind};
use crate::config::{Upstream, LONG_PROMPT_BYTES, LONG_PROMPT_MIN_WAIT};
use crate::headers;

/// How long an attempt may take to produce its head (and first chunk, for streams).
pub fn first_byte_wait(up: &Upstream, stream: bool, last: bool, body_len: usize) -> Duration {
    let mut wait = if stream && !last {
        up.stream_timeout
    } else if stream {
        // Nothing to fail over to: waiting longer can only help.
        up.timeout.max(up.stream_timeout)
    } else {
        up.timeout
    };
    if body_len > LONG_PROMPT_BYTES {
        wait = wait.max(LONG_PROMPT_MIN_WAIT);
    }
    wait
}

/// The body with its top-level `model` replaced; every other member is kept byte for byte.
pub fn rewrite_model(body: &[u8], model: &str) -> Option<Bytes> {
    use serde_json::value::RawValue;
    let members: Vec<(String, &RawValue)> = {
        let raw: std::collections::BTreeMap<String, &RawValue> =
            serde_json::from_slice(body).ok()?;
        // Keep the original member order: find each key's position in the text.
        let mut v: Vec<(String, &RawValue)> = raw.into_iter().collect();
        let text = std::str::from_utf8(body).ok()?;
        v.sort_by_key(|(_, raw)| raw.get().as_ptr() as usize - text.as_ptr() as usize);
        v
    };
    let mut out = String::with_capacity(body.len() + model.len());
    out.push('{');
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(k).ok()?);
        out.push(':');
        if k == "model" {
            out.push_str(&serde_json::to_string(model).ok()?);
        } else {
            out.push_str(v.get());
        }
    }
    out.push('}');
    Some(Bytes::from(out))
}

/// Why an attempt failed before an answer could be committed.
pub type AttemptError = (FailKind, String);

/// Names what went wrong with a send, as an attempt failure.
pub fn classify(e: SendRequestError) -> AttemptError {
    match e {
        SendRequestError::Connect(c) => (FailKind::Connect, format!("connect failed: {c}")),
        SendRequestError::Timeout => (FailKind::Timeout, "timed out".into()),
        other => (
            FailKind::Connect,
            format!("connection closed before a complete response head: {other}"),
        ),
    }
}

/// The upstream's response, head read.
pub type Upstreamed = awc::ClientResponse;

/// One attempt: send, wait for the head, and for streams the first chunk too.
pub async fn attempt(
    client: &awc::Client,
    up: &Upstream,
    req: &HttpRequest,
    body: Bytes,
    stream: bool,
) -> Result<(Upstreamed, Option<Bytes>), AttemptError> {
    let mut url = String::with_capacity(up.base.len() + req.uri().path().len() + 32);
    url.push_str(&up.base);
    let path = req.uri().path();
    url.push_str(path.strip_prefix("/v1").unwrap_or(path));
    if let Some(q) = req.uri().query() {
        url.push('?');
        url.push_str(q);
    }
    let mut creq = client.request(req.method().clone(), url.as_str());
    headers::upstream_request_headers(req.headers(), &up.auth, creq.headers_mut());
    let mut resp = if body.is_empty()
        && matches!(*req.method(), Method::GET | Method::HEAD | Method::DELETE)
    {
        creq.send().await
    } else {
        creq.send_body(body).await
    }
    .map_err(classify)?;
    if resp.headers().contains_key(header::TRANSFER_ENCODING)
        && resp.headers().contains_key(header::CONTENT_LENGTH)
    {
        // Two framings in one head: which one ends the body is ambiguous (SPEC 4d).
        return Err((
            FailKind::Connect,
            "response head has both Transfer-Encoding and Content-Length".into(),
        ));
    }
    if !stream || is_failover_status(resp.status()) {
        return Ok((resp, None));
    }
    match resp.next().await {
        Some(Ok(chunk)) => Ok((resp, Some(chunk))),
        None => {
            // An ended awc payload panics if polled again: the relay gets an empty one.
            use actix_web::HttpMessage;
            drop(resp.take_payload());
            Ok((resp, None))
        }
        Some(Err(e)) => Err((
            FailKind::Stream,
            format!("stream broke before its first chunk: {e}"),
        )),
    }
}

/// A duration as the failure reasons show it: `5s`, `0.250s`.
pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s:.3}s")
    }
}
