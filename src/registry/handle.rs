//! The request path's handle on the registry: candidates from the published view, outcomes to
//! the actor, or straight into the shared counters when nothing changes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use actix::prelude::*;

use super::messages::{AttemptDone, AttemptResult, GetSnapshot, Reload, UpstreamStatus};
use super::view::{Order, RegistryView};
use super::UpstreamRegistry;
use crate::config::Config;
use crate::failure::FailKind;
use crate::history::{clip, FailedAttempt, FailureLog, TEXT_MAX};

/// The request path's handle on the registry: candidates from the published view, outcomes to
/// the actor (or, for a success on a healthy upstream, straight into the shared counters).
#[derive(Clone)]
pub struct RegistryHandle {
    pub(super) view: Arc<RwLock<Arc<RegistryView>>>,
    pub(super) rr: Arc<AtomicUsize>,
    pub(super) addr: Addr<UpstreamRegistry>,
    pub(super) failures: Arc<FailureLog>,
}

impl RegistryHandle {
    /// The current view (an `Arc` clone under a read lock).
    pub fn view(&self) -> Arc<RegistryView> {
        match self.view.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The ordered candidates of `view` for a request's model; `key` is the request's affinity
    /// key, for `sticky` (see the affinity guide).
    pub fn order(&self, view: &RegistryView, model: Option<&str>, key: Option<&[u8]>) -> Order {
        view.candidates(model, &self.rr, key)
    }

    /// Reports one attempt for a request about `model` of the API `family` (the `endpoint`
    /// label's value): health, the status page's last hour and, for a failure, the list of
    /// recent failed attempts. Every attempt is counted once here.
    pub fn report_for(
        &self,
        view: &RegistryView,
        idx: usize,
        (model, family): (Option<&str>, &'static str),
        result: AttemptResult,
    ) {
        let (Some(up), Some(stats)) = (view.config.upstreams.get(idx), view.stats.get(idx)) else {
            return;
        };
        if let AttemptResult::Failed { kind, reason, .. } = &result {
            // A stream that broke after its start was counted as an attempt when it started.
            stats.history.record_failure(*kind != FailKind::Stream);
            self.failures.push(FailedAttempt {
                at: SystemTime::now(),
                upstream: up.name.to_string(),
                model: model.map(|m| clip(m, TEXT_MAX)),
                family,
                outcome: kind.label(),
                reason: clip(reason, TEXT_MAX),
            });
        }
        match result {
            AttemptResult::Ok { first_byte } => {
                stats.ok.fetch_add(1, Ordering::Relaxed);
                stats.push_latency(first_byte);
                stats.history.record_ok(first_byte);
                // Only a success that ends a failure streak is news for the actor.
                if stats.failures.swap(0, Ordering::AcqRel) > 0 || view.cooling_until[idx].is_some()
                {
                    self.addr.do_send(AttemptDone {
                        upstream: up.name.to_string(),
                        result: AttemptResult::Ok { first_byte },
                    });
                }
            }
            failed @ AttemptResult::Failed { .. } => self.addr.do_send(AttemptDone {
                upstream: up.name.to_string(),
                result: failed,
            }),
        }
    }

    /// Tokens reported in an upstream's usage, for the status page.
    pub fn add_tokens(
        &self,
        view: &RegistryView,
        idx: usize,
        prompt: Option<i64>,
        completion: Option<i64>,
    ) {
        if let Some(stats) = view.stats.get(idx) {
            stats.history.add_tokens(prompt, completion);
        }
    }

    /// The last failed attempts, newest first.
    pub fn recent_failures(&self) -> Vec<FailedAttempt> {
        self.failures.recent()
    }

    /// Every upstream's state, for the status page.
    pub async fn snapshot(&self) -> Vec<UpstreamStatus> {
        self.addr.send(GetSnapshot).await.unwrap_or_default()
    }

    /// Where the replicas' store thread sends what other replicas shared (see the operations
    /// guide, "Several replicas").
    pub fn store_inbox(&self) -> Recipient<super::FromStore> {
        self.addr.clone().recipient()
    }

    /// Applies a new config (SIGHUP).
    pub async fn reload(&self, config: Arc<Config>) {
        // Awaited: when this returns, new requests see the new config (the reload log line
        // says so only then).
        if self.addr.send(Reload(config.clone())).await.is_err() {
            log::error!("SIGHUP: the upstream registry is gone; config not applied");
        }
    }
}
