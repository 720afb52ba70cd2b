//! What the gateway learns about an upstream while serving, kept with the registry's view so that
//! a reload forgets it in one place: an upstream that refused the added `stream_options` (see the
//! security guide, "Second probe (0.3): limits": not sent it for ten minutes, and only on proof)
//! and one that ignored a prefill (see the rescue guide: asked to regenerate instead until the
//! next reload).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an upstream that refused the added `stream_options` is not sent it.
pub const REFUSAL_TTL: Duration = Duration::from_secs(600);

/// One fact about one upstream (by its index in the view's config).
#[derive(Debug, Default, Clone, Copy)]
struct Facts {
    /// It refused the added `stream_options` until then.
    refuses_usage_until: Option<Instant>,
    /// It answered a prefill from the start: it is asked to regenerate instead.
    ignores_prefill: bool,
}

/// See the module docs. Shared by every view published under one config; a reload starts a new
/// one, empty.
#[derive(Debug, Default)]
pub struct Learned {
    /// Nothing learned yet: the request path skips the lock (the common case).
    any: AtomicBool,
    facts: Mutex<HashMap<usize, Facts>>,
}

impl Learned {
    fn get(&self, idx: usize) -> Option<Facts> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let g = match self.facts.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.get(&idx).copied()
    }

    fn update(&self, idx: usize, f: impl FnOnce(&mut Facts)) {
        let mut g = match self.facts.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(g.entry(idx).or_default());
        self.any.store(true, Ordering::Relaxed);
    }

    /// Whether upstream `idx` refuses the added `stream_options` now.
    pub fn refuses_usage(&self, idx: usize) -> bool {
        self.refuses_usage_at(idx, Instant::now())
    }

    fn refuses_usage_at(&self, idx: usize, now: Instant) -> bool {
        self.get(idx)
            .and_then(|f| f.refuses_usage_until)
            .is_some_and(|until| now < until)
    }

    /// Upstream `name` (index `idx`) answered 400 naming the added option, and the request was
    /// repeated without it: the refusal is learnt only when that repeat succeeded (`repeat_ok`),
    /// so a crafted 400 cannot turn token counting off for everyone.
    pub fn usage_refused(&self, idx: usize, name: &str, repeat_ok: bool) {
        if !repeat_ok {
            log::info!(
                "upstream {name} answered 400 naming stream_options, but not only because of it: \
                 still adding it there"
            );
            return;
        }
        log::warn!(
            "upstream {name} refuses stream_options: not adding it there for {}s",
            REFUSAL_TTL.as_secs()
        );
        self.refuse_usage_at(idx, Instant::now());
    }

    fn refuse_usage_at(&self, idx: usize, now: Instant) {
        self.update(idx, |f| f.refuses_usage_until = Some(now + REFUSAL_TTL));
    }

    /// Whether upstream `idx` was seen ignoring a prefill.
    pub fn ignores_prefill(&self, idx: usize) -> bool {
        self.get(idx).is_some_and(|f| f.ignores_prefill)
    }

    /// Upstream `idx` answered a prefill from the start: asked to regenerate until the next
    /// reload.
    pub fn prefill_ignored(&self, idx: usize) {
        self.update(idx, |f| f.ignores_prefill = true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_expires_and_needs_proof() {
        let l = Learned::default();
        let t0 = Instant::now();
        assert!(!l.refuses_usage(0));
        l.usage_refused(0, "a", false);
        assert!(!l.refuses_usage(0), "no proof, no refusal");
        l.refuse_usage_at(0, t0);
        assert!(l.refuses_usage_at(0, t0 + Duration::from_secs(599)));
        assert!(!l.refuses_usage_at(0, t0 + REFUSAL_TTL));
        assert!(!l.refuses_usage_at(1, t0), "per upstream");
        assert!(!l.ignores_prefill(0));
        l.prefill_ignored(0);
        assert!(l.ignores_prefill(0));
        assert!(
            !Learned::default().ignores_prefill(0),
            "a reload starts afresh"
        );
    }
}
