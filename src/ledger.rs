//! One ledger per request: what is known about the request, and every outcome of its attempts.
//!
//! The ledger is the only caller of the four things a request's outcome feeds: the metrics, the
//! registry's health report, the all-failed alert and the record. Whether the request ends with
//! an answer the gateway makes itself, with an all-failed answer, or at the end (or break) of a
//! relayed body, it goes through one of the `finish` methods here, exactly once. (pingora's
//! per-request context with a single logging phase is the model.)

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use actix_web::HttpResponse;

use crate::affinity::rebuild;
use crate::attempt::{is_failover_status, summary, FailKind, Failure};
use crate::capture::Reply;
use crate::error::{GatewayError, Rejection};
use crate::escape::untrusted;
use crate::notify::RequestFailed;
use crate::records::Record;
use crate::registry::{AttemptResult, RegistryView};
use crate::state::AppState;
use crate::trace::{End, Trace};

mod traced;
mod types;

pub use self::types::{AttemptFailure, BodyEnd, RequestInfo};

/// The upstream whose answer went to the client.
struct Committed {
    view: Arc<RegistryView>,
    idx: usize,
    status: u16,
    ttfb: Duration,
    /// Whether the relayed status counts as a success for the upstream.
    ok: bool,
    /// Its stream broke and the break is already accounted for (a continuation may follow).
    broken: bool,
}

/// See the module docs.
pub struct Ledger {
    state: Arc<AppState>,
    info: RequestInfo,
    failures: Vec<Failure>,
    attempts: u32,
    committed: Option<Committed>,
    /// Continuations of a broken stream (SPEC 4a resume).
    resumed: u32,
    /// Cooldowns this request's failures announced (`Retry-After`): upstream name and end, for
    /// the `Retry-After` of a relayed 429 (SPEC 4e).
    cooling: Vec<(String, Instant)>,
    /// What SPEC 4f routing noted about the request.
    pub marks: crate::affinity::Marks,
    /// Its spans (SPEC 6a), None when tracing is off.
    trace: Trace,
}

impl Ledger {
    /// Opens the ledger of one request.
    pub fn open(state: Arc<AppState>, info: RequestInfo) -> Ledger {
        let tracer = state.tracer.as_ref();
        Ledger {
            trace: Trace::begin(tracer, info.trace_parent, &info.tracestate, info.created_at),
            state,
            info,
            failures: Vec::new(),
            attempts: 0,
            committed: None,
            resumed: 0,
            cooling: Vec::new(),
            marks: Default::default(),
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

    /// One more request went upstream; returns what it sends of the trace (tracing on).
    pub fn sent(&mut self) -> Option<crate::trace::Propagation> {
        self.attempts += 1;
        self.trace.sent()
    }

    /// Whether records are written (else the capture reads only the usage, for the metrics).
    pub fn recording(&self) -> bool {
        self.state.recorder.is_some()
    }

    /// Whether this request's spans are exported (SPEC 6a): what only a span needs is read then.
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

    /// An attempt against `view`'s upstream `idx` failed. Counted, reported to the registry
    /// (health) at once, and kept for the record — except a `quiet` one (a 400 that fails over by
    /// `failover_codes`, a prefill the upstream rejected), which only the record's `error` keeps
    /// (SPEC 4a).
    pub fn failed(&mut self, view: &RegistryView, idx: usize, f: AttemptFailure) {
        let up = view.config.upstreams.get(idx);
        self.trace.failed(up, f.status, f.kind.label(), &f.reason);
        let name = up.map_or("", |u| &*u.name);
        log::warn!(
            "{} {}: upstream {name} failed: {}",
            self.info.method,
            untrusted(self.info.path()),
            untrusted(&f.reason)
        );
        if f.moving_on {
            self.state.metrics.failover(name);
        }
        if let Some(d) = f.cooldown {
            self.cooling.push((name.to_string(), Instant::now() + d));
        }
        if !f.quiet {
            self.state.metrics.attempt(name, f.kind.label());
            self.state.registry.report_for(
                view,
                idx,
                self.info.model.as_deref(),
                AttemptResult::Failed {
                    kind: f.kind,
                    reason: f.reason.clone(),
                    cooldown: f.cooldown,
                },
            );
        }
        self.failures.push(Failure {
            upstream: name.to_string(),
            kind: f.kind,
            status: f.status,
            reason: f.reason,
        });
    }

    /// Another attempt on the same upstream follows (SPEC 4a `retries`).
    pub fn retrying(&self, view: &RegistryView, idx: usize) {
        if let Some(up) = view.config.upstreams.get(idx) {
            self.state.metrics.retry(&up.name);
        }
    }

    /// The answer of `view`'s upstream `idx` goes to the client. A failover status here is the
    /// last candidate's error, relayed but still a failure (and an all-failed alert for 429/5xx);
    /// `cooldown` is the `Retry-After` it announced.
    pub fn commit(
        &mut self,
        view: &Arc<RegistryView>,
        idx: usize,
        status: StatusCode,
        first_byte: Duration,
        cooldown: Option<Duration>,
    ) {
        let ok = !is_failover_status(status) && !self.marks.not_here;
        let up = view.config.upstreams.get(idx);
        self.trace.committed(up, status.as_u16(), first_byte, ok);
        if ok {
            self.answered(view, idx, first_byte);
        } else if !self.marks.not_here {
            let failure = AttemptFailure {
                cooldown,
                ..AttemptFailure::new(
                    FailKind::Http,
                    Some(status.as_u16()),
                    format!("HTTP {status}"),
                )
            };
            self.failed(view, idx, failure);
            if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                self.alert(status.as_u16());
            }
        }
        self.committed = Some(Committed {
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
            self.state
                .metrics
                .first_byte(&up.name, first_byte.as_secs_f64());
        }
        self.state.registry.report_for(
            view,
            idx,
            self.info.model.as_deref(),
            AttemptResult::Ok { first_byte },
        );
    }

    /// The shared state, for work that outlives a borrow of the ledger (a continuation).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// The committed stream broke; a continuation is about to be tried (SPEC 4a resume). The
    /// break counts now (health, `stream_error`), and once.
    pub fn stream_broke(&mut self, reason: String) {
        let Some(c) = self.committed.as_mut() else {
            return;
        };
        c.broken = true;
        let (view, idx) = (c.view.clone(), c.idx);
        self.failed(
            &view,
            idx,
            AttemptFailure::new(FailKind::Stream, None, reason),
        );
    }

    /// A continuation on `view`'s upstream `idx` took over the stream (SPEC 4a resume).
    pub fn resumed_on(&mut self, view: &Arc<RegistryView>, idx: usize, first_byte: Duration) {
        let up = view.config.upstreams.get(idx);
        self.trace.committed(up, 200, first_byte, true);
        self.answered(view, idx, first_byte);
        self.resumed += 1;
        if let Some(c) = self.committed.as_mut() {
            c.view = view.clone();
            c.idx = idx;
            c.ok = true;
            c.broken = false;
        }
    }

    /// A continuation's outcome on `view`'s upstream `idx`, for `resumes_total`.
    pub fn resume_result(&self, view: &RegistryView, idx: usize, result: &str) {
        if let Some(up) = view.config.upstreams.get(idx) {
            self.state.metrics.resume(&up.name, result);
        }
    }

    /// Whether the committed stream broke and its break is accounted for.
    pub fn is_broken(&self) -> bool {
        self.committed.as_ref().is_some_and(|c| c.broken)
    }

    /// The committed stream cannot be finished, for a reason that is not the upstream's fault
    /// (a regeneration that diverged): kept in the record's `error`, not a health event.
    pub fn unfinished(&mut self, view: &RegistryView, idx: usize, reason: String) {
        if let Some(c) = self.committed.as_mut() {
            c.broken = true;
        }
        self.trace.unfinished(&reason);
        let name = view.config.upstreams.get(idx).map_or("", |u| &*u.name);
        self.failures.push(Failure {
            upstream: name.to_string(),
            kind: FailKind::Stream,
            status: None,
            reason,
        });
    }

    /// Continuations so far.
    pub fn resumed(&self) -> u32 {
        self.resumed
    }

    /// How long until the first upstream that may serve this request leaves its cooldown, when
    /// every one of them is cooling down (else None: one may be tried now, or it is not known).
    /// Cooldowns come from the registry's latest view and from this request's own failures
    /// (whose report the registry may not have published yet).
    pub fn first_cooldown_end(&self) -> Option<Duration> {
        let view = self.state.registry.view();
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
                .filter(|(name, _)| *name == *up.name)
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

    /// Ends a request the gateway answers itself: a refusal before any upstream (counted, and
    /// recorded without its body within the per-reason bound, SPEC 4d) or an all-failed answer
    /// (alerted).
    pub fn finish_local(mut self, err: GatewayError) -> HttpResponse {
        let mut resp = err.response();
        let status = resp.status().as_u16();
        self.end_trace(|| End {
            status,
            error: (status >= 500).then(|| err.to_string()),
            ..Default::default()
        });
        if err.after_every_candidate() {
            // SPEC 4e: every candidate was tried; the client's SDK must not try them all again.
            resp.headers_mut().insert(
                header::HeaderName::from_static("x-should-retry"),
                HeaderValue::from_static("false"),
            );
        }
        if self.attempts > 0 {
            resp.headers_mut().insert(
                header::HeaderName::from_static("x-upstream-attempts"),
                HeaderValue::from(self.attempts),
            );
        }
        let (error, reply) = match err.rejection() {
            Some(reason) => {
                if !self.refused(Some(reason)) {
                    return resp;
                }
                (err.to_string(), Reply::default())
            }
            None if matches!(err, GatewayError::TooManySessions(_)) => {
                if !self.refused(None) {
                    return resp;
                }
                (err.to_string(), Reply::default())
            }
            None => {
                if err.after_every_candidate() {
                    self.alert(resp.status().as_u16());
                }
                let error = if self.failures.is_empty() {
                    err.to_string()
                } else {
                    summary(&self.failures)
                };
                (error, Reply::with_text(Some(err.body())))
            }
        };
        if let Some(rec) = self.state.recorder.clone() {
            let status = resp.status().as_u16();
            rec.submit(self.into_record(status, None, Some(error), reply, None, status < 400));
        }
        resp
    }

    /// Ends a request the gateway answered with content of its own (`/v1/models`). A success
    /// costs no upstream and is not recorded (only the HTTP metrics count it); a 404 is a refusal
    /// like any other (counted; recorded without a body within the per-reason bound).
    pub fn finish_answered(mut self, status: StatusCode) {
        let (status_code, complete) = (status.as_u16(), status.as_u16() < 400);
        self.end_trace(|| End {
            status: status_code,
            complete,
            ..Default::default()
        });
        if status != StatusCode::NOT_FOUND || !self.refused(Some(Rejection::NotFound)) {
            return;
        }
        if let Some(rec) = self.state.recorder.clone() {
            rec.submit(self.into_record(
                status.as_u16(),
                None,
                Some("model not found".to_string()),
                Reply::default(),
                None,
                false,
            ));
        }
    }

    /// Counts a refusal for `reason` (None: a handshake beyond the WebSocket session limits,
    /// which has no `rejected_total` reason) and says whether its record may be written (SPEC 4d:
    /// per reason, at most 10 a second and 1,000 an hour). A refused request's body is never kept.
    fn refused(&mut self, reason: Option<Rejection>) -> bool {
        // The second the record will show (its `created_at`), so that no second of records
        // holds more than the bound.
        let at = self
            .info
            .created_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.info.body = Bytes::new();
        match reason {
            Some(reason) => {
                self.state.metrics.rejected(reason);
                self.state.reject_gate.admit(reason, at)
            }
            None => self.state.reject_gate.admit_sessions_full(at),
        }
    }

    /// Ends a relayed response when its body ends, breaks, or the client goes away, with what
    /// the capture read of it.
    pub fn finish_body(mut self, end: BodyEnd, reply: Reply) {
        let Some(c) = self.committed.take() else {
            return;
        };
        let state = self.state.clone();
        let upstream = c.view.config.upstreams.get(c.idx).map_or("", |u| &*u.name);
        let outcome = match &end {
            // Already accounted for when it broke; no continuation could finish it.
            BodyEnd::Broken(_) if c.broken => None,
            BodyEnd::Broken(reason) => {
                log::warn!(
                    "{} {}: upstream {upstream} broke mid-response: {}",
                    self.info.method,
                    untrusted(self.info.path()),
                    untrusted(reason)
                );
                state.registry.report_for(
                    &c.view,
                    c.idx,
                    self.info.model.as_deref(),
                    AttemptResult::Failed {
                        kind: FailKind::Stream,
                        reason: reason.clone(),
                        cooldown: None,
                    },
                );
                self.failures.push(Failure {
                    upstream: upstream.to_string(),
                    kind: FailKind::Stream,
                    status: None,
                    reason: reason.clone(),
                });
                Some(FailKind::Stream.label())
            }
            BodyEnd::ClientGone => {
                log::info!(
                    "{} {}: client went away; upstream {upstream} request cancelled",
                    self.info.method,
                    untrusted(self.info.path()),
                );
                c.ok.then_some("ok")
            }
            BodyEnd::Complete => (c.ok && !c.broken).then_some("ok"),
            BodyEnd::Noted(note) => {
                self.failures.push(Failure {
                    upstream: upstream.to_string(),
                    kind: FailKind::Stream,
                    status: None,
                    reason: note.clone(),
                });
                c.ok.then_some("ok")
            }
        };
        if let Some(outcome) = outcome {
            state.metrics.attempt(upstream, outcome);
        }
        let usage = reply.usage;
        state
            .metrics
            .tokens(upstream, usage.prompt, usage.completion);
        state
            .registry
            .add_tokens(&c.view, c.idx, usage.prompt, usage.completion);
        // The whole answer reached the client: a non-error status, its body to the end, and no
        // in-band error event inside it.
        let complete = matches!(end, BodyEnd::Complete) && c.status < 400 && !reply.error_event;
        self.end_body_trace(c.status, complete, &reply, &end, c.broken);
        // SPEC 4f: the object this answer created, and for a Responses answer its chain link.
        let request = (&self.info.body[..], self.info.body_limit);
        let at = (&*state.owners, &*c.view.config, c.idx, c.status);
        let (object_id, items) = rebuild::object_of(at, reply.object.as_ref(), complete, request);
        if let Some(rec) = &state.recorder {
            let error = (!self.failures.is_empty()).then(|| summary(&self.failures));
            let upstream = c.view.config.upstreams.get(c.idx).map(|u| u.name.clone());
            let record = self.into_record(c.status, upstream, error, reply, Some(c.ttfb), complete);
            rec.submit(record.with_object(object_id, items));
        }
    }

    fn alert(&self, status: u16) {
        if let Some(alerts) = &self.state.alerts {
            alerts.do_send(RequestFailed {
                at: SystemTime::now(),
                ip: self.info.ip.map_or_else(String::new, |ip| ip.to_string()),
                method: self.info.method.to_string(),
                path: self.info.path().to_string(),
                model: self.info.model.as_deref().map(str::to_string),
                status,
                attempts: self.failures.iter().map(ToString::to_string).collect(),
            });
        }
    }

    /// The request's one record; `complete` says whether the client got the whole answer.
    fn into_record(
        self,
        status: u16,
        upstream: Option<Arc<str>>,
        error: Option<String>,
        reply: Reply,
        ttfb: Option<Duration>,
        complete: bool,
    ) -> Record {
        let info = self.info;
        let usage = reply.usage;
        Record {
            created_at: info.created_at,
            ip: info.ip,
            method: info.method,
            path: info.uri,
            model: info.model,
            stream: info.stream,
            upstream,
            status,
            attempts: self.attempts,
            error,
            request_body: info.body,
            response: reply.text,
            prompt_tokens: usage.prompt,
            completion_tokens: usage.completion,
            total_tokens: usage.total,
            ttfb_ms: ttfb.map(|d| d.as_millis() as u64),
            duration_ms: info.started.elapsed().as_millis() as u64,
            user_agent: info.user_agent,
            client_key: info.client_key,
            body_limit: info.body_limit,
            finish_reason: reply.finish_reason,
            resumed: self.resumed,
            complete,
            object_id: None,
            rebuilt: self.marks.rebuilt,
            response_items: None,
        }
    }
}
