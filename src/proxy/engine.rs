//! The one attempt engine: candidates in order, one attempt each (more with `retries`), each
//! outcome put to [`policy::decide`], until one answers or none is left.
//!
//! Every way the gateway asks upstreams goes through [`run`]: an HTTP request, the continuation
//! of a broken stream (see the rescue guide, "Resume"), a rebuilt Responses chain (see the
//! affinity guide) and a WebSocket handshake. What differs is only how one attempt is made and
//! what counts as its answer, which an [`Attempter`] says; so `retries`, `Retry-After`,
//! `deadline`, sticky ordering and which failures count for health apply to each the same way.
//! The engine performs I/O and the decisions; the decisions themselves are the table in
//! `policy`, and every failure is reported once, to the request's [`Accounts`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Upstream;
use crate::failure::FailKind;
pub use crate::ledger::Accounts;
use crate::ledger::AttemptFailure;
use crate::policy::{self, Budget, Counts, Next, Outcome, Pin};
use crate::registry::RegistryView;

use super::rescue;

/// One attempt's result, classified for the policy, with its answer when it gave one.
pub struct Tried<A> {
    /// What the policy weighs.
    pub outcome: Outcome,
    /// The upstream's answer, when it gave one.
    pub answer: Option<A>,
    /// Failure class (for an answer: `Http`).
    pub kind: FailKind,
    /// The upstream's status, when it answered with one.
    pub status: Option<u16>,
    /// `reason` of the record, the log and the all-failed answer (may hold upstream text).
    pub reason: String,
    /// The gateway's own description of a failure, for the status page and spans (never
    /// upstream text, see the security guide).
    pub public: String,
    /// Attempt start to the response head (and first event, for streams).
    pub first_byte: Duration,
}

impl<A> Tried<A> {
    /// An attempt that failed without an answer.
    pub fn failed(kind: FailKind, outcome: Outcome, reason: String, public: String) -> Self {
        Tried {
            outcome,
            answer: None,
            kind,
            status: None,
            reason,
            public,
            first_byte: Duration::ZERO,
        }
    }

    /// The attempt's failure as the accounts take it.
    pub fn failure(
        &self,
        moving_on: bool,
        counts: Counts,
        cooldown: Option<Duration>,
    ) -> AttemptFailure {
        AttemptFailure {
            moving_on,
            counts,
            cooldown,
            public: self.public.clone(),
            ..AttemptFailure::new(self.kind, self.status, self.reason.clone())
        }
    }
}

/// What one attempt is told.
pub struct Attempt<'a> {
    /// The upstream asked.
    pub up: &'a Upstream,
    /// Its index in the view.
    pub idx: usize,
    /// Its position among the candidates.
    pub pos: usize,
    /// No candidate follows.
    pub last: bool,
    /// How long it may wait for its first byte (the deadline applied).
    pub wait: Duration,
    /// What the request's references make of it.
    pub pin: Pin,
}

/// How one kind of request asks an upstream (see the module docs).
#[allow(async_fn_in_trait)] // used generically, never as a trait object
pub trait Attempter<L: Accounts> {
    /// An answer to take or relay.
    type Answer;

    /// How long `up` may wait for its first byte when `last` (before the deadline cut).
    fn wait(&self, up: &Upstream, last: bool, acct: &L) -> Duration;

    /// What the request's references make of candidate `pos`.
    fn pin(&self, _pos: usize) -> Pin {
        Pin::Free
    }

    /// One attempt.
    async fn attempt(&mut self, a: Attempt<'_>, acct: &mut L) -> Tried<Self::Answer>;

    /// The owner lost the object and the chain is held: from candidate `pos` on, the rebuilt
    /// request is sent. False when there is none (the owner's answer is then relayed).
    fn rebuild_from(&mut self, _pos: usize, _acct: &mut L) -> bool {
        false
    }
}

/// The candidates a run goes through, and what bounds it.
pub struct Run<'a> {
    /// The registry view the candidates come from.
    pub view: &'a Arc<RegistryView>,
    /// Upstream indices in order.
    pub order: &'a [usize],
    /// When the request's `deadline` runs out (before its first byte), if it has one.
    pub deadline: Option<Instant>,
    /// The client already has part of the answer (a continuation): only a 2xx takes over.
    pub committed: bool,
    /// `retry_after_max`.
    pub retry_after_max: Duration,
}

/// How a run ended.
pub enum Ended<A> {
    /// This attempt's answer goes to the client: `next` is [`Next::Relay`],
    /// [`Next::RelayFailure`] or [`Next::RelayNotHere`].
    Answer {
        /// Its position among the candidates.
        pos: usize,
        /// The upstream's index in the view.
        idx: usize,
        /// The attempt.
        tried: Tried<A>,
        /// The decision that relays it.
        next: Next,
    },
    /// The owner of the request's objects failed, and nothing else has them (its failure is
    /// accounted for).
    OwnerFailed,
    /// Every candidate failed without an answer to relay (each failure accounted for).
    AllFailed {
        /// The deadline ran out, or the last failure was a timeout.
        timed_out: bool,
    },
}

/// Runs the attempts; see the module docs.
pub async fn run<L: Accounts, A: Attempter<L>>(
    run: Run<'_>,
    attempter: &mut A,
    acct: &mut L,
) -> Ended<A::Answer> {
    let view = run.view;
    let cfg = &view.config;
    let mut last_kind = None;
    let mut pos = 0;
    while let Some(&idx) = run.order.get(pos) {
        let Some(up) = cfg.upstreams.get(idx) else {
            pos += 1;
            continue;
        };
        let last = pos + 1 == run.order.len();
        let mut tries = 0u32;
        loop {
            let left = time_left(run.deadline);
            let Some(wait) = policy::attempt_wait(attempter.wait(up, last, acct), left) else {
                return Ended::AllFailed { timed_out: true };
            };
            let pin = attempter.pin(pos);
            let a = Attempt {
                up,
                idx,
                pos,
                last,
                wait,
                pin,
            };
            let tried = attempter.attempt(a, acct).await;
            let budget = Budget {
                tries,
                retries: up.retries,
                half_open: view.half_open(idx),
                at_threshold: view.at_threshold(idx),
                last,
                time_left: time_left(run.deadline),
                retry_after_max: run.retry_after_max,
                pin,
                committed: run.committed,
            };
            let next = policy::decide(&tried.outcome, &budget, rescue::backoff(tries));
            match next {
                Next::Relay | Next::RelayFailure { .. } | Next::RelayNotHere => {
                    if next == Next::RelayNotHere {
                        acct.affinity("not_here");
                    }
                    return Ended::Answer {
                        pos,
                        idx,
                        tried,
                        next,
                    };
                }
                Next::Retry {
                    pause,
                    cooldown,
                    counts,
                } => {
                    acct.failed(view, idx, tried.failure(false, counts, cooldown));
                    acct.retrying(view, idx);
                    // A client that goes away while we wait drops this future: the wait ends
                    // with it.
                    actix_rt::time::sleep(pause).await;
                    tries += 1;
                }
                Next::NotHere => {
                    acct.affinity("not_here");
                    acct.failed(view, idx, tried.failure(false, Counts::Record, None));
                    break;
                }
                Next::Rebuild => {
                    acct.failed(view, idx, tried.failure(false, Counts::Record, None));
                    if !attempter.rebuild_from(pos, acct) {
                        // Nothing to rebuild after all: the owner's answer is the answer.
                        return Ended::Answer {
                            pos,
                            idx,
                            tried,
                            next: Next::Relay,
                        };
                    }
                    // Not a retry: the same upstream is asked again with another request.
                }
                Next::OwnerFailed { cooldown, counts } => {
                    acct.failed(view, idx, tried.failure(false, counts, cooldown));
                    return Ended::OwnerFailed;
                }
                Next::MoveOn { cooldown, counts } => {
                    last_kind = Some(tried.kind);
                    acct.failed(view, idx, tried.failure(!last, counts, cooldown));
                    break;
                }
            }
        }
        pos += 1;
    }
    Ended::AllFailed {
        timed_out: last_kind == Some(FailKind::Timeout),
    }
}

/// What is left of the request's `deadline`, if it has one.
pub fn time_left(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}
