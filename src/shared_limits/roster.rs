//! This replica's id and, until the replica roster of the operations guide lands, a stand-in
//! for it.
//!
//! STAND-IN (drop on merge with the roster): the roster creates and heartbeats
//! `openai_api_route_replicas` itself. Until it does, the sharing of members' limits needs the
//! table to count the replicas seen in the last minute and to tell live holders of places from
//! dead ones, so this file creates it with the same shape and refreshes this replica's row
//! every second. Once the roster exists, only [`replica_id`] should stay, or be replaced by the
//! roster's own id.

use postgres::Client;

/// The roster's table, exactly as the roster creates it.
pub(super) const TABLE: &str = "CREATE TABLE IF NOT EXISTS openai_api_route_replicas (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    listen TEXT NOT NULL,
    version TEXT NOT NULL,
    seen TIMESTAMPTZ NOT NULL
)";

/// This replica's heartbeat (STAND-IN).
pub(super) const HEARTBEAT: &str = "INSERT INTO openai_api_route_replicas (id, host, listen, \
     version, seen) VALUES ($1, $2, $3, $4, now()) \
     ON CONFLICT (id) DO UPDATE SET seen = now(), listen = excluded.listen";

/// Replicas seen in the last minute (the share's divisor).
pub(super) const COUNT: &str =
    "SELECT count(*) FROM openai_api_route_replicas WHERE seen > now() - interval '1 minute'";

/// A new id for this process: host name, process id and a random part (a restarted replica is
/// a new one; the places its old self held stop counting when that row goes stale).
pub(super) fn replica_id() -> String {
    let mut bytes = [0u8; 6];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    let tail: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{tail}", host(), std::process::id())
}

/// The machine's name (the roster's `host`).
pub(super) fn host() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Refreshes this replica's row (STAND-IN).
pub(super) fn heartbeat(
    c: &mut Client,
    st: &postgres::Statement,
    id: &str,
    host: &str,
    listen: &str,
) -> Result<(), postgres::Error> {
    let version = env!("CARGO_PKG_VERSION");
    c.execute(st, &[&id, &host, &listen, &version]).map(|_| ())
}
