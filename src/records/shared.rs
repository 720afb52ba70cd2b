//! The tables replicas share besides the records: who is running (the roster) and each
//! upstream's health (see the operations guide, "Several replicas").
//!
//! They are created with the record table, under the same migration lock, so replicas starting
//! together do not race; every statement is idempotent, so an older database gains them on the
//! next start. Only the DDL and the one read other modules need live here: the replicas'
//! own connection (`crate::replicas`) does the rest, off every request's path.

use super::{Store, StoreError};

/// The roster and the health table. `version` comes from one sequence, so a replica can tell a
/// changed row from one it has seen; `epoch` changes only when a cooldown starts or ends, so a
/// recovery can be refused when someone started a newer cooldown in between.
const TABLES: &str = "
    CREATE TABLE IF NOT EXISTS openai_api_route_replicas (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        listen TEXT NOT NULL,
        version TEXT NOT NULL,
        seen TIMESTAMPTZ NOT NULL
    );
    CREATE SEQUENCE IF NOT EXISTS openai_api_route_health_version;
    CREATE TABLE IF NOT EXISTS openai_api_route_health (
        upstream TEXT PRIMARY KEY,
        version BIGINT NOT NULL,
        epoch BIGINT NOT NULL DEFAULT 0,
        down BOOLEAN NOT NULL DEFAULT false,
        until TIMESTAMPTZ,
        opener TEXT,
        open_until TIMESTAMPTZ,
        next_probe TIMESTAMPTZ,
        last_probe TEXT,
        probed TIMESTAMPTZ,
        changed_by TEXT NOT NULL DEFAULT '',
        changed TIMESTAMPTZ NOT NULL DEFAULT now()
    );";

/// Creates the shared tables (called by the migration, under its advisory lock).
pub(super) fn postgres_tables(conn: &mut postgres::Client) -> Result<(), postgres::Error> {
    conn.batch_execute(TABLES)
}

/// The replicas that heartbeat into the roster and were seen in the last minute, this one
/// included once it has beaten: what a member's share of a limit is divided by while PostgreSQL
/// cannot be reached (see the members guide). 1 with SQLite, which has no replicas.
pub fn seen_last_minute(store: &Store) -> Result<u64, StoreError> {
    match store {
        Store::Sqlite(_) => Ok(1),
        Store::Postgres(pool) => {
            let mut conn = pool.get().map_err(StoreError::unreachable)?;
            let row = conn
                .query_one(
                    "SELECT count(*) FROM openai_api_route_replicas \
                     WHERE seen > now() - interval '1 minute'",
                    &[],
                )
                .map_err(StoreError::from_pg)?;
            Ok(row.get::<_, i64>(0).max(0) as u64)
        }
    }
}
