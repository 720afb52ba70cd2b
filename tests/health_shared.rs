//! Replicas act as one (see the operations guide, "Health, probes and the roster"): two gateway
//! processes on one PostgreSQL database share cooldowns and their ends within a second, only one
//! request of the two probes a recovering upstream, and each lists the other. The fault test puts a
//! TCP relay of its own in front of the shared server and cuts it: requests keep flowing with
//! health local, and sharing resumes when the relay is back, without a restart. Runs when
//! `OPENAI_API_ROUTE_TEST_POSTGRES` is set at build time (else ignored), each test on a database of
//! its own, under the PostgreSQL tests' lock.
#![allow(clippy::await_holding_lock)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::postgres::{admin_url, lock, TestDb};
use crate::support::*;

/// A mock that fails with 500 while `down` is set, and answers otherwise.
fn switchable(down: &Arc<AtomicBool>) -> Mock {
    let down = down.clone();
    Mock::script(move |_, _| {
        if down.load(Ordering::SeqCst) {
            Reply::status(500)
        } else {
            Reply::chat("from primary")
        }
    })
}

/// Replica config: `primary` then `fallback`; the lists are configured, so every `/models`
/// request a mock sees is a probe.
fn two(global: &str, primary: &Mock, fallback: &Mock) -> String {
    config(
        global,
        &[
            upstream("primary", &primary.endpoint(), "models: [gpt-test]"),
            upstream("fallback", &fallback.endpoint(), "models: [gpt-test]"),
        ],
    )
}

fn replica(cfg: &str, url: &str) -> Gateway {
    Gateway::start_with(cfg, &["-database", url])
}

async fn healthy(gw: &Gateway, name: &str) -> Option<f64> {
    scrape(gw)
        .await
        .metric("openai_api_route_upstream_healthy")
        .label("upstream", name)
        .value()
}

/// Scrapes every 10 ms until `name`'s health gauge reads `want`; how long that took.
async fn until_healthy_is(gw: &Gateway, name: &str, want: f64, within: Duration) -> Duration {
    let t = Instant::now();
    while t.elapsed() < within {
        if healthy(gw, name).await == Some(want) {
            return t.elapsed();
        }
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} never read {want} within {within:?}:\n{}", gw.log());
}

async fn page(gw: &Gateway) -> String {
    send("GET", &gw.url("/"), &[], b"").await.text()
}

/// Waits until both replicas list two replicas (each has beaten at least once).
async fn both_listed(a: &Gateway, b: &Gateway) {
    for gw in [a, b] {
        let m = scrape_until(gw, Duration::from_secs(5), |m| {
            m.metric("openai_api_route_replicas").value() == Some(2.0)
        })
        .await;
        assert_eq!(
            m.metric("openai_api_route_replicas").value(),
            Some(2.0),
            "{}",
            gw.log()
        );
    }
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn a_cooldown_its_half_open_probe_and_its_end_reach_the_other_replica_within_a_second() {
    let admin = admin_url();
    let _guard = lock();
    let db = TestDb::new(&admin);
    let down = Arc::new(AtomicBool::new(true));
    let (primary, fallback) = (
        switchable(&down),
        Mock::always(Reply::chat("from fallback")),
    );
    let cfg = two("cooldown: {failures: 3, seconds: 2}", &primary, &fallback);
    let (a, b) = (replica(&cfg, &db.url), replica(&cfg, &db.url));
    both_listed(&a, &b).await;

    // Three failures on A start the cooldown there.
    for _ in 0..3 {
        let got = post(&a, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.header("x-upstream"), Some("fallback"));
    }
    let started = Instant::now();
    // The actor takes the outcome after the answer went out: wait for it on A first.
    until_healthy_is(&a, "primary", 0.0, Duration::from_millis(500)).await;
    let delay = until_healthy_is(&b, "primary", 0.0, Duration::from_secs(1)).await;
    eprintln!("cooldown reached the other replica after {delay:?}");
    let hits = primary.hits();
    assert_eq!(hits, 3);
    let got = post(&b, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("fallback"), "{}", b.log());
    assert_eq!(got.header("x-upstream-attempts"), Some("1"));
    assert_eq!(
        primary.hits(),
        hits,
        "B asked the upstream A put in cooldown"
    );

    // The cooldown ends 2 s after it started: from then on, requests alternate between the
    // replicas every 50 ms. Only one of them, on one replica, probes the still-dead upstream,
    // which sends it straight back for 2 s more.
    actix_rt::time::sleep(Duration::from_millis(1500).saturating_sub(started.elapsed())).await;
    let mut answered = 0;
    for i in 0..30u32 {
        let gw = if i.is_multiple_of(2) { &a } else { &b };
        let got = post(gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.status, 200, "{}", got.text());
        answered += 1;
        actix_rt::time::sleep(Duration::from_millis(50)).await;
        if started.elapsed() > Duration::from_millis(3700) {
            break;
        }
    }
    assert!(answered >= 20, "only {answered} requests in the window");
    assert_eq!(
        primary.hits(),
        hits + 1,
        "one half-open probe from both replicas together:\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );

    // It recovers: the next half-open probe succeeds on one replica, and the other gives it its
    // place back within a second.
    down.store(false, Ordering::SeqCst);
    let t = Instant::now();
    let mut i = 0usize;
    let (winner, other) = loop {
        assert!(t.elapsed() < Duration::from_secs(8), "never recovered");
        let (gw, other) = if i.is_multiple_of(2) {
            (&a, &b)
        } else {
            (&b, &a)
        };
        i += 1;
        let got = post(gw, "/v1/chat/completions", chat_body(false)).await;
        if got.header("x-upstream") == Some("primary") {
            break (gw, other);
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    };
    let t = Instant::now();
    until_healthy_is(winner, "primary", 1.0, Duration::from_millis(500)).await;
    until_healthy_is(other, "primary", 1.0, Duration::from_secs(1)).await;
    eprintln!("recovery reached the other replica after {:?}", t.elapsed());
    let got = post(other, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("primary"));
    assert_eq!(got.header("x-upstream-attempts"), Some("1"));
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn a_retry_after_on_one_replica_moves_the_upstream_back_on_the_other() {
    let admin = admin_url();
    let _guard = lock();
    let db = TestDb::new(&admin);
    let primary = Mock::always(Reply::Full {
        status: 429,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("retry-after".into(), "30".into()),
        ],
        body: br#"{"error":{"message":"slow down","type":"rate_limit"}}"#.to_vec(),
    });
    let fallback = Mock::always(Reply::chat("from fallback"));
    let cfg = two("", &primary, &fallback);
    let (a, b) = (replica(&cfg, &db.url), replica(&cfg, &db.url));
    both_listed(&a, &b).await;
    let got = post(&a, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("fallback"));
    assert_eq!(primary.hits(), 1);
    let t = Instant::now();
    let seen = loop {
        if page(&b).await.contains("cooling down until") {
            break t.elapsed();
        }
        assert!(t.elapsed() < Duration::from_secs(1), "{}", b.log());
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!("Retry-After cooldown reached the other replica after {seen:?}");
    let got = post(&b, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("fallback"));
    assert_eq!(got.header("x-upstream-attempts"), Some("1"));
    assert_eq!(primary.hits(), 1);
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn two_replicas_probe_once_per_interval_together_and_list_each_other() {
    let admin = admin_url();
    let _guard = lock();
    let db = TestDb::new(&admin);
    let down = Arc::new(AtomicBool::new(true));
    let (primary, fallback) = (
        switchable(&down),
        Mock::always(Reply::chat("from fallback")),
    );
    primary.set_models(Reply::status(503));
    let cfg = two(
        "cooldown: {failures: 1, seconds: 60}\nprobe_interval: 1",
        &primary,
        &fallback,
    );
    let (a, b) = (replica(&cfg, &db.url), replica(&cfg, &db.url));
    both_listed(&a, &b).await;
    let got = post(&a, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("fallback"));
    until_healthy_is(&b, "primary", 0.0, Duration::from_secs(1)).await;
    let t = Instant::now();
    actix_rt::time::sleep(Duration::from_millis(4500)).await;
    let probes = primary.model_fetches().len();
    let elapsed = t.elapsed().as_secs_f64();
    assert!(
        (3..=5).contains(&probes),
        "{probes} probes in {elapsed:.1}s from two replicas with probe_interval 1"
    );
    let counted = |m: &Metrics| {
        m.metric("openai_api_route_probes_total")
            .label("upstream", "primary")
            .label("result", "http_error")
            .value()
            .unwrap_or(0.0)
    };
    let (ma, mb) = (scrape(&a).await, scrape(&b).await);
    let total = counted(&ma) + counted(&mb);
    assert!(
        (total - probes as f64).abs() <= 1.0,
        "{total} counted, {probes} seen"
    );
    // Probes are not attempts.
    let attempts = |m: &Metrics| {
        m.metric("openai_api_route_upstream_requests_total")
            .label("upstream", "primary")
            .label("outcome", "http_error")
            .value()
            .unwrap_or(0.0)
    };
    assert_eq!(attempts(&ma) + attempts(&mb), 1.0);

    // It recovers: a probe ends the cooldown before any client request is sent to it.
    down.store(false, Ordering::SeqCst);
    primary.set_models(Reply::models(&["gpt-test"]));
    until_healthy_is(&a, "primary", 1.0, Duration::from_secs(3)).await;
    until_healthy_is(&b, "primary", 1.0, Duration::from_secs(1)).await;
    assert_eq!(primary.hits(), 1, "a client request was risked on it");
    let got = post(&b, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("primary"));

    // Each status page lists both replicas, and the probes with their last result.
    let (pa, pb) = (page(&a).await, page(&b).await);
    for p in [&pa, &pb] {
        assert!(p.contains("Replicas sharing the store (2)"), "{p}");
        assert!(p.contains("every 1s"), "{p}");
    }
    let listen = |gw: &Gateway| gw.addr.rsplit(':').next().unwrap().to_string();
    for port in [listen(&a), listen(&b)] {
        assert!(pa.contains(&port), "{port} not on the page");
    }
    // Whichever replica made it, both show the last probe.
    assert!(pa.contains("last: ok"), "{pa}");
    assert!(pb.contains("last: ok"), "{pb}");
}

/// A TCP relay to the shared PostgreSQL that the test cuts and restores (the shared server
/// itself is never stopped: other tests use it).
struct Relay {
    port: u16,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn new(to: &str) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let relay = Relay {
            port,
            open: Arc::new(AtomicBool::new(true)),
            conns: Arc::default(),
            stop: Arc::default(),
        };
        let (open, conns, stop, to) = (
            relay.open.clone(),
            relay.conns.clone(),
            relay.stop.clone(),
            to.to_string(),
        );
        l.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let mut listener = Some(l);
            while !stop.load(Ordering::SeqCst) {
                if !open.load(Ordering::SeqCst) {
                    // Closed: nothing listens, so connections are refused.
                    listener = None;
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                let l = listener.get_or_insert_with(|| {
                    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
                    l.set_nonblocking(true).unwrap();
                    l
                });
                match l.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = TcpStream::connect(&to) else {
                            continue;
                        };
                        client.set_nonblocking(false).unwrap();
                        let mut list = conns.lock().unwrap();
                        list.push(client.try_clone().unwrap());
                        list.push(server.try_clone().unwrap());
                        pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                        pipe(server, client);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        relay
    }

    fn url(&self, db: &TestDb) -> String {
        let name = db.url.rsplit('/').next().unwrap();
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Cuts every connection and refuses new ones.
    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn postgres_cut_mid_run_keeps_requests_flowing_with_health_local_then_sharing_resumes() {
    let admin = admin_url();
    let _guard = lock();
    let db = TestDb::new(&admin);
    let server = admin
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:5432")
        .to_string();
    let relay = Relay::new(&server);
    let url = relay.url(&db);
    let down = Arc::new(AtomicBool::new(false));
    let (primary, fallback) = (
        switchable(&down),
        Mock::always(Reply::chat("from fallback")),
    );
    let other = Mock::always(Reply::status(500));
    let cfg = config(
        "cooldown: {failures: 1, seconds: 60}",
        &[
            upstream("primary", &primary.endpoint(), "allow: [gpt-test]"),
            upstream("fallback", &fallback.endpoint(), "allow: [gpt-test]"),
            upstream("other", &other.endpoint(), "allow: [other-model]"),
        ],
    );
    let (a, b) = (replica(&cfg, &url), replica(&cfg, &url));
    both_listed(&a, &b).await;

    relay.cut();
    let t = Instant::now();
    // Requests keep flowing at full speed on both while PostgreSQL cannot be reached.
    for i in 0..20u32 {
        assert_served(
            if i.is_multiple_of(2) { &a } else { &b },
            Duration::from_millis(500),
        )
        .await;
        actix_rt::time::sleep(Duration::from_millis(25)).await;
    }
    let unreachable = |gw: &Gateway| gw.log().contains("replicas: PostgreSQL cannot be reached");
    assert!(
        eventually(Duration::from_secs(5), || unreachable(&a)
            && unreachable(&b)),
        "{}",
        a.log()
    );
    assert!(page(&a).await.contains("PostgreSQL cannot be reached"));
    // Health is local: a cooldown on A stays A's.
    down.store(true, Ordering::SeqCst);
    let got = post(&a, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("fallback"));
    until_healthy_is(&a, "primary", 0.0, Duration::from_millis(500)).await;
    actix_rt::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(healthy(&b, "primary").await, Some(1.0));
    eprintln!("outage handled for {:?}", t.elapsed());

    // PostgreSQL returns: sharing resumes without a restart. What A learned alone reaches B,
    // and a new cooldown on B reaches A.
    relay.restore();
    let resumed = until_healthy_is(&b, "primary", 0.0, Duration::from_secs(5)).await;
    eprintln!("sharing resumed {resumed:?} after PostgreSQL returned");
    let got = post(
        &b,
        "/v1/chat/completions",
        serde_json::json!({"model": "other-model", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(got.status, 500);
    until_healthy_is(&a, "other", 0.0, Duration::from_secs(1)).await;
    assert!(b
        .log()
        .contains("replicas: PostgreSQL answers again; health is shared again"));
    let counted = |gw: &Gateway| gw.log().matches("PostgreSQL cannot be reached").count();
    assert_eq!(counted(&a), 1, "said once:\n{}", a.log());
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn cooldown_and_recovery_alerts_fire_once_for_the_group() {
    let admin = admin_url();
    let _guard = lock();
    let db = TestDb::new(&admin);
    let hook = Mock::always(Reply::json(200, serde_json::json!({"code": 0})));
    let down = Arc::new(AtomicBool::new(true));
    let (primary, fallback) = (
        switchable(&down),
        Mock::always(Reply::chat("from fallback")),
    );
    let cfg = two(
        &format!(
            "cooldown: {{failures: 2, seconds: 2}}\nnotify: {{min_interval: 0, feishu: {{webhook: \"http://{}/hook\"}}}}",
            hook.addr
        ),
        &primary,
        &fallback,
    );
    let (a, b) = (replica(&cfg, &db.url), replica(&cfg, &db.url));
    both_listed(&a, &b).await;
    // Both replicas reach the threshold at the same moment, each on its own.
    let sent: Vec<_> = [&a, &b, &a, &b]
        .into_iter()
        .map(|gw| post(gw, "/v1/chat/completions", chat_body(false)))
        .collect();
    for got in futures_util::future::join_all(sent).await {
        assert_eq!(got.header("x-upstream"), Some("fallback"));
    }
    let alerts = |what: &str| {
        hook.seen()
            .iter()
            .filter(|s| {
                s.json()["content"]["text"]
                    .as_str()
                    .unwrap_or("")
                    .contains(what)
            })
            .count()
    };
    assert!(eventually(Duration::from_secs(2), || alerts(
        "cooling down"
    ) >= 1));
    down.store(false, Ordering::SeqCst);
    let t = Instant::now();
    let mut i = 0u32;
    while alerts("recovered") == 0 {
        assert!(t.elapsed() < Duration::from_secs(8), "never recovered");
        let gw = if i.is_multiple_of(2) { &a } else { &b };
        i += 1;
        post(gw, "/v1/chat/completions", chat_body(false)).await;
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    actix_rt::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        alerts("cooling down"),
        1,
        "A:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    assert_eq!(alerts("recovered"), 1);
    let went_down = |gw: &Gateway| gw.log().contains("failed 2 times in a row");
    eprintln!(
        "replicas that reached the threshold themselves: A {} B {}",
        went_down(&a),
        went_down(&b)
    );
}
