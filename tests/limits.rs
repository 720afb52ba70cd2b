//! Version 0.3's limits nobody can talk the gateway out of (see the security guide, "Second probe
//! (0.3): limits"), each as the attack of the second probe through the real binary: floods of local
//! answers and of refused requests against the records, made-up statuses against the metrics'
//! series, and (in `limits_ws`) WebSocket sessions against memory.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use crate::support::*;

/// Rows per second of `created_at` (RFC 3339, cut to the second) for rows with `status`.
fn per_second(rows: &[serde_json::Value], status: u16) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for r in rows.iter().filter(|r| r["status"] == status) {
        let at = r["created_at"].as_str().unwrap_or("");
        *out.entry(at.get(..19).unwrap_or(at).to_string())
            .or_insert(0) += 1;
    }
    out
}

#[actix_rt::test]
async fn successful_local_answers_are_counted_not_recorded() {
    let m = Mock::always(Reply::chat("real answer"));
    m.set_models(Reply::models(&["model-a", "model-b"]));
    let gw = one(&m, "");
    assert!(eventually(Duration::from_secs(5), || !m
        .model_fetches()
        .is_empty()));
    let a = auth();
    let h = [("authorization", a.as_str())];
    let mut sent = 0u64;
    for _ in 0..10 {
        let batch = join_all((0..50).map(|i| {
            let path = if i % 2 == 0 {
                "/v1/models".to_string()
            } else {
                "/v1/models/model-a".to_string()
            };
            let url = gw.url(&path);
            async move { send("GET", &url, &h, b"").await }
        }))
        .await;
        for got in batch {
            assert_eq!(got.status, 200);
            sent += 1;
        }
    }
    let pre = preflight(&gw).await;
    assert_eq!(pre.status, 204);
    // A real request afterwards is recorded: the writer ran, and it is the only row.
    assert_eq!(
        post(&gw, "/v1/chat/completions", chat_body(false))
            .await
            .status,
        200
    );
    let rows = gw.records(1);
    std::thread::sleep(Duration::from_millis(300));
    let rows = if rows.len() == 1 {
        read_rows(&gw.db_path)
    } else {
        rows
    };
    assert_eq!(
        rows.len(),
        1,
        "local answers were recorded: {} rows",
        rows.len()
    );
    assert_eq!(rows[0]["path"], "/v1/chat/completions");
    let text = scrape(&gw).await;
    assert_eq!(
        text.metric("openai_api_route_http_requests_total")
            .label("endpoint", "models")
            .label("method", "GET")
            .label("status", "200")
            .value(),
        Some(sent as f64),
        "every local answer is still counted"
    );
    assert_eq!(
        text.metric("openai_api_route_http_requests_total")
            .label("endpoint", "chat/completions")
            .label("method", "OPTIONS")
            .label("status", "204")
            .value(),
        Some(1.0)
    );
}

#[actix_rt::test]
async fn a_401_flood_leaves_room_for_other_refusals_and_writes_no_bodies() {
    let m = Mock::always(Reply::chat("real answer"));
    let gw = one(&m, "");
    let url = gw.url("/v1/chat/completions");
    let big = format!(
        "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "x".repeat(16 * 1024)
    );
    let a = auth();
    let t0 = Instant::now();
    let (mut unauthorized, mut bad, mut missing) = (0u64, 0u64, 0u64);
    // 3,000 requests with a wrong token and a 16 KiB body; after every 250 of them, one body the
    // gateway cannot read (400) and one unknown model id (404) from a real token holder.
    for round in 0..12 {
        let batch = join_all((0..250).map(|_| {
            send(
                "POST",
                &url,
                &[("authorization", "Bearer wrong")],
                big.as_bytes(),
            )
        }))
        .await;
        for got in batch {
            assert_eq!(got.status, 401);
            unauthorized += 1;
        }
        let got = send(
            "POST",
            &url,
            &[
                ("authorization", a.as_str()),
                ("content-type", "application/json"),
            ],
            format!("{{\"model\": \"m{round}\", \"model\": \"dup\"}}").as_bytes(),
        )
        .await;
        assert_eq!(got.status, 400, "{}", got.text());
        bad += 1;
        let got = send(
            "GET",
            &gw.url(&format!("/v1/models/missing-{round}")),
            &[("authorization", a.as_str())],
            b"",
        )
        .await;
        assert_eq!(got.status, 404);
        missing += 1;
        // At most five rounds a second: the 400s and 404s stay within their own ten a second
        // however fast the machine floods.
        actix_rt::time::sleep(Duration::from_millis(200)).await;
    }
    // A flood of n.x seconds touches n + 2 wall-clock seconds (one more for scheduling slack).
    let seconds = t0.elapsed().as_secs() + 3;
    eprintln!("flood of {unauthorized} refused requests took {seconds}s");
    // Every 400 and 404 was recorded although the 401s used up their own ten every second.
    let want_other = (bad + missing) as usize;
    assert!(
        eventually(Duration::from_secs(10), || {
            let rows = read_rows(&gw.db_path);
            rows.iter()
                .filter(|r| r["status"] == 400 || r["status"] == 404)
                .count()
                >= want_other
        }),
        "the 401 flood crowded out other refusals' records: {:?}",
        read_rows(&gw.db_path)
            .iter()
            .map(|r| r["status"].clone())
            .collect::<Vec<_>>()
    );
    std::thread::sleep(Duration::from_millis(500));
    let rows = read_rows(&gw.db_path);
    let r401 = rows.iter().filter(|r| r["status"] == 401).count() as u64;
    assert!(r401 >= 1, "no 401 recorded at all");
    let mut seconds_seen: Vec<_> = per_second(&rows, 401).into_iter().collect();
    seconds_seen.sort();
    eprintln!("401 records per second: {seconds_seen:?}");
    assert!(
        r401 <= 10 * seconds,
        "{r401} records of 401s in {seconds}s: more than 10 a second"
    );
    for (second, n) in per_second(&rows, 401) {
        assert!(n <= 10, "{n} records of 401s in second {second}");
    }
    for r in &rows {
        let body = r["request_body"].as_str().unwrap_or("");
        assert!(
            body.is_empty(),
            "a refused request's body was kept: {} bytes",
            body.len()
        );
        let resp = r["response"].as_str().unwrap_or("");
        assert!(
            resp.is_empty(),
            "a refused request's answer was kept: {resp}"
        );
    }
    // What the database keeps of the whole flood: its file once the WAL is checkpointed into it.
    gw.db()
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    let db_bytes = std::fs::metadata(&gw.db_path).map_or(0, |m| m.len());
    eprintln!("{} rows, database {db_bytes} bytes", rows.len());
    assert!(
        db_bytes < 256 * 1024,
        "{db_bytes} bytes of database for {} rows",
        rows.len()
    );
    let text = scrape(&gw).await;
    for (reason, n) in [
        ("auth", unauthorized),
        ("bad_request", bad),
        ("not_found", missing),
    ] {
        assert_eq!(
            text.metric("openai_api_route_rejected_total")
                .label("reason", reason)
                .value(),
            Some(n as f64),
            "{reason}: every refusal is counted"
        );
    }
    assert_eq!(m.hits(), 0);
}

/// The distinct `status` label values of `openai_api_route_http_requests_total` in a scrape.
fn status_labels(text: &Metrics) -> BTreeSet<String> {
    text.samples
        .iter()
        .filter(|s| s.name == "openai_api_route_http_requests_total")
        .filter_map(|s| s.labels.iter().find(|(k, _)| k == "status"))
        .map(|(_, v)| v.clone())
        .collect()
}

#[actix_rt::test]
async fn made_up_upstream_statuses_make_no_new_series() {
    let odd: Vec<u16> = (230..=299)
        .chain(300..=399)
        .chain(460..=499)
        .chain(520..=599)
        .chain(600..=699)
        .filter(|s| ![301, 302, 304, 499].contains(s))
        .collect();
    let odd2 = odd.clone();
    let m = Mock::script(move |_, n| Reply::status(odd2[n % odd2.len()]));
    let gw = one(&m, "cooldown: {failures: 100000, seconds: 1}");
    let body = chat_body(false).to_string();
    let a = auth();
    let url = gw.url("/v1/chat/completions");
    let h = [
        ("authorization", a.as_str()),
        ("content-type", "application/json"),
    ];
    for chunk in odd.chunks(40) {
        let got = join_all(
            chunk
                .iter()
                .map(|_| send("POST", &url, &h, body.as_bytes())),
        )
        .await;
        assert!(got.iter().all(|g| g.status >= 200), "{:?}", got[0].status);
    }
    assert_eq!(m.hits(), odd.len());
    let t = Instant::now();
    let text = scrape(&gw).await;
    let took = t.elapsed();
    let labels = status_labels(&text);
    eprintln!(
        "{} distinct upstream statuses → status labels {labels:?}; {} series in the scrape ({} bytes, {took:?})",
        odd.len(),
        text.series_count(),
        text.text.len()
    );
    let allowed: BTreeSet<String> = [
        "200", "201", "204", "206", "301", "302", "304", "400", "401", "403", "404", "405", "408",
        "409", "413", "415", "422", "429", "431", "499", "500", "501", "502", "503", "504", "508",
        "1xx", "2xx", "3xx", "4xx", "5xx",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert!(
        labels.is_subset(&allowed),
        "status labels outside the allowed set: {:?}",
        labels.difference(&allowed).collect::<Vec<_>>()
    );
    for class in ["2xx", "3xx", "4xx", "5xx"] {
        assert!(labels.contains(class), "{class} missing: {labels:?}");
    }
    // 230..299 are 2xx, 600..699 are 5xx (outside 100–599).
    let count = |status: &str| {
        text.metric("openai_api_route_http_requests_total")
            .label("endpoint", "chat/completions")
            .label("method", "POST")
            .label("status", status)
            .value()
            .unwrap_or(0.0)
    };
    assert_eq!(count("2xx"), 70.0);
    assert_eq!(count("5xx"), 80.0 + 100.0);
    assert_eq!(count("4xx"), 39.0);
    assert_eq!(count("3xx"), 97.0);
}
