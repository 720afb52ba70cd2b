//! The batch ticker: every [`BATCH_INTERVAL`] it hands what the request path collected to the
//! writer as one message, sets the writer's scheduling class from the backlog
//! (`priority.rs`), and frees the batches the writer has written — on this normal-priority
//! thread, not on the idle-class writer, which would otherwise free what request workers
//! allocated — giving the roomiest one back to the request path as its next buffer, so that the
//! buffer does not regrow from empty on every tick.

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
            class.adjust(shared.pending.load(Ordering::Acquire), capacity);
            let mut room = Vec::new();
            for mut done in take_spent(&shared) {
                done.clear();
                if done.capacity() > room.capacity() {
                    room = done;
                }
            }
            let batch = swap(&collected, room);
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

/// The batches the writer has written since the last tick.
fn take_spent(shared: &Shared) -> Vec<Vec<Record>> {
    match shared.spent.lock() {
        Ok(mut s) => std::mem::take(&mut *s),
        Err(p) => std::mem::take(&mut *p.into_inner()),
    }
}
