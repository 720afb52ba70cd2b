//! The ledger's vocabulary: what is known about a request, one failed attempt as the request
//! path reports it, and how a relayed body ended.

use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix_web::http::header::HeaderValue;
use actix_web::http::{Method, Uri};
use actix_web::web::Bytes;

use crate::attempt::FailKind;

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
