//! Who owns which object (SPEC 4f "Owners"): an in-memory map that the request path reads with
//! one short lock and never a database round trip.
//!
//! It is filled the moment the relaying replica reads an answer's id (so that replica knows at
//! once), at start from the record store (the newest [`CAPACITY`] owners within
//! `retention_days`), and — with PostgreSQL, where other replicas write — by a background poll
//! every [`POLL`] that reads the owners recorded since the last one. With `-database none` the
//! map is the only store. It keeps the newest [`CAPACITY`] owners; each Responses answer also
//! keeps its chain link (request input and output items) for rebuilding, within
//! [`CHAIN_BUDGET`] bytes in all (the oldest links go first).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::records::owners::{fill_chains, newest_owners, owners_after, OwnerRow};
use crate::records::Store;

use super::rebuild::Link;

/// Owners kept in memory (SPEC 4f: "the last 100,000").
pub const CAPACITY: usize = 100_000;
/// Bytes of chain links (request inputs and output items) kept in memory in all.
pub const CHAIN_BUDGET: usize = 64 << 20;
/// How often the PostgreSQL poll reads owners written by other replicas.
pub const POLL: Duration = Duration::from_millis(400);
/// The poll re-reads this many ids before the last one it saw: a transaction that took an
/// earlier id may commit after a later one.
const POLL_OVERLAP: i64 = 2_000;
/// Chain parts read at start (the newest): reading every stored request body would make a
/// large database slow to start.
const START_CHAINS: usize = 10_000;
/// The longest chain followed back (a loop or an absurd chain is not rebuilt).
pub const MAX_CHAIN: usize = 1_000;

struct Entry {
    upstream: Arc<str>,
    /// The member whose request created it (see the members guide), when it was seen created.
    member: Option<Arc<str>>,
    at: SystemTime,
    link: Option<Arc<Link>>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Arc<str>, Entry>,
    /// Insertion order, for the capacity bound.
    order: VecDeque<Arc<str>>,
    /// Ids with a link, oldest first, for the chain budget.
    links: VecDeque<Arc<str>>,
    link_bytes: usize,
}

/// See the module docs.
#[derive(Default)]
pub struct Owners {
    inner: Mutex<Inner>,
    /// Entries, readable without the lock: an empty map costs a request nothing.
    len: AtomicUsize,
}

/// An owner as a request sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The upstream's name.
    pub upstream: Arc<str>,
}

impl Owners {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Whether no owner is known (the request path skips every lookup then).
    pub fn is_empty(&self) -> bool {
        self.len.load(Ordering::Relaxed) == 0
    }

    /// Owners known.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// The owner of `id` under `cfg`: none when unknown, expired (`retention_days`), or no
    /// longer in the config (a reload removed it: it is forgotten).
    pub fn owner_of(&self, id: &str, cfg: &Config) -> Option<Arc<str>> {
        if self.is_empty() {
            return None;
        }
        let mut g = self.lock();
        let e = g.map.get(id)?;
        let expired = cfg.retention_days > 0
            && e.at.elapsed().unwrap_or_default()
                > Duration::from_secs(u64::from(cfg.retention_days) * 86_400);
        let gone = !cfg.upstreams.iter().any(|u| u.name == e.upstream);
        if expired || gone {
            if let Some(e) = g.map.remove(id) {
                self.len.fetch_sub(1, Ordering::Relaxed);
                if let Some(l) = e.link {
                    g.link_bytes = g.link_bytes.saturating_sub(l.bytes());
                }
            }
            return None;
        }
        Some(e.upstream.clone())
    }

    /// `upstream` owns `id` from now on (an answer named it, or answered 2xx for it), unless
    /// another upstream already does: the first owner wins (see the affinity guide), and the
    /// other one is returned for the caller to log and count as a conflict.
    pub fn learn(&self, id: &str, upstream: &Arc<str>) -> Result<(), Arc<str>> {
        self.learn_for(id, upstream, None)
    }

    /// [`Owners::learn`] for an object `member`'s request created: it is that member's too.
    pub fn learn_for(
        &self,
        id: &str,
        upstream: &Arc<str>,
        member: Option<&Arc<str>>,
    ) -> Result<(), Arc<str>> {
        if let Some(e) = self.lock().map.get(id) {
            if e.upstream != *upstream {
                return Err(e.upstream.clone());
            }
        }
        self.put(id, upstream, SystemTime::now(), None);
        if let Some(m) = member {
            if let Some(e) = self.lock().map.get_mut(id) {
                e.member.get_or_insert_with(|| m.clone());
            }
        }
        Ok(())
    }

    /// The member whose request created `id`, when the gateway saw it created and `id` is still
    /// owned under `cfg` (None for an object it never saw created).
    pub fn member_of(&self, id: &str, cfg: &Config) -> Option<Arc<str>> {
        self.owner_of(id, cfg)?;
        self.lock().map.get(id).and_then(|e| e.member.clone())
    }

    /// `id` was deleted at its owner: owner and chain part are forgotten, and a later reference
    /// is routed as an unseen id.
    pub fn forget(&self, id: &str) -> bool {
        if self.is_empty() {
            return false;
        }
        let mut g = self.lock();
        let Some(e) = g.map.remove(id) else {
            return false;
        };
        self.len.fetch_sub(1, Ordering::Relaxed);
        if let Some(l) = e.link {
            g.link_bytes = g.link_bytes.saturating_sub(l.bytes());
        }
        true
    }

    /// `upstream` owns the response `id`, whose chain link is `link` (kept for rebuilding);
    /// nothing changes when another upstream owns it (the first owner wins).
    pub fn learn_link(&self, id: &str, upstream: &Arc<str>, link: Link) {
        if let Some(e) = self.lock().map.get(id) {
            if e.upstream != *upstream {
                return;
            }
        }
        self.put(id, upstream, SystemTime::now(), Some(Arc::new(link)));
    }

    fn put(&self, id: &str, upstream: &Arc<str>, at: SystemTime, link: Option<Arc<Link>>) {
        if id.is_empty() {
            return;
        }
        let mut g = self.lock();
        let g = &mut *g;
        let key: Arc<str> = match g.map.get_key_value(id) {
            Some((k, _)) => k.clone(),
            None => id.into(),
        };
        let fresh = !g.map.contains_key(id);
        let entry = g.map.entry(key.clone()).or_insert_with(|| Entry {
            upstream: upstream.clone(),
            member: None,
            at,
            link: None,
        });
        if entry.upstream != *upstream {
            entry.upstream = upstream.clone();
            if let Some(old) = entry.link.take() {
                g.link_bytes = g.link_bytes.saturating_sub(old.bytes());
            }
        }
        entry.at = at;
        if let Some(link) = link {
            if let Some(old) = entry.link.replace(link.clone()) {
                g.link_bytes = g.link_bytes.saturating_sub(old.bytes());
            }
            g.link_bytes += link.bytes();
            g.links.push_back(key.clone());
        }
        if fresh {
            g.order.push_back(key);
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        while g.map.len() > CAPACITY {
            let Some(old) = g.order.pop_front() else {
                break;
            };
            if let Some(e) = g.map.remove(&old) {
                self.len.fetch_sub(1, Ordering::Relaxed);
                if let Some(l) = e.link {
                    g.link_bytes = g.link_bytes.saturating_sub(l.bytes());
                }
            }
        }
        while g.link_bytes > CHAIN_BUDGET {
            let Some(old) = g.links.pop_front() else {
                break;
            };
            if let Some(l) = g.map.get_mut(&old).and_then(|e| e.link.take()) {
                g.link_bytes = g.link_bytes.saturating_sub(l.bytes());
            }
        }
        // Ids whose link was replaced stay queued; keep the queue from growing without bound.
        if g.links.len() > 2 * CAPACITY {
            let map = &g.map;
            g.links
                .retain(|k| map.get(k).is_some_and(|e| e.link.is_some()));
        }
    }

    /// The chain that ends with response `id`, oldest first: every link followed back through
    /// `previous_response_id` to one without it. None when any response of it is unknown, has no
    /// whole link, or belongs to an upstream not in `cfg` (SPEC 4f: without the whole chain,
    /// nothing is rebuilt).
    pub fn chain(&self, id: &str, cfg: &Config) -> Option<Vec<Arc<Link>>> {
        let mut out = Vec::new();
        let mut next = Some(id.to_string());
        while let Some(id) = next {
            if out.len() >= MAX_CHAIN {
                return None;
            }
            self.owner_of(&id, cfg)?;
            let link = self.lock().map.get(id.as_str())?.link.clone()?;
            next = link.previous.clone();
            out.push(link);
        }
        out.reverse();
        Some(out)
    }

    /// Whether `row` adds nothing: its owner is known, with its chain part when it has one.
    fn knows(&self, row: &OwnerRow) -> bool {
        let g = self.lock();
        g.map
            .get(row.object_id.as_str())
            .is_some_and(|e| *e.upstream == *row.upstream && (e.link.is_some() || !row.has_chain))
    }

    /// Owners read from the record store (start-up load and poll).
    pub fn load(&self, rows: Vec<OwnerRow>) {
        for r in rows {
            let upstream: Arc<str> = r.upstream.as_str().into();
            let link = r
                .chain
                .as_ref()
                .and_then(|(body, items)| Link::from_record(body, items))
                .map(Arc::new);
            self.put(&r.object_id, &upstream, r.created_at, link);
            if let Some(m) = r.member {
                if let Some(e) = self.lock().map.get_mut(r.object_id.as_str()) {
                    e.member.get_or_insert_with(|| m.into());
                }
            }
        }
    }

    /// The rows of a read that add something, with their chain parts read (at most `chains`
    /// of them, the newest).
    fn take_new(
        &self,
        store: &Store,
        mut rows: Vec<OwnerRow>,
        chains: usize,
    ) -> Result<Vec<OwnerRow>, crate::records::StoreError> {
        if chains == 0 {
            rows.iter_mut().for_each(|r| r.has_chain = false);
        }
        rows.retain(|r| !self.knows(r));
        let with_chain = rows.iter().filter(|r| r.has_chain).count();
        for r in rows
            .iter_mut()
            .filter(|r| r.has_chain)
            .take(with_chain.saturating_sub(chains))
        {
            r.has_chain = false;
        }
        fill_chains(store, &mut rows)?;
        Ok(rows)
    }
}

/// How many chain parts to read: none unless `rebuild` is on (memory holds no links then).
fn chains_wanted(cfg: &Config, n: usize) -> usize {
    if cfg.rebuild {
        n
    } else {
        0
    }
}

/// The cut-off of the owners worth loading under `cfg` (`retention_days`; 0 = all).
fn since(cfg: &Config) -> SystemTime {
    match cfg.retention_days {
        0 => SystemTime::UNIX_EPOCH,
        d => SystemTime::now() - Duration::from_secs(u64::from(d) * 86_400),
    }
}

/// Loads the newest owners from `store` (at start, before listening; bounded by [`CAPACITY`]).
/// Returns the highest record id read, where the poll goes on from.
pub fn load_at_start(owners: &Owners, store: &Store, cfg: &Config) -> i64 {
    let read = newest_owners(store, since(cfg), CAPACITY as i64)
        .and_then(|rows| owners.take_new(store, rows, chains_wanted(cfg, START_CHAINS)));
    match read {
        Ok(rows) => {
            let last = rows.iter().map(|r| r.row).max().unwrap_or(0);
            let n = rows.len();
            owners.load(rows);
            if n > 0 {
                log::info!("affinity: {n} object owners loaded from the records");
            }
            last
        }
        Err(e) => {
            log::warn!("affinity: reading object owners failed: {}", e.message);
            0
        }
    }
}

/// Starts the PostgreSQL poll on its own thread: every [`POLL`], the owners other replicas
/// recorded since the last read (off every request's path; a failed read is logged and retried
/// at the next tick).
pub fn spawn_poll(
    owners: Arc<Owners>,
    store: Store,
    config: crate::config::SharedConfig,
    mut last: i64,
) {
    let spawned = std::thread::Builder::new()
        .name("owners-poll".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                std::thread::sleep(POLL);
                let cfg = config.get();
                let from = last.saturating_sub(POLL_OVERLAP).max(0);
                let read = owners_after(&store, from, since(&cfg), 10_000).and_then(|rows| {
                    let top = rows.iter().map(|r| r.row).max();
                    let chains = chains_wanted(&cfg, usize::MAX);
                    Ok((top, owners.take_new(&store, rows, chains)?))
                });
                match read {
                    Ok((top, rows)) => {
                        failing = false;
                        last = last.max(top.unwrap_or(0));
                        owners.load(rows);
                    }
                    Err(e) if !failing => {
                        failing = true;
                        log::warn!("affinity: polling object owners failed: {}", e.message);
                    }
                    Err(_) => {}
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("affinity: cannot start the owners poll: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(retention_days: u32, names: &[&str]) -> Config {
        let mut text = format!("authorization: x\nretention_days: {retention_days}\nupstreams:\n");
        for n in names {
            text.push_str(&format!(
                "  - name: {n}\n    endpoint: http://127.0.0.1:9/v1\n"
            ));
        }
        crate::config::parse(std::path::Path::new("t.yaml"), &text, false, &|_| None)
            .unwrap()
            .0
    }

    fn row(id: &str, up: &str, days_ago: u64) -> OwnerRow {
        OwnerRow {
            row: 1,
            object_id: id.into(),
            upstream: up.into(),
            created_at: SystemTime::now() - Duration::from_secs(days_ago * 86_400),
            member: None,
            has_chain: false,
            chain: None,
        }
    }

    #[test]
    fn owners_expire_with_retention_and_leave_with_their_upstream() {
        let o = Owners::default();
        o.load(vec![
            row("old", "a", 3),
            row("new", "a", 0),
            row("gone", "b", 0),
        ]);
        assert_eq!(o.owner_of("new", &cfg(2, &["a"])).as_deref(), Some("a"));
        assert_eq!(
            o.owner_of("old", &cfg(0, &["a"])).as_deref(),
            Some("a"),
            "0 keeps all"
        );
        assert_eq!(o.owner_of("old", &cfg(2, &["a"])), None, "expired");
        assert_eq!(
            o.owner_of("gone", &cfg(0, &["a"])),
            None,
            "its upstream was removed"
        );
        assert_eq!(
            o.owner_of("gone", &cfg(0, &["a", "b"])),
            None,
            "and it is forgotten"
        );
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn a_chain_with_a_missing_or_cut_link_is_none() {
        let o = Owners::default();
        let c = cfg(0, &["a"]);
        let a: Arc<str> = "a".into();
        let link = |body: &str| Link::from_record(body, "[]").unwrap();
        o.learn_link("r1", &a, link(r#"{"input":"one"}"#));
        o.learn_link(
            "r2",
            &a,
            link(r#"{"input":"two","previous_response_id":"r1"}"#),
        );
        o.learn_link(
            "r4",
            &a,
            link(r#"{"input":"four","previous_response_id":"r3"}"#),
        );
        o.learn("r3b", &a).unwrap();
        o.learn_link(
            "r5",
            &a,
            link(r#"{"input":"five","previous_response_id":"r3b"}"#),
        );
        assert_eq!(o.chain("r2", &c).map(|v| v.len()), Some(2));
        assert!(o.chain("r4", &c).is_none(), "r3 was never seen");
        assert!(o.chain("r5", &c).is_none(), "r3b has no whole link");
    }

    #[test]
    fn the_first_owner_wins_and_a_deleted_object_is_forgotten() {
        let o = Owners::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let c = cfg(0, &["a", "b"]);
        o.learn("file-1", &a).unwrap();
        assert_eq!(o.learn("file-1", &b).unwrap_err(), a);
        assert_eq!(o.owner_of("file-1", &c), Some(a.clone()));
        assert!(o.forget("file-1"));
        assert_eq!(o.owner_of("file-1", &c), None);
        assert!(!o.forget("file-1"));
        o.learn("file-1", &b).unwrap();
        assert_eq!(o.owner_of("file-1", &c), Some(b));
    }

    #[test]
    fn the_map_keeps_the_newest_owners() {
        let o = Owners::default();
        let a: Arc<str> = "a".into();
        for i in 0..CAPACITY + 10 {
            o.learn(&format!("id{i}"), &a).unwrap();
        }
        assert_eq!(o.len(), CAPACITY);
        let c = cfg(0, &["a"]);
        assert_eq!(o.owner_of("id0", &c), None);
        assert!(o.owner_of(&format!("id{}", CAPACITY + 9), &c).is_some());
    }
}
