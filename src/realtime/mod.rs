//! WebSocket sessions (see the observability guide, "Realtime API (WebSocket)"): `GET /v1/*` with
//! `Upgrade: websocket`, e.g. the Realtime API's `/v1/realtime?model=…`.
//!
//! The handshake is where failover happens: candidates are tried in order, each within its
//! `timeout`, until one answers `101 Switching Protocols`. After that the session belongs to that
//! upstream and frames are relayed both ways unchanged (opcode, FIN bit, payload; close code and
//! reason) until either side closes; there is no failover, and `realtime_idle_timeout` (not
//! `idle_timeout`) ends a silent session. How many sessions may be open, and how many bytes their
//! partly received frames may hold, is bounded in `limits` (version 0.3; see the security guide,
//! "Second probe (0.3): limits").
//!
//! Memory per session is bounded whatever the peers do: each direction reads one frame, hands it
//! to the other side and waits until that side has taken it (the upstream socket accepted the
//! bytes, or the client connection's one-frame queue has room) before reading the next. A slow
//! reader therefore stalls its peer through TCP flow control instead of making the gateway
//! buffer; the only per-frame buffer is the frame itself, limited to [`MAX_FRAME_BYTES`].
//!
//! This file holds the handshake side (auth, candidates, failover, the 101); `session` runs an
//! accepted session, `query` reads and rewrites the `model` query parameter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::{BodyStream, MessageBody};
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{HttpRequest, HttpResponse};
use awc::error::WsClientError;
use tokio::sync::mpsc;

mod limits;
mod query;
mod session;
pub mod sessions;

pub use self::query::{query_model, rewrite_query_model};
use self::session::{relay, ClientBody, Live};
pub use self::sessions::Sessions;

use crate::admission::member::member_rules;
use crate::admission::Counting;
use crate::capture::Reply;
use crate::config::Upstream;
use crate::error::GatewayError;
use crate::escape::untrusted;
use crate::failure::FailKind;
use crate::headers;
use crate::ledger::{BodyEnd, Ledger, Verdict};
use crate::policy::{Next, Outcome};
use crate::proxy::engine::{self, Attempt, Attempter, Ended, Run, Tried};
use crate::proxy::{self, UpstreamClient};
use crate::state::AppState;

/// Largest frame accepted from either side (both codecs; their default is 64 KiB). Realtime
/// events carry base64 audio, so a single event can be megabytes.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// How long a session waits for the other side's close frame (or end) once one side has closed,
/// or after the gateway itself sent close frames at shutdown.
pub const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Whether a request asks for a WebSocket (routing guard: such a `GET /v1/*` comes here).
pub fn is_upgrade(ctx: &actix_web::guard::GuardContext<'_>) -> bool {
    ctx.head().method == actix_web::http::Method::GET
        && ctx
            .head()
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
            })
}

/// Client handshake headers that belong to the client's own connection: awc makes its own key,
/// and extensions (compression) cannot be negotiated through a relay that passes frames as is.
fn handshake_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "sec-websocket-key"
            | "sec-websocket-version"
            | "sec-websocket-extensions"
            | "sec-websocket-accept"
            | "accept-encoding"
    )
}

/// Browser clients cannot set `Authorization` and offer their key as a subprotocol
/// (`openai-insecure-api-key.<key>`). Like the `Authorization` header, that key is not sent
/// upstream (unless `sk: asis`); the other protocols are. None when nothing is left.
fn without_key_protocols(value: &HeaderValue) -> Option<HeaderValue> {
    let Ok(text) = value.to_str() else {
        return Some(value.clone());
    };
    let kept: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty() && !p.starts_with(KEY_PROTOCOL))
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// The subprotocol prefix OpenAI's browser clients carry their key in.
const KEY_PROTOCOL: &str = "openai-insecure-api-key.";

/// The upstream URL for this request: endpoint + path without `/v1` + query (model mapped).
fn upstream_url(up: &Upstream, req: &HttpRequest, model: Option<&str>) -> String {
    let path = req.uri().path();
    let mut url = format!("{}{}", up.base, path.strip_prefix("/v1").unwrap_or(path));
    if let Some(q) = req.uri().query() {
        url.push('?');
        match model.and_then(|m| up.mapped_model(m)) {
            Some(to) => url.push_str(&rewrite_query_model(q, to)),
            None => url.push_str(q),
        }
    }
    url
}

type Socket = awc::BoxedSocket;

/// A handshake that got its 101.
struct Opened {
    headers: HeaderMap,
    io: Socket,
    read_buf: BytesMut,
}

/// Why a handshake attempt failed: the kind, the record's reason, and the status if the upstream
/// answered with one.
struct HandshakeFailed {
    kind: FailKind,
    reason: String,
    status: Option<StatusCode>,
}

/// One handshake against `up`.
async fn handshake(
    client: &awc::Client,
    up: &Upstream,
    req: &HttpRequest,
    model: Option<&str>,
    trace: Option<crate::trace::Propagation>,
) -> Result<Opened, HandshakeFailed> {
    let url = upstream_url(up, req, model);
    let mut out = HeaderMap::new();
    headers::upstream_request_headers(req.headers(), &up.auth, &mut out);
    if let Some(t) = &trace {
        t.apply(&mut out);
    }
    let mut ws = client.ws(url.as_str()).max_frame_size(MAX_FRAME_BYTES);
    let keep_keys = matches!(up.auth, crate::config::UpstreamAuth::AsIs);
    for (name, value) in out.iter() {
        if handshake_header(name) {
            continue;
        }
        if name == header::SEC_WEBSOCKET_PROTOCOL && !keep_keys {
            if let Some(v) = without_key_protocols(value) {
                ws = ws.header(name.clone(), v);
            }
            continue;
        }
        ws = ws.header(name.clone(), value.clone());
    }
    match ws.connect().await {
        Ok((resp, framed)) => {
            let parts = framed.into_parts();
            Ok(Opened {
                headers: resp.headers().clone(),
                io: parts.io,
                read_buf: parts.read_buf,
            })
        }
        Err(WsClientError::InvalidResponseStatus(status)) => Err(HandshakeFailed {
            kind: FailKind::Http,
            reason: format!("HTTP {status}"),
            status: Some(status),
        }),
        Err(WsClientError::SendRequest(e)) => {
            let e = proxy::attempt::classify(e);
            Err(HandshakeFailed {
                kind: e.kind,
                reason: e.reason,
                status: None,
            })
        }
        Err(other) => Err(HandshakeFailed {
            kind: FailKind::Connect,
            reason: format!("bad WebSocket handshake answer: {other}"),
            status: None,
        }),
    }
}

/// The handler for `GET /v1/*` with `Upgrade: websocket`.
pub async fn session(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    client: web::Data<UpstreamClient>,
) -> HttpResponse {
    let (mut ledger, cfg) = match crate::admission::admit(&req, &state, Counting::Counted) {
        Ok(admitted) => (admitted.ledger, admitted.config),
        Err(refused) => return refused.answer(),
    };
    ledger.info_mut().websocket = true;
    match query_model(req.uri().query().unwrap_or("")) {
        Ok(m) => {
            let model: Option<Arc<str>> = m.map(Into::into);
            ledger.info_mut().model = model.clone();
            ledger.info_mut().facts.model = model;
        }
        Err(why) => return ledger.finish_local(GatewayError::BadRequest(why.into())),
    }
    if let Err(e) = actix_http::ws::verify_handshake(req.head()) {
        return ledger.finish_local(GatewayError::BadHandshake(e.to_string()));
    }
    // The member's rules and place: a session counts toward `rpm` and, until it ends,
    // `concurrent` (see the members guide).
    let placed = match member_rules(&ledger, &cfg) {
        Ok(()) => ledger.take_place().await,
        Err(e) => Err(e),
    };
    if let Err(e) = placed {
        return ledger.finish_local(e);
    }
    // The session's place, taken before any upstream is tried and held until it ends; the
    // per-token cap counts per member.
    let lim = &cfg.limits;
    let per = ledger
        .info()
        .member
        .clone()
        .or(ledger.info().client_key.clone());
    let slot = match state.realtime.counts.open(
        per.as_ref(),
        lim.realtime_max_sessions,
        lim.realtime_max_sessions_per_token,
    ) {
        Ok(slot) => slot,
        Err(full) => {
            let why = match full {
                limits::Full::All => "too many WebSocket sessions are open (realtime_max_sessions)",
                limits::Full::Token => {
                    "too many WebSocket sessions are open for this token (realtime_max_sessions_per_token)"
                }
            };
            return ledger.finish_local(GatewayError::TooManySessions(why));
        }
    };
    state.realtime.budget.set_cap(lim.realtime_buffer_bytes);
    let idle = lim.realtime_idle_timeout;

    // Candidates as for HTTP: allow/deny, `lb_policy` (the sticky key is the token's label or
    // the client address: a handshake has no body), cooldowns, `route_by_models`.
    let (view, order) =
        crate::proxy::plan::candidates(&state.sinks.registry, &state.models, ledger.info());
    if order.is_empty() {
        let model = ledger
            .info()
            .model
            .as_deref()
            .unwrap_or_default()
            .to_string();
        return ledger.finish_local(GatewayError::NoUpstreamForModel(model));
    }
    let cfg = view.config.clone();
    let run = Run {
        view: &view,
        order: &order,
        deadline: cfg.deadline.map(|d| ledger.info().started + d),
        committed: false,
        retry_after_max: cfg.retry_after_max,
    };
    let model = ledger.info().model.clone();
    let mut handshakes = Handshakes {
        client: &client.0,
        req: &req,
        model: model.as_deref(),
        over: cfg.model_timeout(model.as_deref()),
    };
    match engine::run(run, &mut handshakes, &mut ledger).await {
        Ended::Answer {
            idx, tried, next, ..
        } => {
            let Some(up) = cfg.upstreams.get(idx) else {
                return ledger.finish_local(GatewayError::Internal("upstream vanished"));
            };
            let first_byte = tried.first_byte;
            match (tried.answer, next) {
                (Some(Ok(opened)), _) => {
                    let status = StatusCode::SWITCHING_PROTOCOLS;
                    ledger.commit(&view, idx, status, first_byte, Verdict::Ok);
                    open(&state, &req, payload, (ledger, slot, idle), up, opened)
                }
                (Some(Err(status)), next) => {
                    let (verdict, message) = match next {
                        Next::RelayFailure { counts, cooldown } => (
                            Verdict::Failure { counts, cooldown },
                            format!(
                                "all upstreams refused the WebSocket handshake: {}",
                                crate::failure::summary(ledger.failures())
                            ),
                        ),
                        _ => (
                            Verdict::Ok,
                            format!(
                                "upstream {} answered {} instead of 101 Switching Protocols",
                                up.name, tried.reason
                            ),
                        ),
                    };
                    ledger.commit(&view, idx, status, first_byte, verdict);
                    status_answer(ledger, &up.name, status, message)
                }
                (None, _) => ledger.finish_local(GatewayError::AllFailed {
                    timed_out: false,
                    summary: tried.reason,
                }),
            }
        }
        Ended::OwnerFailed | Ended::AllFailed { .. } => {
            let err = GatewayError::AllFailed {
                timed_out: ledger.last_failure() == Some(FailKind::Timeout),
                summary: crate::failure::summary(ledger.failures()),
            };
            ledger.finish_local(err)
        }
    }
}

/// How a WebSocket handshake is tried on one upstream (the engine's attempter): its answer is an
/// opened session, or the status it refused with.
struct Handshakes<'a> {
    client: &'a awc::Client,
    req: &'a HttpRequest,
    model: Option<&'a str>,
    /// The `model_timeouts` entry of the session's model (its `timeout` is the handshake's).
    over: Option<&'a crate::config::ModelTimeout>,
}

impl Attempter<Ledger> for Handshakes<'_> {
    type Answer = Result<Opened, StatusCode>;

    fn wait(&self, up: &Upstream, _last: bool, _ledger: &Ledger) -> Duration {
        self.over.and_then(|o| o.timeout).unwrap_or(up.timeout)
    }

    async fn attempt(&mut self, a: Attempt<'_>, ledger: &mut Ledger) -> Tried<Self::Answer> {
        let t0 = Instant::now();
        let trace = ledger.sent();
        let attempt = handshake(self.client, a.up, self.req, self.model, trace);
        let tried = match actix_rt::time::timeout(a.wait, attempt).await {
            Ok(Ok(opened)) => Tried {
                outcome: Outcome::Answered {
                    status: 101,
                    failover_code: false,
                    retry_after: None,
                    not_found: false,
                },
                answer: Some(Ok(opened)),
                kind: FailKind::Http,
                status: Some(101),
                reason: String::new(),
                public: String::new(),
                first_byte: Duration::ZERO,
            },
            Ok(Err(HandshakeFailed {
                status: Some(status),
                reason,
                ..
            })) => Tried {
                outcome: Outcome::Answered {
                    status: status.as_u16(),
                    failover_code: false,
                    retry_after: None,
                    not_found: false,
                },
                answer: Some(Err(status)),
                kind: FailKind::Http,
                status: Some(status.as_u16()),
                public: reason.clone(),
                reason,
                first_byte: Duration::ZERO,
            },
            Ok(Err(HandshakeFailed { kind, reason, .. })) => Tried::failed(
                kind,
                Outcome::Failed { retry_same: false },
                reason.clone(),
                reason,
            ),
            Err(_) => {
                let reason = format!(
                    "no handshake answer within {}",
                    proxy::attempt::secs(a.wait)
                );
                Tried::failed(FailKind::Timeout, Outcome::TimedOut, reason.clone(), reason)
            }
        };
        Tried {
            first_byte: t0.elapsed(),
            ..tried
        }
    }
}

/// Answers an upstream's status with an OpenAI-style error (awc keeps no handshake body), and
/// records it.
fn status_answer(
    ledger: Ledger,
    upstream: &str,
    status: StatusCode,
    message: String,
) -> HttpResponse {
    let code = if status.is_client_error() {
        "websocket_handshake_refused"
    } else {
        "upstream_unavailable"
    };
    let body =
        serde_json::json!({"error": {"message": message, "type": "upstream_error", "code": code}})
            .to_string();
    let mut b = HttpResponse::build(status);
    b.insert_header((header::CONTENT_TYPE, "application/json"))
        .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
        .insert_header(("x-upstream-attempts", HeaderValue::from(ledger.attempts())));
    if let Ok(v) = HeaderValue::from_str(upstream) {
        b.insert_header(("x-upstream", v));
    }
    b.insert_header(("x-request-id", ledger.request_id().clone()));
    ledger.each_rate_header(|name, value| {
        b.insert_header((name, value));
    });
    ledger.finish_body(BodyEnd::Complete, Reply::with_text(Some(body.clone())));
    b.body(body)
}

/// Commits to `up`: answers 101 to the client and starts relaying.
fn open(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    payload: web::Payload,
    (ledger, slot, idle): (Ledger, limits::Slot, Duration),
    up: &Upstream,
    opened: Opened,
) -> HttpResponse {
    // verify_handshake has passed, so the key is there and well formed.
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return GatewayError::Internal("handshake key vanished").response();
    };
    let accept = actix_http::ws::hash_key(key.as_bytes());
    let mut builder = HttpResponse::build(StatusCode::SWITCHING_PROTOCOLS);
    builder.upgrade("websocket");
    // A member with its own limits is told about them, not about the shared account's.
    let own_limits = ledger.has_rate_limits();
    for (name, value) in headers::response_headers(&opened.headers) {
        let theirs = own_limits && name.as_str().starts_with("x-ratelimit-");
        if !handshake_header(name) && !theirs {
            builder.append_header((name.clone(), value.clone()));
        }
    }
    if let Ok(v) = HeaderValue::from_bytes(&accept) {
        builder.insert_header((header::SEC_WEBSOCKET_ACCEPT, v));
    }
    builder.insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"));
    if let Ok(v) = HeaderValue::from_str(&up.name) {
        builder.insert_header(("x-upstream", v));
    }
    builder.insert_header(("x-upstream-attempts", HeaderValue::from(ledger.attempts())));
    builder.insert_header(("x-request-id", ledger.request_id().clone()));
    ledger.each_rate_header(|name, value| {
        builder.insert_header((name, value));
    });

    let (tx, rx) = mpsc::channel::<Bytes>(1);
    log::debug!(
        "{} {}: WebSocket session opened on upstream {}",
        ledger.info().method,
        untrusted(ledger.info().path()),
        up.name
    );
    let live = Live {
        ledger,
        upstream: up.name.to_string(),
        slot,
        idle,
        budget: state.realtime.budget.clone(),
    };
    let stop = state.realtime.subscribe();
    actix_rt::spawn(relay(live, payload, opened, tx, stop));
    builder.body(BodyStream::new(ClientBody(rx)).boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_protocols_are_not_forwarded() {
        let v = HeaderValue::from_static("realtime, openai-insecure-api-key.sk-123, openai-beta.x");
        assert_eq!(
            without_key_protocols(&v).unwrap(),
            "realtime, openai-beta.x"
        );
        let v = HeaderValue::from_static("openai-insecure-api-key.sk-123");
        assert!(without_key_protocols(&v).is_none());
    }
}
