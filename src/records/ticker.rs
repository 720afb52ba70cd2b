//! The batch ticker: every [`BATCH_INTERVAL`] it hands what the request path collected to the
//! writer as one message, sets the writer's scheduling class from the backlog
//! (`priority.rs`), and gives the roomiest of the vectors the writer has emptied back to the
//! request path as its next buffer, so that the buffer does not regrow from empty on every tick.
//! It frees nothing itself: a normal-priority thread freeing a tick's records holds the CPU for
//! a few hundred microseconds, which a request that became runnable meanwhile waits out.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use actix::prelude::*;

use super::priority::WriterClass;
use super::{DbActor, InsertBatch, Record, Shared, BATCH_INTERVAL};

/// Starts the ticker on the current arbiter; it stops when the writer is gone.
pub(super) fn start(
    writer: Addr<DbActor>,
    collected: Arc<Mutex<Vec<Record>>>,
    shared: Arc<Shared>,
    class: Arc<WriterClass>,
    capacity: usize,
) {
    actix_rt::spawn(async move {
        let mut every = actix_rt::time::interval(BATCH_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let mut room = Vec::new();
            for done in take_spent(&shared) {
                if done.capacity() > room.capacity() && done.is_empty() {
                    room = done;
                }
            }
            let batch = swap(&collected, room);
            // The backlog is what the writer was handed on earlier ticks and has not written;
            // this tick's batch is not a backlog (on a fast machine at one connection it alone
            // is a quarter of the queue, which kept the writer promoted for good).
            let backlog = shared
                .pending
                .load(Ordering::Acquire)
                .saturating_sub(batch.len());
            class.adjust(backlog, capacity);
            if !batch.is_empty() {
                writer.do_send(InsertBatch(batch));
            }
            if !writer.connected() {
                return;
            }
        }
    });
}

/// Replaces a shared buffer with `room` (empty, maybe with capacity), returning what it held.
fn swap(buffer: &Mutex<Vec<Record>>, room: Vec<Record>) -> Vec<Record> {
    match buffer.lock() {
        Ok(mut b) => std::mem::replace(&mut *b, room),
        Err(p) => std::mem::replace(&mut *p.into_inner(), room),
    }
}

/// The vectors the writer has emptied since the last tick — unless the writer holds the lock
/// right now: the ticker must never wait for the writer. An idle-class writer preempted while
/// holding it can wait hundreds of milliseconds for the CPU when the workers keep it busy, and a
/// ticker blocked behind it would neither hand over batches nor promote the writer, so the queue
/// overflowed (seen at c=64: two runs in three lost 10–70 % of their records). The room waits
/// for the next tick instead.
fn take_spent(shared: &Shared) -> Vec<Vec<Record>> {
    match shared.spent.try_lock() {
        Ok(mut s) => std::mem::take(&mut *s),
        Err(std::sync::TryLockError::Poisoned(p)) => std::mem::take(&mut *p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => Vec::new(),
    }
}
