//! What every worker shares: the config handle, the sinks every request's ledger writes to, the
//! model lists, the WebSocket sessions, and facts for the status page.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::config::SharedConfig;
use crate::ledger::Sinks;
use crate::models::lists::ModelsHandle;
use crate::realtime::sessions::Sessions;

/// Shared application state (`web::Data<AppState>`); everything in it is `Send + Sync`.
pub struct AppState {
    /// Current config (auth, limits); the registry swaps it on reload.
    pub config: SharedConfig,
    /// What a request's ledger writes to (metrics, health, records, alerts, owners, traces).
    pub sinks: Arc<Sinks>,
    /// Every upstream's model list and the `/v1/models` answer.
    pub models: ModelsHandle,
    /// Open WebSocket sessions' shutdown signal and limits.
    pub realtime: Sessions,
    /// Process start (uptime).
    pub started: Instant,
    /// Process start, wall clock.
    pub started_at: SystemTime,
    /// The address actually bound.
    pub listen: String,
    /// What `-database` resolved to, for the status page (never a password).
    pub database: String,
    /// The record store, for the reads of the usage page (None with `-database none`).
    pub store: Option<crate::records::Store>,
    /// The replicas sharing the PostgreSQL store (None without PostgreSQL).
    pub replicas: Option<crate::replicas::Roster>,
}
