//! What ordering needs, as the actor publishes it: the view a request takes its candidates
//! from without a round trip to the actor, the per-upstream counters shared with the request
//! path, and the inline candidate order.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::config::{Config, LbPolicy, Upstream};
use crate::history::UpstreamHistory;

pub(super) const RECENT: usize = 32;

/// Added to an attempt's longest wait for how long a half-open probe may be held: a request
/// that took the probe and never reported (its client left) frees it after this.
const PROBE_SLACK: Duration = Duration::from_secs(5);

/// Per-upstream counters shared by the request path and the actor.
#[derive(Debug, Default)]
pub struct LiveStats {
    /// Consecutive failures: the actor adds, a success resets.
    pub(super) failures: AtomicU32,
    pub(super) ok: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) recent: Mutex<VecDeque<Duration>>,
    /// The status page's last hour and tokens (see [`crate::history`]).
    pub(super) history: Arc<UpstreamHistory>,
    /// The local half-open probe: until when (ms after [`epoch`]) one request holds it; 0 or
    /// past = free. One request on this replica probes a recovering upstream, the others keep
    /// it at the back (see the rescue guide, "How failover and cooldown decide").
    pub(super) probe_gate: AtomicU64,
}

/// The instant the probe gates count from.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn millis(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_millis() as u64 + 1
}

impl LiveStats {
    pub(super) fn push_latency(&self, d: Duration) {
        let mut r = match self.recent.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if r.len() == RECENT {
            r.pop_front();
        }
        r.push_back(d);
    }

    /// Takes the half-open probe for one request until `now + hold`, unless another request
    /// holds it.
    pub(super) fn claim_probe(&self, now: Instant, hold: Duration) -> bool {
        let (at, until) = (millis(now), millis(now + hold));
        let held = self.probe_gate.load(Ordering::Acquire);
        held < at
            && self
                .probe_gate
                .compare_exchange(held, until, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Whether a request holds the half-open probe now.
    pub(super) fn probe_held(&self, now: Instant) -> bool {
        self.probe_gate.load(Ordering::Acquire) >= millis(now)
    }

    /// Frees the half-open probe (its result arrived, or a new cooldown started).
    pub(super) fn free_probe(&self) {
        self.probe_gate.store(0, Ordering::Release);
    }

    pub(super) fn median_latency(&self) -> Option<Duration> {
        let r = match self.recent.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut v: Vec<Duration> = r.iter().copied().collect();
        v.sort();
        v.get(v.len() / 2).copied()
    }
}

/// How long a request holds a half-open probe of `up`: the longest its attempt may wait
/// (`model_timeouts` included), and some.
pub(super) fn probe_hold(config: &Config, up: &Upstream) -> Duration {
    let longest = config
        .model_timeouts
        .iter()
        .flat_map(|t| [t.timeout, t.stream_timeout])
        .flatten()
        .fold(up.timeout.max(up.stream_timeout), Duration::max);
    longest + PROBE_SLACK
}

/// What ordering needs, published by the actor whenever it changes (cooldowns, reloads).
pub struct RegistryView {
    /// The config the indices refer to.
    pub config: Arc<Config>,
    /// Per upstream (index-aligned with `config.upstreams`): end of its cooldown.
    pub(super) cooling_until: Vec<Option<Instant>>,
    /// Per upstream: when replicas share health, a half-open probe may start here only before
    /// this instant (this replica holds the group's claim until then; with no claim it is the
    /// cooldown's end itself). None: local rules, any time after the cooldown.
    pub(super) window: Vec<Option<Instant>>,
    /// Per upstream counters.
    pub(super) stats: Vec<Arc<LiveStats>>,
    /// What was learned about the upstreams under this config (reset by a reload).
    pub learned: Arc<super::learned::Learned>,
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

pub(super) fn next_random() -> u64 {
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

    /// Whether upstream `idx` is in cooldown now.
    pub fn cooling(&self, idx: usize) -> bool {
        self.cooling_until(idx)
            .is_some_and(|until| until > Instant::now())
    }

    /// Whether an attempt on upstream `idx` now is a half-open probe: its cooldown ran out and
    /// no success has ended it yet (no same-upstream retry is made on one, see the rescue guide).
    pub fn half_open(&self, idx: usize) -> bool {
        self.cooling_until
            .get(idx)
            .copied()
            .flatten()
            .is_some_and(|until| until <= Instant::now())
    }

    /// Whether one more failure that counts for health puts upstream `idx` into cooldown (then
    /// it is not retried: the cooldown just started).
    pub fn at_threshold(&self, idx: usize) -> bool {
        let failures = self
            .stats
            .get(idx)
            .map_or(0, |s| s.failures.load(Ordering::Relaxed));
        failures.saturating_add(1) >= self.config.cooldown_failures
    }

    /// Upstream indices to try for `model`: allow/deny, then `lb_policy`, then cooling upstreams
    /// to the back (keeping their order). An expired cooldown puts the upstream back (half-open).
    /// `sticky` orders by the request's affinity `key` (without one, the file's order; see the
    /// affinity guide, "Sticky and weight").
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
            order = self.cooling_to_the_back(order, Instant::now());
        }
        order
    }

    /// Moves upstreams in cooldown to the back. One whose cooldown ran out (half-open) stays in
    /// place for one request only: the first one that would try it first, while no other
    /// request holds its probe (and, when replicas share health, while this replica holds the
    /// group's claim). Every other request keeps it at the back until the probe's result is in.
    fn cooling_to_the_back(&self, order: Order, now: Instant) -> Order {
        let (mut ahead, mut back) = (Order::default(), Order::default());
        for &i in order.iter() {
            let stays = match self.cooling_until[i] {
                None => true,
                Some(until) if until > now => false,
                Some(_) => {
                    ahead.is_empty()
                        && self.window[i].is_none_or(|end| now < end)
                        && self.stats[i].claim_probe(now, self.probe_hold(i))
                }
            };
            if stays {
                ahead.push(i);
            } else {
                back.push(i);
            }
        }
        for &i in back.iter() {
            ahead.push(i);
        }
        ahead
    }

    fn probe_hold(&self, idx: usize) -> Duration {
        self.config
            .upstreams
            .get(idx)
            .map_or(PROBE_SLACK, |up| probe_hold(&self.config, up))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(window: Option<Instant>) -> RegistryView {
        let text = "authorization: x\nupstreams:\n  - name: a\n    endpoint: http://127.0.0.1:9/v1\n  - name: b\n    endpoint: http://127.0.0.1:9/v1\n";
        let config = crate::config::parse(std::path::Path::new("t.yaml"), text, false, &|_| None)
            .unwrap()
            .0;
        let past = Instant::now() - Duration::from_millis(10);
        RegistryView {
            config: Arc::new(config),
            cooling_until: vec![Some(past), None],
            window: vec![window, None],
            stats: vec![Arc::default(), Arc::default()],
            learned: Arc::default(),
        }
    }

    #[test]
    fn one_request_at_a_time_probes_a_half_open_upstream() {
        let (v, rr) = (view(None), AtomicUsize::new(0));
        assert_eq!(&*v.candidates(None, &rr, None), &[0, 1], "the probe");
        assert_eq!(&*v.candidates(None, &rr, None), &[1, 0], "while it is out");
        assert!(v.stats[0].probe_held(Instant::now()));
        v.stats[0].free_probe();
        assert_eq!(&*v.candidates(None, &rr, None), &[0, 1], "the next probe");
    }

    #[test]
    fn a_replica_without_the_groups_claim_keeps_it_at_the_back() {
        let (v, rr) = (view(Some(Instant::now())), AtomicUsize::new(0));
        for _ in 0..3 {
            assert_eq!(&*v.candidates(None, &rr, None), &[1, 0]);
        }
        let v = view(Some(Instant::now() + Duration::from_secs(5)));
        assert_eq!(
            &*v.candidates(None, &rr, None),
            &[0, 1],
            "it holds the claim"
        );
    }

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
