//! The embedded SQLite store: one file, WAL, versioned migrations, batched inserts.

use std::cell::RefCell;
use std::os::raw::c_int;
use std::path::Path;
use std::sync::mpsc::{SyncSender, TrySendError};
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
    // 1: the records table (see the observability guide, "Request records").
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

/// SQLite VM instructions between two calls of the progress handler: a few microseconds of work.
const PROGRESS_OPS: c_int = 500;

/// A pool over one SQLite file (the writer uses one connection at a time).
pub type Pool = r2d2::Pool<SqliteConnectionManager>;

/// How long a connection waits for another one's lock before it reports `database is locked`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens (creating if needed) the file, runs migrations and proves it is writable.
pub fn open(path: &str) -> Result<Pool, DbError> {
    let write_err = |source: rusqlite::Error| DbError::Open {
        target: path.to_string(),
        reason: source.to_string(),
    };
    // SQLite says only "unable to open database file" for a directory that is not there.
    // (A `file:` URI is SQLite's to read.)
    if let Some(dir) = Path::new(path)
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !path.starts_with("file:"))
    {
        let missing = match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => None,
            Ok(_) => Some("is not a directory"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("does not exist"),
            // Anything else (permissions) is for SQLite's own open below to report.
            Err(_) => None,
        };
        if let Some(why) = missing {
            return Err(DbError::Open {
                target: path.to_string(),
                reason: format!("directory {} {why}", dir.display()),
            });
        }
    }
    // Open once directly, before the pool: a bad path fails at once instead of after the pool's
    // retry timeout, and a new file gets its page size and WAL mode here, from one connection.
    // The pool opens its connections in parallel: when each of them switched a new file to WAL,
    // the ones that lost the race failed with `database is locked` (logged as an ERROR, then
    // retried), because switching needs the file to itself.
    {
        let first = rusqlite::Connection::open(path).map_err(write_err)?;
        first.busy_timeout(BUSY_TIMEOUT).map_err(write_err)?;
        first
            .execute_batch("PRAGMA page_size=32768; PRAGMA journal_mode=WAL;")
            .map_err(write_err)?;
    }
    let manager = SqliteConnectionManager::file(Path::new(path)).with_init(|c| {
        // The wait first: every statement after it may meet another connection's lock.
        c.busy_timeout(BUSY_TIMEOUT)?;
        // WAL is a property of the file (set above); `synchronous` is one of each connection.
        c.execute_batch("PRAGMA synchronous=NORMAL;")?;
        // Checkpoints are the checkpointer's (below), in place of SQLite's automatic one.
        c.wal_hook(Some(wal_grew));
        // The idle-class writer offers the CPU while SQLite works (priority.rs); a no-op on
        // any other thread.
        c.progress_handler(
            PROGRESS_OPS,
            Some(|| {
                super::priority::pause_point();
                false
            }),
        )
    });
    // The writer, the checkpointer and an occasional reader (owners, ping) at once.
    let pool = r2d2::Pool::builder()
        .max_size(3)
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
    super::owner_rows::sqlite_columns(&conn).map_err(write_err)?;
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

/// WAL pages (32 KiB each) after which a commit rings the checkpointer: SQLite's own default
/// for its automatic checkpoint, so checkpoints come as often as in 0.2.
const CHECKPOINT_PAGES: c_int = 1000;
/// WAL pages after which the committing thread checkpoints itself, rung or not: the safety net
/// for a checkpointer starved by a fully busy machine (128 MiB of WAL).
const SELF_CHECKPOINT_PAGES: c_int = 4096;

thread_local! {
    /// On the writer thread: the checkpointer's doorbell (see [`start_checkpointer`]).
    static DOORBELL: RefCell<Option<SyncSender<()>>> = const { RefCell::new(None) };
}

/// SQLite's WAL hook, called after each commit with the WAL's size in pages. It never returns
/// an error: SQLite would report it as the commit's, though the commit happened, and the writer
/// would then drop or rewrite records that are in the table.
fn wal_grew(wal: &rusqlite::hooks::Wal, pages: c_int) -> rusqlite::Result<()> {
    if pages < CHECKPOINT_PAGES {
        return Ok(());
    }
    let rung = DOORBELL.with(|d| {
        d.borrow()
            .as_ref()
            .is_some_and(|tx| !matches!(tx.try_send(()), Err(TrySendError::Disconnected(_))))
    });
    if !rung || pages >= SELF_CHECKPOINT_PAGES {
        if let Err(e) = wal.checkpoint() {
            checkpoint_failed(&e);
        }
    }
    Ok(())
}

/// Logs a failed checkpoint, except one that found another checkpoint running (`SQLITE_BUSY`):
/// the writer's own checkpoint and the checkpointer's meet under sustained load, and the one
/// running copies the WAL anyway. A stream soak logged 413 such warnings in 30 s.
fn checkpoint_failed(e: &rusqlite::Error) {
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) {
        log::debug!("SQLite checkpoint skipped: another checkpoint is running");
    } else {
        log::warn!("SQLite checkpoint failed: {e}");
    }
}

/// Starts the checkpointer for the calling thread's commits (the writer's): a thread of its own
/// that copies the WAL into the database file (`PRAGMA wal_checkpoint(PASSIVE)`, which never
/// blocks the writer) each time a commit finds the WAL at [`CHECKPOINT_PAGES`], and once more
/// when the writer is gone.
///
/// Why not the writer: with `synchronous=NORMAL` a checkpoint ends in two `fsync`s, and on a
/// busy or virtual disk one `fsync` took up to 3.7 s here (profiled in the benchmarks guide).
/// On the writer that stopped every write for as long, the queue (10,000 records, a quarter of
/// a second at 40,000 requests/s) overflowed, and runs at c=64 lost 10–75 % of their records.
/// Here an `fsync` only delays the next checkpoint; the WAL grows meanwhile. The thread is
/// idle-class (`SCHED_IDLE`, which needs no privilege to enter): its copying never takes the
/// CPU from a request that wakes. Starved by a fully busy machine, it lets the WAL grow to
/// [`SELF_CHECKPOINT_PAGES`], where the writer checkpoints itself.
pub fn start_checkpointer(pool: Pool) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
    let spawned = std::thread::Builder::new()
        .name("record-checkpoint".into())
        .spawn(move || {
            super::priority::enter_idle_class();
            loop {
                let last = rx.recv().is_err();
                if let Ok(conn) = pool.get() {
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        checkpoint_failed(&e);
                    }
                }
                if last {
                    return;
                }
            }
        });
    match spawned {
        Ok(_) => DOORBELL.with(|d| *d.borrow_mut() = Some(tx)),
        Err(e) => log::warn!("no checkpoint thread ({e}): the writer checkpoints the WAL itself"),
    }
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
/// Rows of one multi-row insert: one statement run writes them all, so the per-statement work
/// (opening the table's and indexes' cursors, the reset) is paid once for them.
const ROWS_PER_INSERT: usize = 16;
/// The insert of [`ROWS_PER_INSERT`] records, parameters numbered row after row.
static INSERT_MANY: LazyLock<String> = LazyLock::new(|| {
    let rows = (0..ROWS_PER_INSERT)
        .map(|r| {
            let cols = (1..=COLUMN_COUNT)
                .map(|i| format!("?{}", r * COLUMN_COUNT + i))
                .collect::<Vec<_>>()
                .join(",");
            format!("({cols})")
        })
        .collect::<Vec<_>>()
        .join(",");
    format!("INSERT INTO records ({INSERT_COLUMNS}) VALUES {rows}")
});

/// Writes a batch in one transaction; from the spool, with how far into it the batch goes
/// (generation, offset), stored in the same transaction.
pub fn insert(
    pool: &Pool,
    batch: &[Record],
    progress: Option<(u64, u64)>,
) -> Result<(), StoreError> {
    let mut conn = pool.get().map_err(StoreError::unreachable)?;
    // IMMEDIATE: the transaction reads `records_meta` before it writes, and a deferred one that
    // read first gets SQLITE_BUSY at once (no busy wait) when another process holds the write
    // lock.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(StoreError::sqlite)?;
    let mut rows = batch;
    // After retention removed the highest id, the first record takes the id left for it.
    let floor: Option<i64> = tx
        .prepare_cached("SELECT value FROM records_meta WHERE key = ?1")
        .and_then(|mut s| s.query_row([NEXT_ID], |r| r.get(0)).optional())
        .map_err(StoreError::sqlite)?;
    if let (Some(floor), Some(first)) = (floor, rows.first()) {
        let max: i64 = tx
            .query_row("SELECT COALESCE(MAX(id), 0) FROM records", [], |r| r.get(0))
            .map_err(StoreError::sqlite)?;
        let mut stmt = tx
            .prepare_cached(&INSERT_WITH_ID)
            .map_err(StoreError::sqlite)?;
        bind_row(&mut stmt, first, 0).map_err(StoreError::sqlite)?;
        stmt.raw_bind_parameter(COLUMN_COUNT + 1, floor.max(max + 1))
            .map_err(StoreError::sqlite)?;
        stmt.raw_execute().map_err(StoreError::sqlite)?;
        tx.execute("DELETE FROM records_meta WHERE key = ?1", [NEXT_ID])
            .map_err(StoreError::sqlite)?;
        rows = &rows[1..];
    }
    let mut many = rows.chunks_exact(ROWS_PER_INSERT);
    if many.len() > 0 {
        let mut stmt = tx
            .prepare_cached(&INSERT_MANY)
            .map_err(StoreError::sqlite)?;
        for chunk in &mut many {
            super::priority::pause_point();
            for (i, r) in chunk.iter().enumerate() {
                bind_row(&mut stmt, r, i * COLUMN_COUNT).map_err(StoreError::sqlite)?;
            }
            stmt.raw_execute().map_err(StoreError::sqlite)?;
        }
    }
    let rest = many.remainder();
    if !rest.is_empty() {
        let mut stmt = tx.prepare_cached(&INSERT).map_err(StoreError::sqlite)?;
        for r in rest {
            super::priority::pause_point();
            bind_row(&mut stmt, r, 0).map_err(StoreError::sqlite)?;
            stmt.raw_execute().map_err(StoreError::sqlite)?;
        }
    }
    for id in batch.iter().filter_map(|r| r.forgets.as_deref()) {
        tx.execute(
            "UPDATE records SET object_id = NULL WHERE object_id = ?1",
            [id],
        )
        .map_err(StoreError::sqlite)?;
    }
    if let Some(p) = progress {
        store_progress(&tx, p).map_err(StoreError::sqlite)?;
    }
    tx.commit().map_err(StoreError::sqlite)
}

/// Binds one record's values as parameters `at + 1` to `at + COLUMN_COUNT`, in
/// [`INSERT_COLUMNS`] order.
fn bind_row(
    stmt: &mut rusqlite::CachedStatement<'_>,
    r: &Record,
    at: usize,
) -> rusqlite::Result<()> {
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
        &r.request_id_text(),
        &r.member.as_deref(),
    ];
    for (i, v) in values.into_iter().enumerate() {
        stmt.raw_bind_parameter(at + i + 1, v)?;
    }
    Ok(())
}

/// The `records_meta` keys of the spool ingester's progress.
const META_GENERATION: &str = "spool_generation";
/// See [`META_GENERATION`].
const META_OFFSET: &str = "spool_offset";

/// The spool ingester's progress, stored with the rows it wrote (see `spool/`): generation and
/// offset, (0, 0) when none.
pub fn spool_progress(pool: &Pool) -> Result<(u64, u64), StoreError> {
    let conn = pool.get().map_err(StoreError::unreachable)?;
    let get = |key: &str| {
        conn.query_row(
            "SELECT value FROM records_meta WHERE key = ?1",
            [key],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map(|v| v.unwrap_or(0).max(0) as u64)
        .map_err(StoreError::failed)
    };
    Ok((get(META_GENERATION)?, get(META_OFFSET)?))
}

/// Stores the ingester's progress in the transaction that wrote the rows up to it.
fn store_progress(
    tx: &rusqlite::Transaction<'_>,
    (generation, offset): (u64, u64),
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO records_meta (key, value) VALUES (?1, ?2), (?3, ?4)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?;
    stmt.execute(rusqlite::params![
        META_GENERATION,
        generation as i64,
        META_OFFSET,
        offset as i64
    ])?;
    Ok(())
}

/// Deletes records created before `cutoff`; returns how many. When that removes the highest id,
/// the next id is kept in `records_meta` so that ids are never handed out twice.
pub fn prune(pool: &Pool, cutoff: SystemTime) -> Result<u64, StoreError> {
    let mut conn = pool.get().map_err(StoreError::unreachable)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(StoreError::sqlite)?;
    let max = |tx: &rusqlite::Transaction<'_>| {
        tx.query_row("SELECT MAX(id) FROM records", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .map_err(StoreError::sqlite)
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
        .map_err(StoreError::sqlite)?;
    if let Some(top) = before.filter(|_| deleted > 0) {
        if max(&tx)? != Some(top) {
            let next = top.max(handed_out) + 1;
            tx.execute(
                "INSERT INTO records_meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
                params![NEXT_ID, next],
            )
            .map_err(StoreError::sqlite)?;
        }
    }
    tx.commit().map_err(StoreError::sqlite)?;
    Ok(deleted as u64)
}

/// Whether the database answers at all.
pub fn ping(pool: &Pool) -> bool {
    pool.get()
        .ok()
        .is_some_and(|c| c.query_row("SELECT 1", [], |_| Ok(())).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of the main database file (what checkpoints have copied so far).
    fn main_file_len(path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    /// Writes about `pages` WAL pages in one transaction each of 64.
    fn grow_wal(pool: &Pool, pages: usize) {
        let conn = pool.get().unwrap();
        for _ in 0..pages.div_ceil(64) {
            conn.execute_batch(
                "BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 64) \
                 INSERT INTO scratch SELECT zeroblob(30000) FROM n; COMMIT;",
            )
            .unwrap();
        }
    }

    /// A new database with a `scratch` table: its directory (kept alive), path, pool, and the
    /// main file's size.
    fn scratch_db() -> (tempfile::TempDir, std::path::PathBuf, Pool, u64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scratch.sqlite");
        let pool = open(path.to_str().unwrap()).unwrap();
        pool.get()
            .unwrap()
            .execute_batch("CREATE TABLE scratch (b BLOB)")
            .unwrap();
        let before = main_file_len(&path);
        (dir, path, pool, before)
    }

    #[test]
    fn a_full_wal_rings_the_checkpointer_and_the_writer_checkpoints_only_without_one() {
        let (_dir, path, pool, before) = scratch_db();

        // With a doorbell: past CHECKPOINT_PAGES the commit rings it and copies nothing itself.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        DOORBELL.with(|d| *d.borrow_mut() = Some(tx));
        grow_wal(&pool, CHECKPOINT_PAGES as usize + 100);
        assert!(rx.try_recv().is_ok(), "the checkpointer was not rung");
        assert!(
            main_file_len(&path) < before + (1 << 20),
            "the writer checkpointed though a checkpointer was there: {} bytes",
            main_file_len(&path)
        );

        // The checkpointer gone (its end of the doorbell dropped): the writer checkpoints itself.
        drop(rx);
        grow_wal(&pool, 100);
        assert!(
            main_file_len(&path) > before + (20 << 20),
            "nobody checkpointed: {} bytes",
            main_file_len(&path)
        );
        DOORBELL.with(|d| *d.borrow_mut() = None);
    }

    #[test]
    fn the_checkpointer_copies_the_wal_and_ends_with_its_writer() {
        let (_dir, path, pool, before) = scratch_db();
        let p = pool.clone();
        // The "writer": a thread that starts its checkpointer, fills the WAL and ends.
        std::thread::spawn(move || {
            start_checkpointer(p.clone());
            grow_wal(&p, CHECKPOINT_PAGES as usize + 100);
        })
        .join()
        .unwrap();
        // Rung, or at the latest when the writer's end dropped the doorbell, the checkpointer
        // copies the WAL into the database file.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while main_file_len(&path) < before + (20 << 20) {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint: {} bytes",
                main_file_len(&path)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
