//! PostgreSQL recording (`-database postgres://…`) against a real server. Runs when
//! `OPENAI_API_ROUTE_TEST_POSTGRES` held an admin URL at build time (`.ci/run` sets it; else the
//! tests are ignored); each test gets a fresh database. The restart test also needs
//! `OPENAI_API_ROUTE_TEST_ROOT` (it stops the local cluster with `pg_ctlcluster`). The tests take a lock because one of them stops and restarts the server.
// Each test runs on its own thread and runtime; the std lock only keeps those threads apart,
// so holding it across awaits is the point, not a deadlock risk.
#![allow(clippy::await_holding_lock)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::support::*;

static PG_LOCK: Mutex<()> = Mutex::new(());

/// The sync `postgres` client runs its own runtime: keep it off the test's actix thread.
pub(crate) fn blocking<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().unwrap())
}

/// The admin URL of the test server (tests that call this need `test_postgres`).
pub(crate) fn admin_url() -> String {
    service("OPENAI_API_ROUTE_TEST_POSTGRES")
}

/// A database created for one test and dropped after it.
pub(crate) struct TestDb {
    admin: String,
    name: String,
    pub(crate) url: String,
}

impl TestDb {
    pub(crate) fn new(admin: &str) -> TestDb {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "oar_test_{}_{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        blocking(|| {
            let mut c = postgres::Client::connect(admin, postgres::NoTls)
                .expect("connect to the test PostgreSQL");
            c.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
                .unwrap();
            c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        });
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
        TestDb {
            admin: admin.to_string(),
            url: format!("{base}/{name}"),
            name,
        }
    }

    /// Runs `f` with a client of this database, off the async thread.
    pub(crate) fn with<T: Send>(&self, f: impl FnOnce(&mut postgres::Client) -> T + Send) -> T {
        blocking(|| {
            let mut c = postgres::Client::connect(&self.url, postgres::NoTls).unwrap();
            f(&mut c)
        })
    }

    fn count(&self) -> i64 {
        blocking(|| {
            postgres::Client::connect(&self.url, postgres::NoTls)
                .ok()
                .and_then(|mut c| c.query_one("SELECT COUNT(*) FROM records", &[]).ok())
                .map(|r| r.get(0))
                .unwrap_or(-1)
        })
    }

    fn wait_count(&self, n: i64, within: Duration) -> i64 {
        let deadline = Instant::now() + within;
        loop {
            let c = self.count();
            if c >= n || Instant::now() > deadline {
                return c;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (&self.admin, &self.name);
        blocking(|| {
            if let Ok(mut c) = postgres::Client::connect(admin, postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        });
    }
}

pub(crate) fn lock() -> std::sync::MutexGuard<'static, ()> {
    PG_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

const COMPARABLE: &str =
    "ip, method, path, model, stream::int8, upstream, status::int8, attempts::int8, error, \
    request_body, response, prompt_tokens, completion_tokens, total_tokens, user_agent, client_key, \
    finish_reason, resumed::int8, complete::int8";

async fn same_traffic(gw: &Gateway) {
    let auth = format!("Bearer {TOKEN}");
    let h = [
        ("authorization", auth.as_str()),
        ("user-agent", "pg-test/1"),
    ];
    for body in [
        chat_body(false),
        chat_body(true),
        serde_json::json!({"model": "via-bad", "messages": []}),
        serde_json::json!({"model": "dead"}),
    ] {
        send(
            "POST",
            &gw.url("/v1/chat/completions"),
            &h,
            body.to_string().as_bytes(),
        )
        .await;
    }
    send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", "Bearer wrong")],
        b"{}",
    )
    .await;
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn rows_in_postgres_match_sqlite_rows_for_the_same_traffic() {
    let admin = admin_url();
    let _g = lock();
    let db = TestDb::new(&admin);
    let bad = Mock::always(Reply::status(503));
    let good = Mock::script(|req, _| {
        if req.json()["stream"] == true {
            Reply::sse_chat(&["Hel", "lo"], Duration::from_millis(5))
        } else {
            Reply::chat("plain answer")
        }
    });
    let cfg = config(
        "cooldown: {failures: 100, seconds: 1}",
        &[
            upstream("good", &good.endpoint(), "deny: [via-bad, dead]"),
            upstream("bad", &bad.endpoint(), "deny: [dead]"),
            upstream("good2", &good.endpoint(), "allow: [via-bad]"),
            upstream("gone", &Mock::refused_endpoint(), "allow: [dead]"),
        ],
    );
    let lite = Gateway::start(&cfg);
    let pg = Gateway::start_with(&cfg, &["-database", &db.url]);
    same_traffic(&lite).await;
    same_traffic(&pg).await;
    let lite_rows = lite.records(5);
    assert_eq!(db.wait_count(5, Duration::from_secs(10)), 5);
    let keys = [
        "ip",
        "method",
        "path",
        "model",
        "stream",
        "upstream",
        "status",
        "attempts",
        "error",
        "request_body",
        "response",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "user_agent",
        "client_key",
        "finish_reason",
        "resumed",
        "complete",
    ];
    // JSON answer, stream to [DONE], answer after a failover, all failed (502), refused (401).
    let complete: Vec<_> = lite_rows.iter().map(|r| r["complete"].clone()).collect();
    assert_eq!(complete, [1, 1, 1, 0, 0], "{lite_rows:#?}");
    assert_eq!(lite_rows[0]["finish_reason"], "stop");
    assert!(lite_rows.iter().all(|r| r["resumed"] == 0));
    let (pg_rows, ty) = db.with(|c| {
        let rows = c
            .query(&format!("SELECT {COMPARABLE}, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') FROM records ORDER BY id"), &[])
            .unwrap();
        let converted: Vec<(Vec<serde_json::Value>, String)> = rows
            .iter()
            .map(|row| {
                let vals = (0..keys.len())
                    .map(|i| match row.columns()[i].type_().name() {
                        "int8" => row.get::<_, Option<i64>>(i).map(Into::into).unwrap_or(serde_json::Value::Null),
                        _ => row.get::<_, Option<String>>(i).map(Into::into).unwrap_or(serde_json::Value::Null),
                    })
                    .collect();
                (vals, row.get::<_, String>(keys.len()))
            })
            .collect();
        let ty: String = c
            .query_one(
                "SELECT data_type FROM information_schema.columns WHERE table_name = 'records' AND column_name = 'created_at'",
                &[],
            )
            .unwrap()
            .get(0);
        (converted, ty)
    });
    assert_eq!(pg_rows.len(), lite_rows.len());
    for ((vals, created), lrow) in pg_rows.iter().zip(&lite_rows) {
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(
                &vals[i], &lrow[*key],
                "column {key} differs (SQLite {lrow})"
            );
        }
        assert!(created.ends_with('Z') && created.len() == 24, "{created}");
    }
    assert_eq!(ty, "timestamp with time zone");
    // The password-free URL is shown; the log never has a password (none here) or token.
    assert!(!pg.log().contains(TOKEN));
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn two_replicas_write_concurrently_without_loss_or_duplicates() {
    let admin = admin_url();
    let _g = lock();
    let db = TestDb::new(&admin);
    let m = Mock::always(Reply::chat("x"));
    let cfg = config("", &[upstream("u", &m.endpoint(), "")]);
    // Started together: migrations must not race.
    let (a, b) = std::thread::scope(|s| {
        let ha = s.spawn(|| Gateway::start_with(&cfg, &["-database", &db.url]));
        let hb = s.spawn(|| Gateway::start_with(&cfg, &["-database", &db.url]));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    let n = 150;
    let mut futs = Vec::new();
    for i in 0..n {
        for gw in [&a, &b] {
            let body = serde_json::json!({"model": "gpt-test", "n": i, "via": gw.addr});
            futs.push(post(gw, "/v1/chat/completions", body));
        }
    }
    let results = futures_util::future::join_all(futs).await;
    assert!(results.iter().all(|r| r.status == 200));
    assert_eq!(db.wait_count(2 * n, Duration::from_secs(15)), 2 * n);
    let distinct: i64 = db.with(|c| {
        c.query_one("SELECT COUNT(DISTINCT request_body) FROM records", &[])
            .unwrap()
            .get(0)
    });
    assert_eq!(distinct, 2 * n);
    let versions: i64 = db.with(|c| {
        c.query_one("SELECT COUNT(*) FROM openai_api_route_schema", &[])
            .unwrap()
            .get(0)
    });
    assert_eq!(versions, 1);
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn sigterm_flushes_every_queued_record_into_postgres() {
    let admin = admin_url();
    let _g = lock();
    let db = TestDb::new(&admin);
    let m = Mock::always(Reply::chat("x"));
    let mut gw = Gateway::start_with(
        &config("", &[upstream("u", &m.endpoint(), "")]),
        &["-database", &db.url],
    );
    let n = 300;
    let futs: Vec<_> = (0..n)
        .map(|_| post(&gw, "/v1/chat/completions", chat_body(false)))
        .collect();
    assert!(futures_util::future::join_all(futs)
        .await
        .iter()
        .all(|r| r.status == 200));
    gw.signal("TERM");
    assert_eq!(
        gw.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        gw.log()
    );
    assert_eq!(db.count(), n as i64);
}

fn pg_ctl(action: &str) -> bool {
    let Ok(versions) = std::fs::read_dir("/etc/postgresql") else {
        return false;
    };
    let Some(version) = versions
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().to_string())
        .next()
    else {
        return false;
    };
    std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", action])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

struct RestartGuard;
impl Drop for RestartGuard {
    fn drop(&mut self) {
        pg_ctl("start");
    }
}

#[actix_rt::test]
#[cfg_attr(
    not(all(test_postgres, test_root)),
    ignore = "stops and restarts the local PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES and OPENAI_API_ROUTE_TEST_ROOT"
)]
async fn postgres_restart_mid_traffic_loses_nothing_and_shows_the_outage() {
    let admin = admin_url();
    let _g = lock();
    let db = TestDb::new(&admin);
    let m = Mock::always(Reply::chat("x"));
    let gw = Gateway::start_with(
        &config("", &[upstream("u", &m.endpoint(), "")]),
        &["-database", &db.url],
    );
    let mut sent = 0i64;
    for _ in 0..10 {
        assert_eq!(
            post(&gw, "/v1/chat/completions", chat_body(false))
                .await
                .status,
            200
        );
        sent += 1;
    }
    assert_eq!(db.wait_count(sent, Duration::from_secs(10)), sent);
    let _restart = RestartGuard;
    assert!(
        pg_ctl("stop"),
        "pg_ctlcluster cannot stop the PostgreSQL cluster: this test needs a local Debian-style \
         cluster (unset OPENAI_API_ROUTE_TEST_ROOT to leave it out)"
    );
    // Requests keep flowing at full speed while the database is down.
    for _ in 0..40 {
        assert_served(&gw, Duration::from_millis(500)).await;
        sent += 1;
        actix_rt::time::sleep(Duration::from_millis(25)).await;
    }
    let down = eventually(Duration::from_secs(10), || {
        let page = std::process::Command::new("curl")
            .args(["-s", &gw.url("/")])
            .output();
        page.map(|o| String::from_utf8_lossy(&o.stdout).contains("database unreachable"))
            .unwrap_or(false)
    });
    assert!(down, "status page does not show the outage");
    let metrics = scrape(&gw).await;
    assert_eq!(
        metrics.metric("openai_api_route_database_up").value(),
        Some(0.0),
        "{metrics}"
    );
    assert!(pg_ctl("start"), "could not restart PostgreSQL");
    assert_eq!(
        db.wait_count(sent, Duration::from_secs(30)),
        sent,
        "records lost across the restart:\n{}",
        gw.log()
    );
    let metrics = scrape(&gw).await;
    assert_eq!(
        metrics.metric("openai_api_route_database_up").value(),
        Some(1.0)
    );
    assert_eq!(
        metrics
            .metric("openai_api_route_records_dropped_total")
            .value(),
        Some(0.0)
    );
}

#[test]
fn unreachable_postgres_at_start_is_a_clear_error_without_the_password() {
    let err = Gateway::try_start(
        &config("", &[upstream("u", "http://127.0.0.1:9/v1", "")]),
        &[
            "-database",
            "postgres://someone:hunter2-secret@127.0.0.1:1/nope",
        ],
    )
    .err()
    .expect("must not start");
    assert!(
        err.contains("cannot open or write database postgres://someone:***@127.0.0.1:1/nope"),
        "{err}"
    );
    assert!(!err.contains("hunter2-secret"));
}

#[test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
fn a_missing_database_is_reported_in_the_servers_own_words_without_the_password() {
    let admin = admin_url();
    let (scheme, rest) = admin.split_once("://").expect("a postgres:// URL");
    let (server, _) = rest.rsplit_once('/').unwrap_or((rest, ""));
    // A password in the URL (the test server trusts, so any is accepted) that must not be shown.
    let server = match server.split_once('@') {
        Some((user, host)) if !user.contains(':') => format!("{user}:hunter2-secret@{host}"),
        _ => server.to_string(),
    };
    let url = format!("{scheme}://{server}/does_not_exist");
    let err = Gateway::try_start(
        &config("", &[upstream("u", "http://127.0.0.1:9/v1", "")]),
        &["-database", &url],
    )
    .err()
    .expect("must not start");
    assert!(
        err.contains("database \"does_not_exist\" does not exist"),
        "the server's own message is missing: {err}"
    );
    assert!(
        !err.contains("db error\n") && !err.ends_with("db error"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn a_table_of_the_previous_version_gains_the_new_columns() {
    let admin = admin_url();
    let _g = lock();
    let db = TestDb::new(&admin);
    // The table and schema version the previous version (0.1, migration 1) left.
    db.with(|c| {
        c.batch_execute(
            "CREATE TABLE openai_api_route_schema (version INTEGER NOT NULL);
             INSERT INTO openai_api_route_schema (version) VALUES (1);
             CREATE TABLE records (
                id BIGSERIAL PRIMARY KEY,
                created_at TIMESTAMPTZ NOT NULL,
                ip TEXT,
                method TEXT NOT NULL,
                path TEXT NOT NULL,
                model TEXT,
                stream SMALLINT NOT NULL DEFAULT 0,
                upstream TEXT,
                status INTEGER NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                error TEXT,
                request_body TEXT,
                response TEXT,
                prompt_tokens BIGINT,
                completion_tokens BIGINT,
                total_tokens BIGINT,
                ttfb_ms BIGINT,
                duration_ms BIGINT,
                user_agent TEXT,
                client_key TEXT
             );
             CREATE INDEX records_created_at ON records(created_at);
             INSERT INTO records (created_at, method, path, status, response)
               VALUES (now(), 'POST', '/v1/old', 200, 'old reply');",
        )
        .unwrap()
    });
    let m = Mock::always(Reply::chat("new reply"));
    let gw = Gateway::start_with(
        &config("", &[upstream("u", &m.endpoint(), "")]),
        &["-database", &db.url],
    );
    assert_eq!(
        post(&gw, "/v1/chat/completions", chat_body(false))
            .await
            .status,
        200
    );
    assert_eq!(db.wait_count(2, Duration::from_secs(10)), 2);
    let (rows, version) = db.with(|c| {
        let rows: Vec<(String, Option<String>, i32, i16)> = c
            .query(
                "SELECT response, finish_reason, resumed, complete FROM records ORDER BY id",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        let version: i32 = c
            .query_one("SELECT version FROM openai_api_route_schema", &[])
            .unwrap()
            .get(0);
        (rows, version)
    });
    assert_eq!(
        rows,
        [
            ("old reply".to_string(), None, 0, 0),
            ("new reply".to_string(), Some("stop".to_string()), 0, 1),
        ]
    );
    assert_eq!(version, 2);
}
