//! The config every worker reads, swapped whole by the registry actor on reload (SIGHUP).

use std::sync::{Arc, RwLock};

use super::Config;

/// The config every worker reads (auth, limits); swapped whole on reload.
#[derive(Clone)]
pub struct SharedConfig(Arc<RwLock<Arc<Config>>>);

impl SharedConfig {
    /// Wraps the first config.
    pub fn new(config: Arc<Config>) -> Self {
        SharedConfig(Arc::new(RwLock::new(config)))
    }

    /// The current config; cheap (an `Arc` clone under a read lock).
    pub fn get(&self) -> Arc<Config> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the config; only the registry actor calls it, on reload.
    pub(crate) fn set(&self, config: Arc<Config>) {
        match self.0.write() {
            Ok(mut g) => *g = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }
}
