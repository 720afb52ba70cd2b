//! What bounds WebSocket sessions (version 0.3; see the security guide, "Second probe (0.3):
//! limits"): how many may be open, in all and per client token, and how many bytes their partly
//! received frames may hold together.
//!
//! Why a shared byte budget rather than a per-session one: the gateway relays frame by frame, so
//! a session holds at most the one frame it is reading per direction — but a peer can announce a
//! 16 MiB frame and dribble it, and 20 such sessions pinned 326 MiB in the probe. A per-session
//! cap small enough to stop that would refuse the Realtime API's legitimate large audio events;
//! one budget for all lets a few sessions use big frames while the sum stays bounded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Open sessions, in all and per client token label.
#[derive(Debug, Default)]
pub(super) struct SessionCounts(Mutex<(usize, HashMap<Arc<str>, usize>)>);

/// Why a handshake gets no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Full {
    /// `realtime_max_sessions` are open.
    All,
    /// `realtime_max_sessions_per_token` are open for this token.
    Token,
}

impl SessionCounts {
    /// Takes a slot for a new session of `token` (None without auth: only the total counts),
    /// unless `max` sessions are open or `per_token` of this token's.
    pub(super) fn open(
        self: &Arc<Self>,
        token: Option<&Arc<str>>,
        max: usize,
        per_token: usize,
    ) -> Result<Slot, Full> {
        let Ok(mut g) = self.0.lock() else {
            return Err(Full::All);
        };
        let (total, by_token) = &mut *g;
        if *total >= max {
            return Err(Full::All);
        }
        if let Some(t) = token {
            let n = by_token.entry(t.clone()).or_insert(0);
            if *n >= per_token {
                return Err(Full::Token);
            }
            *n += 1;
        }
        *total += 1;
        Ok(Slot {
            counts: self.clone(),
            token: token.cloned(),
        })
    }
}

/// One open (or opening) session's place in the counts; given back when dropped.
#[derive(Debug)]
pub(super) struct Slot {
    counts: Arc<SessionCounts>,
    token: Option<Arc<str>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Ok(mut g) = self.counts.0.lock() else {
            return;
        };
        let (total, by_token) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(t) = &self.token {
            if let Some(n) = by_token.get_mut(t) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    by_token.remove(t);
                }
            }
        }
    }
}

/// The bytes partly received frames of all sessions hold, and the most they may hold.
#[derive(Debug, Default)]
pub(super) struct BufferBudget {
    used: AtomicUsize,
    cap: AtomicUsize,
}

impl BufferBudget {
    /// Sets the cap (`realtime_buffer_bytes` of the config a handshake ran under).
    pub(super) fn set_cap(&self, cap: usize) {
        self.cap.store(cap, Ordering::Relaxed);
    }

    /// Bytes held now (for tests and the log).
    pub(super) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// What one direction of one session holds of the budget; released when dropped.
#[derive(Debug)]
pub(super) struct Reservation {
    budget: Arc<BufferBudget>,
    held: usize,
}

impl Reservation {
    /// Holds nothing yet.
    pub(super) fn new(budget: Arc<BufferBudget>) -> Reservation {
        Reservation { budget, held: 0 }
    }

    /// Makes the reservation `need` bytes; false (and unchanged) when growing it would take the
    /// budget beyond its cap.
    pub(super) fn resize(&mut self, need: usize) -> bool {
        if need <= self.held {
            self.budget
                .used
                .fetch_sub(self.held - need, Ordering::Relaxed);
            self.held = need;
            return true;
        }
        let more = need - self.held;
        let cap = self.budget.cap.load(Ordering::Relaxed);
        let grown = self
            .budget
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(more).filter(|n| *n <= cap)
            });
        if grown.is_ok() {
            self.held = need;
        }
        grown.is_ok()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.held, Ordering::Relaxed);
    }
}

/// The bytes the frame starting `buf` needs in all (header and declared payload), or what `buf`
/// holds while even the header is incomplete; 0 when `buf` is empty.
pub(super) fn pending_frame_bytes(buf: &[u8]) -> usize {
    let (Some(&b1), n) = (buf.get(1), buf.len()) else {
        return buf.len();
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    let (ext, payload) = match b1 & 0x7f {
        126 if n >= 4 => (2, u64::from(u16::from_be_bytes([buf[2], buf[3]]))),
        127 if n >= 10 => {
            let mut len = [0u8; 8];
            len.copy_from_slice(&buf[2..10]);
            (8, u64::from_be_bytes(len))
        }
        126 | 127 => return n,
        len => (0, u64::from(len)),
    };
    let total = 2u64 + ext + mask + payload;
    usize::try_from(total).unwrap_or(usize::MAX).max(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_in_all_and_per_token() {
        let c = Arc::new(SessionCounts::default());
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let s1 = c.open(Some(&a), 3, 1).unwrap();
        assert_eq!(c.open(Some(&a), 3, 1).unwrap_err(), Full::Token);
        let s2 = c.open(Some(&b), 3, 1).unwrap();
        let s3 = c.open(None, 3, 1).unwrap();
        assert_eq!(c.open(None, 3, 1).unwrap_err(), Full::All);
        drop(s1);
        let _s4 = c.open(Some(&a), 3, 1).unwrap();
        drop((s2, s3));
        assert_eq!(c.0.lock().unwrap().0, 1);
        assert_eq!(c.0.lock().unwrap().1.len(), 1);
    }

    #[test]
    fn budget_is_shared_and_released() {
        let b = Arc::new(BufferBudget::default());
        b.set_cap(100);
        let mut r1 = Reservation::new(b.clone());
        let mut r2 = Reservation::new(b.clone());
        assert!(r1.resize(60));
        assert!(!r2.resize(41));
        assert!(r2.resize(40));
        assert!(r1.resize(10));
        assert!(r2.resize(90));
        assert_eq!(b.used(), 100);
        drop(r2);
        assert_eq!(b.used(), 10);
        assert!(r1.resize(0));
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn pending_bytes_from_the_header() {
        assert_eq!(pending_frame_bytes(&[]), 0);
        assert_eq!(pending_frame_bytes(&[0x82]), 1);
        assert_eq!(pending_frame_bytes(&[0x82, 5, 1]), 7);
        assert_eq!(pending_frame_bytes(&[0x82, 0x85, 1]), 11);
        assert_eq!(pending_frame_bytes(&[0x82, 126, 1]), 3);
        assert_eq!(pending_frame_bytes(&[0x82, 126, 1, 0]), 2 + 2 + 256);
        let mut h = vec![0x82, 0xff];
        h.extend_from_slice(&(1u64 << 24).to_be_bytes());
        assert_eq!(pending_frame_bytes(&h), 2 + 8 + 4 + (1 << 24));
    }
}
