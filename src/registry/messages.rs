//! What the request path and the status page say to the registry actor, and what it answers
//! and announces.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;

use crate::config::Config;
use crate::failure::FailKind;
use crate::history::UpstreamHistory;

/// What a probe (`probe_interval`) can come to: the `result` label of `probes_total`.
pub const PROBE_RESULTS: [&str; 4] = ["ok", "http_error", "timeout", "connect_error"];

/// What one attempt against one upstream came to.
#[derive(Debug, Clone)]
pub enum AttemptResult {
    /// The upstream's answer was committed to the client after this long.
    Ok {
        /// Attempt start to response head (and first chunk, for streams).
        first_byte: Duration,
    },
    /// The attempt failed.
    Failed {
        /// Failure class.
        kind: FailKind,
        /// Human summary, no secrets.
        reason: String,
        /// A `Retry-After` the upstream announced (429/503): its cooldown starts at once, whatever
        /// the failure count (see the rescue guide, "When an upstream breaks a stream").
        cooldown: Option<Duration>,
    },
}

/// Reported by the proxy for every attempt, and again if a committed stream breaks later.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct AttemptDone {
    /// Upstream name.
    pub upstream: String,
    /// What happened.
    pub result: AttemptResult,
}

/// Replaces the config (SIGHUP); health of upstreams with the same name is kept.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reload(pub Arc<Config>);

/// Asks for the state of every upstream, for the status page.
#[derive(Message)]
#[rtype(result = "Vec<UpstreamStatus>")]
pub struct GetSnapshot;

/// Health transitions worth an alert.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum HealthEvent {
    /// The upstream reached the failure threshold and goes to the back.
    CooldownStarted {
        /// Upstream name.
        upstream: String,
        /// Consecutive failures so far.
        failures: u32,
        /// The failure that tipped it.
        last_error: String,
        /// How long it stays at the back.
        cooldown: Duration,
    },
    /// A success after cooldown: it has its place back.
    Recovered {
        /// Upstream name.
        upstream: String,
    },
}

/// One upstream as the status page shows it.
#[derive(Debug, Clone)]
pub struct UpstreamStatus {
    /// Name.
    pub name: String,
    /// Endpoint without key or user info.
    pub endpoint: String,
    /// Header timeout.
    pub timeout: Duration,
    /// First-chunk timeout.
    pub stream_timeout: Duration,
    /// Allow patterns.
    pub allow: Vec<String>,
    /// Deny patterns.
    pub deny: Vec<String>,
    /// Consecutive failures.
    pub consecutive_failures: u32,
    /// Wall-clock end of the current cooldown, if cooling down.
    pub cooling_until: Option<SystemTime>,
    /// Whether it is below the failure threshold.
    pub healthy: bool,
    /// `probe_interval`, when probes are on.
    pub probes: Option<Duration>,
    /// The last probe's end and result (`ok`, `http_error`, `timeout`, `connect_error`).
    pub last_probe: Option<(SystemTime, &'static str)>,
    /// Successful attempts since start.
    pub ok: u64,
    /// Failed attempts since start.
    pub failed: u64,
    /// Last failure and when.
    pub last_error: Option<(SystemTime, String)>,
    /// Median of the recent first-byte latencies.
    pub recent_first_byte: Option<Duration>,
    /// Its last hour and token totals; read on the page's worker, without a lock.
    pub history: Arc<UpstreamHistory>,
}
