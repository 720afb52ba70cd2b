//! What one member has used, and whether it may send one more request (see the members guide,
//! "Limits").
//!
//! Each member's counters sit behind their own short lock, so members never wait on each other:
//! a sliding window of the last `rpm` admissions (a ring of their times: "at most `rpm` in any
//! 60-second window" exactly), the tokens of the last 60 seconds in one-second buckets, the
//! tokens of the current UTC day, and an atomic count of requests in flight. A request over a
//! limit is refused before its body is read.
//!
//! Replicas sharing a PostgreSQL store extend these counters with what the others used (the
//! shared counters of the replicas guide); the checks here stay the same.
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
}

/// Tokens per second of the last minute.
#[derive(Debug, Default)]
struct Tokens {
    /// (second since start, tokens), oldest first, at most 60 seconds old.
    seconds: VecDeque<(u64, u64)>,
    /// UTC day number and its tokens.
    day: (u64, u64),
}

/// One member's counters; see the module docs.
#[derive(Debug)]
pub struct MemberState {
    /// Times of the admissions of the last 60 s (at most `rpm` kept).
    admitted: Mutex<VecDeque<Instant>>,
    tokens: Mutex<Tokens>,
    in_flight: AtomicU64,
    /// When the counters started (the seconds of the token buckets count from it).
    epoch: Instant,
}

impl Default for MemberState {
    fn default() -> Self {
        MemberState {
            admitted: Mutex::default(),
            tokens: Mutex::default(),
            in_flight: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
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
    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
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
                return Err(Limited {
                    limit: Limit::Concurrent,
                    value: n,
                    retry_after: Duration::from_secs(1),
                });
            }
        }
        if let Some(n) = limits.rpm {
            let q = lock(&self.admitted);
            if let Some(wait) = rpm_wait(&q, n, now) {
                return Err(Limited {
                    limit: Limit::Rpm,
                    value: n,
                    retry_after: at_least_a_second(wait),
                });
            }
        }
        if limits.tpm.is_some() || limits.tokens_per_day.is_some() {
            let mut t = lock(&self.tokens);
            let second = self.second(now);
            expire(&mut t, second);
            if let Some(n) = limits.tpm {
                let used: u64 = t.seconds.iter().map(|(_, v)| v).sum();
                if used >= n {
                    // Until enough of the oldest seconds leave the window.
                    let mut left = used;
                    let mut wait = WINDOW;
                    for &(s, v) in &t.seconds {
                        left -= v;
                        if left < n {
                            wait = Duration::from_secs(s + 60)
                                .saturating_sub(now.saturating_duration_since(self.epoch));
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
                let today = if t.day.0 == day { t.day.1 } else { 0 };
                if today >= n {
                    return Err(Limited {
                        limit: Limit::TokensPerDay,
                        value: n,
                        retry_after: at_least_a_second(until_midnight),
                    });
                }
            }
        }
        Ok(())
    }

    /// Admits one request: checked again and counted (its `rpm` slot and, until the returned
    /// permit is dropped, its place among `concurrent`).
    pub fn admit(
        self: &Arc<Self>,
        limits: &MemberLimits,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Permit, Limited> {
        if let Some(n) = limits.concurrent {
            // Taken first: two requests racing for the last place cannot both get it.
            let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
            if before >= n {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Err(Limited {
                    limit: Limit::Concurrent,
                    value: n,
                    retry_after: Duration::from_secs(1),
                });
            }
        } else {
            self.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        let permit = Permit(self.clone());
        let no_rpm = MemberLimits {
            concurrent: None,
            rpm: None,
            ..*limits
        };
        self.check(&no_rpm, now, wall)?;
        if let Some(n) = limits.rpm {
            let mut q = lock(&self.admitted);
            if let Some(wait) = rpm_wait(&q, n, now) {
                return Err(Limited {
                    limit: Limit::Rpm,
                    value: n,
                    retry_after: at_least_a_second(wait),
                });
            }
            while q.len() as u64 >= n {
                q.pop_front();
            }
            q.push_back(now);
        }
        Ok(permit)
    }

    /// A request of the member ended having used `tokens`.
    pub fn add_tokens(&self, tokens: u64, now: Instant, wall: SystemTime) {
        if tokens == 0 {
            return;
        }
        let mut t = lock(&self.tokens);
        let second = self.second(now);
        expire(&mut t, second);
        match t.seconds.back_mut() {
            Some((s, v)) if *s == second => *v += tokens,
            _ => t.seconds.push_back((second, tokens)),
        }
        let (day, _) = utc_day(wall);
        if t.day.0 != day {
            t.day = (day, 0);
        }
        t.day.1 += tokens;
    }

    /// What the member used, now.
    pub fn used(&self, now: Instant, wall: SystemTime) -> Used {
        let requests_last_minute = {
            let q = lock(&self.admitted);
            q.iter()
                .filter(|t| now.saturating_duration_since(**t) < WINDOW)
                .count() as u64
        };
        let mut t = lock(&self.tokens);
        expire(&mut t, self.second(now));
        let (day, _) = utc_day(wall);
        Used {
            requests_last_minute,
            tokens_last_minute: t.seconds.iter().map(|(_, v)| v).sum(),
            tokens_today: if t.day.0 == day { t.day.1 } else { 0 },
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }

    /// When the request window and the token window would be empty again (OpenAI's
    /// `x-ratelimit-reset-*`: back to the initial state).
    pub fn resets(&self, now: Instant) -> (Duration, Duration) {
        let requests = lock(&self.admitted).back().map_or(Duration::ZERO, |t| {
            (*t + WINDOW).saturating_duration_since(now)
        });
        let mut t = lock(&self.tokens);
        let second = self.second(now);
        expire(&mut t, second);
        let tokens = t.seconds.back().map_or(Duration::ZERO, |(s, _)| {
            Duration::from_secs(s + 60).saturating_sub(now.saturating_duration_since(self.epoch))
        });
        (requests, tokens)
    }
}

/// How long until one more request fits an `rpm` of `n`, or None when it fits now.
fn rpm_wait(q: &VecDeque<Instant>, n: u64, now: Instant) -> Option<Duration> {
    let in_window = q
        .iter()
        .filter(|t| now.saturating_duration_since(**t) < WINDOW)
        .count() as u64;
    if in_window < n {
        return None;
    }
    // The oldest admission in the window leaves it first.
    let oldest = q
        .iter()
        .find(|t| now.saturating_duration_since(**t) < WINDOW)?;
    Some((*oldest + WINDOW).saturating_duration_since(now))
}

/// Drops the token seconds that left the window.
fn expire(t: &mut Tokens, second: u64) {
    while t.seconds.front().is_some_and(|(s, _)| s + 60 <= second) {
        t.seconds.pop_front();
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
        assert_eq!(
            s.used(t0 + Duration::from_secs(61), wall)
                .requests_last_minute,
            3
        );
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
        assert!(s.check(&l, t0 + Duration::from_secs(61), wall).is_ok());
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
    }
}
