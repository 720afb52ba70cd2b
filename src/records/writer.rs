//! The writer: one `DbActor` on a one-thread `SyncArbiter`, which appends the batches the ticker
//! hands it to the SQLite store's spool (`spool.rs`) or, without one, writes them as rows; paced
//! while it is idle-class (`priority.rs`); and frees them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;

use super::spool::AppendError;
use super::{priority, Flush, InsertBatch, Prune, Record, Shared, Store};
use crate::metrics::Metrics;

/// Rows per transaction while the writer is idle-class (see `DbActor::write_batch`): a commit of
/// this many rows is a few tens of microseconds of WAL writing.
const PACED_ROWS: usize = 64;

/// The writer. One instance on a one-thread `SyncArbiter`.
pub struct DbActor {
    pub(super) store: Store,
    pub(super) shared: Arc<Shared>,
    pub(super) metrics: Metrics,
    pub(super) batch: Vec<Record>,
    /// The spool's encoding buffer, reused from batch to batch.
    pub(super) buf: Vec<u8>,
}

impl Actor for DbActor {
    type Context = SyncContext<Self>;
}

impl DbActor {
    /// Writes the batch. A database that cannot be reached keeps what is not yet written for
    /// the next try (the queue bound still applies); a write that fails while the database
    /// answers is dropped, since retrying the same records would fail the same way.
    ///
    /// Idle-class (short backlog), the SQLite writer commits in transactions of
    /// [`PACED_ROWS`] rows: SQLite writes the WAL frames of a commit without calling the
    /// progress handler, so a whole batch in one commit would be a long stretch in which the
    /// writer never offers the CPU (priority.rs). Promoted, it writes the batch in one.
    fn write_batch(&mut self, last_chance: bool) {
        if self.spooled() {
            return;
        }
        let total = self.batch.len();
        let mut done = 0;
        while done < total {
            let n = match self.store {
                Store::Sqlite(_) if priority::paced() => PACED_ROWS.min(total - done),
                _ => total - done,
            };
            // Replies left to the writer are read here, a transaction's worth at a time, so
            // that an idle-class writer reads them between its pause points too.
            for r in &mut self.batch[done..done + n] {
                r.read_deferred();
            }
            if let Err(e) = self.store.insert(&self.batch[done..done + n]) {
                // What was committed is out of the batch; the rest follows the error.
                self.batch.drain(..done);
                let n = self.batch.len();
                self.metrics.record_write_failure();
                if e.busy && !last_chance {
                    // Another connection (the spool's ingester, another process) held the
                    // lock past the busy timeout: the database is fine, the records wait.
                    log::error!(
                        "writing {n} request records failed, database locked; keeping them to retry: {}",
                        e.message
                    );
                    return;
                }
                let reachable = !e.unreachable && self.store.ping();
                if reachable || last_chance {
                    log::error!(
                        "writing {n} request records failed, dropping them: {}",
                        e.message
                    );
                    self.drop_batch();
                } else {
                    self.shared.set_up(&self.metrics, false);
                    log::error!(
                        "writing {n} request records failed, database unreachable; keeping them to retry: {}",
                        e.message
                    );
                }
                return;
            }
            self.shared.pending.fetch_sub(n, Ordering::AcqRel);
            self.shared.wrote(&self.metrics, n);
            done += n;
        }
        if total > 0 {
            self.release();
        }
    }

    /// Appends the batch to the spool, if the store has one that takes it; a full, closed or
    /// failing spool leaves the batch to be written as rows (the bound of the spool: see
    /// `spool.rs`).
    fn spooled(&mut self) -> bool {
        let Some(spool) = self.store.spool() else {
            return false;
        };
        if self.batch.is_empty() {
            return true;
        }
        match spool.append(&self.batch, &mut self.buf) {
            Ok(()) => {
                self.shared
                    .pending
                    .fetch_sub(self.batch.len(), Ordering::AcqRel);
                self.release();
                true
            }
            Err(AppendError::Full | AppendError::Closed) => false,
            Err(AppendError::Io(e)) => {
                log::error!(
                    "appending request records to the spool failed, writing them as rows: {e}"
                );
                false
            }
        }
    }

    /// Frees the written records here, offering the CPU between them (an idle-class writer
    /// freeing a tick's records in one go — a few hundred microseconds — would hold the CPU as
    /// any other stretch of its work would), and hands the emptied vector to the ticker, which
    /// gives it back to the request path as its next buffer so that the buffer does not regrow
    /// from empty on every tick.
    fn release(&mut self) {
        for (i, record) in self.batch.drain(..).enumerate() {
            drop(record);
            if i % 16 == 15 {
                priority::pause_point();
            }
        }
        let room = std::mem::take(&mut self.batch);
        match self.shared.spent.lock() {
            Ok(mut spent) => spent.push(room),
            Err(p) => p.into_inner().push(room),
        }
    }

    fn drop_batch(&mut self) {
        let n = self.batch.len();
        self.shared.pending.fetch_sub(n, Ordering::AcqRel);
        self.metrics.records_dropped_n(n);
        self.batch.clear();
    }
}

impl Handler<InsertBatch> for DbActor {
    type Result = ();

    fn handle(&mut self, msg: InsertBatch, _: &mut SyncContext<Self>) {
        if self.batch.is_empty() {
            // The request path's buffer itself: it goes back to the ticker once written.
            self.batch = msg.0;
        } else {
            self.batch.extend(msg.0);
        }
        self.write_batch(false);
    }
}

impl Handler<Flush> for DbActor {
    type Result = ();

    fn handle(&mut self, _: Flush, _: &mut SyncContext<Self>) {
        self.write_batch(true);
        if let Some(spool) = self.store.spool() {
            spool.finish();
            // Anything after the barrier (nothing, at shutdown) is written as rows.
            self.write_batch(true);
        }
    }
}

impl Handler<Prune> for DbActor {
    type Result = ();

    fn handle(&mut self, msg: Prune, _: &mut SyncContext<Self>) {
        self.write_batch(false);
        match self.store.spool() {
            // The ingester is the one that writes rows: it prunes between its transactions.
            Some(spool) => spool.prune(msg.older_than),
            None => super::retention::prune(&self.store, &self.shared, msg.older_than),
        }
    }
}
