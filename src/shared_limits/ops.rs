//! What the PostgreSQL thread does for the sharing of members' limits, one statement each:
//! lease slots, take places, write and read tokens, give back what is no longer needed, and
//! state again after an outage what this replica holds.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use postgres::Client;

use super::sql::Statements;
use super::{
    block, lock, unix, utc_day, Answer, Group, GroupUse, Lease, Placed, Sharing, LEASE_LIFE,
};

/// How long spare places are kept after they were last needed.
pub(super) const SPARE: Duration = Duration::from_secs(1);

/// A connection and its prepared statements.
pub(super) struct Conn {
    pub(super) client: Client,
    pub(super) st: Statements,
    /// Statements run on it, for the debug log's rate (the benchmarks guide quotes it).
    pub(super) statements: std::cell::Cell<u64>,
}

impl Conn {
    /// Counts one statement about to run.
    pub(super) fn count(&self) {
        self.statements.set(self.statements.get() + 1);
    }
}

/// Counts the replicas seen in the last minute (the share's divisor).
pub(super) fn count_replicas(c: &mut Conn, s: &Sharing) -> Result<(), postgres::Error> {
    c.count();
    let n: i64 = c.client.query_one(&c.st.count, &[])?.get(0);
    s.replicas
        .store(n.max(1) as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Leases `rpm` slots for `g` unless it has some left (a refill leases one block more).
pub(super) fn lease_slots(
    c: &mut Conn,
    s: &Sharing,
    g: &Group,
    waiting: u64,
    refill: bool,
) -> Result<Answer, postgres::Error> {
    let now = Instant::now();
    let (limit, left) = {
        let mut st = lock(&g.state);
        if refill {
            st.refill_asked = false;
        }
        let left: u64 = st
            .leases
            .iter()
            .filter(|l| l.deadline > now)
            .map(|l| l.left)
            .sum();
        (st.limits.rpm, left)
    };
    let Some(limit) = limit else {
        return Ok(Answer::Done);
    };
    if left > 0 && !refill {
        return Ok(Answer::Done);
    }
    let want = block(limit, s.replicas()).max(waiting);
    let asked = Instant::now();
    c.count();
    let row = c.client.query_one(
        &c.st.slots,
        &[
            &&*g.name,
            &s.id,
            &clamp(limit),
            &clamp(want),
            &(LEASE_LIFE.as_millis() as i32),
        ],
    )?;
    let (id, granted, counted, retry_ms): (i64, i32, i32, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let mut st = lock(&g.state);
    st.group_slots = Some((counted.max(0) as u64, Instant::now()));
    if granted <= 0 {
        let retry = Duration::from_millis(retry_ms.max(1) as u64);
        st.rpm_full_until = Some(Instant::now() + retry);
        return Ok(Answer::Full(retry));
    }
    st.rpm_full_until = None;
    // Usable from when it was asked for: the slots count in PostgreSQL from the transaction's
    // start, which is later.
    st.leases.push_back(Lease {
        id,
        left: granted as u64,
        deadline: asked + LEASE_LIFE,
    });
    Ok(Answer::Done)
}

/// Takes a place for a waiting request of `g`, claiming more first when this replica holds none
/// spare: as many as its requests in flight here plus those waiting, plus a block of spare ones
/// when the limit is large enough.
pub(super) fn claim_places(
    c: &mut Conn,
    s: &Arc<Sharing>,
    g: &Arc<Group>,
    waiting: u64,
) -> Result<Placed, postgres::Error> {
    let take = |st: &mut super::GroupState| {
        (st.in_flight < st.held).then(|| {
            st.in_flight += 1;
            if st.in_flight >= st.held {
                st.spare_since = None;
            }
        })
    };
    let (limit, in_flight, held) = {
        let mut st = lock(&g.state);
        if take(&mut st).is_some() {
            return Ok(Placed::Place(s.place(g)));
        }
        (st.limits.concurrent, st.in_flight, st.held)
    };
    let Some(limit) = limit else {
        return Ok(Placed::Full);
    };
    let b = block(limit, s.replicas());
    let spare = if b >= 2 { b } else { 0 };
    let want = in_flight + waiting.max(1) + spare;
    c.count();
    let h: i32 = c
        .client
        .query_one(
            &c.st.places,
            &[&&*g.name, &s.id, &clamp(limit), &clamp(want), &clamp(held)],
        )?
        .get(0);
    let mut st = lock(&g.state);
    st.held = h.max(0) as u64;
    Ok(match take(&mut st) {
        Some(()) => Placed::Place(s.place(g)),
        None => Placed::Full,
    })
}

pub(super) fn clamp(v: u64) -> i32 {
    v.min(i32::MAX as u64) as i32
}

/// Writes the tokens that ended since the last tick.
pub(super) fn push_tokens(
    c: &mut Conn,
    s: &Sharing,
    groups: &[Arc<Group>],
) -> Result<(), postgres::Error> {
    let (mut members, mut seconds, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
    let mut taken = Vec::new();
    for g in groups {
        let pending = std::mem::take(&mut lock(&g.state).pending);
        for &(sec, t) in &pending {
            members.push(g.name.to_string());
            seconds.push(sec as i64);
            tokens.push(t as i64);
        }
        if !pending.is_empty() {
            taken.push((g.clone(), pending));
        }
    }
    if members.is_empty() {
        return Ok(());
    }
    c.count();
    let result = c
        .client
        .execute(&c.st.push, &[&s.id, &members, &seconds, &tokens]);
    if result.is_err() {
        // Not written: kept for the next attempt (merged by second, before newer ones).
        for (g, mut pending) in taken {
            let mut st = lock(&g.state);
            pending.append(&mut st.pending);
            st.pending = pending;
        }
    }
    result.map(|_| ())
}

/// Reads the others' token sums of these members.
pub(super) fn read_others(
    c: &mut Conn,
    s: &Sharing,
    groups: &[Arc<Group>],
) -> Result<(), postgres::Error> {
    if groups.is_empty() {
        return Ok(());
    }
    let wall = SystemTime::now();
    let now = unix(wall) as i64;
    let (day, start) = utc_day(wall);
    let names: Vec<String> = groups.iter().map(|g| g.name.to_string()).collect();
    c.count();
    let rows = c
        .client
        .query(&c.st.others, &[&names, &s.id, &(now - 60), &(start as i64)])?;
    let at = Instant::now();
    for g in groups {
        let row = rows.iter().find(|r| r.get::<_, &str>(0) == &*g.name);
        let mut st = lock(&g.state);
        st.others = super::Others {
            tokens_last_minute: row.map_or(0, |r| r.get::<_, i64>(1).max(0) as u64),
            tokens_today: row.map_or(0, |r| r.get::<_, i64>(2).max(0) as u64),
            day,
            oldest: row
                .and_then(|r| r.get::<_, Option<i64>>(3))
                .map(|v| v.max(0) as u64),
            at: Some(at),
        };
    }
    Ok(())
}

/// What the others use for `g`.
pub(super) fn others_use(
    c: &mut Conn,
    s: &Sharing,
    g: &Group,
) -> Result<GroupUse, postgres::Error> {
    let wall = SystemTime::now();
    let now = unix(wall) as i64;
    let (_, start) = utc_day(wall);
    c.count();
    let row = c.client.query_one(
        &c.st.usage,
        &[&&*g.name, &s.id, &(now - 60), &(start as i64)],
    )?;
    let v = |i: usize| row.get::<_, i64>(i).max(0) as u64;
    Ok(GroupUse {
        requests_last_minute: v(0),
        in_flight: v(1),
        tokens_last_minute: v(2),
        tokens_today: v(3),
    })
}

/// Gives back what `g` holds and no longer needs: the unused slots of ended leases, and the
/// places beyond its requests in flight (spare ones after [`SPARE`]).
pub(super) fn settle(c: &mut Conn, s: &Sharing, g: &Group) -> Result<(), postgres::Error> {
    let now = Instant::now();
    let (ended, release) = {
        let mut st = lock(&g.state);
        let mut ended = Vec::new();
        while st.leases.front().is_some_and(|l| l.deadline <= now) {
            if let Some(l) = st.leases.pop_front() {
                if l.left > 0 {
                    ended.push(l);
                }
            }
        }
        let keep = match st.limits.concurrent {
            Some(n) if block(n, s.replicas()) >= 2 => {
                let spare_for = st.spare_since.map_or(Duration::ZERO, |t| now - t);
                if spare_for < SPARE {
                    st.held
                } else {
                    st.in_flight
                }
            }
            _ => st.in_flight,
        };
        let release = (keep < st.held).then(|| {
            st.held = keep;
            if keep <= st.in_flight {
                st.spare_since = None;
            }
            keep
        });
        (ended, release)
    };
    for l in ended {
        c.count();
        c.client
            .execute(&c.st.give_back, &[&l.id, &clamp(l.left)])?;
    }
    if let Some(held) = release {
        c.count();
        c.client
            .execute(&c.st.release, &[&&*g.name, &s.id, &clamp(held)])?;
    }
    Ok(())
}

impl Sharing {
    pub(super) fn has_groups(&self) -> bool {
        self.groups.read().is_ok_and(|m| !m.is_empty())
    }

    pub(super) fn all_groups(&self) -> Vec<Arc<Group>> {
        self.groups
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// After PostgreSQL came back (or at the first connection): each member's places are what
    /// its requests in flight here hold, whatever the others took meanwhile; slots leased
    /// before stay valid until their lease ends.
    pub(super) fn reassert(&self, c: &mut Conn) -> Result<(), postgres::Error> {
        for g in self.all_groups() {
            let (limit, in_flight, alone) = {
                let mut st = lock(&g.state);
                let now = Instant::now();
                let window = crate::member_limits::WINDOW;
                st.alone.retain(|t| now.duration_since(*t) < window);
                // All count until the newest leaves the window (a little longer for the others).
                let alone = st.alone.back().map(|t| {
                    (
                        st.alone.len(),
                        (window - now.duration_since(*t)).as_secs_f64(),
                    )
                });
                (st.limits.concurrent, st.in_flight, alone)
            };
            if let Some((n, secs)) = alone {
                c.count();
                c.client
                    .execute(&c.st.alone, &[&&*g.name, &self.id, &clamp(n as u64), &secs])?;
                lock(&g.state).alone.clear();
            }
            let Some(limit) = limit else { continue };
            c.count();
            let h: i32 = c
                .client
                .query_one(
                    &c.st.places,
                    &[
                        &&*g.name,
                        &self.id,
                        &clamp(limit),
                        &clamp(in_flight),
                        &clamp(in_flight),
                    ],
                )?
                .get(0);
            lock(&g.state).held = h.max(0) as u64;
        }
        Ok(())
    }
}
