//! The attempt policy (SPEC §4 "Failover", 4a): after each upstream attempt, what happens next —
//! relay this answer, try the same upstream again (now or after a pause), move on to the next
//! candidate, or give up — decided in one pure function, [`decide`], over the attempt's
//! classified [`Outcome`] and the request's [`Budget`].
//!
//! Deciding and doing are kept apart on purpose: the attempt loop in `proxy` only performs I/O
//! and executes the [`Next`] it is given, so every rule of the SPEC is a row of the table test
//! below rather than a branch hidden between awaits (linkerd2-proxy's `classify` is the model: an
//! answer is classified once, and retries, health and metrics all read that class). New rules
//! (4e broken streams, 4f owners and "not here") are new inputs and rows, not new branches.
//!
//! A leaf module: it imports nothing of the gateway's, so anything may import it.

use std::time::Duration;

/// The longest cooldown a `Retry-After` can set (SPEC 4a: capped at 3600 s).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// One attempt's result, classified once: the facts the rules need, no I/O handles.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The upstream answered with a status (for streams: head and first chunk arrived).
    Answered {
        /// The status of the head.
        status: u16,
        /// A 400 whose `error.code` (else `error.type`) is one of `failover_codes` (4a).
        failover_code: bool,
        /// A usable `Retry-After` of a 429 or 503.
        retry_after: Option<Duration>,
        /// The answer says the object is not there (4f): a 404, or a 400 whose `error.code`
        /// ends in `_not_found`.
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

/// What the request may still spend when an attempt has come back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Same-upstream retries already made on this upstream.
    pub tries: u32,
    /// The upstream's `retries` setting.
    pub retries: u32,
    /// The registry allows a same-upstream retry: not a half-open probe, and this failure does
    /// not start a cooldown (4a).
    pub may_retry: bool,
    /// No candidate follows this one.
    pub last: bool,
    /// What is left before the `deadline`, when the request has one.
    pub time_left: Option<Duration>,
    /// `retry_after_max`: a longer `Retry-After` moves on instead of waiting.
    pub retry_after_max: Duration,
    /// What the request's references make of this candidate (4f).
    pub pin: Pin,
}

/// What the objects a request refers to make of one candidate (SPEC 4f).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pin {
    /// No object, or a candidate after the owner (a rebuilt chain): the rules of §4 and 4a.
    #[default]
    Free,
    /// This candidate owns the request's objects and nothing may follow it: its failure is the
    /// answer, named as the owner's.
    OwnerOnly,
    /// The request names only objects the gateway has not seen answered: "not found" means
    /// "not here", and the next candidate is tried without a health penalty.
    Unknown,
}

/// What the attempt loop does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// This is the answer: relay it (a success, or a status that is never failed over).
    Relay,
    /// The last candidate's failure is the answer: relay it as a failure. `cooldown` is the
    /// `Retry-After` it announced.
    RelayFailure {
        /// Cooldown to start from the announced `Retry-After`.
        cooldown: Option<Duration>,
    },
    /// Count the failure, pause, and send the same request to the same upstream again.
    Retry {
        /// How long to wait first.
        pause: Duration,
        /// Cooldown to start from the announced `Retry-After` (it is waited out here).
        cooldown: Option<Duration>,
    },
    /// 4f: the candidate does not have the object. Kept in the record only (no health event, no
    /// `upstream_requests_total` outcome), and the next candidate is tried.
    NotHere,
    /// 4f: the last candidate does not have the object either: its answer is relayed, without a
    /// health penalty.
    RelayNotHere,
    /// 4f: the owner of the request's objects failed and nothing else has them: count the failure
    /// and answer with it, naming the object and its owner.
    OwnerFailed {
        /// Cooldown to start from the announced `Retry-After`.
        cooldown: Option<Duration>,
    },
    /// Count the failure and go on with the next candidate (or, after the last one, give the
    /// all-failed answer).
    MoveOn {
        /// Kept in the record only: not a health event nor an `upstream_requests_total` outcome
        /// (a 400 failed over by `failover_codes`).
        quiet: bool,
        /// Cooldown to start from the announced `Retry-After`.
        cooldown: Option<Duration>,
    },
}

/// Statuses after which the next upstream is tried (SPEC §4).
pub fn is_failover_status(status: u16) -> bool {
    matches!(status, 401 | 403 | 404 | 408 | 409 | 429) || (500..600).contains(&status)
}

/// Statuses after which the same upstream may be asked again (4a `retries`): 5xx, 408, 409,
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
/// `*_not_found` code when "not here" applies (4f).
pub fn wants_400_body_pinned(status: u16, last: bool, has_codes: bool, pin: Pin) -> bool {
    wants_400_body(status, last, has_codes || pin == Pin::Unknown)
}

/// How long the next attempt may wait for its first byte: its own wait cut to what is left of
/// the deadline; `None` when nothing is left (the all-failed answer is due, SPEC 4a `deadline`).
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
    match (budget.pin, outcome) {
        // 4f: "not here" moves on quietly; from the last candidate it is the answer.
        (
            Pin::Unknown,
            Outcome::Answered {
                not_found: true, ..
            },
        ) => {
            if budget.last {
                Next::RelayNotHere
            } else {
                Next::NotHere
            }
        }
        // 4f: the owner's failure is the answer (a retry on the owner is still a retry).
        (Pin::OwnerOnly, _) => match decide_free(outcome, budget, backoff) {
            Next::RelayFailure { cooldown } | Next::MoveOn { cooldown, .. } => {
                Next::OwnerFailed { cooldown }
            }
            next => next,
        },
        _ => decide_free(outcome, budget, backoff),
    }
}

/// The rules of §4 and 4a, for a request whose objects do not pin it.
fn decide_free(outcome: &Outcome, budget: &Budget, backoff: Duration) -> Next {
    // A pause is taken only when a retry is allowed and the deadline leaves time after it.
    let retry_in = |pause: Duration, retryable: bool| {
        let fits = budget.time_left.is_none_or(|left| left > pause);
        (retryable && budget.tries < budget.retries && budget.may_retry && fits).then_some(pause)
    };
    match *outcome {
        Outcome::Answered {
            failover_code: true,
            ..
        } if !budget.last => Next::MoveOn {
            quiet: true,
            cooldown: None,
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
                Some(pause) => Next::Retry { pause, cooldown },
                None if budget.last => Next::RelayFailure { cooldown },
                None => Next::MoveOn {
                    quiet: false,
                    cooldown,
                },
            }
        }
        Outcome::Failed { retry_same, .. } => match retry_in(backoff, retry_same) {
            Some(pause) => Next::Retry {
                pause,
                cooldown: None,
            },
            None => Next::MoveOn {
                quiet: false,
                cooldown: None,
            },
        },
        Outcome::TimedOut => Next::MoveOn {
            quiet: false,
            cooldown: None,
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
            may_retry: true,
            last: false,
            time_left: None,
            retry_after_max: secs(5),
            pin: Pin::Free,
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
            quiet: false,
            cooldown: None,
        }
    }

    fn retry(pause: Duration) -> Next {
        Next::Retry {
            pause,
            cooldown: None,
        }
    }

    fn no_retries(b: Budget) -> Budget {
        Budget { retries: 0, ..b }
    }

    fn last(b: Budget) -> Budget {
        Budget { last: true, ..b }
    }

    /// One row per rule of SPEC §4 "Failover" and 4a.
    #[test]
    fn every_rule_is_a_row() {
        let b = budget();
        #[rustfmt::skip]
        let rows: Vec<(&str, Outcome, Budget, Next)> = vec![
            // §4: the answer is relayed as is for 2xx, 3xx, 400, 413, 422 and other 4xx.
            ("2xx is the answer", status(200), b, Next::Relay),
            ("201 is the answer", status(201), b, Next::Relay),
            ("3xx is the answer", status(302), b, Next::Relay),
            ("400 is the answer", status(400), b, Next::Relay),
            ("413 is the answer", status(413), b, Next::Relay),
            ("422 is the answer", status(422), b, Next::Relay),
            ("418 is the answer", status(418), b, Next::Relay),
            ("400 on the last candidate is the answer", status(400), last(b), Next::Relay),
            // §4: failover statuses move on (no retries configured).
            ("401 fails over", status(401), no_retries(b), move_on()),
            ("403 fails over", status(403), no_retries(b), move_on()),
            ("404 fails over", status(404), no_retries(b), move_on()),
            ("408 fails over", status(408), no_retries(b), move_on()),
            ("409 fails over", status(409), no_retries(b), move_on()),
            ("429 fails over", status(429), no_retries(b), move_on()),
            ("500 fails over", status(500), no_retries(b), move_on()),
            ("503 fails over", status(503), no_retries(b), move_on()),
            ("599 fails over", status(599), no_retries(b), move_on()),
            // §4: the last candidate's HTTP failure is relayed.
            ("last 500 is relayed", status(500), last(no_retries(b)), Next::RelayFailure { cooldown: None }),
            ("last 401 is relayed", status(401), last(b), Next::RelayFailure { cooldown: None }),
            // §4: connect errors and timeouts move on; after the last, the all-failed answer.
            ("connect error moves on", failed(false), no_retries(b), move_on()),
            ("timeout moves on", Outcome::TimedOut, b, move_on()),
            ("last timeout gives up", Outcome::TimedOut, last(b), move_on()),
            ("last refused gives up", failed(false), last(b), move_on()),
            ("in-band error moves on", failed(false), b, move_on()),
            // 4a retries: 5xx, 408, 409, 429, closed before the head are retried with backoff.
            ("500 retried", status(500), b, retry(B)),
            ("502 retried", status(502), b, retry(B)),
            ("408 retried", status(408), b, retry(B)),
            ("409 retried", status(409), b, retry(B)),
            ("429 retried", status(429), b, retry(B)),
            ("closed before head retried", failed(true), b, retry(B)),
            ("last candidate retried too", status(500), last(b), retry(B)),
            // 4a: never retried after a timeout, a refused connection, 401, 403, 404.
            ("timeout never retried", Outcome::TimedOut, b, move_on()),
            ("refused never retried", failed(false), b, move_on()),
            ("401 never retried", status(401), b, move_on()),
            ("403 never retried", status(403), b, move_on()),
            ("404 never retried", status(404), b, move_on()),
            // 4a: retries run out.
            ("retries used up", status(500), Budget { tries: 1, ..b }, move_on()),
            ("retries used up on last", status(500), last(Budget { tries: 1, ..b }), Next::RelayFailure { cooldown: None }),
            ("2 of 3 retries used", status(500), Budget { tries: 2, retries: 3, ..b }, retry(B)),
            // 4a: no same-upstream retry on a half-open probe or when a cooldown just started.
            ("no retry when half-open or cooling starts", status(500), Budget { may_retry: false, ..b }, move_on()),
            ("no retry of a closed connection either", failed(true), Budget { may_retry: false, ..b }, move_on()),
            // 4a Retry-After: ≤ retry_after_max is waited out (and is a cooldown) ...
            ("429 Retry-After 2 waited", status_after(429, 2), b, Next::Retry { pause: secs(2), cooldown: Some(secs(2)) }),
            ("503 Retry-After 5 waited", status_after(503, 5), b, Next::Retry { pause: secs(5), cooldown: Some(secs(5)) }),
            // ... a longer one moves on at once, still a cooldown ...
            ("429 Retry-After 6 moves on", status_after(429, 6), b, Next::MoveOn { quiet: false, cooldown: Some(secs(6)) }),
            // ... capped at an hour ...
            ("Retry-After capped at 3600", status_after(429, 7200), b, Next::MoveOn { quiet: false, cooldown: Some(MAX_RETRY_AFTER) }),
            // ... and a cooldown whatever `retries` says.
            ("Retry-After without retries", status_after(429, 2), no_retries(b), Next::MoveOn { quiet: false, cooldown: Some(secs(2)) }),
            ("Retry-After on last relayed", status_after(503, 2), last(no_retries(b)), Next::RelayFailure { cooldown: Some(secs(2)) }),
            // 4a failover_codes: a 400 with a listed code moves on quietly, unless nothing follows.
            ("failover code moves on quietly", code_400(), b, Next::MoveOn { quiet: true, cooldown: None }),
            ("failover code on last is relayed", code_400(), last(b), Next::Relay),
            // 4a deadline: a pause that does not fit before the deadline is not taken.
            ("backoff past deadline moves on", status(500), Budget { time_left: Some(Duration::from_millis(200)), ..b }, move_on()),
            ("backoff within deadline retried", status(500), Budget { time_left: Some(secs(1)), ..b }, retry(B)),
            ("Retry-After past deadline moves on", status_after(429, 2), Budget { time_left: Some(secs(1)), ..b }, Next::MoveOn { quiet: false, cooldown: Some(secs(2)) }),
            ("Retry-After past deadline on last relayed", status_after(429, 2), last(Budget { time_left: Some(secs(1)), ..b }), Next::RelayFailure { cooldown: Some(secs(2)) }),
            // 4f: a request naming only unseen objects: "not found" is "not here".
            ("404 is not here", status(404), pinned(Pin::Unknown, b), Next::NotHere),
            ("400 *_not_found is not here", not_found_400(), pinned(Pin::Unknown, b), Next::NotHere),
            ("not here on last is the answer", status(404), last(pinned(Pin::Unknown, b)), Next::RelayNotHere),
            ("400 *_not_found on last is the answer", not_found_400(), last(pinned(Pin::Unknown, b)), Next::RelayNotHere),
            ("unseen objects: other failures as before", status(503), pinned(Pin::Unknown, no_retries(b)), move_on()),
            ("unseen objects: 2xx relayed", status(200), pinned(Pin::Unknown, b), Next::Relay),
            ("without objects 404 is a failure", status(404), no_retries(b), move_on()),
            ("without objects a 400 *_not_found is the answer", not_found_400(), b, Next::Relay),
            // 4f: the owner only: its failure is the answer; retries still apply.
            ("owner 503 is the owner's failure", status(503), last(pinned(Pin::OwnerOnly, no_retries(b))), Next::OwnerFailed { cooldown: None }),
            ("owner 404 is the owner's failure", status(404), last(pinned(Pin::OwnerOnly, b)), Next::OwnerFailed { cooldown: None }),
            ("owner timeout is the owner's failure", Outcome::TimedOut, last(pinned(Pin::OwnerOnly, b)), Next::OwnerFailed { cooldown: None }),
            ("owner refused is the owner's failure", failed(false), last(pinned(Pin::OwnerOnly, b)), Next::OwnerFailed { cooldown: None }),
            ("owner 500 retried", status(500), last(pinned(Pin::OwnerOnly, b)), retry(B)),
            ("owner Retry-After kept", status_after(429, 9), last(pinned(Pin::OwnerOnly, b)), Next::OwnerFailed { cooldown: Some(secs(9)) }),
            ("owner 2xx relayed", status(200), last(pinned(Pin::OwnerOnly, b)), Next::Relay),
            ("owner 400 relayed", status(400), last(pinned(Pin::OwnerOnly, b)), Next::Relay),
        ];
        for (name, outcome, budget, want) in rows {
            assert_eq!(decide(&outcome, &budget, B), want, "row: {name}");
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
        assert!(!wants_400_body_pinned(400, false, false, Pin::Free));
    }
}
