//! The spool: records appended to a file beside the SQLite database, turned into rows by an
//! idle-class thread (see the observability guide, "The spool", and the benchmarks guide,
//! "Recording nearly free").
//!
//! Why: one SQLite row costs about 20,000 instructions to bind and insert, the rest of a request
//! about 100,000; under load that is CPU the requests do not get. Appending a record to a file
//! costs a tenth of it. So the writer (`DbActor`) only appends, and the *ingester* writes the
//! rows when the machine has time: while requests keep the cores busy the file grows, and the
//! rows follow once they stop. The file is bounded: past [`PROMOTE_BYTES`] behind, the ingester
//! runs at normal priority; past [`MAX_BYTES`], the writer inserts directly as before.
//!
//! What a crash loses: nothing appended. The file is in the page cache once `write` returns,
//! and each ingest transaction stores, with its rows, how far into which generation of the file
//! it got (`records_meta`): a restart writes the rest before the gateway listens, and no record
//! twice. A power cut can lose what the page cache held, as SQLite's `synchronous=NORMAL` can
//! lose its last commits.
//!
//! The file: a header (magic, generation), then frames (`frame.rs`).
//! When the ingester has caught up it empties the file and starts a new generation; a clean
//! shutdown writes everything and removes the file. One process owns a spool (an exclusive
//! lock on the file); a second process on the same database writes directly.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix_web::web::Bytes;

mod frame;
mod recover;

use self::frame::{checked_frame_len, decode_frames, Names, FRAME_HEAD};
use super::priority::{self, WriterClass};
use super::{sqlite, DbError, Record, Shared, Store, StoreError};
use crate::metrics::Metrics;

/// The file's first bytes; the last one is the frame format's version.
pub(super) const MAGIC: &[u8; 8] = b"OARSPOL1";
/// Header length: magic and generation.
const HEADER: u64 = 16;
/// Backlog from which the ingester runs at normal priority (below a quarter of it, idle again).
pub const PROMOTE_BYTES: u64 = 256 << 20;
/// Backlog from which the writer inserts rows itself instead of appending (the 0.3 behaviour).
pub const MAX_BYTES: u64 = 1 << 30;
/// Bytes read from the file at once.
const READ_CHUNK: u64 = 4 << 20;
/// Rows per transaction while the ingester is idle-class: a commit of this many rows is a few
/// tens of microseconds of WAL writing without a pause point (see `writer.rs`).
const PACED_ROWS: usize = 64;
/// Rows per transaction otherwise.
const ROWS: usize = 4096;
/// How long a shutdown waits for the ingester before leaving the rest to the next start.
const FLUSH_WAIT: Duration = Duration::from_secs(60);

/// An opened SQLite store: its pool, and the spool its records go through when this process
/// holds one. Readers use it as the pool.
#[derive(Clone)]
pub struct Db {
    /// Connections to the file.
    pub pool: sqlite::Pool,
    /// The records' spool; None for an in-memory database or one whose spool another process
    /// holds.
    pub spool: Option<Arc<Spool>>,
}

impl std::ops::Deref for Db {
    type Target = sqlite::Pool;

    fn deref(&self) -> &sqlite::Pool {
        &self.pool
    }
}

/// Opens the SQLite file (`sqlite::open`) and its spool, writing what a previous run left in
/// it.
pub fn open_store(path: &str) -> Result<Db, DbError> {
    let pool = sqlite::open(path)?;
    let spool = Spool::open(path, &pool);
    Ok(Db { pool, spool })
}

/// One database's spool: shared by the writer, which appends, and the ingester.
pub struct Spool {
    file: File,
    path: PathBuf,
    state: Mutex<State>,
    /// Rung on every change of [`State`].
    changed: Condvar,
    /// The ingester's scheduling class, set from the backlog by the writer.
    class: Arc<WriterClass>,
}

/// What the writer and the ingester share.
#[derive(Debug, Default)]
struct State {
    /// Bytes in the file.
    end: u64,
    /// The file's generation.
    generation: u64,
    /// Bytes whose records are rows (or were given up).
    ingested: u64,
    /// A shutdown waits: write everything, at normal priority.
    urgent: bool,
    /// No more appends: the ingester writes what is there, removes the file and ends.
    closing: bool,
    /// The ingester has ended.
    ended: bool,
    /// The ingester cannot write (database unreachable): a shutdown does not wait for it.
    stuck: bool,
    /// Retention asked by the writer, run by the ingester (the one SQLite writer).
    prune: Option<Duration>,
}

impl State {
    fn backlog(&self) -> u64 {
        self.end - self.ingested
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why an append did not happen.
#[derive(Debug)]
pub enum AppendError {
    /// [`MAX_BYTES`] are waiting: the caller inserts directly.
    Full,
    /// The spool is closed (shut down).
    Closed,
    /// The file could not be written.
    Io(std::io::Error),
}

impl Spool {
    /// Opens the spool of the SQLite file `db` and writes what a previous run left in it
    /// (before the gateway listens: owners and chains are read from the rows). None where there
    /// is no spool: an in-memory or URI database, a spool another process holds, a file that
    /// cannot be made; recording then writes rows directly.
    pub fn open(db: &str, pool: &sqlite::Pool) -> Option<Arc<Spool>> {
        if db.is_empty() || db == ":memory:" || db.starts_with("file:") {
            return None;
        }
        // Beside the file itself, not beside a symbolic link to it: two names of one database
        // must not give two spools (their progress is one, in the database).
        let db =
            std::fs::canonicalize(db).map_or_else(|_| db.to_string(), |p| p.display().to_string());
        let path = PathBuf::from(format!("{db}-spool"));
        let file = match OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) => {
                log::warn!(
                    "no record spool ({}: {e}): rows are written as requests end",
                    path.display()
                );
                return None;
            }
        };
        if file.try_lock().is_err() {
            log::info!(
                "the record spool {} is another process's: this one writes rows directly",
                path.display()
            );
            return None;
        }
        let generation = match recover::recover(&file, pool) {
            Ok((generation, n)) => {
                if n > 0 {
                    log::info!("wrote {n} request records the last run left in its spool");
                }
                generation
            }
            Err(e) => {
                // Kept as it is (a database locked by another process at this start, say): the
                // next start tries again. This run writes rows directly.
                log::error!(
                    "the record spool {} could not be written to the database ({}); it is kept \
                     for the next start, and this run writes rows directly",
                    path.display(),
                    e.message
                );
                return None;
            }
        };
        if let Err(e) = reset(&file, generation) {
            log::warn!("no record spool ({}: {e})", path.display());
            return None;
        }
        let class = Arc::new(WriterClass::probe_quietly());
        Some(Arc::new(Spool {
            file,
            path,
            state: Mutex::new(State {
                end: HEADER,
                generation,
                ingested: HEADER,
                ..State::default()
            }),
            changed: Condvar::new(),
            class,
        }))
    }

    /// Appends a batch (encoded into `buf`, which is reused). Called by the writer.
    pub fn append(&self, batch: &[Record], buf: &mut Vec<u8>) -> Result<(), AppendError> {
        {
            let st = lock(&self.state);
            if st.closing || st.ended {
                return Err(AppendError::Closed);
            }
            if st.backlog() >= MAX_BYTES {
                return Err(AppendError::Full);
            }
        }
        buf.clear();
        frame::encode_all(batch, buf);
        let backlog = {
            let mut st = lock(&self.state);
            if st.closing || st.ended {
                return Err(AppendError::Closed);
            }
            if let Err(e) = (&self.file).write_all(buf) {
                // A partial write leaves a torn frame: cut it off again.
                let _ = self.file.set_len(st.end);
                return Err(AppendError::Io(e));
            }
            st.end += buf.len() as u64;
            st.backlog()
        };
        self.changed.notify_all();
        // `adjust` promotes at a quarter of its capacity and demotes below a sixteenth.
        self.class.adjust(
            (backlog >> 20) as usize,
            ((4 * PROMOTE_BYTES) >> 20) as usize,
        );
        Ok(())
    }

    /// Asks the ingester to delete records older than `older_than`.
    pub fn prune(&self, older_than: Duration) {
        lock(&self.state).prune = Some(older_than);
        self.changed.notify_all();
    }

    /// Bytes appended and not yet rows.
    pub fn backlog(&self) -> u64 {
        lock(&self.state).backlog()
    }

    /// The shutdown barrier: waits (at most [`FLUSH_WAIT`]) until every appended record is a
    /// row, then closes the spool: the ingester removes the file and ends. What is left (a
    /// database unreachable, a very long backlog) stays in the file for the next start.
    pub fn finish(&self) {
        let deadline = Instant::now() + FLUSH_WAIT;
        self.class.promote();
        let mut st = lock(&self.state);
        st.urgent = true;
        st.closing = true;
        self.changed.notify_all();
        while !st.ended && !st.stuck {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .changed
                .wait_timeout(st, left.min(Duration::from_millis(200)))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        if st.backlog() > 0 {
            log::warn!(
                "{} bytes of request records are left in {}: they are written at the next start",
                st.backlog(),
                self.path.display()
            );
        }
        // Whatever the ingester is doing, it appends nothing and ends at its next look.
        st.closing = true;
    }

    /// Starts the ingester thread; it ends when the spool is closed and written.
    pub(super) fn start_ingester(
        self: &Arc<Self>,
        store: Store,
        shared: Arc<Shared>,
        metrics: Metrics,
    ) {
        let spool = self.clone();
        let spawned = std::thread::Builder::new()
            .name("record-ingest".into())
            .spawn(move || {
                spool.class.enter_idle();
                if let Store::Sqlite(db) = &store {
                    sqlite::start_checkpointer(db.pool.clone());
                }
                spool.ingest(&store, &shared, &metrics);
            });
        if let Err(e) = spawned {
            log::error!("no record ingest thread ({e}): records stay in the spool until restart");
            let mut st = lock(&self.state);
            st.stuck = true;
            st.closing = true;
        }
    }

    /// The ingester's loop.
    fn ingest(&self, store: &Store, shared: &Shared, metrics: &Metrics) {
        let Store::Sqlite(db) = store else {
            return;
        };
        let mut failures = 0u32;
        let mut names = Names::default();
        loop {
            let (from, to, generation, prune, closing) = {
                let mut st = lock(&self.state);
                while st.backlog() == 0 && st.prune.is_none() && !st.closing {
                    st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                (
                    st.ingested,
                    st.end,
                    st.generation,
                    st.prune.take(),
                    st.closing,
                )
            };
            if let Some(older_than) = prune {
                super::retention::prune(store, shared, older_than);
            }
            if from < to {
                match self.ingest_some(&db.pool, from..to, generation, &mut names, shared, metrics)
                {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        metrics.record_write_failure();
                        if e.unreachable {
                            shared.set_up(metrics, false);
                        }
                        if failures == 1 || failures.is_multiple_of(60) {
                            log::error!(
                                "writing request records failed (from the spool), keeping them \
                                 to retry: {}",
                                e.message
                            );
                        }
                        let mut st = lock(&self.state);
                        if st.closing && failures >= 3 {
                            // A shutdown does not wait for a database that does not come back:
                            // the records stay in the file for the next start.
                            st.stuck = true;
                            st.ended = true;
                            self.changed.notify_all();
                            return;
                        }
                        // A second between tries (appends ring the condvar; they do not cut
                        // the pause short, a shutdown does).
                        let until = Instant::now() + Duration::from_secs(1);
                        while !st.closing {
                            let left = until.saturating_duration_since(Instant::now());
                            if left.is_zero() {
                                break;
                            }
                            st = self
                                .changed
                                .wait_timeout(st, left)
                                .map(|(g, _)| g)
                                .unwrap_or_else(|p| p.into_inner().0);
                        }
                        continue;
                    }
                }
            }
            let mut st = lock(&self.state);
            if st.backlog() == 0 {
                if closing || st.closing {
                    // Everything is a row: the file goes (the lock with it, when the last
                    // handle drops).
                    let _ = std::fs::remove_file(&self.path);
                    st.ended = true;
                    self.changed.notify_all();
                    return;
                }
                if st.end > HEADER {
                    let next = st.generation + 1;
                    match reset(&self.file, next) {
                        Ok(()) => {
                            st.generation = next;
                            st.end = HEADER;
                            st.ingested = HEADER;
                        }
                        Err(e) => {
                            // Everything appended is a row, whatever the file holds now: a
                            // restart finds nothing to write. Appending to a file in an unknown
                            // state is not safe, so the writer writes rows from here on.
                            log::error!(
                                "emptying the record spool failed ({e}); rows are written \
                                 directly from now on"
                            );
                            st.closing = true;
                            st.ended = true;
                            self.changed.notify_all();
                            return;
                        }
                    }
                }
            }
            self.changed.notify_all();
        }
    }

    /// Writes the records of `[from, to)` (a few MiB at most) as rows, a transaction at a time,
    /// each storing how far it got.
    fn ingest_some(
        &self,
        pool: &sqlite::Pool,
        std::ops::Range {
            start: from,
            end: to,
        }: std::ops::Range<u64>,
        generation: u64,
        names: &mut Names,
        shared: &Shared,
        metrics: &Metrics,
    ) -> Result<(), StoreError> {
        let bytes = read_range(&self.file, from, to).map_err(StoreError::failed)?;
        let (mut records, ends, cut) = decode_frames(&bytes, from, names);
        drop(bytes);
        let mut done = 0;
        while done < records.len() {
            let urgent = lock(&self.state).urgent;
            let n = if priority::paced() && !urgent {
                PACED_ROWS
            } else {
                ROWS
            }
            .min(records.len() - done);
            let upto = ends[done + n - 1];
            if !write_part(pool, &mut records[done..done + n], (generation, upto))? {
                metrics.record_write_failure();
                metrics.records_dropped_n(n);
                self.give_up(upto);
                done += n;
                continue;
            }
            shared.wrote(metrics, n);
            {
                let mut st = lock(&self.state);
                if st.generation == generation {
                    st.ingested = upto;
                }
            }
            self.changed.notify_all();
            done += n;
        }
        free(records);
        if cut.is_some() || done == 0 {
            // Only the writer appends, and only whole frames: a frame that does not read is a
            // damaged file. Frames have no marker to find the next one by, so everything appended
            // up to now is given up rather than looped on.
            let at = ends.last().copied().unwrap_or(from);
            let n = self.give_up(to);
            log::error!("{n} bytes of the record spool after byte {at} could not be read; dropped");
            metrics.record_dropped();
        }
        Ok(())
    }

    /// Marks everything up to `to` as done without writing it; returns how many bytes.
    fn give_up(&self, to: u64) -> u64 {
        let mut st = lock(&self.state);
        let n = to.saturating_sub(st.ingested);
        st.ingested = st.ingested.max(to);
        n
    }
}

/// Frees written records, offering the CPU between them (see `writer.rs`, `release`).
fn free(rows: Vec<Record>) {
    for (i, r) in rows.into_iter().enumerate() {
        drop(r);
        if i % 16 == 15 {
            priority::pause_point();
        }
    }
}

/// Writes `part` as rows in one transaction that stores `progress` (generation, offset) with
/// them, reading the replies left to the writer first (a transaction's worth at a time, so that
/// an idle-class ingester reads them between its pause points too). `Ok(false)`: the database
/// answers and refused these rows; retrying them would fail the same way, so, as without a
/// spool, they are dropped (said here). An error is one worth retrying: the database locked or
/// unreachable.
fn write_part(
    pool: &sqlite::Pool,
    part: &mut [Record],
    progress: (u64, u64),
) -> Result<bool, StoreError> {
    for r in part.iter_mut() {
        r.read_deferred();
    }
    match sqlite::insert(pool, part, Some(progress)) {
        Ok(()) => Ok(true),
        Err(e) if e.unreachable || e.busy || !sqlite::ping(pool) => Err(e),
        Err(e) => {
            log::error!(
                "writing {} request records failed, dropping them: {}",
                part.len(),
                e.message
            );
            Ok(false)
        }
    }
}

/// Empties the file and writes a header of `generation`.
fn reset(file: &File, generation: u64) -> std::io::Result<()> {
    file.set_len(0)?;
    let mut head = [0u8; HEADER as usize];
    head[..8].copy_from_slice(MAGIC);
    head[8..].copy_from_slice(&generation.to_le_bytes());
    (&*file).write_all(&head)
}

/// Reads `[from, to)`, at most [`READ_CHUNK`] unless one frame is longer.
fn read_range(file: &File, from: u64, to: u64) -> std::io::Result<Bytes> {
    let avail = to - from;
    let mut want = avail.min(READ_CHUNK);
    if avail >= FRAME_HEAD as u64 {
        let mut head = [0u8; FRAME_HEAD];
        file.read_exact_at(&mut head, from)?;
        // Only a head that checks out may ask for a longer read (a torn or damaged one is
        // refused by `decode_frames`, whatever length it claims).
        if let Some(len) = checked_frame_len(&head) {
            want = want.max(len.min(avail));
        }
    }
    let mut buf = vec![0u8; want as usize];
    file.read_exact_at(&mut buf, from)?;
    Ok(Bytes::from(buf))
}
