//! Retention (`retention_days`, see the configuration guide): deleting old records, on the one
//! thread that writes rows — the spool's ingester, or without a spool the writer.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::{rfc3339, Shared, Store};

/// Deletes records older than `older_than` and logs how many (retention).
pub fn prune(store: &Store, shared: &Shared, older_than: Duration) {
    let cutoff = SystemTime::now() - older_than;
    match store.prune(cutoff) {
        Ok(n) => {
            if n > 0 {
                log::info!(
                    "retention: deleted {n} records older than {}",
                    rfc3339(cutoff)
                );
                let _ = shared
                    .rows
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                        Some(r.saturating_sub(n))
                    });
            }
        }
        Err(e) => log::error!("retention pruning failed: {}", e.message),
    }
}
