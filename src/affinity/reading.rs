//! Reading owners and their chain parts back from the record store (see the affinity guide,
//! docs/affinity.md, "Several replicas" and "Bounded reading"): at start, in the PostgreSQL poll,
//! and when a reload turns `rebuild` on or raises `rebuild_memory`.
//!
//! Every read shares the budget of the links learned live ([`budget`]). Owner rows come without
//! bodies but with the size of each chain part, so the parts worth reading — newest first, as
//! many as fit in the room the budget leaves ([`pick`]) — are chosen before any is read; those
//! are then read in batches of at most [`BATCH_BYTES`] and each made a link at once. Memory at
//! start thus peaks at the budget plus one batch, however many records the store holds, and no
//! body is read that would not be kept.
//!
//! The poll reads only records it has not read before ([`Cursor`]): its one query per tick
//! returns the ids of the recent owner records, a window of [`POLL_OVERLAP`] ids back (a
//! transaction that took an earlier id may commit after a later one), and only ids it has not
//! seen are read further. An idle replica therefore reads a few integers per tick and no body.
//! Owners a replica learned through "not here" live in a table of their own (they have no
//! record naming them); the poll reads it the same way, with a cursor of its own.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::{Config, SharedConfig};
use crate::records::owner_rows::{
    chain_parts, learned_by_ids, learned_ids_after, newest_learned, newest_owners, owner_ids_after,
    owners_by_ids, OwnerRow,
};
use crate::records::{Store, StoreError};

use super::owners::{Age, Owners, CAPACITY};
use super::rebuild::Link;

/// How often the PostgreSQL poll reads owners written by other replicas.
pub const POLL: Duration = Duration::from_millis(400);
/// How far back (in record ids) the poll looks for owner records it has not seen: a record that
/// took an earlier id may become visible after a later one.
pub const POLL_OVERLAP: i64 = 2_000;
/// Owner ids one poll reads at most (a burst beyond is read by the next ticks).
const POLL_LIMIT: i64 = 10_000;
/// Bytes of chain parts (as stored) read in one query; a larger part is read alone.
pub const BATCH_BYTES: u64 = 4 << 20;
/// Records per chain-part query.
const BATCH_ROWS: usize = 500;

/// The link budget `cfg` gives: `rebuild_memory` with `rebuild` on; none without it (memory
/// holds no links then, the records keep them).
pub fn budget(cfg: &Config) -> usize {
    if cfg.rebuild {
        cfg.limits.rebuild_memory
    } else {
        0
    }
}

/// What holding the chain part of `row` costs against the budget, at most: its link keeps the
/// request's `input` (part of the body) and the items, plus [`Link::OVERHEAD`].
fn cost(row: &OwnerRow) -> usize {
    usize::try_from(row.chain_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(Link::OVERHEAD)
}

/// The chain parts to read from `rows` (given newest first) within `room` bytes: each in turn
/// while it fits in what is left; one too large is passed over and an older, smaller one may
/// still fit.
pub fn pick<'a>(rows: impl IntoIterator<Item = &'a OwnerRow>, room: usize) -> Vec<&'a OwnerRow> {
    let mut left = room;
    let mut out = Vec::new();
    for r in rows {
        let c = cost(r);
        if c <= left {
            left -= c;
            out.push(r);
        }
        if left < Link::OVERHEAD {
            break;
        }
    }
    out
}

/// The cut-off of the owners worth loading under `cfg` (`retention_days`; 0 = all).
fn since(cfg: &Config) -> SystemTime {
    match cfg.retention_days {
        0 => SystemTime::UNIX_EPOCH,
        d => SystemTime::now() - Duration::from_secs(u64::from(d) * 86_400),
    }
}

/// Reads the chain parts of `rows` (oldest first) that the map wants (owner known, no link),
/// newest first, and gives them to their owners: as the oldest links ([`Age::Oldest`]: a read
/// back from the store at start or on reload, into the room the budget leaves) or the newest
/// (the poll's new records, within the whole budget: they push out the oldest held, as links
/// learned live do). Returns the bytes of links added, less those pushed out.
fn read_chains(
    owners: &Owners,
    store: &Store,
    rows: &[OwnerRow],
    age: Age,
) -> Result<usize, StoreError> {
    let _one_at_a_time = owners.reading();
    let before = owners.link_bytes();
    // Newer parts replace the oldest held (as live links do); older ones only fill free room.
    let room = match age {
        Age::Newest => owners.budget(),
        Age::Oldest => owners.budget().saturating_sub(before),
    };
    if room == 0 {
        return Ok(0);
    }
    let wanted = rows
        .iter()
        .rev()
        .filter(|r| r.has_chain && owners.wants_link(&r.object_id, &r.upstream));
    let mut picked = pick(wanted, room);
    if age == Age::Newest {
        // Added at the back of the eviction order: oldest first keeps it in time order.
        picked.reverse();
    }
    for batch in batches(&picked) {
        let ids: Vec<i64> = batch.iter().map(|r| r.row).collect();
        let mut parts: HashMap<i64, (String, String)> = chain_parts(store, &ids)?
            .into_iter()
            .map(|(id, body, items)| (id, (body, items)))
            .collect();
        for r in batch {
            let Some((body, items)) = parts.remove(&r.row) else {
                continue;
            };
            if let Some(link) = Link::from_record(&body, items) {
                owners.attach_link(&r.object_id, &r.upstream, link, age);
            }
        }
    }
    Ok(owners.link_bytes().saturating_sub(before))
}

/// `picked` cut into the batches read by one query each: at most [`BATCH_ROWS`] records and
/// [`BATCH_BYTES`] of parts, a larger part alone.
fn batches<'a, 'b>(picked: &'b [&'a OwnerRow]) -> Vec<&'b [&'a OwnerRow]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, r) in picked.iter().enumerate() {
        if i > start && (bytes + r.chain_bytes > BATCH_BYTES || i - start == BATCH_ROWS) {
            out.push(&picked[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += r.chain_bytes;
    }
    if start < picked.len() {
        out.push(&picked[start..]);
    }
    out
}

/// Where the poll goes on from: the highest owner record id read, and the ids read within
/// [`POLL_OVERLAP`] below it (those are not read again).
#[derive(Debug, Default, Clone)]
pub struct Cursor {
    last: i64,
    seen: BTreeSet<i64>,
}

impl Cursor {
    /// The lowest id the next poll asks for is above this.
    fn from(&self) -> i64 {
        self.last.saturating_sub(POLL_OVERLAP).max(0)
    }

    /// Of `ids` (a poll's answer), those not read before.
    fn unseen(&self, ids: &[i64]) -> Vec<i64> {
        ids.iter()
            .copied()
            .filter(|id| *id > self.from() && !self.seen.contains(id))
            .collect()
    }

    /// `ids` were read: they are not read again, and the window moves up to the highest.
    fn saw(&mut self, ids: impl IntoIterator<Item = i64>) {
        for id in ids {
            self.last = self.last.max(id);
            self.seen.insert(id);
        }
        let from = self.from();
        self.seen = self.seen.split_off(&(from + 1));
    }
}

/// Where the poll goes on from in each table it reads: the records, and the owners learned
/// through "not here".
#[derive(Debug, Default, Clone)]
pub struct Cursors {
    records: Cursor,
    learned: Cursor,
}

/// Loads the newest owners from `store` (at start, before listening; bounded by [`CAPACITY`])
/// and their chain parts within the budget already set ([`Owners::set_budget`]). Returns where
/// the poll goes on from.
pub fn load_at_start(owners: &Owners, store: &Store, cfg: &Config) -> Cursors {
    let mut cursors = Cursors::default();
    let rows = match newest_owners(store, since(cfg), CAPACITY as i64) {
        Ok(rows) => rows,
        Err(e) => {
            log::warn!("affinity: reading object owners failed: {}", e.message);
            return cursors;
        }
    };
    owners.load(&rows);
    cursors.records.saw(rows.iter().map(|r| r.row));
    if !rows.is_empty() {
        log::info!(
            "affinity: {} object owners loaded from the records",
            rows.len()
        );
    }
    match newest_learned(store, since(cfg), CAPACITY as i64) {
        Ok(learned) => {
            owners.load_learned(&learned);
            cursors.learned.saw(learned.iter().map(|r| r.row));
        }
        Err(e) => log::warn!("affinity: reading learned owners failed: {}", e.message),
    }
    if owners.budget() > 0 {
        match read_chains(owners, store, &rows, Age::Oldest) {
            Ok(0) => {}
            Ok(n) => log::info!("affinity: {n} bytes of chain parts loaded for rebuilding"),
            Err(e) => log::warn!("affinity: reading chain parts failed: {}", e.message),
        }
    }
    cursors
}

/// One poll: the owner records not read before, and their chain parts within the budget; then
/// the owners learned through "not here" not read before. Returns how many rows it read beyond
/// their ids (0 when nothing is new).
fn poll_once(
    owners: &Owners,
    store: &Store,
    cfg: &Config,
    cursors: &mut Cursors,
) -> Result<usize, StoreError> {
    let mut read = 0;
    let ids = owner_ids_after(store, cursors.records.from(), POLL_LIMIT)?;
    let new = cursors.records.unseen(&ids);
    if !new.is_empty() {
        let rows = owners_by_ids(store, &new, since(cfg))?;
        owners.load(&rows);
        if owners.budget() > 0 {
            read_chains(owners, store, &rows, Age::Newest)?;
        }
        cursors.records.saw(new);
        read += rows.len();
    }
    let ids = learned_ids_after(store, cursors.learned.from(), POLL_LIMIT)?;
    let new = cursors.learned.unseen(&ids);
    if !new.is_empty() {
        let rows = learned_by_ids(store, &new, since(cfg))?;
        owners.load_learned(&rows);
        cursors.learned.saw(new);
        read += rows.len();
    }
    Ok(read)
}

/// Starts the PostgreSQL poll on its own thread: every [`POLL`], the owners other replicas
/// recorded since the last read (off every request's path; a failed read is logged and retried
/// at the next tick).
pub fn spawn_poll(owners: Arc<Owners>, store: Store, config: SharedConfig, mut cursors: Cursors) {
    let spawned = std::thread::Builder::new()
        .name("owners-poll".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                std::thread::sleep(POLL);
                match poll_once(&owners, &store, &config.get(), &mut cursors) {
                    Ok(_) => failing = false,
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

/// Reads the chain parts of the newest owners created since `since` that the map lacks, within
/// the room the budget leaves (a reload that made room). Returns the bytes of links added.
fn backfill(owners: &Owners, store: &Store, since: SystemTime) -> Result<usize, StoreError> {
    let rows = newest_owners(store, since, CAPACITY as i64)?;
    read_chains(owners, store, &rows, Age::Oldest)
}

/// Applies a reloaded `cfg`'s budget: a smaller one drops the oldest links at once; a larger
/// one (`rebuild` turned on, `rebuild_memory` raised) reads the chain parts it now has room
/// for from `store`, on a thread of its own, bounded like the start-up read.
pub fn reload(owners: &Arc<Owners>, store: Option<&Store>, cfg: &Config) {
    let new = budget(cfg);
    let old = owners.set_budget(new);
    let Some(store) = store.filter(|_| new > old).cloned() else {
        return;
    };
    let owners = owners.clone();
    let since = since(cfg);
    let spawned = std::thread::Builder::new()
        .name("owners-reload".into())
        .spawn(move || match backfill(&owners, &store, since) {
            Ok(0) => {}
            Ok(n) => log::info!("SIGHUP: {n} bytes of chain parts loaded for rebuilding"),
            Err(e) => log::warn!("SIGHUP: reading chain parts failed: {}", e.message),
        });
    if let Err(e) = spawned {
        log::error!("affinity: cannot start reading chain parts: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, chain_bytes: u64) -> OwnerRow {
        OwnerRow {
            row: id,
            object_id: format!("resp_{id}"),
            upstream: "a".into(),
            member: None,
            created_at: SystemTime::now(),
            has_chain: true,
            chain_bytes,
        }
    }

    fn ids(rows: &[&OwnerRow]) -> Vec<i64> {
        rows.iter().map(|r| r.row).collect()
    }

    #[test]
    fn pick_takes_the_newest_parts_that_fit_and_passes_over_a_big_one() {
        let o = Link::OVERHEAD as u64;
        let rows: Vec<OwnerRow> = (1..=6).map(|i| row(i, 100 - o)).collect();
        // Newest first, 350 bytes of room: three parts of 100 (with their overhead).
        assert_eq!(ids(&pick(rows.iter().rev(), 350)), [6, 5, 4]);
        assert!(pick(rows.iter().rev(), 99).is_empty());
        assert_eq!(ids(&pick(rows.iter().rev(), 600)), [6, 5, 4, 3, 2, 1]);
        let mut rows = rows;
        rows[4].chain_bytes = 1_000; // row 5: larger than the whole room
        assert_eq!(ids(&pick(rows.iter().rev(), 350)), [6, 4, 3]);
    }

    #[test]
    fn batches_hold_at_most_their_bytes_and_a_big_part_alone() {
        let big = BATCH_BYTES / 2 + 1;
        let rows = [
            row(1, big),
            row(2, big),
            row(3, 10),
            row(4, BATCH_BYTES * 3),
        ];
        let picked: Vec<&OwnerRow> = rows.iter().collect();
        let got: Vec<Vec<i64>> = batches(&picked).into_iter().map(ids).collect();
        assert_eq!(got, [vec![1], vec![2, 3], vec![4]]);
        let many: Vec<OwnerRow> = (0..(BATCH_ROWS as i64 + 1)).map(|i| row(i, 1)).collect();
        let picked: Vec<&OwnerRow> = many.iter().collect();
        let sizes: Vec<usize> = batches(&picked).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, [BATCH_ROWS, 1]);
        assert!(batches(&[]).is_empty());
    }

    #[test]
    fn the_cursor_reads_each_id_once_within_its_window() {
        let mut c = Cursor::default();
        c.saw([5, 7]);
        assert_eq!(c.unseen(&[5, 6, 7, 8]), [6, 8], "6 committed late");
        c.saw([6, 8]);
        assert!(c.unseen(&[5, 6, 7, 8]).is_empty());
        c.saw([10_000]);
        assert_eq!(c.from(), 10_000 - POLL_OVERLAP);
        assert_eq!(c.seen.len(), 1, "ids below the window are let go");
        assert!(c.unseen(&[5, 8_000]).is_empty(), "below the window");
    }

    /// A SQLite store with `n` owned Responses records of `part` bytes of input each (ids 1..=n,
    /// object ids `resp_{id}`), and one plain chat record between each two.
    fn store(n: i64, part: usize) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = Store::open(path.to_str().unwrap()).unwrap();
        add(&store, 1, n, part);
        (dir, store)
    }

    fn add(store: &Store, from: i64, n: i64, part: usize) {
        let Store::Sqlite(p) = store else {
            unreachable!()
        };
        let conn = p.get().unwrap();
        for id in from..from + n {
            let body = format!(r#"{{"model":"m","input":"{}"}}"#, "x".repeat(part));
            conn.execute(
                "INSERT INTO records (created_at, method, path, upstream, status, complete, \
                 object_id, request_body, response_items) VALUES (strftime('%Y-%m-%dT%H:%M:%SZ', \
                 'now'), 'POST', '/v1/responses', 'a', 200, 1, ?1, ?2, '[]')",
                rusqlite::params![format!("resp_{id}"), body],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO records (created_at, method, path, upstream, status, complete) \
                 VALUES (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'), 'POST', '/v1/chat/completions', \
                 'a', 200, 1)",
                [],
            )
            .unwrap();
        }
    }

    fn cfg(extra: &str) -> Config {
        let text = format!(
            "authorization: x\n{extra}\nupstreams:\n  - name: a\n    endpoint: http://127.0.0.1:9/v1\n"
        );
        crate::config::parse(std::path::Path::new("t.yaml"), &text, false, &|_| None)
            .unwrap()
            .0
    }

    fn held(o: &Owners, c: &Config, n: i64) -> Vec<i64> {
        (1..=n)
            .filter(|i| o.chain(&format!("resp_{i}"), c).is_some())
            .collect()
    }

    #[test]
    fn start_reads_the_newest_parts_within_the_budget() {
        let (_dir, s) = store(40, 1_000);
        // Each link costs its input (1,002 bytes) and items (2) plus the overhead: ten fit.
        let c = cfg("rebuild: true\nrebuild_memory: 11000");
        let o = Owners::default();
        o.set_budget(budget(&c));
        let cursor = load_at_start(&o, &s, &c);
        assert_eq!(o.len(), 40, "every owner is known");
        assert_eq!(held(&o, &c, 40), (31..=40).collect::<Vec<_>>());
        assert!(o.link_bytes() <= 11_000);
        assert_eq!(cursor.records.last, 79);
        // Without rebuild nothing is read, and turning it on reads the newest.
        let c = cfg("");
        let o = Owners::default();
        o.set_budget(budget(&c));
        load_at_start(&o, &s, &c);
        assert_eq!(o.link_bytes(), 0);
        o.set_budget(5_500);
        assert!(backfill(&o, &s, SystemTime::UNIX_EPOCH).unwrap() > 0);
        let c = cfg("rebuild: true");
        assert_eq!(held(&o, &c, 40), (36..=40).collect::<Vec<_>>());
        // A larger budget adds the next older ones; the newest stay.
        o.set_budget(11_000);
        backfill(&o, &s, SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(held(&o, &c, 40), (31..=40).collect::<Vec<_>>());
        // New live links push out the oldest read back.
        o.set_budget(10_000);
        assert_eq!(held(&o, &c, 40), (32..=40).collect::<Vec<_>>());
    }

    #[test]
    fn a_poll_reads_each_record_once_whether_its_part_was_kept_or_not() {
        let (_dir, s) = store(5, 1_000);
        let c = cfg("rebuild: true\nrebuild_memory: 3300");
        let o = Owners::default();
        o.set_budget(budget(&c));
        let mut cursor = load_at_start(&o, &s, &c);
        assert_eq!(held(&o, &c, 5), [3, 4, 5]);
        assert_eq!(poll_once(&o, &s, &c, &mut cursor).unwrap(), 0, "idle");
        add(&s, 6, 4, 1_000);
        assert_eq!(poll_once(&o, &s, &c, &mut cursor).unwrap(), 4);
        // The newest three fit; the budget keeps the newest links whatever their way in.
        assert_eq!(held(&o, &c, 9), [7, 8, 9]);
        for _ in 0..3 {
            assert_eq!(
                poll_once(&o, &s, &c, &mut cursor).unwrap(),
                0,
                "nothing new"
            );
        }
        assert_eq!(o.len(), 9);
    }
}
