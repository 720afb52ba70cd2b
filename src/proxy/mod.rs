//! The `/v1/*` handler (see the rescue guide), top to bottom: admit (auth, body, its one
//! parse) → plan (candidates, objects) → the attempt engine → respond → relay.
//!
//! Failover is decided only before the first byte goes to the client: on the response head for
//! ordinary requests, on the head *and* first event for stream requests. Every outcome goes
//! into the request's [`Ledger`], which alone writes metrics, health, alerts and the record.

pub mod attempt;
pub mod body;
pub mod continuation;
pub mod ends;
pub mod engine;
pub mod lists;
pub mod plan;
pub mod relay;
pub mod rescue;
pub mod respond;
pub mod resume;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::CONTENT_TYPE;
use actix_web::http::Method;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};

use crate::admission::member::member_rules;
use crate::admission::{body as read, Admitted, Counting};
use crate::config::Upstream;
use crate::error::GatewayError;
use crate::escape::untrusted;
use crate::facts;
use crate::failure::FailKind;
use crate::include_usage::{self, UsageEdit};
use crate::ledger::{Ledger, Verdict};
use crate::policy::{Counts, Next, Outcome, Pin};
use crate::registry::RegistryView;
use crate::state::AppState;

use self::attempt::Upstreamed;
use self::engine::{Attempt, Attempter, Ended, Run, Tried};
use self::plan::Plan;

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
/// reads: the body, bounded in size and time, and its one parse (see the security guide).
async fn admit_request(
    req: &HttpRequest,
    payload: web::Payload,
    state: &web::Data<AppState>,
) -> Result<Ledger, (Ledger, GatewayError)> {
    let Admitted {
        mut ledger,
        config: cfg,
    } = crate::admission::admit(req, state, Counting::Counted)
        .map_err(|refused| refused.into_parts())?;
    let body = actix_rt::time::timeout(
        cfg.body_timeout,
        read::read_body(req, payload, cfg.max_body_bytes),
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
        if let Some(enc) = read::unreadable_encoding(req) {
            let err = GatewayError::BadRequest(format!(
                "the request body has Content-Encoding {:?}, which the gateway cannot read; send it uncompressed",
                untrusted(enc)
            ));
            return Err((ledger, err));
        }
    }
    if let Some(refused) = read::not_utf8_json(req.headers().get(CONTENT_TYPE), &body) {
        return Err((ledger, GatewayError::BadRequest(refused.0)));
    }
    let facts = match facts::read(&body) {
        Ok(facts) => facts,
        Err(refused) => return Err((ledger, GatewayError::BadRequest(refused.0))),
    };
    let info = ledger.info_mut();
    info.body = body;
    info.model = facts.model.clone();
    info.stream = facts.stream;
    info.facts = facts;
    // The member's rules, then its place (a refused request counts toward no limit).
    let placed = match member_rules(&ledger, &cfg) {
        Ok(()) => ledger.take_place().await,
        Err(e) => Err(e),
    };
    if let Err(e) = placed {
        return Err((ledger, e));
    }
    Ok(ledger)
}

/// Plans the request, runs the engine over its candidates, and answers with what it ended with.
async fn forward(
    req: &HttpRequest,
    mut ledger: Ledger,
    state: &AppState,
    client: &awc::Client,
) -> HttpResponse {
    let mut plan = match plan::plan(&ledger, &state.sinks.registry, &state.models) {
        Ok(plan) => plan,
        Err(err) => return ledger.finish_local(err),
    };
    let view = plan.view.clone();
    let cfg = view.config.clone();
    let info = ledger.info();
    let usage = include_usage::usage_edit(
        info.path(),
        info.stream,
        &info.body,
        info.facts.stream_options.clone(),
    );
    let run = Run {
        view: &view,
        order: &plan.order.clone(),
        deadline: cfg.deadline.map(|d| info.started + d),
        committed: false,
        retry_after_max: cfg.retry_after_max,
    };
    let mut http = Http {
        req,
        client,
        plan: &mut plan,
        usage: usage.as_ref(),
        usage_added: false,
    };
    let ended = engine::run(run, &mut http, &mut ledger).await;
    let usage_added = http.usage_added;
    match ended {
        Ended::Answer {
            pos,
            idx,
            tried,
            next,
        } => {
            let verdict = verdict(&next, &tried, plan.pin(pos));
            let answer = Answer {
                pos,
                idx,
                verdict,
                usage_added,
                replaced: None,
            };
            let (tried, replaced) = match own_list(&ledger, &view.config, tried).await {
                Ok(t) => t,
                Err(err) => return ledger.finish_local(err),
            };
            let answer = Answer { replaced, ..answer };
            relay(ledger, (&view, &plan), answer, tried, (req, client, usage))
        }
        Ended::OwnerFailed => {
            let err = plan::owner_failed(&ledger, &plan);
            ledger.finish_local(err)
        }
        Ended::AllFailed { timed_out } => {
            let err = GatewayError::AllFailed {
                timed_out: timed_out || ledger.last_failure() == Some(FailKind::Timeout),
                summary: crate::failure::summary(ledger.failures()),
            };
            ledger.finish_local(err)
        }
    }
}

/// How a relayed answer counts for its upstream.
fn verdict<A>(next: &Next, tried: &Tried<A>, pin: Pin) -> Verdict {
    let not_found = matches!(
        tried.outcome,
        Outcome::Answered {
            not_found: true,
            ..
        }
    );
    match *next {
        // 0.4: the owner's own "not found" is its answer, not a failure (see the affinity guide).
        Next::Relay if not_found && matches!(pin, Pin::Owner { .. }) => Verdict::Neutral {
            counts: Counts::Request,
        },
        Next::RelayFailure { cooldown, counts } => Verdict::Failure { counts, cooldown },
        Next::RelayNotHere => Verdict::Neutral {
            counts: Counts::Record,
        },
        _ => Verdict::Ok,
    }
}

/// The answer chosen by the engine.
struct Answer {
    pos: usize,
    idx: usize,
    verdict: Verdict,
    usage_added: bool,
    /// The body was read and rewritten (a member's own list): its new length.
    replaced: Option<u64>,
}

/// Relays the chosen answer: owners learned or forgotten on a 2xx, the continuation plan, then
/// the response.
fn relay(
    mut ledger: Ledger,
    (view, plan): (&Arc<RegistryView>, &Plan),
    answer: Answer,
    tried: Tried<(Upstreamed, Option<Bytes>)>,
    (req, client, usage): (&HttpRequest, &awc::Client, Option<UsageEdit>),
) -> HttpResponse {
    let Some((resp, first)) = tried.answer else {
        // The engine relays only answered attempts; an answer is never lost silently.
        let err = GatewayError::AllFailed {
            timed_out: false,
            summary: tried.reason,
        };
        return ledger.finish_local(err);
    };
    let up = view.config.upstreams.get(answer.idx);
    if let (true, Some(up)) = (resp.status().is_success(), up) {
        learned(&mut ledger, plan, &up.name);
    }
    let rest = plan.order.get(answer.pos + 1..).unwrap_or_default();
    let resume = match answer.verdict {
        Verdict::Ok if resp.status().is_success() => {
            continuation::plan_for(&ledger, view, req, client, rest, usage)
        }
        _ => None,
    };
    let at = respond::Committed {
        view,
        idx: answer.idx,
        first_byte: tried.first_byte,
        usage_added: answer.usage_added,
        verdict: answer.verdict,
        resume,
        replaced: answer.replaced,
    };
    respond::respond(ledger, at, resp, first)
}

/// A list answered to a member that sees only its own objects keeps only those (read whole
/// for it; see `lists`).
async fn own_list(
    ledger: &Ledger,
    cfg: &crate::config::Config,
    mut tried: Tried<(Upstreamed, Option<Bytes>)>,
) -> Result<(Tried<(Upstreamed, Option<Bytes>)>, Option<u64>), GatewayError> {
    use crate::config::Objects;
    let info = ledger.info();
    let Some(m) = ledger.member().filter(|m| m.objects == Objects::Own) else {
        return Ok((tried, None));
    };
    let Some((resp, first)) = tried.answer.as_mut() else {
        return Ok((tried, None));
    };
    if info.method != Method::GET || !lists::is_list(info.path()) || !resp.status().is_success() {
        return Ok((tried, None));
    }
    let mut body = actix_web::web::BytesMut::new();
    if let Some(f) = first.take() {
        body.extend_from_slice(&f);
    }
    let rest = resp
        .body()
        .limit(lists::LIST_MAX)
        .await
        .map_err(|e| GatewayError::AllFailed {
            timed_out: false,
            summary: format!("the list answer could not be read: {e}"),
        })?;
    body.extend_from_slice(&rest);
    let owners = &ledger.sinks().owners;
    let keep = |id: &str| owners.member_of(id, cfg).is_some_and(|o| o == m.name);
    // A list that is not a JSON object shows nothing rather than everything.
    let kept = lists::keep_own(&body, keep).unwrap_or_else(|| lists::EMPTY.to_vec());
    let len = kept.len() as u64;
    *first = Some(Bytes::from(kept));
    Ok((tried, Some(len)))
}

/// A 2xx answer from `upstream`: it owns the ids the plan lets it learn; a `DELETE` of an owned
/// object forgets it (see the affinity guide, "Deleted is gone").
fn learned(ledger: &mut Ledger, plan: &Plan, upstream: &Arc<str>) {
    let owners = ledger.sinks().owners.clone();
    let info = ledger.info();
    if info.method == Method::DELETE {
        // The object deleted is the one the path ends with (`DELETE /v1/files/{id}`); a
        // `DELETE /v1/vector_stores/{vs}/files/{file}` removes a file from a store, not the store.
        let path = info.uri.path().trim_end_matches('/').to_string();
        let last = crate::affinity::refs::path_ids(&path).last();
        if let Some(id) = last.filter(|id| path.ends_with(&format!("/{id}"))) {
            if owners.forget(id) {
                ledger.forgets = Some(id.into());
            }
        }
        return;
    }
    if plan.rebuilt.is_some() && plan.rebuild_from.is_some() {
        return;
    }
    for id in &plan.learn {
        match owners.learn(id, upstream) {
            Ok(()) => {
                ledger.affinity("learned");
                ledger.learned.push(Arc::from(&**id));
            }
            Err(first) => {
                ledger.affinity("conflict");
                log::warn!(
                    "{}: upstream {upstream} answered for {:?}, which upstream {first} owns; the first owner keeps it",
                    ledger.who(),
                    untrusted(id)
                );
            }
        }
    }
}

/// How a request is sent to one upstream over HTTP (the [`Attempter`] of the engine).
struct Http<'a> {
    req: &'a HttpRequest,
    client: &'a awc::Client,
    plan: &'a mut Plan,
    /// The edit that asks for usage, when the request should carry it (see the observability
    /// guide, "Models and token usage (0.2)").
    usage: Option<&'a UsageEdit>,
    /// The last attempt carried the added `stream_options`.
    usage_added: bool,
}

impl Attempter<Ledger> for Http<'_> {
    type Answer = (Upstreamed, Option<Bytes>);

    fn wait(&self, up: &Upstream, last: bool, ledger: &Ledger) -> Duration {
        let info = ledger.info();
        let model = info.model.as_deref();
        let over = self.plan.view.config.model_timeout(model);
        attempt::first_byte_wait(up, over, info.stream, last, info.body.len())
    }

    fn pin(&self, pos: usize) -> Pin {
        self.plan.pin(pos)
    }

    async fn attempt(&mut self, a: Attempt<'_>, ledger: &mut Ledger) -> Tried<Self::Answer> {
        if let Some(rebuilt) = self.plan.rebuild_at(a.pos).cloned() {
            rebuild_here(ledger, rebuilt);
        }
        let view = self.plan.view.clone();
        let add_usage =
            self.usage.is_some() && a.up.force_usage && !view.learned.refuses_usage(a.idx);
        let info = ledger.info();
        let stream = info.stream;
        let usage = self.usage.filter(|_| add_usage);
        let extras = body::Extras {
            usage,
            prefill: None,
        };
        let upstream_body = body::for_upstream(&info.body, &info.facts, a.up, extras);
        let t0 = Instant::now();
        let trace = ledger.sent();
        let send = |body, trace| {
            actix_rt::time::timeout(
                a.wait.saturating_sub(t0.elapsed()),
                attempt::attempt(self.client, a.up, self.req, body, stream, trace),
            )
        };
        let mut result = send(upstream_body, trace).await;
        let mut usage_added = add_usage;
        if let (true, Ok(Ok((resp, first)))) = (add_usage, &mut result) {
            // A 400 naming the added `stream_options` is repeated once without it.
            if include_usage::refuses_stream_options(resp, first, a.wait).await {
                usage_added = false;
                let info = ledger.info();
                let extras = body::Extras::default();
                let plain = body::for_upstream(&info.body, &info.facts, a.up, extras);
                let trace = ledger.sent();
                result = send(plain, trace).await;
                // Learnt only when the repeat without it succeeded.
                let ok = matches!(&result, Ok(Ok((r, _))) if r.status().is_success());
                view.learned.usage_refused(a.idx, &a.up.name, ok);
            }
        }
        self.usage_added = usage_added;
        let failover_codes = &view.config.failover_codes;
        attempt::classify_result(result, &a, stream, failover_codes, t0).await
    }

    fn rebuild_from(&mut self, pos: usize, _ledger: &mut Ledger) -> bool {
        if self.plan.rebuilt.is_none() {
            return false;
        }
        self.plan.rebuild_from = Some(pos);
        true
    }
}

/// From here the request goes out as the rebuilt, stateless chain (see the affinity guide): its
/// body and what the one parse of it says replace the client's.
fn rebuild_here(ledger: &mut Ledger, rebuilt: Bytes) {
    let facts = facts::read(&rebuilt).unwrap_or_default();
    let info = ledger.info_mut();
    info.body = rebuilt;
    info.facts = facts;
    ledger.marks.rebuilt = true;
    ledger.affinity("rebuilt");
}
