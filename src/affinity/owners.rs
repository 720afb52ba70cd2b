//! Who owns which object (see the affinity guide, docs/affinity.md): an in-memory map that the
//! request path reads with one short lock and never a database round trip.
//!
//! It is filled the moment the relaying replica reads an answer's id (so that replica knows at
//! once), and from the record store by [`super::reading`]: at start, by the PostgreSQL poll
//! (other replicas write there) and by a reload that turns `rebuild` on. With `-database none`
//! the map is the only store. It keeps the newest [`CAPACITY`] owners; each Responses answer also
//! keeps its chain link (request input and output items) for rebuilding, within a byte budget
//! (`rebuild_memory`, see [`Owners::set_budget`]) that every way in shares: the oldest links go
//! first, so memory stays bounded however many chains the store holds.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::records::owner_rows::OwnerRow;

use super::rebuild::Link;

/// Owners kept in memory (the affinity guide: "the last 100,000").
pub const CAPACITY: usize = 100_000;
/// The longest chain followed back (a loop or an absurd chain is not rebuilt).
pub const MAX_CHAIN: usize = 1_000;

/// Where a link goes in the eviction order: links read back from the store are older than every
/// link already held (a read goes newest first), links learned live or polled are the newest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Age {
    /// Evicted last.
    Newest,
    /// Evicted first.
    Oldest,
}

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
pub struct Owners {
    inner: Mutex<Inner>,
    /// Entries, readable without the lock: an empty map costs a request nothing.
    len: AtomicUsize,
    /// Bytes of links held at most (`rebuild_memory`; 0 while `rebuild` is off).
    budget: AtomicUsize,
    /// Held by a read of chain parts from the store, so that two (a start-up read and a
    /// reload's, or two reloads) never both fill the same room.
    reading: Mutex<()>,
}

impl Default for Owners {
    fn default() -> Self {
        Owners {
            inner: Mutex::default(),
            len: AtomicUsize::new(0),
            budget: AtomicUsize::new(crate::config::Limits::default().rebuild_memory),
            reading: Mutex::new(()),
        }
    }
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

    /// Serialises reads of chain parts from the store (see [`Owners::reading`]).
    pub(super) fn reading(&self) -> MutexGuard<'_, ()> {
        match self.reading.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Holds at most `bytes` of chain links from now on, dropping the oldest beyond (0 drops
    /// them all). Returns the budget it replaced.
    pub fn set_budget(&self, bytes: usize) -> usize {
        let mut g = self.lock();
        let old = self.budget.swap(bytes, Ordering::Relaxed);
        evict_links(&mut g, bytes);
        old
    }

    /// The link budget in force.
    pub fn budget(&self) -> usize {
        self.budget.load(Ordering::Relaxed)
    }

    /// Bytes of chain links held.
    pub fn link_bytes(&self) -> usize {
        self.lock().link_bytes
    }

    /// Whether `id` is owned by `upstream` without its chain link: only then is its part worth
    /// reading from the store (an unknown id was forgotten or pushed out, a held link is held).
    pub(super) fn wants_link(&self, id: &str, upstream: &str) -> bool {
        self.lock()
            .map
            .get(id)
            .is_some_and(|e| *e.upstream == *upstream && e.link.is_none())
    }

    /// Gives `id`, owned by `upstream`, its chain `link` read back from the store, placed in the
    /// eviction order by `age`; nothing changes when it is no longer so owned or already has one.
    pub(super) fn attach_link(&self, id: &str, upstream: &str, link: Link, age: Age) {
        let mut g = self.lock();
        let g = &mut *g;
        let Some((key, e)) = g.map.get_key_value(id) else {
            return;
        };
        if *e.upstream != *upstream || e.link.is_some() {
            return;
        }
        let key = key.clone();
        let link = Arc::new(link);
        g.link_bytes += link.bytes();
        if let Some(e) = g.map.get_mut(id) {
            e.link = Some(link);
        }
        match age {
            Age::Newest => g.links.push_back(key),
            Age::Oldest => g.links.push_front(key),
        }
        evict_links(g, self.budget.load(Ordering::Relaxed));
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
        evict_links(g, self.budget.load(Ordering::Relaxed));
        // Ids whose link was replaced stay queued; keep the queue from growing without bound.
        if g.links.len() > 2 * CAPACITY {
            let map = &g.map;
            g.links
                .retain(|k| map.get(k).is_some_and(|e| e.link.is_some()));
        }
    }

    /// The chain that ends with response `id`, oldest first: every link followed back through
    /// `previous_response_id` to one without it. None when any response of it is unknown, has no
    /// whole link, or belongs to an upstream not in `cfg` (without the whole chain, nothing is
    /// rebuilt: see the affinity guide, "Rebuilding a Responses chain").
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

    /// Owners read from the record store, oldest first (their chain parts are read apart, see
    /// [`super::reading`]). Rows of one upstream share its name.
    pub fn load(&self, rows: &[OwnerRow]) {
        let mut names: Vec<Arc<str>> = Vec::new();
        for r in rows {
            let upstream = match names.iter().find(|n| ***n == *r.upstream) {
                Some(n) => n.clone(),
                None => {
                    let n: Arc<str> = r.upstream.as_str().into();
                    names.push(n.clone());
                    n
                }
            };
            self.put(&r.object_id, &upstream, r.created_at, None);
            if let Some(m) = &r.member {
                if let Some(e) = self.lock().map.get_mut(r.object_id.as_str()) {
                    e.member.get_or_insert_with(|| m.as_str().into());
                }
            }
        }
    }

    /// Owners another replica learned through "not here" (see the affinity guide, "Several
    /// replicas"): each is taken only where no owner is known, as the first owner wins.
    pub fn load_learned(&self, rows: &[OwnerRow]) {
        for r in rows {
            if self.lock().map.contains_key(r.object_id.as_str()) {
                continue;
            }
            let upstream: Arc<str> = r.upstream.as_str().into();
            self.put(&r.object_id, &upstream, r.created_at, None);
        }
    }
}

/// Drops the oldest links until those held fit in `budget`.
fn evict_links(g: &mut Inner, budget: usize) {
    while g.link_bytes > budget {
        let Some(old) = g.links.pop_front() else {
            break;
        };
        if let Some(l) = g.map.get_mut(&old).and_then(|e| e.link.take()) {
            g.link_bytes = g.link_bytes.saturating_sub(l.bytes());
        }
    }
    if g.link_bytes == 0 {
        g.links.clear();
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
            chain_bytes: 0,
        }
    }

    #[test]
    fn owners_expire_with_retention_and_leave_with_their_upstream() {
        let o = Owners::default();
        o.load(&[row("old", "a", 3), row("new", "a", 0), row("gone", "b", 0)]);
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
        let link = |body: &str| Link::from_record(body, "[]".into()).unwrap();
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

    #[test]
    fn the_link_budget_keeps_the_newest_links_whatever_their_way_in() {
        let o = Owners::default();
        let c = cfg(0, &["a"]);
        let a: Arc<str> = "a".into();
        let link = || Link::from_record(r#"{"input":"0123456789"}"#, "[]".into()).unwrap();
        let cost = link().bytes();
        o.set_budget(3 * cost);
        for id in ["r1", "r2", "r3"] {
            o.learn_link(id, &a, link());
        }
        assert_eq!(o.link_bytes(), 3 * cost);
        // A part read back from the store is older than every link held: it goes first.
        o.learn("r0", &a).unwrap();
        assert!(o.wants_link("r0", "a"));
        o.set_budget(4 * cost);
        o.attach_link("r0", "a", link(), Age::Oldest);
        assert!(!o.wants_link("r0", "a"), "held");
        o.learn_link("r4", &a, link());
        let held = |o: &Owners| -> Vec<&str> {
            ["r0", "r1", "r2", "r3", "r4"]
                .into_iter()
                .filter(|id| o.chain(id, &c).is_some())
                .collect()
        };
        assert_eq!(held(&o), ["r1", "r2", "r3", "r4"]);
        // A smaller budget drops the oldest at once; none drops them all.
        assert_eq!(o.set_budget(2 * cost), 4 * cost);
        assert_eq!(held(&o), ["r3", "r4"]);
        assert_eq!(o.set_budget(0), 2 * cost);
        assert_eq!(o.link_bytes(), 0);
        assert!(held(&o).is_empty());
        assert_eq!(o.len(), 5, "owners stay");
        // A part is never attached to an id no longer owned (forgotten), nor to another owner.
        o.set_budget(10 * cost);
        o.forget("r1");
        o.attach_link("r1", "a", link(), Age::Oldest);
        o.attach_link("r2", "b", link(), Age::Oldest);
        assert_eq!(o.owner_of("r1", &c), None);
        assert_eq!(o.link_bytes(), 0);
    }
}
