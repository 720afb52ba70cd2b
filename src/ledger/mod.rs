//! One ledger per request: what is known about the request, and every outcome of its attempts.
//!
//! The ledger is the only writer of what a request's outcome feeds: the metrics, the registry's
//! health report, the all-failed alert, the owners it teaches, the record and the trace. It gets
//! those sinks ([`Sinks`]) and nothing else of the application. Whether the request ends with an
//! answer the gateway makes itself, with an all-failed answer, or at the end (or break) of a
//! relayed body, it goes through one of the `finish` methods, exactly once. (pingora's
//! per-request context with a single logging phase is the model.)

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::HeaderValue;
use actix_web::http::StatusCode;

use crate::escape::untrusted;
use crate::failure::{FailKind, Failure};
use crate::policy::Counts;
use crate::registry::{AttemptResult, RegistryView};
use crate::trace::Trace;

mod finish;
mod member;
mod request_id;
mod sinks;
mod traced;
mod types;

pub use self::member::{openai_duration, MemberRef};
pub use self::request_id::new_request_id;
pub use self::sinks::Sinks;
pub use self::types::{http_reason, AttemptFailure, BodyEnd, RequestInfo};

/// How a committed answer counts for its upstream (see the rescue guide, "Which failures count
/// (0.4)").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A success (any status that is never failed over): health, first-byte time, `ok`.
    Ok,
    /// The last candidate's failure, relayed: counted as `counts` says; `cooldown` is the
    /// `Retry-After` it announced.
    Failure {
        /// Who hears of it.
        counts: Counts,
        /// Its `Retry-After`, as a cooldown.
        cooldown: Option<Duration>,
    },
    /// An answer that is neither (the owner's own "not found", an object "not here" anywhere):
    /// no health event, counted as `counts` says.
    Neutral {
        /// Who hears of it.
        counts: Counts,
    },
}

/// The upstream whose answer went to the client.
struct Answered {
    view: Arc<RegistryView>,
    idx: usize,
    status: u16,
    ttfb: Duration,
    /// Whether the relayed answer counts as a success for the upstream.
    ok: bool,
    /// Its stream broke and the break is already accounted for (a continuation may follow).
    broken: bool,
}

/// See the module docs.
pub struct Ledger {
    sinks: Arc<Sinks>,
    info: RequestInfo,
    failures: Vec<Failure>,
    attempts: u32,
    answered: Option<Answered>,
    /// Continuations of a broken stream (see the rescue guide, "Resume").
    resumed: u32,
    /// Cooldowns this request's own failures start (upstream index and end): what a relayed
    /// 429 says in `Retry-After` must not depend on when the registry publishes them.
    cooling: Vec<(usize, Instant)>,
    /// What routing by objects noted about the request.
    pub marks: crate::affinity::Marks,
    /// The `x-request-id` of the answer: the answering upstream's own, else one made here.
    request_id: HeaderValue,
    /// The member who sent it (none with `-noauth`).
    member: Option<MemberRef>,
    /// An object it deleted (its record makes the creating record forget it).
    pub forgets: crate::affinity::Forgotten,
    /// Ids whose owner it learned through "not here" (its record shares them with replicas).
    pub learned: Vec<Arc<str>>,
    /// Its spans, None when tracing is off.
    trace: Trace,
}

/// Holds one open WebSocket session in `openai_api_route_websocket_sessions`.
pub struct SessionGauge(crate::metrics::Metrics, String);

impl Drop for SessionGauge {
    fn drop(&mut self) {
        self.0.websocket_sessions(&self.1, -1);
    }
}

/// How a request's log lines name it: method, path (escaped, cut) and request id.
pub struct Who<'a>(&'a Ledger);

impl fmt::Display for Who<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let info = &self.0.info;
        let id = self.0.request_id.to_str().unwrap_or("?");
        write!(
            f,
            "{} {} [{}]",
            info.method,
            untrusted(info.path()),
            untrusted(id)
        )
    }
}

impl Ledger {
    /// Opens the ledger of one request.
    pub fn open(sinks: Arc<Sinks>, info: RequestInfo) -> Ledger {
        let tracer = sinks.tracer.as_ref();
        Ledger {
            trace: Trace::begin(tracer, info.trace_parent, &info.tracestate, info.created_at),
            sinks,
            info,
            failures: Vec::new(),
            attempts: 0,
            answered: None,
            resumed: 0,
            cooling: Vec::new(),
            marks: Default::default(),
            request_id: new_request_id(),
            member: None,
            forgets: None,
            learned: Vec::new(),
        }
    }

    /// The request.
    pub fn info(&self) -> &RequestInfo {
        &self.info
    }

    /// The request, while admission fills it in.
    pub fn info_mut(&mut self) -> &mut RequestInfo {
        &mut self.info
    }

    /// How log lines name this request.
    pub fn who(&self) -> Who<'_> {
        Who(self)
    }

    /// The answer's `x-request-id`.
    pub fn request_id(&self) -> &HeaderValue {
        &self.request_id
    }

    /// The answering upstream sent its own `x-request-id`: that one is the request's id.
    pub fn upstream_request_id(&mut self, id: &HeaderValue) {
        if !id.is_empty() && id.len() <= 256 {
            self.request_id = id.clone();
        }
    }

    /// The sinks, for the steps that write what only they know (owners learned on the way).
    pub fn sinks(&self) -> &Arc<Sinks> {
        &self.sinks
    }

    /// One more request went upstream; returns what it sends of the trace (tracing on).
    pub fn sent(&mut self) -> Option<crate::trace::Propagation> {
        self.attempts += 1;
        self.trace.sent()
    }

    /// Whether records are written (else the capture reads only the usage, for the metrics).
    pub fn recording(&self) -> bool {
        self.sinks.recorder.is_some()
    }

    /// Whether this request's spans are exported: what only a span needs is read then.
    pub fn traced(&self) -> bool {
        self.trace.exported()
    }

    /// Requests sent upstream so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The failures so far.
    pub fn failures(&self) -> &[Failure] {
        &self.failures
    }

    /// A WebSocket session on `upstream` opens: the session gauge counts it until the returned
    /// guard is dropped.
    pub fn session_gauge(&self, upstream: &str) -> SessionGauge {
        self.sinks.metrics.websocket_sessions(upstream, 1);
        SessionGauge(self.sinks.metrics.clone(), upstream.to_string())
    }

    /// Counts one `affinity_total` result (see the affinity guide).
    pub fn affinity(&self, result: &'static str) {
        self.sinks.metrics.affinity(result);
    }

    /// An attempt against `view`'s upstream `idx` failed, counted as `f.counts` says: a failure
    /// about the upstream feeds its health at once; one about the request only the metric and
    /// the record; a `Record` one (a `failover_codes` 400, a rejected prefill, "not here") only
    /// the record's `error`.
    pub fn failed(&mut self, view: &Arc<RegistryView>, idx: usize, f: AttemptFailure) {
        let up = view.config.upstreams.get(idx);
        self.trace.failed(up, f.status, f.kind.label(), &f.public);
        let name = up.map_or("", |u| &*u.name);
        log::warn!(
            "{}: upstream {name} failed: {}",
            self.who(),
            untrusted(&f.reason)
        );
        if f.moving_on {
            self.sinks.metrics.failover(name);
        }
        match f.counts {
            Counts::Health => {
                self.sinks.metrics.attempt(name, f.kind.label());
                let cooldown = f
                    .cooldown
                    .or_else(|| view.at_threshold(idx).then_some(view.config.cooldown));
                if let Some(d) = cooldown {
                    self.cooling.push((idx, Instant::now() + d));
                }
                self.sinks.registry.report_for(
                    view,
                    idx,
                    self.info.subject(),
                    AttemptResult::Failed {
                        kind: f.kind,
                        reason: f.public.clone(),
                        cooldown: f.cooldown,
                    },
                );
            }
            Counts::Request => self.sinks.metrics.attempt(name, FailKind::Http.label()),
            Counts::Record => {}
        }
        self.failures.push(Failure {
            upstream: name.to_string(),
            kind: f.kind,
            status: f.status,
            reason: f.reason,
            public: f.public,
        });
    }

    /// Another attempt on the same upstream follows (see the rescue guide, `retries`).
    pub fn retrying(&self, view: &RegistryView, idx: usize) {
        if let Some(up) = view.config.upstreams.get(idx) {
            self.sinks.metrics.retry(&up.name);
        }
    }

    /// The answer of `view`'s upstream `idx` goes to the client, counted as `verdict` says. A
    /// relayed failure of 429 or 5xx raises the all-failed alert.
    pub fn commit(
        &mut self,
        view: &Arc<RegistryView>,
        idx: usize,
        status: StatusCode,
        first_byte: Duration,
        verdict: Verdict,
    ) {
        let ok = verdict == Verdict::Ok;
        let up = view.config.upstreams.get(idx);
        self.trace.committed(up, status.as_u16(), first_byte, ok);
        match verdict {
            Verdict::Ok => self.answered(view, idx, first_byte),
            Verdict::Failure { counts, cooldown } => {
                let failure = AttemptFailure {
                    cooldown,
                    counts,
                    ..AttemptFailure::http(status.as_u16())
                };
                self.failed(view, idx, failure);
                let counted = counts == Counts::Health;
                if counted && (status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error())
                {
                    self.alert(status.as_u16());
                }
            }
            Verdict::Neutral { counts } => {
                if counts == Counts::Request {
                    let name = up.map_or("", |u| &*u.name);
                    self.sinks.metrics.attempt(name, FailKind::Http.label());
                }
            }
        }
        self.answered = Some(Answered {
            view: view.clone(),
            idx,
            status: status.as_u16(),
            ttfb: self.info.started.elapsed(),
            ok,
            broken: false,
        });
    }

    /// A successful answer of `view`'s upstream `idx`: its first-byte time and the health report.
    fn answered(&self, view: &RegistryView, idx: usize, first_byte: Duration) {
        if let Some(up) = view.config.upstreams.get(idx) {
            self.sinks
                .metrics
                .first_byte(&up.name, first_byte.as_secs_f64());
        }
        self.sinks.registry.report_for(
            view,
            idx,
            self.info.subject(),
            AttemptResult::Ok { first_byte },
        );
    }

    /// The committed stream broke; a continuation is about to be tried (see the rescue guide).
    /// The break counts now (health, `stream_error`), and once.
    pub fn stream_broke(&mut self, reason: String, public: &str) {
        let Some(c) = self.answered.as_mut() else {
            return;
        };
        c.broken = true;
        let (view, idx) = (c.view.clone(), c.idx);
        let failure = AttemptFailure {
            public: public.to_string(),
            ..AttemptFailure::new(FailKind::Stream, None, reason)
        };
        self.failed(&view, idx, failure);
    }

    /// A continuation on `view`'s upstream `idx` took over the stream.
    pub fn resumed_on(&mut self, view: &Arc<RegistryView>, idx: usize, first_byte: Duration) {
        let up = view.config.upstreams.get(idx);
        self.trace.committed(up, 200, first_byte, true);
        self.answered(view, idx, first_byte);
        self.resumed += 1;
        if let Some(c) = self.answered.as_mut() {
            c.view = view.clone();
            c.idx = idx;
            c.ok = true;
            c.broken = false;
        }
    }

    /// A continuation's outcome on `view`'s upstream `idx`, for `resumes_total`.
    pub fn resume_result(&self, view: &RegistryView, idx: usize, result: &str) {
        if let Some(up) = view.config.upstreams.get(idx) {
            self.sinks.metrics.resume(&up.name, result);
        }
    }

    /// Whether the committed stream broke and its break is accounted for.
    pub fn is_broken(&self) -> bool {
        self.answered.as_ref().is_some_and(|c| c.broken)
    }

    /// The committed stream cannot be finished, for a reason that is not the upstream's fault
    /// (a regeneration that diverged): kept in the record's `error`, not a health event.
    pub fn unfinished(&mut self, view: &RegistryView, idx: usize, reason: String) {
        if let Some(c) = self.answered.as_mut() {
            c.broken = true;
        }
        self.trace.unfinished(&reason);
        let name = view.config.upstreams.get(idx).map_or("", |u| &*u.name);
        self.failures.push(Failure {
            upstream: name.to_string(),
            kind: FailKind::Stream,
            status: None,
            public: reason.clone(),
            reason,
        });
    }

    /// Continuations so far.
    pub fn resumed(&self) -> u32 {
        self.resumed
    }

    /// How long until the first upstream that may serve this request leaves its cooldown, when
    /// every one of them is cooling down (else None: one may be tried now, or it is not known).
    /// The cooldowns this request's own failures started count at once, whether or not the
    /// registry has published them yet.
    pub fn first_cooldown_end(&self, view: &RegistryView) -> Option<Duration> {
        let model = self.info.model.as_deref();
        let now = Instant::now();
        let mut first: Option<Instant> = None;
        for (idx, up) in view.config.upstreams.iter().enumerate() {
            if !up.admits(model) {
                continue;
            }
            let own = self
                .cooling
                .iter()
                .filter(|(i, _)| *i == idx)
                .map(|(_, until)| *until)
                .max();
            let until = own.max(view.cooling_until(idx)).filter(|u| *u > now)?;
            first = Some(first.map_or(until, |f| f.min(until)));
        }
        first.map(|f| f - now)
    }

    /// The kind of the last failure, if any.
    pub fn last_failure(&self) -> Option<FailKind> {
        self.failures.last().map(|f| f.kind)
    }
}

/// Where a request's attempt outcomes are written: its ledger, or (for a continuation running
/// inside a relayed body) a log the ledger takes in afterwards.
pub trait Accounts {
    /// One more request goes upstream; what it sends of the trace.
    fn sent(&mut self) -> Option<crate::trace::Propagation>;
    /// An attempt against `view`'s upstream `idx` failed.
    fn failed(&mut self, view: &Arc<RegistryView>, idx: usize, f: AttemptFailure);
    /// Another attempt on the same upstream follows.
    fn retrying(&mut self, view: &RegistryView, idx: usize);
    /// Counts one `affinity_total` result (see the affinity guide).
    fn affinity(&mut self, result: &'static str);
}

impl Accounts for Ledger {
    fn sent(&mut self) -> Option<crate::trace::Propagation> {
        Ledger::sent(self)
    }

    fn failed(&mut self, view: &Arc<RegistryView>, idx: usize, f: AttemptFailure) {
        Ledger::failed(self, view, idx, f)
    }

    fn retrying(&mut self, view: &RegistryView, idx: usize) {
        Ledger::retrying(self, view, idx)
    }

    fn affinity(&mut self, result: &'static str) {
        Ledger::affinity(self, result)
    }
}
