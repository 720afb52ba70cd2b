//! The `/v1/*` handler (SPEC §4), top to bottom: admit (auth, body, meta) → candidates from the
//! registry's view → one attempt per candidate until one answers → respond → relay.
//!
//! Failover is decided only before the first byte goes to the client: on the response head for
//! ordinary requests, on the head *and* first body chunk for stream requests. Every outcome goes
//! into the request's [`Ledger`], which alone writes metrics, health, alerts and the record.

pub mod admit;
pub mod attempt;
pub mod relay;
pub mod respond;

use std::time::{Instant, SystemTime};

use actix_web::http::header;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};

use crate::attempt::{is_failover_status, FailKind};
use crate::error::GatewayError;
use crate::escape::untrusted;
use crate::ledger::{Ledger, RequestInfo};
use crate::state::AppState;

pub use self::admit::{preflight, token_label};
pub use self::attempt::rewrite_model;

/// One awc client per worker (awc's `Client` is `!Send`), built in the app factory.
pub struct UpstreamClient(pub awc::Client);

/// The catch-all `/v1/{tail}` handler.
pub async fn proxy(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    client: web::Data<UpstreamClient>,
) -> HttpResponse {
    let ledger = match admit_request(&req, payload, &state).await {
        Ok(ledger) => ledger,
        Err((ledger, err)) => return ledger.finish_local(err),
    };
    forward(&req, ledger, &state, &client.0).await
}

/// Admission: who is asking, what they send, and whether it may go anywhere (SPEC §4, 4d).
async fn admit_request(
    req: &HttpRequest,
    payload: web::Payload,
    state: &web::Data<AppState>,
) -> Result<Ledger, (Ledger, GatewayError)> {
    let cfg = state.config.get();
    let info = RequestInfo {
        created_at: SystemTime::now(),
        started: Instant::now(),
        ip: admit::client_ip(req, &cfg),
        method: req.method().to_string(),
        path: admit::cut_to(req.uri().path(), admit::RECORD_PATH_BYTES).to_string(),
        model: None,
        stream: false,
        body: Bytes::new(),
        user_agent: req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|ua| admit::cut_to(ua, admit::RECORD_USER_AGENT_BYTES).to_string()),
        client_key: None,
        body_limit: cfg.record_body_bytes,
    };
    let mut ledger = Ledger::open(state.clone().into_inner(), info);
    match admit::authorize(req, &cfg) {
        Ok(label) => ledger.info_mut().client_key = label,
        Err(e) => return Err((ledger, e)),
    }
    let hops = admit::via_hops(req.headers());
    if hops >= admit::MAX_VIA_HOPS {
        return Err((ledger, GatewayError::LoopDetected(hops)));
    }
    if admit::has_dot_segment(req.uri().path()) {
        let err = GatewayError::BadRequest(
            "the path has a `.` or `..` segment (after percent-decoding); it is not forwarded"
                .into(),
        );
        return Err((ledger, err));
    }
    let body = actix_rt::time::timeout(
        cfg.body_timeout,
        admit::read_body(req, payload, cfg.max_body_bytes),
    );
    let body = match body.await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Err((ledger, e)),
        Err(_) => {
            let secs = cfg.body_timeout.as_secs();
            return Err((ledger, GatewayError::BodyTimeout(secs)));
        }
    };
    if !body.is_empty() {
        if let Some(enc) = admit::unreadable_encoding(req) {
            let err = GatewayError::BadRequest(format!(
                "the request body has Content-Encoding {:?}, which the gateway cannot read; send it uncompressed",
                untrusted(enc)
            ));
            return Err((ledger, err));
        }
    }
    let meta = match admit::body_meta(&body) {
        Ok(meta) => meta,
        Err(refused) => return Err((ledger, GatewayError::BadRequest(refused.0))),
    };
    let info = ledger.info_mut();
    info.body = body;
    info.model = meta.model;
    info.stream = meta.stream;
    Ok(ledger)
}

/// Candidates in order, one attempt each, until one answers (SPEC §4 "Failover").
async fn forward(
    req: &HttpRequest,
    mut ledger: Ledger,
    state: &AppState,
    client: &awc::Client,
) -> HttpResponse {
    let (view, order) = state.registry.candidates(ledger.info().model.as_deref());
    if order.is_empty() {
        let model = ledger.info().model.clone().unwrap_or_default();
        return ledger.finish_local(GatewayError::NoUpstreamForModel(model));
    }
    let cfg = view.config.clone();
    let n = order.len();
    for (pos, &idx) in order.iter().enumerate() {
        let up = &cfg.upstreams[idx];
        let last = pos + 1 == n;
        let info = ledger.info();
        let wait = attempt::first_byte_wait(up, info.stream, last, info.body.len());
        let body = match info.model.as_deref().and_then(|m| up.mapped_model(m)) {
            Some(to) => rewrite_model(&info.body, to).unwrap_or_else(|| info.body.clone()),
            None => info.body.clone(),
        };
        let stream = info.stream;
        let t0 = Instant::now();
        ledger.sent();
        let outcome =
            actix_rt::time::timeout(wait, attempt::attempt(client, up, req, body, stream)).await;
        let (kind, status, reason) = match outcome {
            Ok(Ok((resp, first))) => {
                let status = resp.status();
                if !is_failover_status(status) || last {
                    return respond::respond(ledger, &view, idx, resp, first, t0.elapsed());
                }
                (
                    FailKind::Http,
                    Some(status.as_u16()),
                    format!("HTTP {status}"),
                )
            }
            Ok(Err((kind, reason))) => (kind, None, reason),
            Err(_) => (
                FailKind::Timeout,
                None,
                if stream {
                    format!("no first chunk within {}", attempt::secs(wait))
                } else {
                    format!("no response head within {}", attempt::secs(wait))
                },
            ),
        };
        ledger.failed(&view, idx, kind, status, reason, !last);
    }
    // Every candidate failed without an HTTP answer to relay.
    let err = GatewayError::AllFailed {
        timed_out: ledger.last_failure() == Some(FailKind::Timeout),
        summary: crate::attempt::summary(ledger.failures()),
    };
    ledger.finish_local(err)
}
