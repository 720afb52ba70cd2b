//! The record spool (see the observability guide, "The spool"): records go through a file beside
//! the SQLite database, which survives a kill, absorbs a database that cannot be written, and is
//! gone after a clean shutdown.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;

/// The spool file of the SQLite database `db`.
fn spool_of(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}-spool", db.display()))
}

/// A database path in a directory of the test's own, and its spool, locked as another gateway
/// process would hold it: a gateway started on that path writes rows directly.
pub fn held() -> (tempfile::TempDir, PathBuf, std::fs::File) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("held.sqlite");
    let spool = std::fs::File::create(spool_of(&db)).unwrap();
    spool.try_lock().unwrap();
    (dir, db, spool)
}

/// A gateway on the database `db` (kept in the caller's directory, across restarts).
fn gateway_on(m: &Mock, db: &Path, global: &str) -> Gateway {
    Gateway::start_with(
        &config(global, &[upstream("u", &m.endpoint(), "")]),
        &["-database", db.to_str().unwrap()],
    )
}

/// Another process's exclusive lock on the database: nothing can be written until it commits.
fn locked(db: &Path) -> rusqlite::Connection {
    let lock = rusqlite::Connection::open(db).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    lock
}

/// Sends `n` chat requests one after the other; each must be answered 200.
async fn answered(gw: &Gateway, n: usize) {
    for _ in 0..n {
        let got = post(gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.status, 200);
    }
}

/// Waits until the spool holds more than its header, and has stopped growing; its length.
fn spool_settles(db: &Path) -> u64 {
    let len = || std::fs::metadata(spool_of(db)).map_or(0, |m| m.len());
    assert!(
        eventually(Duration::from_secs(5), || len() > 16),
        "nothing was appended to the spool"
    );
    let mut last = 0;
    while len() != last {
        last = len();
        std::thread::sleep(Duration::from_millis(300));
    }
    last
}

#[actix_rt::test]
async fn a_locked_database_fills_the_spool_not_the_queue_and_loses_nothing() {
    let m = Mock::always(Reply::chat("x"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let gw = gateway_on(&m, &db, "record_queue: 5");
    // Another process holds the write lock: the ingester waits, the writer appends.
    let lock = locked(&db);
    let t = std::time::Instant::now();
    for _ in 0..30 {
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.status, 200);
        // A tick or so apart, so that the queue of 5 would have overflowed without the spool.
        actix_rt::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    spool_settles(&db);
    let scraped = scrape(&gw).await;
    let dropped = scraped
        .metric("openai_api_route_records_dropped_total")
        .value()
        .unwrap_or(0.0);
    assert_eq!(dropped, 0.0, "records dropped though the spool had room");
    assert!(!gw.log().contains("request records dropped"));
    lock.execute_batch("COMMIT").unwrap();
    let rows = records_in(&db, 30);
    assert_eq!(rows.len(), 30);
    assert!(rows
        .iter()
        .all(|r| r["response"] == "x" && r["status"] == 200));
}

#[actix_rt::test]
async fn records_in_the_spool_survive_a_kill_and_are_written_once_at_the_next_start() {
    let m = Mock::always(Reply::chat("kept"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let mut gw = gateway_on(&m, &db, "");
    // Written normally first: the ingester's progress is in `records_meta`.
    answered(&gw, 5).await;
    records_in(&db, 5);
    // Then the database is locked, so that the next records stay in the spool.
    let lock = locked(&db);
    answered(&gw, 20).await;
    spool_settles(&db);
    gw.signal("KILL");
    gw.wait_exit(Duration::from_secs(5));
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    assert_eq!(read_rows(&db).len(), 5, "the killed process wrote no more");
    assert!(spool_of(&db).exists());

    // The next start writes them before it listens: the rows are there when it answers.
    let mut again = gateway_on(&m, &db, "");
    let rows = read_rows(&db);
    assert_eq!(rows.len(), 25, "rows at the restart");
    assert!(rows.iter().all(|r| r["response"] == "kept"));
    assert!(
        again
            .log()
            .contains("wrote 20 request records the last run left in its spool"),
        "{}",
        again.log()
    );
    // Killed again right away, and started a third time: nothing is written twice.
    again.signal("KILL");
    again.wait_exit(Duration::from_secs(5));
    let mut third = gateway_on(&m, &db, "");
    assert_eq!(read_rows(&db).len(), 25, "rows written twice");
    // A clean shutdown writes the rest and removes the file.
    post(&third, "/v1/chat/completions", chat_body(false)).await;
    third.signal("TERM");
    assert_eq!(third.wait_exit(Duration::from_secs(10)), Some(0));
    assert_eq!(read_rows(&db).len(), 26);
    assert!(
        !spool_of(&db).exists(),
        "the spool outlived a clean shutdown"
    );
}

#[actix_rt::test]
async fn a_torn_tail_is_dropped_and_the_whole_frames_before_it_are_written() {
    let m = Mock::always(Reply::chat("whole"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let mut gw = gateway_on(&m, &db, "");
    let lock = locked(&db);
    // One batch each: the spool's length after each.
    let mut lens = Vec::new();
    for _ in 0..3 {
        post(&gw, "/v1/chat/completions", chat_body(false)).await;
        lens.push(spool_settles(&db));
    }
    assert!(lens[0] < lens[1] && lens[1] < lens[2], "{lens:?}");
    gw.signal("KILL");
    gw.wait_exit(Duration::from_secs(5));
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    // A write cut by the crash: of the third frame only 5 bytes, less than its head.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(spool_of(&db))
        .unwrap();
    f.set_len(lens[1] + 5).unwrap();
    let again = gateway_on(&m, &db, "");
    let rows = read_rows(&db);
    assert_eq!(rows.len(), 2, "the two whole records, not the torn one");
    assert!(again.log().contains("could not be read"), "{}", again.log());
}

#[actix_rt::test]
async fn a_second_process_on_the_same_database_writes_rows_directly() {
    let m = Mock::always(Reply::chat("x"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let first = gateway_on(&m, &db, "");
    let second = gateway_on(&m, &db, "");
    assert!(
        second.log().contains("is another process's"),
        "{}",
        second.log()
    );
    for gw in [&first, &second, &first, &second] {
        assert_eq!(
            post(gw, "/v1/chat/completions", chat_body(false))
                .await
                .status,
            200
        );
    }
    assert_eq!(records_in(&db, 4).len(), 4);
}

#[actix_rt::test]
async fn the_status_page_says_what_the_spool_holds_until_it_is_written() {
    let m = Mock::always(Reply::chat("x"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let gw = gateway_on(&m, &db, "");
    let lock = locked(&db);
    let big = "w".repeat(100_000);
    for _ in 0..15 {
        let body =
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": big}]});
        assert_eq!(post(&gw, "/v1/chat/completions", body).await.status, 200);
    }
    spool_settles(&db);
    let page = get(&gw, "/").await.text();
    assert!(page.contains(" MiB in the spool"), "{page}");
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    records_in(&db, 15);
    let mut written = false;
    for _ in 0..50 {
        if !get(&gw, "/").await.text().contains("in the spool") {
            written = true;
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(written, "the page still shows a spool backlog");
}

#[actix_rt::test]
async fn a_shutdown_does_not_wait_for_a_database_that_stays_locked_and_loses_nothing() {
    let m = Mock::always(Reply::chat("later"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let mut gw = gateway_on(&m, &db, "");
    let lock = locked(&db);
    answered(&gw, 3).await;
    spool_settles(&db);
    let t = std::time::Instant::now();
    gw.signal("TERM");
    // Three tries of SQLite's 5 s busy timeout, then the rest is left for the next start.
    assert_eq!(
        gw.wait_exit(Duration::from_secs(40)),
        Some(0),
        "{}",
        gw.log()
    );
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(
        gw.log().contains("bytes of request records are left in"),
        "{}",
        gw.log()
    );
    assert!(spool_of(&db).exists());
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    let _again = gateway_on(&m, &db, "");
    let rows = read_rows(&db);
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["response"] == "later"));
}
