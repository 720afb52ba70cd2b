//! Bounded chain reading (docs/affinity.md, "Bounded reading"): the chain parts a gateway reads
//! back from its records — at start, on a reload that turns `rebuild` on, and in the PostgreSQL
//! poll — stay within `rebuild_memory`, newest first: the newest chains are rebuilt, the oldest
//! are not (their owner's failure is the answer), and an idle replica reads no part again.
//! The records are written straight into the table, as many large Responses answers would.
#![allow(clippy::await_holding_lock)]

use std::time::{Duration, Instant};

use serde_json::json;

use crate::postgres::{admin_url, lock, TestDb};
use crate::support::*;

/// Seeded Responses answers, and the bytes of each one's input: twice a 1 MiB budget in all.
const SEEDED: usize = 40;
const PART: usize = 50_000;
const BUDGET: &str = "rebuild: true\nrebuild_memory: 1048576";

/// The request body and kept output items of seeded answer `i` (object id `resp_seed_{i}`, owned
/// by `a`): an input of [`PART`] bytes of hex that compresses little, like real text.
fn part(i: usize) -> (String, String, String) {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let filler: String = (0..PART)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from_digit((x % 16) as u32, 16).unwrap()
        })
        .collect();
    let body = json!({"model": "gpt-test", "input": format!("turn {i} {filler}")}).to_string();
    let items = json!([{"type": "message", "role": "assistant", "status": "completed",
        "content": [{"type": "output_text", "text": format!("answer {i}"), "annotations": []}]}]);
    (format!("resp_seed_{i}"), body, items.to_string())
}

const INSERT: &str = "INSERT INTO records (created_at, method, path, upstream, status, complete, \
                      object_id, request_body, response_items) VALUES ";

fn seed_sqlite(db: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    for i in 0..SEEDED {
        let (id, body, items) = part(i);
        conn.execute(
            &format!(
                "{INSERT} (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'), 'POST', '/v1/responses', 'a', \
                 200, 1, ?1, ?2, ?3)"
            ),
            rusqlite::params![id, body, items],
        )
        .unwrap();
    }
}

fn seed_postgres(db: &TestDb) {
    db.with(|c| {
        for i in 0..SEEDED {
            let (id, body, items) = part(i);
            c.execute(
                &format!("{INSERT} (now(), 'POST', '/v1/responses', 'a', 200, 1, $1, $2, $3)"),
                &[&id, &body, &items],
            )
            .unwrap();
        }
    });
}

fn cfg(global: &str, a: &Provider, b: &Provider) -> String {
    config(
        global,
        &[
            upstream("a", &a.endpoint(), ""),
            upstream("b", &b.endpoint(), ""),
        ],
    )
}

/// A follow-up of seeded answer `i`.
async fn follow(gw: &Gateway, i: usize) -> Got {
    let body = json!({"model": "gpt-test", "input": "go on",
                      "previous_response_id": format!("resp_seed_{i}")});
    post(gw, "/v1/responses", body).await
}

/// With the owner `a` down: the newest seeded chain is rebuilt on `b`, the oldest is not.
async fn newest_rebuilt_oldest_not(gw: &Gateway, b: &Provider) {
    let newest = follow(gw, SEEDED - 1).await;
    assert_eq!(newest.status, 200, "{}", newest.text());
    assert_eq!(newest.header("x-upstream"), Some("b"));
    let sent = b.seen_on("/v1/responses").pop().unwrap().json();
    assert!(
        sent["input"][0]["content"]
            .as_str()
            .unwrap()
            .starts_with(&format!("turn {} ", SEEDED - 1)),
        "the rebuilt input starts with the seeded turn"
    );
    let asked = b.seen_on("/v1/responses").len();
    let oldest = follow(gw, 0).await;
    assert_eq!(oldest.status, 503, "{}", oldest.text());
    assert_eq!(oldest.json()["error"]["code"], "owner_failed");
    assert_eq!(b.seen_on("/v1/responses").len(), asked, "b was not asked");
}

/// The bytes a log line "… N bytes of chain parts loaded …" names, once it is there.
fn loaded_bytes(gw: &Gateway, within: Duration) -> Option<u64> {
    let deadline = Instant::now() + within;
    loop {
        let log = gw.log();
        let n = log
            .lines()
            .filter_map(|l| l.split_once(" bytes of chain parts loaded"))
            .find_map(|(head, _)| head.rsplit(' ').next()?.parse().ok());
        if n.is_some() || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A SQLite database with the gateway's tables and the seeded answers.
fn seeded_sqlite(global: &str, a: &Provider, b: &Provider) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite").display().to_string();
    let mut gw = Gateway::start_with(&cfg(global, a, b), &["-database", &db]);
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    seed_sqlite(&db);
    (dir, db)
}

#[actix_rt::test]
async fn at_start_only_the_newest_chains_within_rebuild_memory_are_read() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let (_dir, db) = seeded_sqlite(BUDGET, &a, &b);
    let gw = Gateway::start_with(&cfg(BUDGET, &a, &b), &["-database", &db]);
    a.set_down(true);
    newest_rebuilt_oldest_not(&gw, &b).await;
    // Read before listening: the log names what was kept, about half of what is stored.
    let loaded = loaded_bytes(&gw, Duration::ZERO).expect("chain parts were read");
    assert!(
        loaded <= 1 << 20 && loaded > 1 << 19,
        "{loaded} bytes: {}",
        gw.log()
    );
}

#[actix_rt::test]
async fn a_reload_that_turns_rebuild_on_reads_the_recorded_chains() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let (_dir, db) = seeded_sqlite("", &a, &b);
    let gw = Gateway::start_with(&cfg("", &a, &b), &["-database", &db]);
    a.set_down(true);
    let before = follow(&gw, SEEDED - 1).await;
    assert_eq!(
        before.json()["error"]["code"],
        "owner_failed",
        "rebuild is off"
    );
    std::fs::write(&gw.config_path, cfg(BUDGET, &a, &b)).unwrap();
    gw.signal("HUP");
    let loaded = loaded_bytes(&gw, Duration::from_secs(10)).expect("chain parts were read");
    assert!(loaded <= 1 << 20, "{loaded}");
    newest_rebuilt_oldest_not(&gw, &b).await;
}

/// TOAST blocks of `records` read so far: each chain part read back (a request body of tens of
/// kilobytes) reads them, owner ids and sizes do not.
fn toast_reads(db: &TestDb) -> i64 {
    db.with(|c| {
        c.query_one(
            "SELECT (COALESCE(toast_blks_read, 0) + COALESCE(toast_blks_hit, 0))::BIGINT \
             FROM pg_statio_user_tables WHERE relname = 'records'",
            &[],
        )
        .unwrap()
        .get(0)
    })
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn replicas_read_chain_parts_once_within_rebuild_memory() {
    let admin = admin_url();
    let _guard = lock();
    let db = TestDb::new(&admin);
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let args = ["-database", db.url.as_str()];
    // One replica reads the seeded answers in its poll, the other at start.
    let polled = Gateway::start_with(&cfg(BUDGET, &a, &b), &args);
    seed_postgres(&db);
    let started = Gateway::start_with(&cfg(BUDGET, &a, &b), &args);
    // Both have read what they keep once PostgreSQL's statistics stop moving (a backend
    // reports them at most once a second); then ten polls each must read no part again.
    let mut settled = toast_reads(&db);
    for _ in 0..10 {
        actix_rt::time::sleep(Duration::from_millis(1500)).await;
        let now = toast_reads(&db);
        if now == settled {
            break;
        }
        settled = now;
    }
    actix_rt::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        toast_reads(&db),
        settled,
        "an idle replica read chain parts"
    );
    a.set_down(true);
    for gw in [&polled, &started] {
        newest_rebuilt_oldest_not(gw, &b).await;
    }
}
