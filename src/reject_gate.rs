//! How many records of rejected requests are written (version 0.3; see the security guide, "Second
//! probe (0.3): limits"): at most [`PER_SECOND`] a second and [`PER_HOUR`] an hour, for each
//! rejection reason on its own.
//!
//! Why per reason: with one shared budget a flood of one kind (a client hammering with a wrong
//! token) used up every slot, so no other refused request — a body the gateway could not read,
//! a loop — was ever recorded while it lasted. Why an hourly cap besides the per-second one: ten
//! records a second are still 864,000 rows a day per reason; 1,000 an hour keeps a day's worth of
//! a permanent flood under 200,000 rows for all eight reasons together, and every refusal is still
//! counted in `openai_api_route_rejected_total`.
//!
//! Both windows are fixed (the current second, the current hour of the Unix clock), so the gate
//! needs no timer; the caller passes the time, which is what lets tests run an hour in a loop.

use std::sync::Mutex;

use crate::error::Rejection;

/// Records per reason per second.
pub const PER_SECOND: u32 = 10;
/// Records per reason per hour.
pub const PER_HOUR: u32 = 1_000;

/// The counts of one reason in its current second and hour.
#[derive(Debug, Default, Clone, Copy)]
struct Window {
    second: u64,
    in_second: u32,
    hour: u64,
    in_hour: u32,
}

/// See the module docs. One small lock per reason (and one for handshakes refused because too
/// many WebSocket sessions are open, bounded the same way): a flood of one reason never waits
/// for another's.
#[derive(Debug, Default)]
pub struct RejectGate([Mutex<Window>; Rejection::ALL.len() + 1]);

impl RejectGate {
    /// Whether one more request refused for `reason` may be recorded at `now_sec` (Unix seconds).
    pub fn admit(&self, reason: Rejection, now_sec: u64) -> bool {
        let slot = Rejection::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.admit_slot(slot, now_sec)
    }

    /// Whether one more WebSocket handshake refused with 429 (session limits) may be recorded.
    pub fn admit_sessions_full(&self, now_sec: u64) -> bool {
        self.admit_slot(Rejection::ALL.len(), now_sec)
    }

    fn admit_slot(&self, slot: usize, now_sec: u64) -> bool {
        let Some(Ok(mut w)) = self.0.get(slot).map(Mutex::lock) else {
            return false;
        };
        let hour = now_sec / 3600;
        if w.hour != hour {
            w.hour = hour;
            w.in_hour = 0;
        }
        if w.second != now_sec {
            w.second = now_sec;
            w.in_second = 0;
        }
        if w.in_second >= PER_SECOND || w.in_hour >= PER_HOUR {
            return false;
        }
        w.in_second += 1;
        w.in_hour += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_a_second_per_reason() {
        let g = RejectGate::default();
        assert_eq!((0..100).filter(|_| g.admit(Rejection::Auth, 7)).count(), 10);
        // Another reason in the same second has its own ten.
        assert_eq!(
            (0..100)
                .filter(|_| g.admit(Rejection::BadRequest, 7))
                .count(),
            10
        );
        assert!(!g.admit(Rejection::Auth, 7));
        assert_eq!((0..100).filter(|_| g.admit(Rejection::Auth, 8)).count(), 10);
    }

    #[test]
    fn a_thousand_an_hour_per_reason() {
        let g = RejectGate::default();
        // An hour-long flood of 50 a second, second by second.
        let start = 3600 * 10;
        let admitted = (start..start + 3600)
            .map(|s| (0..50).filter(|_| g.admit(Rejection::Auth, s)).count())
            .sum::<usize>();
        assert_eq!(admitted, 1_000);
        // The cap was reached after 100 s; the rest of the hour writes nothing, other reasons
        // still write.
        assert!(!g.admit(Rejection::Auth, start + 3599));
        assert!(g.admit(Rejection::Loop, start + 3599));
        // The next hour starts afresh.
        assert_eq!(
            (0..50)
                .filter(|_| g.admit(Rejection::Auth, start + 3600))
                .count(),
            10
        );
    }
}
