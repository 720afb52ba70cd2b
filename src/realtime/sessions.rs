//! The state every WebSocket session shares, held by the application state.
//!
//! In its own file, importing only the session limits, so that the application state can hold it
//! without importing the Realtime handler (which reads that state: an import circle otherwise).

use std::sync::Arc;

use tokio::sync::watch;

use super::limits::{BufferBudget, SessionCounts};

/// Every session's shared state: the shutdown signal (SIGTERM/SIGINT), the open-session counts
/// and the buffer budget (see the security guide, "Second probe (0.3): limits"). Cheap to clone;
/// lives in the application state.
#[derive(Clone)]
pub struct Sessions {
    shutdown: Arc<watch::Sender<bool>>,
    pub(super) counts: Arc<SessionCounts>,
    pub(super) budget: Arc<BufferBudget>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            shutdown: Arc::new(watch::channel(false).0),
            counts: Arc::default(),
            budget: Arc::default(),
        }
    }
}

impl Sessions {
    /// Sends every open (and any later) session a close frame with code 1001 on both sides.
    pub fn close_all(&self) {
        self.shutdown.send_replace(true);
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Bytes that partly received frames of all sessions hold now.
    pub fn buffered(&self) -> usize {
        self.budget.used()
    }
}
