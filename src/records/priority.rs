//! The record writer yields the CPU to the request workers (issue "Recording without a tail").
//!
//! Writing a batch takes the writer thread a millisecond or two of CPU every [`BATCH_INTERVAL`].
//! At normal priority the kernel lets it finish its slice before a request worker that just woke
//! up gets the core (EEVDF's run-to-parity; `nice 19` does not change that), so about one request
//! in a hundred waited 1–2 ms. Under `SCHED_IDLE` any normal thread that wakes preempts the
//! writer at once — but a writer that stays idle-class is starved when the workers keep both
//! cores busy, and the queue overflows. So the writer is idle-class while its backlog is short
//! and normal-class once the backlog reaches a quarter of the queue, until it falls to a
//! sixteenth: light load pays no tail for recording, heavy load loses no record.
//!
//! The switch is made by the batch ticker (a normal thread), so a starved writer is promoted
//! without having to run first. Leaving `SCHED_IDLE` needs `CAP_SYS_NICE` or an `RLIMIT_NICE`
//! of 20 or more; a start-up probe on a throwaway thread checks that both directions work, and
//! where they do not, the writer simply stays at normal priority (the 0.2 behaviour).
//!
//! [`BATCH_INTERVAL`]: super::BATCH_INTERVAL

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// The scheduling class of the writer thread, switched by the backlog.
#[derive(Debug, Default)]
pub struct WriterClass {
    /// The writer thread, once it has started.
    #[cfg(target_os = "linux")]
    thread: OnceLock<thread_priority::unix::ThreadId>,
    #[cfg(not(target_os = "linux"))]
    thread: OnceLock<()>,
    /// The writer is idle-class now.
    idle: AtomicBool,
    /// The probe showed that this process may move a thread into and out of `SCHED_IDLE`.
    switchable: bool,
}

impl WriterClass {
    /// Probes whether the class can be switched both ways here (a thread of its own, so a
    /// failed probe leaves no thread stuck in the idle class).
    pub fn probe() -> WriterClass {
        let switchable = std::thread::Builder::new()
            .name("sched-probe".into())
            .spawn(|| set_own(true) && set_own(false))
            .ok()
            .and_then(|h| h.join().ok())
            .unwrap_or(false);
        if !switchable {
            log::info!(
                "record writer stays at normal priority: this process may not leave SCHED_IDLE \
                 (needs CAP_SYS_NICE or RLIMIT_NICE >= 20)"
            );
        }
        WriterClass {
            switchable,
            ..WriterClass::default()
        }
    }

    /// Called on the writer thread when it starts: remembers it and makes it idle-class.
    pub fn enter(&self) {
        if !self.switchable {
            return;
        }
        #[cfg(target_os = "linux")]
        let _ = self.thread.set(thread_priority::unix::thread_native_id());
        if set_own(true) {
            self.idle.store(true, Ordering::Release);
        }
    }

    /// Called by the ticker with the queue's backlog: normal class from a quarter of the queue,
    /// idle class again below a sixteenth.
    pub fn adjust(&self, pending: usize, capacity: usize) {
        if !self.switchable {
            return;
        }
        let idle = self.idle.load(Ordering::Acquire);
        let want_idle = if idle {
            pending < capacity.div_ceil(4)
        } else {
            pending < capacity.div_ceil(16)
        };
        if want_idle != idle && self.set_writer(want_idle) {
            self.idle.store(want_idle, Ordering::Release);
            log::debug!(
                "record writer now {} ({pending} records pending)",
                if want_idle { "idle-class" } else { "normal" }
            );
        }
    }

    /// Whether the writer is idle-class now.
    #[cfg(test)]
    fn is_idle(&self) -> bool {
        self.idle.load(Ordering::Acquire)
    }

    /// Sets the writer thread's class from another thread.
    #[cfg(target_os = "linux")]
    fn set_writer(&self, idle: bool) -> bool {
        use thread_priority::unix::set_thread_priority_and_policy;
        let Some(&thread) = self.thread.get() else {
            return false;
        };
        // The crate also sets the *calling* thread's nice value to the given one (0, the
        // ticker's own): harmless here.
        set_thread_priority_and_policy(thread, nice_zero(), policy(idle)).is_ok()
    }

    #[cfg(not(target_os = "linux"))]
    fn set_writer(&self, _idle: bool) -> bool {
        false
    }
}

/// Sets the calling thread's class.
#[cfg(target_os = "linux")]
fn set_own(idle: bool) -> bool {
    use thread_priority::unix::{set_thread_priority_and_policy, thread_native_id};
    set_thread_priority_and_policy(thread_native_id(), nice_zero(), policy(idle)).is_ok()
}

#[cfg(not(target_os = "linux"))]
fn set_own(_idle: bool) -> bool {
    false
}

#[cfg(target_os = "linux")]
fn nice_zero() -> thread_priority::ThreadPriority {
    thread_priority::ThreadPriority::Os(thread_priority::ThreadPriorityOsValue::default())
}

#[cfg(target_os = "linux")]
fn policy(idle: bool) -> thread_priority::unix::ThreadSchedulePolicy {
    use thread_priority::unix::{NormalThreadSchedulePolicy, ThreadSchedulePolicy};
    ThreadSchedulePolicy::Normal(if idle {
        NormalThreadSchedulePolicy::Idle
    } else {
        NormalThreadSchedulePolicy::Other
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policy of a thread, read back from the kernel (`/proc`), by its kernel thread id.
    fn policy_of(tid: i32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
        // Field 41 (`policy`), counted after the command name's closing parenthesis.
        let rest = stat.rsplit_once(')')?.1;
        rest.split_whitespace().nth(38)?.parse().ok()
    }

    fn gettid() -> Option<i32> {
        std::fs::read_link("/proc/thread-self")
            .ok()?
            .file_name()?
            .to_str()?
            .parse()
            .ok()
    }

    #[test]
    fn the_writer_goes_idle_and_back_with_its_backlog() {
        let class = std::sync::Arc::new(WriterClass::probe());
        if !class.switchable {
            // Without CAP_SYS_NICE (not root): the writer stays normal, and says so.
            class.enter();
            assert!(!class.is_idle());
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let c = class.clone();
        let writer = std::thread::spawn(move || {
            c.enter();
            tx.send(gettid()).ok();
            stop_rx.recv().ok();
        });
        let tid = rx.recv().ok().flatten().expect("writer tid");
        const SCHED_OTHER: u64 = 0;
        const SCHED_IDLE: u64 = 5;
        assert_eq!(
            policy_of(tid),
            Some(SCHED_IDLE),
            "idle while the queue is empty"
        );
        class.adjust(2_000, 10_000);
        assert_eq!(
            policy_of(tid),
            Some(SCHED_IDLE),
            "a fifth of the queue: still idle"
        );
        class.adjust(2_500, 10_000);
        assert_eq!(policy_of(tid), Some(SCHED_OTHER), "a quarter: normal");
        assert!(!class.is_idle());
        class.adjust(1_000, 10_000);
        assert_eq!(
            policy_of(tid),
            Some(SCHED_OTHER),
            "hysteresis: stays normal"
        );
        class.adjust(600, 10_000);
        assert_eq!(
            policy_of(tid),
            Some(SCHED_IDLE),
            "below a sixteenth: idle again"
        );
        stop_tx.send(()).ok();
        writer.join().ok();
    }
}
