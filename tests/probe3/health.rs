//! Which failures count for an upstream's health (the rescue guide, "Which failures count
//! (0.4)"), what the status page shows of an upstream's error (the observability guide, "Status
//! page"), and the waits for a first chunk: `model_timeouts` and SSE comments (the rescue guide,
//! "Slow thinkers: `model_timeouts` (0.4)").

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::json;

use super::{healthy, outcome};
use crate::rescue::{
    chat_parts, chat_stream, content, ends_with_done, finish, role, sse, start, text, up, QUIET,
};
use crate::support::*;

/// An alert sink that takes everything (`notify.feishu`), and the config key that names it.
fn alert_sink() -> (Mock, String) {
    let sink = Mock::always(Reply::json(200, json!({"code": 0})));
    let key = format!(
        "notify: {{min_interval: 0, feishu: {{webhook: \"http://{}/hook\"}}}}\n",
        sink.addr
    );
    (sink, key)
}

/// The texts of the alerts `sink` received.
fn alerts(sink: &Mock) -> Vec<String> {
    sink.seen()
        .iter()
        .map(|s| {
            s.json()["content"]["text"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

/// Issue 32: three parallel requests naming a model only the fallback serves got 404 from the
/// primary and put it in cooldown, so for 30 s no other client's request went there. A 404 or
/// 409 is about the request: it moves on, is counted as `http_error`, and nothing else.
#[actix_rt::test]
async fn requests_the_primary_rightly_refuses_keep_it_first_for_everyone() {
    for (status, code) in [(404, "model_not_found"), (409, "conflict")] {
        let refusal = json!({"error": {"message": format!("refused: {code}"),
            "type": "invalid_request_error", "param": null, "code": code}});
        let primary = Mock::script(move |seen, _| match seen.json()["model"].as_str() {
            Some("only-on-fallback") => Reply::json(status, refusal.clone()),
            Some("boom") => Reply::status(500),
            _ => Reply::chat("from the primary"),
        });
        let fallback = Mock::script(|seen, _| match seen.json()["model"].as_str() {
            Some("boom") => Reply::status(500),
            _ => Reply::chat("from the fallback"),
        });
        let (sink, notify) = alert_sink();
        // Default cooldown: 3 failures, 30 s.
        let gw = start(
            &notify,
            &[up("primary", &primary, ""), up("fallback", &fallback, "")],
        );
        let only =
            json!({"model": "only-on-fallback", "messages": [{"role": "user", "content": "hi"}]});
        let answers =
            join_all((0..3).map(|_| post(&gw, "/v1/chat/completions", only.clone()))).await;
        for got in &answers {
            assert_eq!(got.status, 200, "{status}: {}", got.text());
            assert_eq!(got.header("x-upstream"), Some("fallback"), "{status}");
            assert_eq!(got.header("x-upstream-attempts"), Some("2"), "{status}");
        }
        // Another client's requests still go to the primary first.
        for i in 0..5 {
            let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
            assert_eq!(
                got.header("x-upstream"),
                Some("primary"),
                "{status}, request {i}"
            );
            assert_eq!(
                got.header("x-upstream-attempts"),
                Some("1"),
                "{status}, request {i}"
            );
        }
        let m = scrape(&gw).await;
        assert_eq!(healthy(&m, "primary"), 1.0, "{status}\n{m}");
        assert_eq!(outcome(&m, "primary", "http_error"), 3.0, "{status}\n{m}");
        assert_eq!(outcome(&m, "primary", "ok"), 5.0, "{status}\n{m}");
        // No cooldown alert: a request that fails everywhere raises the only alert there is.
        let boom = json!({"model": "boom", "messages": []});
        assert_eq!(post(&gw, "/v1/chat/completions", boom).await.status, 500);
        assert!(eventually(Duration::from_secs(5), || sink.hits() >= 1));
        let texts = alerts(&sink);
        assert!(
            texts.iter().any(|t| t.contains("boom")),
            "{status}: {texts:?}"
        );
        assert!(
            texts.iter().all(|t| !t.contains("cooling down")),
            "{status}: {texts:?}"
        );
    }
}

/// A 404 `model_not_found` that names `who`, with a header of its own.
fn not_found(who: &str) -> Reply {
    let body = json!({"error": {"message": format!("{who} has no such model"),
        "code": "model_not_found"}});
    Reply::Full {
        status: 404,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("x-served-by".into(), who.into()),
        ],
        body: body.to_string().into_bytes(),
    }
}

/// A last candidate's 404 is relayed as the upstream sent it, and even with `cooldown.failures:
/// 1` it costs the upstream nothing.
#[actix_rt::test]
async fn a_last_candidates_404_is_relayed_as_sent_and_costs_nothing() {
    let (p, f) = (not_found("primary"), not_found("fallback"));
    let primary = Mock::script(move |seen, _| match seen.json()["model"].as_str() {
        Some("nowhere") => p.clone(),
        _ => Reply::chat("from the primary"),
    });
    let fallback = Mock::script(move |seen, _| match seen.json()["model"].as_str() {
        Some("nowhere") => f.clone(),
        _ => Reply::chat("from the fallback"),
    });
    let gw = start(
        "cooldown: {failures: 1, seconds: 60}\n",
        &[up("primary", &primary, ""), up("fallback", &fallback, "")],
    );
    let nowhere = json!({"model": "nowhere", "messages": []});
    for i in 0..3 {
        let got = post(&gw, "/v1/chat/completions", nowhere.clone()).await;
        assert_eq!(got.status, 404, "{i}");
        let sent =
            json!({"error": {"message": "fallback has no such model", "code": "model_not_found"}});
        assert_eq!(got.text(), sent.to_string(), "relayed as sent");
        assert_eq!(got.header("x-served-by"), Some("fallback"));
        assert_eq!(got.header("x-upstream"), Some("fallback"));
        assert_eq!(got.header("x-upstream-attempts"), Some("2"));
        assert_eq!(got.header("x-should-retry"), Some("false"));
    }
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("primary"));
    let m = scrape(&gw).await;
    for name in ["primary", "fallback"] {
        assert_eq!(healthy(&m, name), 1.0, "{name}\n{m}");
        assert_eq!(outcome(&m, name, "http_error"), 3.0, "{name}\n{m}");
    }
    let rows = gw.records(4);
    assert!(rows[..3]
        .iter()
        .all(|r| r["status"] == 404 && r["upstream"] == "fallback"));
}

/// Issue 32: an upstream error that echoes the prompt put it on the public status page. The
/// page shows the gateway's own description of each failure (`HTTP 500`, `in-band error
/// event`); the upstream's text stays in the record.
#[actix_rt::test]
async fn upstream_text_in_an_error_never_reaches_the_status_page() {
    let echo = Mock::always(Reply::json(
        500,
        json!({"error": {"message": "cannot answer 'SECRET-PROMPT-500'", "type": "server_error"}}),
    ));
    let first = Mock::always(sse(
        vec![b"data: {\"error\":{\"message\":\"SECRET-PROMPT-FIRST\"}}\n\n".to_vec()],
        Ending::Finish,
    ));
    let mut midway = chat_parts("m", &["Hello"], false);
    midway.push(b"data: {\"error\":{\"message\":\"SECRET-PROMPT-MID\"}}\n\n".to_vec());
    let midway = Mock::always(sse(midway, Ending::Finish));
    let rescuer = Mock::always(chat_stream("r", &[", world"]));
    let gw = start(
        &format!("{QUIET}resume: true\n"),
        &[
            up("echo", &echo, "allow: [m-echo]"),
            up("first", &first, "allow: [m-first]"),
            up("midway", &midway, "allow: [m-mid]"),
            up("rescuer", &rescuer, "allow: [m-mid]"),
        ],
    );
    let ask = |model: &str, stream: bool| json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "SECRET-PROMPT"}]});
    assert_eq!(
        post(&gw, "/v1/chat/completions", ask("m-echo", false))
            .await
            .status,
        500
    );
    assert_eq!(
        post(&gw, "/v1/chat/completions", ask("m-first", true))
            .await
            .status,
        502
    );
    let mid = post(&gw, "/v1/chat/completions", ask("m-mid", true)).await;
    assert_eq!(content(&mid.text()), "Hello, world", "{}", mid.text());
    let rows = gw.records(3);
    let errors: Vec<&str> = rows.iter().filter_map(|r| r["error"].as_str()).collect();
    assert_eq!(errors.len(), 3, "{rows:#?}");
    let page = send("GET", &gw.url("/"), &[], b"").await;
    let html = page.text();
    assert_eq!(page.status, 200);
    assert!(
        !html.contains("SECRET-PROMPT"),
        "upstream text on the status page"
    );
    assert!(
        html.contains("HTTP 500"),
        "the gateway's own words for the 500"
    );
    assert!(
        html.contains("in-band error event"),
        "…and for the in-band errors"
    );
}

/// A stream whose first chunk comes after `delay` (the head at once).
fn slow_first_chunk(id: &str, delay: Duration, words: &[&str]) -> Reply {
    let mut chunks = vec![(delay, role(id))];
    chunks.extend(words.iter().map(|w| (Duration::ZERO, text(id, w))));
    chunks.extend(finish(id).into_iter().map(|p| (Duration::ZERO, p)));
    Reply::sse_chunks(chunks)
}

/// Issue 32: a reasoning model whose first chunk came after its reasoning was abandoned at the
/// default `stream_timeout` and billed twice. A `model_timeouts` entry waits for it; a model it
/// does not match keeps the global wait (here 1 s for a 2 s first chunk, to keep the test fast).
#[actix_rt::test]
async fn a_slow_thinker_is_waited_for_by_its_model_timeout() {
    let slow = Mock::always(slow_first_chunk(
        "a",
        Duration::from_secs(2),
        &["Thought it over"],
    ));
    let quick = Mock::always(chat_stream("b", &["Quick"]));
    let gw = start(
        &format!("{QUIET}stream_timeout: 1\nmodel_timeouts: {{\"o*\": {{stream_timeout: 10}}}}\n"),
        &[up("slow", &slow, ""), up("quick", &quick, "")],
    );
    let ask = |model: &str| json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "think"}]});
    let got = post(&gw, "/v1/chat/completions", ask("o3-mini")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-upstream"), Some("slow"), "{}", got.text());
    assert_eq!(got.header("x-upstream-attempts"), Some("1"));
    assert_eq!(content(&got.text()), "Thought it over");
    assert_eq!(quick.hits(), 0, "billed once");
    // The same upstream for a model no entry matches: abandoned after the global 1 s.
    let got = post(&gw, "/v1/chat/completions", ask("gpt-test")).await;
    assert_eq!(got.header("x-upstream"), Some("quick"));
    assert_eq!(got.header("x-upstream-attempts"), Some("2"));
    let rows = gw.records(2);
    assert_eq!(rows[0]["attempts"], 1, "{:?}", rows[0]);
    assert_eq!(rows[0]["error"], serde_json::Value::Null);
    assert_eq!(rows[0]["complete"], 1);
    assert!(rows[1]["error"]
        .as_str()
        .unwrap_or("")
        .contains("slow: no first chunk within 1s"));
}

/// `: keep-alive` comments `gap` apart, `n` of them.
fn comments(n: usize, gap: Duration) -> Vec<(Duration, Vec<u8>)> {
    (0..n)
        .map(|_| (gap, b": keep-alive\n\n".to_vec()))
        .collect()
}

/// A comment is a sign of life, not an answer: comments for longer than `stream_timeout`
/// before the first event fail the attempt over; comments keep a started stream alive past
/// `idle_timeout`. (0.3 already did both; 0.4 writes the rule down with `model_timeouts`, and
/// this test keeps it now that one SSE reader frames every stream.)
#[actix_rt::test]
async fn an_sse_comment_is_a_sign_of_life_but_not_a_first_chunk() {
    let gap = Duration::from_millis(300);
    // Comments only, for 2.1 s, then the answer: too late for `stream_timeout: 1`.
    let mut chunks = comments(7, gap);
    chunks.extend(
        chat_parts("a", &["Late"], true)
            .into_iter()
            .map(|p| (Duration::ZERO, p)),
    );
    let chatty = Mock::always(Reply::sse_chunks(chunks));
    let quick = Mock::always(chat_stream("b", &["Quick"]));
    let gw = start(
        &format!("{QUIET}stream_timeout: 1\nidle_timeout: 1\n"),
        &[up("chatty", &chatty, ""), up("quick", &quick, "")],
    );
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    assert_eq!(got.header("x-upstream"), Some("quick"), "{}", got.text());
    assert_eq!(content(&got.text()), "Quick");
    let rows = gw.records(1);
    assert!(
        rows[0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("chatty: no first chunk within 1s"),
        "{:?}",
        rows[0]
    );

    // Started, then comments for 2.1 s with `idle_timeout: 1`, then the rest: not cut.
    let mut chunks: Vec<(Duration, Vec<u8>)> = chat_parts("a", &["Hello"], false)
        .into_iter()
        .map(|p| (Duration::ZERO, p))
        .collect();
    chunks.extend(comments(7, gap));
    chunks.push((Duration::ZERO, text("a", ", world")));
    chunks.extend(finish("a").into_iter().map(|p| (Duration::ZERO, p)));
    let thinking = Mock::always(Reply::sse_chunks(chunks));
    let gw = start(
        &format!("{QUIET}stream_timeout: 1\nidle_timeout: 1\n"),
        &[up("thinking", &thinking, "")],
    );
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    let body = got.text();
    assert_eq!(content(&body), "Hello, world", "{body}");
    assert!(ends_with_done(&body), "{body}");
    let rows = gw.records(1);
    assert_eq!(rows[0]["complete"], 1, "{:?}", rows[0]);
    assert_eq!(rows[0]["error"], serde_json::Value::Null);
}
