//! What the status page shows of the recent past (version 0.2; see the observability guide,
//! "Status page"): per upstream, the last 60 minutes at one-minute resolution (attempts, failed
//! attempts, median first-byte latency) and the tokens used since start; and the last 20 failed
//! attempts.
//!
//! The per-minute history is a fixed ring of 60 slots (`minute % 60`), so its memory never grows
//! with traffic. Every counter is one `AtomicU64` holding the minute it belongs to in its high
//! half and the count in its low half: a writer that finds an older minute there starts the slot
//! over with one compare-and-swap, so recording takes no lock and a minute boundary loses no
//! count and needs no sweeper. Readers ignore values stamped with another minute. The median is
//! estimated from a small log-scale histogram per slot (34 buckets, √2 apart from 5 ms to past
//! 300 s), good to about ±20 %, which is what a chart can show anyway.
//!
//! The failed-attempt list takes a short mutex, only on the failure path.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Minutes kept per upstream.
pub const MINUTES: usize = 60;
/// Failed attempts kept for the page.
pub const RECENT_FAILURES: usize = 20;
/// Longest reason or model text kept (characters), as for logs and alerts (see the security
/// guide, "Escaping").
pub const TEXT_MAX: usize = 200;

/// Latency buckets: bucket 0 is ≤ 5 ms, bucket i ≤ 5 ms × √2ⁱ, the last is open-ended.
const BUCKETS: usize = 34;
const BASE_MS: f64 = 5.0;

/// Whole minutes since the Unix epoch (fits `u32` until the year 10135).
pub fn minute_of(t: SystemTime) -> u32 {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    u32::try_from(secs / 60).unwrap_or(u32::MAX - 1)
}

/// A count stamped with the minute it belongs to: `(minute + 1) << 32 | count` (0 = never used).
#[derive(Default)]
struct Tagged(AtomicU64);

impl Tagged {
    fn add(&self, minute: u32) {
        let tag = u64::from(minute) + 1;
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let next = match cur >> 32 {
                t if t == tag => {
                    if cur & 0xFFFF_FFFF == 0xFFFF_FFFF {
                        return;
                    }
                    cur + 1
                }
                // A writer that took its clock reading before a newer minute started the slot.
                t if t > tag => return,
                _ => (tag << 32) | 1,
            };
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    fn get(&self, minute: u32) -> u32 {
        let v = self.0.load(Ordering::Relaxed);
        if v >> 32 == u64::from(minute) + 1 {
            (v & 0xFFFF_FFFF) as u32
        } else {
            0
        }
    }
}

struct Slot {
    requests: Tagged,
    failed: Tagged,
    latency: [Tagged; BUCKETS],
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            requests: Tagged::default(),
            failed: Tagged::default(),
            latency: std::array::from_fn(|_| Tagged::default()),
        }
    }
}

fn bucket_of(d: Duration) -> usize {
    let ms = d.as_secs_f64() * 1000.0;
    if ms <= BASE_MS {
        return 0;
    }
    let i = (2.0 * (ms / BASE_MS).log2()).ceil();
    (i as usize).min(BUCKETS - 1)
}

fn bucket_bounds(i: usize) -> (f64, f64) {
    let upper = |i: usize| BASE_MS * 2f64.powf(i as f64 / 2.0);
    if i == 0 {
        (0.0, BASE_MS)
    } else {
        (upper(i - 1), upper(i))
    }
}

/// One minute of one upstream's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinutePoint {
    /// Minutes since the Unix epoch.
    pub minute: u32,
    /// Attempts started in that minute (a stream that breaks after its start counts once).
    pub requests: u32,
    /// Attempts that failed in that minute (before or after their first byte).
    pub failed: u32,
    /// Median first-byte latency of that minute's successful attempts, if there were any.
    pub median_first_byte: Option<Duration>,
}

/// One upstream's last hour and token totals. Kept with the upstream's other counters, by name,
/// so a reload keeps it; an upstream removed by a reload takes it along.
pub struct UpstreamHistory {
    slots: Box<[Slot]>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

impl Default for UpstreamHistory {
    fn default() -> Self {
        UpstreamHistory {
            slots: (0..MINUTES).map(|_| Slot::default()).collect(),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
        }
    }
}

impl fmt::Debug for UpstreamHistory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (p, c) = self.tokens();
        f.debug_struct("UpstreamHistory")
            .field("prompt_tokens", &p)
            .field("completion_tokens", &c)
            .finish_non_exhaustive()
    }
}

impl UpstreamHistory {
    fn slot(&self, minute: u32) -> &Slot {
        &self.slots[minute as usize % MINUTES]
    }

    /// A successful attempt now.
    pub fn record_ok(&self, first_byte: Duration) {
        self.record_ok_at(minute_of(SystemTime::now()), first_byte);
    }

    /// A successful attempt in `minute`.
    pub fn record_ok_at(&self, minute: u32, first_byte: Duration) {
        let s = self.slot(minute);
        s.requests.add(minute);
        s.latency[bucket_of(first_byte)].add(minute);
    }

    /// A failed attempt now; `new_attempt` is false for a stream that broke after its start
    /// (already counted as an attempt when it started).
    pub fn record_failure(&self, new_attempt: bool) {
        self.record_failure_at(minute_of(SystemTime::now()), new_attempt);
    }

    /// A failed attempt in `minute`.
    pub fn record_failure_at(&self, minute: u32, new_attempt: bool) {
        let s = self.slot(minute);
        if new_attempt {
            s.requests.add(minute);
        }
        s.failed.add(minute);
    }

    /// Tokens reported in an upstream's usage.
    pub fn add_tokens(&self, prompt: Option<i64>, completion: Option<i64>) {
        let pos = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0);
        self.prompt_tokens.fetch_add(pos(prompt), Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(pos(completion), Ordering::Relaxed);
    }

    /// Prompt and completion tokens since start.
    pub fn tokens(&self) -> (u64, u64) {
        (
            self.prompt_tokens.load(Ordering::Relaxed),
            self.completion_tokens.load(Ordering::Relaxed),
        )
    }

    /// The 60 minutes ending with the current one, oldest first.
    pub fn last_hour(&self) -> Vec<MinutePoint> {
        self.last_hour_at(minute_of(SystemTime::now()))
    }

    /// The 60 minutes ending with `now`, oldest first.
    pub fn last_hour_at(&self, now: u32) -> Vec<MinutePoint> {
        let first = now.saturating_sub(MINUTES as u32 - 1);
        (first..=now)
            .map(|minute| {
                let s = self.slot(minute);
                let mut counts = [0u32; BUCKETS];
                for (c, b) in counts.iter_mut().zip(&s.latency) {
                    *c = b.get(minute);
                }
                MinutePoint {
                    minute,
                    requests: s.requests.get(minute),
                    failed: s.failed.get(minute),
                    median_first_byte: median(&counts),
                }
            })
            .collect()
    }
}

/// The median of a bucketed distribution, interpolated geometrically inside its bucket.
fn median(counts: &[u32; BUCKETS]) -> Option<Duration> {
    let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
    if total == 0 {
        return None;
    }
    let rank = (total as f64) / 2.0;
    let mut seen = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let before = seen as f64;
        seen += u64::from(c);
        if seen as f64 >= rank {
            let (lo, hi) = bucket_bounds(i);
            let frac = ((rank - before) / f64::from(c)).clamp(0.0, 1.0);
            let ms = if i == 0 {
                hi * frac.max(0.5)
            } else {
                lo * (hi / lo).powf(frac)
            };
            return Some(Duration::from_secs_f64(ms / 1000.0));
        }
    }
    None
}

/// One failed attempt, as the status page lists it. Texts are already cut and control-escaped.
#[derive(Debug, Clone)]
pub struct FailedAttempt {
    /// When it was reported.
    pub at: SystemTime,
    /// Upstream name (from the config).
    pub upstream: String,
    /// The request's model (from the client: cut and escaped).
    pub model: Option<String>,
    /// The request's API family (`chat/completions`, `responses` … `other`: the `endpoint`
    /// label's set, never the client's path).
    pub family: &'static str,
    /// The `outcome` label: `http_error`, `timeout`, `connect_error`, `stream_error`.
    pub outcome: &'static str,
    /// Why (may quote an upstream: cut and escaped).
    pub reason: String,
}

/// The last [`RECENT_FAILURES`] failed attempts, newest first.
#[derive(Debug, Default)]
pub struct FailureLog(Mutex<VecDeque<FailedAttempt>>);

impl FailureLog {
    /// Adds one, dropping the oldest beyond [`RECENT_FAILURES`].
    pub fn push(&self, f: FailedAttempt) {
        let mut q = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if q.len() == RECENT_FAILURES {
            q.pop_back();
        }
        q.push_front(f);
    }

    /// A copy, newest first (the lock is released before anyone formats it).
    pub fn recent(&self) -> Vec<FailedAttempt> {
        match self.0.lock() {
            Ok(g) => g.iter().cloned().collect(),
            Err(p) => p.into_inner().iter().cloned().collect(),
        }
    }
}

/// Client- or upstream-supplied text made safe to keep: control characters escaped (`\n`,
/// `\u{1b}`), cut at `max` characters with `…` (the one rule of [`crate::escape`]).
pub fn clip(s: &str, max: usize) -> String {
    crate::escape::untrusted_cut(s, max).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u32 = 29_000_000;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn counts_land_in_their_minute_across_boundaries() {
        let h = UpstreamHistory::default();
        // Scripted traffic: minute 0: 3 ok, 1 failure; minute 1: nothing; minute 2: 2 failures,
        // one of them a broken stream (not a new attempt).
        for d in [100, 200, 300] {
            h.record_ok_at(T0, ms(d));
        }
        h.record_failure_at(T0, true);
        h.record_failure_at(T0 + 2, true);
        h.record_failure_at(T0 + 2, false);
        let hour = h.last_hour_at(T0 + 2);
        assert_eq!(hour.len(), MINUTES);
        assert_eq!(hour[MINUTES - 1].minute, T0 + 2);
        let p0 = hour[MINUTES - 3];
        assert_eq!((p0.minute, p0.requests, p0.failed), (T0, 4, 1));
        let m = p0.median_first_byte.unwrap().as_millis();
        assert!((160..=260).contains(&m), "median {m} ms");
        let p1 = hour[MINUTES - 2];
        assert_eq!((p1.requests, p1.failed, p1.median_first_byte), (0, 0, None));
        let p2 = hour[MINUTES - 1];
        assert_eq!((p2.requests, p2.failed, p2.median_first_byte), (1, 2, None));
        // Everything before T0 is empty.
        assert!(hour[..MINUTES - 3].iter().all(|p| p.requests == 0));
    }

    #[test]
    fn a_slot_reused_an_hour_later_starts_over() {
        let h = UpstreamHistory::default();
        h.record_ok_at(T0, ms(50));
        h.record_failure_at(T0, true);
        // Same slot (minute % 60), one hour later.
        h.record_ok_at(T0 + 60, ms(2_000));
        let hour = h.last_hour_at(T0 + 60);
        let last = hour[MINUTES - 1];
        assert_eq!((last.requests, last.failed), (1, 0));
        let m = last.median_first_byte.unwrap().as_millis();
        assert!((1_400..=2_900).contains(&m), "median {m} ms");
        // The old minute has scrolled out, and asking for it now reads nothing stale.
        assert_eq!(hour[0].minute, T0 + 1);
        assert_eq!(h.last_hour_at(T0)[MINUTES - 1].requests, 0);
    }

    #[test]
    fn a_late_writer_for_an_older_minute_does_not_reset_a_newer_one() {
        let h = UpstreamHistory::default();
        h.record_ok_at(T0 + 60, ms(10));
        h.record_ok_at(T0, ms(10));
        assert_eq!(h.last_hour_at(T0 + 60)[MINUTES - 1].requests, 1);
    }

    #[test]
    fn an_idle_hour_reads_empty_after_a_long_gap() {
        let h = UpstreamHistory::default();
        for m in 0..60 {
            h.record_ok_at(T0 + m, ms(10));
        }
        let later = h.last_hour_at(T0 + 500);
        assert!(later.iter().all(|p| p.requests == 0 && p.failed == 0));
        let now = h.last_hour_at(T0 + 59);
        assert!(now.iter().all(|p| p.requests == 1));
    }

    #[test]
    fn latency_buckets_reach_past_300_seconds() {
        assert_eq!(bucket_of(ms(1)), 0);
        assert_eq!(bucket_of(ms(5)), 0);
        assert_eq!(bucket_of(ms(6)), 1);
        let (lo, hi) = bucket_bounds(bucket_of(ms(120_000)));
        assert!(lo < 120_000.0 && 120_000.0 <= hi);
        assert!(bucket_bounds(BUCKETS - 2).1 > 300_000.0);
        assert_eq!(bucket_of(Duration::from_secs(10_000)), BUCKETS - 1);
    }

    #[test]
    fn median_is_within_a_bucket_of_the_truth() {
        for truth in [3u64, 42, 870, 15_000, 95_000] {
            let h = UpstreamHistory::default();
            for _ in 0..5 {
                h.record_ok_at(T0, ms(truth));
            }
            let m = h.last_hour_at(T0)[MINUTES - 1]
                .median_first_byte
                .unwrap()
                .as_secs_f64()
                * 1000.0;
            let ratio = m / truth as f64;
            assert!((0.6..=1.5).contains(&ratio), "{truth} ms → {m} ms");
        }
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let h = std::sync::Arc::new(UpstreamHistory::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u32 {
                        h.record_ok_at(T0 + i / 5_000, ms(10));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let hour = h.last_hour_at(T0 + 1);
        assert_eq!(
            hour[MINUTES - 1].requests + hour[MINUTES - 2].requests,
            40_000
        );
    }

    #[test]
    fn failure_log_keeps_the_last_twenty_newest_first() {
        let log = FailureLog::default();
        for i in 0..25 {
            log.push(FailedAttempt {
                at: UNIX_EPOCH,
                upstream: format!("u{i}"),
                model: None,
                family: "chat/completions",
                outcome: "timeout",
                reason: String::new(),
            });
        }
        let r = log.recent();
        assert_eq!(r.len(), RECENT_FAILURES);
        assert_eq!(r[0].upstream, "u24");
        assert_eq!(r[19].upstream, "u5");
    }

    #[test]
    fn clip_escapes_controls_and_cuts() {
        assert_eq!(clip("a\nb\x1b[31m", 200), "a\\nb\\u{1b}[31m");
        let long = "é".repeat(500);
        let c = clip(&long, TEXT_MAX);
        assert_eq!(c.chars().count(), TEXT_MAX + 1);
        assert!(c.ends_with('…'));
    }
}
