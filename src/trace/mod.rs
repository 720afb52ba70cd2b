//! OpenTelemetry traces (see the tracing guide): one server span per `/v1/*` request or WebSocket
//! session, one client span per upstream attempt, exported as OTLP/HTTP protobuf by a thread of
//! its own.
//!
//! The request path only fills in plain structs ([`RequestTrace`], held by the request's ledger)
//! and, when the request ends, hands them to a bounded queue with `try_send`: it never encodes,
//! never waits and never does I/O for a trace. Encoding and the HTTP POST happen on the exporter
//! thread ([`export`]); a full queue or a failed export drops spans and counts them in
//! `openai_api_route_spans_dropped_total`. With tracing off there is no [`Tracer`] and the
//! ledger's trace is `None`: nothing is allocated or computed.
//!
//! The span structs have no field for a body, a key, a token or reply text: what cannot be
//! stored cannot leak.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, Uri};

pub mod context;
pub mod export;
mod http;
pub mod proto;
pub mod settings;

pub use self::context::{Sampler, SpanId, TraceId};
pub use self::export::Tracer;
pub use self::settings::Settings;

use self::context::{new_span_id, new_trace_id, Parent};
use crate::capture::FinishReason;
use crate::config::Upstream;

/// Nanoseconds since the Unix epoch, as OTLP wants times.
pub fn now_ns() -> u64 {
    unix_ns(SystemTime::now())
}

/// `t` in nanoseconds since the Unix epoch.
pub fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Where an attempt span is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Sent; no outcome yet.
    Open,
    /// Its answer goes to the client; the span ends with the body.
    Committed,
    /// Ended.
    Closed,
}

/// One upstream attempt (a client span).
#[derive(Debug, Clone)]
pub struct AttemptSpan {
    /// Its span id (the one its `traceparent` carried upstream).
    pub span_id: SpanId,
    /// Start and end, Unix nanoseconds.
    pub start: u64,
    /// See `start`; 0 while not ended.
    pub end: u64,
    /// When the response head (and first chunk, for streams) arrived.
    pub first_byte: Option<u64>,
    /// The upstream's name (from the config).
    pub upstream: Option<Arc<str>>,
    /// Its `Host` (from the config: host and port, never user info).
    pub address: Option<HeaderValue>,
    /// The HTTP status it answered with.
    pub status: Option<u16>,
    /// `ok` or a failure class label (`upstream_requests_total`'s outcomes).
    pub outcome: &'static str,
    /// Why it failed (the span's error status), bounded.
    pub error: Option<String>,
    /// It continued a broken stream (`resume`: see the rescue guide).
    pub continuation: bool,
    /// See [`Phase`].
    pub phase: Phase,
}

/// The request's server span, as it is exported.
#[derive(Debug, Clone)]
pub struct ServerSpan {
    /// The trace.
    pub trace_id: TraceId,
    /// The server span's id.
    pub span_id: SpanId,
    /// The client's span, when it sent a valid `traceparent`.
    pub parent: Option<SpanId>,
    /// The client's `tracestate`, passed on.
    pub tracestate: Option<HeaderValue>,
    /// Start and end, Unix nanoseconds.
    pub start: u64,
    /// See `start`.
    pub end: u64,
    /// What the request was and how it ended (the attribute values).
    pub request: End,
}

/// One request's spans, handed to the exporter when the request ends.
#[derive(Debug)]
pub struct Finished {
    /// The server span.
    pub server: ServerSpan,
    /// Its attempts, in order.
    pub attempts: Vec<AttemptSpan>,
}

impl Finished {
    /// Spans in it (what a drop loses).
    pub fn len(&self) -> usize {
        1 + self.attempts.len()
    }

    /// Never empty (it has its server span); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What an upstream attempt sends of the trace: its own `traceparent` (the client's is never
/// passed on as is) and the client's `tracestate` only beside a valid client `traceparent`.
#[derive(Debug, Clone)]
pub struct Propagation {
    /// `00-<trace>-<attempt span>-<flags>`.
    pub traceparent: HeaderValue,
    /// The client's, when its `traceparent` was valid.
    pub tracestate: Option<HeaderValue>,
}

impl Propagation {
    /// Writes the trace headers into an upstream request's `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT, self.traceparent.clone());
        match &self.tracestate {
            Some(ts) => headers.insert(TRACESTATE, ts.clone()),
            None => headers.remove(TRACESTATE),
        };
    }
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// What a continuation (which runs apart from the ledger) needs to make attempt spans of the
/// request's trace.
#[derive(Debug, Clone)]
pub struct Link {
    trace_id: TraceId,
    sampled: bool,
    tracestate: Option<HeaderValue>,
}

impl Link {
    /// A new attempt: its start and what it sends.
    pub fn attempt(&self) -> (Started, Propagation) {
        let span_id = new_span_id();
        let traceparent = context::traceparent(&self.trace_id, &span_id, self.sampled);
        let started = Started {
            span_id,
            start: now_ns(),
        };
        let tracestate = self.tracestate.clone();
        (
            started,
            Propagation {
                traceparent,
                tracestate,
            },
        )
    }
}

/// An attempt span's id and start, made where the request goes out.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    span_id: SpanId,
    start: u64,
}

/// The longest error text a span keeps.
const MAX_ERROR: usize = 256;

/// `s` cut to at most [`MAX_ERROR`] bytes on a character boundary.
fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_ERROR);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// How a request ends, as its server span reports it.
#[derive(Debug, Default, Clone)]
pub struct End {
    /// Request method.
    pub method: Method,
    /// Request URI (only its path is exported).
    pub uri: Uri,
    /// `model` of the request (or the WebSocket query).
    pub model: Option<Arc<str>>,
    /// The client token's non-secret label.
    pub client_key: Option<Arc<str>>,
    /// A WebSocket session.
    pub websocket: bool,
    /// Requests sent upstream.
    pub attempts: u32,
    /// Continuations of a broken stream.
    pub resumed: u32,
    /// Sent as a rebuilt chain (see the affinity guide, "Rebuilding a Responses chain").
    pub rebuilt: bool,
    /// Status sent to the client.
    pub status: u16,
    /// The client got the whole answer.
    pub complete: bool,
    /// Usage reported by the upstream.
    pub input_tokens: Option<i64>,
    /// See `input_tokens`.
    pub output_tokens: Option<i64>,
    /// The last `finish_reason`.
    pub finish_reason: Option<FinishReason>,
    /// The failure of a 5xx answer.
    pub error: Option<String>,
    /// The model that answered, as the reply names it (read when records are kept).
    pub response_model: Option<String>,
    /// How the committed attempt's body ended, when not properly: its outcome, and the failure
    /// (None when it is not the upstream's: the client went away).
    pub body_error: Option<(&'static str, Option<String>)>,
    /// The answer's `x-request-id` (`openai_api_route.request_id`).
    pub request_id: Option<actix_web::http::header::HeaderValue>,
}

/// One request's trace state, held by its ledger (see the module docs).
#[derive(Debug)]
pub struct RequestTrace {
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    tracestate: Option<HeaderValue>,
    sampled: bool,
    start: u64,
    attempts: Vec<AttemptSpan>,
    rebuilt: bool,
}

impl RequestTrace {
    /// Starts a request's trace: the client's (if its `traceparent` is valid) or a new one.
    pub fn begin(
        sampler: &Sampler,
        parent: Option<Parent>,
        tracestate: Option<HeaderValue>,
        started: SystemTime,
    ) -> RequestTrace {
        let trace_id = parent.map_or_else(new_trace_id, |p| p.trace_id);
        RequestTrace {
            trace_id,
            span_id: new_span_id(),
            sampled: sampler.sample(&trace_id, parent.as_ref()),
            parent: parent.map(|p| p.span_id),
            tracestate: parent.and(tracestate),
            start: unix_ns(started),
            attempts: Vec::new(),
            rebuilt: false,
        }
    }

    /// Whether the trace is exported.
    pub fn sampled(&self) -> bool {
        self.sampled
    }

    /// The trace id and the server span's id.
    pub fn ids(&self) -> (TraceId, SpanId) {
        (self.trace_id, self.span_id)
    }

    /// For continuations that run apart from the ledger.
    pub fn link(&self) -> Link {
        Link {
            trace_id: self.trace_id,
            sampled: self.sampled,
            tracestate: self.tracestate.clone(),
        }
    }

    /// An attempt goes out now; returns what it sends of the trace.
    pub fn sent(&mut self) -> Propagation {
        let (started, tp) = self.link().attempt();
        self.started(started, false);
        tp
    }

    /// An attempt made with [`Link::attempt`] went out (`continuation`: of a broken stream).
    pub fn started(&mut self, s: Started, continuation: bool) {
        if !self.sampled {
            return;
        }
        // One that never got an outcome (an attempt repeated at once) ends here.
        self.close_open("repeated", None);
        self.attempts.push(AttemptSpan {
            span_id: s.span_id,
            start: s.start,
            end: 0,
            first_byte: None,
            upstream: None,
            address: None,
            status: None,
            outcome: "",
            error: None,
            continuation,
            phase: Phase::Open,
        });
    }

    fn close_open(&mut self, outcome: &'static str, error: Option<&str>) {
        if let Some(a) = self
            .attempts
            .iter_mut()
            .rev()
            .find(|a| a.phase == Phase::Open)
        {
            a.phase = Phase::Closed;
            a.end = now_ns();
            a.outcome = outcome;
            a.error = error.map(bounded);
        }
    }

    /// The attempt in flight (else the committed one, whose stream broke) failed on `up`.
    pub fn failed(
        &mut self,
        up: Option<&Upstream>,
        status: Option<u16>,
        outcome: &'static str,
        reason: &str,
    ) {
        let Some(a) = self.current(&[Phase::Open, Phase::Committed]) else {
            return;
        };
        name(a, up);
        a.phase = Phase::Closed;
        a.end = now_ns();
        a.status = status.or(a.status);
        a.outcome = outcome;
        a.error = Some(bounded(reason));
    }

    /// The attempt in flight answered; its answer goes to the client (`ok`: not a failure).
    pub fn committed(
        &mut self,
        up: Option<&Upstream>,
        status: u16,
        first_byte: Duration,
        ok: bool,
    ) {
        let Some(a) = self.current(&[Phase::Open]) else {
            return;
        };
        name(a, up);
        a.first_byte = Some(a.start.saturating_add(first_byte.as_nanos() as u64));
        a.status = Some(status);
        a.phase = Phase::Committed;
        if !ok {
            a.outcome = "http_error";
            a.error = Some(format!("HTTP {status}"));
        }
    }

    /// The committed stream cannot be finished (a regeneration that diverged).
    pub fn unfinished(&mut self, reason: &str) {
        if let Some(a) = self.current(&[Phase::Committed]) {
            a.phase = Phase::Closed;
            a.end = now_ns();
            a.outcome = "stream_error";
            a.error = Some(bounded(reason));
        }
    }

    /// The request was sent as a rebuilt chain (see the affinity guide, "Rebuilding a Responses
    /// chain").
    pub fn mark_rebuilt(&mut self) {
        self.rebuilt = true;
    }

    fn current(&mut self, phases: &[Phase]) -> Option<&mut AttemptSpan> {
        self.attempts
            .iter_mut()
            .rev()
            .find(|a| phases.contains(&a.phase))
    }

    /// Ends the trace and queues its spans on `tracer`.
    fn finish(mut self, tracer: &Tracer, end: End) {
        let now = now_ns();
        for a in &mut self.attempts {
            match a.phase {
                Phase::Closed => continue,
                Phase::Open => a.outcome = "cancelled",
                Phase::Committed => match &end.body_error {
                    Some((outcome, why)) => {
                        a.outcome = outcome;
                        a.error = why.as_deref().map(bounded);
                    }
                    None if a.outcome.is_empty() => a.outcome = "ok",
                    None => {}
                },
            }
            a.phase = Phase::Closed;
            a.end = now;
        }
        let rebuilt = self.rebuilt || end.rebuilt;
        let error = end.error.as_deref().map(bounded);
        let server = ServerSpan {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent: self.parent,
            tracestate: self.tracestate,
            start: self.start,
            end: now,
            request: End {
                rebuilt,
                error,
                ..end
            },
        };
        tracer.submit(Finished {
            server,
            attempts: self.attempts,
        });
    }
}

/// The ledger's handle on its request's trace: every method does nothing (and allocates
/// nothing) when tracing is off.
#[derive(Debug, Default)]
pub struct Trace(Option<RequestTrace>);

impl Trace {
    /// The trace of a request that began at `started`, continuing the client's `parent`.
    pub fn begin(
        tracer: Option<&Tracer>,
        parent: Option<Parent>,
        tracestate: &Option<HeaderValue>,
        started: SystemTime,
    ) -> Trace {
        Trace(tracer.map(|t| RequestTrace::begin(t.sampler(), parent, tracestate.clone(), started)))
    }

    /// Whether this request's spans will be exported (tracing on and the request sampled).
    pub fn exported(&self) -> bool {
        self.0.as_ref().is_some_and(RequestTrace::sampled)
    }

    /// The request's trace state, None when tracing is off.
    pub fn get(&mut self) -> Option<&mut RequestTrace> {
        self.0.as_mut()
    }

    /// An attempt goes out now; what it sends of the trace.
    pub fn sent(&mut self) -> Option<Propagation> {
        self.0.as_mut().map(RequestTrace::sent)
    }

    /// A continuation's attempt went out (made with [`Link::attempt`]).
    pub fn sent_as(&mut self, started: Option<Started>) {
        if let (Some(t), Some(s)) = (self.0.as_mut(), started) {
            t.started(s, true);
        }
    }

    /// For attempts made apart from the ledger (continuations).
    pub fn link(&self) -> Option<Link> {
        self.0.as_ref().map(RequestTrace::link)
    }

    /// See [`RequestTrace::failed`].
    pub fn failed(
        &mut self,
        up: Option<&Upstream>,
        status: Option<u16>,
        kind: &'static str,
        why: &str,
    ) {
        if let Some(t) = self.0.as_mut() {
            t.failed(up, status, kind, why);
        }
    }

    /// See [`RequestTrace::committed`].
    pub fn committed(
        &mut self,
        up: Option<&Upstream>,
        status: u16,
        first_byte: Duration,
        ok: bool,
    ) {
        if let Some(t) = self.0.as_mut() {
            t.committed(up, status, first_byte, ok);
        }
    }

    /// See [`RequestTrace::unfinished`].
    pub fn unfinished(&mut self, reason: &str) {
        if let Some(t) = self.0.as_mut() {
            t.unfinished(reason);
        }
    }

    /// Ends the trace with what `end` says and queues it on `tracer` when it is sampled (`end`
    /// is not even called otherwise).
    pub fn end(&mut self, tracer: Option<&Tracer>, end: impl FnOnce() -> End) {
        if let (Some(t), Some(tracer)) = (self.0.take(), tracer) {
            if t.sampled {
                t.finish(tracer, end());
            }
        }
    }
}

/// Names an attempt span after the upstream it went to (once known).
fn name(a: &mut AttemptSpan, up: Option<&Upstream>) {
    if let (None, Some(up)) = (&a.upstream, up) {
        a.upstream = Some(up.name.clone());
        a.address = up.origin.host().cloned();
    }
}

/// The GenAI operation a request is (semantic conventions' `gen_ai.operation.name`; see the
/// tracing guide, "What is in a trace"), None for the API's other endpoints.
pub fn operation(method: &Method, path: &str, websocket: bool) -> Option<&'static str> {
    if websocket {
        return Some("realtime");
    }
    if *method != Method::POST {
        return None;
    }
    match path {
        "/v1/chat/completions" | "/v1/responses" => Some("chat"),
        "/v1/completions" => Some("text_completion"),
        "/v1/embeddings" => Some("embeddings"),
        _ => None,
    }
}
