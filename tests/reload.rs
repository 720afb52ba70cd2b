//! SIGHUP reload (see the operations guide, "Reload, shutdown, logs and the database"): new config
//! for new requests, in-flight ones untouched, bad files rejected with the running config kept, no
//! failed request while it happens.

use std::time::Duration;

use crate::support::*;

#[actix_rt::test]
async fn sighup_under_traffic_switches_upstreams_without_a_failed_request() {
    let a = Mock::script(|req, _| {
        if req.json()["stream"] == true {
            Reply::sse_chat(&["slow", "-", "a"], Duration::from_millis(300))
        } else {
            Reply::chat("a")
        }
    });
    let b = Mock::always(Reply::chat("b"));
    let gw = Gateway::start(&config("", &[upstream("a", &a.endpoint(), "")]));
    // A stream that is in flight across the reload.
    let in_flight = post(&gw, "/v1/chat/completions", chat_body(true));
    let traffic = async {
        let mut statuses = Vec::new();
        let mut answers = Vec::new();
        for i in 0..60 {
            let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
            statuses.push(got.status);
            answers.push(got.header("x-upstream").unwrap_or("").to_string());
            if i == 20 {
                std::fs::write(
                    &gw.config_path,
                    config("", &[upstream("b", &b.endpoint(), "")]),
                )
                .unwrap();
                gw.signal("HUP");
            }
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
        (statuses, answers)
    };
    let (stream, (statuses, answers)) = futures_util::future::join(in_flight, traffic).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(answers.first().map(String::as_str), Some("a"));
    assert_eq!(answers.last().map(String::as_str), Some("b"), "{answers:?}");
    assert_eq!(stream.status, 200);
    assert!(
        stream.text().contains("[DONE]"),
        "in-flight stream cut by reload"
    );
    assert_eq!(stream.header("x-upstream"), Some("a"));
    assert!(gw.log().contains("SIGHUP: reloaded"));
    let page = send("GET", &gw.url("/"), &[], b"").await.text();
    assert!(
        page.contains(">b<") && !page.contains(">a<"),
        "status page still shows the old list"
    );
}

#[actix_rt::test]
async fn invalid_reload_keeps_the_running_config_and_health_survives_reload() {
    let bad = Mock::always(Reply::status(500));
    let good = Mock::always(Reply::chat("ok"));
    let gw = Gateway::start(&config(
        "cooldown: {failures: 1, seconds: 60}",
        &[
            upstream("bad", &bad.endpoint(), ""),
            upstream("good", &good.endpoint(), ""),
        ],
    ));
    post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(bad.hits(), 1);
    std::fs::write(
        &gw.config_path,
        "authorization: x\nupstreams:\n  - sk: no-endpoint\n",
    )
    .unwrap();
    gw.signal("HUP");
    assert!(eventually(Duration::from_secs(3), || gw
        .log()
        .contains("config not reloaded")));
    assert!(gw.log().contains("upstreams[0].endpoint: missing"));
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 200, "old config (and token) must still work");
    // Same names, new timeout: `bad` keeps its cooldown across the reload.
    std::fs::write(
        &gw.config_path,
        config(
            "cooldown: {failures: 1, seconds: 60}\ntimeout: 7",
            &[
                upstream("bad", &bad.endpoint(), ""),
                upstream("good", &good.endpoint(), ""),
            ],
        ),
    )
    .unwrap();
    gw.signal("HUP");
    assert!(eventually(Duration::from_secs(3), || gw
        .log()
        .contains("SIGHUP: reloaded")));
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(
        got.header("x-upstream-attempts"),
        Some("1"),
        "cooldown forgotten by reload"
    );
    assert_eq!(bad.hits(), 1);
    let page = send("GET", &gw.url("/"), &[], b"").await.text();
    assert!(page.contains("7s / 5s"), "new timeout not shown");
}

#[actix_rt::test]
async fn signals_sent_as_soon_as_it_listens_reload_and_drain_instead_of_killing() {
    let m = Mock::always(Reply::chat("ok"));
    let mut gw = Gateway::start(&config("", &[upstream("u", &m.endpoint(), "")]));
    // `Gateway::start` returns once "listening on" is logged: the handlers must be in place.
    gw.signal("HUP");
    assert!(eventually(Duration::from_secs(3), || gw
        .log()
        .contains("SIGHUP: reloaded")));
    assert_eq!(
        post(&gw, "/v1/chat/completions", chat_body(false))
            .await
            .status,
        200
    );
    let mut fresh = Gateway::start(&config("", &[upstream("u", &m.endpoint(), "")]));
    fresh.signal("TERM");
    assert_eq!(
        fresh.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        fresh.log()
    );
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
}

#[actix_rt::test]
async fn a_reload_names_the_keys_it_cannot_apply_until_a_restart() {
    let m = Mock::always(Reply::chat("ok"));
    let started = config("record_queue: 100", &[upstream("u", &m.endpoint(), "")]);
    let gw = Gateway::start(&started);
    let reloads = |n: usize| {
        let gw = &gw;
        move || gw.log().matches("SIGHUP: reloaded").count() >= n
    };
    let pending = |gw: &Gateway| {
        gw.log()
            .lines()
            .filter(|l| l.contains("not applied until restart"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // Keys read only at start, changed, beside one that applies at once (`timeout`).
    let changed = config(
        "record_queue: 200\ntimeout: 7\naddress: 127.0.0.1:1\ndatabase: elsewhere.sqlite\n\
         otel: {endpoint: http://127.0.0.1:9/v1/traces}",
        &[upstream("u", &m.endpoint(), "")],
    );
    std::fs::write(&gw.config_path, &changed).unwrap();
    gw.signal("HUP");
    assert!(
        eventually(Duration::from_secs(3), reloads(1)),
        "{}",
        gw.log()
    );
    let lines = pending(&gw);
    assert_eq!(lines.len(), 1, "{}", gw.log());
    assert!(
        lines[0].contains(
            "(1 upstreams); not applied until restart (read only at start): address, database, \
             record_queue, otel"
        ),
        "{}",
        lines[0]
    );
    let page = send("GET", &gw.url("/"), &[], b"").await.text();
    assert!(page.contains("7s / 5s"), "timeout not applied");
    assert_eq!(
        post(&gw, "/v1/chat/completions", chat_body(false))
            .await
            .status,
        200,
        "still listening and recording where it started"
    );
    gw.records(1);

    // The same file again: still not applied, still said.
    gw.signal("HUP");
    assert!(eventually(Duration::from_secs(3), reloads(2)));
    assert_eq!(pending(&gw).len(), 2, "{}", gw.log());

    // Back to the values it started with: nothing is pending any more.
    std::fs::write(&gw.config_path, &started).unwrap();
    gw.signal("HUP");
    assert!(eventually(Duration::from_secs(3), reloads(3)));
    assert_eq!(pending(&gw).len(), 2, "{}", gw.log());
}

#[actix_rt::test]
async fn a_rejected_reload_still_suggests_the_key_that_was_meant() {
    let m = Mock::always(Reply::chat("ok"));
    let gw = Gateway::start(&config("", &[upstream("u", &m.endpoint(), "")]));
    std::fs::write(
        &gw.config_path,
        config(
            "",
            &["  - name: u\n    endpont: http://127.0.0.1:9/v1\n".to_string()],
        ),
    )
    .unwrap();
    gw.signal("HUP");
    assert!(eventually(Duration::from_secs(3), || gw
        .log()
        .contains("config not reloaded")));
    let log = gw.log();
    assert!(
        log.contains("upstreams[0].endpont: unknown key, ignored (did you mean `endpoint`?)"),
        "{log}"
    );
    assert!(log.contains("upstreams[0].endpoint: missing"), "{log}");
    assert_eq!(
        post(&gw, "/v1/chat/completions", chat_body(false))
            .await
            .status,
        200
    );
}
