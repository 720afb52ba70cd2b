//! The embedded SQLite store: one file, WAL, versioned migrations, batched inserts.

use std::path::Path;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{params, OptionalExtension, ToSql, TransactionBehavior};

use super::{DbError, Record, StoreError, COLUMN_COUNT, INSERT_COLUMNS};
use crate::time::{rfc3339, Rfc3339};

/// Versioned migrations, applied in order; `PRAGMA user_version` says how many ran.
///
/// `id` is a plain `INTEGER PRIMARY KEY` (the rowid): `AUTOINCREMENT` made SQLite read and rewrite
/// its `sqlite_sequence` counter on every insert, about 12% of the writer's time per row. Ids still
/// never go back: SQLite gives max(id) + 1, and the one way we remove the highest id (retention)
/// leaves the next id in `records_meta` (see [`prune`] and [`insert`]). Tables made before this
/// change keep `AUTOINCREMENT`; both behave the same.
const MIGRATIONS: &[&str] = &[
    // 1: the SPEC table.
    "CREATE TABLE IF NOT EXISTS records (
        id INTEGER PRIMARY KEY,
        created_at TEXT NOT NULL,
        ip TEXT,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        model TEXT,
        stream INTEGER NOT NULL DEFAULT 0,
        upstream TEXT,
        status INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        request_body TEXT,
        response TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        total_tokens INTEGER,
        ttfb_ms INTEGER,
        duration_ms INTEGER,
        user_agent TEXT,
        client_key TEXT
    );
    CREATE INDEX IF NOT EXISTS records_created_at ON records(created_at);",
    // 2: where retention leaves the next id when it removed the highest one.
    "CREATE TABLE IF NOT EXISTS records_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
    // 3: the version-0.2 columns. Rows written before have `resumed` 0 and `complete` 0: whether
    // their client got the whole answer was not recorded, so they are not claimed complete.
    "ALTER TABLE records ADD COLUMN finish_reason TEXT;
    ALTER TABLE records ADD COLUMN resumed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE records ADD COLUMN complete INTEGER NOT NULL DEFAULT 0;",
];

/// The `records_meta` key holding the smallest id the next record may take.
const NEXT_ID: &str = "next_id";

/// Columns every `records` table of ours has.
const REQUIRED_COLUMNS: &[&str] = &[
    "created_at",
    "upstream",
    "attempts",
    "client_key",
    "ttfb_ms",
];

/// A pool over one SQLite file (the writer uses one connection at a time).
pub type Pool = r2d2::Pool<SqliteConnectionManager>;

/// Opens (creating if needed) the file, runs migrations and proves it is writable.
pub fn open(path: &str) -> Result<Pool, DbError> {
    let write_err = |source: rusqlite::Error| DbError::Open {
        target: path.to_string(),
        reason: source.to_string(),
    };
    // Open once directly: a bad path fails at once instead of after the pool's retry timeout.
    rusqlite::Connection::open(path).map_err(write_err)?;
    let manager = SqliteConnectionManager::file(Path::new(path)).with_init(|c| {
        c.execute_batch(
            "PRAGMA page_size=32768; PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; \
             PRAGMA busy_timeout=5000;",
        )
    });
    let pool = r2d2::Pool::builder()
        .max_size(2)
        .connection_timeout(Duration::from_secs(5))
        .build(manager)
        .map_err(|e| DbError::Open {
            target: path.to_string(),
            reason: e.to_string(),
        })?;
    let conn = pool.get().map_err(|e| DbError::Open {
        target: path.to_string(),
        reason: e.to_string(),
    })?;
    let version: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(write_err)? as usize;
    if version == 0 {
        set_aside_foreign_table(&conn).map_err(write_err)?;
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
        conn.execute_batch(&format!(
            "BEGIN; {m}; PRAGMA user_version = {}; COMMIT;",
            i + 1
        ))
        .map_err(write_err)?;
    }
    super::owners::sqlite_columns(&conn).map_err(write_err)?;
    // A read-only file opens fine; prove we can write before we listen.
    conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")
        .map_err(write_err)?;
    Ok(pool)
}

/// The Go tool's database (same default path) has a `records` table with other columns. Keep its
/// rows, renamed out of the way, instead of failing every insert.
fn set_aside_foreign_table(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('records')")?;
    let cols: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if cols.is_empty() || REQUIRED_COLUMNS.iter().all(|c| cols.iter().any(|x| x == c)) {
        return Ok(());
    }
    let mut name = "records_legacy".to_string();
    let mut n = 1;
    while conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE name = ?1",
            [&name],
            |_| Ok(()),
        )
        .is_ok()
    {
        n += 1;
        name = format!("records_legacy_{n}");
    }
    conn.execute_batch(&format!("ALTER TABLE records RENAME TO {name}"))?;
    log::warn!("the existing `records` table has another layout (the Go version's?); kept as `{name}`, new records go to a fresh `records` table");
    Ok(())
}

/// Rows in the table.
pub fn count(pool: &Pool) -> u64 {
    pool.get()
        .ok()
        .and_then(|c| {
            c.query_row("SELECT COUNT(*) FROM records", [], |r| r.get::<_, i64>(0))
                .ok()
        })
        .unwrap_or(0) as u64
}

/// `?1,?2,…` for every column: built once, not for each batch (about 40 allocations a batch,
/// which with the small batches of a lightly loaded gateway was ~4 per record).
static VALUES: LazyLock<String> = LazyLock::new(|| {
    (1..=COLUMN_COUNT)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(",")
});
/// The insert of a record that takes the id left by retention.
static INSERT_WITH_ID: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO records (id, {INSERT_COLUMNS}) VALUES (?{}, {})",
        COLUMN_COUNT + 1,
        *VALUES
    )
});
/// The insert of a record with its id assigned by SQLite.
static INSERT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO records ({INSERT_COLUMNS}) VALUES ({})",
        *VALUES
    )
});

/// Writes a batch in one transaction.
pub fn insert(pool: &Pool, batch: &[Record]) -> Result<(), StoreError> {
    let mut conn = pool.get().map_err(StoreError::unreachable)?;
    // IMMEDIATE: the transaction reads `records_meta` before it writes, and a deferred one that
    // read first gets SQLITE_BUSY at once (no busy wait) when another process holds the write
    // lock.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(StoreError::failed)?;
    let mut rows = batch;
    // After retention removed the highest id, the first record takes the id left for it.
    let floor: Option<i64> = tx
        .prepare_cached("SELECT value FROM records_meta WHERE key = ?1")
        .and_then(|mut s| s.query_row([NEXT_ID], |r| r.get(0)).optional())
        .map_err(StoreError::failed)?;
    if let (Some(floor), Some(first)) = (floor, rows.first()) {
        let max: i64 = tx
            .query_row("SELECT COALESCE(MAX(id), 0) FROM records", [], |r| r.get(0))
            .map_err(StoreError::failed)?;
        let mut stmt = tx
            .prepare_cached(&INSERT_WITH_ID)
            .map_err(StoreError::failed)?;
        bind_row(&mut stmt, first).map_err(StoreError::failed)?;
        stmt.raw_bind_parameter(COLUMN_COUNT + 1, floor.max(max + 1))
            .map_err(StoreError::failed)?;
        stmt.raw_execute().map_err(StoreError::failed)?;
        tx.execute("DELETE FROM records_meta WHERE key = ?1", [NEXT_ID])
            .map_err(StoreError::failed)?;
        rows = &rows[1..];
    }
    {
        let mut stmt = tx.prepare_cached(&INSERT).map_err(StoreError::failed)?;
        for r in rows {
            bind_row(&mut stmt, r).map_err(StoreError::failed)?;
            stmt.raw_execute().map_err(StoreError::failed)?;
        }
    }
    tx.commit().map_err(StoreError::failed)
}

/// Binds one record's values as parameters 1 to [`COLUMN_COUNT`], in [`INSERT_COLUMNS`] order.
fn bind_row(stmt: &mut rusqlite::CachedStatement<'_>, r: &Record) -> rusqlite::Result<()> {
    let (body, response) = (r.stored_body(), r.stored_response());
    let created_at = Rfc3339::new(r.created_at);
    let ip = r.ip_text();
    let values: [&dyn ToSql; COLUMN_COUNT] = [
        &created_at.as_str(),
        &ip.as_str(),
        &r.method.as_str(),
        &r.path_text(),
        &r.model,
        &r.stream,
        &r.upstream.as_deref(),
        &r.status,
        &r.attempts,
        &r.error,
        &body,
        &response,
        &r.prompt_tokens,
        &r.completion_tokens,
        &r.total_tokens,
        &r.ttfb_ms.map(|v| v as i64),
        &(r.duration_ms as i64),
        &r.user_agent_text(),
        &r.client_key.as_deref(),
        &r.finish_reason.as_deref(),
        &r.resumed,
        &r.complete,
        &r.object_id.as_deref(),
        &r.rebuilt,
        &r.response_items.as_deref(),
    ];
    for (i, v) in values.into_iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, v)?;
    }
    Ok(())
}

/// Deletes records created before `cutoff`; returns how many. When that removes the highest id,
/// the next id is kept in `records_meta` so that ids are never handed out twice.
pub fn prune(pool: &Pool, cutoff: SystemTime) -> Result<u64, StoreError> {
    let mut conn = pool.get().map_err(StoreError::unreachable)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(StoreError::failed)?;
    let max = |tx: &rusqlite::Transaction<'_>| {
        tx.query_row("SELECT MAX(id) FROM records", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .map_err(StoreError::failed)
    };
    // A table made with AUTOINCREMENT may have handed out ids above today's highest row (no
    // `sqlite_sequence` table at all is fine: nothing was handed out that way).
    let handed_out: i64 = tx
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'records'",
            [],
            |r| r.get(0),
        )
        .unwrap_or(0);
    let before = max(&tx)?;
    let deleted = tx
        .execute(
            "DELETE FROM records WHERE created_at < ?1",
            params![rfc3339(cutoff)],
        )
        .map_err(StoreError::failed)?;
    if let Some(top) = before.filter(|_| deleted > 0) {
        if max(&tx)? != Some(top) {
            let next = top.max(handed_out) + 1;
            tx.execute(
                "INSERT INTO records_meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
                params![NEXT_ID, next],
            )
            .map_err(StoreError::failed)?;
        }
    }
    tx.commit().map_err(StoreError::failed)?;
    Ok(deleted as u64)
}

/// Whether the database answers at all.
pub fn ping(pool: &Pool) -> bool {
    pool.get()
        .ok()
        .is_some_and(|c| c.query_row("SELECT 1", [], |_| Ok(())).is_ok())
}
