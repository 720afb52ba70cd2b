//! Request records (SPEC §5): the `DbActor` on a `SyncArbiter` and the bounded queue in front of it.
//!
//! A request never waits for the database: the proxy hands a finished [`Record`] to
//! [`Recorder::submit`], which counts it into a bounded queue or drops and counts it when full.
//! One writer thread batches whatever is queued into one transaction. Shutdown sends an awaited
//! [`Flush`], which the mailbox delivers after every record queued before it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use actix_web::web::Bytes;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::params;

use crate::capture::{cut, request_body_text};
use crate::metrics::Metrics;
use crate::time::rfc3339;

/// Largest batch written in one transaction.
const MAX_BATCH: usize = 1024;

/// Everything known about one client request once its response is over.
#[derive(Debug, Clone)]
pub struct Record {
    /// Request start.
    pub created_at: SystemTime,
    /// Client address.
    pub ip: String,
    /// HTTP method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// `model` from the JSON body.
    pub model: Option<String>,
    /// Stream request.
    pub stream: bool,
    /// Upstream that answered last.
    pub upstream: Option<String>,
    /// Status sent to the client.
    pub status: u16,
    /// Upstreams tried.
    pub attempts: u32,
    /// `name: reason; …` of every failure, or None.
    pub error: Option<String>,
    /// The raw request body; cut and decoded on the writer thread, not on the request path.
    pub request_body: Bytes,
    /// Reply text (already bounded by the capture).
    pub response: Option<String>,
    /// Usage.
    pub prompt_tokens: Option<i64>,
    /// Usage.
    pub completion_tokens: Option<i64>,
    /// Usage.
    pub total_tokens: Option<i64>,
    /// Request start to first byte to the client.
    pub ttfb_ms: Option<u64>,
    /// Request start to response complete.
    pub duration_ms: u64,
    /// Client User-Agent.
    pub user_agent: Option<String>,
    /// Non-secret label of the client token.
    pub client_key: Option<String>,
    /// `record_body_bytes` at the time of the request.
    pub body_limit: usize,
}

/// Database problems at startup, reported before listening.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The file could not be opened or created.
    #[error("cannot open database {path}: {source}")]
    Open {
        /// The path given.
        path: String,
        /// Why.
        source: r2d2::Error,
    },
    /// The file cannot be created, or schema creation or the write check failed.
    #[error("cannot open or write database {path}: {source}")]
    Write {
        /// The path given.
        path: String,
        /// Why.
        source: rusqlite::Error,
    },
}

/// Versioned migrations, applied in order; `PRAGMA user_version` says how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: the SPEC table.
    "CREATE TABLE IF NOT EXISTS records (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
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
];

type Pool = r2d2::Pool<SqliteConnectionManager>;

/// Opens (creating if needed) the SQLite file, runs migrations and proves it is writable.
pub fn open_sqlite(path: &str) -> Result<Pool, DbError> {
    // Open once directly: a bad path fails at once instead of after the pool's retry timeout.
    rusqlite::Connection::open(path).map_err(|source| DbError::Write {
        path: path.to_string(),
        source,
    })?;
    let manager = SqliteConnectionManager::file(Path::new(path)).with_init(|c| {
        c.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;",
        )
    });
    let pool = r2d2::Pool::builder()
        .max_size(2)
        .connection_timeout(Duration::from_secs(5))
        .build(manager)
        .map_err(|source| DbError::Open {
            path: path.to_string(),
            source,
        })?;
    let conn = pool.get().map_err(|source| DbError::Open {
        path: path.to_string(),
        source,
    })?;
    let write_err = |source| DbError::Write {
        path: path.to_string(),
        source,
    };
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
    // A read-only file opens fine; prove we can write before we listen.
    conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")
        .map_err(write_err)?;
    Ok(pool)
}

/// Columns every `records` table of ours has.
const REQUIRED_COLUMNS: &[&str] = &[
    "created_at",
    "upstream",
    "attempts",
    "client_key",
    "ttfb_ms",
];

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

/// Rows currently in the table.
fn count_rows(pool: &Pool) -> u64 {
    pool.get()
        .ok()
        .and_then(|c| {
            c.query_row("SELECT COUNT(*) FROM records", [], |r| r.get::<_, i64>(0))
                .ok()
        })
        .unwrap_or(0) as u64
}

/// One record to write.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Insert(pub Box<Record>);

/// Write everything queued so far; the reply is the shutdown barrier.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Flush;

/// Delete records older than the retention.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Prune {
    /// Age limit.
    pub older_than: Duration,
}

/// The writer. One instance on a one-thread `SyncArbiter`.
pub struct DbActor {
    pool: Pool,
    queued: Arc<AtomicUsize>,
    rows: Arc<AtomicU64>,
    metrics: Metrics,
    batch: Vec<Record>,
}

impl Actor for DbActor {
    type Context = SyncContext<Self>;
}

impl DbActor {
    fn write_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let n = self.batch.len();
        match self.try_write() {
            Ok(()) => {
                self.rows.fetch_add(n as u64, Ordering::Relaxed);
                self.metrics.record_batch(n);
            }
            Err(e) => {
                log::error!("writing {n} request records failed: {e}");
                self.metrics.records_failed(n as u64);
            }
        }
        self.batch.clear();
    }

    fn try_write(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        let mut conn = self.pool.get()?;
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO records (created_at, ip, method, path, model, stream, upstream, status,
                 attempts, error, request_body, response, prompt_tokens, completion_tokens,
                 total_tokens, ttfb_ms, duration_ms, user_agent, client_key)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19)",
            )?;
            for r in &self.batch {
                let body = request_body_text(&r.request_body, r.body_limit);
                let response = r.response.as_deref().map(|t| cut(t, r.body_limit));
                stmt.execute(params![
                    rfc3339(r.created_at),
                    r.ip,
                    r.method,
                    r.path,
                    r.model,
                    r.stream,
                    r.upstream,
                    r.status,
                    r.attempts,
                    r.error,
                    body,
                    response,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.total_tokens,
                    r.ttfb_ms.map(|v| v as i64),
                    r.duration_ms as i64,
                    r.user_agent,
                    r.client_key,
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

impl Handler<Insert> for DbActor {
    type Result = ();

    fn handle(&mut self, msg: Insert, _: &mut SyncContext<Self>) {
        self.batch.push(*msg.0);
        // More records already queued behind this one: let them join the batch.
        let behind = self.queued.fetch_sub(1, Ordering::AcqRel).saturating_sub(1);
        if behind == 0 || self.batch.len() >= MAX_BATCH {
            self.write_batch();
        }
    }
}

impl Handler<Flush> for DbActor {
    type Result = ();

    fn handle(&mut self, _: Flush, _: &mut SyncContext<Self>) {
        self.write_batch();
    }
}

impl Handler<Prune> for DbActor {
    type Result = ();

    fn handle(&mut self, msg: Prune, _: &mut SyncContext<Self>) {
        self.write_batch();
        let cutoff = rfc3339(SystemTime::now() - msg.older_than);
        let result = self.pool.get().map_err(|e| e.to_string()).and_then(|c| {
            c.execute("DELETE FROM records WHERE created_at < ?1", params![cutoff])
                .map_err(|e| e.to_string())
        });
        match result {
            Ok(n) => {
                if n > 0 {
                    log::info!("retention: deleted {n} records older than {cutoff}");
                    self.rows.fetch_sub(n as u64, Ordering::Relaxed);
                }
            }
            Err(e) => log::error!("retention pruning failed: {e}"),
        }
    }
}

/// The proxy's handle on recording: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Recorder {
    addr: Addr<DbActor>,
    queued: Arc<AtomicUsize>,
    rows: Arc<AtomicU64>,
    capacity: usize,
    metrics: Metrics,
}

impl Recorder {
    /// Starts the writer thread over an opened pool.
    pub fn start(pool: Pool, metrics: Metrics, capacity: usize) -> Recorder {
        let queued = Arc::new(AtomicUsize::new(0));
        let rows = Arc::new(AtomicU64::new(count_rows(&pool)));
        let (q, r, m) = (queued.clone(), rows.clone(), metrics.clone());
        let addr = SyncArbiter::start(1, move || DbActor {
            pool: pool.clone(),
            queued: q.clone(),
            rows: r.clone(),
            metrics: m.clone(),
            batch: Vec::with_capacity(MAX_BATCH),
        });
        Recorder {
            addr,
            queued,
            rows,
            capacity,
            metrics,
        }
    }

    /// Queues a record, or drops and counts it when the queue is full.
    pub fn submit(&self, record: Record) {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.metrics.record_dropped();
            return;
        }
        self.addr.do_send(Insert(Box::new(record)));
    }

    /// Waits until every record queued so far is written.
    pub async fn flush(&self) {
        if let Err(e) = self.addr.send(Flush).await {
            log::error!("flushing request records failed: {e}");
        }
    }

    /// Asks the writer to delete old records.
    pub fn prune(&self, older_than: Duration) {
        self.addr.do_send(Prune { older_than });
    }

    /// Rows in the table (kept as a counter, so the status page never queries).
    pub fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    /// Records waiting for the writer.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}
