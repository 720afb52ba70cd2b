//! The `UpstreamRegistry` actor: the one owner of the upstream list and of each upstream's health.
//!
//! Every request asks it for its ordered candidates and reports each attempt's outcome back, so
//! ordering (`lb_policy`, cooldown) and health memory live in one place with no locks. Health is
//! kept by upstream name, so a config reload keeps the memory of upstreams that still exist.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;

use crate::config::{Config, LbPolicy};
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

/// Why an attempt failed; also the `outcome` label of the upstream request metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// The upstream answered with a failover status.
    Http,
    /// No answer (or no first chunk) in time.
    Timeout,
    /// Connection, TLS, or connection closed before the response head.
    Connect,
    /// A started response broke or stalled.
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

/// Asks for the ordered candidates for a request's model.
#[derive(Message)]
#[rtype(result = "Candidates")]
pub struct GetCandidates {
    /// The request's model, if its body named one.
    pub model: Option<String>,
}

/// The answer: a config snapshot and indices into its `upstreams`, in the order to try.
pub struct Candidates {
    /// The config the indices refer to (stays valid even if a reload happens meanwhile).
    pub config: Arc<Config>,
    /// Upstream indices in try order.
    pub order: Vec<usize>,
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
}

const RECENT: usize = 32;

#[derive(Debug, Default, Clone)]
struct Health {
    failures: u32,
    cooldown_until: Option<(Instant, SystemTime)>,
    ok: u64,
    failed: u64,
    last_error: Option<(SystemTime, String)>,
    recent: VecDeque<Duration>,
}

/// The actor. Create with [`UpstreamRegistry::new`] and `start()` it on the system arbiter.
pub struct UpstreamRegistry {
    config: Arc<Config>,
    shared: SharedConfig,
    health: Vec<Health>,
    rr: usize,
    rng: u64,
    metrics: Metrics,
    events: Option<Recipient<HealthEvent>>,
}

impl UpstreamRegistry {
    /// A registry over `shared`'s current config.
    pub fn new(
        shared: SharedConfig,
        metrics: Metrics,
        events: Option<Recipient<HealthEvent>>,
    ) -> Self {
        let config = shared.get();
        let health = vec![Health::default(); config.upstreams.len()];
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        let r = UpstreamRegistry {
            config,
            shared,
            health,
            rr: 0,
            rng: seed | 1,
            metrics,
            events,
        };
        r.publish_health();
        r
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: a shuffle per request needs speed, not cryptographic quality.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn publish_health(&self) {
        for (u, h) in self.config.upstreams.iter().zip(&self.health) {
            self.metrics
                .set_healthy(&u.name, h.failures < self.config.cooldown_failures);
        }
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.config.upstreams.iter().position(|u| u.name == name)
    }
}

impl Actor for UpstreamRegistry {
    type Context = Context<Self>;
}

impl Handler<GetCandidates> for UpstreamRegistry {
    type Result = MessageResult<GetCandidates>;

    fn handle(&mut self, msg: GetCandidates, _: &mut Context<Self>) -> Self::Result {
        let model = msg.model.as_deref();
        let mut order: Vec<usize> = (0..self.config.upstreams.len())
            .filter(|&i| self.config.upstreams[i].admits(model))
            .collect();
        match self.config.lb_policy {
            LbPolicy::Order => {}
            LbPolicy::RoundRobin => {
                if !order.is_empty() {
                    let k = self.rr % order.len();
                    order.rotate_left(k);
                }
                self.rr = self.rr.wrapping_add(1);
            }
            LbPolicy::Random => {
                for i in (1..order.len()).rev() {
                    let j = (self.next_random() % (i as u64 + 1)) as usize;
                    order.swap(i, j);
                }
            }
        }
        // Cooling upstreams go to the back, keeping their relative order; an expired cooldown
        // puts the upstream back in its place (half-open).
        let now = Instant::now();
        let cooling = |i: &usize| {
            self.health[*i]
                .cooldown_until
                .is_some_and(|(until, _)| until > now)
        };
        if order.iter().any(cooling) {
            let (mut front, back): (Vec<usize>, Vec<usize>) =
                order.iter().partition(|i| !cooling(i));
            front.extend(back);
            order = front;
        }
        MessageResult(Candidates {
            config: self.config.clone(),
            order,
        })
    }
}

impl Handler<AttemptDone> for UpstreamRegistry {
    type Result = ();

    fn handle(&mut self, msg: AttemptDone, _: &mut Context<Self>) {
        // Outcomes for an upstream removed by a reload are simply dropped.
        let Some(i) = self.index_of(&msg.upstream) else {
            return;
        };
        let threshold = self.config.cooldown_failures;
        let h = &mut self.health[i];
        match msg.result {
            AttemptResult::Ok { first_byte } => {
                h.ok += 1;
                if h.recent.len() == RECENT {
                    h.recent.pop_front();
                }
                h.recent.push_back(first_byte);
                let was_down = h.failures >= threshold;
                h.failures = 0;
                h.cooldown_until = None;
                if was_down {
                    log::info!("upstream {} recovered", msg.upstream);
                    self.metrics.set_healthy(&msg.upstream, true);
                    if let Some(ev) = &self.events {
                        ev.do_send(HealthEvent::Recovered {
                            upstream: msg.upstream,
                        });
                    }
                }
            }
            AttemptResult::Failed { reason, .. } => {
                h.failed += 1;
                h.failures = h.failures.saturating_add(1);
                h.last_error = Some((SystemTime::now(), reason.clone()));
                if h.failures >= threshold {
                    let first_time = h.failures == threshold;
                    let cooldown = self.config.cooldown;
                    h.cooldown_until =
                        Some((Instant::now() + cooldown, SystemTime::now() + cooldown));
                    let failures = h.failures;
                    self.metrics.set_healthy(&msg.upstream, false);
                    if first_time {
                        log::warn!(
                            "upstream {} failed {failures} times in a row ({reason}); moved to the back for {:?}",
                            msg.upstream,
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
                }
            }
        }
    }
}

impl Handler<Reload> for UpstreamRegistry {
    type Result = ();

    fn handle(&mut self, msg: Reload, _: &mut Context<Self>) {
        let old: HashMap<&str, &Health> = self
            .config
            .upstreams
            .iter()
            .map(|u| u.name.as_str())
            .zip(&self.health)
            .collect();
        let health = msg
            .0
            .upstreams
            .iter()
            .map(|u| {
                old.get(u.name.as_str())
                    .map(|h| (*h).clone())
                    .unwrap_or_default()
            })
            .collect();
        for u in &self.config.upstreams {
            if !msg.0.upstreams.iter().any(|n| n.name == u.name) {
                self.metrics.forget_upstream(&u.name);
            }
        }
        self.health = health;
        self.config = msg.0.clone();
        self.shared.set(msg.0);
        self.publish_health();
    }
}

impl Handler<GetSnapshot> for UpstreamRegistry {
    type Result = MessageResult<GetSnapshot>;

    fn handle(&mut self, _: GetSnapshot, _: &mut Context<Self>) -> Self::Result {
        let now = Instant::now();
        let threshold = self.config.cooldown_failures;
        let list = self
            .config
            .upstreams
            .iter()
            .zip(&self.health)
            .map(|(u, h)| {
                let mut recent: Vec<Duration> = h.recent.iter().copied().collect();
                recent.sort();
                UpstreamStatus {
                    name: u.name.clone(),
                    endpoint: u.display.clone(),
                    timeout: u.timeout,
                    stream_timeout: u.stream_timeout,
                    allow: u.allow.iter().map(|p| p.0.clone()).collect(),
                    deny: u.deny.iter().map(|p| p.0.clone()).collect(),
                    consecutive_failures: h.failures,
                    cooling_until: h
                        .cooldown_until
                        .filter(|(until, _)| *until > now)
                        .map(|(_, wall)| wall),
                    healthy: h.failures < threshold,
                    ok: h.ok,
                    failed: h.failed,
                    last_error: h.last_error.clone(),
                    recent_first_byte: recent.get(recent.len() / 2).copied(),
                }
            })
            .collect();
        MessageResult(list)
    }
}
