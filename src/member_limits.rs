//! What one member has used, and whether it may send one more request (see the members guide,
//! "Limits").
//!
//! Each member's counters sit behind their own short lock, so members never wait on each other,
//! and every operation is O(1) amortized whatever the limits are (a member with a huge `rpm`
//! costs no more per request than one with 60): a sliding window of the admissions of the last
//! 60 seconds (their times, oldest first: "at most `rpm` in any 60-second window" exactly, and
//! never more than `rpm` of them kept), the tokens of the last 60 seconds in one-second buckets
//! with their running sum, the tokens of the current UTC day, and an atomic count of requests in
//! flight. A request over a limit is refused before its body is read.
//!
//! Replicas sharing a PostgreSQL store extend these counters with what the others used (see the
//! operations guide, "Members' limits across replicas"); the interface here —
//! [`MemberState::check`], [`MemberState::admit`], [`MemberState::add_tokens`],
//! [`MemberState::used`] — stays the same.
//!
//! A leaf module: the config holds each member's state, and everything else reads it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// A member's limits; each is optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemberLimits {
    /// Requests admitted in any 60-second window.
    pub rpm: Option<u64>,
    /// Tokens (input + output) in the last 60 s below which a request is admitted.
    pub tpm: Option<u64>,
    /// Tokens of the current UTC day below which a request is admitted.
    pub tokens_per_day: Option<u64>,
    /// Requests and WebSocket sessions in flight.
    pub concurrent: Option<u64>,
}

impl MemberLimits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.rpm.is_some()
            || self.tpm.is_some()
            || self.tokens_per_day.is_some()
            || self.concurrent.is_some()
    }

    /// Whether the answers carry OpenAI's rate-limit headers (`rpm` or `tpm` set).
    pub fn rate_headers(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some()
    }
}

/// The window of `rpm` and `tpm`.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Which limit refused a request (the `limit` label of `member_limited_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `rpm`.
    Rpm,
    /// `tpm`.
    Tpm,
    /// `tokens_per_day`.
    TokensPerDay,
    /// `concurrent`.
    Concurrent,
}

impl Limit {
    /// The metric label and config key.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Rpm => "rpm",
            Limit::Tpm => "tpm",
            Limit::TokensPerDay => "tokens_per_day",
            Limit::Concurrent => "concurrent",
        }
    }

    /// The error `type` of the 429 (OpenAI's words).
    pub fn kind(self) -> &'static str {
        match self {
            Limit::Rpm | Limit::Concurrent => "requests",
            Limit::Tpm | Limit::TokensPerDay => "tokens",
        }
    }
}

/// A refusal: which limit, its value, and when the member would be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// The limit that refused.
    pub limit: Limit,
    /// Its configured value.
    pub value: u64,
    /// Until the member would be admitted (at least one second, one for `concurrent`).
    pub retry_after: Duration,
}

/// What a member used, now (the usage page's `now`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    /// Requests admitted in the last 60 s.
    pub requests_last_minute: u64,
    /// Tokens of requests that ended in the last 60 s.
    pub tokens_last_minute: u64,
    /// Tokens of requests that ended this UTC day.
    pub tokens_today: u64,
    /// Requests and sessions in flight.
    pub in_flight: u64,
    /// Until the request window is empty again (OpenAI's `x-ratelimit-reset-requests`: back to
    /// the initial state).
    pub requests_reset: Duration,
    /// Until the token window is empty again (`x-ratelimit-reset-tokens`).
    pub tokens_reset: Duration,
}

/// The counters of one member, under its one lock.
#[derive(Debug, Default)]
struct Window {
    /// Times of the admissions of the last 60 s in nanoseconds since the epoch, oldest first
    /// (kept for a member with `rpm`, never more than `rpm`).
    admitted: VecDeque<u64>,
    /// Admissions per second of the last 60 s, oldest first, for a member without `rpm` (its
    /// usage still shows its requests of the last minute): (second since the epoch, count).
    requests: VecDeque<(u64, u64)>,
    /// Tokens per second of the last 60 s, oldest first: (second since the epoch, tokens).
    tokens: VecDeque<(u64, u64)>,
    /// The sum of `tokens`.
    tokens_minute: u64,
    /// UTC day number and its tokens.
    day: (u64, u64),
}

impl Window {
    /// Drops what left the 60-second window by `at` (nanoseconds since the epoch).
    fn expire(&mut self, at: u64) {
        while self.admitted.front().is_some_and(|t| t + WINDOW_NS <= at) {
            self.admitted.pop_front();
        }
        let second = at / SECOND_NS;
        while self.requests.front().is_some_and(|(s, _)| s + 60 <= second) {
            self.requests.pop_front();
        }
        while let Some(&(s, v)) = self.tokens.front() {
            if s + 60 > second {
                break;
            }
            self.tokens.pop_front();
            self.tokens_minute -= v;
        }
    }

    /// Tokens of the UTC day `day`.
    fn today(&self, day: u64) -> u64 {
        if self.day.0 == day {
            self.day.1
        } else {
            0
        }
    }
}

/// [`WINDOW`] and a second in nanoseconds (the window's arithmetic is on integers).
const WINDOW_NS: u64 = 60 * SECOND_NS;
const SECOND_NS: u64 = 1_000_000_000;

/// Nanoseconds as a duration.
fn ns(n: u64) -> Duration {
    Duration::from_nanos(n)
}

/// Adds `n` to the bucket of `second` (the last one, or a new one).
fn bump(buckets: &mut VecDeque<(u64, u64)>, second: u64, n: u64) {
    match buckets.back_mut() {
        Some((s, v)) if *s == second => *v += n,
        _ => buckets.push_back((second, n)),
    }
}

/// One member's counters; see the module docs.
#[derive(Debug)]
pub struct MemberState {
    window: Mutex<Window>,
    in_flight: AtomicU64,
    /// When the counters started (the seconds of the buckets count from it).
    epoch: Instant,
}

impl Default for MemberState {
    fn default() -> Self {
        MemberState {
            window: Mutex::default(),
            in_flight: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

/// The UTC day of `t` and how long until it ends.
fn utc_day(t: SystemTime) -> (u64, Duration) {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (secs / 86_400, Duration::from_secs(86_400 - secs % 86_400))
}

/// Whole seconds, at least one (a `Retry-After` of 0 would invite the client back too early).
fn at_least_a_second(d: Duration) -> Duration {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    Duration::from_secs(s.max(1))
}

impl MemberState {
    /// The counters, with what left the window by `at` dropped.
    fn lock(&self, at: u64) -> MutexGuard<'_, Window> {
        let mut w = match self.window.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        w.expire(at);
        w
    }

    /// `now` in nanoseconds since the epoch.
    fn at(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Until the bucket of `second` leaves the window.
    fn leaves(second: u64, at: u64) -> Duration {
        ns(((second + 60) * SECOND_NS).saturating_sub(at))
    }

    /// Whether a request may be admitted now under `limits` (nothing is counted): the check made
    /// before a body is read, so a request over a limit costs almost nothing.
    pub fn check(
        &self,
        limits: &MemberLimits,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(), Limited> {
        if let Some(n) = limits.concurrent {
            if self.in_flight.load(Ordering::Relaxed) >= n {
                return Err(concurrent(n));
            }
        }
        if limits.rpm.is_none() && limits.tpm.is_none() && limits.tokens_per_day.is_none() {
            return Ok(());
        }
        let at = self.at(now);
        let w = self.lock(at);
        Self::window_check(&w, limits, at, wall)
    }

    /// The checks of `rpm`, `tpm` and `tokens_per_day` on the (expired) window.
    fn window_check(
        w: &Window,
        limits: &MemberLimits,
        at: u64,
        wall: SystemTime,
    ) -> Result<(), Limited> {
        if let Some(n) = limits.rpm {
            if w.admitted.len() as u64 >= n {
                // The oldest admission in the window leaves it first.
                let wait = w
                    .admitted
                    .front()
                    .map_or(WINDOW, |t| ns((t + WINDOW_NS).saturating_sub(at)));
                return Err(Limited {
                    limit: Limit::Rpm,
                    value: n,
                    retry_after: at_least_a_second(wait),
                });
            }
        }
        if let Some(n) = limits.tpm {
            if w.tokens_minute >= n {
                // Until enough of the oldest seconds leave the window.
                let mut left = w.tokens_minute;
                let mut wait = WINDOW;
                for &(s, v) in &w.tokens {
                    left -= v;
                    if left < n {
                        wait = Self::leaves(s, at);
                        break;
                    }
                }
                return Err(Limited {
                    limit: Limit::Tpm,
                    value: n,
                    retry_after: at_least_a_second(wait),
                });
            }
        }
        if let Some(n) = limits.tokens_per_day {
            let (day, until_midnight) = utc_day(wall);
            if w.today(day) >= n {
                return Err(Limited {
                    limit: Limit::TokensPerDay,
                    value: n,
                    retry_after: at_least_a_second(until_midnight),
                });
            }
        }
        Ok(())
    }

    /// Admits one request: checked again and counted (its `rpm` slot and, until the returned
    /// permit is dropped, its place among `concurrent`). A refused request counts toward nothing.
    pub fn admit(
        self: &Arc<Self>,
        limits: &MemberLimits,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Permit, Limited> {
        // Taken first: two requests racing for the last place cannot both get it.
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let permit = Permit(self.clone());
        if let Some(n) = limits.concurrent {
            if before >= n {
                return Err(concurrent(n));
            }
        }
        let at = self.at(now);
        let mut w = self.lock(at);
        Self::window_check(&w, limits, at, wall)?;
        if limits.rpm.is_some() {
            w.admitted.push_back(at);
        } else {
            bump(&mut w.requests, at / SECOND_NS, 1);
        }
        Ok(permit)
    }

    /// A request of the member ended having used `tokens`.
    pub fn add_tokens(&self, tokens: u64, now: Instant, wall: SystemTime) {
        if tokens == 0 {
            return;
        }
        let at = self.at(now);
        let mut w = self.lock(at);
        bump(&mut w.tokens, at / SECOND_NS, tokens);
        w.tokens_minute += tokens;
        let (day, _) = utc_day(wall);
        if w.day.0 != day {
            w.day = (day, 0);
        }
        w.day.1 += tokens;
    }

    /// What the member used, now, and when its windows are empty again.
    pub fn used(&self, now: Instant, wall: SystemTime) -> Used {
        let at = self.at(now);
        let w = self.lock(at);
        let (day, _) = utc_day(wall);
        let requests_reset = match (w.admitted.back(), w.requests.back()) {
            (Some(t), _) => ns((t + WINDOW_NS).saturating_sub(at)),
            (None, Some((s, _))) => Self::leaves(*s, at),
            (None, None) => Duration::ZERO,
        };
        let tokens_reset = w
            .tokens
            .back()
            .map_or(Duration::ZERO, |(s, _)| Self::leaves(*s, at));
        Used {
            requests_last_minute: w.admitted.len() as u64
                + w.requests.iter().map(|(_, n)| n).sum::<u64>(),
            tokens_last_minute: w.tokens_minute,
            tokens_today: w.today(day),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            requests_reset,
            tokens_reset,
        }
    }
}

/// The refusal of a member with `n` requests in flight.
fn concurrent(n: u64) -> Limited {
    Limited {
        limit: Limit::Concurrent,
        value: n,
        retry_after: Duration::from_secs(1),
    }
}

/// A request's place among the member's requests in flight, held until the response body (or
/// WebSocket session) ends.
#[derive(Debug)]
pub struct Permit(Arc<MemberState>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(
        rpm: Option<u64>,
        tpm: Option<u64>,
        day: Option<u64>,
        c: Option<u64>,
    ) -> MemberLimits {
        MemberLimits {
            rpm,
            tpm,
            tokens_per_day: day,
            concurrent: c,
        }
    }

    #[test]
    fn rpm_is_a_sliding_window() {
        let s = Arc::new(MemberState::default());
        let l = limits(Some(3), None, None, None);
        let (t0, wall) = (Instant::now(), SystemTime::now());
        for i in 0..3 {
            drop(s.admit(&l, t0 + Duration::from_secs(i * 10), wall).unwrap());
        }
        let refused = s.admit(&l, t0 + Duration::from_secs(25), wall).unwrap_err();
        assert_eq!(refused.limit, Limit::Rpm);
        assert_eq!(refused.retry_after, Duration::from_secs(35));
        assert!(s.check(&l, t0 + Duration::from_secs(59), wall).is_err());
        // The first admission leaves the window at 60 s.
        assert!(s.admit(&l, t0 + Duration::from_secs(60), wall).is_ok());
        assert!(s.admit(&l, t0 + Duration::from_secs(61), wall).is_err());
        let used = s.used(t0 + Duration::from_secs(61), wall);
        assert_eq!(used.requests_last_minute, 3);
        // The newest admission (at 60 s) leaves at 120 s.
        assert_eq!(used.requests_reset, Duration::from_secs(59));
        assert_eq!(used.in_flight, 0);
    }

    #[test]
    fn a_refused_request_counts_toward_nothing() {
        let s = Arc::new(MemberState::default());
        let l = limits(Some(1), None, None, Some(5));
        let (t0, wall) = (Instant::now(), SystemTime::now());
        let _held = s.admit(&l, t0, wall).unwrap();
        for _ in 0..10 {
            assert!(s.admit(&l, t0, wall).is_err());
        }
        let used = s.used(t0, wall);
        assert_eq!((used.requests_last_minute, used.in_flight), (1, 1));
    }

    #[test]
    fn a_large_rpm_costs_no_more_per_request() {
        let s = Arc::new(MemberState::default());
        let l = limits(Some(1_000_000), Some(u64::MAX / 2), None, None);
        let (t0, wall) = (Instant::now(), SystemTime::now());
        for i in 0..200_000u64 {
            let now = t0 + Duration::from_micros(i * 500);
            drop(s.admit(&l, now, wall).unwrap());
        }
        // 200,000 admissions in 100 s: only those of the last 60 s are kept.
        let used = s.used(t0 + Duration::from_secs(100), wall);
        assert!(
            (119_000..=120_001).contains(&used.requests_last_minute),
            "{used:?}"
        );
    }

    #[test]
    fn members_without_rpm_still_show_their_requests() {
        let s = Arc::new(MemberState::default());
        let l = limits(None, None, None, None);
        let (t0, wall) = (Instant::now(), SystemTime::now());
        for i in 0..5 {
            drop(s.admit(&l, t0 + Duration::from_secs(i * 20), wall).unwrap());
        }
        // At 90 s the admissions at 40, 60 and 80 s are in the window.
        let used = s.used(t0 + Duration::from_millis(90_500), wall);
        assert_eq!(used.requests_last_minute, 3);
    }

    #[test]
    fn concurrent_counts_until_the_permit_goes() {
        let s = Arc::new(MemberState::default());
        let l = limits(None, None, None, Some(2));
        let (now, wall) = (Instant::now(), SystemTime::now());
        let a = s.admit(&l, now, wall).unwrap();
        let _b = s.admit(&l, now, wall).unwrap();
        let e = s.admit(&l, now, wall).unwrap_err();
        assert_eq!(
            (e.limit, e.retry_after),
            (Limit::Concurrent, Duration::from_secs(1))
        );
        assert_eq!(s.used(now, wall).in_flight, 2);
        drop(a);
        assert!(s.admit(&l, now, wall).is_ok());
    }

    #[test]
    fn tokens_count_when_requests_end() {
        let s = Arc::new(MemberState::default());
        let l = limits(None, Some(100), Some(250), None);
        let (t0, wall) = (Instant::now(), SystemTime::now());
        assert!(s.check(&l, t0, wall).is_ok());
        s.add_tokens(60, t0, wall);
        s.add_tokens(40, t0 + Duration::from_secs(10), wall);
        let e = s.check(&l, t0 + Duration::from_secs(20), wall).unwrap_err();
        assert_eq!(e.limit, Limit::Tpm);
        // The first 60 tokens leave the window 60 s after they came.
        assert_eq!(e.retry_after, Duration::from_secs(40));
        let used = s.used(t0 + Duration::from_secs(20), wall);
        assert_eq!(used.tokens_last_minute, 100);
        // The last tokens (at 10 s) leave at 70 s (their second counts from the state's start,
        // a moment before t0).
        let reset = used.tokens_reset;
        assert!(reset > Duration::from_secs(49) && reset <= Duration::from_secs(50));
        assert!(s.check(&l, t0 + Duration::from_secs(61), wall).is_ok());
        assert_eq!(
            s.used(t0 + Duration::from_secs(61), wall)
                .tokens_last_minute,
            40
        );
        s.add_tokens(200, t0 + Duration::from_secs(130), wall);
        let e = s
            .check(&l, t0 + Duration::from_secs(200), wall)
            .unwrap_err();
        assert_eq!(e.limit, Limit::TokensPerDay);
        assert!(e.retry_after >= Duration::from_secs(1));
        assert_eq!(
            s.used(t0 + Duration::from_secs(200), wall).tokens_today,
            300
        );
        // A new UTC day starts from nothing.
        let tomorrow = wall + Duration::from_secs(86_400);
        assert!(s.check(&l, t0 + Duration::from_secs(200), tomorrow).is_ok());
    }
}
