//! Hostile upstreams, hostile clients and a hostile environment (fault-injection suite): what the
//! client gets, what is recorded, and that the gateway is still healthy afterwards.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::*;

/// A gateway (no recording) in front of an upstream that streams `total` bytes.
fn bulk_upstream(total: usize) -> (Mock, Gateway) {
    let m = Mock::always(Reply::Bulk {
        total,
        chunk: 64 * 1024,
    });
    let gw = Gateway::start_with(
        &config("", &[upstream("up", &m.endpoint(), "")]),
        &["-database", "none"],
    );
    (m, gw)
}

async fn still_healthy(gw: &Gateway) {
    let got = send("GET", &gw.url("/healthz"), &[], b"").await;
    assert_eq!(
        got.status,
        200,
        "gateway unhealthy after the fault:\n{}",
        gw.log()
    );
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

#[actix_rt::test]
async fn rate_limits_relay_retry_after_when_nothing_is_left() {
    let with = Mock::always(Reply::Full {
        status: 429,
        headers: vec![
            ("retry-after".into(), "7".into()),
            ("content-type".into(), "application/json".into()),
        ],
        body: br#"{"error":{"message":"slow down","type":"rate_limit"}}"#.to_vec(),
    });
    let without = Mock::always(Reply::status(429));
    let gw = Gateway::start(&config(
        "cooldown: {failures: 100, seconds: 1}",
        &[
            upstream("without", &without.endpoint(), ""),
            upstream("with", &with.endpoint(), ""),
        ],
    ));
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 429);
    assert_eq!(got.header("retry-after"), Some("7"));
    assert_eq!(got.json()["error"]["message"], "slow down");
    assert_eq!(
        without.hits(),
        1,
        "429 without Retry-After still fails over"
    );
    let rows = gw.records(1);
    assert_eq!(
        rows[0]["error"],
        "without: HTTP 429 Too Many Requests; with: HTTP 429 Too Many Requests"
    );
    still_healthy(&gw).await;
}

#[actix_rt::test]
async fn malformed_sse_chunks_pass_through_and_a_missing_done_is_a_break() {
    let body: Vec<(Duration, Vec<u8>)> = vec![
        (
            Duration::ZERO,
            b"data: {\"choices\":[{\"delta\":{\"content\":\"ok \"}}]}\n\n".to_vec(),
        ),
        (
            Duration::from_millis(5),
            b"data: {this is not json\n\n".to_vec(),
        ),
        (
            Duration::from_millis(5),
            b"data: \xff\xfe garbage\n\n".to_vec(),
        ),
        (
            Duration::from_millis(5),
            b"data: {\"choices\":[{\"delta\":{\"content\":\"still\"}}]}\n\n".to_vec(),
        ),
    ];
    let expected: Vec<u8> = body.iter().flat_map(|(_, b)| b.clone()).collect();
    let m = Mock::always(Reply::sse_chunks(body));
    let gw = one(&m, "");
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    assert!(
        got.body.starts_with(&expected),
        "malformed chunks must be relayed verbatim"
    );
    // A chat stream that ends cleanly without [DONE] or a finish_reason is cut (see the rescue
    // guide, "Truthful ends (0.3)").
    let tail = String::from_utf8_lossy(&got.body[expected.len()..]).into_owned();
    assert!(
        tail.starts_with("data: {\"error\"") && tail.contains("ended before [DONE]"),
        "{tail}"
    );
    let rows = gw.records(1);
    assert_eq!(rows[0]["response"], "ok still");
    assert_eq!(rows[0]["error"], "up: ended before [DONE]");
    assert_eq!(rows[0]["complete"], 0);
    still_healthy(&gw).await;
}

#[actix_rt::test]
async fn gzip_despite_identity_is_relayed_verbatim_and_not_recorded_as_text() {
    let gz: Vec<u8> = vec![
        0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xab, 0xae, 0x05, 0x00, 0x43,
        0xbf, 0xa6, 0xa3, 0x02, 0x00, 0x00, 0x00,
    ];
    let m = Mock::always(Reply::Full {
        status: 200,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("content-encoding".into(), "gzip".into()),
        ],
        body: gz.clone(),
    });
    let gw = one(&m, "");
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.body, gz);
    assert_eq!(got.header("content-encoding"), Some("gzip"));
    assert_eq!(m.seen()[0].header("accept-encoding"), Some("identity"));
    let rows = gw.records(1);
    assert_eq!(rows[0]["response"], serde_json::Value::Null);
}

#[actix_rt::test]
async fn redirects_are_relayed_not_followed() {
    let m = Mock::always(Reply::Full {
        status: 302,
        headers: vec![("location".into(), "http://127.0.0.1:9/elsewhere".into())],
        body: vec![],
    });
    let gw = one(&m, "");
    let got = post(&gw, "/v1/files", serde_json::json!({})).await;
    assert_eq!(got.status, 302);
    assert_eq!(got.header("location"), Some("http://127.0.0.1:9/elsewhere"));
    assert_eq!(m.hits(), 1);
}

#[actix_rt::test]
async fn huge_response_streams_with_flat_memory() {
    let total = 100 * 1024 * 1024;
    let (_m, gw) = bulk_upstream(total);
    let before = gw.mem_kb("VmRSS");
    let got = post(&gw, "/v1/files/file-1/content", serde_json::json!({})).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body.len(), total);
    let peak = gw.mem_kb("VmHWM");
    assert!(
        peak < before + 40 * 1024,
        "memory grew with the body: {before} kB → peak {peak} kB"
    );
}

#[actix_rt::test]
async fn slow_reader_gets_backpressure_not_buffering() {
    let total = 64 * 1024 * 1024;
    let (_m, gw) = bulk_upstream(total);
    let before = gw.mem_kb("VmRSS");
    let mut s = TcpStream::connect(&gw.addr).unwrap();
    let body = "{}";
    write!(s, "POST /v1/files/x/content HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: {}\r\n\r\n{body}", body.len()).unwrap();
    // Read a little, then stall for a second while the upstream has far more to send.
    let mut buf = vec![0u8; 16 * 1024];
    s.read_exact(&mut buf).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let during = gw.mem_kb("VmRSS");
    assert!(
        during < before + 24 * 1024,
        "gateway buffered for a slow client: {before} kB → {during} kB"
    );
    let mut got = buf.len();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tail = Vec::new();
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n;
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 16 {
            tail.drain(..tail.len() - 16);
        }
        if tail.ends_with(b"0\r\n\r\n") {
            break;
        }
    }
    assert!(
        got > total,
        "the whole body arrives in the end ({got} bytes)"
    );
}

#[actix_rt::test]
async fn hostile_authorization_headers_get_401() {
    let m = Mock::always(Reply::chat("x"));
    let gw = one(&m, "");
    let url = gw.url("/v1/chat/completions");
    let long = format!("Bearer {}", "a".repeat(16 * 1024));
    for auth in [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer ",
        "bearer\tx",
        long.as_str(),
    ] {
        let got = send("POST", &url, &[("authorization", auth)], b"{}").await;
        assert_eq!(got.status, 401, "{auth:.20}");
    }
    assert_eq!(m.hits(), 0);
    still_healthy(&gw).await;
}

/// Plain text and a string `"stream"` pass as before. Since 0.2 a body that starts with `{` but
/// is not JSON is refused with a 400 instead of being proxied as is (see the security guide and
/// docs/changelog.md).
#[actix_rt::test]
async fn odd_bodies_are_proxied_as_is_and_string_stream_is_not_a_stream() {
    let m = Mock::always(Reply::Delay(
        Duration::from_millis(400),
        Box::new(Reply::chat("x")),
    ));
    let gw = one(&m, "stream_timeout: 0.1");
    let auth = format!("Bearer {TOKEN}");
    let got = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &auth)],
        b"{not json",
    )
    .await;
    assert_eq!(got.status, 400, "{}", got.text());
    assert_eq!(got.json()["error"]["type"], "invalid_request_error");
    for body in [
        &b"plain text body"[..],
        br#"{"model":"gpt-test","stream":"true"}"#,
    ] {
        let got = send(
            "POST",
            &gw.url("/v1/chat/completions"),
            &[("authorization", &auth)],
            body,
        )
        .await;
        assert_eq!(
            got.status,
            200,
            "{}: not waited for as a non-stream request",
            String::from_utf8_lossy(body)
        );
    }
    let seen: Vec<Vec<u8>> = m.seen().into_iter().map(|s| s.body).collect();
    assert_eq!(seen.len(), 2, "the invalid JSON body reached the upstream");
    assert_eq!(seen[0], b"plain text body");
    let rows = gw.records(3);
    assert!(rows.iter().all(|r| r["stream"] == 0));
    assert_eq!(rows[0]["status"], 400);
    assert_eq!(rows[2]["model"], "gpt-test");
}

#[actix_rt::test]
async fn a_thousand_abandoned_connections_do_not_hurt() {
    let m = Mock::always(Reply::chat("x"));
    let mut gw = one(&m, "");
    let mut socks = Vec::new();
    for i in 0..1000 {
        let Ok(mut s) = TcpStream::connect(&gw.addr) else {
            continue;
        };
        if i % 2 == 0 {
            let _ = s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"mo");
        }
        socks.push(s);
    }
    assert!(
        socks.len() >= 900,
        "could open only {} connections",
        socks.len()
    );
    let t = Instant::now();
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(socks);
    std::thread::sleep(Duration::from_millis(200));
    assert!(gw.alive());
    assert_eq!(
        post(&gw, "/v1/chat/completions", chat_body(false))
            .await
            .status,
        200
    );
    still_healthy(&gw).await;
}

#[actix_rt::test]
async fn header_floods_get_a_clear_4xx() {
    let m = Mock::always(Reply::chat("x"));
    let mut gw = one(&m, "");
    let mut many = String::from("GET /v1/models HTTP/1.1\r\nhost: x\r\n");
    for i in 0..500 {
        many.push_str(&format!("x-flood-{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    let long = format!(
        "GET /v1/models HTTP/1.1\r\nhost: x\r\nx-long: {}\r\n\r\n",
        "y".repeat(256 * 1024)
    );
    for req in [many, long] {
        let out = String::from_utf8_lossy(&raw_exchange(
            &gw.addr,
            req.as_bytes(),
            Duration::from_secs(5),
        ))
        .to_string();
        let status: u16 = out
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        assert!(
            (400..500).contains(&status),
            "expected a 4xx, got {:?}",
            out.lines().next()
        );
    }
    assert_eq!(m.hits(), 0);
    assert!(gw.alive());
    still_healthy(&gw).await;
}

#[actix_rt::test]
async fn database_file_deleted_while_running_keeps_serving() {
    let m = Mock::always(Reply::chat("x"));
    let gw = one(&m, "");
    assert_eq!(
        post(&gw, "/v1/chat/completions", chat_body(false))
            .await
            .status,
        200
    );
    gw.records(1);
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", gw.db_path.display()));
    }
    for _ in 0..20 {
        assert_eq!(
            post(&gw, "/v1/chat/completions", chat_body(false))
                .await
                .status,
            200
        );
    }
    still_healthy(&gw).await;
}

#[actix_rt::test]
#[cfg_attr(
    not(test_root),
    ignore = "mounts a tmpfs (root): set OPENAI_API_ROUTE_TEST_ROOT=1"
)]
async fn disk_full_is_logged_and_counted_while_serving_goes_on() {
    service("OPENAI_API_ROUTE_TEST_ROOT");
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("tiny");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        mounted,
        "cannot mount a tmpfs here (unset OPENAI_API_ROUTE_TEST_ROOT to leave this test out)"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let m = Mock::always(Reply::chat("x"));
    let db = mnt.join("db.sqlite").display().to_string();
    let gw = Gateway::start_with(
        &config("record_body_bytes: 0", &[upstream("up", &m.endpoint(), "")]),
        &["-database", &db],
    );
    let big = serde_json::json!({"model": "gpt-test", "messages": [{"role": "user", "content": "z".repeat(200 * 1024)}]});
    for _ in 0..8 {
        assert_eq!(
            post(&gw, "/v1/chat/completions", big.clone()).await.status,
            200
        );
    }
    let counted = eventually(Duration::from_secs(10), || {
        gw.log().contains("request records failed")
    });
    assert!(counted, "disk full not reported:\n{}", gw.log());
    let metrics = scrape(&gw).await;
    assert!(
        metrics
            .metric("openai_api_route_record_write_failures_total")
            .value()
            .is_some_and(|n| n > 0.0),
        "not counted"
    );
    still_healthy(&gw).await;
}

fn chattr(flag: &str, path: &std::path::Path) -> bool {
    std::process::Command::new("chattr")
        .arg(flag)
        .arg(path)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[actix_rt::test]
#[cfg_attr(
    not(test_root),
    ignore = "sets chattr +i (root, ext4): set OPENAI_API_ROUTE_TEST_ROOT=1"
)]
async fn database_made_read_only_while_running_keeps_serving_and_recovers() {
    service("OPENAI_API_ROUTE_TEST_ROOT");
    let m = Mock::always(Reply::chat("x"));
    let gw = Gateway::start(&config("", &[upstream("up", &m.endpoint(), "")]));
    assert_eq!(
        post(&gw, "/v1/chat/completions", chat_body(false))
            .await
            .status,
        200
    );
    gw.records(1);
    // The immutable flag refuses writes even through descriptors that are already open, even
    // for root (plain permissions would not); it needs a file system that has it (ext4 here).
    let files: Vec<std::path::PathBuf> = ["", "-wal"]
        .iter()
        .map(|ext| std::path::PathBuf::from(format!("{}{ext}", gw.db_path.display())))
        .collect();
    if !files.iter().all(|f| chattr("+i", f)) {
        files.iter().for_each(|f| {
            chattr("-i", f);
        });
        panic!(
            "chattr +i is not supported here (root on ext4 needed; unset \
             OPENAI_API_ROUTE_TEST_ROOT to leave this test out)"
        );
    }
    struct Restore(Vec<std::path::PathBuf>);
    impl Drop for Restore {
        fn drop(&mut self) {
            for f in &self.0 {
                chattr("-i", f);
            }
        }
    }
    let restore = Restore(files);
    for _ in 0..5 {
        assert_served(&gw, Duration::from_millis(500)).await;
    }
    assert!(
        eventually(Duration::from_secs(10), || gw
            .log()
            .contains("request records failed")),
        "read-only database not reported:\n{}",
        gw.log()
    );
    let metrics = scrape(&gw).await;
    assert!(
        metrics
            .metric("openai_api_route_record_write_failures_total")
            .value()
            .is_some_and(|n| n > 0.0),
        "not counted"
    );
    drop(restore);
    assert_eq!(
        post(&gw, "/v1/chat/completions", chat_body(false))
            .await
            .status,
        200
    );
    assert!(
        eventually(Duration::from_secs(10), || read_rows(&gw.db_path).len()
            >= 2),
        "writes did not resume once the file was writable again:\n{}",
        gw.log()
    );
    still_healthy(&gw).await;
}
