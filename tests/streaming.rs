//! Streaming: chunks are relayed as they arrive, byte for byte; broken and stalled streams end
//! with an SSE error event; a client that leaves cancels the upstream request.

use std::time::Duration;

use crate::support::*;

fn sse_chunks(n: usize, gap: Duration, ending: Ending) -> (Reply, Vec<u8>) {
    let mut chunks: Vec<(Duration, Vec<u8>)> = (0..n)
        .map(|i| {
            let ev = serde_json::json!({"choices": [{"delta": {"content": format!("w{i} ")}}]});
            (
                if i == 0 { Duration::ZERO } else { gap },
                format!("data: {ev}\n\n").into_bytes(),
            )
        })
        .collect();
    if matches!(ending, Ending::Finish) {
        // A whole chat stream ends with `[DONE]` (see the rescue guide, "Truthful ends (0.3)");
        // without it, it is broken.
        chunks.push((Duration::ZERO, b"data: [DONE]\n\n".to_vec()));
    }
    let all = chunks.iter().flat_map(|(_, c)| c.clone()).collect();
    (
        Reply::Chunks {
            status: 200,
            headers: vec![
                ("content-type".into(), "text/event-stream".into()),
                ("x-request-id".into(), "req-42".into()),
            ],
            chunks,
            ending,
        },
        all,
    )
}

#[actix_rt::test]
async fn sse_chunks_arrive_incrementally_and_byte_identical() {
    let gap = Duration::from_millis(120);
    let (reply, expected) = sse_chunks(6, gap, Ending::Finish);
    let m = Mock::always(reply);
    let gw = one(&m, "");
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, expected, "relayed bytes differ");
    assert!(got.error.is_none());
    assert_eq!(got.header("content-type"), Some("text/event-stream"));
    assert_eq!(got.header("x-accel-buffering"), Some("no"));
    assert_eq!(got.header("x-request-id"), Some("req-42"));
    // Each event reaches the client on its own, about `gap` after the previous one.
    let times: Vec<Duration> = got.chunk_times.iter().map(|(t, _)| *t).collect();
    assert!(
        times.len() >= 6,
        "expected separate chunks, got {}",
        times.len()
    );
    for w in times.windows(2).take(5) {
        let d = w[1] - w[0];
        assert!(
            d >= Duration::from_millis(80),
            "chunks bunched together: {times:?}"
        );
    }
    let total = *times.last().unwrap() - times[0];
    assert!(
        total >= gap * 5 - Duration::from_millis(50),
        "stream was buffered: {times:?}"
    );
}

#[actix_rt::test]
async fn upstream_drop_mid_stream_ends_with_an_sse_error_event() {
    let (reply, sent) = sse_chunks(3, Duration::from_millis(20), Ending::Drop);
    let m = Mock::always(reply);
    let gw = one(&m, "");
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    assert_eq!(got.status, 200);
    let text = got.text();
    assert!(
        text.starts_with(std::str::from_utf8(&sent).unwrap()),
        "{text}"
    );
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let ev: serde_json::Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(ev["error"]["type"], "upstream_error", "{text}");
    let rows = gw.records(1);
    assert!(
        rows[0]["error"]
            .as_str()
            .unwrap()
            .contains("up: connection closed before the response was complete"),
        "{:?}",
        rows[0]
    );
    assert_eq!(rows[0]["response"], "w0 w1 w2 ");
}

#[actix_rt::test]
async fn stall_past_idle_timeout_ends_with_an_sse_error_event() {
    let (reply, _) = sse_chunks(2, Duration::from_millis(10), Ending::Stall);
    let m = Mock::always(reply);
    let gw = one(&m, "idle_timeout: 0.5");
    let t = std::time::Instant::now();
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(
        got.text().contains("\"type\":\"upstream_error\""),
        "{}",
        got.text()
    );
    assert!(got.text().contains("idle_timeout"));
    // The stalled upstream connection is closed.
    assert!(eventually(Duration::from_secs(2), || *m
        .peer_gone
        .lock()
        .unwrap()
        == 1));
    let rows = gw.records(1);
    assert!(rows[0]["error"]
        .as_str()
        .unwrap()
        .contains("no data for 0.5s"));
}

#[actix_rt::test]
async fn partial_sse_event_is_closed_before_the_error_event() {
    let m = Mock::always(Reply::Chunks {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        chunks: vec![(
            Duration::ZERO,
            b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\ndata: {\"cho".to_vec(),
        )],
        ending: Ending::Drop,
    });
    let gw = one(&m, "");
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    let text = got.text();
    assert!(text.contains("data: {\"cho\n\ndata: {\"error\""), "{text}");
    assert!(text.ends_with("\n\n"));
}

#[actix_rt::test]
async fn non_sse_body_cut_short_is_not_a_silent_success() {
    let m = Mock::always(Reply::Chunks {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        chunks: vec![(Duration::ZERO, b"{\"choices\":[".to_vec())],
        ending: Ending::Drop,
    });
    let gw = one(&m, "");
    // awc (like many clients) cannot tell a cut chunked body from a complete one, so look at
    // the wire: the gateway must close without the final zero-length chunk.
    let body = chat_body(false).to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let wire = String::from_utf8_lossy(&raw_exchange(
        &gw.addr,
        req.as_bytes(),
        Duration::from_secs(5),
    ))
    .to_string();
    // Either nothing at all (the head and the failing body were due in the same write) or a
    // 200 whose chunked body never gets its terminator: never a complete-looking answer.
    if !wire.is_empty() {
        assert!(wire.starts_with("HTTP/1.1 200"), "{wire}");
        assert!(
            !wire.ends_with("0\r\n\r\n"),
            "cut body was terminated like a complete one: {wire:?}"
        );
    }
    let rows = gw.records(1);
    assert!(rows[0]["error"]
        .as_str()
        .unwrap()
        .contains("connection closed before the response was complete"));
}

#[actix_rt::test]
async fn client_disconnect_cancels_the_upstream_request() {
    use futures_util::StreamExt;
    let (reply, _) = sse_chunks(100, Duration::from_millis(50), Ending::Finish);
    let m = Mock::always(reply);
    let gw = one(&m, "");
    let client = awc::Client::default();
    let mut resp = client
        .post(gw.url("/v1/chat/completions"))
        .insert_header(("authorization", format!("Bearer {TOKEN}")))
        .send_body(chat_body(true).to_string())
        .await
        .unwrap();
    let mut got = 0;
    while got < 2 {
        if let Some(Ok(_)) = resp.next().await {
            got += 1;
        }
    }
    drop(resp);
    drop(client);
    assert!(
        eventually(Duration::from_secs(3), || *m.peer_gone.lock().unwrap() == 1),
        "upstream still streaming after the client left"
    );
    let rows = gw.records(1);
    let response = rows[0]["response"].as_str().unwrap();
    assert!(
        response.starts_with("w0 w1 "),
        "partial reply kept: {response:?}"
    );
    assert!(!response.contains("w99"));
}

/// An upstream that ends its SSE events with a single newline is still judged by its first
/// event (a whole `data:` line) and committed to at once, not waited on until `stream_timeout`.
#[actix_rt::test]
async fn single_newline_sse_is_committed_without_waiting_for_a_blank_line() {
    let line = |t: &str| {
        format!(
            "data: {}\n",
            serde_json::json!({"choices": [{"delta": {"content": t}}]})
        )
        .into_bytes()
    };
    let sloppy = Mock::always(Reply::Chunks {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        chunks: vec![
            (Duration::ZERO, line("one ")),
            (Duration::from_millis(1500), line("two")),
            (Duration::ZERO, b"data: [DONE]\n".to_vec()),
        ],
        ending: Ending::Finish,
    });
    let other = Mock::always(Reply::sse_chat(&["other"], Duration::ZERO));
    let gw = Gateway::start(&config(
        "stream_timeout: 1",
        &[
            upstream("sloppy", &sloppy.endpoint(), ""),
            upstream("other", &other.endpoint(), ""),
        ],
    ));
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-upstream"), Some("sloppy"), "{}", got.text());
    assert!(
        got.text().starts_with("data: {\"choices\""),
        "{}",
        got.text()
    );
    assert!(got.text().ends_with("data: [DONE]\n"), "{}", got.text());
    assert_eq!(other.hits(), 0);
}
