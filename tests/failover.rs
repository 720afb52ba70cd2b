//! Failover rules (see the rescue guide, "How failover and cooldown decide"): what fails over,
//! what is relayed, what the client gets when all fail.

use std::time::{Duration, Instant};

use crate::support::*;

fn two(first: &str, second: &str, global: &str) -> Gateway {
    Gateway::start(&config(
        &format!("cooldown: {{failures: 100, seconds: 30}}\n{global}"),
        &[upstream("first", first, ""), upstream("second", second, "")],
    ))
}

#[actix_rt::test]
async fn each_failover_status_moves_to_the_next_upstream() {
    let statuses = [500u16, 502, 503, 504, 429, 401, 403, 404, 408, 409];
    let bad = Mock::script(move |_, n| Reply::status(statuses[n]));
    let good = Mock::always(Reply::chat("from second"));
    let gw = two(&bad.endpoint(), &good.endpoint(), "");
    for status in statuses {
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.status, 200, "after upstream {status}: {}", got.text());
        assert_eq!(
            got.json()["choices"][0]["message"]["content"],
            "from second"
        );
        assert_eq!(got.header("x-upstream"), Some("second"));
        assert_eq!(got.header("x-upstream-attempts"), Some("2"));
    }
    assert_eq!(bad.hits(), statuses.len());
    assert_eq!(good.hits(), statuses.len());
}

#[actix_rt::test]
async fn transport_failures_move_to_the_next_upstream() {
    for (what, reply) in [("reset", Reply::Reset), ("close", Reply::Close)] {
        let bad = Mock::always(reply);
        let good = Mock::always(Reply::chat("ok"));
        let gw = two(&bad.endpoint(), &good.endpoint(), "");
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.status, 200, "{what}: {}", got.text());
        assert_eq!(got.header("x-upstream"), Some("second"), "{what}");
        assert_eq!(bad.hits(), 1, "{what}");
    }
    let good = Mock::always(Reply::chat("ok"));
    let gw = two(&Mock::refused_endpoint(), &good.endpoint(), "");
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-upstream"), Some("second"));
}

#[actix_rt::test]
async fn header_timeout_fails_over_after_timeout() {
    let slow = Mock::always(Reply::Hang);
    let good = Mock::always(Reply::chat("ok"));
    let gw = two(&slow.endpoint(), &good.endpoint(), "timeout: 0.4");
    let t = Instant::now();
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    let took = t.elapsed();
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-upstream"), Some("second"));
    assert!(
        took >= Duration::from_millis(400),
        "failed over too early: {took:?}"
    );
    assert!(
        took < Duration::from_millis(2000),
        "failed over too late: {took:?}"
    );
    // The abandoned upstream request was cancelled.
    assert!(eventually(Duration::from_secs(2), || *slow
        .peer_gone
        .lock()
        .unwrap()
        == 1));
}

#[actix_rt::test]
async fn stream_that_sends_headers_then_nothing_fails_over() {
    let stalled = Mock::always(Reply::Chunks {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        chunks: vec![],
        ending: Ending::Stall,
    });
    let good = Mock::always(Reply::sse_chat(&["a", "b"], Duration::from_millis(10)));
    let gw = two(
        &stalled.endpoint(),
        &good.endpoint(),
        "stream_timeout: 0.3\ntimeout: 30",
    );
    let t = Instant::now();
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-upstream"), Some("second"));
    assert!(got.text().contains("[DONE]"));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[actix_rt::test]
async fn first_chunk_later_than_stream_timeout_fails_over_but_sooner_does_not() {
    let late = Mock::always(Reply::Delay(
        Duration::from_millis(800),
        Box::new(Reply::sse_chat(&["late"], Duration::ZERO)),
    ));
    let good = Mock::always(Reply::sse_chat(&["good"], Duration::ZERO));
    let gw = two(&late.endpoint(), &good.endpoint(), "stream_timeout: 0.3");
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    assert_eq!(got.header("x-upstream"), Some("second"));

    let soon = Mock::always(Reply::Delay(
        Duration::from_millis(100),
        Box::new(Reply::sse_chat(&["soon"], Duration::ZERO)),
    ));
    let gw = two(&soon.endpoint(), &good.endpoint(), "stream_timeout: 0.6");
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    assert_eq!(got.header("x-upstream"), Some("first"));
    assert!(got.text().contains("soon"));
}

#[actix_rt::test]
async fn last_candidate_stream_waits_for_timeout_not_stream_timeout() {
    // Only one upstream: nothing to fail over to, so a slow first chunk is waited for.
    let slow = Mock::always(Reply::Delay(
        Duration::from_millis(700),
        Box::new(Reply::sse_chat(&["patience"], Duration::ZERO)),
    ));
    let gw = Gateway::start(&config(
        "stream_timeout: 0.2\ntimeout: 5",
        &[upstream("only", &slow.endpoint(), "")],
    ));
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    assert_eq!(got.status, 200);
    assert!(got.text().contains("patience"));
}

#[actix_rt::test]
async fn bad_request_is_relayed_and_never_retried() {
    // (A 400 whose code is in `failover_codes`, by default `context_length_exceeded`, fails over
    // since version 0.2: tests/rescue.rs. Any other 400 is the answer.)
    let bad = Mock::always(Reply::json(
        400,
        serde_json::json!({"error": {"message": "bad value", "code": "invalid_value"}}),
    ));
    let good = Mock::always(Reply::chat("should not be used"));
    let gw = two(&bad.endpoint(), &good.endpoint(), "");
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 400);
    assert_eq!(got.json()["error"]["code"], "invalid_value");
    assert_eq!(got.header("x-upstream"), Some("first"));
    assert_eq!(got.header("x-upstream-attempts"), Some("1"));
    assert_eq!(good.hits(), 0);
}

#[actix_rt::test]
async fn all_failed_relays_the_last_http_answer() {
    let a = Mock::always(Reply::status(500));
    let b = Mock::always(Reply::json(
        503,
        serde_json::json!({"error": {"message": "overloaded"}}),
    ));
    let gw = two(&a.endpoint(), &b.endpoint(), "");
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 503);
    assert_eq!(got.json()["error"]["message"], "overloaded");
    assert_eq!(got.header("x-upstream"), Some("second"));
    assert_eq!(got.header("x-upstream-attempts"), Some("2"));
    assert_eq!(got.header("access-control-allow-origin"), Some("*"));
}

#[actix_rt::test]
async fn all_failed_without_http_answer_is_502_or_504_listing_attempts() {
    let gw = two(&Mock::refused_endpoint(), &Mock::refused_endpoint(), "");
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 502);
    let msg = got.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("first: connect failed") && msg.contains("second: connect failed"),
        "{msg}"
    );
    assert_eq!(got.json()["error"]["type"], "upstream_error");

    let hang = Mock::always(Reply::Hang);
    let gw = two(&Mock::refused_endpoint(), &hang.endpoint(), "timeout: 0.3");
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 504);
    let msg = got.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("first: connect failed")
            && msg.contains("second: no response head within 0.300s"),
        "{msg}"
    );
}

#[actix_rt::test]
async fn model_allowed_nowhere_is_404_naming_it() {
    let m = Mock::always(Reply::chat("x"));
    let gw = Gateway::start(&config(
        "",
        &[upstream("a", &m.endpoint(), "allow: [gpt-4*]")],
    ));
    let got = post(
        &gw,
        "/v1/chat/completions",
        serde_json::json!({"model": "claude-3"}),
    )
    .await;
    assert_eq!(got.status, 404);
    assert!(got.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("claude-3"));
    assert_eq!(got.json()["error"]["code"], "model_not_found");
    assert_eq!(m.hits(), 0);
}

#[actix_rt::test]
async fn allow_deny_and_model_map() {
    let a = Mock::always(Reply::chat("a"));
    let b = Mock::always(Reply::chat("b"));
    let gw = Gateway::start(&config(
        "",
        &[
            upstream(
                "a",
                &a.endpoint(),
                "deny: [gpt-4o]\nmodel_map: {gpt-4o-mini: mini-deployment, \"*\": fallback}",
            ),
            upstream("b", &b.endpoint(), "allow: [gpt-4o, embed-*]"),
        ],
    ));
    // Denied on a → served by b, model untouched.
    let got = post(
        &gw,
        "/v1/chat/completions",
        serde_json::json!({"model": "gpt-4o", "n": 1}),
    )
    .await;
    assert_eq!(got.header("x-upstream"), Some("b"));
    assert_eq!(b.seen()[0].json()["model"], "gpt-4o");
    // Exact map entry beats the wildcard; other members kept byte for byte, in order.
    let body =
        r#"{"temperature":0.50,"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}]}"#;
    let auth = format!("Bearer {TOKEN}");
    let got = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &auth)],
        body.as_bytes(),
    )
    .await;
    assert_eq!(got.header("x-upstream"), Some("a"));
    assert_eq!(
        String::from_utf8(a.seen()[0].body.clone()).unwrap(),
        r#"{"temperature":0.50,"model":"mini-deployment","messages":[{"role":"user","content":"x"}]}"#
    );
    post(
        &gw,
        "/v1/chat/completions",
        serde_json::json!({"model": "other"}),
    )
    .await;
    assert_eq!(a.seen()[1].json()["model"], "fallback");
    // b's allow list excludes "other" and includes embed-*.
    let got = post(
        &gw,
        "/v1/embeddings",
        serde_json::json!({"model": "embed-small"}),
    )
    .await;
    assert_eq!(got.header("x-upstream"), Some("a"));
    assert_eq!(b.hits(), 1);
    // Requests without a model are not filtered.
    let got = get(&gw, "/v1/models").await;
    assert_eq!(got.status, 200);
}

#[actix_rt::test]
async fn cooldown_moves_a_dead_upstream_back_then_retries_it() {
    let flaky = Mock::script(|_, n| {
        if n < 3 {
            Reply::status(500)
        } else {
            Reply::chat("recovered")
        }
    });
    let good = Mock::always(Reply::chat("good"));
    let gw = Gateway::start(&config(
        "cooldown: {failures: 2, seconds: 1}",
        &[
            upstream("flaky", &flaky.endpoint(), ""),
            upstream("good", &good.endpoint(), ""),
        ],
    ));
    for _ in 0..2 {
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.header("x-upstream-attempts"), Some("2"));
    }
    // In cooldown: not tried first any more.
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("good"));
    assert_eq!(got.header("x-upstream-attempts"), Some("1"));
    assert_eq!(flaky.hits(), 2);
    // After the cooldown it is tried again in its place (half-open); one failure sends it back.
    std::thread::sleep(Duration::from_millis(1100));
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream-attempts"), Some("2"));
    assert_eq!(flaky.hits(), 3);
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(
        got.header("x-upstream-attempts"),
        Some("1"),
        "half-open failure must re-enter cooldown"
    );
    std::thread::sleep(Duration::from_millis(1100));
    // Now it answers: one success restores it.
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("flaky"));
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("flaky"));
    assert_eq!(got.json()["choices"][0]["message"]["content"], "recovered");
}

#[actix_rt::test]
async fn round_robin_and_random_spread_requests() {
    let a = Mock::always(Reply::chat("a"));
    let b = Mock::always(Reply::chat("b"));
    let gw = Gateway::start(&config(
        "lb_policy: round_robin",
        &[
            upstream("a", &a.endpoint(), ""),
            upstream("b", &b.endpoint(), ""),
        ],
    ));
    for _ in 0..4 {
        post(&gw, "/v1/chat/completions", chat_body(false)).await;
    }
    assert_eq!((a.hits(), b.hits()), (2, 2));
    let (c, d) = (
        Mock::always(Reply::chat("c")),
        Mock::always(Reply::chat("d")),
    );
    let gw = Gateway::start(&config(
        "lb_policy: random",
        &[
            upstream("c", &c.endpoint(), ""),
            upstream("d", &d.endpoint(), ""),
        ],
    ));
    for _ in 0..40 {
        post(&gw, "/v1/chat/completions", chat_body(false)).await;
    }
    assert_eq!(c.hits() + d.hits(), 40);
    assert!(
        c.hits() >= 5 && d.hits() >= 5,
        "random should use both: {} / {}",
        c.hits(),
        d.hits()
    );
}

#[actix_rt::test]
async fn auth_rules() {
    let m = Mock::always(Reply::chat("x"));
    let gw = Gateway::start(&format!(
        "authorization: \"{TOKEN}, second-token-abcdefgh\"\nupstreams:\n{}",
        upstream("u", &m.endpoint(), "")
    ));
    let url = gw.url("/v1/chat/completions");
    let body = chat_body(false).to_string();
    let missing = send("POST", &url, &[], body.as_bytes()).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["error"]["code"], "invalid_api_key");
    assert_eq!(missing.json()["error"]["type"], "invalid_request_error");
    assert_eq!(missing.header("access-control-allow-origin"), Some("*"));
    let wrong = send(
        "POST",
        &url,
        &[("authorization", "Bearer nope")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(wrong.status, 401);
    let prefix = send(
        "POST",
        &url,
        &[("authorization", &format!("Bearer {}", &TOKEN[..10]))],
        body.as_bytes(),
    )
    .await;
    assert_eq!(prefix.status, 401);
    assert_eq!(m.hits(), 0, "nothing is proxied without auth");
    let second = send(
        "POST",
        &url,
        &[("authorization", "Bearer   second-token-abcdefgh  ")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(second.status, 200);

    let gw = Gateway::start_with(
        &format!("upstreams:\n{}", upstream("u", &m.endpoint(), "")),
        &["-noauth"],
    );
    let open = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[],
        body.as_bytes(),
    )
    .await;
    assert_eq!(open.status, 200);
}

#[actix_rt::test]
async fn request_rewriting_as_seen_by_the_upstream() {
    let m = Mock::always(Reply::chat("x"));
    let endpoint = format!("http://{}/api/v1", m.addr);
    let asis = Mock::always(Reply::chat("y"));
    let gw = Gateway::start(&config(
        "",
        &[
            upstream("m", &endpoint, "allow: [gpt-test]"),
            format!(
                "  - name: asis\n    endpoint: {}\n    sk: asis\n",
                asis.endpoint()
            ),
        ],
    ));
    let auth = format!("Bearer {TOKEN}");
    let body = chat_body(false).to_string();
    let got = send(
        "POST",
        &gw.url("/v1/chat/completions?api-version=2024-02-01&x=1"),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
            ("openai-beta", "assistants=v2"),
            ("openai-organization", "org-1"),
            ("user-agent", "test-agent/1.0"),
            ("x-forwarded-for", "10.9.8.7"),
            ("x-real-ip", "10.9.8.7"),
            ("forwarded", "for=10.9.8.7"),
            ("accept-encoding", "gzip, br"),
        ],
        body.as_bytes(),
    )
    .await;
    assert_eq!(got.status, 200);
    let seen = &m.seen()[0];
    assert_eq!(seen.method, "POST");
    assert_eq!(
        seen.target,
        "/api/v1/chat/completions?api-version=2024-02-01&x=1"
    );
    assert_eq!(seen.header("host"), Some(m.addr.to_string().as_str()));
    assert_eq!(
        seen.header("authorization"),
        Some("Bearer sk-upstream-m-secret")
    );
    assert_eq!(seen.header("openai-beta"), Some("assistants=v2"));
    assert_eq!(seen.header("openai-organization"), Some("org-1"));
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.header("user-agent"), Some("test-agent/1.0"));
    assert_eq!(seen.header("accept-encoding"), Some("identity"));
    assert_eq!(
        seen.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    for leaked in ["x-forwarded-for", "x-real-ip", "forwarded"] {
        assert_eq!(seen.header(leaked), None, "{leaked} reached the upstream");
    }
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(
        seen.headers
            .iter()
            .filter(|(k, _)| k == "authorization")
            .count(),
        1
    );

    // `sk: asis` forwards the client's own Authorization.
    post(&gw, "/v1/embeddings", serde_json::json!({"model": "other"})).await;
    assert_eq!(asis.seen()[0].header("authorization"), Some(auth.as_str()));
    assert_eq!(asis.seen()[0].target, "/v1/embeddings");
}

#[actix_rt::test]
async fn cors_preflight_healthz_and_body_limit() {
    let m = Mock::always(Reply::chat("x"));
    let gw = Gateway::start(&config(
        "max_body_bytes: 1000",
        &[upstream("u", &m.endpoint(), "")],
    ));
    let pre = send(
        "OPTIONS",
        &gw.url("/v1/chat/completions"),
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "x-custom"),
        ],
        b"",
    )
    .await;
    assert_eq!(pre.status, 204);
    assert_eq!(pre.header("access-control-allow-origin"), Some("*"));
    assert!(pre
        .header("access-control-allow-methods")
        .unwrap()
        .contains("POST"));
    let allowed = pre
        .header("access-control-allow-headers")
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("authorization")
            && allowed.contains("content-type")
            && allowed.contains("x-custom"),
        "{allowed}"
    );

    let health = send("GET", &gw.url("/healthz"), &[], b"").await;
    assert_eq!((health.status, health.text().as_str()), (200, "ok"));

    let auth = format!("Bearer {TOKEN}");
    let big = vec![b'x'; 1001];
    let got = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &auth)],
        &big,
    )
    .await;
    assert_eq!(got.status, 413);
    assert_eq!(got.json()["error"]["type"], "invalid_request_error");
    let ok = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &auth)],
        &big[..1000],
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        m.hits(),
        1,
        "only the request within the limit reached the upstream"
    );
}
