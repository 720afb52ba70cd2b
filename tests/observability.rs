//! Metrics and the status page (see the observability guide) and alerts (see the operations guide,
//! "Alerts") as an operator sees them.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

#[actix_rt::test]
async fn metrics_after_ok_failover_and_timeout() {
    let bad = Mock::always(Reply::status(500));
    let good = Mock::always(Reply::chat("ok"));
    let hang = Mock::always(Reply::Hang);
    let gw = Gateway::start(&config(
        "timeout: 0.3\ncooldown: {failures: 100, seconds: 1}",
        &[
            upstream("bad", &bad.endpoint(), "deny: [slow]"),
            upstream("good", &good.endpoint(), "deny: [slow]"),
            upstream("hang", &hang.endpoint(), "allow: [slow]"),
            upstream("good2", &good.endpoint(), "allow: [slow]"),
        ],
    ));
    post(&gw, "/v1/chat/completions", chat_body(false)).await;
    post(
        &gw,
        "/v1/chat/completions",
        serde_json::json!({"model": "slow"}),
    )
    .await;
    let m = scrape(&gw).await;
    assert_eq!(
        m.metric("openai_api_route_upstream_requests_total")
            .label("outcome", "http_error")
            .label("upstream", "bad")
            .value(),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        m.metric("openai_api_route_upstream_requests_total")
            .label("outcome", "ok")
            .label("upstream", "good")
            .value(),
        Some(1.0)
    );
    assert_eq!(
        m.metric("openai_api_route_upstream_requests_total")
            .label("outcome", "timeout")
            .label("upstream", "hang")
            .value(),
        Some(1.0)
    );
    assert_eq!(
        m.metric("openai_api_route_failovers_total")
            .label("upstream", "bad")
            .value(),
        Some(1.0)
    );
    assert_eq!(
        m.metric("openai_api_route_failovers_total")
            .label("upstream", "hang")
            .value(),
        Some(1.0)
    );
    assert_eq!(
        m.metric("openai_api_route_upstream_first_byte_seconds_count")
            .label("upstream", "good")
            .value(),
        Some(1.0)
    );
    assert_eq!(
        m.metric("openai_api_route_upstream_healthy")
            .label("upstream", "bad")
            .value(),
        Some(1.0)
    );
    assert_eq!(
        m.metric("openai_api_route_tokens_total")
            .label("kind", "prompt")
            .label("upstream", "good")
            .value(),
        Some(5.0)
    );
    assert_eq!(
        m.metric("openai_api_route_tokens_total")
            .label("kind", "completion")
            .label("upstream", "good")
            .value(),
        Some(7.0)
    );
    assert_eq!(
        m.metric("openai_api_route_records_dropped_total").value(),
        Some(0.0)
    );
    assert!(
        m.metric("openai_api_route_http_requests_total")
            .label("endpoint", "chat/completions")
            .label("method", "POST")
            .label("status", "200")
            .value()
            .is_some(),
        "{m}"
    );
}

#[actix_rt::test]
async fn tokens_are_counted_with_recording_off() {
    let json = Mock::always(Reply::chat("ok"));
    let sse = Mock::always(Reply::sse_chat(
        &["a", "b", "c", "d"],
        Duration::from_millis(1),
    ));
    let gw = Gateway::start_with(
        &config(
            "",
            &[
                upstream("json", &json.endpoint(), "deny: [streamer]"),
                upstream("sse", &sse.endpoint(), "allow: [streamer]"),
            ],
        ),
        &["-database", "none"],
    );
    assert_eq!(
        post(&gw, "/v1/chat/completions", chat_body(false))
            .await
            .status,
        200
    );
    let streamed = post(
        &gw,
        "/v1/chat/completions",
        serde_json::json!({"model": "streamer", "stream": true}),
    )
    .await;
    assert_eq!(streamed.status, 200);
    assert!(streamed.text().contains("[DONE]"));
    let m = scrape(&gw).await;
    let tokens = |upstream: &str, kind: &str| {
        m.metric("openai_api_route_tokens_total")
            .label("kind", kind)
            .label("upstream", upstream)
            .value()
    };
    assert_eq!(tokens("json", "prompt"), Some(5.0), "{m}");
    assert_eq!(tokens("json", "completion"), Some(7.0));
    assert_eq!(tokens("sse", "prompt"), Some(3.0));
    assert_eq!(tokens("sse", "completion"), Some(4.0));
    assert!(!gw.db_path.exists());
}

#[actix_rt::test]
async fn random_paths_create_no_new_series_and_metrics_are_never_proxied() {
    let m = Mock::always(Reply::chat("ok"));
    let gw = Gateway::start(&config("", &[upstream("u", &m.endpoint(), "")]));
    // A proxied GET (the catch-all's series); /v1/models is answered by the gateway.
    get(&gw, "/v1/files").await;
    // The `other` API family (every unknown /v1 path) exists from here on.
    get(&gw, "/v1/warm-up").await;
    send("GET", &gw.url("/nope/a"), &[], b"").await;
    scrape(&gw).await; // the scrape's own series exist from here on
    let before_text = scrape(&gw).await;
    let before = before_text.series_count();
    for i in 0..20 {
        get(&gw, &format!("/v1/random-{i}/x")).await;
        send("GET", &gw.url(&format!("/elsewhere-{i}")), &[], b"").await;
    }
    let text = scrape(&gw).await;
    let after = text.series_count();
    assert_eq!(
        before, after,
        "new series from client paths:\n{before_text}\n----\n{text}"
    );
    assert!(!text.text.contains("random-"));
    assert!(!text.text.contains("elsewhere-"));
    assert!(
        m.seen().iter().all(|s| !s.target.contains("metrics")),
        "metrics request reached the upstream"
    );
}

fn feishu_sign_independently(ts: &str, secret: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import base64,hashlib,hmac,sys; k=(sys.argv[1]+'\\n'+sys.argv[2]).encode(); print(base64.b64encode(hmac.new(k, b'', hashlib.sha256).digest()).decode())",
            ts,
            secret,
        ])
        .output()
        .expect("python3 is needed for the independent signature check");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[actix_rt::test]
async fn all_failed_alerts_reach_feishu_and_matrix_signed_and_coalesced() {
    let feishu = Mock::always(Reply::json(
        200,
        serde_json::json!({"code": 0, "msg": "success"}),
    ));
    let matrix = Mock::always(Reply::json(200, serde_json::json!({"event_id": "$1"})));
    let dead = Mock::always(Reply::status(503));
    let cfg = format!(
        "notify:\n  min_interval: 1\n  feishu: {{webhook: \"http://{}/open-apis/bot/v2/hook/hook-id-secret\", secret: feishu-signing-secret}}\n  matrix: {{homeserver: \"http://{}\", access_token: matrix-token-secret, room_id: \"!room:example.org\"}}\ncooldown: {{failures: 100, seconds: 1}}",
        feishu.addr, matrix.addr
    );
    let gw = Gateway::start(&config(&cfg, &[upstream("dead", &dead.endpoint(), "")]));
    for _ in 0..3 {
        let t = Instant::now();
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.status, 503);
        assert!(t.elapsed() < Duration::from_millis(500));
    }
    assert!(
        eventually(Duration::from_secs(4), || feishu.hits() == 2
            && matrix.hits() == 2),
        "feishu {} matrix {}",
        feishu.hits(),
        matrix.hits()
    );
    let f = feishu.seen();
    assert_eq!(f[0].target, "/open-apis/bot/v2/hook/hook-id-secret");
    let body = f[0].json();
    assert_eq!(body["msg_type"], "text");
    let text = body["content"]["text"].as_str().unwrap();
    for part in [
        "POST /v1/chat/completions",
        "gpt-test",
        "503",
        "dead: HTTP 503",
        "127.0.0.1",
    ] {
        assert!(text.contains(part), "{part} missing from {text}");
    }
    let ts = body["timestamp"].as_str().unwrap();
    assert_eq!(
        body["sign"].as_str().unwrap(),
        feishu_sign_independently(ts, "feishu-signing-secret")
    );
    assert!(
        f[1].json()["content"]["text"]
            .as_str()
            .unwrap()
            .contains("and 1 more"),
        "{:?}",
        f[1].json()
    );

    let mx = matrix.seen();
    assert_eq!(mx[0].method, "PUT");
    assert!(
        mx[0]
            .target
            .starts_with("/_matrix/client/v3/rooms/%21room%3Aexample.org/send/m.room.message/"),
        "{}",
        mx[0].target
    );
    assert_ne!(mx[0].target, mx[1].target, "transaction ids must be unique");
    assert_eq!(
        mx[0].header("authorization"),
        Some("Bearer matrix-token-secret")
    );
    assert_eq!(mx[0].json()["msgtype"], "m.text");
    for s in f.iter().chain(mx.iter()) {
        let all = String::from_utf8_lossy(&s.body).to_string();
        for secret in [
            TOKEN,
            "sk-upstream-dead-secret",
            "matrix-token-secret",
            "feishu-signing-secret",
            "hook-id-secret",
        ] {
            assert!(!all.contains(secret), "{secret} in an alert");
        }
    }
    let m = scrape(&gw).await;
    assert_eq!(
        m.metric("openai_api_route_notifications_total")
            .label("channel", "feishu")
            .label("result", "ok")
            .value(),
        Some(2.0),
        "{m}"
    );
    for secret in [
        "matrix-token-secret",
        "feishu-signing-secret",
        "hook-id-secret",
    ] {
        assert!(!gw.log().contains(secret), "{secret} in the log");
    }
}

#[actix_rt::test]
async fn cooldown_and_recovery_alerts() {
    let feishu = Mock::always(Reply::json(200, serde_json::json!({"code": 0})));
    let flaky = Mock::script(|_, n| {
        if n == 0 {
            Reply::status(500)
        } else {
            Reply::chat("back")
        }
    });
    let good = Mock::always(Reply::chat("good"));
    let cfg = format!("notify: {{min_interval: 0, feishu: {{webhook: \"http://{}/hook\"}}}}\ncooldown: {{failures: 1, seconds: 0.3}}", feishu.addr);
    let gw = Gateway::start(&config(
        &cfg,
        &[
            upstream("flaky", &flaky.endpoint(), ""),
            upstream("good", &good.endpoint(), ""),
        ],
    ));
    post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert!(eventually(Duration::from_secs(2), || feishu.hits() == 1));
    assert!(feishu.seen()[0].json()["content"]["text"]
        .as_str()
        .unwrap()
        .contains("flaky is cooling down"));
    std::thread::sleep(Duration::from_millis(400));
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("flaky"));
    assert!(eventually(Duration::from_secs(2), || feishu.hits() == 2));
    assert!(feishu.seen()[1].json()["content"]["text"]
        .as_str()
        .unwrap()
        .contains("flaky recovered"));
}

#[actix_rt::test]
async fn a_hanging_alert_sink_does_not_delay_clients() {
    let sink = Mock::always(Reply::Hang);
    let dead = Mock::always(Reply::status(500));
    let cfg = format!(
        "notify: {{min_interval: 0, feishu: {{webhook: \"http://{}/hook\"}}}}",
        sink.addr
    );
    let gw = Gateway::start(&config(&cfg, &[upstream("dead", &dead.endpoint(), "")]));
    for _ in 0..3 {
        let t = Instant::now();
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.status, 500);
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "client waited for the alert: {:?}",
            t.elapsed()
        );
    }
    // Each delivery gives up after 5 s and is counted as an error.
    let errors = |m: &Metrics| {
        m.metric("openai_api_route_notifications_total")
            .label("channel", "feishu")
            .label("result", "error")
            .value()
    };
    let m = scrape_until(&gw, Duration::from_secs(9), |m| errors(m).is_some()).await;
    assert!(errors(&m).unwrap_or(0.0) >= 1.0);
}

#[actix_rt::test]
async fn status_page_lists_upstreams_escaped_without_keys_and_shows_failures() {
    let bad = Mock::always(Reply::status(500));
    let good = Mock::always(Reply::chat("ok"));
    let hostile = format!(
        "  - name: \"<script>alert(1)</script>\"\n    endpoint: http://user:pw-secret@{}/v1\n    sk: sk-hostile-secret\n",
        good.addr
    );
    let gw = Gateway::start(&config(
        "cooldown: {failures: 1, seconds: 60}",
        &[
            upstream("bad-one", &bad.endpoint(), "allow: [gpt-*]"),
            hostile,
        ],
    ));
    post(&gw, "/v1/chat/completions", chat_body(false)).await;
    let page = send("GET", &gw.url("/"), &[], b"").await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let html = page.text();
    assert!(!html.contains("<script>"), "unescaped name");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    let first = html.find("bad-one").unwrap();
    let second = html.find("&lt;script&gt;").unwrap();
    assert!(first < second, "upstreams out of order");
    assert!(html.contains(&format!("http://{}/v1", bad.addr)));
    for secret in [
        "sk-upstream-bad-one-secret",
        "sk-hostile-secret",
        "pw-secret",
        TOKEN,
    ] {
        assert!(!html.contains(secret), "{secret} on the status page");
    }
    assert!(
        html.contains("cooling down until"),
        "state change after failover not shown"
    );
    assert!(html.contains("HTTP 500"));
    assert!(html.contains("gpt-*"));
    assert!(html.contains("Client auth</span><b>on"));
    assert!(html.contains("records in"));
    let css = send("GET", &gw.url("/static/style.css"), &[], b"").await;
    assert_eq!(css.status, 200);
    assert!(css.text().contains(".upstreams"));
}
