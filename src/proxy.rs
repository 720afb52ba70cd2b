//! The `/v1/*` handler (SPEC §4): auth, one read of the body, then each candidate in turn until
//! one answers, then a streamed relay of that answer.
//!
//! Failover is decided only before the first byte goes to the client: on the response head for
//! ordinary requests, on the head *and* first body chunk for stream requests. After that the
//! [`crate::relay::RelayBody`] owns the response and its record.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{HttpRequest, HttpResponse};
use awc::error::SendRequestError;
use futures_util::StreamExt;
use serde::Deserialize;

use crate::capture::Capture;
use crate::config::{Config, Upstream, LONG_PROMPT_BYTES, LONG_PROMPT_MIN_WAIT};
use crate::error::GatewayError;
use crate::headers;
use crate::notify::RequestFailed;
use crate::records::Record;
use crate::registry::{AttemptResult, FailKind, RegistryView};
use crate::relay::{Finish, RelayBody};
use crate::state::AppState;

/// One awc client per worker (awc's `Client` is `!Send`), built in the app factory.
pub struct UpstreamClient(pub awc::Client);

/// What is known about a request before any upstream is tried; becomes its record.
pub struct RequestInfo {
    /// Wall-clock start.
    pub created_at: SystemTime,
    /// Monotonic start.
    pub started: Instant,
    /// Client address.
    pub ip: String,
    /// Method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// `model` from the body.
    pub model: Option<String>,
    /// `"stream": true`.
    pub stream: bool,
    /// The body as received.
    pub body: Bytes,
    /// Client User-Agent.
    pub user_agent: Option<String>,
    /// Non-secret token label.
    pub client_key: Option<String>,
    /// `record_body_bytes`.
    pub body_limit: usize,
}

impl RequestInfo {
    /// Builds the record once the outcome is known.
    #[allow(clippy::too_many_arguments)]
    pub fn into_record(
        self,
        status: u16,
        upstream: Option<String>,
        attempts: u32,
        error: Option<String>,
        response: Option<String>,
        usage: crate::capture::Usage,
        ttfb: Option<Duration>,
    ) -> Record {
        Record {
            created_at: self.created_at,
            ip: self.ip,
            method: self.method,
            path: self.path,
            model: self.model,
            stream: self.stream,
            upstream,
            status,
            attempts,
            error,
            request_body: self.body,
            response,
            prompt_tokens: usage.prompt,
            completion_tokens: usage.completion,
            total_tokens: usage.total,
            ttfb_ms: ttfb.map(|d| d.as_millis() as u64),
            duration_ms: self.started.elapsed().as_millis() as u64,
            user_agent: self.user_agent,
            client_key: self.client_key,
            body_limit: self.body_limit,
        }
    }
}

/// Statuses after which the next upstream is tried (SPEC §4).
pub fn is_failover_status(s: StatusCode) -> bool {
    matches!(s.as_u16(), 401 | 403 | 404 | 408 | 409 | 429) || s.is_server_error()
}

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

#[derive(Deserialize)]
struct BodyMeta {
    #[serde(default)]
    model: Option<serde_json::Value>,
    #[serde(default)]
    stream: Option<serde_json::Value>,
}

/// `model` and whether `"stream": true`, from a JSON object body; anything else is neither.
pub fn body_meta(body: &[u8]) -> (Option<String>, bool) {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return (None, false);
    }
    match serde_json::from_slice::<BodyMeta>(body) {
        Ok(m) => (
            match m.model {
                Some(serde_json::Value::String(s)) => Some(s),
                _ => None,
            },
            matches!(m.stream, Some(serde_json::Value::Bool(true))),
        ),
        Err(_) => (None, false),
    }
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

/// A label that tells tokens apart without revealing them: `sk-…abcd` for long tokens, less for
/// short ones.
pub fn token_label(token: &str) -> String {
    // Char boundaries of the first 3 and the last 4 characters, without collecting all of them.
    let n = token.chars().count();
    let head_end = token.char_indices().nth(3).map_or(token.len(), |(i, _)| i);
    let tail = |k: usize| token.char_indices().rev().nth(k - 1).map_or(0, |(i, _)| i);
    if n >= 16 {
        format!("{}…{}", &token[..head_end], &token[tail(4)..])
    } else if n >= 8 {
        format!("…{}", &token[tail(2)..])
    } else {
        "…".to_string()
    }
}

/// Checks the client token; returns its label.
fn authorize(req: &HttpRequest, cfg: &Config) -> Result<Option<String>, GatewayError> {
    let token = bearer(req).filter(|t| !t.is_empty());
    if cfg.noauth {
        return Ok(token.map(token_label));
    }
    let Some(token) = token else {
        return Err(GatewayError::Unauthorized(
            "missing API key: send `Authorization: Bearer <token>`",
        ));
    };
    let mut ok = false;
    for t in &cfg.tokens {
        ok |= ct_eq(t.as_bytes(), token.as_bytes());
    }
    if ok {
        Ok(Some(token_label(token)))
    } else {
        Err(GatewayError::Unauthorized("incorrect API key provided"))
    }
}

/// The client address: the peer, unless the peer is a trusted proxy that says otherwise.
pub fn client_ip(req: &HttpRequest, cfg: &Config) -> String {
    let Some(peer) = req.peer_addr().map(|a| a.ip()) else {
        return String::new();
    };
    if !cfg.is_trusted_proxy(peer) {
        return peer.to_string();
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
        return ip.to_string();
    }
    req.headers()
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<IpAddr>().ok())
        .unwrap_or(peer)
        .to_string()
}

async fn read_body(
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

/// Answers locally (auth, size, routing errors) and records it.
fn local_error(state: &AppState, info: RequestInfo, err: GatewayError) -> HttpResponse {
    let error = err.to_string();
    answer(state, info, &err, 0, error)
}

/// Sends a gateway-made error and records it: `attempts` upstreams were tried, `error` is the
/// record's summary.
fn answer(
    state: &AppState,
    info: RequestInfo,
    err: &GatewayError,
    attempts: usize,
    error: String,
) -> HttpResponse {
    let mut resp = err.response();
    if attempts > 0 {
        resp.headers_mut().insert(
            header::HeaderName::from_static("x-upstream-attempts"),
            HeaderValue::from(attempts),
        );
    }
    if let Some(rec) = &state.recorder {
        rec.submit(info.into_record(
            resp.status().as_u16(),
            None,
            attempts as u32,
            Some(error),
            Some(err.body()),
            Default::default(),
            None,
        ));
    }
    resp
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

/// Why an attempt failed before an answer could be committed.
type AttemptError = (FailKind, String);

fn classify(e: SendRequestError) -> AttemptError {
    match e {
        SendRequestError::Connect(c) => (FailKind::Connect, format!("connect failed: {c}")),
        SendRequestError::Timeout => (FailKind::Timeout, "timed out".into()),
        other => (
            FailKind::Connect,
            format!("connection closed before a complete response head: {other}"),
        ),
    }
}

type Upstreamed = awc::ClientResponse;

/// One attempt: send, wait for the head, and for streams the first chunk too.
async fn attempt(
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
    if !stream || is_failover_status(resp.status()) {
        return Ok((resp, None));
    }
    match resp.next().await {
        Some(Ok(chunk)) => Ok((resp, Some(chunk))),
        None => Ok((resp, None)),
        Some(Err(e)) => Err((
            FailKind::Stream,
            format!("stream broke before its first chunk: {e}"),
        )),
    }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s:.3}s")
    }
}

/// The catch-all `/v1/{tail}` handler.
pub async fn proxy(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    client: web::Data<UpstreamClient>,
) -> HttpResponse {
    let started = Instant::now();
    let created_at = SystemTime::now();
    let cfg = state.config.get();
    let mut info = RequestInfo {
        created_at,
        started,
        ip: client_ip(&req, &cfg),
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        model: None,
        stream: false,
        body: Bytes::new(),
        user_agent: req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        client_key: None,
        body_limit: cfg.record_body_bytes,
    };
    match authorize(&req, &cfg) {
        Ok(label) => info.client_key = label,
        Err(e) => return local_error(&state, info, e),
    }
    info.body = match read_body(&req, payload, cfg.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return local_error(&state, info, e),
    };
    let (model, stream) = body_meta(&info.body);
    info.model = model;
    info.stream = stream;

    let (view, order) = state.registry.candidates(info.model.as_deref());
    let cfg = view.config.clone();
    if order.is_empty() {
        let model = info.model.clone().unwrap_or_default();
        return local_error(&state, info, GatewayError::NoUpstreamForModel(model));
    }

    let n = order.len();
    let mut failures: Vec<String> = Vec::new();
    let mut last_kind = FailKind::Connect;
    for (pos, &idx) in order.iter().enumerate() {
        let up = &cfg.upstreams[idx];
        let last = pos + 1 == n;
        let wait = first_byte_wait(up, info.stream, last, info.body.len());
        let body = match info.model.as_deref().and_then(|m| up.mapped_model(m)) {
            Some(to) => rewrite_model(&info.body, to).unwrap_or_else(|| info.body.clone()),
            None => info.body.clone(),
        };
        let t0 = Instant::now();
        let outcome =
            actix_rt::time::timeout(wait, attempt(&client.0, up, &req, body, info.stream)).await;
        let (kind, reason) = match outcome {
            Ok(Ok((resp, first))) => {
                let status = resp.status();
                if !is_failover_status(status) || last {
                    let at = Attempted {
                        view: &view,
                        idx,
                        attempts: pos + 1,
                        t0,
                    };
                    return commit(&state, &cfg, info, up, resp, first, at, failures);
                }
                (FailKind::Http, format!("HTTP {status}"))
            }
            Ok(Err(failed)) => failed,
            Err(_) => (
                FailKind::Timeout,
                if info.stream {
                    format!("no first chunk within {}", secs(wait))
                } else {
                    format!("no response head within {}", secs(wait))
                },
            ),
        };
        log::warn!(
            "{} {}: upstream {} failed: {reason}",
            info.method,
            info.path,
            up.name
        );
        state.metrics.attempt(&up.name, kind.label());
        if !last {
            state.metrics.failover(&up.name);
        }
        state.registry.report_for(
            &view,
            idx,
            info.model.as_deref(),
            AttemptResult::Failed {
                kind,
                reason: reason.clone(),
            },
        );
        failures.push(format!("{}: {reason}", up.name));
        last_kind = kind;
    }

    // Every candidate failed without an HTTP answer to relay.
    let summary = failures.join("; ");
    let err = GatewayError::AllFailed {
        timed_out: last_kind == FailKind::Timeout,
        summary: summary.clone(),
    };
    alert_all_failed(&state, &info, err.status().as_u16(), &failures);
    answer(&state, info, &err, n, summary)
}

fn alert_all_failed(state: &AppState, info: &RequestInfo, status: u16, failures: &[String]) {
    if let Some(alerts) = &state.alerts {
        alerts.do_send(RequestFailed {
            at: SystemTime::now(),
            ip: info.ip.clone(),
            method: info.method.clone(),
            path: info.path.clone(),
            model: info.model.clone(),
            status,
            attempts: failures.to_vec(),
        });
    }
}

/// Which attempt is being committed: the view it came from and its place in it.
struct Attempted<'a> {
    view: &'a Arc<RegistryView>,
    idx: usize,
    attempts: usize,
    t0: Instant,
}

/// Sends the chosen upstream's answer to the client, streaming.
#[allow(clippy::too_many_arguments)]
fn commit(
    state: &web::Data<AppState>,
    cfg: &Config,
    info: RequestInfo,
    up: &Upstream,
    resp: Upstreamed,
    first: Option<Bytes>,
    at: Attempted<'_>,
    mut failures: Vec<String>,
) -> HttpResponse {
    let Attempted {
        view,
        idx,
        attempts,
        t0,
    } = at;
    let status = resp.status();
    let first_byte = t0.elapsed();
    let failed_anyway = is_failover_status(status);
    if failed_anyway {
        // The last candidate's error is the answer: relay it, but it is still a failure.
        let reason = format!("HTTP {status}");
        state.metrics.attempt(&up.name, FailKind::Http.label());
        state.registry.report_for(
            view,
            idx,
            info.model.as_deref(),
            AttemptResult::Failed {
                kind: FailKind::Http,
                reason: reason.clone(),
            },
        );
        failures.push(format!("{}: {reason}", up.name));
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            alert_all_failed(state, &info, status.as_u16(), &failures);
        }
    } else {
        state.metrics.first_byte(&up.name, first_byte.as_secs_f64());
        state
            .registry
            .report(view, idx, AttemptResult::Ok { first_byte });
    }

    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let sse = content_type.as_deref().is_some_and(|c| {
        c.trim_start()
            .to_ascii_lowercase()
            .starts_with("text/event-stream")
    });
    let length = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());

    let mut builder = HttpResponse::build(status);
    for (name, value) in headers::response_headers(resp.headers()) {
        builder.append_header((name.clone(), value.clone()));
    }
    builder.insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"));
    if let Ok(v) = HeaderValue::from_str(&up.name) {
        builder.insert_header(("x-upstream", v));
    }
    builder.insert_header(("x-upstream-attempts", attempts.to_string()));
    if sse {
        builder.insert_header(("x-accel-buffering", "no"));
    }

    let ttfb = info.started.elapsed();
    let encoding = resp
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok());
    // Without recording, the usage is still read: `openai_api_route_tokens_total` counts it.
    let capture = match state.recorder {
        Some(_) => Capture::new(content_type.as_deref(), encoding, cfg.record_body_bytes),
        None => Capture::usage_only(content_type.as_deref(), encoding, cfg.record_body_bytes),
    };
    let finish = Finish {
        state: state.clone().into_inner(),
        info,
        view: view.clone(),
        idx,
        status: status.as_u16(),
        attempts: attempts as u32,
        failures,
        capture,
        ttfb: Some(ttfb),
        committed_ok: !failed_anyway,
    };
    let no_body = status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational();
    let chunked = resp
        .headers()
        .get(header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = RelayBody::new(
        resp,
        first,
        cfg.idle_timeout,
        sse,
        (length, chunked),
        finish,
    );
    if no_body {
        body.finish_empty();
        return builder.finish();
    }
    match length {
        Some(len) if !sse => builder.body(actix_web::body::SizedStream::new(len, body)),
        _ => builder.streaming(body),
    }
}

#[cfg(test)]
mod tests {
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
