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

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How long the idle-class writer works between two offers of the CPU (see [`pause_point`]).
pub const PAUSE_EVERY: Duration = Duration::from_micros(20);

thread_local! {
    /// On the writer thread: its class, and when it last offered the CPU.
    static PACER: RefCell<Option<(Arc<WriterClass>, Cell<Instant>)>> = const { RefCell::new(None) };
}

/// Offers the CPU to any runnable normal thread if the calling thread is the idle-class writer
/// and has worked [`PAUSE_EVERY`] since its last offer; anywhere else it does nothing.
///
/// `SCHED_IDLE` alone does not keep the writer out of a request's way: a normal thread that
/// *wakes* preempts it at once, but one that is already runnable (a worker preempted by the
/// upstream it just wrote to, say) can see the scheduler pick the writer — EEVDF weighs the idle
/// class, it does not rank it below — and then waits for the next timer tick (4 ms at
/// `HZ=250`), since nothing else asks for the CPU in between. Profiled in the benchmarks guide.
/// The writer therefore offers the CPU (`sched_yield`, which under EEVDF pushes the yielding
/// thread's deadline back) every [`PAUSE_EVERY`] of its work: from SQLite's progress handler,
/// between rows, and between the records it frees. The offer costs one syscall when nothing
/// else is runnable. A promoted writer (backlog long) does not offer: it must catch up.
pub fn pause_point() {
    PACER.with(|p| {
        let p = p.borrow();
        let Some((class, last)) = p.as_ref() else {
            return;
        };
        if !class.idle.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        if now.duration_since(last.get()) >= PAUSE_EVERY {
            std::thread::yield_now();
            last.set(Instant::now());
        }
    });
}

/// Whether the calling thread is the writer and idle-class now: it writes in short
/// transactions, so that a commit is never a long stretch without a [`pause_point`].
pub fn paced() -> bool {
    PACER.with(|p| {
        p.borrow()
            .as_ref()
            .is_some_and(|(class, _)| class.idle.load(Ordering::Relaxed))
    })
}

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
    /// The writer's class, switchable where [`can_switch`] says this process may.
    pub fn probe() -> WriterClass {
        let switchable = can_switch();
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

    /// A class like [`WriterClass::probe`]'s without its log line: the spool's ingester, whose
    /// process the writer's probe already reported on.
    pub fn probe_quietly() -> WriterClass {
        WriterClass {
            switchable: can_switch(),
            ..WriterClass::default()
        }
    }

    /// Called on a thread that must be idle-class whether or not it can be promoted (the
    /// spool's ingester): as [`WriterClass::enter`] where the class can switch; elsewhere it
    /// enters `SCHED_IDLE` for good (entering needs no privilege) and paces itself, and under
    /// full load the spool's bound makes the writer insert directly instead.
    pub fn enter_idle(self: &Arc<Self>) {
        if self.switchable {
            self.enter();
            return;
        }
        PACER.with(|p| *p.borrow_mut() = Some((self.clone(), Cell::new(Instant::now()))));
        if set_own(true) {
            self.idle.store(true, Ordering::Release);
        }
    }

    /// Called on the writer thread when it starts: remembers it and makes it idle-class.
    pub fn enter(self: &Arc<Self>) {
        if !self.switchable {
            return;
        }
        PACER.with(|p| *p.borrow_mut() = Some((self.clone(), Cell::new(Instant::now()))));
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
    /// Promotes the writer at once, between ticks: called by the request path when the queue
    /// reaches half its capacity, which at a high rate can happen before the next tick sees a
    /// starved idle-class writer's backlog. One syscall per crossing.
    pub fn promote(&self) {
        if self.switchable && self.idle.swap(false, Ordering::AcqRel) && !self.set_writer(false) {
            self.idle.store(true, Ordering::Release);
        }
    }

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

/// Whether this process may move a thread into `SCHED_IDLE` and back (root, `CAP_SYS_NICE` or
/// `RLIMIT_NICE` ≥ 20), tried on a throwaway thread so that a failed try leaves no thread stuck
/// in the idle class: the condition under which the writer is idle-class.
///
/// Probed once per process (the writer's class and the spool ingester's both ask): what the
/// process may do does not change while it runs.
pub fn can_switch() -> bool {
    static SWITCHABLE: OnceLock<bool> = OnceLock::new();
    *SWITCHABLE.get_or_init(|| {
        std::thread::Builder::new()
            .name("sched-probe".into())
            .spawn(|| set_own(true) && set_own(false))
            .ok()
            .and_then(|h| h.join().ok())
            .unwrap_or(false)
    })
}

/// Moves the calling thread into `SCHED_IDLE` for good (entering needs no privilege): for a
/// helper that must never take the CPU from a request and may be starved under full load.
pub fn enter_idle_class() {
    set_own(true);
}

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

    #[test]
    fn only_the_idle_class_writer_paces_itself_and_a_promotion_ends_it() {
        let class = std::sync::Arc::new(WriterClass::probe());
        let c = class.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn(move || {
            c.enter();
            let idle = paced();
            // A pause point on the writer never fails, whatever the class.
            pause_point();
            tx.send((idle, gettid())).ok();
            go_rx.recv().ok();
            paced()
        });
        let (idle_at_start, tid) = rx.recv().expect("writer started");
        // Any other thread: no pacing, ever.
        assert!(!paced());
        if !class.switchable {
            assert!(!idle_at_start, "a writer that cannot switch stays normal");
            go_tx.send(()).ok();
            assert!(!writer.join().unwrap_or(true));
            return;
        }
        assert!(idle_at_start, "idle-class at start, so paced");
        // The request path's promotion (the queue at half its capacity) acts at once.
        class.promote();
        assert_eq!(
            policy_of(tid.expect("tid")),
            Some(0),
            "promoted: SCHED_OTHER"
        );
        go_tx.send(()).ok();
        assert!(!writer.join().unwrap_or(true), "promoted: no pacing");
    }
}
