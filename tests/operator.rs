//! The operator's view of version 0.2: the status page's last hour, tokens and failed attempts
//! (see the observability guide, "Status page"), latency buckets and bounded HTTP labels in the
//! metrics (its "Metrics").

use std::time::Duration;

use crate::support::*;

async fn scrape(gw: &Gateway) -> String {
    let got = send("GET", &gw.url("/v1/metrics"), &[], b"").await;
    assert_eq!(got.status, 200);
    got.text()
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn series_count(text: &str) -> usize {
    text.lines().filter(|l| !l.starts_with('#')).count()
}

#[actix_rt::test]
async fn status_page_shows_last_hour_tokens_and_failed_attempts_escaped() {
    let bad = Mock::always(Reply::status(503));
    let good = Mock::always(Reply::chat("ok"));
    let gw = Gateway::start(&config(
        "cooldown: {failures: 100, seconds: 1}",
        &[
            upstream("flaky", &bad.endpoint(), ""),
            upstream("steady", &good.endpoint(), ""),
        ],
    ));
    for _ in 0..3 {
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.status, 200);
    }
    let hostile_model = "<img src=x onerror=alert(1)>\u{1b}[31m";
    let got = post(
        &gw,
        "/v1/chat/completions",
        serde_json::json!({"model": hostile_model, "messages": []}),
    )
    .await;
    assert_eq!(got.status, 200);

    let html = send("GET", &gw.url("/"), &[], b"").await.text();
    // Two charts per upstream, and no script anywhere.
    assert_eq!(html.matches("<svg class=\"chart\"").count(), 4, "{html}");
    assert!(!html.contains("<script"));
    // flaky: 4 attempts, all failed; steady: 4 attempts, none failed (this minute, or split over
    // two if the minute turned during the test: the totals are per hour either way).
    assert!(
        html.contains("4 attempts <span class=\"key fail\"></span>4 failed"),
        "{html}"
    );
    assert!(
        html.contains("4 attempts <span class=\"key fail\"></span>0 failed"),
        "{html}"
    );
    // Tokens since start: 4 × (5 prompt + 7 completion) on steady, none on flaky.
    assert!(
        html.contains("48<br><small>20 prompt · 28 completion</small></div>"),
        "{html}"
    );
    assert!(
        html.contains("0<br><small>0 prompt · 0 completion</small>"),
        "{html}"
    );
    // The failed attempts, newest first, with the hostile model escaped (markup and control
    // characters) and the outcome label.
    let section = &html[html
        .find("Last 20 failed attempts")
        .expect("no failure list")..];
    assert_eq!(section.matches("<tr><td data-label=\"Time\"").count(), 4);
    assert!(section.contains("http_error"));
    assert!(section.contains("HTTP 503"));
    assert!(!html.contains("<img"), "unescaped model");
    assert!(
        section.contains("&lt;img src=x onerror=alert(1)&gt;\\u{1b}[31m"),
        "{section}"
    );
    assert!(section.contains("gpt-test"));
    for secret in [
        "sk-upstream-flaky-secret",
        "sk-upstream-steady-secret",
        TOKEN,
    ] {
        assert!(!html.contains(secret), "{secret} on the status page");
    }
    // Dark and phone layouts are in the stylesheet.
    let css = send("GET", &gw.url("/static/style.css"), &[], b"")
        .await
        .text();
    assert!(css.contains("prefers-color-scheme: dark"));
    assert!(css.contains("max-width: 760px"));
}

#[actix_rt::test]
async fn long_failure_reasons_are_cut_at_200_characters() {
    // The model is the client's text on the page: a long one is cut like a long reason.
    let bad = Mock::always(Reply::status(500));
    let gw = Gateway::start(&config("", &[upstream("bad<i>&", &bad.endpoint(), "")]));
    let long_model = "m".repeat(1_000);
    post(
        &gw,
        "/v1/chat/completions",
        serde_json::json!({"model": long_model, "messages": []}),
    )
    .await;
    let html = send("GET", &gw.url("/"), &[], b"").await.text();
    assert!(html.contains(&format!("{}…", "m".repeat(200))));
    assert!(!html.contains(&"m".repeat(201)));
    // The upstream's name is escaped in its row and in the failure list.
    assert!(!html.contains("bad<i>"));
    assert_eq!(html.matches("bad&lt;i&gt;&amp;").count(), 2, "{html}");
}

#[actix_rt::test]
async fn latency_histograms_reach_300_seconds() {
    let good = Mock::always(Reply::chat("ok"));
    let gw = Gateway::start(&config("", &[upstream("u", &good.endpoint(), "")]));
    post(&gw, "/v1/chat/completions", chat_body(false)).await;
    let m = scrape(&gw).await;
    for series in [
        "openai_api_route_upstream_first_byte_seconds_bucket{upstream=\"u\",le=\"300\"}",
        "openai_api_route_http_requests_duration_seconds_bucket{endpoint=\"chat/completions\",method=\"POST\",status=\"200\",le=\"300\"}",
    ] {
        assert_eq!(value(&m, series), Some(1.0), "{series} in\n{m}");
    }
    assert!(m.contains("le=\"120\""));
}

#[actix_rt::test]
async fn http_metrics_label_api_families_never_paths() {
    let good = Mock::always(Reply::chat("ok"));
    let gw = Gateway::start(&config("", &[upstream("u", &good.endpoint(), "")]));
    post(&gw, "/v1/chat/completions", chat_body(false)).await;
    post(&gw, "/v1/chat/completions", chat_body(false)).await;
    post(
        &gw,
        "/v1/embeddings",
        serde_json::json!({"model": "e", "input": "x"}),
    )
    .await;
    get(&gw, "/v1/some/unknown/path?q=1").await;
    send("GET", &gw.url("/healthz"), &[], b"").await;
    send("GET", &gw.url("/not-a-route"), &[], b"").await;
    let m = scrape(&gw).await;
    let total = |labels: &str| {
        value(
            &m,
            &format!("openai_api_route_http_requests_total{{{labels}}}"),
        )
    };
    assert_eq!(
        total("endpoint=\"chat/completions\",method=\"POST\",status=\"200\""),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        total("endpoint=\"embeddings\",method=\"POST\",status=\"200\""),
        Some(1.0)
    );
    assert_eq!(
        total("endpoint=\"other\",method=\"GET\",status=\"200\""),
        Some(1.0)
    );
    assert_eq!(
        total("endpoint=\"/healthz\",method=\"GET\",status=\"200\""),
        Some(1.0)
    );
    assert_eq!(
        total("endpoint=\"UNKNOWN\",method=\"GET\",status=\"404\""),
        Some(1.0)
    );
    assert!(!m.contains("{tail}"), "catch-all pattern as a label:\n{m}");
    assert!(!m.contains("unknown/path") && !m.contains("not-a-route"));
    // actix-web-prom's own series never appear.
    assert!(!m.contains("exposition_unused"));
    // Every endpoint label of the request series is one of the fixed set.
    let allowed = [
        "chat/completions",
        "completions",
        "embeddings",
        "responses",
        "audio",
        "images",
        "files",
        "models",
        "realtime",
        "other",
        "/",
        "/healthz",
        "/static/style.css",
        "/v1/metrics",
        "UNKNOWN",
    ];
    for line in m
        .lines()
        .filter(|l| l.starts_with("openai_api_route_http_requests"))
    {
        let ep = line
            .split("endpoint=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_else(|| panic!("no endpoint label: {line}"));
        assert!(allowed.contains(&ep), "endpoint {ep:?} in {line}");
    }
}

#[actix_rt::test]
async fn made_up_methods_share_one_series_and_still_reach_the_upstream() {
    let echo = Mock::always(Reply::chat("ok"));
    let gw = Gateway::start(&config("", &[upstream("u", &echo.endpoint(), "")]));
    let auth = format!("Bearer {TOKEN}");
    let hit = |i: usize| {
        let url = gw.url("/v1/x");
        let auth = auth.clone();
        async move {
            let method = format!("M{i:05}XXXX");
            let got = send(&method, &url, &[("authorization", &auth)], b"").await;
            assert_eq!(got.status, 200, "{method}: {}", got.text());
        }
    };
    for i in 0..5 {
        hit(i).await;
    }
    scrape(&gw).await; // the scrape's own series exist from here on
    let before = scrape(&gw).await;
    for i in 5..305 {
        hit(i).await;
    }
    let after = scrape(&gw).await;
    assert_eq!(
        series_count(&before),
        series_count(&after),
        "made-up methods created series"
    );
    // Only counts and sums grew a digit or two: the scrape did not grow with the methods.
    assert!(
        after.len() < before.len() + 200,
        "scrape grew from {} to {} bytes",
        before.len(),
        after.len()
    );
    assert!(!after.contains("XXXX"));
    assert_eq!(
        value(
            &after,
            "openai_api_route_http_requests_total{endpoint=\"other\",method=\"other\",status=\"200\"}"
        ),
        Some(305.0),
        "{after}"
    );
    // The upstream got each request with its real method.
    let seen = echo.seen();
    assert_eq!(seen.len(), 305);
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s.method, format!("M{i:05}XXXX"));
        assert_eq!(s.target, "/v1/x");
    }
}

#[actix_rt::test]
async fn history_survives_a_reload_and_a_removed_upstream_disappears() {
    let good = Mock::always(Reply::chat("ok"));
    let cfg = |ups: &[&str]| {
        config(
            "",
            &ups.iter()
                .map(|n| upstream(n, &good.endpoint(), ""))
                .collect::<Vec<_>>(),
        )
    };
    let gw = Gateway::start(&cfg(&["keep", "drop-me"]));
    for _ in 0..2 {
        post(&gw, "/v1/chat/completions", chat_body(false)).await;
    }
    std::fs::write(&gw.config_path, cfg(&["keep"])).unwrap();
    gw.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || gw.log().contains("reloaded")),
        "{}",
        gw.log()
    );
    // The registry applies the reload just after the log line: allow it a moment.
    let mut html = String::new();
    for _ in 0..50 {
        html = send("GET", &gw.url("/"), &[], b"").await.text();
        if !html.contains("drop-me") {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!html.contains("drop-me"), "removed upstream still listed");
    assert!(
        html.contains("2 attempts <span class=\"key fail\"></span>0 failed"),
        "history lost on reload: {html}"
    );
    assert!(html.contains("24<br><small>10 prompt · 14 completion</small>"));
}

/// Version 0.4: each failed attempt names its request's API family — one of the `endpoint`
/// label's values, never the client's path.
#[actix_rt::test]
async fn failed_attempts_name_the_api_family_not_the_path() {
    let bad = Mock::always(Reply::status(503));
    let gw = Gateway::start(&config(
        "cooldown: {failures: 100, seconds: 1}",
        &[upstream("bad", &bad.endpoint(), "")],
    ));
    post(&gw, "/v1/chat/completions", chat_body(false)).await;
    post(
        &gw,
        "/v1/embeddings",
        serde_json::json!({"model": "emb", "input": "x"}),
    )
    .await;
    get(&gw, "/v1/files/file-marker%3Cb%3E").await;
    get(&gw, "/v1/zz-unknown-marker").await;
    let html = send("GET", &gw.url("/"), &[], b"").await.text();
    let section = &html[html
        .find("Last 20 failed attempts")
        .expect("no failure list")..];
    let families: Vec<&str> = section
        .split("<td data-label=\"API\" class=\"mono\">")
        .skip(1)
        .map(|s| &s[..s.find("</td>").unwrap()])
        .collect();
    let plain: Vec<String> = families.iter().map(|f| f.replace("<wbr>", "")).collect();
    assert_eq!(
        plain,
        ["other", "files", "embeddings", "chat/completions"],
        "newest first: {section}"
    );
    assert!(!html.contains("marker"), "a client's path on the page");
}
