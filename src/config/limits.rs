//! The limits (version 0.3; see the security guide, "Second probe (0.3): limits") that bound
//! what one client or upstream can make the gateway hold: WebSocket sessions and their partly
//! received frames, and the text a continuation may carry to the next upstream. Kept in one place
//! so that an operator reads them together.
//!
//! Reload: every value applies to what starts after the reload (a handshake, a session's idle
//! timer, a continuation); open WebSocket sessions keep the idle timeout they started with, and
//! the shared buffer budget takes its new size at the next handshake.

use std::time::Duration;

use serde_yaml::Mapping;

use super::parse::Parser;

/// See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Open WebSocket sessions in all; a handshake beyond is answered 429.
    pub realtime_max_sessions: usize,
    /// Open WebSocket sessions per client token; a handshake beyond is answered 429.
    pub realtime_max_sessions_per_token: usize,
    /// A session with no frame in either direction for this long is closed with 1001.
    pub realtime_idle_timeout: Duration,
    /// Bytes that partly received frames of all sessions together may hold; a session that
    /// would need more is closed with 1009.
    pub realtime_buffer_bytes: usize,
    /// A broken stream whose text already sent is longer than this is not resumed (see the
    /// security guide, "Second probe (0.3): limits").
    pub resume_max_bytes: usize,
    /// Bytes of chain parts (request inputs and output items) held in memory for rebuilding
    /// (see the affinity guide, "Bounded reading"), wherever they were read from.
    pub rebuild_memory: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            realtime_max_sessions: 1_000,
            realtime_max_sessions_per_token: 100,
            realtime_idle_timeout: Duration::from_secs(600),
            realtime_buffer_bytes: 256 << 20,
            resume_max_bytes: 65_536,
            rebuild_memory: 64 << 20,
        }
    }
}

impl Parser<'_> {
    /// Reads the limits' top-level keys (listed in `parse::ROOT_KEYS`).
    pub(super) fn limits(&mut self, map: &Mapping) -> Limits {
        let d = Limits::default();
        let at_least_one = |p: &mut Self, key: &str, default: usize| {
            let n = p.integer(key, map.get(key), default as u64);
            if n == 0 {
                p.err(key, "must be at least 1");
            }
            usize::try_from(n).unwrap_or(usize::MAX)
        };
        let realtime_max_sessions =
            at_least_one(self, "realtime_max_sessions", d.realtime_max_sessions);
        let realtime_max_sessions_per_token = at_least_one(
            self,
            "realtime_max_sessions_per_token",
            d.realtime_max_sessions_per_token,
        );
        let realtime_buffer_bytes =
            at_least_one(self, "realtime_buffer_bytes", d.realtime_buffer_bytes);
        let realtime_idle_timeout = self.seconds(
            "realtime_idle_timeout",
            map.get("realtime_idle_timeout"),
            d.realtime_idle_timeout,
        );
        let resume_max_bytes = self.integer(
            "resume_max_bytes",
            map.get("resume_max_bytes"),
            d.resume_max_bytes as u64,
        );
        let rebuild_memory = self.integer(
            "rebuild_memory",
            map.get("rebuild_memory"),
            d.rebuild_memory as u64,
        );
        Limits {
            realtime_max_sessions,
            realtime_max_sessions_per_token,
            realtime_idle_timeout,
            realtime_buffer_bytes,
            resume_max_bytes: usize::try_from(resume_max_bytes).unwrap_or(usize::MAX),
            rebuild_memory: usize::try_from(rebuild_memory).unwrap_or(usize::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Limits, String> {
        crate::config::parse(std::path::Path::new("t.yaml"), text, true, &|_| None)
            .map(|(c, w)| {
                assert!(w.is_empty(), "{w:?}");
                c.limits
            })
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_values_and_errors() {
        let base = "upstreams: [{name: a, endpoint: 'http://h/v1'}]\n";
        assert_eq!(parse(base).unwrap(), Limits::default());
        let l = parse(&format!(
            "{base}realtime_max_sessions: 2\nrealtime_max_sessions_per_token: 1\nrealtime_idle_timeout: 1.5\nrealtime_buffer_bytes: 4096\nresume_max_bytes: 0\n"
        ))
        .unwrap();
        assert_eq!(l.realtime_max_sessions, 2);
        assert_eq!(l.realtime_max_sessions_per_token, 1);
        assert_eq!(l.realtime_idle_timeout, Duration::from_millis(1500));
        assert_eq!(l.realtime_buffer_bytes, 4096);
        assert_eq!(l.resume_max_bytes, 0);
        let e = parse(&format!(
            "{base}realtime_max_sessions: 0\nrealtime_idle_timeout: 0\nrealtime_buffer_bytes: -1\nresume_max_bytes: 1.5\n"
        ))
        .unwrap_err();
        for key in [
            "realtime_max_sessions: must be at least 1",
            "realtime_idle_timeout: must be greater than 0",
            "realtime_buffer_bytes: expected a non-negative number",
            "resume_max_bytes: expected a whole number",
        ] {
            assert!(e.contains(key), "{key} not in {e}");
        }
    }
}
