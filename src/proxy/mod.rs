//! The `/v1/*` handler (SPEC §4), top to bottom: admit (auth, body, meta) → candidates from the
//! registry's view → one attempt per candidate until one answers → respond → relay.
//!
//! Failover is decided only before the first byte goes to the client: on the response head for
//! ordinary requests, on the head *and* first body chunk for stream requests. Every outcome goes
//! into the request's [`Ledger`], which alone writes metrics, health, alerts and the record.

pub mod admit;
pub mod attempt;
pub mod relay;
pub mod rescue;
pub mod respond;
pub mod resume;

use std::time::{Duration, Instant};

use actix_web::http::header::CONTENT_TYPE;
use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};

use crate::admission::Admitted;
use crate::attempt::{is_failover_status, FailKind};
use crate::error::GatewayError;
use crate::escape::untrusted;
use crate::ledger::{AttemptFailure, Ledger};
use crate::state::AppState;
use crate::usage;

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

/// Admission: the common step of every route (auth, paths, loop guard), then what this route
/// reads: the body, bounded in size and time, and what it says (SPEC §4, 4d).
async fn admit_request(
    req: &HttpRequest,
    payload: web::Payload,
    state: &web::Data<AppState>,
) -> Result<Ledger, (Ledger, GatewayError)> {
    let Admitted {
        mut ledger,
        config: cfg,
    } = crate::admission::admit(req, state).map_err(|refused| refused.into_parts())?;
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
    if let Some(refused) = admit::not_utf8_json(req.headers().get(CONTENT_TYPE), &body) {
        return Err((ledger, GatewayError::BadRequest(refused.0)));
    }
    let meta = match admit::body_meta(&body) {
        Ok(meta) => meta,
        Err(refused) => return Err((ledger, GatewayError::BadRequest(refused.0))),
    };
    let info = ledger.info_mut();
    info.body = body;
    info.model = meta.model;
    info.stream = meta.stream;
    info.stream_options = meta.stream_options;
    Ok(ledger)
}

/// `base` as `up` gets it: its `model_map` applied to the top-level `model`.
fn upstream_body(
    info: &crate::ledger::RequestInfo,
    up: &crate::config::Upstream,
    base: &Bytes,
) -> Bytes {
    match info.model.as_deref().and_then(|m| up.mapped_model(m)) {
        Some(to) => rewrite_model(base, to).unwrap_or_else(|| base.clone()),
        None => base.clone(),
    }
}

/// Candidates in order, one attempt each (more with `retries`), until one answers (SPEC §4
/// "Failover", 4a).
async fn forward(
    req: &HttpRequest,
    mut ledger: Ledger,
    state: &AppState,
    client: &awc::Client,
) -> HttpResponse {
    let (view, mut order) = state.registry.candidates(ledger.info().model.as_deref());
    crate::models::route_filter(
        state,
        &view.config,
        &mut order,
        ledger.info().model.as_deref(),
    );
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
    let deadline = cfg.deadline.map(|d| ledger.info().started + d);
    let n = order.len();
    // 4b: the body with `stream_options.include_usage` added, when this request should get it.
    let usage_body = {
        let info = ledger.info();
        usage::usage_body(
            info.path(),
            info.stream,
            &info.body,
            info.stream_options.clone(),
        )
    };
    let mut out_of_time = false;
    'candidates: for (pos, &idx) in order.iter().enumerate() {
        let up = &cfg.upstreams[idx];
        let last = pos + 1 == n;
        let mut add_usage = usage_body.is_some()
            && up.force_usage
            && !state.stream_options_refused.refused(&cfg, &up.name);
        let mut tries = 0u32;
        loop {
            let (stream, mut wait) = {
                let info = ledger.info();
                let wait = attempt::first_byte_wait(up, info.stream, last, info.body.len());
                (info.stream, wait)
            };
            if let Some(left) = time_left(deadline) {
                if left.is_zero() {
                    out_of_time = true;
                    break 'candidates;
                }
                wait = wait.min(left);
            }
            let body = match (&usage_body, add_usage) {
                (Some(with_usage), true) => upstream_body(ledger.info(), up, with_usage),
                _ => upstream_body(ledger.info(), up, &ledger.info().body),
            };
            let t0 = Instant::now();
            ledger.sent();
            let mut outcome =
                actix_rt::time::timeout(wait, attempt::attempt(client, up, req, body, stream))
                    .await;
            if let (true, Ok(Ok((resp, first)))) = (add_usage, &mut outcome) {
                // 4b: a 400 naming the added `stream_options` is repeated once without it.
                if usage::refuses_stream_options(resp, first, wait).await {
                    log::info!(
                        "upstream {} refused stream_options; not adding it there until the next reload",
                        up.name
                    );
                    state.stream_options_refused.refuse(&cfg, &up.name);
                    add_usage = false;
                    let body = upstream_body(ledger.info(), up, &ledger.info().body);
                    ledger.sent();
                    let left = wait.saturating_sub(t0.elapsed());
                    outcome = actix_rt::time::timeout(
                        left,
                        attempt::attempt(client, up, req, body, stream),
                    )
                    .await;
                }
            }
            let may_retry = tries < up.retries && view.may_retry(idx);
            let (failure, retry_in) = match outcome {
                Ok(Ok((mut resp, mut first))) => {
                    let status = resp.status();
                    if status == StatusCode::BAD_REQUEST && !last && !cfg.failover_codes.is_empty()
                    {
                        let left = wait.saturating_sub(t0.elapsed());
                        let (body, whole) =
                            rescue::read_head_of_body(&mut resp, first.take(), left).await;
                        if let Some(code) = whole
                            .then(|| rescue::failover_code(&body, &cfg.failover_codes))
                            .flatten()
                        {
                            // 4a: e.g. context_length_exceeded — another upstream may fit it.
                            let failure = AttemptFailure {
                                moving_on: true,
                                quiet: true,
                                ..AttemptFailure::new(
                                    FailKind::Http,
                                    Some(400),
                                    format!("HTTP 400 {code}"),
                                )
                            };
                            ledger.failed(&view, idx, failure);
                            continue 'candidates;
                        }
                        first = (!body.is_empty()).then_some(body);
                    }
                    if !is_failover_status(status) {
                        let at = respond::Committed {
                            view: &view,
                            idx,
                            first_byte: t0.elapsed(),
                            usage_added: add_usage,
                            cooldown: None,
                            resume: resume_plan(
                                &ledger,
                                req,
                                client,
                                &order[pos + 1..],
                                &usage_body,
                            ),
                        };
                        return respond::respond(ledger, at, resp, first);
                    }
                    let retry_after = rescue::retry_after(&resp, status);
                    let cooldown = retry_after.map(|d| d.min(rescue::MAX_RETRY_AFTER));
                    let retryable =
                        matches!(status.as_u16(), 408 | 409 | 429) || status.is_server_error();
                    let pause = match retry_after {
                        Some(d) if d <= cfg.retry_after_max => Some(d),
                        Some(_) => None,
                        None => Some(rescue::backoff(tries)),
                    };
                    let retry_in = pause.filter(|p| retryable && may_retry && fits(deadline, *p));
                    if retry_in.is_none() && last {
                        let at = respond::Committed {
                            view: &view,
                            idx,
                            first_byte: t0.elapsed(),
                            usage_added: add_usage,
                            cooldown,
                            resume: None,
                        };
                        return respond::respond(ledger, at, resp, first);
                    }
                    let failure = AttemptFailure {
                        moving_on: retry_in.is_none() && !last,
                        cooldown,
                        ..AttemptFailure::new(
                            FailKind::Http,
                            Some(status.as_u16()),
                            format!("HTTP {status}"),
                        )
                    };
                    (failure, retry_in)
                }
                Ok(Err(e)) => {
                    let pause = rescue::backoff(tries);
                    let retry_in =
                        (e.retry_same && may_retry && fits(deadline, pause)).then_some(pause);
                    let failure = AttemptFailure {
                        moving_on: retry_in.is_none() && !last,
                        ..AttemptFailure::new(e.kind, None, e.reason)
                    };
                    (failure, retry_in)
                }
                Err(_) => {
                    let reason = if stream {
                        format!("no first chunk within {}", attempt::secs(wait))
                    } else {
                        format!("no response head within {}", attempt::secs(wait))
                    };
                    let failure = AttemptFailure {
                        moving_on: !last,
                        ..AttemptFailure::new(FailKind::Timeout, None, reason)
                    };
                    (failure, None)
                }
            };
            ledger.failed(&view, idx, failure);
            let Some(pause) = retry_in else {
                continue 'candidates;
            };
            // A client that goes away while we wait drops this future: the wait ends with it.
            ledger.retrying(&view, idx);
            actix_rt::time::sleep(pause).await;
            tries += 1;
        }
    }
    // Every candidate failed without an HTTP answer to relay.
    let err = GatewayError::AllFailed {
        timed_out: out_of_time || ledger.last_failure() == Some(FailKind::Timeout),
        summary: crate::attempt::summary(ledger.failures()),
    };
    ledger.finish_local(err)
}

/// How a stream may be continued if it breaks (SPEC 4a `resume`): only with `resume: true`, for
/// a single-choice chat stream, when candidates are left.
fn resume_plan(
    ledger: &Ledger,
    req: &HttpRequest,
    client: &awc::Client,
    rest: &[usize],
    usage_body: &Option<Bytes>,
) -> Option<resume::ResumePlan> {
    let info = ledger.info();
    let cfg = ledger.state().config.get();
    if !cfg.resume
        || rest.is_empty()
        || !resume::resumable_request(info.path(), info.stream, &info.body)
    {
        return None;
    }
    let text_limit = match cfg.record_body_bytes {
        0 => crate::capture::UNLIMITED_CAPTURE - crate::capture::SLACK,
        n => n,
    };
    Some(resume::ResumePlan {
        client: client.clone(),
        req: req.clone(),
        remaining: rest.iter().copied().collect(),
        usage_body: usage_body.clone(),
        text_limit,
    })
}

/// What is left of the request's `deadline`, if it has one.
fn time_left(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}

/// Whether a pause of `p` still leaves time for an attempt before the deadline.
fn fits(deadline: Option<Instant>, p: Duration) -> bool {
    time_left(deadline).is_none_or(|left| left > p)
}
