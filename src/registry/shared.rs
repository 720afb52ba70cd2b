//! Health shared between replicas through PostgreSQL (see the operations guide, "Several
//! replicas"): what the registry asks the store thread to write, and what it hears back.
//!
//! The registry stays the one owner of transitions. A row another replica wrote arrives here
//! as a message and becomes this replica's state (no alert: the replica that caused the
//! transition alerts, once for the group); a transition made here goes out as a write, and the
//! write says whether it was the group's news (then its alert comes back to be sent). The
//! thread is `crate::replicas`; this side never waits on it, and while PostgreSQL cannot be
//! reached it is told so and keeps health local.
//!
//! Half-open across replicas: a cooldown that is about to end is claimed in the table by one
//! replica ([`PRECLAIM`] before its end). Only that replica lets one request probe the
//! upstream; the others keep it at the back until the result arrives or the claim runs out. A
//! claim that no request used within [`CLAIM_WINDOW`] is given back, so that a replica with
//! traffic for that upstream takes it.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;

use super::messages::HealthEvent;
use super::view::probe_hold;
use super::UpstreamRegistry;

/// How long before a cooldown ends its half-open probe is claimed.
pub const PRECLAIM: Duration = Duration::from_millis(500);
/// How long the claiming replica has to start the probe before it gives the claim back.
pub const CLAIM_WINDOW: Duration = Duration::from_secs(2);
/// A claim that was not granted is asked for again after this.
const ASK_AGAIN: Duration = Duration::from_secs(1);

/// One upstream's shared health, with times as seconds from the database's clock's now
/// (negative: past), so that replicas whose clocks differ agree.
#[derive(Debug, Clone)]
pub struct SharedRow {
    /// Upstream name.
    pub upstream: String,
    /// Changes with every write.
    pub version: i64,
    /// Changes when a cooldown starts or ends.
    pub epoch: i64,
    /// Its failures reached the threshold (`upstream_healthy` 0).
    pub down: bool,
    /// Seconds to the end of its cooldown; None: not in cooldown.
    pub until_left: Option<f64>,
    /// The replica that holds its half-open claim.
    pub opener: Option<String>,
    /// Seconds to that claim's end.
    pub open_left: Option<f64>,
    /// Seconds to its next probe (`probe_interval`).
    pub next_probe_left: Option<f64>,
    /// The replica that made the last cooldown or recovery.
    pub changed_by: String,
    /// The last probe's result, made by any replica.
    pub last_probe: Option<String>,
    /// Seconds from now to that probe's end (negative).
    pub probed_left: Option<f64>,
}

/// What the registry asks the store thread to write.
#[derive(Debug)]
pub enum SharedWrite {
    /// A cooldown of `secs` from now (a longer one running is kept).
    Cooldown {
        /// Upstream name.
        upstream: String,
        /// Its length.
        secs: f64,
        /// The failure threshold sent it there.
        down: bool,
        /// `probe_interval` in seconds, when probes are on.
        probe_every: Option<f64>,
        /// Sent back to be fired if this write is what put the upstream down.
        alert: Option<HealthEvent>,
    },
    /// It answered again: the cooldown of generation `epoch` ends.
    Recovered {
        /// Upstream name.
        upstream: String,
        /// The cooldown generation this replica knew.
        epoch: i64,
        /// Sent back to be fired if this write is what ended the group's cooldown.
        alert: Option<HealthEvent>,
    },
    /// This replica would let one request probe it when its cooldown ends.
    ClaimHalfOpen {
        /// Upstream name.
        upstream: String,
        /// How long the claim holds after the cooldown's end.
        hold: f64,
    },
    /// The claim went unused: another replica may take it.
    Release {
        /// Upstream name.
        upstream: String,
    },
    /// A probe's result, for every replica's status page.
    Probed {
        /// Upstream name.
        upstream: String,
        /// `ok`, `http_error`, `timeout` or `connect_error`.
        result: &'static str,
    },
    /// This replica would make the probe that is due.
    ClaimProbe {
        /// Upstream name.
        upstream: String,
        /// `probe_interval` in seconds.
        every: f64,
    },
}

/// What the store thread tells the registry.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub enum FromStore {
    /// Health is shared from now on: this replica's id, and where writes go.
    Attach {
        /// This replica's id in the roster.
        id: Arc<str>,
        /// The thread's inbox.
        writes: Sender<SharedWrite>,
    },
    /// PostgreSQL can (true) or cannot (false) be reached.
    Reachable(bool),
    /// Rows that changed.
    Rows(Vec<SharedRow>),
    /// A transition of this replica was the group's: fire its alert.
    Alert(HealthEvent),
    /// This replica makes the probe of this upstream that is due.
    ProbeGranted(String),
}

/// The registry's side of the link.
pub(super) struct Share {
    id: Arc<str>,
    writes: Sender<SharedWrite>,
    /// PostgreSQL answered last time: while false, health is local.
    pub(super) reachable: bool,
}

impl Share {
    /// Hands a write to the thread (it never blocks; a gone thread loses it).
    pub(super) fn write(&self, w: SharedWrite) {
        let _ = self.writes.send(w);
    }
}

/// `now` moved by a signed number of seconds.
fn at(now: Instant, left: f64) -> Instant {
    let d = Duration::from_secs_f64(left.abs().min(1e7));
    if left >= 0.0 {
        now + d
    } else {
        now.checked_sub(d).unwrap_or(now)
    }
}

fn wall(left: f64) -> SystemTime {
    let (now, d) = (
        SystemTime::now(),
        Duration::from_secs_f64(left.abs().min(1e7)),
    );
    if left >= 0.0 {
        now + d
    } else {
        now.checked_sub(d).unwrap_or(now)
    }
}

impl UpstreamRegistry {
    /// Whether health is shared right now.
    pub(super) fn sharing(&self) -> bool {
        self.share.as_ref().is_some_and(|s| s.reachable)
    }

    pub(super) fn write(&self, w: SharedWrite) {
        if let Some(s) = self.share.as_ref().filter(|s| s.reachable) {
            s.write(w);
        }
    }

    /// Upstream `i` is in cooldown until `until` (its end on this replica): claims its
    /// half-open probe shortly before, or gives back a claim no request used.
    pub(super) fn claim_step(&mut self, i: usize, now: Instant, until: Instant) {
        let hold = probe_hold(&self.config, &self.config.upstreams[i]);
        let name = self.config.upstreams[i].name.to_string();
        let held = self.stats[i].probe_held(now);
        let h = &mut self.health[i];
        if h.claimed {
            if h.window.is_some_and(|end| now >= end) && !held {
                h.claimed = false;
                h.window = Some(now);
                h.asked = Some(now);
                self.write(SharedWrite::Release { upstream: name });
                self.publish_view();
            }
        } else if until.saturating_duration_since(now) <= PRECLAIM
            && h.asked.is_none_or(|t| now >= t + ASK_AGAIN)
        {
            h.asked = Some(now);
            self.write(SharedWrite::ClaimHalfOpen {
                upstream: name,
                hold: (CLAIM_WINDOW + hold).as_secs_f64(),
            });
        }
    }

    /// Makes `row` this replica's state of its upstream; false when it is not news.
    fn apply_row(&mut self, row: SharedRow, now: Instant) -> bool {
        let Some(i) = self.index_of(&row.upstream) else {
            return false;
        };
        let Some(me) = self.share.as_ref().map(|s| s.id.clone()) else {
            return false;
        };
        let hold = probe_hold(&self.config, &self.config.upstreams[i]);
        let stats = self.stats[i].clone();
        let h = &mut self.health[i];
        if row.version <= h.version {
            return false;
        }
        h.version = row.version;
        h.epoch = row.epoch;
        if let (Some(result), Some(left)) = (row.last_probe.as_deref(), row.probed_left) {
            let result = super::messages::PROBE_RESULTS
                .iter()
                .find(|r| **r == result);
            h.last_probe = result.map(|r| (wall(left), *r)).or(h.last_probe);
        }
        let name = &row.upstream;
        let by = crate::escape::untrusted(&row.changed_by);
        match row.until_left {
            None => {
                if h.down || h.cooldown_until.is_some() {
                    log::info!("upstream {name} recovered (replica {by}, through PostgreSQL)");
                }
                h.down = false;
                h.cooldown_until = None;
                h.window = None;
                h.claimed = false;
                h.asked = None;
                h.next_probe = None;
                stats.free_probe();
                stats
                    .failures
                    .store(0, std::sync::atomic::Ordering::Release);
            }
            Some(left) => {
                let mine = row.opener.as_deref() == Some(&*me);
                let open_left = row.open_left.filter(|_| row.opener.is_some());
                let (end, end_left, window) = match open_left {
                    Some(l) if mine => (at(now, left), left, at(now, l).checked_sub(hold)),
                    Some(l) if l > 0.0 => (at(now, l), l, Some(at(now, l))),
                    _ => (at(now, left), left, Some(at(now, left))),
                };
                if h.cooldown_until.is_none() || (row.down && !h.down) {
                    log::info!(
                        "upstream {name} is cooling down for {left:.1}s (replica {by}, through \
                         PostgreSQL)"
                    );
                }
                h.cooldown_until = Some((end, wall(end_left)));
                h.window = Some(window.unwrap_or(now));
                h.claimed = mine;
                h.down = row.down;
                h.next_probe = row.next_probe_left.map(|l| at(now, l));
            }
        }
        self.metrics.set_healthy(name, !self.health[i].down);
        true
    }

    /// PostgreSQL answers again: what this replica learned alone goes to the others (a cooldown
    /// still running, or one whose half-open probe is pending), and half-open probes need a
    /// claim again.
    fn reconnected(&mut self) {
        let now = Instant::now();
        let every = self.config.probe_interval.map(|p| p.as_secs_f64());
        for (u, h) in self.config.upstreams.iter().zip(self.health.iter_mut()) {
            let Some((until, _)) = h.cooldown_until else {
                continue;
            };
            h.window = Some(until);
            h.claimed = false;
            h.asked = None;
            if let Some(s) = &self.share {
                s.write(SharedWrite::Cooldown {
                    upstream: u.name.to_string(),
                    secs: until.saturating_duration_since(now).as_secs_f64(),
                    down: h.down,
                    probe_every: every,
                    alert: None,
                });
            }
        }
        self.publish_view();
    }

    /// PostgreSQL cannot be reached: health is this replica's alone until it returns.
    fn disconnected(&mut self) {
        for h in &mut self.health {
            h.window = None;
            h.claimed = false;
            h.asked = None;
        }
        self.publish_view();
    }
}

impl Handler<FromStore> for UpstreamRegistry {
    type Result = ();

    fn handle(&mut self, msg: FromStore, ctx: &mut Context<Self>) {
        match msg {
            FromStore::Attach { id, writes } => {
                self.share = Some(Share {
                    id,
                    writes,
                    reachable: false,
                });
            }
            FromStore::Reachable(up) => {
                let Some(s) = self.share.as_mut() else {
                    return;
                };
                if s.reachable == up {
                    return;
                }
                s.reachable = up;
                if up {
                    self.reconnected();
                } else {
                    self.disconnected();
                }
            }
            FromStore::Rows(rows) => {
                if !self.sharing() {
                    return;
                }
                let now = Instant::now();
                let mut changed = false;
                for row in rows {
                    changed |= self.apply_row(row, now);
                }
                if changed {
                    self.publish_view();
                }
            }
            FromStore::Alert(event) => self.alert(event),
            FromStore::ProbeGranted(name) => {
                if let Some(i) = self.index_of(&name) {
                    let h = &self.health[i];
                    if h.cooldown_until.is_some() && !h.probing {
                        self.probe(i, ctx);
                    }
                }
            }
        }
    }
}
