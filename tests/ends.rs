//! Truthful ends (see the rescue guide, "Truthful ends (0.3)"): a stream is whole only at its
//! protocol's end; a continuation that starts over is read as a regeneration (never relayed twice);
//! answers given after every candidate was tried tell the SDK not to retry; the added usage chunk
//! stays hidden in every shape.
//!
//! Each test asserts what a user sees: the bytes the client got, headers, the record, metrics.

use std::time::Duration;

use serde_json::{json, Value};

use crate::rescue::{
    broken_stream, chat_parts, chat_stream, content, continuing, ends_with_done,
    ends_with_error_event, finish, is_prefill, role, sse, start, stream_body, sum, text, up, QUIET,
    REQUESTS, RESUMES,
};
use crate::support::*;

/// `upstream_requests_total` of `upstream` with `outcome` (0 when the series does not exist).
fn outcome(m: &Metrics, upstream: &str, outcome: &str) -> f64 {
    m.metric(REQUESTS)
        .label("upstream", upstream)
        .label("outcome", outcome)
        .value()
        .unwrap_or(0.0)
}

/// `resumes_total` of `upstream` with `result` (0 when the series does not exist).
fn resumes(m: &Metrics, upstream: &str, result: &str) -> f64 {
    m.metric(RESUMES)
        .label("upstream", upstream)
        .label("result", result)
        .value()
        .unwrap_or(0.0)
}

/// An SSE response of these exact events, sent at once (no gaps), ending with `ending`.
fn sse_now(parts: Vec<Vec<u8>>, ending: Ending) -> Reply {
    Reply::Chunks {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        chunks: parts.into_iter().map(|p| (Duration::ZERO, p)).collect(),
        ending,
    }
}

/// The finish chunk alone (no `[DONE]` after it).
fn finish_only(id: &str) -> Vec<u8> {
    finish(id).remove(0)
}

// ---------------------------------------------------------------------------------------------
// Protocol ends.

#[actix_rt::test]
async fn a_chat_stream_is_whole_only_at_done_or_a_final_finish_reason() {
    let early = chat_parts("a", &["Hello", ", wor"], false);
    let mut no_done = chat_parts("a", &["Hello", ", world"], false);
    no_done.push(finish_only("a"));
    let proper = chat_parts("a", &["Hello", ", world"], true);
    for (case, parts, whole) in [
        ("ends cleanly too early", early, false),
        ("finish_reason, no [DONE]", no_done, true),
        ("proper end", proper, true),
    ] {
        let m = Mock::always(sse(parts.clone(), Ending::Finish));
        let gw = start(QUIET, &[up("a", &m, "")]);
        let got = post(&gw, "/v1/chat/completions", stream_body()).await;
        let body = got.text();
        assert_eq!(got.status, 200, "{case}");
        let upstream_bytes = parts.concat();
        if whole {
            assert_eq!(got.body, upstream_bytes, "{case}: relayed verbatim");
        } else {
            assert!(got.body.starts_with(&upstream_bytes), "{case}: {body}");
            assert!(ends_with_error_event(&body), "{case}: {body}");
            assert!(body.contains("ended before [DONE]"), "{case}: {body}");
        }
        let rows = gw.records(1);
        assert_eq!(
            rows[0]["complete"],
            i64::from(whole),
            "{case}: {:?}",
            rows[0]
        );
        if !whole {
            assert!(
                rows[0]["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("a: ended before [DONE]"),
                "{case}: {:?}",
                rows[0]
            );
        }
        let m = scrape_until(&gw, Duration::from_secs(2), |m| {
            outcome(m, "a", "ok") + outcome(m, "a", "stream_error") >= 1.0
        })
        .await;
        let (ok, broken) = if whole { (1.0, 0.0) } else { (0.0, 1.0) };
        assert_eq!(outcome(&m, "a", "stream_error"), broken, "{case}\n{m}");
        assert_eq!(outcome(&m, "a", "ok"), ok, "{case}\n{m}");
    }
}

#[actix_rt::test]
async fn a_stream_that_ends_too_early_is_resumed() {
    let first = Mock::always(broken_stream("a", &["Hello", ", wor"], Ending::Finish));
    let second = continuing("b");
    let gw = start(
        &format!("{QUIET}stream_timeout: 2\nidle_timeout: 2\nresume: true\n"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    let body = got.text();
    assert_eq!(content(&body), "Hello, world!", "{body}");
    assert!(ends_with_done(&body), "{body}");
    assert!(!body.contains("\"error\""), "{body}");
    let rows = gw.records(1);
    assert_eq!(rows[0]["complete"], 1, "{:?}", rows[0]);
    assert_eq!(rows[0]["resumed"], 1, "{:?}", rows[0]);
    assert_eq!(rows[0]["upstream"], "second");
    assert!(
        rows[0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("first: ended before [DONE]"),
        "{:?}",
        rows[0]
    );
    let m = scrape(&gw).await;
    assert_eq!(outcome(&m, "first", "stream_error"), 1.0, "{m}");
    assert_eq!(outcome(&m, "first", "ok"), 0.0, "{m}");

    // A finish_reason without [DONE] is a whole answer: nothing to resume.
    let mut parts = chat_parts("a", &["Hello", ", world"], false);
    parts.push(finish_only("a"));
    let first = Mock::always(sse(parts.clone(), Ending::Finish));
    let second = Mock::always(chat_stream("b", &["UNEXPECTED REQUEST"]));
    let gw = start(
        &format!("{QUIET}stream_timeout: 2\nidle_timeout: 2\nresume: true\n"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    assert_eq!(got.body, parts.concat(), "{}", got.text());
    assert_eq!(second.hits(), 0);
    let rows = gw.records(1);
    assert_eq!(rows[0]["complete"], 1, "{:?}", rows[0]);
    assert_eq!(rows[0]["resumed"], 0);
}

#[actix_rt::test]
async fn completions_and_responses_streams_are_judged_by_their_own_ends() {
    let completion = |t: &str, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": t, "logprobs": null, "finish_reason": finish}]})
        )
        .into_bytes()
    };
    let delta = b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n".to_vec();
    let completed = b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"status\":\"completed\",\"usage\":{\"input_tokens\":2,\"output_tokens\":1}}}\n\n".to_vec();
    let cases: Vec<(&str, Vec<Vec<u8>>, bool)> = vec![
        (
            "/v1/completions",
            vec![completion("Hi", Value::Null)],
            false,
        ),
        (
            "/v1/completions",
            vec![
                completion("Hi", Value::Null),
                completion("!", json!("stop")),
            ],
            true,
        ),
        ("/v1/responses", vec![delta.clone()], false),
        ("/v1/responses", vec![delta.clone(), completed], true),
        // Other paths keep the failover rules' behaviour: a clean end is an end.
        ("/v1/other/stream", vec![delta], true),
    ];
    for (path, parts, whole) in cases {
        let m = Mock::always(sse(parts.clone(), Ending::Finish));
        let gw = start(QUIET, &[up("a", &m, "")]);
        let body = json!({"model": "gpt-test", "stream": true, "prompt": "hi", "input": "hi"});
        let got = post(&gw, path, body).await;
        assert_eq!(got.status, 200);
        if whole {
            assert_eq!(got.body, parts.concat(), "{path}: {}", got.text());
        } else {
            assert!(got.body.starts_with(&parts.concat()), "{path}");
            assert!(ends_with_error_event(&got.text()), "{path}: {}", got.text());
        }
        let rows = gw.records(1);
        assert_eq!(
            rows[0]["complete"],
            i64::from(whole),
            "{path}: {:?}",
            rows[0]
        );
        let m = scrape_until(&gw, Duration::from_secs(2), |m| {
            outcome(m, "a", "ok") + outcome(m, "a", "stream_error") >= 1.0
        })
        .await;
        assert_eq!(
            outcome(&m, "a", "stream_error"),
            if whole { 0.0 } else { 1.0 },
            "{path}\n{m}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A continuation that starts over.

/// `n` characters of a text with one-, two-, three- and four-byte characters.
fn sample_text(n: usize) -> String {
    "Hello from the upstream, café ✓ 🙂 naïve — "
        .chars()
        .cycle()
        .take(n)
        .collect()
}

/// Chat events of `text` cut into deltas of 1 to 9 characters (a role chunk first), optionally
/// with the finish chunk and `[DONE]`; the whole byte stream is then cut into chunks at uneven
/// byte offsets, most of them inside a multi-byte character.
fn awkward_stream(id: &str, text_: &str, done: bool) -> Vec<Vec<u8>> {
    let chars: Vec<char> = text_.chars().collect();
    let mut events = vec![role(id)];
    let (mut i, mut k) = (0, 0);
    while i < chars.len() {
        let n = 1 + k % 9;
        let piece: String = chars[i..(i + n).min(chars.len())].iter().collect();
        events.push(text(id, &piece));
        i += n;
        k += 1;
    }
    if done {
        events.extend(finish(id));
    }
    let bytes = events.concat();
    let sizes = [5usize, 17, 3, 101, 1009, 2];
    let mut out = Vec::new();
    let (mut at, mut k) = (0, 0);
    while at < bytes.len() {
        let end = (at + sizes[k % sizes.len()]).min(bytes.len());
        out.push(bytes[at..end].to_vec());
        at = end;
        k += 1;
    }
    out
}

/// The client must get `sent` + `more` once, whatever the length of `sent`, when the upstream
/// asked to continue answers from the start (the LiteLLM behaviour); then that upstream is asked
/// to regenerate.
#[actix_rt::test]
async fn a_continuation_that_starts_over_is_relayed_only_past_the_text_sent() {
    for n in [3, 300, 20_000] {
        let sent = sample_text(n);
        let more = " and the rest ✓.";
        let whole = format!("{sent}{more}");
        let first = Mock::always(sse_now(awkward_stream("a", &sent, false), Ending::Drop));
        let w = whole.clone();
        // It ignores the partial assistant message: the same answer from the start either way.
        let second =
            Mock::script(move |_, _| sse_now(awkward_stream("b", &w, true), Ending::Finish));
        let gw = start(
            &format!("{QUIET}stream_timeout: 2\nidle_timeout: 2\nresume: true\n"),
            &[up("first", &first, ""), up("second", &second, "")],
        );
        let got = post(&gw, "/v1/chat/completions", stream_body()).await;
        let body = got.text();
        assert_eq!(
            content(&body),
            whole,
            "{n} chars sent: text sent twice or lost"
        );
        assert!(
            !content(&body).contains("Hello from the Hel"),
            "{n}: repeated"
        );
        assert!(
            ends_with_done(&body),
            "{n}: {}",
            &body[body.len().saturating_sub(300)..]
        );
        assert!(!body.contains("\"error\""), "{n}");
        assert!(
            is_prefill(&second.seen()[0]),
            "{n}: it was asked to continue"
        );
        let rows = gw.records(1);
        assert_eq!(rows[0]["response"], whole.as_str(), "{n}");
        assert_eq!(rows[0]["complete"], 1, "{n}");
        assert_eq!(rows[0]["resumed"], 1, "{n}");
        let m = scrape_until(&gw, Duration::from_secs(2), |m| {
            resumes(m, "second", "restarted") >= 1.0
        })
        .await;
        assert_eq!(resumes(&m, "second", "restarted"), 1.0, "{n}\n{m}");

        // Until the next reload it is asked as if it had `prefill: none`.
        let got = post(&gw, "/v1/chat/completions", stream_body()).await;
        assert_eq!(content(&got.text()), whole, "{n}");
        let seen = second.seen();
        assert_eq!(seen.len(), 2);
        assert!(!is_prefill(&seen[1]), "{n}: asked with a prefill again");
        assert_eq!(seen[1].json(), stream_body(), "{n}");
        let m = scrape(&gw).await;
        assert_eq!(resumes(&m, "second", "restarted"), 1.0, "{n}\n{m}");
    }
}

#[actix_rt::test]
async fn a_continuation_that_starts_over_and_then_diverges_ends_with_the_error_event() {
    let sent = sample_text(40);
    let first = Mock::always(sse_now(awkward_stream("a", &sent, false), Ending::Drop));
    // The same first 16 characters, then something else.
    let other: String = sent
        .chars()
        .take(20)
        .chain("SOMETHING ELSE".chars())
        .collect();
    let second = Mock::always(sse_now(awkward_stream("b", &other, true), Ending::Finish));
    let gw = start(
        &format!("{QUIET}stream_timeout: 2\nidle_timeout: 2\nresume: true\n"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    let body = got.text();
    assert_eq!(content(&body), sent, "{body}");
    assert!(ends_with_error_event(&body), "{body}");
    let rows = gw.records(1);
    assert_eq!(rows[0]["complete"], 0);
    let m = scrape_until(&gw, Duration::from_secs(2), |m| {
        resumes(m, "second", "diverged") >= 1.0
    })
    .await;
    assert_eq!(resumes(&m, "second", "restarted"), 1.0, "{m}");
    assert_eq!(resumes(&m, "second", "diverged"), 1.0, "{m}");
    assert_eq!(resumes(&m, "second", "ok"), 0.0, "{m}");
}

/// A real continuation is not held back: its first character differs from the text sent, so
/// it goes out at once.
#[actix_rt::test]
async fn a_real_continuation_is_not_held_back() {
    let first = Mock::always(broken_stream("a", &["Hello", ", wor"], Ending::Drop));
    let mut parts = vec![
        (Duration::ZERO, role("b")),
        (Duration::ZERO, text("b", "ld")),
    ];
    parts.push((Duration::from_millis(1500), text("b", "!")));
    for p in finish("b") {
        parts.push((Duration::ZERO, p));
    }
    let second = Mock::always(Reply::sse_chunks(parts));
    let gw = start(
        &format!("{QUIET}stream_timeout: 2\nidle_timeout: 4\nresume: true\n"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    assert_eq!(content(&got.text()), "Hello, world!", "{}", got.text());
    let at = |needle: &str| {
        got.chunk_times
            .iter()
            .find(|(_, b)| String::from_utf8_lossy(b).contains(needle))
            .map(|(t, _)| *t)
            .unwrap_or_else(|| panic!("{needle} never came: {}", got.text()))
    };
    let (ld, bang) = (at("\"ld\""), at("\"!\""));
    assert!(
        bang > ld + Duration::from_millis(1000),
        "\"ld\" was held back until {ld:?} (\"!\" at {bang:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// No second round of client retries.

#[actix_rt::test]
async fn answers_after_every_candidate_say_do_not_retry() {
    let no_retry = |got: &Got| got.header("x-should-retry") == Some("false");
    // The gateway's own 502 (connections refused) and 504 (timeouts).
    let gw = Gateway::start(&config(
        QUIET,
        &[
            upstream("a", &Mock::refused_endpoint(), ""),
            upstream("b", &Mock::refused_endpoint(), ""),
        ],
    ));
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 502);
    assert!(no_retry(&got), "{:?}", got.headers);
    let hang = Mock::always(Reply::Hang);
    let gw = start(&format!("{QUIET}timeout: 1\n"), &[up("a", &hang, "")]);
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 504);
    assert!(no_retry(&got), "{:?}", got.headers);

    // The last candidate's failure, relayed; its own `x-should-retry: true` does not pass.
    let a = Mock::always(Reply::status(500));
    let b = Mock::always(Reply::Full {
        status: 500,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("x-should-retry".into(), "true".into()),
        ],
        body: b"{\"error\":{\"message\":\"boom\"}}".to_vec(),
    });
    let gw = start(QUIET, &[up("a", &a, ""), up("b", &b, "")]);
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 500);
    assert_eq!(got.text(), "{\"error\":{\"message\":\"boom\"}}");
    assert!(no_retry(&got), "{:?}", got.headers);

    // Not on a success, nor on a 400 relayed while a candidate is still untried (it is that
    // upstream's answer to the request, not "every candidate failed").
    let ok = Mock::always(Reply::chat("hi"));
    let gw = start(QUIET, &[up("a", &ok, "")]);
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-should-retry"), None);
    let bad = Mock::always(Reply::json(
        400,
        json!({"error": {"message": "bad", "type": "invalid_request_error", "code": "invalid_value"}}),
    ));
    let spare = Mock::always(Reply::chat("unused"));
    let gw = start(QUIET, &[up("a", &bad, ""), up("b", &spare, "")]);
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 400);
    assert_eq!(got.header("x-should-retry"), None, "{:?}", got.headers);
    assert_eq!(spare.hits(), 0);
}

#[actix_rt::test]
async fn a_relayed_429_says_when_the_first_upstream_leaves_cooldown() {
    let limited = |secs: &str| Reply::Full {
        status: 429,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("retry-after".into(), secs.into()),
        ],
        body: b"{\"error\":{\"message\":\"slow down\"}}".to_vec(),
    };
    let a = Mock::always(limited("30"));
    // Only its first answer says how long: later, the registry knows its cooldown.
    let b = Mock::script(move |_, n| {
        if n == 0 {
            limited("12")
        } else {
            Reply::status(429)
        }
    });
    let gw = start(QUIET, &[up("a", &a, ""), up("b", &b, "")]);
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 429);
    // 0.4: a relayed 429 is retried by the SDK, as a direct call would be.
    assert_eq!(got.header("x-should-retry"), Some("true"));
    let secs: u64 = got
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{:?}", got.headers));
    assert!((11..=12).contains(&secs), "Retry-After {secs}");
    // A second request a moment later: both are cooling down, the sooner one ends first (b's
    // second answer has no Retry-After: its cooldown is the registry's).
    std::thread::sleep(Duration::from_millis(1100));
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 429);
    let secs: u64 = got.header("retry-after").unwrap().parse().unwrap();
    assert!((10..=11).contains(&secs), "Retry-After {secs}");
}

// ---------------------------------------------------------------------------------------------
// Usage stays hidden in every shape.

#[actix_rt::test]
async fn litellms_usage_chunk_is_recorded_and_not_sent() {
    let litellm = format!(
        "data: {}\n\n",
        json!({"id": "chatcmpl-a", "object": "chat.completion.chunk", "model": "m",
               "choices": [{"index": 0, "delta": {}, "finish_reason": null}],
               "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})
    )
    .into_bytes();
    let mut parts = chat_parts("a", &["Hi", " there"], false);
    parts.push(finish_only("a"));
    let relayed = parts.concat();
    parts.push(litellm);
    parts.push(b"data: [DONE]\n\n".to_vec());
    for global in ["", "resume: true\n"] {
        let m = Mock::always(sse(parts.clone(), Ending::Finish));
        let spare = Mock::always(Reply::chat("unused"));
        let gw = start(
            &format!("cooldown: {{failures: 100, seconds: 30}}\n{global}"),
            &[up("a", &m, ""), up("b", &spare, "")],
        );
        let got = post(&gw, "/v1/chat/completions", stream_body()).await;
        assert_eq!(m.seen()[0].json()["stream_options"]["include_usage"], true);
        let mut want = relayed.clone();
        want.extend_from_slice(b"data: [DONE]\n\n");
        assert_eq!(got.text(), String::from_utf8(want).unwrap(), "{global:?}");
        let rows = gw.records(1);
        assert_eq!(rows[0]["prompt_tokens"], 7, "{global:?}: {:?}", rows[0]);
        assert_eq!(rows[0]["completion_tokens"], 3, "{global:?}");
        assert_eq!(rows[0]["complete"], 1, "{global:?}");
        let m = scrape(&gw).await;
        assert_eq!(
            sum(&m, "openai_api_route_tokens_total", "kind", "prompt"),
            7.0,
            "{m}"
        );
    }
}
