//! The `UpstreamRegistry` actor: the one owner of the upstream list and of each upstream's health.
//!
//! Every health *transition* goes through the actor: failures, entering cooldown, recovery,
//! reloads. So ordering rules and health memory live in one place, and alerts fire once. The actor
//! publishes what ordering needs as a read-only [`RegistryView`]; a request takes its candidates
//! from that view through a [`RegistryHandle`] instead of a round trip to the actor's thread, and a
//! success on a healthy upstream (the common case) only bumps shared counters. Measured: the
//! per-request round trip cost about a fifth of the gateway's throughput at 64 connections
//! (see README, Benchmarks). Health is kept by upstream name, so a reload keeps the memory of
//! upstreams that still exist.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;

pub use crate::attempt::FailKind;
use crate::config::{Config, LbPolicy};
use crate::history::{clip, FailedAttempt, FailureLog, UpstreamHistory, TEXT_MAX};
use crate::metrics::Metrics;

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

    fn set(&self, config: Arc<Config>) {
        match self.0.write() {
            Ok(mut g) => *g = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }
}

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
        /// the failure count (SPEC 4a).
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

const RECENT: usize = 32;

/// Per-upstream counters shared by the request path and the actor.
#[derive(Debug, Default)]
pub struct LiveStats {
    /// Consecutive failures: the actor adds, a success resets.
    failures: AtomicU32,
    ok: AtomicU64,
    failed: AtomicU64,
    recent: Mutex<VecDeque<Duration>>,
    /// The status page's last hour and tokens (see [`crate::history`]).
    history: Arc<UpstreamHistory>,
}

impl LiveStats {
    fn push_latency(&self, d: Duration) {
        let mut r = match self.recent.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if r.len() == RECENT {
            r.pop_front();
        }
        r.push_back(d);
    }

    fn median_latency(&self) -> Option<Duration> {
        let r = match self.recent.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut v: Vec<Duration> = r.iter().copied().collect();
        v.sort();
        v.get(v.len() / 2).copied()
    }
}

/// What ordering needs, published by the actor whenever it changes (cooldowns, reloads).
pub struct RegistryView {
    /// The config the indices refer to.
    pub config: Arc<Config>,
    /// Per upstream (index-aligned with `config.upstreams`): end of its cooldown.
    cooling_until: Vec<Option<Instant>>,
    /// Per upstream counters.
    stats: Vec<Arc<LiveStats>>,
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15)
            | 1,
    );
}

fn next_random() -> u64 {
    // xorshift64*: a shuffle per request needs speed, not cryptographic quality.
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// Candidates kept inline: a request's order costs no heap allocation with up to this many.
const INLINE_CANDIDATES: usize = 8;

/// Upstream indices in the order a request tries them (a `Vec` was one allocation per request).
#[derive(Debug, Clone, Default)]
pub struct Order {
    inline: [usize; INLINE_CANDIDATES],
    len: usize,
    /// All of them, once there are more than fit inline.
    spilled: Vec<usize>,
}

impl Order {
    /// Appends an index.
    pub fn push(&mut self, i: usize) {
        if !self.spilled.is_empty() {
            self.spilled.push(i);
        } else if self.len < INLINE_CANDIDATES {
            self.inline[self.len] = i;
            self.len += 1;
        } else {
            self.spilled.extend_from_slice(&self.inline[..self.len]);
            self.spilled.push(i);
        }
    }

    /// Keeps the indices `keep` accepts, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&usize) -> bool) {
        if !self.spilled.is_empty() {
            self.spilled.retain(keep);
            return;
        }
        let mut n = 0;
        for k in 0..self.len {
            let i = self.inline[k];
            if keep(&i) {
                self.inline[n] = i;
                n += 1;
            }
        }
        self.len = n;
    }
}

impl std::ops::Deref for Order {
    type Target = [usize];
    fn deref(&self) -> &[usize] {
        if self.spilled.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spilled
        }
    }
}

impl std::ops::DerefMut for Order {
    fn deref_mut(&mut self) -> &mut [usize] {
        if self.spilled.is_empty() {
            &mut self.inline[..self.len]
        } else {
            &mut self.spilled
        }
    }
}

impl RegistryView {
    /// When upstream `idx`'s cooldown ends, if it has one (it may have run out already).
    pub fn cooling_until(&self, idx: usize) -> Option<Instant> {
        self.cooling_until.get(idx).copied().flatten()
    }

    /// Whether a same-upstream retry is allowed now (SPEC 4a): not on a half-open probe (its
    /// cooldown just ran out), and not when this failure is the one that reaches
    /// `cooldown.failures`.
    pub fn may_retry(&self, idx: usize) -> bool {
        let half_open = self
            .cooling_until
            .get(idx)
            .copied()
            .flatten()
            .is_some_and(|until| until <= Instant::now());
        let failures = self
            .stats
            .get(idx)
            .map_or(0, |s| s.failures.load(Ordering::Relaxed));
        !half_open && failures.saturating_add(1) < self.config.cooldown_failures
    }

    /// Upstream indices to try for `model`: allow/deny, then `lb_policy`, then cooling upstreams
    /// to the back (keeping their order). An expired cooldown puts the upstream back (half-open).
    /// `sticky` orders by the request's affinity `key` (SPEC 4f; without one, the file's order).
    pub fn candidates(&self, model: Option<&str>, rr: &AtomicUsize, key: Option<&[u8]>) -> Order {
        let ups = &self.config.upstreams;
        let mut order = Order::default();
        for i in (0..ups.len()).filter(|&i| ups[i].admits(model)) {
            order.push(i);
        }
        match self.config.lb_policy {
            LbPolicy::Order => {}
            LbPolicy::RoundRobin => {
                if !order.is_empty() {
                    let k = rr.fetch_add(1, Ordering::Relaxed) % order.len();
                    order.rotate_left(k);
                }
            }
            LbPolicy::Random => {
                let weight = |i: usize| ups[i].weight;
                crate::affinity::sticky::weighted_shuffle(&mut order, next_random, weight);
            }
            LbPolicy::Sticky => {
                if let Some(key) = key {
                    let (name, weight) = (|i: usize| &*ups[i].name, |i: usize| ups[i].weight);
                    crate::affinity::sticky::rendezvous(&mut order, key, name, weight);
                }
            }
        }
        if self.cooling_until.iter().any(Option::is_some) {
            let now = Instant::now();
            let cooling = |i: &usize| self.cooling_until[*i].is_some_and(|until| until > now);
            if order.iter().any(cooling) {
                let mut sorted = Order::default();
                for &i in order.iter().filter(|i| !cooling(i)) {
                    sorted.push(i);
                }
                for &i in order.iter().filter(|i| cooling(i)) {
                    sorted.push(i);
                }
                order = sorted;
            }
        }
        order
    }
}

/// The request path's handle on the registry: candidates from the published view, outcomes to
/// the actor (or, for a success on a healthy upstream, straight into the shared counters).
#[derive(Clone)]
pub struct RegistryHandle {
    view: Arc<RwLock<Arc<RegistryView>>>,
    rr: Arc<AtomicUsize>,
    addr: Addr<UpstreamRegistry>,
    failures: Arc<FailureLog>,
}

impl RegistryHandle {
    /// The current view (an `Arc` clone under a read lock).
    pub fn view(&self) -> Arc<RegistryView> {
        match self.view.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The view and the ordered candidates for a request's model.
    /// `key` is the request's affinity key, for `sticky` (SPEC 4f).
    pub fn candidates(
        &self,
        model: Option<&str>,
        key: Option<&[u8]>,
    ) -> (Arc<RegistryView>, Order) {
        let view = self.view();
        let order = view.candidates(model, &self.rr, key);
        (view, order)
    }

    /// Reports one attempt against `view.config.upstreams[idx]` (no model known).
    pub fn report(&self, view: &RegistryView, idx: usize, result: AttemptResult) {
        self.report_for(view, idx, None, result);
    }

    /// Reports one attempt for a request about `model`: health, the status page's last hour and,
    /// for a failure, the list of recent failed attempts. Every attempt is counted once here.
    pub fn report_for(
        &self,
        view: &RegistryView,
        idx: usize,
        model: Option<&str>,
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

    /// Applies a new config (SIGHUP).
    pub async fn reload(&self, config: Arc<Config>) {
        // Awaited: when this returns, new requests see the new config (the reload log line
        // says so only then).
        if self.addr.send(Reload(config.clone())).await.is_err() {
            log::error!("SIGHUP: the upstream registry is gone; config not applied");
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Health {
    /// Below the threshold again only after a success.
    down: bool,
    cooldown_until: Option<(Instant, SystemTime)>,
    last_error: Option<(SystemTime, String)>,
}

/// The actor. Create with [`UpstreamRegistry::start_with`].
pub struct UpstreamRegistry {
    config: Arc<Config>,
    shared: SharedConfig,
    health: Vec<Health>,
    stats: Vec<Arc<LiveStats>>,
    view: Arc<RwLock<Arc<RegistryView>>>,
    metrics: Metrics,
    events: Option<Recipient<HealthEvent>>,
}

impl UpstreamRegistry {
    /// Starts the actor over `shared`'s current config and returns the request path's handle.
    pub fn start_with(
        shared: SharedConfig,
        metrics: Metrics,
        events: Option<Recipient<HealthEvent>>,
    ) -> RegistryHandle {
        let config = shared.get();
        let n = config.upstreams.len();
        let stats: Vec<Arc<LiveStats>> = (0..n).map(|_| Arc::default()).collect();
        let view = Arc::new(RwLock::new(Arc::new(RegistryView {
            config: config.clone(),
            cooling_until: vec![None; n],
            stats: stats.clone(),
        })));
        let registry = UpstreamRegistry {
            config,
            shared,
            health: vec![Health::default(); n],
            stats,
            view: view.clone(),
            metrics,
            events,
        };
        registry.publish_health();
        let addr = registry.start();
        RegistryHandle {
            view,
            rr: Arc::new(AtomicUsize::new(0)),
            addr,
            failures: Arc::default(),
        }
    }

    fn publish_health(&self) {
        for (u, h) in self.config.upstreams.iter().zip(&self.health) {
            self.metrics.set_healthy(&u.name, !h.down);
            // Every upstream's session gauge exists (at 0) before its first session.
            self.metrics.websocket_sessions(&u.name, 0);
        }
    }

    /// Publishes the ordering inputs after a change.
    fn publish_view(&self) {
        let view = Arc::new(RegistryView {
            config: self.config.clone(),
            cooling_until: self
                .health
                .iter()
                .map(|h| h.cooldown_until.map(|(i, _)| i))
                .collect(),
            stats: self.stats.clone(),
        });
        match self.view.write() {
            Ok(mut g) => *g = view,
            Err(p) => *p.into_inner() = view,
        }
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.config.upstreams.iter().position(|u| &*u.name == name)
    }
}

impl Actor for UpstreamRegistry {
    type Context = Context<Self>;
}

impl Handler<AttemptDone> for UpstreamRegistry {
    type Result = ();

    fn handle(&mut self, msg: AttemptDone, _: &mut Context<Self>) {
        // Outcomes for an upstream removed by a reload are simply dropped.
        let Some(i) = self.index_of(&msg.upstream) else {
            return;
        };
        let threshold = self.config.cooldown_failures;
        let stats = self.stats[i].clone();
        let h = &mut self.health[i];
        match msg.result {
            AttemptResult::Ok { .. } => {
                // The handle already counted it and reset the streak.
                let was_down = std::mem::take(&mut h.down);
                let had_cooldown = h.cooldown_until.take().is_some();
                if was_down {
                    log::info!("upstream {} recovered", msg.upstream);
                    self.metrics.set_healthy(&msg.upstream, true);
                    if let Some(ev) = &self.events {
                        ev.do_send(HealthEvent::Recovered {
                            upstream: msg.upstream,
                        });
                    }
                }
                if had_cooldown {
                    self.publish_view();
                }
            }
            AttemptResult::Failed {
                reason, cooldown, ..
            } => {
                if let Some(d) = cooldown {
                    // Retry-After: the upstream said how long; believe it at once (SPEC 4a).
                    let until = (Instant::now() + d, SystemTime::now() + d);
                    if h.cooldown_until.is_none_or(|(i, _)| i < until.0) {
                        h.cooldown_until = Some(until);
                        log::info!(
                            "upstream {} asked for {}s (Retry-After); moved to the back until then",
                            msg.upstream,
                            d.as_secs()
                        );
                        self.publish_view();
                    }
                }
                let h = &mut self.health[i];
                stats.failed.fetch_add(1, Ordering::Relaxed);
                let failures = stats
                    .failures
                    .fetch_add(1, Ordering::AcqRel)
                    .saturating_add(1);
                h.last_error = Some((SystemTime::now(), reason.clone()));
                if failures >= threshold {
                    let first_time = !h.down;
                    h.down = true;
                    let cooldown = self.config.cooldown;
                    // A longer Retry-After cooldown already running is kept.
                    let until = (Instant::now() + cooldown, SystemTime::now() + cooldown);
                    if h.cooldown_until.is_none_or(|(i, _)| i < until.0) {
                        h.cooldown_until = Some(until);
                    }
                    self.metrics.set_healthy(&msg.upstream, false);
                    if first_time {
                        log::warn!(
                            "upstream {} failed {failures} times in a row ({}); moved to the back for {:?}",
                            msg.upstream,
                            crate::escape::untrusted(&reason),
                            cooldown
                        );
                        if let Some(ev) = &self.events {
                            ev.do_send(HealthEvent::CooldownStarted {
                                upstream: msg.upstream,
                                failures,
                                last_error: reason,
                                cooldown,
                            });
                        }
                    }
                    self.publish_view();
                }
            }
        }
    }
}

impl Handler<Reload> for UpstreamRegistry {
    type Result = ();

    fn handle(&mut self, msg: Reload, _: &mut Context<Self>) {
        let old: HashMap<&str, (&Health, &Arc<LiveStats>)> = self
            .config
            .upstreams
            .iter()
            .map(|u| &*u.name)
            .zip(self.health.iter().zip(&self.stats))
            .collect();
        let (health, stats): (Vec<Health>, Vec<Arc<LiveStats>>) = msg
            .0
            .upstreams
            .iter()
            .map(|u| match old.get(&*u.name) {
                Some((h, s)) => ((*h).clone(), (*s).clone()),
                None => (Health::default(), Arc::default()),
            })
            .unzip();
        for u in &self.config.upstreams {
            if !msg.0.upstreams.iter().any(|n| n.name == u.name) {
                self.metrics.forget_upstream(&u.name);
            }
        }
        self.health = health;
        self.stats = stats;
        self.config = msg.0.clone();
        self.shared.set(msg.0);
        self.publish_view();
        self.publish_health();
    }
}

impl Handler<GetSnapshot> for UpstreamRegistry {
    type Result = MessageResult<GetSnapshot>;

    fn handle(&mut self, _: GetSnapshot, _: &mut Context<Self>) -> Self::Result {
        let now = Instant::now();
        let list = self
            .config
            .upstreams
            .iter()
            .zip(self.health.iter().zip(&self.stats))
            .map(|(u, (h, s))| UpstreamStatus {
                name: u.name.to_string(),
                endpoint: u.display.clone(),
                timeout: u.timeout,
                stream_timeout: u.stream_timeout,
                allow: u.allow.iter().map(|p| p.0.clone()).collect(),
                deny: u.deny.iter().map(|p| p.0.clone()).collect(),
                consecutive_failures: s.failures.load(Ordering::Relaxed),
                cooling_until: h
                    .cooldown_until
                    .filter(|(until, _)| *until > now)
                    .map(|(_, wall)| wall),
                healthy: !h.down,
                ok: s.ok.load(Ordering::Relaxed),
                failed: s.failed.load(Ordering::Relaxed),
                last_error: h.last_error.clone(),
                recent_first_byte: s.median_latency(),
                history: s.history.clone(),
            })
            .collect();
        MessageResult(list)
    }
}

#[cfg(test)]
mod tests {
    use super::Order;

    #[test]
    fn order_keeps_its_indices_inline_and_spilled() {
        for n in [0usize, 1, 7, 8, 9, 20] {
            let mut o = Order::default();
            for i in 0..n {
                o.push(i * 10);
            }
            let want: Vec<usize> = (0..n).map(|i| i * 10).collect();
            assert_eq!(&*o, &want[..], "n={n}");
            o.rotate_left(n.min(3));
            let mut rotated = want.clone();
            rotated.rotate_left(n.min(3));
            assert_eq!(&*o, &rotated[..], "n={n}");
            o.retain(|i| i % 20 == 0);
            rotated.retain(|i| i % 20 == 0);
            assert_eq!(&*o, &rotated[..], "n={n}");
            o.push(999);
            rotated.push(999);
            assert_eq!(&*o, &rotated[..], "n={n}");
        }
    }
}
