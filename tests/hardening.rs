//! Hardening (see the security guide), each rule as the attack that broke it, through the real
//! binary: flooding without a token, bodies the gateway cannot read, dot segments, slow bodies, an
//! endless SSE line, alert and log injection, database passwords, HEAD, forwarded headers, an
//! ambiguous upstream head, and gateways chained into a loop.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use crate::support::*;

#[actix_rt::test]
async fn unauthenticated_flood_is_counted_but_its_records_are_capped() {
    let m = Mock::always(Reply::chat("real answer"));
    let gw = one(&m, "");
    let url = gw.url(&format!("/v1/{}", "p".repeat(8000)));
    let ua = "U".repeat(4000);
    let headers = [("user-agent", ua.as_str())];
    let t0 = Instant::now();
    let mut sent = 0;
    for _ in 0..20 {
        let batch = join_all((0..15).map(|_| send("POST", &url, &headers, b"{}"))).await;
        for got in batch {
            assert_eq!(got.status, 401);
            sent += 1;
        }
    }
    let seconds = t0.elapsed().as_secs() + 2;
    // A real client right after the flood is served and recorded.
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 200);
    assert!(eventually(Duration::from_secs(10), || read_rows(
        &gw.db_path
    )
    .iter()
    .any(|r| r["status"] == 200)));
    let rows = read_rows(&gw.db_path);
    let rejected = rows.iter().filter(|r| r["status"] == 401).count() as u64;
    assert!(rejected >= 1, "no rejected request was recorded at all");
    assert!(
        rejected <= 10 * seconds,
        "{rejected} rejected records in {seconds}s: more than 10 a second"
    );
    for r in &rows {
        assert!(r["path"].as_str().unwrap().len() <= 1024, "path not cut");
        if let Some(ua) = r["user_agent"].as_str() {
            assert!(ua.len() <= 256, "user_agent not cut: {}", ua.len());
        }
    }
    let text = scrape(&gw).await;
    assert_eq!(
        text.metric("openai_api_route_rejected_total")
            .label("reason", "auth")
            .value(),
        Some(sent as f64),
        "every rejected request is counted"
    );
    assert_eq!(
        text.metric("openai_api_route_records_dropped_total")
            .value(),
        Some(0.0)
    );
    assert_eq!(m.hits(), 1);
}

/// What the body is, its bytes, and extra request headers.
type RefusedBody = (&'static str, Vec<u8>, Vec<(&'static str, &'static str)>);

#[actix_rt::test]
async fn bodies_the_gateway_cannot_read_are_refused_not_forwarded() {
    let m = Mock::always(Reply::chat("should not be served"));
    let gw = Gateway::start(&config(
        "",
        &[upstream("up", &m.endpoint(), "deny: [\"gpt-4*\"]")],
    ));
    let auth = auth();
    let bodies: Vec<RefusedBody> = vec![
        (
            "duplicate model",
            br#"{"model":"gpt-3.5","model":"gpt-4o","messages":[]}"#.to_vec(),
            vec![],
        ),
        (
            "duplicate stream",
            br#"{"model":"gpt-3.5","stream":false,"stream":true}"#.to_vec(),
            vec![],
        ),
        (
            "escaped duplicate",
            br#"{"model":"gpt-3.5","mod\u0065l":"gpt-4o"}"#.to_vec(),
            vec![],
        ),
        (
            "BOM",
            b"\xEF\xBB\xBF{\"model\":\"gpt-4o\"}".to_vec(),
            vec![],
        ),
        ("trailing comma", br#"{"model":"gpt-4o",}"#.to_vec(), vec![]),
        (
            "non-string model",
            br#"{"model":["gpt-4o"]}"#.to_vec(),
            vec![],
        ),
        (
            "compressed body",
            b"\x1f\x8b\x08\x00compressed".to_vec(),
            vec![("content-encoding", "gzip")],
        ),
        (
            "BOM under a text content type",
            b"\xEF\xBB\xBF{}".to_vec(),
            vec![("content-type", "text/plain")],
        ),
    ];
    let n = bodies.len();
    for (what, body, extra) in bodies {
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend(extra);
        let got = send("POST", &gw.url("/v1/chat/completions"), &headers, &body).await;
        assert_eq!(got.status, 400, "{what}: {}", got.text());
        assert_eq!(
            got.json()["error"]["type"],
            "invalid_request_error",
            "{what}"
        );
        assert_eq!(got.header("access-control-allow-origin"), Some("*"));
    }
    assert_eq!(m.hits(), 0, "a refused body reached the upstream");
    let text = scrape(&gw).await;
    assert_eq!(
        text.metric("openai_api_route_rejected_total")
            .label("reason", "bad_request")
            .value(),
        Some(n as f64)
    );
    // A readable body still goes through, and the deny rule still holds for it.
    let got = post(
        &gw,
        "/v1/chat/completions",
        serde_json::json!({"model": "gpt-4o"}),
    )
    .await;
    assert_eq!(got.status, 404);
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 200);
}

/// Raw bytes to the gateway; the status line's code.
pub(crate) fn raw_status(gw: &Gateway, request: &str) -> (u16, Duration, Vec<u8>) {
    let t = Instant::now();
    let out = raw_exchange(&gw.addr, request.as_bytes(), Duration::from_secs(10));
    let code = String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, t.elapsed(), out)
}

#[actix_rt::test]
async fn dot_segments_are_refused() {
    let m = Mock::always(Reply::chat("x"));
    let gw = one(&m, "");
    for path in [
        "/v1/../admin",
        "/v1/./chat/completions",
        "/v1/%2e%2e/x",
        "/v1/%2E%2e/x",
        "/v1/x%2f..%2fadmin",
        "/v1/x%5c..%5cadmin",
        "/v1/%252e%252e/admin",
    ] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
        );
        let (code, _, out) = raw_status(&gw, &req);
        assert_eq!(code, 400, "{path}: {}", String::from_utf8_lossy(&out));
    }
    assert_eq!(m.hits(), 0, "a dot-segment path reached the upstream");
    let got = post(&gw, "/v1/files/file-1.jsonl", serde_json::json!({})).await;
    assert_eq!(got.status, 200, "a plain dot in a name is not a segment");
}

#[actix_rt::test]
async fn a_stalled_body_gets_408_within_body_timeout_and_the_connection_closes() {
    let m = Mock::always(Reply::chat("x"));
    let gw = one(&m, "body_timeout: 1");
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\""
    );
    let (code, took, out) = raw_status(&gw, &req);
    assert_eq!(code, 408, "{}", String::from_utf8_lossy(&out));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "answered and closed after {took:?}"
    );
    assert_eq!(m.hits(), 0);
    let text = scrape(&gw).await;
    assert_eq!(
        text.metric("openai_api_route_rejected_total")
            .label("reason", "timeout")
            .value(),
        Some(1.0)
    );
}

#[actix_rt::test]
async fn an_endless_sse_line_does_not_grow_the_capture() {
    let total = 64 * 1024 * 1024;
    let m = Mock::always(Reply::SseLine {
        total,
        chunk: 64 * 1024,
    });
    let gw = one(&m, "record_body_bytes: 1024");
    // Warm up one request so that buffers and pools exist before measuring.
    let warm = Mock::always(Reply::sse_chat(&["a"], Duration::ZERO));
    drop(warm);
    let before = gw.mem_kb("VmRSS");
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    assert_eq!(got.status, 200);
    assert!(got.body.len() > total, "stream not relayed whole");
    let peak = gw.mem_kb("VmHWM");
    assert!(
        peak < before + 8 * 1024,
        "the capture held the line: {before} kB → peak {peak} kB"
    );
    let rows = gw.records(1);
    assert!(rows[0]["response"].as_str().unwrap_or("").len() <= 1024 + 64);
}

#[actix_rt::test]
async fn alert_text_and_logs_cannot_be_forged() {
    // The sink answers with its own newlines and ANSI escapes.
    let RefusedAlert {
        alert: text, log, ..
    } = refused_alert(
        "bad\n[2020-01-01T00:00:00Z ERROR forged] pwned\u{1b}[2J",
        "gpt-test\nstatus: 200\nattempts: none",
    )
    .await;
    assert!(
        text.contains("model: gpt-test\\nstatus: 200"),
        "model not escaped: {text}"
    );
    assert!(
        !text.lines().any(|l| l == "status: 200"),
        "forged line: {text}"
    );
    assert!(
        !log.lines()
            .any(|l| l.starts_with("[2020-01-01T00:00:00Z ERROR forged]")),
        "forged log line:\n{log}"
    );
    assert!(!log.contains('\u{1b}'), "raw escape in the log");
    assert!(log.contains("bad\\n[2020-01-01T00:00:00Z ERROR forged]"));
}

#[test]
fn database_passwords_are_never_shown_however_spelled() {
    for target in [
        "host=127.0.0.1 port=1 user=u password = hunter2 dbname=d connect_timeout=1",
        "host=127.0.0.1 port=1 user=u password='hunter2 two' dbname=d connect_timeout=1",
        "host=127.0.0.1 port=1 user=u password =hunter2 dbname=d connect_timeout=1",
        "postgres://u:hunter2@ss@127.0.0.1:1/d?connect_timeout=1",
        "postgres://u@127.0.0.1:1/d?password=hunter2&connect_timeout=1",
        "host=h secret=hunter2",
        "host=h password='hunter2",
        "./data/x=hunter2.sqlite",
    ] {
        let err = Gateway::try_start(
            &config("", &[upstream("u", "http://127.0.0.1:9/v1", "")]),
            &["-database", target],
        )
        .err()
        .unwrap_or_else(|| panic!("{target}: started"));
        assert!(!err.contains("hunter2"), "{target}: {err}");
        assert!(!err.contains("ss@"), "{target}: {err}");
    }
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn a_working_database_target_with_a_spaced_password_is_shown_masked() {
    let url = service("OPENAI_API_ROUTE_TEST_POSTGRES");
    // Trust auth on the test server: any password is accepted and none is needed.
    let rest = url.split("://").nth(1).unwrap();
    let (user, hostdb) = rest.split_once('@').unwrap();
    let (hostport, db) = hostdb.split_once('/').unwrap();
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "5432"));
    let target =
        format!("host={host} port={port} user={user} dbname={db} password = hunter2-spaced");
    let m = Mock::always(Reply::chat("x"));
    let gw = Gateway::start_with(
        &config("", &[upstream("up", &m.endpoint(), "")]),
        &["-database", &target],
    );
    let page = send("GET", &gw.url("/"), &[], b"").await.text();
    assert!(page.contains("password=***"), "{page}");
    assert!(!page.contains("hunter2"));
    assert!(!gw.log().contains("hunter2"), "{}", gw.log());
    assert!(
        !gw.dir.path().join(&target).exists(),
        "became a SQLite file"
    );
}

#[actix_rt::test]
async fn head_is_relayed_without_a_body_and_is_not_a_failure() {
    let m = Mock::always(Reply::Raw(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: 1234\r\nx-file: yes\r\n\r\n".to_vec(),
    ));
    let gw = one(&m, "");
    let auth = auth();
    let got = send(
        "HEAD",
        &gw.url("/v1/files/file-1/content"),
        &[("authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(got.status, 200);
    assert!(got.error.is_none(), "{:?}", got.error);
    assert!(got.body.is_empty());
    assert_eq!(got.header("x-file"), Some("yes"));
    let rows = gw.records(1);
    assert_eq!(rows[0]["status"], 200);
    assert!(rows[0]["error"].is_null(), "{}", rows[0]["error"]);
    let text = scrape(&gw).await;
    assert_eq!(
        text.metric("openai_api_route_upstream_requests_total")
            .label("outcome", "ok")
            .label("upstream", "up")
            .value(),
        Some(1.0),
        "{text}"
    );
    assert!(!text.text.contains("outcome=\"stream_error\""));
}

#[actix_rt::test]
async fn client_identity_and_override_headers_are_not_forwarded() {
    let m = Mock::always(Reply::chat("x"));
    let gw = one(&m, "");
    let auth = auth();
    let got = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("cookie", "session=secret"),
            ("true-client-ip", "1.2.3.4"),
            ("cf-connecting-ip", "1.2.3.4"),
            ("x-client-ip", "1.2.3.4"),
            ("x-cluster-client-ip", "1.2.3.4"),
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("x-http-method-override", "DELETE"),
            ("openai-beta", "assistants=v2"),
        ],
        chat_body(false).to_string().as_bytes(),
    )
    .await;
    assert_eq!(got.status, 200);
    let seen = &m.seen()[0];
    for h in [
        "cookie",
        "true-client-ip",
        "cf-connecting-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
    ] {
        assert!(seen.header(h).is_none(), "{h} reached the upstream");
    }
    assert_eq!(seen.header("openai-beta"), Some("assistants=v2"));
    assert_eq!(seen.header("via"), Some("1.1 openai-api-route"));
}

#[actix_rt::test]
async fn an_upstream_head_with_two_framings_fails_the_attempt() {
    let bad = Mock::always(Reply::Raw(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
    ));
    let good = Mock::always(Reply::chat("from the second"));
    let gw = Gateway::start(&config(
        "",
        &[
            upstream("bad", &bad.endpoint(), ""),
            upstream("good", &good.endpoint(), ""),
        ],
    ));
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 200);
    assert!(got.text().contains("from the second"));
    assert_eq!(got.header("x-upstream"), Some("good"));
    let rows = gw.records(1);
    assert!(
        rows[0]["error"].as_str().unwrap_or("").starts_with("bad: "),
        "{}",
        rows[0]["error"]
    );
    let text = scrape(&gw).await;
    assert_eq!(
        text.metric("openai_api_route_upstream_requests_total")
            .label("outcome", "connect_error")
            .label("upstream", "bad")
            .value(),
        Some(1.0),
        "{text}"
    );
}

#[actix_rt::test]
async fn a_gateway_that_is_its_own_upstream_stops_at_five_hops() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let cfg = format!(
        "authorization: {TOKEN}\nupstreams:\n  - name: myself\n    endpoint: http://{addr}/v1\n    sk: {TOKEN}\n"
    );
    let gw = Gateway::start_with(&cfg, &["-addr", &addr]);
    let t = Instant::now();
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 508, "{}", got.text());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(got.json()["error"]["code"], "loop_detected");
    // The client's request and the four nested ones it caused before the fifth was refused.
    // (The model-list fetch the gateway sends itself at start is a record of its own.)
    gw.records(6);
    std::thread::sleep(Duration::from_millis(300));
    let chats = read_rows(&gw.db_path)
        .into_iter()
        .filter(|r| r["path"] == "/v1/chat/completions")
        .count();
    assert_eq!(chats, 6);

    // A Via header that already names the gateway five times is refused at once.
    let m = Mock::always(Reply::chat("x"));
    let gw = one(&m, "");
    let auth = auth();
    let via = ["1.1 openai-api-route"; 5].join(", ");
    let got = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &auth), ("via", &via)],
        b"{}",
    )
    .await;
    assert_eq!(got.status, 508);
    assert_eq!(m.hits(), 0);
    let got = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &auth), ("via", "1.1 openai-api-route")],
        b"{}",
    )
    .await;
    assert_eq!(got.status, 200, "one hop is a chain, not a loop");
    let via: Vec<String> = m.seen()[0]
        .headers
        .iter()
        .filter(|(k, _)| k == "via")
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(via, ["1.1 openai-api-route", "1.1 openai-api-route"]);
}

/// The raw socket stays readable after the gateway answers a rejected request with a body it
/// has not read: the answer is complete and the connection is closed, not left half-read.
#[test]
fn a_too_large_body_is_answered_and_closed() {
    let m = Mock::always(Reply::chat("x"));
    let gw = one(&m, "max_body_bytes: 100");
    let mut s = std::net::TcpStream::connect(&gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: 1000\r\n\r\n"
    )
    .unwrap();
    let mut out = vec![0u8; 4096];
    let n = s.read(&mut out).unwrap();
    assert!(String::from_utf8_lossy(&out[..n]).starts_with("HTTP/1.1 413"));
    assert_eq!(m.hits(), 0);
}
