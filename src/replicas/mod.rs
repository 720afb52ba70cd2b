//! Replicas on one PostgreSQL act as one gateway (see the operations guide, "Several
//! replicas"): each heartbeats into a roster, and the upstreams' health the registry decides is
//! shared through a small table, so a cooldown started on one replica applies on all of them
//! within a second, and so does its end.
//!
//! Everything here runs on one thread with one connection of its own (not the record writer's
//! pool, whose connections a long batch may hold), so no request ever waits on PostgreSQL. Each
//! statement gives up after [`STATEMENT_TIMEOUT`]; any failure means "PostgreSQL cannot be
//! reached": the registry is told (health stays local), it is logged once, and the thread keeps
//! trying until it answers again, when sharing resumes without a restart.
//!
//! Cost: an idle replica makes one small read every [`POLL`] and one heartbeat (which reads the
//! roster too) every [`BEAT`]; traffic adds only writes for health transitions (measured in
//! docs/benchmarks.md).

mod sql;

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use actix::Recipient;
use postgres::{Client, NoTls};

use crate::config::SharedConfig;
use crate::metrics::Metrics;
use crate::records::{Store, StoreError};
use crate::registry::{FromStore, HealthEvent, SharedWrite};

/// How often the health rows are read: a change reaches every replica within about this.
pub const POLL: Duration = Duration::from_millis(250);
/// How often a replica beats (and reads the roster).
pub const BEAT: Duration = Duration::from_millis(500);
/// How long a connection or statement may take before PostgreSQL counts as unreachable.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a lost connection is tried again.
const RECONNECT: Duration = Duration::from_secs(1);
/// Beats between two clean-ups of replicas gone for an hour.
const FORGET_EVERY: u32 = 120;

/// One replica in the roster, as the status page shows it.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Unique per process: host name, process id and start time (see [`local_id`]).
    pub id: String,
    /// Host name.
    pub host: String,
    /// The address it listens on.
    pub listen: String,
    /// Its version.
    pub version: String,
    /// When it last beat.
    pub seen: SystemTime,
}

/// The replicas seen in the last minute, as last read (shared with the status page).
#[derive(Clone)]
pub struct Roster(Arc<RwLock<(Vec<Replica>, bool)>>);

impl Roster {
    /// The replicas, and whether PostgreSQL answered the last read.
    pub fn list(&self) -> (Vec<Replica>, bool) {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set(&self, list: Option<Vec<Replica>>) {
        let mut g = match self.0.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match list {
            Some(l) => *g = (l, true),
            None => g.1 = false,
        }
    }
}

/// The host name, for the roster (no dependency for one read of the kernel's).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// This process's id in the roster: its host, process id and start time (unique per process,
/// also when a replica restarts on the same address).
pub fn local_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let started = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        format!("{}/{}/{started}", host_name(), std::process::id())
    })
}

/// The replicas seen in the last minute, this one included (for a member's share of a limit
/// while PostgreSQL cannot be reached, see the members guide); 1 with SQLite.
pub fn seen_last_minute(store: &Store) -> Result<u64, StoreError> {
    crate::records::shared::seen_last_minute(store)
}

/// Starts the replicas' thread when `database` (the `-database` value) is a PostgreSQL, as the
/// replica listening on `listen`; what it learns goes to `registry`. None (health local) with
/// SQLite, or when the thread cannot start (logged).
pub fn start(
    database: Option<&str>,
    listen: &str,
    registry: Recipient<FromStore>,
    config: SharedConfig,
    metrics: Metrics,
) -> Option<Roster> {
    let target = crate::records::postgres_target(database?)?;
    let mut pg: postgres::Config = match target.parse() {
        Ok(pg) => pg,
        Err(e) => {
            log::error!("replicas: health will not be shared: {e}");
            return None;
        }
    };
    pg.connect_timeout(STATEMENT_TIMEOUT)
        .tcp_user_timeout(STATEMENT_TIMEOUT)
        .application_name("openai-api-route replicas");
    let (tx, rx) = channel();
    let id: Arc<str> = local_id().into();
    registry.do_send(FromStore::Attach {
        id: id.clone(),
        writes: tx,
    });
    // Reachable until a statement says otherwise: the start-up already connected.
    let roster = Roster(Arc::new(RwLock::new((Vec::new(), true))));
    let me = Replica {
        id: id.to_string(),
        host: host_name(),
        listen: listen.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        seen: SystemTime::now(),
    };
    let mut link = Link {
        pg,
        conn: None,
        me,
        id,
        registry,
        config,
        metrics,
        roster: roster.clone(),
        reachable: None,
        last_try: None,
        ensured: Vec::new(),
        versions: Default::default(),
    };
    match std::thread::Builder::new()
        .name("replicas".into())
        .spawn(move || link.run(rx))
    {
        Ok(_) => Some(roster),
        Err(e) => {
            log::error!("replicas: health will not be shared: {e}");
            None
        }
    }
}

/// The thread's state.
struct Link {
    pg: postgres::Config,
    conn: Option<Client>,
    me: Replica,
    id: Arc<str>,
    registry: Recipient<FromStore>,
    config: SharedConfig,
    metrics: Metrics,
    roster: Roster,
    /// What the registry was last told (None: nothing yet).
    reachable: Option<bool>,
    last_try: Option<Instant>,
    /// The upstream names whose rows exist.
    ensured: Vec<String>,
    /// The version of each row last sent to the registry.
    versions: std::collections::HashMap<String, i64>,
}

impl Link {
    fn run(&mut self, rx: Receiver<SharedWrite>) {
        let (mut next_poll, mut next_beat) = (Instant::now(), Instant::now());
        let mut beats = 0u32;
        loop {
            let now = Instant::now();
            let due = next_poll.min(next_beat);
            if due > now {
                match rx.recv_timeout(due - now) {
                    Ok(w) => {
                        self.write(w);
                        continue;
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    // The registry is gone: the process is ending.
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            let now = Instant::now();
            if now >= next_poll {
                next_poll = now + POLL;
                self.poll();
            }
            if now >= next_beat {
                next_beat = now + BEAT;
                beats = beats.wrapping_add(1);
                self.beat(beats % FORGET_EVERY == 1);
            }
        }
    }

    /// Whether there is a connection, made again when lost (at most once per [`RECONNECT`]).
    fn connect(&mut self) -> bool {
        if self.conn.is_some() {
            return true;
        }
        if self.reachable == Some(false) && self.last_try.is_some_and(|t| t.elapsed() < RECONNECT) {
            return false;
        }
        self.last_try = Some(Instant::now());
        let made = self.pg.connect(NoTls).and_then(|mut c| {
            let ms = STATEMENT_TIMEOUT.as_millis();
            c.batch_execute(&format!("SET statement_timeout = {ms}"))?;
            Ok(c)
        });
        match made {
            Ok(c) => {
                self.conn = Some(c);
                self.ensured.clear();
                true
            }
            Err(e) => {
                self.unreachable(&e);
                false
            }
        }
    }

    /// A statement failed: health is local until PostgreSQL answers again (said once).
    fn unreachable(&mut self, e: &postgres::Error) {
        self.conn = None;
        self.roster.set(None);
        if self.reachable != Some(false) {
            log::warn!(
                "replicas: PostgreSQL cannot be reached ({}); health stays local, trying again",
                crate::records::explain_pg(e)
            );
            self.reachable = Some(false);
            self.registry.do_send(FromStore::Reachable(false));
        }
    }

    fn reached(&mut self) {
        if self.reachable != Some(true) {
            if self.reachable.is_some() {
                log::info!("replicas: PostgreSQL answers again; health is shared again");
            }
            self.reachable = Some(true);
            self.versions.clear();
            self.registry.do_send(FromStore::Reachable(true));
        }
    }

    fn poll(&mut self) {
        let names: Vec<String> = self
            .config
            .get()
            .upstreams
            .iter()
            .map(|u| u.name.to_string())
            .collect();
        let fresh = self.ensured != names;
        if !self.connect() {
            return;
        }
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        let read = (|| {
            if fresh {
                sql::ensure(c, &names)?;
            }
            sql::rows(c, &names)
        })();
        match read {
            Ok(rows) => {
                self.ensured = names;
                let was = self.reachable;
                self.reached();
                if was != Some(true) {
                    // The registry first pushes what it learned alone; rows follow next poll.
                    return;
                }
                let rows: Vec<_> = rows
                    .into_iter()
                    .filter(|r| self.versions.get(&r.upstream) != Some(&r.version))
                    .collect();
                self.send_rows(rows);
            }
            Err(e) => self.unreachable(&e),
        }
    }

    fn send_rows(&mut self, rows: Vec<crate::registry::SharedRow>) {
        if rows.is_empty() {
            return;
        }
        for r in &rows {
            self.versions.insert(r.upstream.clone(), r.version);
        }
        self.registry.do_send(FromStore::Rows(rows));
    }

    fn beat(&mut self, forget: bool) {
        let (me, id) = (self.me.clone(), self.id.clone());
        if !self.connect() {
            return;
        }
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        let read = sql::beat(c, &me, &id).and_then(|l| {
            if forget {
                sql::forget_old(c)?;
            }
            Ok(l)
        });
        match read {
            Ok(list) => {
                self.metrics.set_replicas(list.len());
                self.roster.set(Some(list));
            }
            Err(e) => self.unreachable(&e),
        }
    }

    /// Carries out one of the registry's writes; when PostgreSQL cannot be reached, the alert
    /// it carries is the registry's to send alone.
    fn write(&mut self, w: SharedWrite) {
        let id = self.id.clone();
        let alert = match &w {
            SharedWrite::Cooldown { alert, .. } | SharedWrite::Recovered { alert, .. } => {
                alert.clone()
            }
            _ => None,
        };
        if !self.connect() {
            self.alone(alert);
            return;
        }
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        let mut granted = None;
        let done: Result<(Option<crate::registry::SharedRow>, Option<HealthEvent>), _> = match w {
            SharedWrite::Cooldown {
                upstream,
                secs,
                down,
                probe_every,
                alert,
            } => sql::cooldown(c, &upstream, secs, down, &id, probe_every).map(|r| match r {
                Some((row, was_down)) => (Some(row), alert.filter(|_| !was_down)),
                None => (None, None),
            }),
            SharedWrite::Recovered {
                upstream,
                epoch,
                alert,
            } => sql::recovered(c, &upstream, epoch, &id).map(|r| match r {
                Some((row, was_down)) => (Some(row), alert.filter(|_| was_down)),
                None => (None, None),
            }),
            SharedWrite::ClaimHalfOpen { upstream, hold } => {
                let preclaim = crate::registry::PRECLAIM.as_secs_f64();
                sql::claim_half_open(c, &upstream, hold, &id, preclaim).map(|r| (r, None))
            }
            SharedWrite::Probed { upstream, result } => {
                sql::probed(c, &upstream, result).map(|r| (r, None))
            }
            SharedWrite::Release { upstream } => sql::release(c, &upstream, &id).map(|r| (r, None)),
            SharedWrite::ClaimProbe { upstream, every } => sql::claim_probe(c, &upstream, every)
                .map(|r| {
                    if r.is_some() {
                        granted = Some(upstream);
                    }
                    (r, None)
                }),
        };
        match done {
            Ok((row, alert)) => {
                // The row before the grant: the probe then starts on the row's state.
                self.send_rows(row.into_iter().collect());
                if let Some(name) = granted {
                    self.registry.do_send(FromStore::ProbeGranted(name));
                }
                if let Some(a) = alert {
                    self.registry.do_send(FromStore::Alert(a));
                }
            }
            Err(e) => {
                self.unreachable(&e);
                self.alone(alert);
            }
        }
    }

    /// The registry sends this alert itself: nobody else can know of the transition.
    fn alone(&self, alert: Option<HealthEvent>) {
        if let Some(a) = alert {
            self.registry.do_send(FromStore::Alert(a));
        }
    }
}
