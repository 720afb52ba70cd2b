//! One ledger per request: what is known about the request, and every outcome of its attempts.
//!
//! The ledger is the only caller of the four things a request's outcome feeds: the metrics, the
//! registry's health report, the all-failed alert and the record. Whether the request ends with
//! an answer the gateway makes itself, with an all-failed answer, or at the end (or break) of a
//! relayed body, it goes through one of the `finish` methods here, exactly once. (pingora's
//! per-request context with a single logging phase is the model.)

use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode, Uri};
use actix_web::web::Bytes;
use actix_web::HttpResponse;

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

/// What is known about a request before any upstream is tried; becomes its record.
pub struct RequestInfo {
    /// Wall-clock start.
    pub created_at: SystemTime,
    /// Monotonic start.
    pub started: Instant,
    /// Client address (None when the peer is unknown).
    pub ip: Option<IpAddr>,
    /// Method.
    pub method: Method,
    /// The request's URI, shared with the request (its path is cut where it is shown).
    pub uri: Uri,
    /// `model` from the body (shared among a worker's requests for the same model).
    pub model: Option<Arc<str>>,
    /// `"stream": true`.
    pub stream: bool,
    /// Where the top-level `stream_options` value sits in `body`, if the body has one.
    pub stream_options: Option<Range<usize>>,
    /// The body as received.
    pub body: Bytes,
    /// Client User-Agent, shared with the request (cut where it is stored).
    pub user_agent: Option<HeaderValue>,
    /// Non-secret token label, shared with the config.
    pub client_key: Option<Arc<str>>,
    /// `record_body_bytes`.
    pub body_limit: usize,
    /// A WebSocket session (SPEC 4c).
    pub websocket: bool,
    /// The client's valid W3C `traceparent`, if any (SPEC 6a).
    pub trace_parent: Option<crate::trace::context::Parent>,
    /// Its `tracestate`, passed on with it.
    pub tracestate: Option<HeaderValue>,
}

impl RequestInfo {
    /// The path without query, cut as the record keeps it (SPEC 4d).
    pub fn path(&self) -> &str {
        crate::records::cut_path(self.uri.path())
    }
}

/// One failed attempt as the request path reports it to the ledger.
#[derive(Debug, Clone)]
pub struct AttemptFailure {
    /// Failure class.
    pub kind: FailKind,
    /// The upstream's status, when it answered with one.
    pub status: Option<u16>,
    /// Human summary (may hold upstream text; escaped where logged).
    pub reason: String,
    /// Another candidate follows (counted in `failovers_total`).
    pub moving_on: bool,
    /// The `Retry-After` the upstream announced, as a cooldown.
    pub cooldown: Option<Duration>,
    /// Kept in the record only: not a health event, not an `upstream_requests_total` outcome.
    pub quiet: bool,
}

impl AttemptFailure {
    /// A failure that counts, not moving on, without cooldown.
    pub fn new(kind: FailKind, status: Option<u16>, reason: String) -> AttemptFailure {
        AttemptFailure {
            kind,
            status,
            reason,
            moving_on: false,
            cooldown: None,
            quiet: false,
        }
    }
}

/// How a relayed body ended.
#[derive(Debug)]
pub enum BodyEnd {
    /// To its proper end.
    Complete,
    /// The upstream broke or stalled; the reason.
    Broken(String),
    /// The client went away first.
    ClientGone,
    /// Ended without fault of the upstream's health, with a note for the record's `error`
    /// (a WebSocket session whose upstream left without a close frame).
    Noted(String),
}

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
    /// Its spans (SPEC 6a), None when tracing is off.
    trace: Trace,
}

impl Ledger {
    /// Opens the ledger of one request.
    pub fn open(state: Arc<AppState>, info: RequestInfo) -> Ledger {
        Ledger {
            trace: Trace::begin(
                state.tracer.as_ref(),
                info.trace_parent,
                &info.tracestate,
                info.created_at,
            ),
            state,
            info,
            failures: Vec::new(),
            attempts: 0,
            committed: None,
            resumed: 0,
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
        let ok = !is_failover_status(status);
        let up = view.config.upstreams.get(idx);
        self.trace.committed(up, status.as_u16(), first_byte, ok);
        if ok {
            self.answered(view, idx, first_byte);
        } else {
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

    /// The kind of the last failure, if any.
    pub fn last_failure(&self) -> Option<FailKind> {
        self.failures.last().map(|f| f.kind)
    }

    /// Ends a request the gateway answers itself: a refusal before any upstream (counted, and
    /// recorded within the rejected-records bound) or an all-failed answer (alerted).
    pub fn finish_local(mut self, err: GatewayError) -> HttpResponse {
        let mut resp = err.response();
        let status = resp.status().as_u16();
        self.end_trace(|| End {
            status,
            error: (status >= 500).then(|| err.to_string()),
            ..Default::default()
        });
        if self.attempts > 0 {
            resp.headers_mut().insert(
                header::HeaderName::from_static("x-upstream-attempts"),
                HeaderValue::from(self.attempts),
            );
        }
        let error = match err.rejection() {
            Some(reason) => {
                self.state.metrics.rejected(reason);
                if !self.admit_rejected_record() {
                    return resp;
                }
                err.to_string()
            }
            None => {
                if matches!(err, GatewayError::AllFailed { .. }) {
                    self.alert(resp.status().as_u16());
                }
                if self.failures.is_empty() {
                    err.to_string()
                } else {
                    summary(&self.failures)
                }
            }
        };
        if let Some(rec) = self.state.recorder.clone() {
            let status = resp.status().as_u16();
            rec.submit(self.into_record(
                status,
                None,
                Some(error),
                Reply::with_text(Some(err.body())),
                None,
                status < 400,
            ));
        }
        resp
    }

    /// Ends a request the gateway answered with content of its own (`/v1/models`). A 404 is a
    /// refusal like any other (counted; recorded within the rejected-records bound).
    pub fn finish_answered(mut self, status: StatusCode, body: &[u8]) {
        self.end_trace(|| End {
            status: status.as_u16(),
            complete: status.as_u16() < 400,
            ..Default::default()
        });
        if status == StatusCode::NOT_FOUND {
            self.state.metrics.rejected(Rejection::NotFound);
            if !self.admit_rejected_record() {
                return;
            }
        }
        if let Some(rec) = self.state.recorder.clone() {
            let ttfb = self.info.started.elapsed();
            let text = String::from_utf8_lossy(body).into_owned();
            rec.submit(self.into_record(
                status.as_u16(),
                None,
                None,
                Reply::with_text(Some(text)),
                Some(ttfb),
                status.as_u16() < 400,
            ));
        }
    }

    /// Whether one more refused request may be recorded this second (SPEC 4d).
    fn admit_rejected_record(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.state.reject_gate.admit(now)
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
        let complete = matches!(end, BodyEnd::Complete) && c.status < 400 && !reply.error_event;
        self.end_body_trace(c.status, complete, &reply, &end, c.broken);
        state
            .metrics
            .tokens(upstream, usage.prompt, usage.completion);
        state
            .registry
            .add_tokens(&c.view, c.idx, usage.prompt, usage.completion);
        if let Some(rec) = &state.recorder {
            let error = (!self.failures.is_empty()).then(|| summary(&self.failures));
            let upstream = c.view.config.upstreams.get(c.idx).map(|u| u.name.clone());
            // The whole answer reached the client: a non-error status, its body to the end, and
            // no in-band error event inside it (`complete`, above).
            rec.submit(self.into_record(c.status, upstream, error, reply, Some(c.ttfb), complete));
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
        }
    }
}
