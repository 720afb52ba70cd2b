//! Resume (see the rescue guide, "When an upstream breaks a stream"): a chat stream broken
//! mid-answer continues on the next candidate within the same client stream, exactly.

use std::time::Duration;

use crate::support::*;

/// SSE chunks of a chat stream: a role chunk, then one chunk per piece of text.
fn chat_events(pieces: &[&str], done: bool) -> Vec<(Duration, Vec<u8>)> {
    let mut out = vec![(
        Duration::ZERO,
        format!(
            "data: {}\n\n",
            serde_json::json!({"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        )
        .into_bytes(),
    )];
    for p in pieces {
        out.push((
            Duration::from_millis(20),
            format!(
                "data: {}\n\n",
                serde_json::json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": p}}]})
            )
            .into_bytes(),
        ));
    }
    if done {
        out.push((
            Duration::ZERO,
            format!(
                "data: {}\n\n",
                serde_json::json!({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            )
            .into_bytes(),
        ));
        out.push((Duration::ZERO, b"data: [DONE]\n\n".to_vec()));
    }
    out
}

fn sse(chunks: Vec<(Duration, Vec<u8>)>, ending: Ending) -> Reply {
    Reply::Chunks {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        chunks,
        ending,
    }
}

/// The concatenated `delta.content` of a client's SSE body, and whether it ended with [DONE].
pub fn client_text(body: &[u8]) -> (String, bool) {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    let mut done = false;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            out.push_str(c);
        }
    }
    (out, done)
}

#[actix_rt::test]
async fn a_stream_cut_mid_answer_is_continued_by_prefill() {
    let a = Mock::always(sse(chat_events(&["Hel", "lo"], false), Ending::Drop));
    let b = Mock::script(|seen, _| {
        let body = seen.json();
        let last = body["messages"].as_array().and_then(|m| m.last()).cloned();
        if last.as_ref().map(|m| m["role"] == "assistant") == Some(true) {
            // The gateway asked for usage (force_usage): a usage-only chunk before [DONE].
            assert_eq!(body["stream_options"]["include_usage"], true);
            let mut events = chat_events(&[" wor", "ld!"], true);
            let usage = serde_json::json!({"id": "c2", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}});
            events.insert(
                events.len() - 1,
                (Duration::ZERO, format!("data: {usage}\n\n").into_bytes()),
            );
            sse(events, Ending::Finish)
        } else {
            sse(chat_events(&["Something else"], true), Ending::Finish)
        }
    });
    let gw = Gateway::start(&config(
        "resume: true\nstream_timeout: 2\nidle_timeout: 2",
        &[
            upstream("a", &a.endpoint(), ""),
            upstream("b", &b.endpoint(), "prefill: vllm"),
        ],
    ));
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    assert_eq!(got.status, 200);
    let (text, done) = client_text(&got.body);
    assert_eq!(text, "Hello world!", "{}", got.text());
    assert!(done, "{}", got.text());
    assert!(!got.text().contains("upstream_error"), "{}", got.text());
    let seen = b.seen();
    assert_eq!(seen.len(), 1);
    let body = seen[0].json();
    let last = body["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        last,
        serde_json::json!({"role": "assistant", "content": "Hello"})
    );
    assert_eq!(body["continue_final_message"], true);
    assert_eq!(body["add_generation_prompt"], false);
    // Exactly one role chunk reached the client.
    assert_eq!(got.text().matches("\"role\"").count(), 1, "{}", got.text());
    let rows = gw.records(1);
    assert_eq!(rows[0]["upstream"], "b");
    assert_eq!(rows[0]["response"], "Hello world!");
    assert_eq!(rows[0]["attempts"], 2);
    assert!(rows[0]["error"].as_str().unwrap().starts_with("a: "));
    assert_eq!(rows[0]["resumed"], 1);
    assert_eq!(rows[0]["complete"], 1);
    assert_eq!(rows[0]["finish_reason"], "stop");
    assert_eq!(rows[0]["prompt_tokens"], 9);
    assert_eq!(rows[0]["completion_tokens"], 2);
    assert!(
        !got.text().contains("usage"),
        "the added usage chunk reached the client"
    );
}

#[actix_rt::test]
async fn regeneration_relays_only_what_follows_and_refuses_a_divergent_one() {
    let a = Mock::always(sse(chat_events(&["Hel", "lo"], false), Ending::Drop));
    let b = Mock::always(sse(
        chat_events(&["He", "llo wor", "ld"], true),
        Ending::Finish,
    ));
    let gw = Gateway::start(&config(
        "resume: true\nstream_timeout: 2\nidle_timeout: 2",
        &[
            upstream("a", &a.endpoint(), ""),
            upstream("b", &b.endpoint(), "prefill: none"),
        ],
    ));
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    let (text, done) = client_text(&got.body);
    assert_eq!(text, "Hello world", "{}", got.text());
    assert!(done);
    let body = b.seen()[0].json();
    assert_eq!(body["messages"].as_array().unwrap().len(), 1, "no prefill");

    let c = Mock::always(sse(chat_events(&["Goodbye"], true), Ending::Finish));
    let gw = Gateway::start(&config(
        "resume: true\nstream_timeout: 2\nidle_timeout: 2",
        &[
            upstream("a", &a.endpoint(), ""),
            upstream("c", &c.endpoint(), "prefill: none"),
        ],
    ));
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    let (text, done) = client_text(&got.body);
    assert_eq!(text, "Hello");
    assert!(!done);
    assert!(got.text().contains("upstream_error"), "{}", got.text());
    let rows = gw.records(1);
    assert_eq!(rows[0]["complete"], 0);
    assert_eq!(rows[0]["resumed"], 1);
}

#[actix_rt::test]
async fn a_stream_that_cannot_be_read_event_by_event_is_relayed_as_it_comes() {
    // One 4 MiB `data:` line: no event ends, so it cannot be judged; it is relayed, not held.
    let total = 4 * 1024 * 1024;
    let a = Mock::always(Reply::SseLine {
        total,
        chunk: 64 * 1024,
    });
    let b = Mock::always(Reply::chat("unused"));
    let gw = Gateway::start(&config(
        "resume: true\nrecord_body_bytes: 1024",
        &[
            upstream("a", &a.endpoint(), ""),
            upstream("b", &b.endpoint(), ""),
        ],
    ));
    let before = gw.mem_kb("VmRSS");
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    assert_eq!(got.status, 200);
    assert!(got.body.len() > total, "{}", got.body.len());
    assert!(got.chunk_times.len() > 4, "held back and sent at once");
    let peak = gw.mem_kb("VmHWM");
    assert!(peak < before + 8 * 1024, "{before} kB → {peak} kB");
    assert_eq!(b.hits(), 0);
}
