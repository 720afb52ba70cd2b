//! The vocabulary of one upstream attempt, shared by the request path, the ledger and the
//! registry: how an attempt failed, and which answers are failures at all (see the rescue guide,
//! "How failover and cooldown decide").
//!
//! Nearly a leaf: it imports only the pure attempt policy, so everything else may import it.

use std::fmt;

use actix_web::http::StatusCode;

/// Why an attempt failed; also the `outcome` label of the upstream request metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// The upstream answered with a failover status.
    Http,
    /// No answer (or no first chunk) in time.
    Timeout,
    /// Connection, TLS, or connection closed before the response head.
    Connect,
    /// A started response broke or stalled, or its first event was an error.
    Stream,
}

impl FailKind {
    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            FailKind::Http => "http_error",
            FailKind::Timeout => "timeout",
            FailKind::Connect => "connect_error",
            FailKind::Stream => "stream_error",
        }
    }
}

/// One failed attempt, as the all-failed answer, the record's `error` column, the log line and
/// the alert text render it (`name: reason`).
#[derive(Debug, Clone)]
pub struct Failure {
    /// The upstream's name.
    pub upstream: String,
    /// Failure class.
    pub kind: FailKind,
    /// The upstream's status, when it answered with one.
    pub status: Option<u16>,
    /// Human summary, no secrets; may hold upstream text (escape before logging).
    pub reason: String,
    /// The gateway's own description (never upstream text), for spans.
    pub public: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.upstream, self.reason)
    }
}

/// `name: reason; name: reason`, the form of the record's `error` column and the 502/504 message.
pub fn summary(failures: &[Failure]) -> String {
    joined(failures, |f| &f.reason)
}

/// `name: description; …` in the gateway's own words: what a span may show of the failures
/// (never text an upstream sent: see the security guide, "Upstream text stays with the
/// operator").
pub fn public_summary(failures: &[Failure]) -> String {
    joined(failures, |f| &f.public)
}

/// `name: text; …` of every failure, with the text `of` picks.
fn joined(failures: &[Failure], of: impl Fn(&Failure) -> &str) -> String {
    let mut out = String::new();
    for (i, f) in failures.iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        out.push_str(&f.upstream);
        out.push_str(": ");
        out.push_str(of(f));
    }
    out
}

/// Statuses after which the next upstream is tried (see the rescue guide, "How failover and
/// cooldown decide").
pub fn is_failover_status(s: StatusCode) -> bool {
    crate::policy::is_failover_status(s.as_u16())
}
