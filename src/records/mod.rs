//! Request records (see the observability guide, "Request records"): the `DbActor` on a
//! `SyncArbiter` and the bounded queue in front of it.
//!
//! A request never waits for the database: the proxy hands a finished [`Record`] to
//! [`Recorder::submit`], which counts it into a bounded queue or drops and counts it when full.
//! Records collect in memory and reach the one writer thread as one message every
//! [`BATCH_INTERVAL`], written in one transaction: one commit (and one thread wake-up) per request
//! would cost a WAL write and a context switch per request. Shutdown sends an awaited [`Flush`], which the mailbox delivers after every
//! record queued before it.
//!
//! The backend (embedded SQLite or a shared PostgreSQL) is chosen once, in [`Store::open`]; the
//! rest of the program only sees [`Recorder`].

mod columns;
pub mod owner_rows;
mod postgres;
mod priority;
mod retention;
pub mod shared;
mod spool;
mod sqlite;
pub mod target;
mod ticker;
pub mod usage;
mod writer;

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use actix_web::http::header::HeaderValue;
use actix_web::http::{Method, Uri};
use actix_web::web::Bytes;

use crate::escape::cut_bytes;
use crate::metrics::Metrics;
use crate::time::rfc3339;

use self::columns::{cut, ip_text, request_body_text, IpText};
pub use self::postgres::explain as explain_postgres;
pub use self::priority::can_switch as writer_can_idle;
pub use self::target::redact as redact_database_url;
pub use self::writer::DbActor;

/// How long a record may wait for its batch.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(100);

/// Everything known about one client request once its response is over.
#[derive(Debug, Clone)]
pub struct Record {
    /// Request start.
    pub created_at: SystemTime,
    /// Client address (the column is empty when it is unknown).
    pub ip: Option<IpAddr>,
    /// HTTP method.
    pub method: Method,
    /// The request URI: its path, cut to [`RECORD_PATH_BYTES`], is the `path` column. Shared
    /// with the request, so that recording costs the request no copy.
    pub path: Uri,
    /// `model` from the JSON body.
    pub model: Option<Arc<str>>,
    /// Stream request.
    pub stream: bool,
    /// Upstream that answered last (its name, shared with the config).
    pub upstream: Option<Arc<str>>,
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
    /// A whole JSON reply whose text (`response`) and `finish_reason` the writer reads before
    /// writing the row, off the request path (`capture::Capture::defer_json`).
    pub response_json: Option<Bytes>,
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
    /// Client User-Agent, as sent (the column keeps it cut to [`RECORD_USER_AGENT_BYTES`], and
    /// none that is not visible ASCII).
    pub user_agent: Option<HeaderValue>,
    /// Non-secret label of the client token.
    pub client_key: Option<Arc<str>>,
    /// `record_body_bytes` at the time of the request.
    pub body_limit: usize,
    /// The last `finish_reason` of the reply (JSON or SSE), bounded by the capture.
    pub finish_reason: Option<crate::capture::FinishReason>,
    /// Continuations of a broken stream (`resume`: see the rescue guide).
    pub resumed: u32,
    /// Whether the client received the whole answer.
    pub complete: bool,
    /// The id of the object this answer created, owned by `upstream` (see the affinity guide).
    pub object_id: Option<Arc<str>>,
    /// The request was sent as a rebuilt Responses chain (see the affinity guide).
    pub rebuilt: bool,
    /// A Responses answer's output items kept for rebuilding its chain (a JSON array of the
    /// messages and function calls), None when not kept whole within `record_body_bytes`.
    pub response_items: Option<String>,
    /// The `x-request-id` sent to the client (the answering upstream's, else the gateway's).
    pub request_id: Option<actix_web::http::header::HeaderValue>,
    /// The member who sent the request (see the members guide), None with `-noauth`.
    pub member: Option<Arc<str>>,
    /// An object this request deleted at its owner (a 2xx `DELETE`): the record that created it
    /// no longer names it, so a restart does not bring its owner back (see the affinity guide,
    /// "Deleted is gone"). Not a column.
    pub forgets: Option<Arc<str>>,
    /// Ids whose owner this request learned through "not here" (the answering upstream): shared
    /// with the other replicas of a PostgreSQL store. Not a column.
    pub learned: Vec<Arc<str>>,
}

/// The insert's column list, in the order both backends bind values.
const INSERT_COLUMNS: &str = "created_at, ip, method, path, model, stream, upstream, status, \
     attempts, error, request_body, response, prompt_tokens, completion_tokens, total_tokens, \
     ttfb_ms, duration_ms, user_agent, client_key, finish_reason, resumed, complete, object_id, \
     rebuilt, response_items, request_id, member";
/// Number of columns in [`INSERT_COLUMNS`].
const COLUMN_COUNT: usize = 27;

/// Longest `path` kept in a record (see the security guide).
pub const RECORD_PATH_BYTES: usize = 1024;
/// Longest `user_agent` kept in a record (see the security guide).
pub const RECORD_USER_AGENT_BYTES: usize = 256;

/// A request path as records and logs show it: cut to [`RECORD_PATH_BYTES`], without a marker
/// (see the security guide).
pub fn cut_path(path: &str) -> &str {
    cut_bytes(path, RECORD_PATH_BYTES)
}

impl Record {
    /// The record with the object its answer created and the output items kept for its chain
    /// (see the affinity guide).
    pub fn with_object(
        self,
        object_id: Option<Arc<str>>,
        response_items: Option<String>,
    ) -> Record {
        Record {
            object_id,
            response_items,
            ..self
        }
    }

    /// Reads a reply left to the writer ([`Record::response_json`]) into `response` and
    /// `finish_reason`; nothing when there is none.
    pub fn read_deferred(&mut self) {
        if let Some(json) = self.response_json.take() {
            let (text, finish_reason) = crate::capture::read_json_reply(&json);
            self.response = Some(text);
            if self.finish_reason.is_none() {
                self.finish_reason = finish_reason;
            }
        }
    }

    /// The `ip` column, formatted on the stack.
    fn ip_text(&self) -> IpText {
        ip_text(self.ip)
    }

    /// The `path` column.
    fn path_text(&self) -> &str {
        cut_path(self.path.path())
    }

    /// The `request_id` column (an upstream's id that is not visible ASCII is not kept).
    fn request_id_text(&self) -> Option<&str> {
        let id = self.request_id.as_ref()?.to_str().ok()?;
        Some(cut_bytes(id, 256))
    }

    /// The `user_agent` column.
    fn user_agent_text(&self) -> Option<&str> {
        let ua = self.user_agent.as_ref()?.to_str().ok()?;
        Some(cut_bytes(ua, RECORD_USER_AGENT_BYTES))
    }

    /// The `request_body` column: text cut at the record limit, binary described.
    fn stored_body(&self) -> Option<Cow<'_, str>> {
        request_body_text(&self.request_body, self.body_limit)
    }

    /// The `response` column: the reply text cut at the record limit.
    fn stored_response(&self) -> Option<Cow<'_, str>> {
        self.response.as_deref().map(|t| cut(t, self.body_limit))
    }
}

/// A database that cannot be used at start, reported before listening.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The file or server could not be opened, migrated or written.
    #[error("cannot open or write database {target}: {reason}")]
    Open {
        /// The path or URL (password removed).
        target: String,
        /// Why.
        reason: String,
    },
    /// A `-database` value that is neither a file nor a readable connection string.
    #[error("{0}")]
    Refused(target::TargetError),
}

/// A failed write, and whether the database was reachable at all.
#[derive(Debug)]
pub struct StoreError {
    /// What went wrong (no password: URLs are never part of these messages).
    pub message: String,
    /// True when no connection could be had (keep the records and retry).
    pub unreachable: bool,
    /// True when another connection held the database's lock past the busy timeout: the
    /// spool's ingester keeps its records and retries.
    pub busy: bool,
}

impl StoreError {
    fn unreachable(e: impl std::fmt::Display) -> StoreError {
        StoreError {
            message: e.to_string(),
            unreachable: true,
            busy: false,
        }
    }

    fn failed(e: impl std::fmt::Display) -> StoreError {
        StoreError {
            message: e.to_string(),
            unreachable: false,
            busy: false,
        }
    }

    fn sqlite(e: rusqlite::Error) -> StoreError {
        let busy = matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        );
        StoreError {
            busy,
            ..StoreError::failed(e)
        }
    }

    fn from_pg(e: ::postgres::Error) -> StoreError {
        StoreError {
            unreachable: e.is_closed(),
            message: postgres::explain(&e),
            busy: false,
        }
    }
}

/// A PostgreSQL error in the server's or the system's own words, without a password (for the
/// replicas' own connection, which is not the writer's).
pub fn explain_pg(e: &::postgres::Error) -> String {
    postgres::explain(e)
}

/// The connection string of a PostgreSQL `target`, for a connection of its own (the replicas'
/// shared health, see the operations guide); None for SQLite.
pub fn postgres_target(target: &str) -> Option<String> {
    match target::parse(target) {
        Ok(target::Target::Postgres(t)) => Some(t),
        _ => None,
    }
}

/// Whether `target` names a PostgreSQL database: a `postgres://` URL, or a libpq key/value string
/// like the Go tool's `host=127.0.0.1 port=5432 user=… dbname=…` (any spacing around `=`).
pub fn is_postgres_target(target: &str) -> bool {
    matches!(target::parse(target), Ok(target::Target::Postgres(_)))
}

/// Where records go. The only place that knows which database is in use.
#[derive(Clone)]
pub enum Store {
    /// Embedded SQLite file (and its spool).
    Sqlite(spool::Db),
    /// Shared PostgreSQL server.
    Postgres(postgres::Pool),
}

impl Store {
    /// Opens `target`: a `postgres://` / `postgresql://` URL, else a SQLite file path.
    pub fn open(target: &str) -> Result<Store, DbError> {
        match target::parse(target) {
            Ok(target::Target::Postgres(t)) => postgres::open(&t).map(Store::Postgres),
            Ok(target::Target::Sqlite(path)) => spool::open_store(&path).map(Store::Sqlite),
            Err(e) => Err(DbError::Refused(e)),
        }
    }

    /// Human name of the backend.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "SQLite",
            Store::Postgres(_) => "PostgreSQL",
        }
    }

    fn insert(&self, batch: &[Record]) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(p) => sqlite::insert(p, batch, None),
            Store::Postgres(p) => postgres::insert(p, batch),
        }
    }

    /// The spool records go through: an SQLite store's, when this process holds one.
    fn spool(&self) -> Option<&Arc<spool::Spool>> {
        match self {
            Store::Sqlite(db) => db.spool.as_ref(),
            Store::Postgres(_) => None,
        }
    }

    fn prune(&self, cutoff: SystemTime) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(p) => sqlite::prune(p, cutoff),
            Store::Postgres(p) => postgres::prune(p, cutoff),
        }
    }

    fn count(&self) -> u64 {
        match self {
            Store::Sqlite(p) => sqlite::count(p),
            Store::Postgres(p) => postgres::count(p),
        }
    }

    fn ping(&self) -> bool {
        match self {
            Store::Sqlite(p) => sqlite::ping(p),
            Store::Postgres(p) => postgres::ping(p),
        }
    }
}

/// Records collected by the request path since the last batch.
#[derive(Message)]
#[rtype(result = "()")]
pub struct InsertBatch(pub Vec<Record>);

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

/// Counters shared by the writer and the request path.
struct Shared {
    /// Records submitted and not yet written or dropped (mailbox + batch): the queue bound.
    pending: AtomicUsize,
    /// Rows in the table as far as this process knows.
    rows: AtomicU64,
    /// Whether the last write (or ping) reached the database.
    up: AtomicBool,
    /// The emptied vectors of written batches: the ticker gives the roomiest back to the request
    /// path as its next buffer, so that the buffer does not regrow from empty on every tick.
    spent: Mutex<Vec<Vec<Record>>>,
    /// When a dropped record was last said in the log (seconds since the Unix epoch): at most
    /// once every 10 seconds.
    drop_logged: AtomicU64,
}

impl Shared {
    /// Counts `n` rows written in one transaction (by the writer or the spool's ingester), and
    /// the database as reachable.
    fn wrote(&self, metrics: &Metrics, n: usize) {
        self.rows.fetch_add(n as u64, Ordering::Relaxed);
        metrics.record_batch(n);
        self.set_up(metrics, true);
    }

    /// Records whether the database was reachable, saying so when it changes.
    fn set_up(&self, metrics: &Metrics, up: bool) {
        if self.up.swap(up, Ordering::AcqRel) != up {
            if up {
                log::info!("database reachable again");
            }
            metrics.set_database_up(up);
        }
    }

    /// Says in the log that a record was dropped at a full queue (`n` since start), at most
    /// every 10 s.
    fn say_dropped(&self, capacity: usize, n: u64) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.drop_logged.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .drop_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!(
                "request records dropped: the queue of {capacity} (record_queue) is full; {n} \
                 dropped since start (openai_api_route_records_dropped_total)"
            );
        }
    }
}

/// Empties a shared buffer.
fn take(buffer: &Mutex<Vec<Record>>) -> Vec<Record> {
    match buffer.lock() {
        Ok(mut b) => std::mem::take(&mut *b),
        Err(p) => std::mem::take(&mut *p.into_inner()),
    }
}

/// The proxy's handle on recording: cheap to clone, never blocks. Records collect in a shared
/// buffer that a timer hands to the writer as one message per [`BATCH_INTERVAL`], so the writer
/// thread is not woken once per request.
#[derive(Clone)]
pub struct Recorder {
    addr: Addr<DbActor>,
    buffer: Arc<Mutex<Vec<Record>>>,
    shared: Arc<Shared>,
    capacity: usize,
    metrics: Metrics,
    kind: &'static str,
    /// The writer's scheduling class, promoted from here when the queue fills between ticks.
    class: Arc<priority::WriterClass>,
    /// The SQLite store's spool, for its backlog on the status page.
    spool: Option<Arc<spool::Spool>>,
}

impl Recorder {
    /// Rows already in the table; call before entering the async runtime (the PostgreSQL
    /// client blocks).
    pub fn initial_rows(store: &Store) -> u64 {
        store.count()
    }

    /// Starts the writer thread over an opened store that holds `rows` rows (inside an actix
    /// system: the batch ticker is a task on the current arbiter).
    pub fn start(store: Store, rows: u64, metrics: Metrics, capacity: usize) -> Recorder {
        let shared = Arc::new(Shared {
            pending: AtomicUsize::new(0),
            rows: AtomicU64::new(rows),
            up: AtomicBool::new(true),
            spent: Mutex::new(Vec::new()),
            drop_logged: AtomicU64::new(0),
        });
        metrics.set_database_up(true);
        let kind = store.kind();
        let (s, m) = (shared.clone(), metrics.clone());
        // The writer yields the CPU to request workers while its backlog is short (priority.rs).
        let class = Arc::new(priority::WriterClass::probe());
        let c = class.clone();
        let spool = store.spool().cloned();
        if let Some(spool) = &spool {
            spool.start_ingester(store.clone(), shared.clone(), metrics.clone());
        }
        let addr = SyncArbiter::start(1, move || {
            c.enter();
            if let Store::Sqlite(db) = &store {
                // Its doorbell is this thread's: it ends when this thread does. (With a spool
                // the ingester has its own; this one serves the writer's direct writes.)
                sqlite::start_checkpointer(db.pool.clone());
            }
            DbActor {
                store: store.clone(),
                shared: s.clone(),
                metrics: m.clone(),
                // The first batch's own vector becomes the writer's (see `InsertBatch`).
                batch: Vec::new(),
                buf: Vec::new(),
            }
        });
        let buffer: Arc<Mutex<Vec<Record>>> = Arc::default();
        ticker::start(
            addr.clone(),
            buffer.clone(),
            shared.clone(),
            class.clone(),
            capacity,
        );
        Recorder {
            addr,
            buffer,
            shared,
            capacity,
            metrics,
            kind,
            class,
            spool,
        }
    }

    /// Queues a record, or drops and counts it when the queue is full. A buffer holding half the
    /// queue goes to the writer at once instead of waiting for the tick: at high rates the
    /// interval alone would cap the records/s at `capacity` per [`BATCH_INTERVAL`].
    pub fn submit(&self, record: Record) {
        let before = self.shared.pending.fetch_add(1, Ordering::AcqRel);
        if before >= self.capacity {
            self.shared.pending.fetch_sub(1, Ordering::AcqRel);
            self.metrics.record_dropped();
            self.shared
                .say_dropped(self.capacity, self.metrics.records_dropped());
            return;
        }
        if before == self.capacity / 2 {
            self.class.promote();
        }
        let mut buffer = match self.buffer.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        buffer.push(record);
        if buffer.len() >= self.capacity.div_ceil(2) {
            let batch = std::mem::take(&mut *buffer);
            drop(buffer);
            self.addr.do_send(InsertBatch(batch));
        }
    }

    /// Waits until every record queued so far is written (or, database gone, given up).
    pub async fn flush(&self) {
        let batch = take(&self.buffer);
        if !batch.is_empty() {
            self.addr.do_send(InsertBatch(batch));
        }
        if let Err(e) = self.addr.send(Flush).await {
            log::error!("flushing request records failed: {e}");
        }
    }

    /// Asks the writer to delete old records.
    pub fn prune(&self, older_than: Duration) {
        self.addr.do_send(Prune { older_than });
    }

    /// Rows in the table as this process knows them (kept as a counter: the page never queries).
    pub fn rows(&self) -> u64 {
        self.shared.rows.load(Ordering::Relaxed)
    }

    /// Records waiting for the writer.
    pub fn queued(&self) -> usize {
        self.shared.pending.load(Ordering::Relaxed)
    }

    /// Bytes of records in the spool that are not rows yet (0 without a spool).
    pub fn spooled(&self) -> u64 {
        self.spool.as_ref().map_or(0, |s| s.backlog())
    }

    /// Whether the database was reachable at the last write.
    pub fn up(&self) -> bool {
        self.shared.up.load(Ordering::Relaxed)
    }

    /// "SQLite" or "PostgreSQL".
    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_targets_and_redaction() {
        assert!(is_postgres_target("postgres://u:p@h/db"));
        assert!(is_postgres_target(
            "host=127.0.0.1 port=5432 user=postgres dbname=x sslmode=disable"
        ));
        assert!(!is_postgres_target("./db.sqlite"));
        assert!(!is_postgres_target("weird=name.sqlite"));
        assert_eq!(
            redact_database_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact_database_url("postgres://h/db?password=secret&sslmode=disable"),
            "postgres://h/db?password=***&sslmode=disable"
        );
        assert_eq!(
            redact_database_url("host=h password=secret dbname=d"),
            "host=h password=*** dbname=d"
        );
    }
}
