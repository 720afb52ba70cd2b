//! Request records (see the observability guide, "Request records"): one row per request with
//! reply text and usage, no secrets, a bounded queue that drops instead of blocking, and nothing
//! lost at SIGTERM.

use std::time::Duration;

use crate::support::*;

#[actix_rt::test]
async fn rows_for_success_stream_failover_and_all_fail() {
    let bad = Mock::always(Reply::status(503));
    let good = Mock::script(|req, _| {
        if req.json()["stream"] == true {
            Reply::sse_chat(&["Hel", "lo"], Duration::from_millis(5))
        } else {
            Reply::chat("plain answer")
        }
    });
    let gw = Gateway::start(&config(
        "cooldown: {failures: 100, seconds: 1}",
        &[
            upstream("good", &good.endpoint(), "deny: [via-bad, dead]"),
            upstream("bad", &bad.endpoint(), "deny: [dead]"),
            upstream("good2", &good.endpoint(), "allow: [via-bad]"),
            upstream("gone", &Mock::refused_endpoint(), "allow: [dead]"),
        ],
    ));
    let ua = "records-test/2";
    let auth = format!("Bearer {TOKEN}");
    let h = [
        ("authorization", auth.as_str()),
        ("user-agent", ua),
        ("content-type", "application/json"),
    ];
    send(
        "POST",
        &gw.url("/v1/chat/completions?debug=1"),
        &h,
        chat_body(false).to_string().as_bytes(),
    )
    .await;
    send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &h,
        chat_body(true).to_string().as_bytes(),
    )
    .await;
    let fo = serde_json::json!({"model": "via-bad", "messages": []}).to_string();
    send("POST", &gw.url("/v1/chat/completions"), &h, fo.as_bytes()).await;
    let dead = serde_json::json!({"model": "dead"}).to_string();
    let got = send("POST", &gw.url("/v1/chat/completions"), &h, dead.as_bytes()).await;
    assert_eq!(got.status, 502);

    let rows = gw.records(4);
    let r = &rows[0];
    assert_eq!(r["method"], "POST");
    assert_eq!(r["path"], "/v1/chat/completions");
    assert_eq!(r["model"], "gpt-test");
    assert_eq!(r["stream"], 0);
    assert_eq!(r["upstream"], "good");
    assert_eq!(r["status"], 200);
    assert_eq!(r["attempts"], 1);
    assert_eq!(r["error"], serde_json::Value::Null);
    assert_eq!(r["response"], "plain answer");
    assert_eq!(
        (
            r["prompt_tokens"].as_i64(),
            r["completion_tokens"].as_i64(),
            r["total_tokens"].as_i64()
        ),
        (Some(5), Some(7), Some(12))
    );
    assert_eq!(r["ip"], "127.0.0.1");
    assert_eq!(r["user_agent"], ua);
    assert_eq!(r["client_key"], "sk-…cdef");
    assert_eq!(r["request_body"], chat_body(false).to_string());
    let created = r["created_at"].as_str().unwrap();
    assert!(
        created.len() == 24 && created.ends_with('Z') && created.as_bytes()[10] == b'T',
        "{created}"
    );
    assert!(r["ttfb_ms"].as_i64().unwrap() <= r["duration_ms"].as_i64().unwrap());

    let s = &rows[1];
    assert_eq!(s["stream"], 1);
    assert_eq!(s["response"], "Hello");
    assert_eq!(s["total_tokens"], 5);

    let f = &rows[2];
    assert_eq!(f["upstream"], "good2");
    assert_eq!(f["status"], 200);
    assert_eq!(f["attempts"], 2);
    assert!(
        f["error"].as_str().unwrap().starts_with("bad: HTTP 503"),
        "{f}"
    );

    let a = &rows[3];
    assert_eq!(a["status"], 502);
    assert_eq!(a["upstream"], serde_json::Value::Null);
    assert!(a["error"]
        .as_str()
        .unwrap()
        .contains("gone: connect failed"));
}

#[actix_rt::test]
async fn responses_api_stream_and_binary_bodies() {
    let m = Mock::script(|req, _| {
        if req.target.contains("responses") {
            Reply::Chunks {
                status: 200,
                headers: vec![("content-type".into(), "text/event-stream".into())],
                chunks: vec![
                    (Duration::ZERO, b"event: response.created\ndata: {\"type\":\"response.created\"}\n\n".to_vec()),
                    (Duration::ZERO, b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Bon\"}\n\nevent: response.output_text.del".to_vec()),
                    (Duration::from_millis(5), b"ta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"jour\"}\n\n".to_vec()),
                    (Duration::ZERO, b"data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":2,\"total_tokens\":11}}}\n\n".to_vec()),
                ],
                ending: Ending::Finish,
            }
        } else {
            Reply::Full {
                status: 200,
                headers: vec![("content-type".into(), "audio/mpeg".into())],
                body: vec![0xff, 0xfb, 0x00, 0x90],
            }
        }
    });
    let gw = Gateway::start(&config("", &[upstream("u", &m.endpoint(), "")]));
    let got = post(
        &gw,
        "/v1/responses",
        serde_json::json!({"model": "gpt-test", "stream": true, "input": "hi"}),
    )
    .await;
    assert_eq!(got.status, 200);
    let auth = format!("Bearer {TOKEN}");
    let binary = [0u8, 159, 146, 150, 255];
    let got = send(
        "POST",
        &gw.url("/v1/audio/transcriptions"),
        &[
            ("authorization", &auth),
            ("content-type", "multipart/form-data; boundary=x"),
        ],
        &binary,
    )
    .await;
    assert_eq!(
        got.body,
        vec![0xff, 0xfb, 0x00, 0x90],
        "binary relayed verbatim"
    );
    let rows = gw.records(2);
    assert_eq!(rows[0]["response"], "Bonjour");
    assert_eq!(
        (
            rows[0]["prompt_tokens"].as_i64(),
            rows[0]["completion_tokens"].as_i64()
        ),
        (Some(9), Some(2))
    );
    assert_eq!(
        rows[1]["response"],
        serde_json::Value::Null,
        "binary reply not stored"
    );
    assert_eq!(rows[1]["request_body"], "[binary body, 5 bytes]");
    assert_eq!(rows[1]["model"], serde_json::Value::Null);
}

#[actix_rt::test]
async fn record_body_bytes_cuts_with_a_marker() {
    let m = Mock::always(Reply::chat(&"z".repeat(500)));
    let gw = Gateway::start(&config(
        "record_body_bytes: 100",
        &[upstream("u", &m.endpoint(), "")],
    ));
    let big = serde_json::json!({"model": "gpt-test", "messages": [{"role": "user", "content": "q".repeat(300)}]});
    post(&gw, "/v1/chat/completions", big).await;
    let rows = gw.records(1);
    let body = rows[0]["request_body"].as_str().unwrap();
    let resp = rows[0]["response"].as_str().unwrap();
    assert!(body.ends_with("…[truncated]") && body.len() < 130, "{body}");
    assert!(resp.ends_with("…[truncated]") && resp.len() < 130, "{resp}");
}

#[actix_rt::test]
async fn no_key_or_token_in_any_column_or_log_line() {
    let up_key = "sk-upstream-u-secret";
    let bad = Mock::always(Reply::status(401));
    let m = Mock::always(Reply::chat("fine"));
    let gw = Gateway::start(&config(
        "",
        &[
            upstream("b", &bad.endpoint(), ""),
            upstream("u", &m.endpoint(), ""),
        ],
    ));
    post(&gw, "/v1/chat/completions", chat_body(false)).await;
    post(&gw, "/v1/chat/completions", chat_body(true)).await;
    send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", "Bearer wrong-token-value-123456")],
        b"{}",
    )
    .await;
    let rows = gw.records(3);
    let dump = serde_json::to_string(&rows).unwrap();
    for secret in [
        TOKEN,
        up_key,
        "sk-upstream-b-secret",
        "wrong-token-value-123456",
        "Bearer",
    ] {
        assert!(
            !dump.contains(secret),
            "{secret} stored in a record: {dump}"
        );
        assert!(!gw.log().contains(secret), "{secret} in the log");
    }
    // The token label is the only trace of the client key.
    assert_eq!(rows[0]["client_key"], "sk-…cdef");
}

/// The queue's bound, where rows are written as requests end: a gateway whose spool is another
/// process's (`spool::held`), or whose spool is full. With a spool of its own, a locked database
/// fills the spool instead (tests/spool.rs).
#[actix_rt::test]
async fn full_queue_drops_and_counts_without_blocking() {
    let m = Mock::always(Reply::chat("x"));
    let (dir, db, _held) = crate::spool::held();
    let gw = Gateway::start_with(
        &config("record_queue: 5", &[upstream("u", &m.endpoint(), "")]),
        &["-database", db.to_str().unwrap()],
    );
    let _dir = dir;
    // Hold the database's write lock: the writer blocks, so the queue fills up.
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let t = std::time::Instant::now();
    for _ in 0..30 {
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.status, 200);
    }
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "requests were slowed by recording: {:?}",
        t.elapsed()
    );
    let dropped = scrape(&gw)
        .await
        .metric("openai_api_route_records_dropped_total")
        .value()
        .unwrap() as u64;
    assert!(dropped >= 20, "expected drops, metric says {dropped}");
    // The log says so, once for the burst (at most every 10 s), with the count and the key.
    let said: Vec<String> = gw
        .log()
        .lines()
        .filter(|l| l.contains("request records dropped"))
        .map(str::to_string)
        .collect();
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].contains("queue of 5 (record_queue) is full; 1 dropped since start"),
        "{said:?}"
    );
    lock.execute_batch("COMMIT").unwrap();
    // What was queued is written once the lock goes away, and nothing more.
    let rows = records_in(&db, 30 - dropped as usize);
    assert_eq!(rows.len() as u64, 30 - dropped);
}

#[actix_rt::test]
async fn another_writer_holding_the_lock_delays_records_but_loses_none() {
    let m = Mock::always(Reply::chat("x"));
    let gw = Gateway::start(&config("", &[upstream("u", &m.endpoint(), "")]));
    post(&gw, "/v1/chat/completions", chat_body(false)).await;
    gw.records(1);
    // Another process (here: this test) writes to the same file for a while.
    let other = gw.db();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    for _ in 0..3 {
        assert_eq!(
            post(&gw, "/v1/chat/completions", chat_body(false))
                .await
                .status,
            200
        );
    }
    // Several batch intervals pass while the lock is held: the writer must wait, not give up.
    std::thread::sleep(Duration::from_millis(1500));
    other.execute_batch("COMMIT").unwrap();
    assert_eq!(gw.records(4).len(), 4);
    let metrics = scrape(&gw).await;
    assert_eq!(
        metrics
            .metric("openai_api_route_records_dropped_total")
            .value(),
        Some(0.0),
        "{metrics}"
    );
}

#[actix_rt::test]
async fn sigterm_after_a_burst_loses_no_record() {
    let m = Mock::always(Reply::chat("x"));
    let mut gw = Gateway::start(&config("", &[upstream("u", &m.endpoint(), "")]));
    let n = 200;
    let futs: Vec<_> = (0..n)
        .map(|_| post(&gw, "/v1/chat/completions", chat_body(false)))
        .collect();
    let results = futures_util::future::join_all(futs).await;
    assert!(results.iter().all(|r| r.status == 200));
    gw.signal("TERM");
    assert_eq!(
        gw.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        gw.log()
    );
    let rows = read_rows(&gw.db_path);
    assert_eq!(rows.len(), n);
}

#[test]
fn unwritable_database_is_a_clear_startup_error() {
    let m_endpoint = "http://127.0.0.1:9/v1";
    let err = Gateway::try_start(
        &config("", &[upstream("u", m_endpoint, "")]),
        &["-database", "/proc/no-such-dir/db.sqlite"],
    )
    .err()
    .expect("must not start");
    assert!(
        err.contains("cannot open or write database /proc/no-such-dir/db.sqlite"),
        "{err}"
    );
}

/// The gateway's exit code and stderr for a start with `-database db` (None: still running
/// after 20 s, which these tests treat as a failure).
fn start_fails(db: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("upstreams.yaml");
    std::fs::write(
        &cfg,
        config("", &[upstream("u", "http://127.0.0.1:9/v1", "")]),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_openai-api-route"))
        .args(["-addr", "127.0.0.1:0", "-database", db, "-config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_database_in_a_missing_directory_says_the_directory_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let db = missing.join("db.sqlite");
    let (code, err) = start_fails(&db.display().to_string());
    assert!(code.is_some_and(|c| c != 0), "{code:?}: {err}");
    assert!(
        err.contains(&format!(
            "cannot open or write database {}: directory {} does not exist",
            db.display(),
            missing.display()
        )),
        "{err}"
    );
    assert!(!err.contains("listening"), "{err}");
    assert!(!missing.exists(), "the directory must not be created");
}

#[actix_rt::test]
async fn a_fresh_sqlite_file_starts_without_an_error_line() {
    // The pool opened its connections in parallel and each switched the new file to WAL: one of
    // them lost the race and logged `database is locked` as an ERROR before listening.
    for _ in 0..8 {
        let m = Mock::always(Reply::chat("x"));
        let gw = one(&m, "");
        assert_eq!(
            post(&gw, "/v1/chat/completions", chat_body(false))
                .await
                .status,
            200
        );
        gw.records(1);
        let log = gw.log();
        assert!(!log.contains("database is locked"), "{log}");
        assert!(!log.contains(" ERROR "), "{log}");
    }
}

#[actix_rt::test]
async fn database_none_records_nothing_and_still_serves() {
    let m = Mock::always(Reply::chat("x"));
    let gw = Gateway::start_with(
        &config("", &[upstream("u", &m.endpoint(), "")]),
        &["-database", "none"],
    );
    assert_eq!(
        post(&gw, "/v1/chat/completions", chat_body(false))
            .await
            .status,
        200
    );
    assert!(!gw.db_path.exists());
    let page = send("GET", &gw.url("/"), &[], b"").await.text();
    assert!(page.contains("recording off"));
}

#[actix_rt::test]
async fn a_go_version_database_is_kept_aside_not_broken() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "CREATE TABLE records (id integer primary key, created_at datetime, ip text, body text, response text, status integer);
             INSERT INTO records (ip, body, response, status) VALUES ('1.2.3.4', 'old body', 'old reply', 200);",
        )
        .unwrap();
    }
    let m = Mock::always(Reply::chat("new reply"));
    let db_arg = db.display().to_string();
    let gw = Gateway::start_with(
        &config("", &[upstream("u", &m.endpoint(), "")]),
        &["-database", &db_arg],
    );
    assert_eq!(
        post(&gw, "/v1/chat/completions", chat_body(false))
            .await
            .status,
        200
    );
    assert!(eventually(Duration::from_secs(5), || !read_rows(&db).is_empty()));
    let rows = read_rows(&db);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["response"], "new reply");
    let c = rusqlite::Connection::open(&db).unwrap();
    let old: String = c
        .query_row("SELECT body FROM records_legacy", [], |r| r.get(0))
        .unwrap();
    assert_eq!(old, "old body");
    assert!(gw.log().contains("kept as `records_legacy`"));
}

#[actix_rt::test]
async fn retention_deletes_old_records_at_start_and_keeps_new_ones() {
    let m = Mock::always(Reply::chat("x"));
    let cfg = config("retention_days: 1", &[upstream("u", &m.endpoint(), "")]);
    let mut gw = Gateway::start(&cfg);
    post(&gw, "/v1/chat/completions", chat_body(false)).await;
    gw.records(1);
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    {
        let c = rusqlite::Connection::open(&gw.db_path).unwrap();
        c.execute(
            "INSERT INTO records (created_at, method, path, status) VALUES ('2020-01-01T00:00:00.000Z', 'POST', '/v1/old', 200)",
            [],
        )
        .unwrap();
    }
    let db_arg = gw.db_path.display().to_string();
    let gw2 = Gateway::start_with(&cfg, &["-database", &db_arg]);
    assert!(
        eventually(Duration::from_secs(5), || read_rows(&gw.db_path).len() == 1),
        "old record not pruned: {:?}",
        read_rows(&gw.db_path)
    );
    assert_eq!(read_rows(&gw.db_path)[0]["path"], "/v1/chat/completions");
    assert!(eventually(Duration::from_secs(5), || gw2
        .log()
        .contains("retention: deleted 1 records")));
}

#[actix_rt::test]
async fn ids_are_never_reused_after_retention_empties_the_table() {
    let m = Mock::always(Reply::chat("x"));
    let cfg = config("retention_days: 1", &[upstream("u", &m.endpoint(), "")]);
    let mut gw = Gateway::start(&cfg);
    for _ in 0..3 {
        post(&gw, "/v1/chat/completions", chat_body(false)).await;
    }
    let ids: Vec<i64> = gw
        .records(3)
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3]);
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    // Everything expires, the highest id included.
    rusqlite::Connection::open(&gw.db_path)
        .unwrap()
        .execute(
            "UPDATE records SET created_at = '2020-01-01T00:00:00.000Z'",
            [],
        )
        .unwrap();
    let db_arg = gw.db_path.display().to_string();
    for restart in 0..2 {
        // The second start finds the table empty and only the kept id to go on.
        let mut gw2 = Gateway::start_with(&cfg, &["-database", &db_arg]);
        if restart == 0 {
            assert!(eventually(Duration::from_secs(5), || read_rows(
                &gw.db_path
            )
            .is_empty()));
            assert!(eventually(Duration::from_secs(5), || gw2
                .log()
                .contains("retention: deleted 3 records")));
        }
        gw2.signal("TERM");
        assert_eq!(
            gw2.wait_exit(Duration::from_secs(10)),
            Some(0),
            "{}",
            gw2.log()
        );
    }
    let gw3 = Gateway::start_with(&cfg, &["-database", &db_arg]);
    post(&gw3, "/v1/chat/completions", chat_body(false)).await;
    post(&gw3, "/v1/chat/completions", chat_body(false)).await;
    assert!(eventually(Duration::from_secs(5), || read_rows(
        &gw.db_path
    )
    .len()
        == 2));
    let ids: Vec<i64> = read_rows(&gw.db_path)
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [4, 5], "ids must continue after the pruned ones");
}

#[actix_rt::test]
async fn an_autoincrement_table_from_an_earlier_version_keeps_its_ids_unique() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    {
        // The layout an earlier version created (migration 1 with AUTOINCREMENT), where ids 4
        // and 5 were handed out and their rows deleted since.
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "CREATE TABLE records (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at TEXT NOT NULL,
               ip TEXT, method TEXT NOT NULL, path TEXT NOT NULL, model TEXT,
               stream INTEGER NOT NULL DEFAULT 0, upstream TEXT, status INTEGER NOT NULL,
               attempts INTEGER NOT NULL DEFAULT 0, error TEXT, request_body TEXT, response TEXT,
               prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER,
               ttfb_ms INTEGER, duration_ms INTEGER, user_agent TEXT, client_key TEXT);
             CREATE INDEX records_created_at ON records(created_at);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        for _ in 0..5 {
            c.execute(
                "INSERT INTO records (created_at, method, path, status) VALUES ('2020-01-01T00:00:00.000Z', 'POST', '/v1/old', 200)",
                [],
            )
            .unwrap();
        }
        c.execute("DELETE FROM records WHERE id > 3", []).unwrap();
    }
    let m = Mock::always(Reply::chat("x"));
    let cfg = config("retention_days: 1", &[upstream("u", &m.endpoint(), "")]);
    let db_arg = db.display().to_string();
    let gw = Gateway::start_with(&cfg, &["-database", &db_arg]);
    assert!(eventually(Duration::from_secs(5), || gw
        .log()
        .contains("retention: deleted 3 records")));
    post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert!(eventually(Duration::from_secs(5), || read_rows(&db).len() == 1));
    assert_eq!(
        read_rows(&db)[0]["id"],
        6,
        "ids 1 to 5 were handed out before"
    );
}

#[actix_rt::test]
async fn a_new_database_uses_32_kib_pages() {
    let m = Mock::always(Reply::chat("x"));
    let gw = Gateway::start(&config("", &[upstream("u", &m.endpoint(), "")]));
    post(&gw, "/v1/chat/completions", chat_body(false)).await;
    gw.records(1);
    let c = rusqlite::Connection::open(&gw.db_path).unwrap();
    let page: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!((page, mode.as_str()), (32768, "wal"));
}

#[actix_rt::test]
async fn sigint_also_drains_and_flushes() {
    let m = Mock::always(Reply::sse_chat(
        &["a", "b", "c"],
        Duration::from_millis(200),
    ));
    let mut gw = Gateway::start(&config("", &[upstream("u", &m.endpoint(), "")]));
    let pid_gw = &gw;
    // A stream is in flight when SIGINT arrives: it must complete, then the record is written.
    let req = post(pid_gw, "/v1/chat/completions", chat_body(true));
    let sig = async {
        actix_rt::time::sleep(Duration::from_millis(150)).await;
        pid_gw.signal("INT");
    };
    let (got, ()) = futures_util::future::join(req, sig).await;
    assert_eq!(got.status, 200);
    assert!(
        got.text().contains("[DONE]"),
        "in-flight stream cut at SIGINT: {}",
        got.text()
    );
    assert_eq!(
        gw.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        gw.log()
    );
    let rows = read_rows(&gw.db_path);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["response"], "abc");
}

#[actix_rt::test]
async fn a_failing_database_write_is_counted_and_serving_goes_on() {
    let m = Mock::always(Reply::chat("x"));
    let gw = Gateway::start(&config("", &[upstream("u", &m.endpoint(), "")]));
    let lock = gw.db();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 200);
    // The writer gives up after its 5 s busy timeout; requests meanwhile are unaffected.
    for _ in 0..3 {
        assert_served(&gw, Duration::from_millis(500)).await;
    }
    let failed = |m: &Metrics| {
        m.metric("openai_api_route_record_write_failures_total")
            .value()
            .unwrap_or(0.0)
    };
    let m = scrape_until(&gw, Duration::from_secs(12), |m| failed(m) > 0.0).await;
    assert!(failed(&m) >= 1.0, "write failure not counted");
    assert!(gw.log().contains("writing") && gw.log().contains("request records failed"));
    lock.execute_batch("COMMIT").unwrap();
    assert_eq!(
        post(&gw, "/v1/chat/completions", chat_body(false))
            .await
            .status,
        200
    );
    assert!(eventually(Duration::from_secs(10), || !read_rows(
        &gw.db_path
    )
    .is_empty()));
}

/// An SSE chat stream: one chunk per word (no `finish_reason` yet), then, when `finish` is given,
/// a chunk with that `finish_reason`, usage and `[DONE]`.
fn chat_stream(words: &[&str], finish: Option<&str>, gap: Duration, ending: Ending) -> Reply {
    let mut chunks: Vec<(Duration, Vec<u8>)> = words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let ev = serde_json::json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": null}]});
            (
                if i == 0 { Duration::ZERO } else { gap },
                format!("data: {ev}\n\n").into_bytes(),
            )
        })
        .collect();
    if let Some(reason) = finish {
        let last =
            serde_json::json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]});
        let usage = serde_json::json!({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}});
        chunks.push((
            gap,
            format!("data: {last}\n\ndata: {usage}\n\ndata: [DONE]\n\n").into_bytes(),
        ));
    }
    Reply::Chunks {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        chunks,
        ending,
    }
}

#[actix_rt::test]
async fn finish_reason_complete_and_resumed_columns() {
    use futures_util::StreamExt;
    let m = Mock::script(|req, _| {
        let gap = Duration::from_millis(5);
        match req.json()["model"].as_str().unwrap_or_default() {
            "sse" => chat_stream(&["Hel", "lo"], Some("length"), gap, Ending::Finish),
            "broken" => chat_stream(&["Hel", "lo"], None, gap, Ending::Drop),
            "inband" => {
                let mut r = chat_stream(&["Hel"], None, gap, Ending::Finish);
                if let Reply::Chunks { chunks, .. } = &mut r {
                    chunks.push((gap, b"data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n".to_vec()));
                }
                r
            }
            "slow" => chat_stream(
                &["a"; 100],
                Some("stop"),
                Duration::from_millis(50),
                Ending::Finish,
            ),
            "fail" => Reply::status(500),
            _ => Reply::chat("plain answer"),
        }
    });
    let gw = Gateway::start(&config(
        "cooldown: {failures: 100, seconds: 1}",
        &[upstream("u", &m.endpoint(), "")],
    ));
    let body = |model: &str, stream: bool| serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
    let got = post(&gw, "/v1/chat/completions", body("json", false)).await;
    assert_eq!(got.status, 200);
    let got = post(&gw, "/v1/chat/completions", body("sse", true)).await;
    assert!(got.text().ends_with("data: [DONE]\n\n"), "{}", got.text());
    let got = post(&gw, "/v1/chat/completions", body("broken", true)).await;
    assert!(got.text().contains("upstream_error"), "{}", got.text());
    let got = post(&gw, "/v1/chat/completions", body("inband", true)).await;
    assert!(got.text().contains("overloaded"), "{}", got.text());
    assert_eq!(
        post(&gw, "/v1/chat/completions", body("fail", false))
            .await
            .status,
        500
    );
    let refused = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", "Bearer not-the-token")],
        body("unauthorized", false).to_string().as_bytes(),
    )
    .await;
    assert_eq!(refused.status, 401);
    let auth = format!("Bearer {TOKEN}");
    let models = get(&gw, "/v1/models").await;
    assert_eq!(models.status, 200);
    // A client that leaves after two chunks of a long stream.
    let client = awc::Client::default();
    let mut resp = client
        .post(gw.url("/v1/chat/completions"))
        .insert_header(("authorization", auth.as_str()))
        .send_body(body("slow", true).to_string())
        .await
        .unwrap();
    let mut chunks = 0;
    while chunks < 2 {
        if let Some(Ok(_)) = resp.next().await {
            chunks += 1;
        }
    }
    drop(resp);
    drop(client);

    // The model list is answered locally and not recorded (0.3; see the security guide, "Second
    // probe (0.3): limits"): seven rows.
    let rows = gw.records(7);
    let row = |what: &str| {
        rows.iter()
            .find(|r| {
                r["model"] == what || r["path"] == what || r["status"] == 401 && what == "401"
            })
            .unwrap_or_else(|| panic!("no row for {what}: {rows:#?}"))
    };
    let cols = |r: &serde_json::Value| {
        (
            r["finish_reason"].clone(),
            r["complete"].as_i64(),
            r["resumed"].as_i64(),
        )
    };
    use serde_json::Value::Null;
    assert_eq!(cols(row("json")), ("stop".into(), Some(1), Some(0)));
    let sse = row("sse");
    assert_eq!(cols(sse), ("length".into(), Some(1), Some(0)));
    assert_eq!(sse["response"], "Hello");
    let broken = row("broken");
    assert_eq!(cols(broken), (Null, Some(0), Some(0)));
    assert_eq!(broken["status"], 200);
    assert_eq!(cols(row("inband")), (Null, Some(0), Some(0)));
    let fail = row("fail");
    assert_eq!(fail["status"], 500);
    assert_eq!(cols(fail), (Null, Some(0), Some(0)));
    assert_eq!(cols(row("401")), (Null, Some(0), Some(0)));
    assert!(!rows.iter().any(|r| r["path"] == "/v1/models"), "{rows:#?}");
    let gone = row("slow");
    assert_eq!(gone["status"], 200);
    assert_eq!(cols(gone), (Null, Some(0), Some(0)));
}

/// The `records` table as the previous version (0.1: migrations 1 and 2) made it.
const SCHEMA_0_1: &str = "CREATE TABLE records (
        id INTEGER PRIMARY KEY,
        created_at TEXT NOT NULL,
        ip TEXT,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        model TEXT,
        stream INTEGER NOT NULL DEFAULT 0,
        upstream TEXT,
        status INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        request_body TEXT,
        response TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        total_tokens INTEGER,
        ttfb_ms INTEGER,
        duration_ms INTEGER,
        user_agent TEXT,
        client_key TEXT
    );
    CREATE INDEX records_created_at ON records(created_at);
    CREATE TABLE records_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    PRAGMA user_version = 2;";

#[actix_rt::test]
async fn a_database_of_the_previous_version_gains_the_new_columns() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(SCHEMA_0_1).unwrap();
        c.execute(
            "INSERT INTO records (created_at, method, path, status, response) VALUES ('2026-01-01T00:00:00.000Z', 'POST', '/v1/old', 200, 'old reply')",
            [],
        )
        .unwrap();
    }
    let m = Mock::always(Reply::chat("new reply"));
    let db_arg = db.display().to_string();
    let gw = Gateway::start_with(
        &config("", &[upstream("u", &m.endpoint(), "")]),
        &["-database", &db_arg],
    );
    assert_eq!(
        post(&gw, "/v1/chat/completions", chat_body(false))
            .await
            .status,
        200
    );
    assert!(eventually(Duration::from_secs(5), || read_rows(&db).len() == 2));
    let rows = read_rows(&db);
    let old = &rows[0];
    assert_eq!(old["response"], "old reply");
    // Old rows: no finish reason, no continuation, and not claimed complete.
    assert_eq!(
        (&old["finish_reason"], &old["resumed"], &old["complete"]),
        (&serde_json::Value::Null, &0.into(), &0.into())
    );
    let new = &rows[1];
    assert_eq!(new["response"], "new reply");
    assert_eq!(
        (&new["finish_reason"], &new["resumed"], &new["complete"]),
        (&"stop".into(), &0.into(), &1.into())
    );
    let version: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 3);
}

fn plain_record(i: usize) -> openai_api_route::records::Record {
    openai_api_route::records::Record {
        created_at: std::time::SystemTime::now(),
        ip: None,
        method: actix_web::http::Method::POST,
        path: actix_web::http::Uri::from_static("/v1/chat/completions"),
        model: Some("m".into()),
        stream: false,
        upstream: Some("u".into()),
        status: 200,
        attempts: 1,
        error: None,
        request_body: actix_web::web::Bytes::from(format!("{{\"n\":{i}}}")),
        response: Some(format!("reply {i}")),
        response_json: None,
        prompt_tokens: None,
        completion_tokens: None,
        total_tokens: None,
        ttfb_ms: None,
        duration_ms: 1,
        user_agent: None,
        client_key: None,
        body_limit: 1 << 16,
        finish_reason: None,
        resumed: 0,
        complete: true,
        object_id: None,
        rebuilt: false,
        response_items: None,
        request_id: None,
        member: None,
        forgets: None,
        learned: Vec::new(),
    }
}

/// With a short backlog the spool's ingester is idle-class and commits in transactions of 64 rows
/// (a commit is work in which it cannot offer the CPU to a request, so it is kept short); where
/// it cannot leave the idle class it is idle-class for good, so the same. Every record is in the
/// table, in order.
#[actix_rt::test]
async fn a_short_backlog_is_written_in_short_transactions_and_whole() {
    use openai_api_route::metrics::Metrics;
    use openai_api_route::records::{Recorder, Store};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("paced.sqlite");
    let store = Store::open(path.to_str().unwrap()).unwrap();
    let metrics = Metrics::new().unwrap();
    let recorder = Recorder::start(store, 0, metrics.clone(), 10_000);
    for i in 0..300 {
        recorder.submit(plain_record(i));
    }
    // Written while nothing waits for it (a shutdown's flush writes in long transactions); the
    // batch ticker runs on this thread, so the wait must yield to it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while read_rows(&path).len() < 300 && std::time::Instant::now() < deadline {
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    recorder.flush().await;
    let db = rusqlite::Connection::open(&path).unwrap();
    // Rows go in 16 to a statement: each row's values stay together, in order.
    let rows: Vec<(String, String)> = db
        .prepare("SELECT request_body, response FROM records ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 300);
    assert!(rows
        .iter()
        .enumerate()
        .all(|(i, (b, r))| *b == format!("{{\"n\":{i}}}") && *r == format!("reply {i}")));
    let families = metrics.registry.gather();
    let batches = families
        .iter()
        .find(|f| f.name() == "openai_api_route_record_batch_size")
        .expect("batch size histogram");
    let h = batches.get_metric()[0].get_histogram();
    assert_eq!(h.get_sample_sum(), 300.0);
    assert_eq!(h.get_sample_count(), 5, "transactions for 300 records");
    // A clean end removes the spool.
    assert!(!dir.path().join("paced.sqlite-spool").exists());
}
