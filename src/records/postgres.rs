//! The PostgreSQL store, for several replicas sharing one record table (`-database postgres://…`).
//!
//! Same columns as SQLite, with `created_at timestamptz`. Migrations run under an advisory lock
//! so replicas starting together do not race; batches are one binary `COPY` in one transaction.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use postgres::NoTls;
use r2d2_postgres::PostgresConnectionManager;

use super::{DbError, Record, StoreError, COLUMN_COUNT as COLUMNS, INSERT_COLUMNS};

/// A pool of PostgreSQL connections.
pub type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// Key of the advisory lock held while migrating (any constant unique to this program).
const MIGRATION_LOCK: i64 = 0x006f_6172_5f6d_6967;

const MIGRATIONS: &[&str] = &[
    // 1: the records table (see the observability guide, "Request records").
    "CREATE TABLE IF NOT EXISTS records (
        id BIGSERIAL PRIMARY KEY,
        created_at TIMESTAMPTZ NOT NULL,
        ip TEXT,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        model TEXT,
        stream SMALLINT NOT NULL DEFAULT 0,
        upstream TEXT,
        status INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        request_body TEXT,
        response TEXT,
        prompt_tokens BIGINT,
        completion_tokens BIGINT,
        total_tokens BIGINT,
        ttfb_ms BIGINT,
        duration_ms BIGINT,
        user_agent TEXT,
        client_key TEXT
    );
    CREATE INDEX IF NOT EXISTS records_created_at ON records(created_at);",
    // 2: the version-0.2 columns. Rows written before have `resumed` 0 and `complete` 0: whether
    // their client got the whole answer was not recorded, so they are not claimed complete.
    "ALTER TABLE records
        ADD COLUMN IF NOT EXISTS finish_reason TEXT,
        ADD COLUMN IF NOT EXISTS resumed INTEGER NOT NULL DEFAULT 0,
        ADD COLUMN IF NOT EXISTS complete SMALLINT NOT NULL DEFAULT 0;",
];

/// How long a connection attempt may take (at start and for the pool).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What went wrong, in the server's or the system's own words. The driver's error shows only
/// its kind ("db error", "error connecting to server"); what an operator can act on (`database
/// "x" does not exist`, `password authentication failed for user "u"`, `Connection refused`) is
/// in the server's error or the error's sources. None of them holds the password.
pub fn explain(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{}: {}", db.severity(), db.message());
        for (label, part) in [("detail", db.detail()), ("hint", db.hint())] {
            if let Some(part) = part {
                s.push_str(&format!(" ({label}: {part})"));
            }
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Logs the pool's failed connection attempts with [`explain`] (r2d2's own handler logs the
/// driver's bare "db error").
#[derive(Debug)]
struct LogExplained;

impl r2d2::HandleError<postgres::Error> for LogExplained {
    fn handle_error(&self, e: postgres::Error) {
        log::error!("PostgreSQL: {}", explain(&e));
    }
}

/// Connects, migrates under the advisory lock, and checks that inserts are allowed.
pub fn open(url: &str) -> Result<Pool, DbError> {
    let shown = super::target::redact(url);
    let fail = |reason: String| DbError::Open {
        target: shown.clone(),
        reason,
    };
    let config: postgres::Config = url
        .parse()
        .map_err(|e: postgres::Error| fail(explain(&e)))?;
    // The first connection is made directly, not through the pool: a pool that cannot connect
    // reports only that it timed out waiting, and the reason is what the operator needs.
    let mut first = config.clone();
    if first.get_connect_timeout().is_none() {
        first.connect_timeout(CONNECT_TIMEOUT);
    }
    let mut conn = first.connect(NoTls).map_err(|e| fail(explain(&e)))?;
    conn.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .map_err(|e| fail(explain(&e)))?;
    let migrated = migrate(&mut conn);
    let _ = conn.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
    migrated.map_err(|e| fail(explain(&e)))?;
    drop(conn);
    let manager = PostgresConnectionManager::new(config, NoTls);
    r2d2::Pool::builder()
        .max_size(2)
        .min_idle(Some(0))
        .connection_timeout(CONNECT_TIMEOUT)
        .error_handler(Box::new(LogExplained))
        .build(manager)
        .map_err(|e| fail(e.to_string()))
}

fn migrate(conn: &mut postgres::Client) -> Result<(), postgres::Error> {
    conn.batch_execute(
        "CREATE TABLE IF NOT EXISTS openai_api_route_schema (version INTEGER NOT NULL)",
    )?;
    let version: i32 = match conn.query_opt("SELECT version FROM openai_api_route_schema", &[])? {
        Some(row) => row.get(0),
        None => {
            conn.execute(
                "INSERT INTO openai_api_route_schema (version) VALUES (0)",
                &[],
            )?;
            0
        }
    };
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let mut tx = conn.transaction()?;
        tx.batch_execute(m)?;
        tx.execute(
            "UPDATE openai_api_route_schema SET version = $1",
            &[&((i + 1) as i32)],
        )?;
        tx.commit()?;
    }
    super::owner_rows::postgres_columns(conn)?;
    super::shared::postgres_tables(conn)
}

/// PostgreSQL text cannot hold NUL: borrowed unless there is one to replace.
fn clean(s: &str) -> Cow<'_, str> {
    if s.as_bytes().contains(&0) {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// [`clean`] for an optional column.
fn clean_opt(s: &Option<String>) -> Option<Cow<'_, str>> {
    s.as_deref().map(clean)
}

/// Column types of [`INSERT_COLUMNS`], in order, for the binary `COPY`.
const COLUMN_TYPES: [Type; COLUMNS] = [
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT2,
    Type::TEXT,
    Type::INT4,
    Type::INT4,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT4,
    Type::INT2,
    Type::TEXT,
    Type::INT2,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
];

/// Writes a batch in one transaction with a binary `COPY`: no SQL text to build or parse and no
/// parameters to plan, which took the records/s into PostgreSQL from 66k (multi-row `INSERT`s)
/// to 144k on the benchmark machine.
pub fn insert(pool: &Pool, batch: &[Record]) -> Result<(), StoreError> {
    let mut conn = pool.get().map_err(StoreError::unreachable)?;
    let mut tx = conn.transaction().map_err(StoreError::from_pg)?;
    let sink = tx
        .copy_in(&format!(
            "COPY records ({INSERT_COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .map_err(StoreError::from_pg)?;
    let mut writer = BinaryCopyInWriter::new(sink, &COLUMN_TYPES);
    for r in batch {
        let (body, response) = (r.stored_body(), r.stored_response());
        let ip = r.ip_text();
        let values: [&(dyn ToSql + Sync); COLUMNS] = [
            &r.created_at,
            &ip.as_str(),
            &r.method.as_str(),
            &clean(r.path_text()),
            &r.model.as_deref().map(clean),
            &i16::from(r.stream),
            &r.upstream.as_deref(),
            &i32::from(r.status),
            &(r.attempts as i32),
            &clean_opt(&r.error),
            &body.as_deref().map(clean),
            &response.as_deref().map(clean),
            &r.prompt_tokens,
            &r.completion_tokens,
            &r.total_tokens,
            &r.ttfb_ms.map(|v| v as i64),
            &(r.duration_ms as i64),
            &r.user_agent_text().map(clean),
            &r.client_key.as_deref(),
            &r.finish_reason.as_deref().map(clean),
            &(r.resumed.min(i32::MAX as u32) as i32),
            &i16::from(r.complete),
            &r.object_id.as_deref().map(clean),
            &i16::from(r.rebuilt),
            &r.response_items.as_deref().map(clean),
            &r.request_id_text().map(clean),
            &r.member.as_deref(),
        ];
        writer.write(&values).map_err(StoreError::from_pg)?;
    }
    writer.finish().map_err(StoreError::from_pg)?;
    for id in batch.iter().filter_map(|r| r.forgets.as_deref()) {
        tx.execute(
            "UPDATE records SET object_id = NULL WHERE object_id = $1",
            &[&id],
        )
        .map_err(StoreError::from_pg)?;
        tx.execute(
            "DELETE FROM openai_api_route_learned WHERE object_id = $1",
            &[&id],
        )
        .map_err(StoreError::from_pg)?;
    }
    // Owners learned through "not here": the other replicas read them within a poll.
    for r in batch.iter().filter(|r| !r.learned.is_empty()) {
        let Some(up) = r.upstream.as_deref() else {
            continue;
        };
        for id in &r.learned {
            tx.execute(
                "INSERT INTO openai_api_route_learned (object_id, upstream) VALUES ($1, $2)",
                &[&clean(id).as_ref(), &up],
            )
            .map_err(StoreError::from_pg)?;
        }
    }
    tx.commit().map_err(StoreError::from_pg)
}

/// Rows in the table (all replicas').
pub fn count(pool: &Pool) -> u64 {
    pool.get()
        .ok()
        .and_then(|mut c| c.query_one("SELECT COUNT(*) FROM records", &[]).ok())
        .map(|row| row.get::<_, i64>(0))
        .unwrap_or(0) as u64
}

/// Deletes records created before `cutoff`; returns how many.
pub fn prune(pool: &Pool, cutoff: SystemTime) -> Result<u64, StoreError> {
    let mut conn = pool.get().map_err(StoreError::unreachable)?;
    conn.execute(
        "DELETE FROM openai_api_route_learned WHERE created_at < $1",
        &[&cutoff],
    )
    .map_err(StoreError::from_pg)?;
    conn.execute("DELETE FROM records WHERE created_at < $1", &[&cutoff])
        .map_err(StoreError::from_pg)
}

/// Whether the server answers at all.
pub fn ping(pool: &Pool) -> bool {
    pool.get()
        .ok()
        .is_some_and(|mut c| c.simple_query("SELECT 1").is_ok())
}
