//! WebSocket sessions (SPEC §4c): `GET /v1/*` with `Upgrade: websocket`, e.g. the Realtime API's
//! `/v1/realtime?model=…`.
//!
//! The handshake is where failover happens: candidates are tried in order, each within its
//! `timeout`, until one answers `101 Switching Protocols`. After that the session belongs to that
//! upstream and frames are relayed both ways unchanged (opcode, FIN bit, payload; close code and
//! reason) until either side closes; there is no failover and no `idle_timeout`.
//!
//! Memory per session is bounded whatever the peers do: each direction reads one frame, hands it
//! to the other side and waits until that side has taken it (the upstream socket accepted the
//! bytes, or the client connection's one-frame queue has room) before reading the next. A slow
//! reader therefore stalls its peer through TCP flow control instead of making the gateway
//! buffer; the only per-frame buffer is the frame itself, limited to [`MAX_FRAME_BYTES`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use actix_codec::Decoder;
use actix_http::ws::{
    CloseCode, CloseReason, Codec, Frame, HandshakeError, Item, OpCode, Parser, ProtocolError,
};
use actix_web::body::{BodyStream, MessageBody};
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{HttpRequest, HttpResponse};
use awc::error::WsClientError;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};

use crate::config::Upstream;
use crate::error::GatewayError;
use crate::headers;
use crate::proxy::{self, RequestInfo, UpstreamClient};
use crate::registry::{AttemptResult, FailKind};
use crate::state::AppState;

/// Largest frame accepted from either side (both codecs; their default is 64 KiB). Realtime
/// events carry base64 audio, so a single event can be megabytes.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// How long a session waits for the other side's close frame (or end) once one side has closed,
/// or after the gateway itself sent close frames at shutdown.
pub const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Room made for each read on the upstream socket while no frame is pending (the codec reserves
/// a partial frame's full size itself). Idle sessions hold no more than this per side.
const READ_CHUNK: usize = 8 * 1024;

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

/// Tells every open session to close (SIGTERM/SIGINT). Cheap to clone; lives in [`AppState`].
#[derive(Clone)]
pub struct Sessions(Arc<watch::Sender<bool>>);

impl Default for Sessions {
    fn default() -> Self {
        Sessions(Arc::new(watch::channel(false).0))
    }
}

impl Sessions {
    /// Sends every open (and any later) session a close frame with code 1001 on both sides.
    pub fn close_all(&self) {
        self.0.send_replace(true);
    }

    fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }
}

/// The `model` query parameter (the request's model for allow/deny, `model_map` and the record).
/// More than one, or one that is not valid percent-encoded UTF-8, is refused: a filter must not be
/// bypassed by a parameter the upstream may read differently.
pub fn query_model(query: &str) -> Result<Option<String>, &'static str> {
    let mut found = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if decode_component(k).as_deref() != Some("model") {
            continue;
        }
        if found.is_some() {
            return Err("more than one `model` query parameter");
        }
        found = Some(decode_component(v).ok_or("the `model` query parameter is not valid")?);
    }
    Ok(found)
}

/// The query with every `model` parameter's value replaced by `model`; other parameters are kept
/// byte for byte.
pub fn rewrite_query_model(query: &str, model: &str) -> String {
    let mut out = String::with_capacity(query.len() + model.len());
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        let k = pair.split_once('=').map_or(pair, |(k, _)| k);
        if decode_component(k).as_deref() == Some("model") {
            out.push_str(k);
            out.push('=');
            encode_component(model, &mut out);
        } else {
            out.push_str(pair);
        }
    }
    out
}

/// `application/x-www-form-urlencoded` decoding of one name or value; None if malformed.
fn decode_component(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode_component(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
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

/// A client-supplied value as it may appear in a log line: control characters escaped, at most
/// 200 characters.
fn loggable(s: &str) -> String {
    s.chars()
        .take(200)
        .flat_map(|c| {
            let esc: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            esc
        })
        .collect()
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
struct Refused {
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
) -> Result<Opened, Refused> {
    let url = upstream_url(up, req, model);
    let mut out = HeaderMap::new();
    headers::upstream_request_headers(req.headers(), &up.auth, &mut out);
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
        Err(WsClientError::InvalidResponseStatus(status)) => Err(Refused {
            kind: FailKind::Http,
            reason: format!("HTTP {status}"),
            status: Some(status),
        }),
        Err(WsClientError::SendRequest(e)) => {
            let (kind, reason) = proxy::classify(e);
            Err(Refused {
                kind,
                reason,
                status: None,
            })
        }
        Err(other) => Err(Refused {
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
    let started = Instant::now();
    let cfg = state.config.get();
    let mut info = RequestInfo {
        created_at: SystemTime::now(),
        started,
        ip: proxy::client_ip(&req, &cfg),
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
    match proxy::authorize(&req, &cfg) {
        Ok(label) => info.client_key = label,
        Err(e) => return proxy::local_error(&state, info, e),
    }
    info.model = match query_model(req.uri().query().unwrap_or("")) {
        Ok(m) => m,
        Err(why) => return proxy::local_error(&state, info, GatewayError::BadBody(why.into())),
    };
    if let Err(e) = actix_http::ws::verify_handshake(req.head()) {
        return handshake_error(&state, info, &e);
    }

    let (view, order) = state.registry.candidates(info.model.as_deref());
    let cfg = view.config.clone();
    if order.is_empty() {
        let model = info.model.clone().unwrap_or_default();
        return proxy::local_error(&state, info, GatewayError::NoUpstreamForModel(model));
    }
    let n = order.len();
    let mut failures: Vec<String> = Vec::new();
    let mut last_kind = FailKind::Connect;
    let mut last_status = None;
    for (pos, &idx) in order.iter().enumerate() {
        let up = &cfg.upstreams[idx];
        let t0 = Instant::now();
        let attempt = handshake(&client.0, up, &req, info.model.as_deref());
        let refused = match actix_rt::time::timeout(up.timeout, attempt).await {
            Ok(Ok(opened)) => {
                let first_byte = t0.elapsed();
                state.metrics.attempt(&up.name, "ok");
                state.metrics.first_byte(&up.name, first_byte.as_secs_f64());
                state
                    .registry
                    .report(&view, idx, AttemptResult::Ok { first_byte });
                return open(&state, &req, payload, info, up, opened, pos + 1, failures);
            }
            Ok(Err(refused)) => refused,
            Err(_) => Refused {
                kind: FailKind::Timeout,
                reason: format!("no handshake answer within {}", proxy::secs(up.timeout)),
                status: None,
            },
        };
        let last = pos + 1 == n;
        if let Some(status) = refused.status.filter(|s| !proxy::is_failover_status(*s)) {
            // Not a failover status: it is the answer, as for HTTP.
            state.metrics.attempt(&up.name, "ok");
            state.registry.report(
                &view,
                idx,
                AttemptResult::Ok {
                    first_byte: t0.elapsed(),
                },
            );
            // Like a relayed 400 over HTTP, it is not a failed attempt of the record's `error`.
            let message = format!(
                "upstream {} answered {} instead of 101 Switching Protocols",
                up.name, refused.reason
            );
            let error = (!failures.is_empty()).then(|| failures.join("; "));
            let answer = Answer {
                upstream: Some(up.name.clone()),
                status,
                attempts: pos + 1,
                message,
                error,
            };
            return status_answer(&state, info, answer);
        }
        log::warn!(
            "{} {}: upstream {} failed the WebSocket handshake: {}",
            info.method,
            loggable(&info.path),
            up.name,
            refused.reason
        );
        state.metrics.attempt(&up.name, refused.kind.label());
        if !last {
            state.metrics.failover(&up.name);
        }
        state.registry.report(
            &view,
            idx,
            AttemptResult::Failed {
                kind: refused.kind,
                reason: refused.reason.clone(),
            },
        );
        failures.push(format!("{}: {}", up.name, refused.reason));
        last_kind = refused.kind;
        last_status = refused.status;
    }
    let summary = failures.join("; ");
    if let Some(status) = last_status.filter(|_| last_kind == FailKind::Http) {
        // The last failure was an HTTP answer: its status is relayed (awc keeps no body).
        let name = order
            .last()
            .and_then(|&i| cfg.upstreams.get(i))
            .map(|u| u.name.clone());
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            proxy::alert_all_failed(&state, &info, status.as_u16(), &failures);
        }
        let answer = Answer {
            upstream: name,
            status,
            attempts: n,
            message: format!("all upstreams refused the WebSocket handshake: {summary}"),
            error: Some(summary),
        };
        return status_answer(&state, info, answer);
    }
    let err = GatewayError::AllFailed {
        timed_out: last_kind == FailKind::Timeout,
        summary: summary.clone(),
    };
    proxy::alert_all_failed(&state, &info, err.status().as_u16(), &failures);
    proxy::answer(&state, info, &err, n, summary)
}

/// A malformed client handshake (no key, wrong version …): 400-class, nothing sent upstream.
fn handshake_error(state: &AppState, info: RequestInfo, e: &HandshakeError) -> HttpResponse {
    let resp: actix_http::Response<_> = e.into();
    let status = resp.status();
    let message = format!("not a valid WebSocket handshake: {e}");
    let body = serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "code": "invalid_websocket_handshake"}}).to_string();
    if let Some(rec) = &state.recorder {
        rec.submit(info.into_record(
            status.as_u16(),
            None,
            0,
            Some(message),
            Some(body.clone()),
            Default::default(),
            None,
        ));
    }
    HttpResponse::build(status)
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
        .body(body)
}

/// A handshake answered with an upstream's status instead of 101.
struct Answer {
    /// The upstream whose status it is.
    upstream: Option<String>,
    status: StatusCode,
    attempts: usize,
    /// For the client.
    message: String,
    /// For the record (`name: reason` of the failed attempts).
    error: Option<String>,
}

/// Answers an upstream's status with an OpenAI-style error (awc keeps no handshake body), and
/// records it.
fn status_answer(state: &AppState, info: RequestInfo, a: Answer) -> HttpResponse {
    let code = if a.status.is_client_error() {
        "websocket_handshake_refused"
    } else {
        "upstream_unavailable"
    };
    let body = serde_json::json!({"error": {"message": a.message, "type": "upstream_error", "code": code}}).to_string();
    if let Some(rec) = &state.recorder {
        rec.submit(info.into_record(
            a.status.as_u16(),
            a.upstream.clone(),
            a.attempts as u32,
            a.error,
            Some(body.clone()),
            Default::default(),
            None,
        ));
    }
    let mut b = HttpResponse::build(a.status);
    b.insert_header((header::CONTENT_TYPE, "application/json"))
        .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
        .insert_header(("x-upstream-attempts", a.attempts.to_string()));
    if let Some(v) = a.upstream.and_then(|n| HeaderValue::from_str(&n).ok()) {
        b.insert_header(("x-upstream", v));
    }
    b.body(body)
}

/// The client's side of the session: the 101 answer whose body is fed by a one-frame queue.
struct ClientBody(mpsc::Receiver<Bytes>);

impl Stream for ClientBody {
    type Item = Result<Bytes, actix_web::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|b| b.map(Ok))
    }
}

/// Commits to `up`: answers 101 to the client and starts relaying.
#[allow(clippy::too_many_arguments)]
fn open(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    payload: web::Payload,
    info: RequestInfo,
    up: &Upstream,
    opened: Opened,
    attempts: usize,
    failures: Vec<String>,
) -> HttpResponse {
    // verify_handshake has passed, so the key is there and well formed.
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return GatewayError::Internal("handshake key vanished").response();
    };
    let accept = actix_http::ws::hash_key(key.as_bytes());
    let mut builder = HttpResponse::build(StatusCode::SWITCHING_PROTOCOLS);
    builder.upgrade("websocket");
    for (name, value) in headers::response_headers(&opened.headers) {
        if !handshake_header(name) {
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
    builder.insert_header(("x-upstream-attempts", attempts.to_string()));

    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let ttfb = info.started.elapsed();
    let live = Live {
        state: state.clone().into_inner(),
        info,
        upstream: up.name.clone(),
        attempts: attempts as u32,
        failures,
        ttfb,
    };
    log::debug!(
        "{} {}: WebSocket session opened on upstream {}",
        live.info.method,
        loggable(&live.info.path),
        up.name
    );
    let stop = state.realtime.subscribe();
    actix_rt::spawn(relay(live, payload, opened, tx, stop));
    builder.body(BodyStream::new(ClientBody(rx)).boxed())
}

/// An open session's bookkeeping; becomes its record.
struct Live {
    state: Arc<AppState>,
    info: RequestInfo,
    upstream: String,
    attempts: u32,
    failures: Vec<String>,
    ttfb: Duration,
}

/// Keeps `openai_api_route_websocket_sessions{upstream}` up while the session is open.
struct Gauge(crate::metrics::Metrics, String);

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.websocket_sessions(&self.1, -1);
    }
}

/// How one direction of a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// The source sent a close frame (relayed, or answered our own).
    Closed,
    /// The source connection ended without a close frame.
    Dropped,
    /// The destination could not take a frame any more.
    DestinationGone,
    /// The source broke the protocol (or sent an oversized frame).
    Protocol(String),
}

/// Frames from the client: the request payload decoded by a server-side codec.
struct ClientFrames {
    payload: web::Payload,
    buf: BytesMut,
    codec: Codec,
}

/// Frames from the upstream: its socket decoded by a client-side codec.
struct UpstreamFrames {
    io: ReadHalf<Socket>,
    buf: BytesMut,
    codec: Codec,
}

/// A source of frames; `None` when the connection ended.
trait Frames {
    async fn next(&mut self) -> Option<Result<Frame, ProtocolError>>;
}

impl Frames for ClientFrames {
    async fn next(&mut self) -> Option<Result<Frame, ProtocolError>> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(f)) => return Some(Ok(f)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            if too_large(&self.buf) {
                return Some(Err(ProtocolError::Overflow));
            }
            match self.payload.next().await {
                // Take the chunk as the buffer when nothing is pending (no copy).
                Some(Ok(chunk)) if self.buf.is_empty() => self.buf = BytesMut::from(chunk),
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(_)) | None => return None,
            }
        }
    }
}

impl Frames for UpstreamFrames {
    async fn next(&mut self) -> Option<Result<Frame, ProtocolError>> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(f)) => return Some(Ok(f)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            if too_large(&self.buf) {
                return Some(Err(ProtocolError::Overflow));
            }
            self.buf.reserve(READ_CHUNK);
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

/// A destination for encoded frames; `send` returns once the frame has been taken.
trait Sink {
    /// Whether frames must be masked (client → server).
    const MASK: bool;
    async fn send(&mut self, bytes: Bytes) -> bool;
}

/// Towards the client: the one-frame queue the 101 body reads from.
struct ToClient(mpsc::Sender<Bytes>);

impl Sink for ToClient {
    const MASK: bool = false;
    async fn send(&mut self, bytes: Bytes) -> bool {
        self.0.send(bytes).await.is_ok()
    }
}

/// Towards the upstream: its socket.
struct ToUpstream(WriteHalf<Socket>);

impl Sink for ToUpstream {
    const MASK: bool = true;
    async fn send(&mut self, bytes: Bytes) -> bool {
        self.0.write_all(&bytes).await.is_ok() && self.0.flush().await.is_ok()
    }
}

/// Whether the frame starting `buf` declares a payload over [`MAX_FRAME_BYTES`]. The codec only
/// checks the size once the whole frame is buffered; this refuses it from its header.
fn too_large(buf: &[u8]) -> bool {
    let declared = match (buf.get(1).map(|b| b & 0x7f), buf.len()) {
        (Some(126), n) if n >= 4 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
        (Some(127), n) if n >= 10 => {
            let mut len = [0u8; 8];
            len.copy_from_slice(&buf[2..10]);
            u64::from_be_bytes(len)
        }
        (Some(len), _) if len < 126 => u64::from(len),
        _ => 0,
    };
    declared > MAX_FRAME_BYTES as u64
}

/// The wire form of `frame` as the other side must see it: same opcode, FIN bit and payload.
fn encode(frame: Frame, mask: bool) -> Bytes {
    let mut dst = BytesMut::new();
    match frame {
        Frame::Text(b) => Parser::write_message(&mut dst, b, OpCode::Text, true, mask),
        Frame::Binary(b) => Parser::write_message(&mut dst, b, OpCode::Binary, true, mask),
        Frame::Ping(b) => Parser::write_message(&mut dst, b, OpCode::Ping, true, mask),
        Frame::Pong(b) => Parser::write_message(&mut dst, b, OpCode::Pong, true, mask),
        Frame::Close(reason) => Parser::write_close(&mut dst, reason, mask),
        Frame::Continuation(Item::FirstText(b)) => {
            Parser::write_message(&mut dst, b, OpCode::Text, false, mask)
        }
        Frame::Continuation(Item::FirstBinary(b)) => {
            Parser::write_message(&mut dst, b, OpCode::Binary, false, mask)
        }
        Frame::Continuation(Item::Continue(b)) => {
            Parser::write_message(&mut dst, b, OpCode::Continue, false, mask)
        }
        Frame::Continuation(Item::Last(b)) => {
            Parser::write_message(&mut dst, b, OpCode::Continue, true, mask)
        }
    }
    dst.freeze()
}

fn close_frame(code: CloseCode, why: &str) -> Frame {
    Frame::Close(Some(CloseReason {
        code,
        description: Some(why.to_string()),
    }))
}

/// The close a session's sides get when it is stopped: why, as a frame.
type StopReason = Option<(CloseCode, &'static str)>;

/// One direction: read a frame from `src`, hand it to `dst`, wait until taken, repeat.
///
/// When the session is stopped (shutdown, or the other direction failed) `dst` gets a close
/// frame and the loop keeps reading `src` only to see its close answer, relaying nothing more.
async fn pump<F: Frames, S: Sink>(
    src: &mut F,
    dst: &mut S,
    stop: &watch::Sender<StopReason>,
    mut stopped: watch::Receiver<StopReason>,
) -> End {
    let mut dst_closed = false;
    loop {
        let next = tokio::select! {
            biased;
            changed = stopped.changed(), if !dst_closed => {
                let reason = *stopped.borrow_and_update();
                match (changed, reason) {
                    (Ok(()), Some((code, why))) => {
                        dst_closed = true;
                        if !dst.send(encode(close_frame(code, why), S::MASK)).await {
                            return End::DestinationGone;
                        }
                    }
                    // The session (sender) is gone: nothing more to wait for here.
                    (Err(_), _) => dst_closed = true,
                    _ => {}
                }
                continue;
            }
            next = src.next() => next,
        };
        match next {
            Some(Ok(frame)) => {
                let is_close = matches!(frame, Frame::Close(_));
                if dst_closed {
                    // Our own close is out: only the peer's close answer matters now.
                    if is_close {
                        return End::Closed;
                    }
                    continue;
                }
                if !dst.send(encode(frame, S::MASK)).await {
                    return End::DestinationGone;
                }
                if is_close {
                    return End::Closed;
                }
            }
            Some(Err(e)) => {
                let code = if matches!(e, ProtocolError::Overflow) {
                    CloseCode::Size
                } else {
                    CloseCode::Protocol
                };
                stop.send_if_modified(|r| {
                    let first = r.is_none();
                    if first {
                        *r = Some((code, "protocol error on the other side"));
                    }
                    first
                });
                if !dst_closed {
                    let _ = dst
                        .send(encode(
                            close_frame(code, "protocol error on the other side"),
                            S::MASK,
                        ))
                        .await;
                }
                return End::Protocol(e.to_string());
            }
            None => {
                if !dst_closed {
                    let _ = dst
                        .send(encode(
                            close_frame(CloseCode::Away, "the other side went away"),
                            S::MASK,
                        ))
                        .await;
                }
                return End::Dropped;
            }
        }
    }
}

/// Runs a session to its end, then records it.
async fn relay(
    live: Live,
    payload: web::Payload,
    opened: Opened,
    to_client: mpsc::Sender<Bytes>,
    mut shutdown: watch::Receiver<bool>,
) {
    let state = live.state.clone();
    state.metrics.websocket_sessions(&live.upstream, 1);
    let _gauge = Gauge(state.metrics.clone(), live.upstream.clone());

    let (read, write) = tokio::io::split(opened.io);
    let mut from_client = ClientFrames {
        payload,
        buf: BytesMut::new(),
        codec: Codec::new().max_size(MAX_FRAME_BYTES),
    };
    let mut from_upstream = UpstreamFrames {
        io: read,
        buf: opened.read_buf,
        codec: Codec::new().max_size(MAX_FRAME_BYTES).client_mode(),
    };
    // The body ends when every sender is gone: keep one until both directions are done, so the
    // client's close answer can still come in after the upstream's close went out.
    let mut client_sink = ToClient(to_client.clone());
    let mut upstream_sink = ToUpstream(write);
    let (stop_tx, stop_rx) = watch::channel::<StopReason>(None);

    let (up_end, down_end) = {
        let up = pump(
            &mut from_client,
            &mut upstream_sink,
            &stop_tx,
            stop_rx.clone(),
        );
        let down = pump(&mut from_upstream, &mut client_sink, &stop_tx, stop_rx);
        let mut up = std::pin::pin!(up);
        let mut down = std::pin::pin!(down);
        let mut shutdown_seen = *shutdown.borrow();
        if shutdown_seen {
            stop_tx.send_replace(Some((CloseCode::Away, "server shutting down")));
        }
        let (mut up_end, mut down_end) = (None, None);
        let mut deadline: Option<actix_rt::time::Instant> = None;
        while up_end.is_none() || down_end.is_none() {
            let wait_until = async {
                match deadline {
                    Some(d) => actix_rt::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                end = &mut up, if up_end.is_none() => {
                    up_end = Some(end);
                    deadline.get_or_insert_with(|| actix_rt::time::Instant::now() + CLOSE_WAIT);
                }
                end = &mut down, if down_end.is_none() => {
                    down_end = Some(end);
                    deadline.get_or_insert_with(|| actix_rt::time::Instant::now() + CLOSE_WAIT);
                }
                changed = shutdown.changed(), if !shutdown_seen => {
                    shutdown_seen = true;
                    if changed.is_ok() && *shutdown.borrow() {
                        stop_tx.send_if_modified(|r| {
                            let first = r.is_none();
                            if first {
                                *r = Some((CloseCode::Away, "server shutting down"));
                            }
                            first
                        });
                        deadline.get_or_insert_with(|| actix_rt::time::Instant::now() + CLOSE_WAIT);
                    }
                }
                () = wait_until => break,
            }
        }
        (up_end, down_end)
    };
    // The upstream connection closes here.
    drop(upstream_sink);
    drop(from_upstream);

    let Live {
        state,
        info,
        upstream,
        attempts,
        mut failures,
        ttfb,
    } = live;
    let describe = |who: &str, end: &Option<End>| match end {
        Some(End::Closed) | Some(End::DestinationGone) => None,
        Some(End::Dropped) => Some(format!("{who} connection ended without a close frame")),
        Some(End::Protocol(e)) => Some(format!("{who} broke the WebSocket protocol: {e}")),
        None => Some(format!(
            "{who} did not close within {}s",
            CLOSE_WAIT.as_secs()
        )),
    };
    if let Some(why) = describe("upstream", &down_end) {
        failures.push(format!("{upstream}: {why}"));
    }
    log::info!(
        "{} {}: WebSocket session on upstream {} ended after {:.1}s (client: {}, upstream: {})",
        info.method,
        loggable(&info.path),
        upstream,
        info.started.elapsed().as_secs_f64(),
        describe("client", &up_end).unwrap_or_else(|| "closed".into()),
        describe("upstream", &down_end).unwrap_or_else(|| "closed".into()),
    );
    if let Some(rec) = &state.recorder {
        let error = (!failures.is_empty()).then(|| failures.join("; "));
        rec.submit(info.into_record(
            101,
            Some(upstream),
            attempts,
            error,
            None,
            Default::default(),
            Some(ttfb),
        ));
    }
    drop(client_sink);
    drop(to_client);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_from_query() {
        assert_eq!(
            query_model("model=gpt-4o-realtime-preview"),
            Ok(Some("gpt-4o-realtime-preview".into()))
        );
        assert_eq!(
            query_model("a=1&model=gpt%2D4o+x&b"),
            Ok(Some("gpt-4o x".into()))
        );
        assert_eq!(query_model("modelx=1"), Ok(None));
        assert_eq!(query_model(""), Ok(None));
        assert!(query_model("model=a&model=b").is_err());
        assert!(query_model("model=a&%6dodel=b").is_err());
        assert!(query_model("model=%zz").is_err());
        assert!(query_model("model=%ff").is_err());
    }

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

    #[test]
    fn oversized_frames_are_seen_in_their_header() {
        let mut b = BytesMut::new();
        Parser::write_message(&mut b, vec![0u8; 70_000], OpCode::Binary, true, true);
        assert!(!too_large(&b[..10]));
        let mut head = vec![0x82u8, 0xff];
        head.extend_from_slice(&(MAX_FRAME_BYTES as u64 + 1).to_be_bytes());
        assert!(too_large(&head));
        assert!(!too_large(&head[..9]));
        head[2..10].copy_from_slice(&(MAX_FRAME_BYTES as u64).to_be_bytes());
        assert!(!too_large(&head));
    }

    #[test]
    fn model_rewritten_in_query() {
        assert_eq!(
            rewrite_query_model("x=%20&model=gpt-4o&y=2", "my deployment/1"),
            "x=%20&model=my%20deployment%2F1&y=2"
        );
        assert_eq!(rewrite_query_model("a=b", "m"), "a=b");
    }

    #[test]
    fn frames_keep_opcode_fin_and_payload() {
        let mut codec = Codec::new().max_size(MAX_FRAME_BYTES);
        for (frame, mask) in [
            (Frame::Text(Bytes::from_static(b"hi")), true),
            (
                Frame::Continuation(Item::FirstBinary(Bytes::from_static(b"a"))),
                true,
            ),
            (
                Frame::Continuation(Item::Continue(Bytes::from_static(b"b"))),
                true,
            ),
            (
                Frame::Continuation(Item::Last(Bytes::from_static(b"c"))),
                true,
            ),
            (Frame::Ping(Bytes::from_static(b"p")), true),
            (close_frame(CloseCode::Other(4000), "bye"), true),
        ] {
            let want = format!("{frame:?}");
            let mut buf = BytesMut::from(&encode(frame, mask)[..]);
            let got = codec.decode(&mut buf).unwrap().unwrap();
            assert_eq!(format!("{got:?}"), want);
            assert!(buf.is_empty());
        }
    }
}
