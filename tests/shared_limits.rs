//! Members' limits held by two replicas together through one PostgreSQL database (see the
//! operations guide, "Members' limits across replicas"): `rpm`, `concurrent` and `tpm` admit no
//! more across both than the bound allows (5 % of the limit or one request per replica), a
//! replica alone still gets the whole limit, and when PostgreSQL cannot be reached each replica
//! enforces its share, says so once, and shares again when it answers. The outage is a TCP relay
//! in front of the test server that the test cuts and restores, never the server itself.
//! Runs when `OPENAI_API_ROUTE_TEST_POSTGRES` is set at build time (else ignored), each test in
//! a database of its own, under the PostgreSQL tests' lock.
#![allow(clippy::await_holding_lock)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::Value;

use crate::postgres::{admin_url, lock, TestDb};
use crate::support::*;

const ALICE: &str = "sk-alice-limits-0123456789abcdef";
const BOB: &str = "sk-bob-limits-0123456789abcdef";

/// A config with two members, alice and bob, each with `limits` (YAML keys, one per line).
fn members(up: &str, limits: &str) -> String {
    let indent = |l: &str| {
        l.lines()
            .map(|x| format!("    {}\n", x.trim()))
            .collect::<String>()
    };
    let global = format!(
        "members:\n  - name: alice\n    key: {ALICE}\n{}  - name: bob\n    key: {BOB}\n{}",
        indent(limits),
        indent(limits)
    );
    config(&global, &[upstream("up", up, "")])
}

fn replica(url: &str, cfg: &str) -> Gateway {
    Gateway::start_with(cfg, &["-database", url])
}

/// Two replicas, started together, once both share through PostgreSQL. Until its first
/// connection a replica cannot know of the other and enforces the whole limit alone (on a loaded
/// machine, setting up the tables can take longer than a request's wait): the tests of the
/// sharing itself start once both share.
async fn two_replicas(url: &str, cfg: &str) -> (Gateway, Gateway) {
    let (a, b) = (replica(url, cfg), replica(url, cfg));
    for gw in [&a, &b] {
        wait_log(
            gw,
            "members' limits: PostgreSQL answers",
            Duration::from_secs(15),
        )
        .await;
    }
    (a, b)
}

async fn chat(gw: &Gateway, key: &str) -> Got {
    let auth = format!("Bearer {key}");
    send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        chat_body(false).to_string().as_bytes(),
    )
    .await
}

async fn usage(gw: &Gateway, key: &str) -> Value {
    let auth = format!("Bearer {key}");
    send("GET", &gw.url("/usage"), &[("authorization", &auth)], b"")
        .await
        .json()
}

/// How many were admitted; every other answer must be the member's 429.
fn admitted(got: &[Got], kind: &str) -> usize {
    for g in got.iter().filter(|g| g.status != 200) {
        assert_eq!(g.status, 429, "{}", g.text());
        assert_eq!(g.json()["error"]["type"], kind, "{}", g.text());
        let retry: u64 = g.header("retry-after").unwrap().parse().unwrap();
        assert!(retry >= 1, "{retry}");
    }
    got.iter().filter(|g| g.status == 200).count()
}

/// Lines of the gateway's log that contain `needle`.
fn lines(gw: &Gateway, needle: &str) -> usize {
    gw.log().lines().filter(|l| l.contains(needle)).count()
}

async fn wait_log(gw: &Gateway, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while lines(gw, needle) == 0 {
        assert!(Instant::now() < deadline, "no {needle:?} in\n{}", gw.log());
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn rpm_holds_for_two_replicas_together_in_turn_and_at_once() {
    let admin = admin_url();
    let _guard = lock();
    let db = TestDb::new(&admin);
    let up = Mock::always(Reply::chat("hi"));
    let cfg = members(&up.endpoint(), "rpm: 20");
    let (a, b) = two_replicas(&db.url, &cfg).await;
    // In turn: alice's requests alternate between the replicas.
    let mut got = Vec::new();
    for i in 0..30 {
        got.push(chat(if i % 2 == 0 { &a } else { &b }, ALICE).await);
    }
    let ok = admitted(&got, "requests");
    // The bound: 20 + max(5 % of 20, one per replica) = 22; leases never go over.
    assert!((20..=22).contains(&ok), "alice admitted {ok} of 30");
    assert_eq!(ok, 20, "leases admit exactly the limit");
    // The usage page shows the group's requests, whichever replica answers it.
    let now = &usage(&b, ALICE).await["now"];
    let seen = now["requests_last_minute"].as_u64().unwrap();
    assert!((20..=22).contains(&seen), "{now}");
    // At once: 20 of bob's requests on each replica in parallel.
    let sent: Vec<_> = (0..40)
        .map(|i| chat(if i % 2 == 0 { &a } else { &b }, BOB))
        .collect();
    let ok = admitted(&join_all(sent).await, "requests");
    assert!((20..=22).contains(&ok), "bob admitted {ok} of 40");
    assert_eq!(up.hits(), 40, "refused requests never went upstream");
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn concurrent_holds_for_two_replicas_together_and_places_come_back() {
    let admin = admin_url();
    let _guard = lock();
    let db = TestDb::new(&admin);
    let up = Mock::always(Reply::Delay(
        Duration::from_millis(1500),
        Box::new(Reply::chat("slow")),
    ));
    let cfg = members(&up.endpoint(), "concurrent: 4");
    let (a, b) = two_replicas(&db.url, &cfg).await;
    for round in 0..2 {
        let sent: Vec<_> = (0..10)
            .map(|i| chat(if i % 2 == 0 { &a } else { &b }, ALICE))
            .collect();
        let ok = admitted(&join_all(sent).await, "requests");
        // The bound is 4 + max(0.2, 2) = 6; held places never go over.
        assert_eq!(ok, 4, "round {round}: {ok} of 10 in flight at once");
    }
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn tpm_holds_for_two_replicas_together() {
    let admin = admin_url();
    let _guard = lock();
    let db = TestDb::new(&admin);
    // Every answer reports 12 tokens: 120 tokens is 10 requests.
    let up = Mock::always(Reply::chat("hi"));
    let cfg = members(&up.endpoint(), "tpm: 120");
    let (a, b) = two_replicas(&db.url, &cfg).await;
    let mut got = Vec::new();
    for i in 0..16 {
        got.push(chat(if i % 2 == 0 { &a } else { &b }, ALICE).await);
    }
    let ok = admitted(&got, "tokens");
    // Admitted while the group's tokens are below 120; the bound allows one request more per
    // replica (5 % of 120 is less than a request).
    eprintln!("tpm: alice admitted {ok} of 16 in turn");
    assert!((10..=12).contains(&ok), "alice admitted {ok} of 16");
    let now = &usage(&a, ALICE).await["now"];
    assert_eq!(now["tokens_last_minute"], (ok * 12) as u64, "{now}");
    // In parallel too.
    let sent: Vec<_> = (0..16)
        .map(|i| chat(if i % 2 == 0 { &a } else { &b }, BOB))
        .collect();
    let ok = admitted(&join_all(sent).await, "tokens");
    assert!(ok >= 1, "{ok}");
    // A member without limits leaves no row anywhere: it never reaches PostgreSQL's sharing.
    for gw in [&a, &b] {
        assert_eq!(
            post(gw, "/v1/chat/completions", chat_body(false))
                .await
                .status,
            200
        );
    }
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    let names: Vec<String> = db.with(|c| {
        c.query(
            "SELECT member FROM openai_api_route_member_tokens \
             UNION SELECT member FROM openai_api_route_member_slots \
             UNION SELECT member FROM openai_api_route_member_places ORDER BY 1",
            &[],
        )
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect()
    });
    assert_eq!(names, ["alice", "bob"]);
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn one_replica_alone_gets_the_whole_limit() {
    let admin = admin_url();
    let _guard = lock();
    let db = TestDb::new(&admin);
    let up = Mock::always(Reply::Delay(
        Duration::from_millis(800),
        Box::new(Reply::chat("hi")),
    ));
    let cfg = members(&up.endpoint(), "rpm: 20\nconcurrent: 3");
    let a = replica(&db.url, &cfg);
    let sent: Vec<_> = (0..5).map(|_| chat(&a, ALICE)).collect();
    assert_eq!(admitted(&join_all(sent).await, "requests"), 3);
    let mut got = Vec::new();
    for _ in 0..20 {
        got.push(chat(&a, ALICE).await);
    }
    // 3 + 17: the rpm slots of the first round and these.
    assert_eq!(admitted(&got, "requests"), 17);
}

/// A TCP relay in front of the test PostgreSQL that the test can cut (every connection closed,
/// new ones refused) and restore.
struct Relay {
    addr: String,
    down: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(target: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let down = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (down2, open2) = (down.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                if down2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let mut o = open2.lock().unwrap();
                o.push(client.try_clone().unwrap());
                o.push(server.try_clone().unwrap());
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        Relay { addr, down, open }
    }

    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// `url` with its host and port replaced by `addr`.
fn through(url: &str, addr: &str) -> String {
    let (scheme_user, rest) = url.split_once('@').unwrap();
    let (_, path) = rest.split_once('/').unwrap();
    format!("{scheme_user}@{addr}/{path}")
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn postgres_down_mid_run_each_replica_enforces_its_share_then_sharing_resumes() {
    let admin = admin_url();
    let _guard = lock();
    let db = TestDb::new(&admin);
    let target = {
        let rest = db.url.split_once('@').unwrap().1;
        rest.split_once('/').unwrap().0.to_string()
    };
    let relay = Relay::start(target);
    let url = through(&db.url, &relay.addr);
    let up = Mock::always(Reply::chat("hi"));
    let cfg = members(&up.endpoint(), "rpm: 20");
    let (a, b) = (replica(&url, &cfg), replica(&url, &cfg));
    // Both have heartbeats in the roster before the cut: the share divides by 2.
    actix_rt::time::sleep(Duration::from_millis(1500)).await;
    for gw in [&a, &b] {
        assert_eq!(chat(gw, ALICE).await.status, 200);
    }
    // Each counts the replicas again within a second of its first limited request.
    actix_rt::time::sleep(Duration::from_millis(1200)).await;

    relay.cut();
    let down = "members' limits: PostgreSQL cannot be reached";
    for gw in [&a, &b] {
        wait_log(gw, down, Duration::from_secs(5)).await;
    }
    // Requests keep flowing, and each replica admits alice up to its share, ⌊20 ÷ 2⌋ = 10, in
    // the window that already holds its first request.
    for gw in [&a, &b] {
        let mut got = Vec::new();
        for _ in 0..14 {
            got.push(chat(gw, ALICE).await);
        }
        assert_eq!(admitted(&got, "requests"), 9, "{}", gw.log());
        assert_eq!(
            post(gw, "/v1/chat/completions", chat_body(false))
                .await
                .status,
            200
        );
    }
    let refused = chat(&a, ALICE).await;
    assert!(
        refused.text().contains("20 requests per minute"),
        "the member's own limit is named: {}",
        refused.text()
    );

    relay.restore();
    let back = "shared by the 2 replicas seen in the last minute again";
    for gw in [&a, &b] {
        wait_log(gw, back, Duration::from_secs(5)).await;
        assert_eq!(lines(gw, down), 1, "said once:\n{}", gw.log());
    }
    // Sharing again, without a restart: alice's 20 slots are all counted (the ones admitted
    // alone were written back), and bob shares his 20 between the two.
    for gw in [&a, &b] {
        assert_eq!(chat(gw, ALICE).await.status, 429);
    }
    let mut got = Vec::new();
    for i in 0..26 {
        got.push(chat(if i % 2 == 0 { &a } else { &b }, BOB).await);
    }
    assert_eq!(admitted(&got, "requests"), 20);
}
