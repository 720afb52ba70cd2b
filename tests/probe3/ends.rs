//! Where a stream ends (the rescue guide, "Truthful ends"): every choice must end, nothing after
//! the end is relayed or recorded, a restart is found whatever its leading spaces, a client that
//! leaves right at the end got it whole, and an `event: error` is an error to every reader.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::{json, Value};

use super::outcome;
use crate::rescue::{
    chat_parts, chat_stream, content, continuing, ends_with_done, ends_with_error_event,
    is_prefill, sse, start, stream_body, sum, text, up, QUIET, RESUMES,
};
use crate::support::*;

/// Short timers and `resume: true`.
const RESUMING: &str = "stream_timeout: 2\nidle_timeout: 2\nresume: true\n";

/// A chat chunk of choice `index`.
fn choice(index: u32, content: &str, finish: Value) -> Vec<u8> {
    let ev = json!({"id": "chatcmpl-n", "object": "chat.completion.chunk", "model": "m",
        "choices": [{"index": index, "delta": {"content": content}, "finish_reason": finish}]});
    format!("data: {ev}\n\n").into_bytes()
}

/// Issue 32: with `n: 2`, a `finish_reason` on choice 1 only and then a clean close without
/// `[DONE]` was recorded whole, with choice 0 cut. Every choice the stream carried must end.
#[actix_rt::test]
async fn a_stream_is_whole_only_when_every_choice_has_ended() {
    let parts = vec![
        choice(0, "Hel", Value::Null),
        choice(1, "Hi", Value::Null),
        choice(0, "lo", Value::Null),
        choice(1, "!", Value::Null),
        choice(1, "", json!("stop")),
    ];
    let m = Mock::always(sse(parts.clone(), Ending::Finish));
    let gw = start(QUIET, &[up("a", &m, "")]);
    let mut body = stream_body();
    body["n"] = json!(2);
    let got = post(&gw, "/v1/chat/completions", body).await;
    let text = got.text();
    assert!(got.body.starts_with(&parts.concat()), "{text}");
    assert!(ends_with_error_event(&text), "{text}");
    assert!(text.contains("ended before [DONE]"), "{text}");
    let rows = gw.records(1);
    assert_eq!(rows[0]["complete"], 0, "{:?}", rows[0]);
    assert!(rows[0]["error"]
        .as_str()
        .unwrap_or("")
        .contains("a: ended before [DONE]"));
    let m = scrape_until(&gw, Duration::from_secs(2), |m| {
        outcome(m, "a", "stream_error") >= 1.0
    })
    .await;
    assert_eq!(outcome(&m, "a", "stream_error"), 1.0, "{m}");
}

/// An SSE reply of `events`, then (in the same chunk, or `later` in another) `after`.
fn with_after(events: Vec<Vec<u8>>, after: &[u8], later: Option<Duration>) -> Reply {
    let mut chunks: Vec<(Duration, Vec<u8>)> =
        events.into_iter().map(|e| (Duration::ZERO, e)).collect();
    match later {
        Some(d) => chunks.push((d, after.to_vec())),
        None => chunks.last_mut().unwrap().1.extend_from_slice(after),
    }
    Reply::sse_chunks(chunks)
}

/// Issue 32: content after `[DONE]` was relayed and recorded. Nothing after a chat stream's
/// `[DONE]` or a Responses stream's terminal event is relayed or recorded, whether it comes in
/// the same chunk as the end or later.
#[actix_rt::test]
async fn nothing_after_the_end_is_relayed_or_recorded() {
    let injected = [text("a", " INJECTED"), b"data: [DONE]\n\n".to_vec()].concat();
    for later in [None, Some(Duration::from_millis(100))] {
        let events = chat_parts("a", &["Hello"], true);
        let m = Mock::always(with_after(events.clone(), &injected, later));
        let gw = start(QUIET, &[up("a", &m, "")]);
        let got = post(&gw, "/v1/chat/completions", stream_body()).await;
        assert_eq!(
            got.text(),
            String::from_utf8(events.concat()).unwrap(),
            "{later:?}"
        );
        let rows = gw.records(1);
        assert_eq!(rows[0]["response"], "Hello", "{later:?}");
        assert_eq!(rows[0]["complete"], 1, "{later:?}");
    }
    let delta = |t: &str| {
        let ev = json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
            "content_index": 0, "delta": t});
        format!("event: response.output_text.delta\ndata: {ev}\n\n").into_bytes()
    };
    let completed = b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\"usage\":{\"input_tokens\":2,\"output_tokens\":1,\"total_tokens\":3}}}\n\n".to_vec();
    for later in [None, Some(Duration::from_millis(100))] {
        let events = vec![delta("Hi"), completed.clone()];
        let m = Mock::always(with_after(events.clone(), &delta(" INJECTED"), later));
        let gw = start(QUIET, &[up("a", &m, "")]);
        let body = json!({"model": "gpt-test", "stream": true, "input": "hi"});
        let got = post(&gw, "/v1/responses", body).await;
        assert_eq!(
            got.text(),
            String::from_utf8(events.concat()).unwrap(),
            "{later:?}"
        );
        let rows = gw.records(1);
        assert_eq!(rows[0]["complete"], 1, "{later:?}");
        let recorded = rows[0]["response"].as_str().unwrap_or("");
        assert!(!recorded.contains("INJECTED"), "{later:?}: {recorded}");
    }
}

/// Issue 32: a regeneration that starts with two spaces was not seen as a restart, and the
/// client got "The capital  The capital of France…". Leading whitespace is skipped on both
/// sides: the client gets the text once.
#[actix_rt::test]
async fn a_restart_with_leading_spaces_is_a_restart() {
    let first = Mock::always(sse(
        chat_parts("a", &["The", " capital"], false),
        Ending::Drop,
    ));
    let second = Mock::always(chat_stream(
        "b",
        &["  The capital", " of France", " is Paris."],
    ));
    let gw = start(
        &format!("{QUIET}{RESUMING}"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    let body = got.text();
    assert_eq!(content(&body), "The capital of France is Paris.", "{body}");
    assert!(ends_with_done(&body), "{body}");
    assert!(!body.contains("\"error\""), "{body}");
    assert!(is_prefill(&second.seen()[0]), "it was asked to continue");
    let rows = gw.records(1);
    assert_eq!(rows[0]["response"], "The capital of France is Paris.");
    assert_eq!(rows[0]["complete"], 1);
    assert_eq!(rows[0]["resumed"], 1);
    let m = scrape_until(&gw, Duration::from_secs(2), |m| {
        sum(m, RESUMES, "result", "restarted") >= 1.0
    })
    .await;
    assert_eq!(sum(&m, RESUMES, "result", "restarted"), 1.0, "{m}");
}

/// Sends a stream request on a raw socket, reads until `data: [DONE]\n\n` and closes at once,
/// as the SDKs do; returns what it read.
fn read_to_done_and_leave(addr: &str) -> String {
    let body = chat_body(true).to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(14).any(|w| w == b"data: [DONE]\n\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Issue 32: 3 of 60 concurrent chat streams that the client received whole were recorded
/// `complete = 0` (the SDK closes right after `[DONE]`). Here the upstream ends its body only
/// a second after `[DONE]`, so every client is gone before it does: all 60 are whole.
#[test]
fn sixty_streams_read_to_done_are_recorded_whole() {
    let mut chunks: Vec<(Duration, Vec<u8>)> = chat_parts("a", &["Hello", " world"], true)
        .into_iter()
        .map(|p| (Duration::ZERO, p))
        .collect();
    chunks[1].0 = Duration::from_millis(50);
    let m = Mock::always(Reply::Chunks {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        chunks,
        ending: Ending::FinishAfter(Duration::from_secs(1)),
    });
    let gw = Gateway::start(&config("", &[upstream("a", &m.endpoint(), "")]));
    let clients: Vec<_> = (0..60)
        .map(|_| {
            let addr = gw.addr.clone();
            std::thread::spawn(move || read_to_done_and_leave(&addr))
        })
        .collect();
    for c in clients {
        let got = c.join().unwrap();
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(
            got.contains("\"Hello\"") && got.contains("\" world\""),
            "{got}"
        );
        assert!(got.contains("data: [DONE]\n\n"), "{got}");
    }
    let rows = gw.records(60);
    let cut: Vec<&Value> = rows.iter().filter(|r| r["complete"] != 1).collect();
    assert!(cut.is_empty(), "{} of 60 recorded cut: {cut:#?}", cut.len());
    assert!(rows.iter().all(|r| r["response"] == "Hello world"));
}

/// `event: error` with a payload that has no `error` key (as some upstreams send).
fn named_error_event() -> Vec<u8> {
    b"event: error\ndata: {\"message\":\"overloaded mid-stream\"}\n\n".to_vec()
}

/// Issue 31: `event: error` + `data: {"message": …}` broke the stream for one reader and was
/// recorded `complete` by another. Mid-stream it is an in-band error to every reader: the client
/// gets the gateway's SSE error event and the record is cut and names it, however the upstream
/// goes on; as the first event it fails the attempt over unseen; with `resume` it is continued.
#[actix_rt::test]
async fn an_error_event_is_an_error_to_every_reader() {
    // Read as it comes (`force_usage: false`) and held event by event (the usage filter).
    let cases = [
        ("close", QUIET, false),
        ("[DONE]", QUIET, true),
        ("close, usage filter", "force_usage: true\n", false),
        ("[DONE], usage filter", "force_usage: true\n", true),
    ];
    for (case, global, done) in cases {
        let mut parts = chat_parts("a", &["Hello"], false);
        parts.push(named_error_event());
        if done {
            parts.push(b"data: [DONE]\n\n".to_vec());
        }
        let m = Mock::always(sse(parts, Ending::Finish));
        let gw = start(global, &[up("a", &m, "")]);
        let got = post(&gw, "/v1/chat/completions", stream_body()).await;
        let body = got.text();
        assert_eq!(content(&body), "Hello", "{case}: {body}");
        assert!(ends_with_error_event(&body), "{case}: {body}");
        let rows = gw.records(1);
        assert_eq!(rows[0]["complete"], 0, "{case}: {:?}", rows[0]);
        let error = rows[0]["error"].as_str().unwrap_or("");
        assert!(
            error.contains("a: ") && error.contains("in-band error"),
            "{case}: {:?}",
            rows[0]
        );
        let m = scrape_until(&gw, Duration::from_secs(2), |m| {
            outcome(m, "a", "stream_error") >= 1.0
        })
        .await;
        assert_eq!(outcome(&m, "a", "stream_error"), 1.0, "{case}\n{m}");
        assert_eq!(outcome(&m, "a", "ok"), 0.0, "{case}\n{m}");
    }

    // As the first event: the attempt failed, nothing of it is sent.
    let first = Mock::always(sse(vec![named_error_event()], Ending::Finish));
    let second = Mock::always(chat_stream("b", &["Hi"]));
    let gw = start(QUIET, &[up("first", &first, ""), up("second", &second, "")]);
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    assert_eq!(got.header("x-upstream"), Some("second"));
    assert_eq!(content(&got.text()), "Hi");
    assert!(!got.text().contains("overloaded"), "{}", got.text());

    // With `resume`: continued on the next candidate, and not relayed.
    let mut parts = chat_parts("a", &["Hello", ", wor"], false);
    parts.push(named_error_event());
    let first = Mock::always(sse(parts, Ending::Finish));
    let second = continuing("b");
    let gw = start(
        &format!("{QUIET}{RESUMING}"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    let body = got.text();
    assert_eq!(content(&body), "Hello, world!", "{body}");
    assert!(!body.contains("overloaded"), "{body}");
    let rows = gw.records(1);
    assert_eq!(rows[0]["complete"], 1, "{:?}", rows[0]);
    assert_eq!(rows[0]["resumed"], 1);
    assert!(rows[0]["error"]
        .as_str()
        .unwrap_or("")
        .contains("first: in-band error"));
}
