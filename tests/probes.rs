//! Probes and the half-open probe on one replica (see the operations guide, "Probes", and the
//! rescue guide, "How failover and cooldown decide"), with the default SQLite database: an upstream
//! in cooldown is asked `GET /models` every `probe_interval`, a 2xx ends the cooldown before any
//! client request is risked on it, and probes count only in `probes_total`. After a cooldown, one
//! request probes the upstream while the others keep it at the back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

fn counter(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut s = m.metric(name);
    for (k, v) in labels {
        s = s.label(k, v);
    }
    s.value().unwrap_or(0.0)
}

#[actix_rt::test]
async fn a_probe_ends_a_cooldown_before_any_client_request_is_risked() {
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let primary = Mock::script(move |_, _| {
        if d.load(Ordering::SeqCst) {
            Reply::status(500)
        } else {
            Reply::chat("from primary")
        }
    });
    primary.set_models(Reply::status(503));
    let fallback = Mock::always(Reply::chat("from fallback"));
    let gw = Gateway::start(&config(
        "cooldown: {failures: 1, seconds: 60}\nprobe_interval: 0.5",
        &[
            upstream(
                "primary",
                &primary.endpoint(),
                "allow: [gpt-test]\nmodels: [gpt-test]",
            ),
            upstream(
                "fallback",
                &fallback.endpoint(),
                "allow: [gpt-test]\nmodels: [gpt-test]",
            ),
            upstream(
                "gone",
                &Mock::refused_endpoint(),
                "allow: [gone-model]\nmodels: [x]",
            ),
        ],
    ));
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("fallback"));
    let got = post(
        &gw,
        "/v1/chat/completions",
        serde_json::json!({"model": "gone-model", "messages": []}),
    )
    .await;
    assert_eq!(got.status, 502);
    let m = scrape_until(&gw, Duration::from_secs(5), |m| {
        counter(
            m,
            "openai_api_route_probes_total",
            &[("upstream", "primary"), ("result", "http_error")],
        ) >= 2.0
            && counter(
                m,
                "openai_api_route_probes_total",
                &[("upstream", "gone"), ("result", "connect_error")],
            ) >= 2.0
    })
    .await;
    let failed_probes = counter(
        &m,
        "openai_api_route_probes_total",
        &[("upstream", "primary"), ("result", "http_error")],
    );
    assert!(failed_probes >= 2.0, "{m}");
    assert!(primary.model_fetches().len() >= 2);
    for f in primary.model_fetches() {
        assert_eq!(
            f.header("authorization"),
            Some("Bearer sk-upstream-primary-secret")
        );
    }
    // Probes are not attempts, and still in cooldown.
    assert_eq!(
        counter(
            &m,
            "openai_api_route_upstream_requests_total",
            &[("upstream", "primary"), ("outcome", "http_error")]
        ),
        1.0
    );
    assert_eq!(
        m.metric("openai_api_route_upstream_healthy")
            .label("upstream", "primary")
            .value(),
        Some(0.0)
    );
    let page = send("GET", &gw.url("/"), &[], b"").await.text();
    assert!(page.contains("every 0.5s"), "{page}");
    assert!(
        page.contains("last: <span class=\"err\">http_error</span>"),
        "{page}"
    );

    // It recovers: the next probe ends the cooldown, and no client request was sent to it.
    down.store(false, Ordering::SeqCst);
    primary.set_models(Reply::models(&["gpt-test"]));
    let m = scrape_until(&gw, Duration::from_secs(3), |m| {
        m.metric("openai_api_route_upstream_healthy")
            .label("upstream", "primary")
            .value()
            == Some(1.0)
    })
    .await;
    assert_eq!(
        counter(
            &m,
            "openai_api_route_probes_total",
            &[("upstream", "primary"), ("result", "ok")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(primary.hits(), 1, "a client request was risked on it");
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("primary"));
    assert_eq!(got.header("x-upstream-attempts"), Some("1"));
    let log = gw.log();
    assert!(
        log.contains("upstream primary recovered (a probe answered)"),
        "{log}"
    );
    assert!(!log.contains("sk-upstream-primary-secret"));
}

#[actix_rt::test]
async fn after_a_cooldown_one_request_probes_while_the_others_keep_it_at_the_back() {
    // Slow failures: every concurrent request would still be waiting on its probe.
    let primary = Mock::always(Reply::Delay(
        Duration::from_millis(300),
        Box::new(Reply::status(500)),
    ));
    let fallback = Mock::always(Reply::chat("from fallback"));
    let gw = Gateway::start(&config(
        "cooldown: {failures: 1, seconds: 1}",
        &[
            upstream("primary", &primary.endpoint(), ""),
            upstream("fallback", &fallback.endpoint(), ""),
        ],
    ));
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("fallback"));
    assert_eq!(primary.hits(), 1);
    actix_rt::time::sleep(Duration::from_millis(1200)).await;
    let sent: Vec<_> = (0..8)
        .map(|_| post(&gw, "/v1/chat/completions", chat_body(false)))
        .collect();
    let answers = futures_util::future::join_all(sent).await;
    for got in &answers {
        assert_eq!(got.status, 200);
        assert_eq!(got.header("x-upstream"), Some("fallback"));
    }
    let attempts: Vec<_> = answers
        .iter()
        .map(|g| g.header("x-upstream-attempts").unwrap_or("").to_string())
        .collect();
    assert_eq!(primary.hits(), 2, "one half-open probe: {attempts:?}");
    assert_eq!(
        attempts.iter().filter(|a| *a == "2").count(),
        1,
        "{attempts:?}"
    );
}
