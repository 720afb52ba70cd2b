//! A member's limits (see docs/members.md, "Limits"): what each counts and when, the 429 in
//! OpenAI's words, `Retry-After`, what a refusal costs (nothing upstream, no body read, no
//! count), the rate-limit headers, and the member metrics.

use std::time::{Duration, Instant, SystemTime};

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::*;
use crate::realtime::{connect, recv, status_of, WsMock};

fn retry_after(got: &Got) -> u64 {
    got.header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After: {:?}", got.headers))
        .parse()
        .unwrap()
}

/// The 429 of a limit: its body exactly, `Retry-After` (returned), `x-should-retry: true`.
fn assert_limited(got: &Got, member: &str, what: &str, kind: &str) -> u64 {
    assert_eq!(got.status, 429, "{}", got.text());
    let secs = retry_after(got);
    assert!(secs >= 1, "{secs}");
    let message = format!("Rate limit reached for {member}: {what}. Try again in {secs}s.");
    assert_eq!(
        got.json(),
        error_body(&message, kind, "rate_limit_exceeded")
    );
    assert_eq!(got.header("x-should-retry"), Some("true"));
    secs
}

/// `rpm` is a sliding window from the first admission: the third request in the same minute
/// is refused with OpenAI's 429 until that first one is 60 s old; nothing of it goes upstream,
/// it is recorded as a rejected request and counted.
#[actix_rt::test]
async fn rpm_refuses_with_openais_429_until_the_window_slides() {
    let m = Mock::always(Reply::chat("ok"));
    let gw = start(
        &m.endpoint(),
        "",
        &format!("  - {{name: alice, key: {ALICE}, rpm: 2}}\n  - {{name: bob, key: {BOB}}}"),
    );
    let first = Instant::now();
    assert_eq!(chat_as(&gw, ALICE, "gpt-test").await.status, 200);
    actix_rt::time::sleep(Duration::from_millis(2_000)).await;
    assert_eq!(chat_as(&gw, ALICE, "gpt-test").await.status, 200);
    let got = chat_as(&gw, ALICE, "gpt-test").await;
    let secs = assert_limited(&got, "alice", "2 requests per minute", "requests");
    // Until the first admission leaves the window, in whole seconds rounded up.
    let until = 60.0 - first.elapsed().as_secs_f64();
    assert!(
        (until.floor() as u64..=until.ceil() as u64 + 1).contains(&secs),
        "Retry-After {secs}, the first admission leaves in {until:.2} s"
    );
    assert_eq!(got.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(m.hits(), 2, "a refused request went upstream");
    // Another member is not limited by alice's use.
    assert_eq!(chat_as(&gw, BOB, "gpt-test").await.status, 200);
    let rows = gw.records(4);
    let refused: Vec<&Value> = rows.iter().filter(|r| r["status"] == 429).collect();
    assert_eq!(refused.len(), 1, "{rows:#?}");
    let r = refused[0];
    assert_eq!(r["member"], "alice");
    assert_eq!(r["upstream"], Value::Null);
    assert_eq!(r["attempts"], 0);
    assert!(
        r["request_body"].is_null() || r["request_body"] == "",
        "{r}"
    );
    assert!(r["request_id"].as_str().is_some_and(|id| !id.is_empty()));
    let metrics = scrape(&gw).await;
    let limited = metrics
        .metric("openai_api_route_member_limited_total")
        .label("member", "alice")
        .label("limit", "rpm");
    assert_eq!(limited.value(), Some(1.0), "{metrics}");
    let rejected = metrics
        .metric("openai_api_route_rejected_total")
        .label("reason", "rate_limited");
    assert_eq!(rejected.value(), Some(1.0));
}

/// A request over `rpm` is answered before its body is read: the client still sending its
/// body gets the 429, and the upstream sees nothing.
#[actix_rt::test]
async fn a_429_comes_before_the_body_is_read() {
    use std::io::{Read, Write};
    let m = Mock::always(Reply::chat("ok"));
    let gw = start(
        &m.endpoint(),
        "body_timeout: 20",
        &format!("  - {{name: alice, key: {ALICE}, rpm: 1}}"),
    );
    assert_eq!(chat_as(&gw, ALICE, "gpt-test").await.status, 200);
    let mut s = std::net::TcpStream::connect(&gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE}\r\ncontent-type: application/json\r\ncontent-length: 1000000\r\n\r\n{{\"model\": \"gpt-test\", \"messages\": ["
    );
    let t = Instant::now();
    s.write_all(head.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).contains("\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the answer waited for the body: {:?}",
        t.elapsed()
    );
    assert_eq!(m.hits(), 1);
}

/// Refused requests (403, 429) count toward no limit, nor do `/v1/models`, `/v1/metrics` and CORS
/// preflights: after any number of them the member still has its whole `rpm`.
#[actix_rt::test]
async fn refused_and_free_requests_count_toward_no_limit() {
    let m = Mock::always(Reply::chat("ok"));
    m.set_models(Reply::models(&["gpt-4o", "o1"]));
    let gw = start(
        &m.endpoint(),
        "",
        &format!("  - {{name: alice, key: {ALICE}, rpm: 2, allow: ['gpt-4o*']}}"),
    );
    for _ in 0..4 {
        let got = chat_as(&gw, ALICE, "o1").await;
        assert_eq!(got.status, 403, "{}", got.text());
        let error = &got.json()["error"];
        assert_eq!(
            (&error["type"], &error["code"]),
            (&json!("invalid_request_error"), &json!("model_not_allowed"))
        );
        assert!(error["message"].as_str().unwrap().contains("o1"), "{error}");
        assert_eq!(
            call(&gw, ALICE, "GET", "/v1/models", None).await.status,
            200
        );
        scrape(&gw).await;
        let pre = preflight(&gw).await;
        assert_eq!(pre.status, 204);
    }
    assert_eq!(chat_as(&gw, ALICE, "gpt-4o").await.status, 200);
    assert_eq!(chat_as(&gw, ALICE, "gpt-4o").await.status, 200);
    for _ in 0..3 {
        let got = chat_as(&gw, ALICE, "gpt-4o").await;
        assert_eq!(got.status, 429, "{}", got.text());
    }
    assert_eq!(now_of(&gw, ALICE).await["requests_last_minute"], 2);
    assert_eq!(m.hits(), 2);
    // The model list is never refused by a limit, and lists only the models alice may use.
    let got = call(&gw, ALICE, "GET", "/v1/models", None).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.json()["data"].as_array().unwrap().len(),
        1,
        "{}",
        got.text()
    );
    assert_eq!(got.json()["data"][0]["id"], "gpt-4o");
    let got = call(&gw, ALICE, "GET", "/v1/models/o1", None).await;
    assert_eq!(got.status, 404, "{}", got.text());
    let got = call(&gw, ALICE, "GET", "/v1/models/gpt-4o", None).await;
    assert_eq!(got.status, 200, "{}", got.text());
}

/// `tpm`: a request is admitted while the tokens of the last 60 s are below the limit; a
/// request's `total_tokens` count when it ends.
#[actix_rt::test]
async fn tpm_counts_total_tokens_when_each_request_ends() {
    // Every answer reports 12 tokens in all.
    let m = Mock::always(Reply::chat("ok"));
    let gw = start(
        &m.endpoint(),
        "",
        &format!("  - {{name: alice, key: {ALICE}, tpm: 20}}"),
    );
    let first = chat_as(&gw, ALICE, "gpt-test").await;
    assert_eq!(first.status, 200);
    // Counted at the end: the first answer's head still had the whole allowance.
    assert_eq!(first.header("x-ratelimit-remaining-tokens"), Some("20"));
    let ended = Instant::now();
    now_until(&gw, ALICE, |n| n["tokens_last_minute"] == 12).await;
    // 12 < 20: admitted.
    assert_eq!(chat_as(&gw, ALICE, "gpt-test").await.status, 200);
    let now = now_until(&gw, ALICE, |n| n["tokens_last_minute"] == 24).await;
    assert_eq!(now["tokens_last_minute"], 24, "{now}");
    let got = chat_as(&gw, ALICE, "gpt-test").await;
    let secs = assert_limited(&got, "alice", "20 tokens per minute", "tokens");
    // Until the first request's tokens leave the window: 24 - 12 = 12 < 20.
    let until = 60.0 - ended.elapsed().as_secs_f64();
    assert!(
        secs as f64 >= until - 2.0 && secs as f64 <= until + 2.0,
        "Retry-After {secs}, expected about {until:.1}"
    );
    assert_eq!(m.hits(), 2);
    assert_eq!(got.header("x-ratelimit-remaining-tokens"), Some("0"));
    let metrics = scrape(&gw).await;
    let tokens = |kind| {
        metrics
            .metric("openai_api_route_member_tokens_total")
            .label("member", "alice")
            .label("kind", kind)
            .value()
    };
    assert_eq!(
        (tokens("input"), tokens("output")),
        (Some(10.0), Some(14.0))
    );
    let tpm = metrics
        .metric("openai_api_route_member_limited_total")
        .label("member", "alice")
        .label("limit", "tpm");
    assert_eq!(tpm.value(), Some(1.0));
}

/// Without a reported usage a request's tokens are (request body bytes + bytes of the answer's
/// generated text) / 4, for a JSON answer and a stream alike, and so also with `-database none`.
#[actix_rt::test]
async fn without_usage_tokens_are_the_bytes_over_four() {
    let text = "x".repeat(400);
    let json_answer = Reply::json(
        200,
        json!({"id": "c1", "object": "chat.completion", "choices": [{"index": 0,
               "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}),
    );
    let words = ["a".repeat(100), "b".repeat(100)];
    let stream_answer = {
        let mut chunks: Vec<(Duration, Vec<u8>)> = words
            .iter()
            .map(|w| {
                let ev = json!({"id": "c2", "object": "chat.completion.chunk",
                                "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": null}]});
                (Duration::ZERO, format!("data: {ev}\n\n").into_bytes())
            })
            .collect();
        let stop = json!({"id": "c2", "object": "chat.completion.chunk",
                          "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        chunks.push((Duration::ZERO, format!("data: {stop}\n\n").into_bytes()));
        chunks.push((Duration::ZERO, b"data: [DONE]\n\n".to_vec()));
        Reply::sse_chunks(chunks)
    };
    let m = Mock::script(move |req, _| {
        if req.json()["stream"] == true {
            stream_answer.clone()
        } else {
            json_answer.clone()
        }
    });
    for database in [None, Some("none")] {
        let text = members_config(
            "",
            &format!("  - {{name: alice, key: {ALICE}, tpm: 1000000, tokens_per_day: 1000000}}"),
            &[upstream("up", &m.endpoint(), "force_usage: false")],
        );
        let extra: Vec<&str> = database.map_or(vec![], |d| vec!["-database", d]);
        let gw = Gateway::start_with(&text, &extra);
        let body =
            json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hello there"}]});
        let body_len = body.to_string().len() as u64;
        let got = call(&gw, ALICE, "POST", "/v1/chat/completions", Some(body)).await;
        assert_eq!(got.status, 200);
        let one = (body_len + 400) / 4;
        let now = now_until(&gw, ALICE, |n| n["tokens_last_minute"] == one).await;
        assert_eq!(now["tokens_last_minute"], one, "JSON, {database:?}: {now}");
        let body = json!({"model": "gpt-test", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
        let stream_len = body.to_string().len() as u64;
        let got = call(&gw, ALICE, "POST", "/v1/chat/completions", Some(body)).await;
        assert_eq!(got.status, 200);
        assert!(got.text().contains("[DONE]"));
        let two = one + (stream_len + 200) / 4;
        let now = now_until(&gw, ALICE, |n| n["tokens_last_minute"] == two).await;
        assert_eq!(
            now["tokens_last_minute"], two,
            "stream, {database:?}: {now}"
        );
        assert_eq!(now["tokens_today"], two);
        let metrics = scrape(&gw).await;
        let output = metrics
            .metric("openai_api_route_member_tokens_total")
            .label("member", "alice")
            .label("kind", "output")
            .value();
        assert_eq!(output, Some(150.0), "{database:?}");
    }
}

/// `tokens_per_day`: once the UTC day's tokens reach it, requests are refused until midnight UTC.
#[actix_rt::test]
async fn tokens_per_day_refuses_until_utc_midnight() {
    let m = Mock::always(Reply::chat("ok"));
    let gw = start(
        &m.endpoint(),
        "",
        &format!("  - {{name: alice, key: {ALICE}, tokens_per_day: 10}}"),
    );
    assert_eq!(chat_as(&gw, ALICE, "gpt-test").await.status, 200);
    now_until(&gw, ALICE, |n| n["tokens_today"] == 12).await;
    let got = chat_as(&gw, ALICE, "gpt-test").await;
    let secs = assert_limited(&got, "alice", "10 tokens per day", "tokens");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let midnight = 86_400 - now % 86_400;
    assert!(secs.abs_diff(midnight) <= 2, "{secs} vs {midnight}");
    assert_eq!(m.hits(), 1);
    let metrics = scrape(&gw).await;
    let day = metrics
        .metric("openai_api_route_member_limited_total")
        .label("member", "alice")
        .label("limit", "tokens_per_day");
    assert_eq!(day.value(), Some(1.0));
}

/// `concurrent` counts requests until their answer ended and WebSocket sessions until they
/// close; the 429 says `Retry-After: 1`. A WebSocket handshake counts toward `rpm` too.
#[actix_rt::test]
async fn concurrent_counts_requests_and_websocket_sessions() {
    let slow = Mock::script(|_, n| {
        if n == 0 {
            Reply::Delay(Duration::from_millis(3000), Box::new(Reply::chat("slow")))
        } else {
            Reply::chat("ok")
        }
    });
    let ws = WsMock::start();
    let text = members_config(
        "",
        &format!(
            "  - {{name: alice, key: {ALICE}, concurrent: 1}}\n  - {{name: bob, key: {BOB}, rpm: 1}}"
        ),
        &[
            upstream("http", &slow.endpoint(), "deny: [realtime-*]"),
            upstream("ws", &ws.endpoint(), "allow: [realtime-*]"),
        ],
    );
    let gw = Gateway::start(&text);
    let gw = std::sync::Arc::new(gw);
    let g = gw.clone();
    let first = actix_rt::spawn(async move { chat_as(&g, ALICE, "gpt-test").await });
    let metrics = scrape_until(&gw, Duration::from_secs(5), |m| {
        m.metric("openai_api_route_member_in_flight")
            .label("member", "alice")
            .value()
            == Some(1.0)
    })
    .await;
    assert_eq!(
        metrics
            .metric("openai_api_route_member_in_flight")
            .label("member", "alice")
            .value(),
        Some(1.0)
    );
    let got = chat_as(&gw, ALICE, "gpt-test").await;
    let secs = assert_limited(&got, "alice", "1 requests at a time", "requests");
    assert_eq!(secs, 1);
    assert_eq!(first.await.unwrap().status, 200);
    now_until(&gw, ALICE, |n| n["in_flight"] == 0).await;
    assert_eq!(chat_as(&gw, ALICE, "gpt-test").await.status, 200);

    // A WebSocket session holds its place until it closes.
    let auth = format!("Bearer {ALICE}");
    let (mut session, _) = connect(
        &gw,
        "/v1/realtime?model=realtime-1",
        &[("authorization", &auth)],
    )
    .await
    .unwrap();
    session.send(Message::text("ping")).await.unwrap();
    assert_eq!(recv(&mut session).await, Message::text("ping"));
    assert_eq!(now_of(&gw, ALICE).await["in_flight"], 1);
    let got = chat_as(&gw, ALICE, "gpt-test").await;
    assert_limited(&got, "alice", "1 requests at a time", "requests");
    let auth_err = connect(
        &gw,
        "/v1/realtime?model=realtime-1",
        &[("authorization", &auth)],
    )
    .await
    .err()
    .map(status_of);
    assert_eq!(auth_err, Some(429), "a second session");
    session.close(None).await.unwrap();
    now_until(&gw, ALICE, |n| n["in_flight"] == 0).await;
    assert_eq!(chat_as(&gw, ALICE, "gpt-test").await.status, 200);
    assert_eq!(ws.handshakes().len(), 1);

    // bob's one request a minute is his WebSocket handshake.
    let bob = format!("Bearer {BOB}");
    let (mut s2, _) = connect(
        &gw,
        "/v1/realtime?model=realtime-1",
        &[("authorization", &bob)],
    )
    .await
    .unwrap();
    let got = chat_as(&gw, BOB, "gpt-test").await;
    assert_limited(&got, "bob", "1 requests per minute", "requests");
    let _ = s2.close(None).await;
    assert_eq!(slow.hits(), 3);
}

/// Rejected records of a member over its limit stay within the caps on rejected records (10 a
/// second per reason: see the security guide); every refusal is still counted.
#[actix_rt::test]
async fn refusals_are_recorded_within_the_rejected_caps_and_all_counted() {
    let m = Mock::always(Reply::chat("ok"));
    let gw = start(
        &m.endpoint(),
        "",
        &format!("  - {{name: alice, key: {ALICE}, rpm: 1}}"),
    );
    assert_eq!(chat_as(&gw, ALICE, "gpt-test").await.status, 200);
    let burst: Vec<_> = (0..25).map(|_| chat_as(&gw, ALICE, "gpt-test")).collect();
    for got in futures_util::future::join_all(burst).await {
        assert_eq!(got.status, 429);
    }
    let metrics = scrape(&gw).await;
    let counted = |name, label: (&str, &str)| {
        metrics
            .metric(name)
            .label(label.0, label.1)
            .label("member", "alice")
            .value()
    };
    assert_eq!(
        counted("openai_api_route_member_limited_total", ("limit", "rpm")),
        Some(25.0)
    );
    let rejected = metrics
        .metric("openai_api_route_rejected_total")
        .label("reason", "rate_limited")
        .value();
    assert_eq!(rejected, Some(25.0));
    std::thread::sleep(Duration::from_millis(500));
    let rows = gw.records(11);
    let mut per_second = std::collections::HashMap::<String, usize>::new();
    for r in rows.iter().filter(|r| r["status"] == 429) {
        let second = r["created_at"].as_str().unwrap()[..19].to_string();
        *per_second.entry(second).or_default() += 1;
    }
    assert!(per_second.values().all(|n| *n <= 10), "{per_second:?}");
    assert!(per_second.values().sum::<usize>() < 25, "{per_second:?}");
    assert_eq!(m.hits(), 1);
}

/// The rate-limit headers a client reads from one answer.
fn rate_headers(got: &Got) -> Vec<(String, String)> {
    got.headers
        .iter()
        .filter(|(k, _)| k.starts_with("x-ratelimit-"))
        .cloned()
        .collect()
}

/// Every answer to a member with `rpm` or `tpm` carries OpenAI's rate-limit headers for its own
/// limits and none of the upstream's; other members still get the upstream's.
#[actix_rt::test]
async fn ratelimit_headers_describe_the_members_own_limits() {
    let theirs = vec![
        ("content-type".to_string(), "application/json".to_string()),
        (
            "x-ratelimit-limit-requests".to_string(),
            "99999".to_string(),
        ),
        (
            "x-ratelimit-remaining-requests".to_string(),
            "99998".to_string(),
        ),
        ("x-ratelimit-reset-requests".to_string(), "17ms".to_string()),
        ("x-ratelimit-limit-tokens".to_string(), "88888".to_string()),
        (
            "x-ratelimit-remaining-tokens".to_string(),
            "88887".to_string(),
        ),
        ("x-ratelimit-reset-tokens".to_string(), "3m".to_string()),
    ];
    let chat = serde_json::to_vec(&json!({"id": "c", "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}))
    .unwrap();
    let headers = theirs.clone();
    let m = Mock::script(move |req, _| {
        if req.json()["stream"] == true {
            match Reply::sse_chat(&["a", "b"], Duration::ZERO) {
                Reply::Chunks {
                    status,
                    chunks,
                    ending,
                    ..
                } => {
                    let mut h = headers.clone();
                    h[0].1 = "text/event-stream".into();
                    Reply::Chunks {
                        status,
                        headers: h,
                        chunks,
                        ending,
                    }
                }
                other => other,
            }
        } else {
            Reply::Full {
                status: 200,
                headers: headers.clone(),
                body: chat.clone(),
            }
        }
    });
    m.set_models(Reply::models(&["gpt-test"]));
    let members = format!(
        "  - {{name: alice, key: {ALICE}, rpm: 10, tpm: 1000}}\n  - {{name: bob, key: {BOB}, concurrent: 5, tokens_per_day: 100000}}\n  - {{name: carol, key: {CAROL}, rpm: 3}}\n  - {{name: dave, key: {DAVE}, tpm: 50}}"
    );
    let text = members_config(
        "",
        &members,
        &[upstream("up", &m.endpoint(), "allow: [gpt-*]")],
    );
    let gw = Gateway::start(&text);
    let theirs_values = ["99999", "99998", "17ms", "88888", "88887", "3m"];
    let check = |got: &Got, want: &[(&str, Option<&str>)], what: &str| {
        let mine = rate_headers(got);
        for (_, v) in &mine {
            assert!(
                !theirs_values.contains(&v.as_str()),
                "{what}: the upstream's {mine:?}"
            );
        }
        for (name, value) in want {
            let got_v = got.header(&format!("x-ratelimit-{name}"));
            match value {
                Some(v) => assert_eq!(got_v, Some(*v), "{what}: {name} in {mine:?}"),
                None => assert!(
                    got_v.is_some_and(openai_duration),
                    "{what}: {name} in {mine:?}"
                ),
            }
        }
        assert_eq!(mine.len(), want.len(), "{what}: {mine:?}");
    };
    // alice: a relayed answer, then a stream.
    let got = chat_as(&gw, ALICE, "gpt-test").await;
    assert_eq!(got.status, 200);
    let all = |remaining_req: &'static str, remaining_tok: &'static str| {
        vec![
            ("limit-requests", Some("10")),
            ("remaining-requests", Some(remaining_req)),
            ("reset-requests", None),
            ("limit-tokens", Some("1000")),
            ("remaining-tokens", Some(remaining_tok)),
            ("reset-tokens", None),
        ]
    };
    check(&got, &all("9", "1000"), "alice's answer");
    now_until(&gw, ALICE, |n| n["tokens_last_minute"] == 12).await;
    let body = json!({"model": "gpt-test", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let got = call(&gw, ALICE, "POST", "/v1/chat/completions", Some(body)).await;
    assert_eq!(got.status, 200);
    check(&got, &all("8", "988"), "alice's stream");
    now_until(&gw, ALICE, |n| n["tokens_last_minute"] == 17).await;
    // The newest admission leaves the window in about a minute: `59s` or `1m`.
    let reset = got
        .header("x-ratelimit-reset-requests")
        .unwrap()
        .to_string();
    assert!(["1m", "59s", "58s"].contains(&reset.as_str()), "{reset}");
    // The gateway's own answers: a model no upstream serves, the model list.
    let got = chat_as(&gw, ALICE, "claude-x").await;
    assert_eq!(got.status, 404, "{}", got.text());
    check(&got, &all("7", "983"), "alice's 404");
    let got = call(&gw, ALICE, "GET", "/v1/models", None).await;
    assert_eq!(got.status, 200);
    check(&got, &all("7", "983"), "alice's model list");
    // carol has `rpm` only: the request headers only, none of the upstream's token headers.
    let got = chat_as(&gw, CAROL, "gpt-test").await;
    let requests_only = [
        ("limit-requests", Some("3")),
        ("remaining-requests", Some("2")),
        ("reset-requests", None),
    ];
    check(&got, &requests_only, "carol's answer");
    // dave has `tpm` only.
    let got = chat_as(&gw, DAVE, "gpt-test").await;
    let tokens_only = [
        ("limit-tokens", Some("50")),
        ("remaining-tokens", Some("50")),
        ("reset-tokens", None),
    ];
    check(&got, &tokens_only, "dave's answer");
    // bob has neither: the upstream's own headers, as relayed to anyone.
    let got = chat_as(&gw, BOB, "gpt-test").await;
    for (name, value) in &theirs[1..] {
        assert_eq!(got.header(name), Some(value.as_str()), "bob: {name}");
    }
}

/// The member series: requests admitted, tokens by kind, requests in flight, refusals by limit;
/// every configured member shows from the start.
#[actix_rt::test]
async fn member_metrics_count_requests_tokens_and_refusals() {
    let m = Mock::always(Reply::chat("ok"));
    let gw = start(
        &m.endpoint(),
        "",
        &format!("  - {{name: alice, key: {ALICE}, rpm: 3}}\n  - {{name: bob, key: {BOB}}}"),
    );
    let before = scrape(&gw).await;
    for name in ["alice", "bob"] {
        let v = before
            .metric("openai_api_route_member_requests_total")
            .label("member", name)
            .value();
        assert_eq!(v, Some(0.0), "{name}: {before}");
    }
    for _ in 0..5 {
        chat_as(&gw, ALICE, "gpt-test").await;
    }
    chat_as(&gw, BOB, "gpt-test").await;
    let metrics = scrape_until(&gw, Duration::from_secs(5), |m| {
        m.metric("openai_api_route_member_tokens_total")
            .label("member", "bob")
            .label("kind", "output")
            .value()
            == Some(7.0)
    })
    .await;
    let v = |name: &str, labels: &[(&str, &str)]| {
        let mut s = metrics.metric(name);
        for (k, val) in labels {
            s = s.label(k, val);
        }
        s.value()
    };
    let requests = "openai_api_route_member_requests_total";
    let tokens = "openai_api_route_member_tokens_total";
    assert_eq!(v(requests, &[("member", "alice")]), Some(3.0));
    assert_eq!(v(requests, &[("member", "bob")]), Some(1.0));
    assert_eq!(
        v(tokens, &[("member", "alice"), ("kind", "input")]),
        Some(15.0)
    );
    assert_eq!(
        v(tokens, &[("member", "alice"), ("kind", "output")]),
        Some(21.0)
    );
    assert_eq!(
        v(tokens, &[("member", "bob"), ("kind", "input")]),
        Some(5.0)
    );
    let in_flight = "openai_api_route_member_in_flight";
    assert_eq!(v(in_flight, &[("member", "alice")]), Some(0.0));
    let limited = "openai_api_route_member_limited_total";
    assert_eq!(
        v(limited, &[("member", "alice"), ("limit", "rpm")]),
        Some(2.0)
    );
    // Label values are member names only: never a key or its label.
    assert!(!metrics.text.contains("sk-"), "{metrics}");
}
