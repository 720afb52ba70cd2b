//! The arithmetic of the sharing, apart from its state and its thread: shares, block sizes,
//! UTC days, and the checks made from numbers already known.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use crate::member_limits::{Limit, Limited, MemberLimits, Used};

use super::{GroupState, Others};

/// A member's share while PostgreSQL cannot be reached: ⌊limit ÷ replicas⌋, at least 1.
pub fn share(limit: u64, replicas: u64) -> u64 {
    (limit / replicas.max(1)).max(1)
}

/// How many slots or spare places a replica takes at once: at most 5 % of the limit divided
/// among the replicas, at least 1 (what a replica holds and does not use is admission lost,
/// never admission beyond the limit).
pub fn block(limit: u64, replicas: u64) -> u64 {
    (limit / 20 / replicas.max(1)).max(1)
}

/// The UTC day of `t` (days since 1970) and its first second.
pub(super) fn utc_day(t: SystemTime) -> (u64, u64) {
    let secs = unix(t);
    (secs / 86_400, secs - secs % 86_400)
}

/// Seconds since 1970 (the token table's seconds, the same on every replica with a synced clock).
pub(super) fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Takes a slot from the oldest lease still usable.
pub(super) fn take_leased(s: &mut GroupState, now: Instant) -> bool {
    for l in s.leases.iter_mut() {
        if l.left > 0 && l.deadline > now {
            l.left -= 1;
            return true;
        }
    }
    false
}

pub(super) fn limited(limit: Limit, value: u64, wait: Duration) -> Limited {
    let s = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    Limited {
        limit,
        value,
        retry_after: Duration::from_secs(s.max(1)),
    }
}

/// The token limits against this replica's tokens and the others' as last read.
pub(super) fn tokens_check(
    limits: &MemberLimits,
    local: &Used,
    others: &Others,
    wall: SystemTime,
) -> Result<(), Limited> {
    let now = unix(wall);
    let (day, start) = utc_day(wall);
    if let Some(n) = limits.tpm {
        if local.tokens_last_minute + others.tokens_last_minute >= n {
            let wait = others
                .oldest
                .map_or(60, |s| (s + 60).saturating_sub(now))
                .max(1);
            return Err(limited(Limit::Tpm, n, Duration::from_secs(wait)));
        }
    }
    if let Some(n) = limits.tokens_per_day {
        let today = if others.day == day {
            others.tokens_today
        } else {
            0
        };
        if local.tokens_today + today >= n {
            let wait = Duration::from_secs(start + 86_400 - now);
            return Err(limited(Limit::TokensPerDay, n, wait));
        }
    }
    Ok(())
}

/// This replica's own tokens of a member.
#[derive(Debug, Default)]
pub(super) struct Mine {
    /// (Unix second, tokens), oldest first, at most 60 s old.
    seconds: VecDeque<(u64, u64)>,
    /// UTC day and its tokens.
    day: (u64, u64),
}

impl Mine {
    pub(super) fn add(&mut self, second: u64, tokens: u64) {
        match self.seconds.back_mut() {
            Some((s, t)) if *s == second => *t += tokens,
            _ => self.seconds.push_back((second, tokens)),
        }
        let day = second / 86_400;
        if self.day.0 != day {
            self.day = (day, 0);
        }
        self.day.1 += tokens;
    }

    /// Tokens of the last 60 s and of this UTC day, at `now` (Unix seconds).
    pub(super) fn used(&mut self, now: u64) -> Used {
        while self.seconds.front().is_some_and(|(s, _)| s + 60 <= now) {
            self.seconds.pop_front();
        }
        Used {
            tokens_last_minute: self.seconds.iter().map(|(_, t)| t).sum(),
            tokens_today: if self.day.0 == now / 86_400 {
                self.day.1
            } else {
                0
            },
            ..Used::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_limits::{Lease, LEASE_LIFE};

    #[test]
    fn shares_and_blocks() {
        assert_eq!(share(10, 3), 3);
        assert_eq!(share(1, 4), 1);
        assert_eq!(share(60, 0), 60);
        assert_eq!(block(60, 2), 1);
        assert_eq!(block(6000, 2), 150);
        assert_eq!(block(39, 1), 1);
        assert_eq!(block(40, 1), 2);
    }

    #[test]
    fn leases_are_used_oldest_first_and_never_after_their_deadline() {
        let now = Instant::now();
        let mut s = GroupState::default();
        s.leases.push_back(Lease {
            id: 1,
            left: 1,
            deadline: now - Duration::from_millis(1),
        });
        s.leases.push_back(Lease {
            id: 2,
            left: 2,
            deadline: now + LEASE_LIFE,
        });
        assert!(take_leased(&mut s, now));
        assert!(take_leased(&mut s, now));
        assert!(!take_leased(&mut s, now));
        assert_eq!(s.leases[0].left, 1, "the expired lease is untouched");
    }

    #[test]
    fn tokens_count_the_others() {
        let wall = SystemTime::now();
        let (day, _) = utc_day(wall);
        let l = MemberLimits {
            tpm: Some(100),
            tokens_per_day: Some(1000),
            ..Default::default()
        };
        let mut local = Used {
            tokens_last_minute: 50,
            tokens_today: 50,
            ..Default::default()
        };
        let mut others = Others {
            tokens_last_minute: 49,
            tokens_today: 900,
            day,
            oldest: Some(unix(wall) - 20),
            at: Some(Instant::now()),
        };
        assert!(tokens_check(&l, &local, &others, wall).is_ok());
        others.tokens_last_minute = 50;
        let e = tokens_check(&l, &local, &others, wall).unwrap_err();
        assert_eq!(
            (e.limit, e.retry_after),
            (Limit::Tpm, Duration::from_secs(40))
        );
        others.tokens_last_minute = 0;
        local.tokens_today = 100;
        let e = tokens_check(&l, &local, &others, wall).unwrap_err();
        assert_eq!(e.limit, Limit::TokensPerDay);
        // Yesterday's sum is not today's.
        others.day = day - 1;
        assert!(tokens_check(&l, &local, &others, wall).is_ok());
    }

    #[test]
    fn own_tokens_leave_the_minute_and_the_day() {
        let mut m = Mine::default();
        let t0 = 86_400 * 20_000 + 100;
        m.add(t0, 10);
        m.add(t0, 5);
        m.add(t0 + 30, 7);
        assert_eq!(m.used(t0 + 30).tokens_last_minute, 22);
        assert_eq!(m.used(t0 + 60).tokens_last_minute, 7);
        assert_eq!(m.used(t0 + 60).tokens_today, 22);
        assert_eq!(m.used(t0 + 86_400).tokens_today, 0);
    }
}
