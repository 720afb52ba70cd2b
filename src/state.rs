//! What every worker shares: config handle, actor addresses, metrics, and facts for the status page.

use std::time::{Instant, SystemTime};

use actix::prelude::*;

use crate::metrics::Metrics;
use crate::notify::RequestFailed;
use crate::records::Recorder;
use crate::registry::{RegistryHandle, SharedConfig};

/// Shared application state (`web::Data<AppState>`); everything in it is `Send + Sync`.
pub struct AppState {
    /// Current config (auth, limits); the registry swaps it on reload.
    pub config: SharedConfig,
    /// Candidate ordering and health.
    pub registry: RegistryHandle,
    /// Metric handles.
    pub metrics: Metrics,
    /// Request recording, None with `-database none`.
    pub recorder: Option<Recorder>,
    /// Where "failed everywhere" alerts go, None when no channel is configured.
    pub alerts: Option<Recipient<RequestFailed>>,
    /// Process start (uptime).
    pub started: Instant,
    /// Process start, wall clock.
    pub started_at: SystemTime,
    /// The address actually bound.
    pub listen: String,
    /// Every upstream's model list and the `/v1/models` answer (4b).
    pub models: crate::models::ModelsHandle,
    /// Upstreams that refused an added `stream_options` (4b), until the next reload.
    pub stream_options_refused: crate::usage::Refusals,
    /// What `-database` resolved to, for the status page (never a password).
    pub database: String,
    /// Bounds the records of rejected requests, per reason (SPEC 4d).
    pub reject_gate: crate::reject_gate::RejectGate,
    /// Open WebSocket sessions' shutdown signal (SPEC §4c).
    pub realtime: crate::realtime::Sessions,
    /// The trace exporter (SPEC 6a), None when tracing is off.
    pub tracer: Option<crate::trace::Tracer>,
    /// Upstreams seen ignoring a prefill (SPEC 4e): asked as with `prefill: none` until the next
    /// reload.
    pub prefill_ignored: crate::usage::Refusals,
    /// Which upstream owns which object (SPEC 4f).
    pub owners: std::sync::Arc<crate::affinity::Owners>,
}
