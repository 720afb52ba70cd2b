//! What a request's outcome is written to: the ledger gets these and nothing else of the
//! application, so no code below the handler can reach the whole shared state.

use std::sync::Arc;

use actix::prelude::*;

use crate::affinity::Owners;
use crate::metrics::Metrics;
use crate::notify::RequestFailed;
use crate::records::Recorder;
use crate::registry::RegistryHandle;
use crate::reject_gate::RejectGate;
use crate::shared_limits::Sharing;
use crate::trace::Tracer;

/// The sinks of every request's ledger, built once at start.
pub struct Sinks {
    /// Metric handles.
    pub metrics: Metrics,
    /// Health reports and the candidate view.
    pub registry: RegistryHandle,
    /// Request recording, None with `-database none`.
    pub recorder: Option<Recorder>,
    /// Where "failed everywhere" alerts go, None when no channel is configured.
    pub alerts: Option<Recipient<RequestFailed>>,
    /// Bounds the records of rejected requests, per reason (see the security guide).
    pub reject_gate: RejectGate,
    /// Which upstream owns which object (see the affinity guide).
    pub owners: Arc<Owners>,
    /// The trace exporter, None when tracing is off.
    pub tracer: Option<Tracer>,
    /// Members' limits shared with the other replicas of a PostgreSQL store (see the operations
    /// guide), None with another database.
    pub sharing: Option<Arc<Sharing>>,
}
