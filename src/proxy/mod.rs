//! The `/v1/*` handler (SPEC §4), top to bottom: admit (auth, body, meta) → candidates from the
//! registry's view → one attempt per candidate until one answers → respond → relay.
//!
//! Failover is decided only before the first byte goes to the client: on the response head for
//! ordinary requests, on the head *and* first body chunk for stream requests. Every outcome goes
//! into the request's [`Ledger`], which alone writes metrics, health, alerts and the record.

pub mod admit;
pub mod affine;
pub mod attempt;
pub mod ends;
pub mod prefill;
pub mod relay;
pub mod rescue;
pub mod respond;
pub mod resume;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::CONTENT_TYPE;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use tokio::time::error::Elapsed;

use crate::admission::Admitted;
use crate::attempt::FailKind;
use crate::config::{Config, Upstream};
use crate::error::GatewayError;
use crate::escape::untrusted;
use crate::ledger::{AttemptFailure, Ledger, RequestInfo};
use crate::policy::{self, Next, Outcome};
use crate::registry::{Order, RegistryView};
use crate::state::AppState;
use crate::usage;

use self::attempt::{AttemptError, Upstreamed};

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
/// "Failover", 4a, 4f). What follows each attempt is [`policy::decide`]'s to say; this loop only
/// performs it ([`execute`]).
async fn forward(
    req: &HttpRequest,
    mut ledger: Ledger,
    state: &AppState,
    client: &awc::Client,
) -> HttpResponse {
    let (view, order, pinning) = match candidates(&ledger, state) {
        Ok(found) => found,
        Err(err) => return ledger.finish_local(err),
    };
    let cfg = view.config.clone();
    let deadline = cfg.deadline.map(|d| ledger.info().started + d);
    let usage_body = usage_body(ledger.info());
    let mut out_of_time = false;
    'candidates: for (pos, &idx) in order.iter().enumerate() {
        let up = &cfg.upstreams[idx];
        let last = pos + 1 == order.len();
        let mut add_usage = usage_body.is_some()
            && up.force_usage
            && !state.stream_options_refused.refused(&cfg, &up.name);
        let mut tries = 0u32;
        rebuild_here(&mut ledger, state, &pinning, pos);
        let turn = Turn {
            req,
            client,
            state,
            view: &view,
            order: &order,
            pos,
            usage_body: &usage_body,
            pinning: &pinning,
        };
        loop {
            let info = ledger.info();
            let wait = attempt::first_byte_wait(up, info.stream, last, info.body.len());
            let Some(wait) = policy::attempt_wait(wait, time_left(deadline)) else {
                out_of_time = true;
                break 'candidates;
            };
            let stream = ledger.info().stream;
            let usage_body = usage_body.as_ref().filter(|_| add_usage);
            let plan = Plan {
                req,
                client,
                up,
                last,
                stream,
                pin: pinning.pin(),
                wait,
                usage_body,
            };
            let tried = try_upstream(&mut ledger, state, &cfg, plan).await;
            add_usage = tried.usage_added;
            let budget = policy::Budget {
                tries,
                retries: up.retries,
                may_retry: view.may_retry(idx),
                last,
                time_left: time_left(deadline),
                retry_after_max: cfg.retry_after_max,
                pin: pinning.pin(),
            };
            let next = policy::decide(&tried.outcome, &budget, rescue::backoff(tries));
            let pause = match execute(next, tried, ledger, &turn) {
                Step::Answered(response) => return response,
                Step::MoveOn(back) => {
                    ledger = back;
                    continue 'candidates;
                }
                Step::Retry(back, pause) => {
                    ledger = back;
                    pause
                }
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

/// 4b: the body with `stream_options.include_usage` added, when this request should get it.
fn usage_body(info: &RequestInfo) -> Option<Bytes> {
    let options = info.stream_options.clone();
    usage::usage_body(info.path(), info.stream, &info.body, options)
}

/// 4f: when the owner cannot answer and this candidate is where the chain goes on, the request
/// becomes the rebuilt, stateless one from here.
fn rebuild_here(ledger: &mut Ledger, state: &AppState, pinning: &affine::Pinning, pos: usize) {
    if let Some(rebuilt) = pinning.rebuild_at(pos) {
        ledger.info_mut().body = rebuilt.clone();
        ledger.marks.rebuilt = true;
        state.metrics.affinity("rebuilt");
    }
}

/// Where the attempt loop stands when it executes a decision.
struct Turn<'a> {
    req: &'a HttpRequest,
    client: &'a awc::Client,
    state: &'a AppState,
    view: &'a Arc<RegistryView>,
    order: &'a [usize],
    /// The candidate's position in `order`.
    pos: usize,
    usage_body: &'a Option<Bytes>,
    pinning: &'a affine::Pinning,
}

/// What the loop does once a decision is executed.
enum Step {
    /// The answer is on its way to the client.
    Answered(HttpResponse),
    /// The failure is counted; the same upstream is asked again after the pause.
    Retry(Ledger, Duration),
    /// The failure is counted; the next candidate follows (or the all-failed answer).
    MoveOn(Ledger),
}

/// Performs what the policy decided: relays the answer, or counts the failure for a retry here
/// or a move to the next candidate.
fn execute(next: Next, tried: Tried, mut ledger: Ledger, turn: &Turn<'_>) -> Step {
    let (view, pos) = (turn.view, turn.pos);
    let idx = turn.order[pos];
    let last = pos + 1 == turn.order.len();
    let (pause, failure) = match next {
        Next::Relay => {
            if tried.status.is_some_and(|s| (200..300).contains(&s)) {
                if let Some(up) = view.config.upstreams.get(idx) {
                    affine::answered(turn.state, turn.pinning, &up.name);
                }
            }
            let rest = &turn.order[pos + 1..];
            let resume = resume_plan(&ledger, turn.req, turn.client, rest, turn.usage_body);
            return Step::Answered(tried.relay(ledger, view, idx, None, resume));
        }
        Next::RelayFailure { cooldown } => {
            return Step::Answered(tried.relay(ledger, view, idx, cooldown, None))
        }
        Next::Retry { pause, cooldown } => (Some(pause), tried.failure(false, false, cooldown)),
        Next::MoveOn { quiet, cooldown } => (None, tried.failure(!last, quiet, cooldown)),
        Next::NotHere => {
            turn.state.metrics.affinity("not_here");
            (None, tried.failure(false, true, None))
        }
        Next::RelayNotHere => {
            turn.state.metrics.affinity("not_here");
            ledger.marks.not_here = true;
            return Step::Answered(tried.relay(ledger, view, idx, None, None));
        }
        Next::OwnerFailed { cooldown } => {
            ledger.failed(view, idx, tried.failure(false, false, cooldown));
            let err = affine::owner_failed(turn.state, turn.pinning, ledger.failures());
            return Step::Answered(ledger.finish_local(err));
        }
    };
    ledger.failed(view, idx, failure);
    match pause {
        Some(pause) => Step::Retry(ledger, pause),
        None => Step::MoveOn(ledger),
    }
}

/// The registry's view and this request's candidates in order (allow/deny, `lb_policy`,
/// cooldowns, `route_by_models`); none at all is a 404 naming the model.
fn candidates(
    ledger: &Ledger,
    state: &AppState,
) -> Result<(Arc<RegistryView>, Order, affine::Pinning), GatewayError> {
    let model = ledger.info().model.as_deref();
    let (view, mut order) = affine::candidates(state, ledger.info());
    crate::models::route_filter(state, &view.config, &mut order, model);
    if order.is_empty() {
        let model = model.unwrap_or_default().to_string();
        return Err(GatewayError::NoUpstreamForModel(model));
    }
    // 4f: the objects the request refers to pin it to their owner, or make "not here" apply.
    let pinning = affine::route(state, &view.config, ledger.info())
        .and_then(|route| affine::plan(state, &view, &mut order, ledger.info(), route))?;
    Ok((view, order, pinning))
}

/// What one attempt needs besides the ledger.
struct Plan<'a> {
    req: &'a HttpRequest,
    client: &'a awc::Client,
    up: &'a Upstream,
    /// No candidate follows.
    last: bool,
    /// A stream request: its first chunk is waited for too.
    stream: bool,
    /// What the request's objects make of this candidate (4f).
    pin: policy::Pin,
    /// How long the attempt may wait for its first byte (deadline applied).
    wait: Duration,
    /// The body with `stream_options` added (4b), when this attempt should carry it.
    usage_body: Option<&'a Bytes>,
}

/// One attempt, classified for the policy, with what executing its decision needs.
struct Tried {
    outcome: Outcome,
    /// The upstream's answer, when it gave one.
    answer: Option<(Upstreamed, Option<Bytes>)>,
    kind: FailKind,
    status: Option<u16>,
    /// `name: reason` text for the record, the log and the all-failed answer.
    reason: String,
    /// Attempt start to the response head (and first chunk, for streams).
    first_byte: Duration,
    /// The request carried the added `stream_options` (its usage chunk is then not relayed).
    usage_added: bool,
}

impl Tried {
    /// The attempt's failure as the ledger takes it.
    fn failure(&self, moving_on: bool, quiet: bool, cooldown: Option<Duration>) -> AttemptFailure {
        AttemptFailure {
            moving_on,
            quiet,
            cooldown,
            ..AttemptFailure::new(self.kind, self.status, self.reason.clone())
        }
    }

    /// Relays this attempt's answer to the client.
    fn relay(
        self,
        ledger: Ledger,
        view: &Arc<RegistryView>,
        idx: usize,
        cooldown: Option<Duration>,
        resume: Option<resume::ResumePlan>,
    ) -> HttpResponse {
        let Some((resp, first)) = self.answer else {
            // The policy relays only answered attempts; an answer is never lost silently.
            let err = GatewayError::AllFailed {
                timed_out: false,
                summary: self.reason,
            };
            return ledger.finish_local(err);
        };
        let at = respond::Committed {
            view,
            idx,
            first_byte: self.first_byte,
            usage_added: self.usage_added,
            cooldown,
            resume,
        };
        respond::respond(ledger, at, resp, first)
    }
}

/// Sends one attempt and classifies what came back. I/O only: the 4b repeat without an added
/// `stream_options` that the upstream refused, and the read of a 400's body when
/// `failover_codes` could move it on.
async fn try_upstream(
    ledger: &mut Ledger,
    state: &AppState,
    cfg: &Arc<Config>,
    plan: Plan<'_>,
) -> Tried {
    let Plan {
        req, client, up, ..
    } = plan;
    let stream = plan.stream;
    let base = plan.usage_body.unwrap_or(&ledger.info().body);
    let body = upstream_body(ledger.info(), up, base);
    let mut usage_added = plan.usage_body.is_some();
    let t0 = Instant::now();
    let trace = ledger.sent();
    let send = |body, trace| {
        actix_rt::time::timeout(
            plan.wait.saturating_sub(t0.elapsed()),
            attempt::attempt(client, up, req, body, stream, trace),
        )
    };
    let mut result = send(body, trace).await;
    if let (true, Ok(Ok((resp, first)))) = (usage_added, &mut result) {
        // 4b: a 400 naming the added `stream_options` is repeated once without it.
        if usage::refuses_stream_options(resp, first, plan.wait).await {
            usage_added = false;
            let body = upstream_body(ledger.info(), up, &ledger.info().body);
            let trace = ledger.sent();
            result = send(body, trace).await;
            // SPEC 4d (0.3): learnt only when the repeat without it succeeded.
            let ok = matches!(&result, Ok(Ok((r, _))) if r.status().is_success());
            state.stream_options_refused.learn(cfg, &up.name, ok);
        }
    }
    classify(result, &plan, cfg, t0, usage_added).await
}

/// What came back of an attempt (or its timeout), classified for the policy; a 400 whose body
/// `failover_codes` could move on is read first.
async fn classify(
    result: Result<Result<(Upstreamed, Option<Bytes>), AttemptError>, Elapsed>,
    plan: &Plan<'_>,
    cfg: &Config,
    t0: Instant,
    usage_added: bool,
) -> Tried {
    let wait = plan.wait;
    let (outcome, answer, kind, reason) = match result {
        Ok(Ok((mut resp, mut first))) => {
            let status = resp.status();
            let mut failover_code = None;
            let mut not_found = status.as_u16() == 404;
            let has_codes = !cfg.failover_codes.is_empty();
            if policy::wants_400_body_pinned(status.as_u16(), plan.last, has_codes, plan.pin) {
                let left = wait.saturating_sub(t0.elapsed());
                let (body, whole) = rescue::read_head_of_body(&mut resp, first.take(), left).await;
                failover_code = whole
                    .then(|| rescue::failover_code(&body, &cfg.failover_codes))
                    .flatten();
                not_found = whole && affine::is_not_here(400, Some(&body));
                first = (!body.is_empty()).then_some(body);
            }
            let reason = match &failover_code {
                // 4a: e.g. context_length_exceeded — another upstream may fit it.
                Some(code) => format!("HTTP 400 {code}"),
                // A 2xx is relayed, never a failure's reason: no string for every success.
                None if status.is_success() => String::new(),
                None => format!("HTTP {status}"),
            };
            let outcome = Outcome::Answered {
                status: status.as_u16(),
                failover_code: failover_code.is_some(),
                retry_after: rescue::retry_after(&resp, status),
                not_found,
            };
            (outcome, Some((resp, first)), FailKind::Http, reason)
        }
        Ok(Err(e)) => (
            Outcome::Failed {
                retry_same: e.retry_same,
            },
            None,
            e.kind,
            e.reason,
        ),
        Err(_) => {
            let what = if plan.stream {
                "no first chunk"
            } else {
                "no response head"
            };
            let reason = format!("{what} within {}", attempt::secs(wait));
            (Outcome::TimedOut, None, FailKind::Timeout, reason)
        }
    };
    let status = answer.as_ref().map(|(resp, _)| resp.status().as_u16());
    Tried {
        outcome,
        answer,
        kind,
        status,
        reason,
        first_byte: t0.elapsed(),
        usage_added,
    }
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
    // Not beyond the capture (SPEC 4d), nor beyond `resume_max_bytes` (4d, 0.3).
    let text_limit = match cfg.record_body_bytes {
        0 => crate::capture::UNLIMITED_CAPTURE - crate::capture::SLACK,
        n => n,
    }
    .min(cfg.limits.resume_max_bytes);
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
