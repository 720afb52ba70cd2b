//! The continuation of a broken stream (see the rescue guide, "Resume"): what the request path
//! hands the relay so that a stream can be continued ([`ResumePlan`]), and the search for an
//! upstream that continues it, through the one attempt engine ([`continuation`]). The relay
//! applies what happened on the way ([`Op`]) to the request's ledger.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use actix_web::HttpRequest;

use crate::config::{Prefill, Upstream};
use crate::facts::RequestFacts;
use crate::failure::{is_failover_status, FailKind};
use crate::include_usage::UsageEdit;
use crate::ledger::{Accounts, AttemptFailure, Ledger};
use crate::policy::Counts;
use crate::registry::RegistryView;
use crate::trace::{Link, Propagation, Started};

use super::attempt::{self as one, Upstreamed};
use super::body;
use super::engine::{self, Attempt, Attempter, Ended, Run, Tried};

/// What the request path hands the relay so that a broken stream can be continued.
pub struct ResumePlan {
    /// The worker's upstream client.
    pub client: awc::Client,
    /// The client's request (method, path, query, headers).
    pub req: HttpRequest,
    /// Candidates not tried yet, in order.
    pub remaining: Vec<usize>,
    /// The edit that asks for usage (see the observability guide, "Models and token usage
    /// (0.2)"), when the request carries it.
    pub usage: Option<UsageEdit>,
    /// Text beyond this is not resumed: it outgrew the capture, or `resume_max_bytes` (see the
    /// security guide), so that a first upstream cannot make the next one read an unbounded
    /// prefill.
    pub text_limit: usize,
}

/// How a stream may be continued if it breaks (`resume: true`): for a single-choice chat stream,
/// when candidates are left.
pub fn plan_for(
    ledger: &Ledger,
    view: &RegistryView,
    req: &HttpRequest,
    client: &awc::Client,
    rest: &[usize],
    usage: Option<UsageEdit>,
) -> Option<ResumePlan> {
    let info = ledger.info();
    let cfg = &view.config;
    let chat = info.path() == "/v1/chat/completions";
    if !cfg.resume || rest.is_empty() || !info.stream || !chat || info.facts.many_choices {
        return None;
    }
    // Not beyond the capture, nor beyond `resume_max_bytes`.
    let text_limit = match cfg.record_body_bytes {
        0 => crate::capture::UNLIMITED_CAPTURE - crate::capture::SLACK,
        n => n,
    }
    .min(cfg.limits.resume_max_bytes);
    Some(ResumePlan {
        client: client.clone(),
        req: req.clone(),
        remaining: rest.to_vec(),
        usage,
        text_limit,
    })
}

/// A continuation's result, applied to the ledger by the relay.
pub struct Continued {
    /// What happened on the way, in order.
    pub ops: Vec<Op>,
    /// The upstream that took over, or why none did.
    pub outcome: Result<Switch, String>,
}

/// One accountable step of a continuation.
pub enum Op {
    /// A request went upstream (its attempt span, when traced).
    Sent(Option<Started>),
    /// An attempt failed.
    Failed(usize, AttemptFailure),
    /// Another attempt on the same upstream follows.
    Retrying(usize),
    /// A `resumes_total` result.
    Result(usize, &'static str),
}

/// The upstream that continues the stream.
pub struct Switch {
    /// Its index in the view.
    pub idx: usize,
    /// Its response, head (and first event) read.
    pub resp: Upstreamed,
    /// What was read of its body.
    pub first: Option<Bytes>,
    /// Attempt start to first event.
    pub first_byte: Duration,
    /// It is a regeneration (relayed only past the text already sent).
    pub regenerate: bool,
    /// It carries the added `stream_options`.
    pub usage_added: bool,
}

/// A continuation in flight: what it did, and the candidates it leaves.
pub type PendingContinuation = Pin<Box<dyn Future<Output = (Continued, Vec<usize>)>>>;

/// How a continuation asks an upstream (the engine's attempter): the text already sent as a
/// prefill in the upstream's dialect, or (where it cannot take one, or rejects it with a 4xx)
/// the original request again, as a regeneration. Owned: it runs while the relay is polled.
pub struct Continue {
    client: awc::Client,
    req: HttpRequest,
    view: Arc<RegistryView>,
    body: Bytes,
    facts: RequestFacts,
    model: Option<Arc<str>>,
    usage: Option<UsageEdit>,
    text: String,
    /// The request's trace, when traced: each attempt sends its own `traceparent`.
    trace: Option<Link>,
    /// The last attempt was a regeneration.
    regenerate: bool,
    /// The last attempt carried the added `stream_options`.
    usage_added: bool,
}

impl Continue {
    /// A continuation of the request in `ledger`, whose client already has `text`.
    pub fn new(plan: &ResumePlan, view: Arc<RegistryView>, ledger: &Ledger, text: String) -> Self {
        let info = ledger.info();
        Continue {
            client: plan.client.clone(),
            req: plan.req.clone(),
            view,
            body: info.body.clone(),
            facts: info.facts.clone(),
            model: info.model.clone(),
            usage: plan.usage.clone(),
            text,
            trace: ledger.trace_link(),
            regenerate: false,
            usage_added: false,
        }
    }
}

/// The accounts of a continuation: kept as [`Op`]s for the relay to apply to the ledger.
struct OpsLog {
    ops: Vec<Op>,
    trace: Option<Link>,
    /// Candidates that failed, for `resumes_total{result="failed"}`.
    failed: Vec<usize>,
}

impl Accounts for OpsLog {
    fn sent(&mut self) -> Option<Propagation> {
        let (started, trace) = traced(&self.trace);
        self.ops.push(Op::Sent(started));
        trace
    }

    fn failed(&mut self, _view: &Arc<RegistryView>, idx: usize, f: AttemptFailure) {
        if f.counts != Counts::Record && !self.failed.contains(&idx) {
            self.failed.push(idx);
        }
        self.ops.push(Op::Failed(idx, f));
    }

    fn retrying(&mut self, _view: &RegistryView, idx: usize) {
        self.ops.push(Op::Retrying(idx));
    }

    fn affinity(&mut self, _result: &'static str) {}
}

impl Attempter<OpsLog> for Continue {
    type Answer = (Upstreamed, Option<Bytes>);

    fn wait(&self, up: &Upstream, last: bool, _log: &OpsLog) -> Duration {
        let over = self.view.config.model_timeout(self.model.as_deref());
        one::first_byte_wait(up, over, true, last, self.body.len())
    }

    async fn attempt(&mut self, a: Attempt<'_>, log: &mut OpsLog) -> Tried<Self::Answer> {
        let learned = &self.view.learned;
        let add_usage = self.usage.is_some() && a.up.force_usage && !learned.refuses_usage(a.idx);
        let usage = self.usage.as_ref().filter(|_| add_usage);
        // An upstream seen ignoring a prefill is asked as if it had `prefill: none`.
        let takes_prefill = a.up.prefill != Prefill::None && !learned.ignores_prefill(a.idx);
        let prefill =
            (!self.text.is_empty() && takes_prefill).then_some((self.text.as_str(), a.up.prefill));
        self.regenerate = !self.text.is_empty() && prefill.is_none();
        self.usage_added = add_usage;
        let extras = body::Extras { usage, prefill };
        let with_prefill = body::for_upstream(&self.body, &self.facts, a.up, extras);
        let t0 = Instant::now();
        let trace = log.sent();
        let send = one::attempt(&self.client, a.up, &self.req, with_prefill, true, trace);
        let mut result = actix_rt::time::timeout(a.wait, send).await;
        let rejected = match &result {
            Ok(Ok((resp, _))) => {
                let status = resp.status();
                prefill.is_some() && status.is_client_error() && !is_failover_status(status)
            }
            _ => false,
        };
        if rejected {
            // It cannot take a prefill: answer again, and relay what follows the text.
            if let Ok(Ok((resp, _))) = &result {
                let status = resp.status();
                log.failed(
                    &self.view,
                    a.idx,
                    AttemptFailure {
                        counts: Counts::Record,
                        ..AttemptFailure::new(
                            FailKind::Http,
                            Some(status.as_u16()),
                            format!("prefill refused: HTTP {status}"),
                        )
                    },
                );
            }
            log.ops.push(Op::Result(a.idx, "rejected"));
            self.regenerate = true;
            let extras = body::Extras {
                usage,
                prefill: None,
            };
            let plain = body::for_upstream(&self.body, &self.facts, a.up, extras);
            let trace = log.sent();
            let send = one::attempt(&self.client, a.up, &self.req, plain, true, trace);
            let left = a.wait.saturating_sub(t0.elapsed());
            result = actix_rt::time::timeout(left, send).await;
        }
        one::classify_result(result, &a, true, &[], t0).await
    }
}

/// Finds an upstream to continue the stream: the remaining candidates in turn, through the
/// engine (so `retries`, `Retry-After` and which failures count apply as to any attempt; the
/// client already has part of the answer, so only a 2xx takes over).
pub async fn continuation(mut ctx: Continue, remaining: Vec<usize>) -> (Continued, Vec<usize>) {
    let view = ctx.view.clone();
    let mut log = OpsLog {
        ops: Vec::new(),
        trace: ctx.trace.clone(),
        failed: Vec::new(),
    };
    let run = Run {
        view: &view,
        order: &remaining,
        deadline: None,
        committed: true,
        retry_after_max: view.config.retry_after_max,
    };
    let ended = engine::run(run, &mut ctx, &mut log).await;
    let (outcome, rest) = match ended {
        Ended::Answer {
            pos, idx, tried, ..
        } => match tried.answer {
            Some((resp, first)) => {
                let switch = Switch {
                    idx,
                    resp,
                    first,
                    first_byte: tried.first_byte,
                    regenerate: ctx.regenerate,
                    usage_added: ctx.usage_added,
                };
                let rest = remaining.get(pos + 1..).unwrap_or_default().to_vec();
                (Ok(switch), rest)
            }
            None => (
                Err("no candidate left to continue the stream".into()),
                Vec::new(),
            ),
        },
        _ => (
            Err("no candidate left to continue the stream".into()),
            Vec::new(),
        ),
    };
    let took = outcome.as_ref().ok().map(|s| s.idx);
    for &idx in log.failed.iter().filter(|&&i| Some(i) != took) {
        log.ops.push(Op::Result(idx, "failed"));
    }
    let ops = log.ops;
    (Continued { ops, outcome }, rest)
}

/// A continuation attempt's span and trace headers, when the request is traced.
fn traced(link: &Option<Link>) -> (Option<Started>, Option<Propagation>) {
    match link.as_ref().map(Link::attempt) {
        Some((s, p)) => (Some(s), Some(p)),
        None => (None, None),
    }
}
