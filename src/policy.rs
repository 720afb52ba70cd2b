//! The attempt policy (see the rescue guide, "How failover and cooldown decide" and "When an
//! upstream breaks a stream"): after each upstream attempt, what happens next — relay this
//! answer, try the same upstream again (now or after a pause), move on to the next candidate, or
//! give up — decided in one pure function, [`decide`], over the attempt's classified [`Outcome`]
//! and the request's [`Budget`].
//!
//! Deciding and doing are kept apart on purpose: the attempt loop in `proxy` only performs I/O
//! and executes the [`Next`] it is given, so every rule of the rescue guide is a row of the table
//! test below rather than a branch hidden between awaits (linkerd2-proxy's `classify` is the
//! model: an answer is classified once, and retries, health and metrics all read that class). New
//! rules (broken streams of the rescue guide's "Truthful ends (0.3)", the affinity guide's owners
//! and "not here") are new inputs and rows, not new branches.
//!
//! A leaf module: it imports nothing of the gateway's, so anything may import it.

use std::time::Duration;

/// The longest cooldown a `Retry-After` can set (3600 s: see the rescue guide, "When an upstream
/// breaks a stream").
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// One attempt's result, classified once: the facts the rules need, no I/O handles.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The upstream answered with a status (for streams: head and first chunk arrived).
    Answered {
        /// The status of the head.
        status: u16,
        /// A 400 whose `error.code` (else `error.type`) is one of `failover_codes`.
        failover_code: bool,
        /// A usable `Retry-After` of a 429 or 503.
        retry_after: Option<Duration>,
        /// The answer says the object is not there ("not here" in the affinity guide): a 404, or
        /// a 400 whose `error.code` ends in `_not_found`.
        not_found: bool,
    },
    /// No usable head: connection or TLS error, a connection closed before the head, an
    /// ambiguous head, a stream broken or in-band error before its first event.
    Failed {
        /// A connection closed or reset before complete headers: the same upstream may be
        /// tried again. Never a refused connection or a timeout.
        retry_same: bool,
    },
    /// No head (or no first chunk, for a stream) within the attempt's wait.
    TimedOut,
}

/// Who hears of a failed attempt (see the rescue guide, "Which failures count (0.4)").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counts {
    /// It says something about the upstream itself (connection and TLS errors, timeouts, broken
    /// streams and in-band errors, 5xx, 429, 401, 403): health (cooldown, `upstream_healthy`,
    /// alerts), `upstream_requests_total` and the record.
    Health,
    /// It is about the request (404, 408, 409: an unknown model, a deleted object, a conflict):
    /// `upstream_requests_total` (`http_error`) and the record, never health. So no client can
    /// push an upstream out of everyone's order with requests the upstream rightly refuses.
    Request,
    /// The record only: a 400 failed over by `failover_codes`, a prefill the upstream rejected,
    /// an object that is "not here".
    Record,
}

/// Who hears of an attempt with this `outcome`, when it is a failure.
pub fn counts_of(outcome: &Outcome) -> Counts {
    match *outcome {
        Outcome::Answered {
            failover_code: true,
            ..
        } => Counts::Record,
        Outcome::Answered { status, .. } if counts_for_health(status) => Counts::Health,
        Outcome::Answered { .. } => Counts::Request,
        Outcome::Failed { .. } | Outcome::TimedOut => Counts::Health,
    }
}

/// Statuses that say something about the upstream itself.
pub fn counts_for_health(status: u16) -> bool {
    matches!(status, 401 | 403 | 429) || (500..600).contains(&status)
}

/// What the request may still spend when an attempt has come back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Same-upstream retries already made on this upstream.
    pub tries: u32,
    /// The upstream's `retries` setting.
    pub retries: u32,
    /// The attempt was a half-open probe (its cooldown just ran out): never retried there.
    pub half_open: bool,
    /// A failure that counts would reach `cooldown.failures` now: no retry on an upstream a
    /// cooldown just started for.
    pub at_threshold: bool,
    /// No candidate follows this one.
    pub last: bool,
    /// What is left before the `deadline`, when the request has one.
    pub time_left: Option<Duration>,
    /// `retry_after_max`: a longer `Retry-After` moves on instead of waiting.
    pub retry_after_max: Duration,
    /// What the request's references make of this candidate (see the affinity guide).
    pub pin: Pin,
    /// The client already has part of the answer (a continuation of a broken stream): only a 2xx
    /// can take over, anything else moves on.
    pub committed: bool,
}

/// What the objects a request refers to make of one candidate (see the affinity guide).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pin {
    /// No object, or a candidate after the owner (a rebuilt chain): the rescue guide's rules.
    #[default]
    Free,
    /// This candidate owns the request's objects.
    Owner {
        /// Nothing may follow it (no rebuilt chain): its failure is the answer, named as the
        /// owner's.
        alone: bool,
        /// The chain the request continues can be rebuilt: when the owner says it lost the
        /// object, the rebuilt request goes to it first.
        rebuild: bool,
    },
    /// The request names only objects the gateway has not seen answered: "not found" means
    /// "not here", and the next candidate is tried without a health penalty.
    Unknown,
}

/// What the attempt loop does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// This is the answer: relay it (a success, a status that is never failed over, or the
    /// owner's own "not found").
    Relay,
    /// The last candidate's failure is the answer: relay it as a failure. `cooldown` is the
    /// `Retry-After` it announced.
    RelayFailure {
        /// Cooldown to start from the announced `Retry-After`.
        cooldown: Option<Duration>,
        /// Who hears of the failure.
        counts: Counts,
    },
    /// Count the failure, pause, and send the same request to the same upstream again.
    Retry {
        /// How long to wait first.
        pause: Duration,
        /// Cooldown to start from the announced `Retry-After` (it is waited out here).
        cooldown: Option<Duration>,
        /// Who hears of the failure.
        counts: Counts,
    },
    /// "Not here": the candidate does not have the object. Kept in the record only, and the next
    /// candidate is tried.
    NotHere,
    /// "Not here": the last candidate does not have the object either: its answer is relayed,
    /// without a health penalty.
    RelayNotHere,
    /// The owner of the request's objects failed and nothing else has them: count the failure and
    /// answer with it, naming the object and its owner.
    OwnerFailed {
        /// Cooldown to start from the announced `Retry-After`.
        cooldown: Option<Duration>,
        /// Who hears of the failure.
        counts: Counts,
    },
    /// The owner is up but lost the object, and the chain is held: send the rebuilt chain
    /// to the same upstream now (not a retry: no `retries` spent), then to the next candidates.
    Rebuild,
    /// Count the failure and go on with the next candidate (or, after the last one, give the
    /// all-failed answer).
    MoveOn {
        /// Cooldown to start from the announced `Retry-After`.
        cooldown: Option<Duration>,
        /// Who hears of the failure.
        counts: Counts,
    },
}

/// Statuses after which the next upstream is tried (see the rescue guide, "How failover and
/// cooldown decide").
pub fn is_failover_status(status: u16) -> bool {
    matches!(status, 401 | 403 | 404 | 408 | 409 | 429) || (500..600).contains(&status)
}

/// Statuses after which the same upstream may be asked again (`retries`): 5xx, 408, 409,
/// 429 — never 401, 403 or 404 (a wrong upstream stays so).
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 409 | 429) || (500..600).contains(&status)
}

/// Whether a 400 of this attempt must be read to look for a `failover_codes` value: only when
/// another candidate could take it and codes are configured (reading costs a round of I/O).
pub fn wants_400_body(status: u16, last: bool, has_codes: bool) -> bool {
    status == 400 && !last && has_codes
}

/// Whether an attempt's 400 must be read under `pin`: for `failover_codes` (above), or for a
/// `*_not_found` code when "not here" or the owner's own "not found" applies (see the affinity
/// guide).
pub fn wants_400_body_pinned(status: u16, last: bool, has_codes: bool, pin: Pin) -> bool {
    let not_found_matters = match pin {
        Pin::Unknown => !last,
        Pin::Owner { rebuild, .. } => rebuild,
        Pin::Free => false,
    };
    status == 400 && (not_found_matters || (!last && has_codes))
}

/// What a relayed last failure tells the client's SDK (see the rescue guide, "A client's own
/// retry where it helps (0.4)"): whether to retry, and after how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClientRetry {
    /// `x-should-retry: false`: every candidate was tried; a retry would only start them over.
    No,
    /// `x-should-retry: true` with a `Retry-After`: the upstream's own (whole seconds), else the
    /// first cooldown's end, else 1 (never less than 1).
    After(Option<u32>),
}

/// The rule for a relayed last failure of `status` whose upstream sent `retry_after` seconds:
/// a 429, 503 or 408 is retried as it would be against the upstream directly; nothing else is.
pub fn client_retry(status: u16, retry_after: Option<f64>) -> ClientRetry {
    match status {
        429 | 503 | 408 => ClientRetry::After(
            retry_after
                .filter(|s| s.is_finite())
                .map(|s| s.ceil().clamp(1.0, f64::from(u32::MAX)) as u32),
        ),
        _ => ClientRetry::No,
    }
}

/// How long the next attempt may wait for its first byte: its own wait cut to what is left of
/// the deadline; `None` when nothing is left (the all-failed answer is due: `deadline` in the
/// rescue guide).
pub fn attempt_wait(wait: Duration, time_left: Option<Duration>) -> Option<Duration> {
    match time_left {
        Some(left) if left.is_zero() => None,
        Some(left) => Some(wait.min(left)),
        None => Some(wait),
    }
}

/// The decision table: what follows an attempt's `outcome` under `budget`. `backoff` is the
/// pause a retry without a usable `Retry-After` takes (250 ms × 2ⁿ ± 20 %, computed by the
/// caller so that this function stays pure).
pub fn decide(outcome: &Outcome, budget: &Budget, backoff: Duration) -> Next {
    let next = decide_pinned(outcome, budget, backoff);
    if !budget.committed {
        return next;
    }
    // A continuation: the client has part of the answer, so only a 2xx can take over.
    let success =
        matches!(outcome, Outcome::Answered { status, .. } if (200..300).contains(status));
    let counts = counts_of(outcome);
    match next {
        Next::Relay if success => Next::Relay,
        Next::Relay | Next::RelayNotHere | Next::NotHere | Next::Rebuild => Next::MoveOn {
            cooldown: None,
            counts: if matches!(next, Next::Relay) {
                counts
            } else {
                Counts::Record
            },
        },
        Next::RelayFailure { cooldown, counts } | Next::OwnerFailed { cooldown, counts } => {
            Next::MoveOn { cooldown, counts }
        }
        other => other,
    }
}

/// The rows of the affinity guide (owners and "not here") before those of the rescue guide.
fn decide_pinned(outcome: &Outcome, budget: &Budget, backoff: Duration) -> Next {
    let not_found = matches!(
        outcome,
        Outcome::Answered {
            not_found: true,
            ..
        }
    );
    match budget.pin {
        // "Not here" moves on quietly; from the last candidate it is the answer.
        Pin::Unknown if not_found => {
            if budget.last {
                Next::RelayNotHere
            } else {
                Next::NotHere
            }
        }
        // 0.4: the owner's "not found" is an answer — or, when its chain is held, the
        // rebuilt chain goes to it first.
        Pin::Owner { rebuild: true, .. } if not_found => Next::Rebuild,
        Pin::Owner { .. } if not_found => Next::Relay,
        // The owner's failure is the answer (a retry on the owner is still a retry).
        Pin::Owner { alone: true, .. } => match decide_free(outcome, budget, backoff) {
            Next::RelayFailure { cooldown, counts } | Next::MoveOn { cooldown, counts } => {
                Next::OwnerFailed { cooldown, counts }
            }
            next => next,
        },
        _ => decide_free(outcome, budget, backoff),
    }
}

/// The rules of the rescue guide, for a request whose objects do not pin it.
fn decide_free(outcome: &Outcome, budget: &Budget, backoff: Duration) -> Next {
    let counts = counts_of(outcome);
    // A pause is taken only when a retry is allowed and the deadline leaves time after it.
    let retry_in = |pause: Duration, retryable: bool| {
        let fits = budget.time_left.is_none_or(|left| left > pause);
        let cooling = budget.at_threshold && counts == Counts::Health;
        let allowed = retryable && budget.tries < budget.retries && !budget.half_open;
        (allowed && !cooling && fits).then_some(pause)
    };
    match *outcome {
        Outcome::Answered {
            failover_code: true,
            ..
        } if !budget.last => Next::MoveOn {
            cooldown: None,
            counts: Counts::Record,
        },
        Outcome::Answered { status, .. } if !is_failover_status(status) => Next::Relay,
        Outcome::Answered {
            status,
            retry_after,
            ..
        } => {
            let cooldown = retry_after.map(|d| d.min(MAX_RETRY_AFTER));
            let pause = match retry_after {
                Some(d) if d <= budget.retry_after_max => Some(d),
                Some(_) => None,
                None => Some(backoff),
            };
            match pause.and_then(|p| retry_in(p, is_retryable_status(status))) {
                Some(pause) => Next::Retry {
                    pause,
                    cooldown,
                    counts,
                },
                None if budget.last => Next::RelayFailure { cooldown, counts },
                None => Next::MoveOn { cooldown, counts },
            }
        }
        Outcome::Failed { retry_same, .. } => match retry_in(backoff, retry_same) {
            Some(pause) => Next::Retry {
                pause,
                cooldown: None,
                counts,
            },
            None => Next::MoveOn {
                cooldown: None,
                counts,
            },
        },
        Outcome::TimedOut => Next::MoveOn {
            cooldown: None,
            counts,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Duration = Duration::from_millis(250);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A fresh budget: one retry allowed, another candidate follows, no deadline.
    fn budget() -> Budget {
        Budget {
            tries: 0,
            retries: 1,
            half_open: false,
            at_threshold: false,
            last: false,
            time_left: None,
            retry_after_max: secs(5),
            pin: Pin::Free,
            committed: false,
        }
    }

    fn status(status: u16) -> Outcome {
        Outcome::Answered {
            status,
            failover_code: false,
            retry_after: None,
            not_found: status == 404,
        }
    }

    /// A 400 whose `error.code` ends in `_not_found`.
    fn not_found_400() -> Outcome {
        Outcome::Answered {
            status: 400,
            failover_code: false,
            retry_after: None,
            not_found: true,
        }
    }

    fn pinned(pin: Pin, b: Budget) -> Budget {
        Budget { pin, ..b }
    }

    const OWNER: Pin = Pin::Owner {
        alone: true,
        rebuild: false,
    };
    const OWNER_REBUILDS: Pin = Pin::Owner {
        alone: false,
        rebuild: true,
    };
    const OWNER_THEN_REBUILT: Pin = Pin::Owner {
        alone: false,
        rebuild: false,
    };

    fn status_after(status: u16, after: u64) -> Outcome {
        Outcome::Answered {
            status,
            failover_code: false,
            retry_after: Some(secs(after)),
            not_found: false,
        }
    }

    fn code_400() -> Outcome {
        Outcome::Answered {
            status: 400,
            failover_code: true,
            retry_after: None,
            not_found: false,
        }
    }

    /// A failure without a head; `retry_same` when it closed before the head.
    fn failed(retry_same: bool) -> Outcome {
        Outcome::Failed { retry_same }
    }

    fn move_on() -> Next {
        Next::MoveOn {
            cooldown: None,
            counts: Counts::Health,
        }
    }

    /// Moves on without a health event (404, 408, 409: about the request, 0.4).
    fn move_on_request() -> Next {
        Next::MoveOn {
            cooldown: None,
            counts: Counts::Request,
        }
    }

    fn relay_failure(counts: Counts) -> Next {
        Next::RelayFailure {
            cooldown: None,
            counts,
        }
    }

    fn retry(pause: Duration) -> Next {
        Next::Retry {
            pause,
            cooldown: None,
            counts: Counts::Health,
        }
    }

    fn retry_request(pause: Duration) -> Next {
        Next::Retry {
            pause,
            cooldown: None,
            counts: Counts::Request,
        }
    }

    fn owner_failed(cooldown: Option<Duration>) -> Next {
        Next::OwnerFailed {
            cooldown,
            counts: Counts::Health,
        }
    }

    fn no_retries(b: Budget) -> Budget {
        Budget { retries: 0, ..b }
    }

    fn last(b: Budget) -> Budget {
        Budget { last: true, ..b }
    }

    fn committed(b: Budget) -> Budget {
        Budget {
            committed: true,
            ..b
        }
    }

    /// One row per rule of the rescue guide ("How failover and cooldown decide" with "Which
    /// failures count (0.4)", "When an upstream breaks a stream", "Truthful ends (0.3)") and of
    /// the affinity guide.
    #[test]
    fn every_rule_is_a_row() {
        let b = budget();
        let h = Counts::Health;
        #[rustfmt::skip]
        let rows: Vec<(&str, Outcome, Budget, Next)> = vec![
            // Failover: the answer is relayed as is for 2xx, 3xx, 400, 413, 422 and other 4xx.
            ("2xx is the answer", status(200), b, Next::Relay),
            ("201 is the answer", status(201), b, Next::Relay),
            ("3xx is the answer", status(302), b, Next::Relay),
            ("400 is the answer", status(400), b, Next::Relay),
            ("413 is the answer", status(413), b, Next::Relay),
            ("422 is the answer", status(422), b, Next::Relay),
            ("418 is the answer", status(418), b, Next::Relay),
            ("400 on the last candidate is the answer", status(400), last(b), Next::Relay),
            // Failover: failover statuses move on (no retries configured) ...
            ("401 fails over", status(401), no_retries(b), move_on()),
            ("403 fails over", status(403), no_retries(b), move_on()),
            ("429 fails over", status(429), no_retries(b), move_on()),
            ("500 fails over", status(500), no_retries(b), move_on()),
            ("503 fails over", status(503), no_retries(b), move_on()),
            ("599 fails over", status(599), no_retries(b), move_on()),
            // ... (0.4) 404, 408 and 409 too, but they are about the request: never health.
            ("404 fails over, not counted for health", status(404), no_retries(b), move_on_request()),
            ("408 fails over, not counted for health", status(408), no_retries(b), move_on_request()),
            ("409 fails over, not counted for health", status(409), no_retries(b), move_on_request()),
            ("last 404 relayed as sent, not counted for health", status(404), last(b), relay_failure(Counts::Request)),
            ("last 409 relayed, not counted for health", status(409), last(no_retries(b)), relay_failure(Counts::Request)),
            // Failover: the last candidate's HTTP failure is relayed.
            ("last 500 is relayed", status(500), last(no_retries(b)), relay_failure(h)),
            ("last 401 is relayed", status(401), last(b), relay_failure(h)),
            // Failover: connect errors and timeouts move on; after the last, the all-failed answer.
            ("connect error moves on", failed(false), no_retries(b), move_on()),
            ("timeout moves on", Outcome::TimedOut, b, move_on()),
            ("last timeout gives up", Outcome::TimedOut, last(b), move_on()),
            ("last refused gives up", failed(false), last(b), move_on()),
            ("in-band error moves on", failed(false), b, move_on()),
            // `retries`: 5xx, 408, 409, 429, closed before the head are retried with backoff.
            ("500 retried", status(500), b, retry(B)),
            ("502 retried", status(502), b, retry(B)),
            ("408 retried", status(408), b, retry_request(B)),
            ("409 retried", status(409), b, retry_request(B)),
            ("429 retried", status(429), b, retry(B)),
            ("closed before head retried", failed(true), b, retry(B)),
            ("last candidate retried too", status(500), last(b), retry(B)),
            // `retries`: never after a timeout, a refused connection, 401, 403, 404.
            ("timeout never retried", Outcome::TimedOut, b, move_on()),
            ("refused never retried", failed(false), b, move_on()),
            ("401 never retried", status(401), b, move_on()),
            ("403 never retried", status(403), b, move_on()),
            ("404 never retried", status(404), b, move_on_request()),
            // `retries` run out.
            ("retries used up", status(500), Budget { tries: 1, ..b }, move_on()),
            ("retries used up on last", status(500), last(Budget { tries: 1, ..b }), relay_failure(h)),
            ("2 of 3 retries used", status(500), Budget { tries: 2, retries: 3, ..b }, retry(B)),
            // `retries`: none on a half-open probe or when a cooldown just started.
            ("no retry when half-open", status(500), Budget { half_open: true, ..b }, move_on()),
            ("no retry of a closed connection half-open", failed(true), Budget { half_open: true, ..b }, move_on()),
            ("no retry when a cooldown starts", status(500), Budget { at_threshold: true, ..b }, move_on()),
            ("409 retried although a counted failure would start a cooldown", status(409), Budget { at_threshold: true, ..b }, retry_request(B)),
            // Retry-After: ≤ retry_after_max is waited out (and is a cooldown) ...
            ("429 Retry-After 2 waited", status_after(429, 2), b, Next::Retry { pause: secs(2), cooldown: Some(secs(2)), counts: h }),
            ("503 Retry-After 5 waited", status_after(503, 5), b, Next::Retry { pause: secs(5), cooldown: Some(secs(5)), counts: h }),
            // ... a longer one moves on at once, still a cooldown ...
            ("429 Retry-After 6 moves on", status_after(429, 6), b, Next::MoveOn { cooldown: Some(secs(6)), counts: h }),
            // ... capped at an hour ...
            ("Retry-After capped at 3600", status_after(429, 7200), b, Next::MoveOn { cooldown: Some(MAX_RETRY_AFTER), counts: h }),
            // ... and a cooldown whatever `retries` says.
            ("Retry-After without retries", status_after(429, 2), no_retries(b), Next::MoveOn { cooldown: Some(secs(2)), counts: h }),
            ("Retry-After on last relayed", status_after(503, 2), last(no_retries(b)), Next::RelayFailure { cooldown: Some(secs(2)), counts: h }),
            // `failover_codes`: a 400 with a listed code moves on quietly, unless nothing follows.
            ("failover code moves on quietly", code_400(), b, Next::MoveOn { cooldown: None, counts: Counts::Record }),
            ("failover code on last is relayed", code_400(), last(b), Next::Relay),
            // `deadline`: a pause that does not fit before the deadline is not taken.
            ("backoff past deadline moves on", status(500), Budget { time_left: Some(Duration::from_millis(200)), ..b }, move_on()),
            ("backoff within deadline retried", status(500), Budget { time_left: Some(secs(1)), ..b }, retry(B)),
            ("Retry-After past deadline moves on", status_after(429, 2), Budget { time_left: Some(secs(1)), ..b }, Next::MoveOn { cooldown: Some(secs(2)), counts: h }),
            ("Retry-After past deadline on last relayed", status_after(429, 2), last(Budget { time_left: Some(secs(1)), ..b }), Next::RelayFailure { cooldown: Some(secs(2)), counts: h }),
            // `resume` (and broken ends): a continuation takes only a 2xx, retries as any attempt.
            ("continuation 2xx takes over", status(200), committed(b), Next::Relay),
            ("continuation 400 moves on", status(400), committed(b), Next::MoveOn { cooldown: None, counts: Counts::Request }),
            ("continuation 500 retried", status(500), committed(b), retry(B)),
            ("continuation last 500 moves on", status(500), committed(last(no_retries(b))), move_on()),
            ("continuation Retry-After waited", status_after(429, 1), committed(b), Next::Retry { pause: secs(1), cooldown: Some(secs(1)), counts: h }),
            ("continuation last 404 moves on", status(404), committed(last(b)), move_on_request()),
            // Affinity: a request naming only unseen objects: "not found" is "not here".
            ("404 is not here", status(404), pinned(Pin::Unknown, b), Next::NotHere),
            ("400 *_not_found is not here", not_found_400(), pinned(Pin::Unknown, b), Next::NotHere),
            ("not here on last is the answer", status(404), last(pinned(Pin::Unknown, b)), Next::RelayNotHere),
            ("400 *_not_found on last is the answer", not_found_400(), last(pinned(Pin::Unknown, b)), Next::RelayNotHere),
            ("unseen objects: other failures as before", status(503), pinned(Pin::Unknown, no_retries(b)), move_on()),
            ("unseen objects: 2xx relayed", status(200), pinned(Pin::Unknown, b), Next::Relay),
            ("without objects a 400 *_not_found is the answer", not_found_400(), b, Next::Relay),
            // Affinity: the owner only: its failure is the answer; retries still apply.
            ("owner 503 is the owner's failure", status(503), last(pinned(OWNER, no_retries(b))), owner_failed(None)),
            ("owner timeout is the owner's failure", Outcome::TimedOut, last(pinned(OWNER, b)), owner_failed(None)),
            ("owner refused is the owner's failure", failed(false), last(pinned(OWNER, b)), owner_failed(None)),
            ("owner 500 retried", status(500), last(pinned(OWNER, b)), retry(B)),
            ("owner Retry-After kept", status_after(429, 9), last(pinned(OWNER, b)), owner_failed(Some(secs(9)))),
            ("owner 2xx relayed", status(200), last(pinned(OWNER, b)), Next::Relay),
            ("owner 400 relayed", status(400), last(pinned(OWNER, b)), Next::Relay),
            // Affinity (0.4): the owner's "not found" is its answer, relayed as sent ...
            ("owner 404 is its answer", status(404), last(pinned(OWNER, b)), Next::Relay),
            ("owner 400 *_not_found is its answer", not_found_400(), last(pinned(OWNER, b)), Next::Relay),
            // ... unless the chain is held: then it gets the rebuilt chain first.
            ("owner lost a held chain: rebuilt there", status(404), pinned(OWNER_REBUILDS, b), Next::Rebuild),
            ("owner lost a held chain (400): rebuilt there", not_found_400(), pinned(OWNER_REBUILDS, b), Next::Rebuild),
            ("owner failing with a rebuild to follow moves on", status(503), pinned(OWNER_REBUILDS, no_retries(b)), move_on()),
            ("owner without rebuild but candidates after it", status(503), pinned(OWNER_THEN_REBUILT, no_retries(b)), move_on()),
        ];
        for (name, outcome, budget, want) in rows {
            assert_eq!(decide(&outcome, &budget, B), want, "row: {name}");
        }
    }

    /// One SDK call through the gateway is retried as it would be against the upstream directly,
    /// and never more (see the rescue guide, "A client's own retry where it helps (0.4)").
    #[test]
    fn relayed_last_failures_tell_the_client_whether_to_retry() {
        #[rustfmt::skip]
        let rows: Vec<(&str, u16, Option<f64>, ClientRetry)> = vec![
            ("429 with its own Retry-After", 429, Some(2.0), ClientRetry::After(Some(2))),
            ("429 Retry-After rounded up", 429, Some(0.2), ClientRetry::After(Some(1))),
            ("429 Retry-After 0 is at least 1", 429, Some(0.0), ClientRetry::After(Some(1))),
            ("429 without: first cooldown end, else 1", 429, None, ClientRetry::After(None)),
            ("503 retried", 503, None, ClientRetry::After(None)),
            ("408 retried", 408, Some(3.0), ClientRetry::After(Some(3))),
            ("500 not retried", 500, None, ClientRetry::No),
            ("502 not retried", 502, None, ClientRetry::No),
            ("401 not retried", 401, None, ClientRetry::No),
            ("404 not retried", 404, None, ClientRetry::No),
            ("409 not retried", 409, None, ClientRetry::No),
        ];
        for (name, status, after, want) in rows {
            assert_eq!(client_retry(status, after), want, "row: {name}");
        }
    }

    #[test]
    fn the_deadline_cuts_each_wait_and_ends_the_attempts() {
        let w = secs(30);
        assert_eq!(attempt_wait(w, None), Some(w), "no deadline");
        assert_eq!(
            attempt_wait(w, Some(secs(3))),
            Some(secs(3)),
            "cut to what is left"
        );
        assert_eq!(
            attempt_wait(secs(1), Some(secs(3))),
            Some(secs(1)),
            "own wait is shorter"
        );
        assert_eq!(
            attempt_wait(w, Some(Duration::ZERO)),
            None,
            "nothing left: all-failed"
        );
    }

    #[test]
    fn a_400_is_read_only_when_it_could_fail_over() {
        assert!(wants_400_body(400, false, true));
        assert!(
            !wants_400_body(400, true, true),
            "last candidate: relayed as is"
        );
        assert!(!wants_400_body(400, false, false), "no failover_codes");
        assert!(!wants_400_body(422, false, true));
        assert!(wants_400_body_pinned(400, false, false, Pin::Unknown));
        assert!(!wants_400_body_pinned(400, true, false, Pin::Unknown));
        assert!(!wants_400_body_pinned(400, false, false, Pin::Free));
        assert!(wants_400_body_pinned(400, true, false, OWNER_REBUILDS));
        assert!(!wants_400_body_pinned(400, true, false, OWNER));
    }
}
