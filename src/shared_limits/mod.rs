//! Members' limits held by all replicas together through their PostgreSQL store (see the
//! operations guide, "Members' limits across replicas", for the mechanism and the measurements
//! that chose it).
//!
//! Each replica keeps its own counters ([`crate::member_limits`]) and adds what it needs from the
//! others, never on the request path of a member without limits:
//! - `rpm`: a replica leases a small block of the member's slots in one short transaction
//!   serialised per member; a slot is usable for [`LEASE_LIFE`] and counts for every replica
//!   until 60 s after that, so no 60-second window can see more admissions than `rpm`. Unused
//!   slots go back when their lease ends.
//! - `concurrent`: a replica holds places (its row's `held`); it claims more under the same
//!   per-member lock and gives back what it no longer needs after each request.
//! - `tpm`, `tokens_per_day`: each replica adds its tokens per second to a table; admission reads
//!   the others' sums, fresh within [`FRESH`] (awaited when older, or when the member is past
//!   half its limit).
//!
//! A request waits on PostgreSQL for [`WAIT`] at most. A statement that fails or takes longer
//! means PostgreSQL cannot be reached: then every replica enforces its share of each limit
//! alone (see [`Sharing::local_limits`]) until the background thread reconnects.
//!
//! The blocking client lives on a thread of its own ([`pg`]); requests talk to it through a
//! channel and a oneshot reply awaited with a timeout.

mod counts;
mod ops;
mod pg;
mod sql;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime};

use crate::member_limits::{Limit, Limited, MemberLimits};

pub use self::counts::{block, share};
use self::counts::{limited, take_leased, tokens_check, unix, utc_day, Mine};

/// Longest a request waits on PostgreSQL.
pub const WAIT: Duration = Duration::from_secs(1);
/// How long a leased `rpm` slot may be used after its lease was asked for.
pub const LEASE_LIFE: Duration = Duration::from_secs(2);
/// How old the others' token sums may be when a request is admitted.
pub const FRESH: Duration = Duration::from_millis(200);
/// How often a request asks again when what was leased for it went to others first.
const TRIES: usize = 8;

/// What the others used, as last read.
#[derive(Debug, Clone, Copy, Default)]
struct Others {
    tokens_last_minute: u64,
    tokens_today: u64,
    /// UTC day of `tokens_today`.
    day: u64,
    /// The oldest second (Unix) in the others' token window, for `Retry-After`.
    oldest: Option<u64>,
    /// When read.
    at: Option<Instant>,
}

/// One `rpm` lease: slots left and until when they may be used.
#[derive(Debug, Clone, Copy)]
struct Lease {
    id: i64,
    left: u64,
    deadline: Instant,
}

/// A member's part of the sharing.
#[derive(Debug, Default)]
struct GroupState {
    /// The member's limits as the last request saw them.
    limits: MemberLimits,
    leases: VecDeque<Lease>,
    /// A background refill of `rpm` slots was asked for.
    refill_asked: bool,
    /// All the group's slots are taken until then.
    rpm_full_until: Option<Instant>,
    /// The group's counted slots at the last lease, and when.
    group_slots: Option<(u64, Instant)>,
    /// Places held in PostgreSQL, and requests holding one here.
    held: u64,
    in_flight: u64,
    /// When the held places were last more than needed.
    spare_since: Option<Instant>,
    others: Others,
    /// Tokens ended here and not yet written: (Unix second, tokens).
    pending: Vec<(u64, u64)>,
    /// Tokens ended here: per second of the last minute, and of the UTC day (kept here so that a
    /// check never walks the member's `rpm` window to read them).
    mine: Mine,
    /// The last request of the member here (the token sums are refreshed while it is recent).
    active: Option<Instant>,
    /// Past half a token limit: what ends here is written at once, not at the next tick.
    near: bool,
    /// Admissions of the last minute made alone, while PostgreSQL could not be reached: written
    /// as slots when it answers again, so the group does not admit them twice.
    alone: VecDeque<Instant>,
}

/// One member's group state, found by name (kept across reloads).
#[derive(Debug)]
struct Group {
    name: Arc<str>,
    state: Mutex<GroupState>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// What the PostgreSQL thread is asked to do for a waiting request.
enum Job {
    /// Lease `rpm` slots for the member (`wait` is None for a background refill).
    Slots(Arc<Group>, Option<Reply>),
    /// Claim a place for the member's request.
    Places(Arc<Group>, tokio::sync::oneshot::Sender<Placed>),
    /// Read the others' token sums for the member now.
    Tokens(Arc<Group>, Reply),
    /// Read what every replica uses for the usage page.
    Usage(Arc<Group>, tokio::sync::oneshot::Sender<Option<GroupUse>>),
    /// Something to write soon (ended tokens, places to give back): wakes the thread.
    Wake,
}

/// The thread's answer to a waiting request.
type Reply = tokio::sync::oneshot::Sender<Answer>;

/// What the thread answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Done (slots leased, places held, sums read): look again.
    Done,
    /// The group has no slot or place left; retry after this.
    Full(Duration),
    /// PostgreSQL cannot be reached.
    Unreachable,
}

/// The thread's answer to a request waiting for a place.
#[derive(Debug)]
enum Placed {
    /// Taken for the request (given back if the request gave up waiting meanwhile).
    Place(GroupPlace),
    /// The group's places are all held.
    Full,
    /// PostgreSQL cannot be reached.
    Unreachable,
}

/// What the other replicas use (the usage page adds it to this replica's own numbers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupUse {
    /// `rpm` slots the others leased in the last 60 s.
    pub requests_last_minute: u64,
    /// Their tokens of the last 60 s.
    pub tokens_last_minute: u64,
    /// Their tokens of this UTC day.
    pub tokens_today: u64,
    /// Places they hold.
    pub in_flight: u64,
}

/// The sharing of members' limits between the replicas of one PostgreSQL store.
pub struct Sharing {
    jobs: Mutex<Sender<Job>>,
    groups: RwLock<HashMap<Arc<str>, Arc<Group>>>,
    /// PostgreSQL answers (false: each replica enforces its share).
    reachable: AtomicBool,
    /// Replicas seen in the last minute, this one included (at least 1).
    replicas: AtomicU64,
    /// This replica's id in the shared tables.
    id: String,
}

impl std::fmt::Debug for Sharing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sharing")
            .field("id", &self.id)
            .field("reachable", &self.reachable.load(Ordering::Relaxed))
            .finish()
    }
}

/// A request's part in the group: its place among `concurrent` (given back when dropped).
#[derive(Debug)]
pub struct GroupPlace {
    sharing: Arc<Sharing>,
    group: Arc<Group>,
}

impl Drop for GroupPlace {
    fn drop(&mut self) {
        let mut s = lock(&self.group.state);
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.held > s.in_flight && s.spare_since.is_none() {
            s.spare_since = Some(Instant::now());
        }
        drop(s);
        // Nothing to give back while PostgreSQL cannot be reached: places are stated again
        // when it answers.
        if self.sharing.reachable() {
            self.sharing.send(Job::Wake);
        }
    }
}

impl Sharing {
    /// Starts the sharing when `database` (the `-database` value) is a PostgreSQL, as the
    /// replica `id` of the roster (the places of a replica count while its roster row is
    /// fresh). None with SQLite, or when the thread cannot start (logged: each replica then
    /// enforces the whole limit alone). Nothing here waits long: the thread connects in the
    /// background, and until it has, each replica enforces its share.
    pub fn start_if(database: Option<&str>, id: &str) -> Option<Arc<Sharing>> {
        let target = crate::records::postgres_target(database?)?;
        let config: postgres::Config = match target.parse() {
            Ok(c) => c,
            Err(e) => {
                log::error!("members' limits will not be shared: {e}");
                return None;
            }
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let sharing = Arc::new(Sharing {
            jobs: Mutex::new(tx),
            groups: RwLock::default(),
            // Until the first attempt says otherwise (it logs when it fails).
            reachable: AtomicBool::new(true),
            replicas: AtomicU64::new(1),
            id: id.to_string(),
        });
        match pg::spawn(config, rx, sharing.clone()) {
            Ok(()) => Some(sharing),
            Err(e) => {
                log::error!("members' limits will not be shared: {e}");
                None
            }
        }
    }

    /// Whether PostgreSQL answers (the limits are shared).
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Acquire)
    }

    /// Replicas seen in the last minute, this one included.
    pub fn replicas(&self) -> u64 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    /// The limits this replica's own counters enforce now: the member's while the replicas
    /// share (the group's checks come on top), each one's share while PostgreSQL cannot be
    /// reached.
    pub fn local_limits(&self, l: &MemberLimits) -> MemberLimits {
        if self.reachable() {
            return *l;
        }
        let n = self.replicas();
        let part = |v: Option<u64>| v.map(|v| share(v, n));
        MemberLimits {
            rpm: part(l.rpm),
            tpm: part(l.tpm),
            tokens_per_day: part(l.tokens_per_day),
            concurrent: part(l.concurrent),
        }
    }

    fn send(&self, job: Job) {
        let _ = lock(&self.jobs).send(job);
    }

    fn group(&self, name: &Arc<str>) -> Arc<Group> {
        if let Ok(map) = self.groups.read() {
            if let Some(g) = map.get(name) {
                return g.clone();
            }
        }
        let mut map = match self.groups.write() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.entry(name.clone())
            .or_insert_with(|| {
                Arc::new(Group {
                    name: name.clone(),
                    state: Mutex::default(),
                })
            })
            .clone()
    }

    /// The check made before the body is read, from what is already known (no wait): the
    /// others' tokens as last read, and whether the group's `rpm` slots are all taken.
    pub fn check(&self, name: &Arc<str>, limits: &MemberLimits) -> Result<(), Limited> {
        if !limits.any() || !self.reachable() {
            return Ok(());
        }
        let g = self.group(name);
        let now = Instant::now();
        let mut s = lock(&g.state);
        if let Some(n) = limits.rpm {
            let leased = s.leases.iter().any(|l| l.left > 0 && l.deadline > now);
            if let Some(until) = s.rpm_full_until.filter(|u| *u > now && !leased) {
                return Err(limited(Limit::Rpm, n, until - now));
            }
        }
        if limits.tpm.is_some() || limits.tokens_per_day.is_some() {
            let wall = SystemTime::now();
            let mine = s.mine.used(unix(wall));
            tokens_check(limits, &mine, &s.others, wall)?;
        }
        Ok(())
    }

    /// Admits a request for the group: the others' tokens fresh enough, one `rpm` slot, one
    /// place. Waits on PostgreSQL for [`WAIT`] at most; when it cannot be reached the request
    /// is left to this replica's share (the caller asks [`Sharing::local_limits`] again).
    /// Returns the request's place, which must live as long as the request.
    pub async fn admit(
        self: &Arc<Self>,
        name: &Arc<str>,
        limits: &MemberLimits,
    ) -> Result<Option<GroupPlace>, Limited> {
        if !limits.any() {
            return Ok(None);
        }
        let g = self.group(name);
        let deadline = Instant::now() + WAIT;
        {
            let mut s = lock(&g.state);
            s.limits = *limits;
            s.active = Some(Instant::now());
        }
        if self.reachable() && (limits.tpm.is_some() || limits.tokens_per_day.is_some()) {
            if self.tokens_stale(&g, limits) {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.send(Job::Tokens(g.clone(), tx));
                self.wait(rx, deadline).await;
            }
            if self.reachable() {
                let wall = SystemTime::now();
                let mut s = lock(&g.state);
                let mine = s.mine.used(unix(wall));
                tokens_check(limits, &mine, &s.others, wall)?;
            }
        }
        // The place first: a request refused for want of one has taken no `rpm` slot (and one
        // refused for want of a slot gives its place back when it is dropped).
        let place = match limits.concurrent {
            Some(n) => Some(self.take_place(&g, n, deadline).await?),
            None => None,
        };
        if let Some(n) = limits.rpm {
            self.take_slot(&g, n, deadline).await?;
        }
        Ok(place)
    }

    /// This replica's own counters refused a request the group admitted: its `rpm` slot goes
    /// back to the lease it came from while that lease may still be used.
    pub fn unadmit(&self, name: &Arc<str>, limits: &MemberLimits) {
        if limits.rpm.is_none() || !self.reachable() {
            return;
        }
        let g = self.group(name);
        let now = Instant::now();
        let mut s = lock(&g.state);
        if let Some(l) = s.leases.iter_mut().rev().find(|l| l.deadline > now) {
            l.left += 1;
        }
    }

    /// Whether the others' token sums must be read before admitting: too old, or the member may
    /// be past half a token limit, where a sum 100 ms old could let too much in. "May be": the
    /// others are taken to have used at least as much as this replica since their last write
    /// (with two replicas alternating, the others' sum lags by as much as this one's grows).
    /// Past half, what ends here is also written at once.
    fn tokens_stale(&self, g: &Group, limits: &MemberLimits) -> bool {
        let (others, local) = {
            let mut s = lock(&g.state);
            (s.others, s.mine.used(unix(SystemTime::now())))
        };
        let (day, _) = utc_day(SystemTime::now());
        let today = if others.day == day {
            others.tokens_today
        } else {
            0
        };
        let rest = self.replicas().saturating_sub(1);
        let guess = |mine: u64, theirs: u64| mine + theirs.max(mine * rest);
        let past_half = |limit: Option<u64>, used: u64| limit.is_some_and(|n| used * 2 >= n);
        let near = past_half(
            limits.tpm,
            guess(local.tokens_last_minute, others.tokens_last_minute),
        ) || past_half(limits.tokens_per_day, guess(local.tokens_today, today));
        lock(&g.state).near = near;
        near || others.at.is_none_or(|at| at.elapsed() > FRESH)
    }

    /// Waits for the thread's answer until `deadline`; none in time means PostgreSQL cannot be
    /// reached.
    async fn wait(&self, rx: tokio::sync::oneshot::Receiver<Answer>, deadline: Instant) -> Answer {
        let left = deadline.saturating_duration_since(Instant::now());
        match actix_rt::time::timeout(left, rx).await {
            Ok(Ok(a)) => {
                if a == Answer::Unreachable {
                    self.set_unreachable("it did not answer");
                }
                a
            }
            Ok(Err(_)) | Err(_) => {
                self.set_unreachable("a request waited for it for 1 s");
                Answer::Unreachable
            }
        }
    }

    /// PostgreSQL cannot be reached: said once, until it answers again.
    fn set_unreachable(&self, why: &str) {
        if self.reachable.swap(false, Ordering::AcqRel) {
            log::warn!(
                "members' limits: PostgreSQL cannot be reached ({why}); they are no longer \
                 shared: this replica enforces its share of each (limit ÷ {} replicas) until it \
                 answers",
                self.replicas()
            );
        }
    }

    /// Takes one `rpm` slot from this replica's leases, leasing more when none is left.
    async fn take_slot(&self, g: &Arc<Group>, n: u64, deadline: Instant) -> Result<(), Limited> {
        for _ in 0..TRIES {
            if !self.reachable() {
                return Ok(());
            }
            let now = Instant::now();
            {
                let mut s = lock(&g.state);
                if take_leased(&mut s, now) {
                    let left: u64 = s.leases.iter().map(|l| l.left).sum();
                    let b = block(n, self.replicas());
                    if b >= 2 && left * 2 < b && !s.refill_asked {
                        s.refill_asked = true;
                        drop(s);
                        self.send(Job::Slots(g.clone(), None));
                    }
                    return Ok(());
                }
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.send(Job::Slots(g.clone(), Some(tx)));
            match self.wait(rx, deadline).await {
                Answer::Done => continue,
                Answer::Full(retry) => return Err(limited(Limit::Rpm, n, retry)),
                Answer::Unreachable => return Ok(()),
            }
        }
        // Leased again and again and taken by others each time: the group is at its limit.
        Err(limited(Limit::Rpm, n, Duration::from_secs(1)))
    }

    /// Takes one place among the member's `concurrent`, claiming more when this replica holds
    /// none spare (the thread then takes it for the request, so that no other request or
    /// release comes between). The place is counted here even when PostgreSQL cannot be
    /// reached, so that this replica can say how many it needs when it answers again.
    async fn take_place(
        self: &Arc<Self>,
        g: &Arc<Group>,
        n: u64,
        deadline: Instant,
    ) -> Result<GroupPlace, Limited> {
        {
            let mut s = lock(&g.state);
            if !self.reachable() || s.in_flight < s.held {
                s.in_flight += 1;
                if s.in_flight >= s.held {
                    s.spare_since = None;
                }
                return Ok(self.place(g));
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Places(g.clone(), tx));
        let left = deadline.saturating_duration_since(Instant::now());
        match actix_rt::time::timeout(left, rx).await {
            Ok(Ok(Placed::Place(p))) => Ok(p),
            Ok(Ok(Placed::Full)) => Err(limited(Limit::Concurrent, n, Duration::from_secs(1))),
            Ok(Ok(Placed::Unreachable)) | Ok(Err(_)) | Err(_) => {
                self.set_unreachable("a request waited for it for 1 s");
                lock(&g.state).in_flight += 1;
                Ok(self.place(g))
            }
        }
    }

    /// A place counted in `g`'s requests in flight here.
    fn place(self: &Arc<Self>, g: &Arc<Group>) -> GroupPlace {
        GroupPlace {
            sharing: self.clone(),
            group: g.clone(),
        }
    }

    /// A request of the member ended having used `tokens` (written within a tick; only for
    /// members with a token limit).
    pub fn ended(&self, name: &Arc<str>, limits: &MemberLimits, tokens: u64, wall: SystemTime) {
        if tokens == 0 || (limits.tpm.is_none() && limits.tokens_per_day.is_none()) {
            return;
        }
        let g = self.group(name);
        let second = unix(wall);
        let mut s = lock(&g.state);
        match s.pending.last_mut() {
            Some((sec, t)) if *sec == second => *t += tokens,
            _ => s.pending.push((second, tokens)),
        }
        s.mine.add(second, tokens);
        if s.near && self.reachable() {
            drop(s);
            self.send(Job::Wake);
        }
    }

    /// A request of the member was admitted by this replica's own counters: while PostgreSQL
    /// cannot be reached, its `rpm` slot is remembered for when it answers again.
    pub fn admitted(&self, name: &Arc<str>, limits: &MemberLimits) {
        if limits.rpm.is_none() || self.reachable() {
            return;
        }
        let g = self.group(name);
        let now = Instant::now();
        let mut s = lock(&g.state);
        while s
            .alone
            .front()
            .is_some_and(|t| now.duration_since(*t) >= crate::member_limits::WINDOW)
        {
            s.alone.pop_front();
        }
        s.alone.push_back(now);
    }

    /// The others' tokens as last read: (last minute, today), for the rate-limit headers.
    pub fn others_tokens(&self, name: &Arc<str>) -> (u64, u64) {
        if !self.reachable() {
            return (0, 0);
        }
        let g = self.group(name);
        let o = lock(&g.state).others;
        let (day, _) = utc_day(SystemTime::now());
        let today = if o.day == day { o.tokens_today } else { 0 };
        (o.tokens_last_minute, today)
    }

    /// The requests of the last minute the group counted at this replica's last lease, less
    /// what this replica leased and has not used: for `x-ratelimit-remaining-requests`.
    pub fn group_requests(&self, name: &Arc<str>) -> Option<u64> {
        if !self.reachable() {
            return None;
        }
        let g = self.group(name);
        let s = lock(&g.state);
        let (slots, at) = s.group_slots?;
        if at.elapsed() >= crate::member_limits::WINDOW {
            return None;
        }
        let now = Instant::now();
        let unused: u64 = s
            .leases
            .iter()
            .filter(|l| l.deadline > now)
            .map(|l| l.left)
            .sum();
        Some(slots.saturating_sub(unused))
    }

    /// What the other replicas use now (for the usage page), read within [`WAIT`]; None when
    /// PostgreSQL cannot be reached or the member has no limits.
    pub async fn others_use(&self, name: &Arc<str>, limits: &MemberLimits) -> Option<GroupUse> {
        if !limits.any() || !self.reachable() {
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Usage(self.group(name), tx));
        match actix_rt::time::timeout(WAIT, rx).await {
            Ok(Ok(u)) => u,
            _ => None,
        }
    }
}
