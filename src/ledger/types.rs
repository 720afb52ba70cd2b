//! The ledger's vocabulary: what is known about a request, one failed attempt as the request
//! path reports it, and how a relayed body ended.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix_web::http::header::HeaderValue;
use actix_web::http::{Method, Uri};
use actix_web::web::Bytes;

use crate::failure::FailKind;
use crate::policy::Counts;

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
    /// What the one parse of the body found (see `facts`).
    pub facts: crate::facts::RequestFacts,
    /// The body as received.
    pub body: Bytes,
    /// Client User-Agent, shared with the request (cut where it is stored).
    pub user_agent: Option<HeaderValue>,
    /// Non-secret token label, shared with the config.
    pub client_key: Option<Arc<str>>,
    /// The member the token belongs to (see the members guide); None with `-noauth`.
    pub member: Option<Arc<str>>,
    /// `record_body_bytes`.
    pub body_limit: usize,
    /// A WebSocket session (see the observability guide, "Realtime API (WebSocket)").
    pub websocket: bool,
    /// The client's valid W3C `traceparent`, if any (see the tracing guide).
    pub trace_parent: Option<crate::trace::context::Parent>,
    /// Its `tracestate`, passed on with it.
    pub tracestate: Option<HeaderValue>,
}

impl RequestInfo {
    /// The path without query, cut as the record keeps it (see the security guide).
    pub fn path(&self) -> &str {
        crate::records::cut_path(self.uri.path())
    }

    /// What the status page's failed attempts say the request was about: its model and its
    /// API family.
    pub fn subject(&self) -> (Option<&str>, &'static str) {
        (
            self.model.as_deref(),
            crate::http_metrics::family(self.uri.path()),
        )
    }
}

/// One failed attempt as the request path reports it to the ledger.
#[derive(Debug, Clone)]
pub struct AttemptFailure {
    /// Failure class.
    pub kind: FailKind,
    /// The upstream's status, when it answered with one.
    pub status: Option<u16>,
    /// Human summary for the record, the log and the alert (may hold upstream text; escaped
    /// where logged).
    pub reason: String,
    /// The gateway's own description of the failure, for the status page and spans: never
    /// upstream text (see the security guide).
    pub public: String,
    /// Another candidate follows (counted in `failovers_total`).
    pub moving_on: bool,
    /// The `Retry-After` the upstream announced, as a cooldown.
    pub cooldown: Option<Duration>,
    /// Who hears of it (see the rescue guide, "Which failures count (0.4)").
    pub counts: Counts,
}

impl AttemptFailure {
    /// A failure that counts for health, not moving on, without cooldown; its public text is
    /// its reason (the caller's own words).
    pub fn new(kind: FailKind, status: Option<u16>, reason: String) -> AttemptFailure {
        AttemptFailure {
            kind,
            status,
            public: reason.clone(),
            reason,
            moving_on: false,
            cooldown: None,
            counts: Counts::Health,
        }
    }

    /// An upstream's failure status.
    pub fn http(status: u16) -> AttemptFailure {
        AttemptFailure::new(FailKind::Http, Some(status), http_reason(status))
    }
}

/// `HTTP 503 Service Unavailable`: how a status is named as a failure's reason.
pub fn http_reason(status: u16) -> String {
    match actix_web::http::StatusCode::from_u16(status) {
        Ok(s) => format!("HTTP {s}"),
        Err(_) => format!("HTTP {status}"),
    }
}

/// How a relayed body ended.
#[derive(Debug)]
pub enum BodyEnd {
    /// To its proper end.
    Complete,
    /// The upstream broke or stalled.
    Broken {
        /// Why, for the record and the log (may hold upstream text).
        reason: String,
        /// The gateway's own description, for the status page and spans.
        public: String,
    },
    /// The client went away first.
    ClientGone,
    /// Ended without fault of the upstream's health, with a note for the record's `error`
    /// (a WebSocket session whose upstream left without a close frame).
    Noted(String),
}
