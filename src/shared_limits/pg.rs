//! The thread that talks to PostgreSQL for the sharing of members' limits: leases `rpm` slots,
//! claims and gives back places, writes this replica's tokens and reads the others'. Requests
//! never call the blocking client; they send a job and await the answer (see the module above).
//!
//! Every tick ([`TICK`]) it writes what ended, refreshes the token sums of members active here,
//! gives back the slots of leases that ended unused and the places no longer needed. A failed
//! statement or connection makes PostgreSQL unreachable; the thread then tries again every
//! second, and on success says again how many places each member holds here before sharing
//! resumes.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use postgres::NoTls;

use super::ops::{
    claim_places, count_replicas, lease_slots, others_use, push_tokens, read_others, settle, Conn,
};
use super::sql::{prepare, PRUNE, SCHEMA};
use super::{lock, unix, Answer, Group, Job, Placed, Sharing};

/// How often the thread writes and refreshes without being asked.
const TICK: Duration = Duration::from_millis(100);
/// How long an idle member's token sums keep being refreshed.
const ACTIVE: Duration = Duration::from_secs(10);
/// Key of the advisory lock held while creating the tables (any constant unique to them).
const SCHEMA_LOCK: i64 = 0x006f_6172_6c69_6d74;

/// Starts the thread; `start` waits for its first connection attempt (at most a few seconds),
/// so that a gateway that can reach PostgreSQL shares from its first request.
pub(super) fn spawn(
    mut config: postgres::Config,
    rx: Receiver<Job>,
    sharing: Arc<Sharing>,
) -> Result<(), String> {
    // A statement or connection slower than the wait of a request is PostgreSQL unreachable.
    config.connect_timeout(super::WAIT);
    // Leases and places are short-lived: a commit need not wait for its WAL flush (an fsync per
    // lease was most of its round trip; a crash of PostgreSQL can lose the last fraction of a
    // second of them, see the operations guide).
    config.options("-c statement_timeout=1000 -c lock_timeout=1000 -c synchronous_commit=off");
    config.tcp_user_timeout(Duration::from_secs(2));
    config.keepalives_idle(Duration::from_secs(5));
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("limits-postgres".into())
        .spawn(move || {
            let mut w = Worker {
                config,
                sharing,
                conn: None,
                tried: None,
                counted: None,
                pruned: None,
                synced: None,
                reported: (Instant::now(), 0),
                connected_once: false,
            };
            w.connect();
            let _ = first_tx.send(());
            w.run(rx);
        })
        .map_err(|e| e.to_string())?;
    let _ = first_rx.recv_timeout(Duration::from_secs(3));
    Ok(())
}

struct Worker {
    config: postgres::Config,
    sharing: Arc<Sharing>,
    conn: Option<Conn>,
    /// The last connection attempt.
    tried: Option<Instant>,
    counted: Option<Instant>,
    pruned: Option<Instant>,
    /// The last write of tokens and read of the others' sums.
    synced: Option<Instant>,
    /// When the statement rate was last logged, and the count then.
    reported: (Instant, u64),
    connected_once: bool,
}

fn due(last: Option<Instant>, every: Duration) -> bool {
    last.is_none_or(|t| t.elapsed() >= every)
}

impl Worker {
    fn run(&mut self, rx: Receiver<Job>) {
        loop {
            let mut jobs = VecDeque::new();
            match rx.recv_timeout(TICK) {
                Ok(j) => jobs.push_back(j),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            jobs.extend(rx.try_iter());
            if self.conn.is_none() && due(self.tried, Duration::from_secs(1)) {
                self.connect();
            }
            let result = match self.conn.as_mut() {
                Some(c) => work(c, &self.sharing, &mut jobs),
                None => Ok(()),
            };
            if let Err(e) = result {
                self.lost(&e);
            }
            if let Err(e) = self.periodic() {
                self.lost(&e);
            }
            // What is left was not served: PostgreSQL cannot be reached.
            for job in jobs {
                unserved(job);
            }
        }
    }

    fn lost(&mut self, e: &postgres::Error) {
        self.conn = None;
        self.sharing
            .set_unreachable(&crate::records::explain_postgres(e));
    }

    /// Connects, creates the tables, says how many places each member holds here, then shares.
    fn connect(&mut self) {
        self.tried = Some(Instant::now());
        let mut c = match self.open() {
            Ok(c) => c,
            Err(e) => {
                self.sharing
                    .set_unreachable(&crate::records::explain_postgres(&e));
                return;
            }
        };
        let again = self.sharing.reassert(&mut c);
        if let Err(e) = again {
            self.sharing
                .set_unreachable(&crate::records::explain_postgres(&e));
            return;
        }
        self.conn = Some(c);
        self.counted = Some(Instant::now());
        let was = self
            .sharing
            .reachable
            .swap(true, std::sync::atomic::Ordering::AcqRel);
        if !was || !self.connected_once {
            log::info!(
                "members' limits: PostgreSQL answers; they are shared by the {} replicas seen in \
                 the last minute{}",
                self.sharing.replicas(),
                if self.connected_once { " again" } else { "" }
            );
        }
        self.connected_once = true;
    }

    fn open(&mut self) -> Result<Conn, postgres::Error> {
        let mut client = self.config.connect(NoTls)?;
        client.execute("SELECT pg_advisory_lock($1)", &[&SCHEMA_LOCK])?;
        let made = client.batch_execute(SCHEMA);
        let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&SCHEMA_LOCK]);
        made?;
        let st = prepare(&mut client)?;
        let mut c = Conn {
            client,
            st,
            statements: std::cell::Cell::new(0),
        };
        count_replicas(&mut c, &self.sharing)?;
        Ok(c)
    }

    /// What runs every tick whether asked or not.
    fn periodic(&mut self) -> Result<(), postgres::Error> {
        let Some(c) = self.conn.as_mut() else {
            return Ok(());
        };
        let s = &self.sharing;
        let (since, before) = self.reported;
        if since.elapsed() >= Duration::from_secs(10) {
            let now = c.statements.get();
            log::debug!(
                "members' limits: {:.1} PostgreSQL statements per second ",
                (now.saturating_sub(before)) as f64 / since.elapsed().as_secs_f64()
            );
            self.reported = (Instant::now(), now);
        }
        if due(self.counted, Duration::from_secs(1)) && s.has_groups() {
            self.counted = Some(Instant::now());
            count_replicas(c, s)?;
        }
        if due(self.pruned, Duration::from_secs(600)) {
            self.pruned = Some(Instant::now());
            let two_days_ago = unix(SystemTime::now()).saturating_sub(2 * 86_400) as i64;
            let prune = PRUNE.replace("$1", &two_days_ago.to_string());
            c.count();
            c.client.batch_execute(&prune)?;
        }
        let groups = s.all_groups();
        if groups.is_empty() {
            return Ok(());
        }
        for g in &groups {
            settle(c, s, g)?;
        }
        let urgent = groups.iter().any(|g| {
            let st = lock(&g.state);
            st.near && !st.pending.is_empty()
        });
        if urgent {
            push_tokens(c, s, &groups)?;
        }
        if !due(self.synced, TICK) {
            return Ok(());
        }
        self.synced = Some(Instant::now());
        push_tokens(c, s, &groups)?;
        let active: Vec<Arc<Group>> = groups
            .iter()
            .filter(|g| {
                let st = lock(&g.state);
                (st.limits.tpm.is_some() || st.limits.tokens_per_day.is_some())
                    && st.active.is_some_and(|t| t.elapsed() < ACTIVE)
            })
            .cloned()
            .collect();
        read_others(c, s, &active)
    }
}

fn unserved(job: Job) {
    match job {
        Job::Slots(_, Some(r)) | Job::Tokens(_, r) => {
            let _ = r.send(Answer::Unreachable);
        }
        Job::Places(_, r) => {
            let _ = r.send(Placed::Unreachable);
        }
        Job::Usage(_, r) => {
            let _ = r.send(None);
        }
        Job::Slots(_, None) | Job::Wake => {}
    }
}

/// Serves the waiting requests' jobs, in order; a job whose need an earlier one already met is
/// answered without a statement (one lease or one read serves every request waiting for it).
/// Jobs served are removed from `jobs`.
fn work(c: &mut Conn, s: &Arc<Sharing>, jobs: &mut VecDeque<Job>) -> Result<(), postgres::Error> {
    let mut waiting: HashMap<Arc<str>, u64> = HashMap::new();
    let mut places: HashMap<Arc<str>, u64> = HashMap::new();
    let mut reads: Vec<Arc<Group>> = Vec::new();
    for j in jobs.iter() {
        match j {
            Job::Slots(g, _) => *waiting.entry(g.name.clone()).or_default() += 1,
            Job::Places(g, _) => *places.entry(g.name.clone()).or_default() += 1,
            Job::Tokens(g, _) if !reads.iter().any(|r| Arc::ptr_eq(r, g)) => reads.push(g.clone()),
            _ => {}
        }
    }
    if !reads.is_empty() {
        read_others(c, s, &reads)?;
    }
    while let Some(job) = jobs.pop_front() {
        match job {
            Job::Slots(g, reply) => {
                let want = waiting.get(&g.name).copied().unwrap_or(1);
                let answer = lease_slots(c, s, &g, want, reply.is_none())?;
                if let Some(r) = reply {
                    let _ = r.send(answer);
                }
            }
            Job::Places(g, reply) => {
                let waiting = places.entry(g.name.clone()).or_insert(1);
                let answer = claim_places(c, s, &g, *waiting)?;
                *waiting = waiting.saturating_sub(1);
                let _ = reply.send(answer);
            }
            Job::Tokens(_, reply) => {
                let _ = reply.send(Answer::Done);
            }
            Job::Usage(g, reply) => {
                let u = others_use(c, s, &g)?;
                let _ = reply.send(Some(u));
            }
            Job::Wake => {}
        }
    }
    Ok(())
}
