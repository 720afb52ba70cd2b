//! Rescue beyond the first attempt (see the rescue guide, "When an upstream breaks a stream"):
//! same-upstream retries and their waits, Retry-After as a cooldown, `deadline`, `failover_codes`,
//! in-band errors before commit, and `resume` of a chat stream that breaks after its first byte
//! (prefill shapes, regeneration, divergence).
//!
//! Each test asserts what a user sees: the status and bytes the client got, how long it took,
//! which mock saw which request, the record, and the metrics.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::support::*;

/// Keys every gateway here starts with: no health-based reordering (so only the rule under test
/// moves an upstream), no added `stream_options` (so bodies are exactly what rescue adds).
pub(crate) const QUIET: &str = "cooldown: {failures: 100, seconds: 30}\nforce_usage: false\n";

/// Short timers for the resume tests.
pub(crate) const FAST: &str = "stream_timeout: 1\nidle_timeout: 1\nresume: true\n";

/// Time between two chunks of a mock stream.
pub(crate) const GAP: Duration = Duration::from_millis(40);

pub(crate) fn start(global: &str, upstreams: &[String]) -> Gateway {
    Gateway::start(&config(global, upstreams))
}

pub(crate) fn up(name: &str, m: &Mock, extra: &str) -> String {
    upstream(name, &m.endpoint(), extra)
}

/// A failover status whose answer carries `Retry-After`.
pub(crate) fn status_after(status: u16, retry_after: &str) -> Reply {
    Reply::Full {
        status,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("retry-after".into(), retry_after.into()),
        ],
        body: json!({"error": {"message": format!("mock says {status}"), "type": "mock"}})
            .to_string()
            .into_bytes(),
    }
}

/// A 400 with this `error.code`.
fn bad_request(code: &str) -> Reply {
    Reply::json(
        400,
        json!({"error": {"message": "mock rejects this", "type": "invalid_request_error", "param": null, "code": code}}),
    )
}

/// One chat completion chunk of upstream `id` (its own `id` and `model`), shaped like OpenAI's.
pub(crate) fn chunk(id: &str, delta: Value) -> Vec<u8> {
    let ev = json!({
        "id": format!("chatcmpl-{id}"), "object": "chat.completion.chunk", "created": 1700000000,
        "model": format!("model-{id}"),
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}]
    });
    format!("data: {ev}\n\n").into_bytes()
}

pub(crate) fn role(id: &str) -> Vec<u8> {
    chunk(id, json!({"role": "assistant", "content": ""}))
}

pub(crate) fn text(id: &str, t: &str) -> Vec<u8> {
    chunk(id, json!({"content": t}))
}

pub(crate) fn finish(id: &str) -> Vec<Vec<u8>> {
    let ev = json!({
        "id": format!("chatcmpl-{id}"), "object": "chat.completion.chunk", "created": 1700000000,
        "model": format!("model-{id}"),
        "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]
    });
    vec![
        format!("data: {ev}\n\n").into_bytes(),
        b"data: [DONE]\n\n".to_vec(),
    ]
}

/// An SSE response of these events, `GAP` apart.
pub(crate) fn sse(parts: Vec<Vec<u8>>, ending: Ending) -> Reply {
    Reply::Chunks {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        chunks: parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| (if i == 0 { Duration::ZERO } else { GAP }, p))
            .collect(),
        ending,
    }
}

/// Role chunk and text chunks; with `Ending::Finish` also the finish chunk and `[DONE]`.
pub(crate) fn chat_parts(id: &str, pieces: &[&str], done: bool) -> Vec<Vec<u8>> {
    let mut parts = vec![role(id)];
    parts.extend(pieces.iter().map(|p| text(id, p)));
    if done {
        parts.extend(finish(id));
    }
    parts
}

/// A whole chat stream from upstream `id`.
pub(crate) fn chat_stream(id: &str, pieces: &[&str]) -> Reply {
    sse(chat_parts(id, pieces, true), Ending::Finish)
}

/// A chat stream that breaks after `pieces` with `ending` (`Drop` or `Stall`).
pub(crate) fn broken_stream(id: &str, pieces: &[&str], ending: Ending) -> Reply {
    sse(chat_parts(id, pieces, false), ending)
}

/// An in-band error event as a `data:` line.
pub(crate) fn inband_error() -> Vec<u8> {
    b"data: {\"error\":{\"message\":\"mock in-band overload\",\"type\":\"server_error\",\"code\":null}}\n\n".to_vec()
}

/// The `data:` payloads of an SSE body, in order.
pub(crate) fn data_lines(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim_start().to_string())
        .collect()
}

/// The concatenated `choices[0].delta.content`: the text a client shows.
pub(crate) fn content(body: &str) -> String {
    data_lines(body)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

/// Whether the stream's last event is the gateway's SSE error event (see the rescue guide, "How
/// failover and cooldown decide").
pub(crate) fn ends_with_error_event(body: &str) -> bool {
    data_lines(body)
        .last()
        .and_then(|d| serde_json::from_str::<Value>(d).ok())
        .is_some_and(|v| v["error"]["type"] == "upstream_error")
}

pub(crate) fn ends_with_done(body: &str) -> bool {
    body.ends_with("data: [DONE]\n\n")
}

/// The request body the mock saw, parsed.
pub(crate) fn last_message(seen: &Seen) -> Value {
    seen.json()["messages"]
        .as_array()
        .and_then(|m| m.last().cloned())
        .unwrap_or(Value::Null)
}

/// Whether this request is a continuation: its last message is the assistant's partial answer.
pub(crate) fn is_prefill(seen: &Seen) -> bool {
    last_message(seen)["role"] == "assistant"
}

/// A chat stream request with one more field than `chat_body`, to check it is kept.
pub(crate) fn stream_body() -> Value {
    json!({"model": "gpt-test", "stream": true, "temperature": 0.3, "messages": [{"role": "user", "content": "hi"}]})
}

/// The sum over every series of `name` that has `key="value"` (whatever its other labels).
pub(crate) fn sum(m: &Metrics, name: &str, key: &str, value: &str) -> f64 {
    m.samples
        .iter()
        .filter(|s| s.name == name && s.labels.iter().any(|(k, v)| k == key && v == value))
        .map(|s| s.value)
        .sum()
}

pub(crate) const RETRIES: &str = "openai_api_route_retries_total";
pub(crate) const RESUMES: &str = "openai_api_route_resumes_total";
pub(crate) const REQUESTS: &str = "openai_api_route_upstream_requests_total";

/// Every outcome counted for `upstream` in `upstream_requests_total`.
pub(crate) fn counted(m: &Metrics, upstream: &str) -> f64 {
    sum(m, REQUESTS, "upstream", upstream)
}

/// A mock whose script also notes when each request arrived.
fn timed(
    f: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static,
) -> (Mock, Arc<Mutex<Vec<Instant>>>) {
    let times = Arc::new(Mutex::new(Vec::new()));
    let t2 = times.clone();
    let m = Mock::script(move |seen, n| {
        t2.lock().unwrap().push(Instant::now());
        f(seen, n)
    });
    (m, times)
}

/// An IMF-fixdate (`Retry-After` as an HTTP date) `secs` seconds from now.
fn http_date_in(secs: u64) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + secs;
    let (days, rem) = (t / 86400, t % 86400);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(month - 1) as usize];
    format!(
        "{weekday}, {day:02} {name} {year} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[test]
fn http_dates_are_imf_fixdates() {
    let d = http_date_in(0);
    assert_eq!(d.len(), 29, "{d}");
    assert!(d.ends_with(" GMT") && d.as_bytes()[3] == b',', "{d}");
}

// ---------------------------------------------------------------------------------------------
// The defaults keep the failover rules (see the rescue guide, "How failover and cooldown decide").

#[actix_rt::test]
async fn defaults_keep_section_4_behaviour() {
    // retries: 0 → a 500 moves on at once; a 400 outside failover_codes is relayed; resume: false
    // → a broken stream ends with the SSE error event and the next upstream is not asked.
    let first = Mock::script(|req, n| match (n, req.json()["stream"] == true) {
        (_, true) => broken_stream("a", &["Hello"], Ending::Drop),
        (0, _) => Reply::status(500),
        _ => bad_request("invalid_value"),
    });
    let second = Mock::always(Reply::chat("second"));
    let gw = start(QUIET, &[up("first", &first, ""), up("second", &second, "")]);
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("x-upstream"), Some("second"));
    assert_eq!(got.header("x-upstream-attempts"), Some("2"));
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 400);
    assert_eq!(got.json()["error"]["code"], "invalid_value");
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    assert_eq!(got.status, 200);
    assert!(ends_with_error_event(&got.text()), "{}", got.text());
    assert_eq!(content(&got.text()), "Hello");
    assert_eq!(second.hits(), 1, "only the 500 went to the second upstream");
    assert_eq!(first.hits(), 3);
}

// ---------------------------------------------------------------------------------------------
// Same-upstream retries.

#[actix_rt::test]
async fn a_429_with_retry_after_is_waited_out_on_the_same_upstream() {
    let first = Mock::script(|_, n| {
        if n == 0 {
            status_after(429, "1")
        } else {
            Reply::chat("first, after waiting")
        }
    });
    let second = Mock::always(Reply::chat("second"));
    let gw = start(
        &format!("{QUIET}retries: 1"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let t = Instant::now();
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    let took = t.elapsed();
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        got.json()["choices"][0]["message"]["content"],
        "first, after waiting"
    );
    assert_eq!(got.header("x-upstream"), Some("first"));
    assert_eq!(got.header("x-upstream-attempts"), Some("2"));
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2000),
        "Retry-After: 1 not waited out: {took:?}"
    );
    assert_eq!((first.hits(), second.hits()), (2, 0));
    let rows = gw.records(1);
    assert_eq!(rows[0]["attempts"], 2, "{:?}", rows[0]);
    assert_eq!(rows[0]["upstream"], "first");
    assert_eq!(rows[0]["status"], 200);
    assert!(
        rows[0]["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("first: "),
        "the retried 429 is listed: {:?}",
        rows[0]
    );
    let m = scrape_until(&gw, Duration::from_secs(2), |m| {
        m.metric(RETRIES).label("upstream", "first").value() == Some(1.0)
    })
    .await;
    assert_eq!(
        m.metric(RETRIES).label("upstream", "first").value(),
        Some(1.0),
        "{m}"
    );
}

#[actix_rt::test]
async fn retry_after_as_an_http_date_is_waited_out_too() {
    let first = Mock::script(|_, n| {
        if n == 0 {
            // Made when the request arrives: 1..2 s away (second resolution).
            status_after(503, &http_date_in(2))
        } else {
            Reply::chat("first")
        }
    });
    let second = Mock::always(Reply::chat("second"));
    let gw = start(
        &format!("{QUIET}retries: 1"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let t = Instant::now();
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    let took = t.elapsed();
    assert_eq!(got.header("x-upstream"), Some("first"), "{}", got.text());
    assert_eq!(got.header("x-upstream-attempts"), Some("2"));
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_millis(2800),
        "{took:?}"
    );
    assert_eq!(second.hits(), 0);
}

#[actix_rt::test]
async fn a_500_is_retried_after_a_backoff_of_250ms_then_500ms() {
    let (first, times) = timed(|_, n| {
        if n < 2 {
            Reply::status(500)
        } else {
            Reply::chat("third try")
        }
    });
    let second = Mock::always(Reply::chat("second"));
    let gw = start(
        &format!("{QUIET}retries: 2"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("x-upstream"), Some("first"));
    assert_eq!(got.header("x-upstream-attempts"), Some("3"));
    assert_eq!(second.hits(), 0);
    let t = times.lock().unwrap().clone();
    assert_eq!(t.len(), 3);
    let (b0, b1) = (t[1] - t[0], t[2] - t[1]);
    // 250 ms × 2ⁿ ± 20 %, plus a little for the round trip.
    assert!(
        b0 >= Duration::from_millis(195) && b0 <= Duration::from_millis(450),
        "first backoff {b0:?}"
    );
    assert!(
        b1 >= Duration::from_millis(395) && b1 <= Duration::from_millis(900),
        "second backoff {b1:?}"
    );
    let m = scrape_until(&gw, Duration::from_secs(2), |m| {
        m.metric(RETRIES).label("upstream", "first").value() == Some(2.0)
    })
    .await;
    assert_eq!(
        m.metric(RETRIES).label("upstream", "first").value(),
        Some(2.0),
        "{m}"
    );
    let rows = gw.records(1);
    assert_eq!(rows[0]["attempts"], 3, "{:?}", rows[0]);
}

#[actix_rt::test]
async fn retryable_failures_are_retried_on_the_same_upstream() {
    let cases: Vec<(&str, Reply)> = vec![
        ("502", Reply::status(502)),
        ("503", Reply::status(503)),
        ("408", Reply::status(408)),
        ("409", Reply::status(409)),
        ("429", Reply::status(429)),
        ("reset", Reply::Reset),
        ("close", Reply::Close),
    ];
    for (what, fail) in cases {
        let first = Mock::script(move |_, n| {
            if n == 0 {
                fail.clone()
            } else {
                Reply::chat("first")
            }
        });
        let second = Mock::always(Reply::chat("second"));
        let gw = start(
            &format!("{QUIET}retries: 1"),
            &[up("first", &first, ""), up("second", &second, "")],
        );
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.status, 200, "{what}: {}", got.text());
        assert_eq!(got.header("x-upstream"), Some("first"), "{what}");
        assert_eq!(got.header("x-upstream-attempts"), Some("2"), "{what}");
        assert_eq!((first.hits(), second.hits()), (2, 0), "{what}");
    }
}

#[actix_rt::test]
async fn a_stream_request_is_retried_before_commit_too() {
    let first = Mock::script(|_, n| {
        if n == 0 {
            Reply::status(503)
        } else {
            chat_stream("a", &["Hello", ", world!"])
        }
    });
    let second = Mock::always(chat_stream("b", &["second"]));
    let gw = start(
        &format!("{QUIET}retries: 1"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-upstream"), Some("first"));
    assert_eq!(got.header("x-upstream-attempts"), Some("2"));
    assert_eq!(
        got.body,
        chat_parts("a", &["Hello", ", world!"], true).concat()
    );
    assert_eq!(second.hits(), 0);
}

#[actix_rt::test]
async fn never_retried_after_a_timeout_a_refused_connection_401_403_404() {
    let mut cases: Vec<(&str, Mock)> = vec![("hang", Mock::always(Reply::Hang))];
    for status in [401u16, 403, 404] {
        cases.push(("status", Mock::always(Reply::status(status))));
    }
    for (what, first) in cases {
        let second = Mock::always(Reply::chat("second"));
        let gw = start(
            &format!("{QUIET}retries: 3\ntimeout: 0.3"),
            &[up("first", &first, ""), up("second", &second, "")],
        );
        let t = Instant::now();
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.status, 200, "{what}: {}", got.text());
        assert_eq!(got.header("x-upstream"), Some("second"), "{what}");
        assert_eq!(got.header("x-upstream-attempts"), Some("2"), "{what}");
        assert_eq!(first.hits(), 1, "{what} was retried on the same upstream");
        assert!(t.elapsed() < Duration::from_millis(1200), "{what}");
    }
    let second = Mock::always(Reply::chat("second"));
    let gw = start(
        &format!("{QUIET}retries: 3"),
        &[
            upstream("first", &Mock::refused_endpoint(), ""),
            up("second", &second, ""),
        ],
    );
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("second"));
    assert_eq!(
        got.header("x-upstream-attempts"),
        Some("2"),
        "refused connection retried"
    );
}

#[actix_rt::test]
async fn retry_after_longer_than_retry_after_max_moves_on_at_once() {
    let first = Mock::always(status_after(429, "10"));
    let second = Mock::always(Reply::chat("second"));
    let gw = start(
        &format!("{QUIET}retries: 3\nretry_after_max: 2"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let t = Instant::now();
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-upstream"), Some("second"));
    assert_eq!(got.header("x-upstream-attempts"), Some("2"));
    assert_eq!(first.hits(), 1);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "did not move on at once: {:?}",
        t.elapsed()
    );
    // It still puts `first` in cooldown for 10 s: the next request starts with `second`.
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("second"));
    assert_eq!(got.header("x-upstream-attempts"), Some("1"));
    assert_eq!(first.hits(), 1);
}

#[actix_rt::test]
async fn per_upstream_retries_override_the_global_value() {
    let first = Mock::script(|_, n| {
        if n % 2 == 0 {
            Reply::status(500)
        } else {
            Reply::chat("first")
        }
    });
    let second = Mock::always(Reply::chat("second"));
    let gw = start(
        QUIET,
        &[up("first", &first, "retries: 1"), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("first"), "{}", got.text());
    assert_eq!(got.header("x-upstream-attempts"), Some("2"));
    // And the other way round: global retries, none on this upstream.
    let first = Mock::always(Reply::status(500));
    let gw = start(
        &format!("{QUIET}retries: 2"),
        &[up("first", &first, "retries: 0"), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("second"));
    assert_eq!(first.hits(), 1);
}

#[actix_rt::test]
async fn retry_after_puts_the_upstream_in_cooldown_for_that_long() {
    for status in [429u16, 503] {
        let first = Mock::script(move |_, n| {
            if n == 0 {
                status_after(status, "1")
            } else {
                Reply::chat("first")
            }
        });
        let second = Mock::always(Reply::chat("second"));
        // retries: 0 and cooldown.failures far away: only Retry-After can move `first` back.
        let gw = start(QUIET, &[up("first", &first, ""), up("second", &second, "")]);
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.header("x-upstream"), Some("second"), "{status}");
        assert_eq!(got.header("x-upstream-attempts"), Some("2"), "{status}");
        // The registry actor publishes the cooldown a moment after the failure is reported.
        std::thread::sleep(Duration::from_millis(200));
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.header("x-upstream"), Some("second"), "{status}");
        assert_eq!(
            got.header("x-upstream-attempts"),
            Some("1"),
            "{status}: Retry-After did not start a cooldown"
        );
        assert_eq!(first.hits(), 1, "{status}");
        std::thread::sleep(Duration::from_millis(1150));
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(
            got.header("x-upstream"),
            Some("first"),
            "{status}: cooldown outlived Retry-After"
        );
        assert_eq!(first.hits(), 2, "{status}");
    }
}

#[actix_rt::test]
async fn no_retry_on_a_half_open_probe_or_when_cooldown_just_started() {
    let first = Mock::always(Reply::status(500));
    let second = Mock::always(Reply::chat("second"));
    let gw = start(
        "cooldown: {failures: 1, seconds: 1}\nretries: 3",
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("second"));
    assert_eq!(
        first.hits(),
        1,
        "the failure that started the cooldown was retried"
    );
    std::thread::sleep(Duration::from_millis(1150));
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("second"));
    assert_eq!(first.hits(), 2, "the half-open probe was retried");
    assert_eq!(got.header("x-upstream-attempts"), Some("2"));
}

#[actix_rt::test]
async fn no_retry_storm_across_three_failing_upstreams() {
    let a = Mock::always(Reply::status(429));
    let b = Mock::always(Reply::status(500));
    let c = Mock::always(Reply::status(503));
    let gw = start(
        &format!("{QUIET}retries: 2\ndeadline: 3"),
        &[up("a", &a, ""), up("b", &b, ""), up("c", &c, "")],
    );
    let t = Instant::now();
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(3800),
        "past the deadline: {took:?}"
    );
    assert!(
        [429, 500, 503].contains(&got.status),
        "the last HTTP answer is relayed: {}",
        got.status
    );
    for (name, m) in [("a", &a), ("b", &b), ("c", &c)] {
        assert!(
            (1..=3).contains(&m.hits()),
            "{name} got {} attempts (retries: 2 allows 3)",
            m.hits()
        );
    }
    assert_eq!(a.hits(), 3, "a's retries fit well within the deadline");
    let total = a.hits() + b.hits() + c.hits();
    assert_eq!(
        got.header("x-upstream-attempts"),
        Some(total.to_string().as_str())
    );
    let rows = gw.records(1);
    assert_eq!(rows[0]["attempts"], total as i64);
    let m = scrape(&gw).await;
    for name in ["a", "b", "c"] {
        let r = m
            .metric(RETRIES)
            .label("upstream", name)
            .value()
            .unwrap_or(0.0);
        assert!(r <= 2.0, "{name}: {r} retries\n{m}");
    }
}

// ---------------------------------------------------------------------------------------------
// deadline

#[actix_rt::test]
async fn deadline_cuts_a_retry_after_wait() {
    let first = Mock::always(status_after(503, "3"));
    let gw = start(
        &format!("{QUIET}retries: 2\nretry_after_max: 5\ndeadline: 1"),
        &[up("first", &first, "")],
    );
    let t = Instant::now();
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    let took = t.elapsed();
    assert_eq!(got.status, 503, "the last HTTP answer: {}", got.text());
    assert!(took < Duration::from_millis(1600), "{took:?}");
    assert_eq!(first.hits(), 1, "nothing sent after the deadline");
}

#[actix_rt::test]
async fn deadline_cuts_attempt_waits_and_skips_the_rest() {
    let first = Mock::always(Reply::Hang);
    let second = Mock::always(Reply::chat("too late"));
    let gw = start(
        &format!("{QUIET}timeout: 10\ndeadline: 1"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let t = Instant::now();
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    let took = t.elapsed();
    assert_eq!(got.status, 504, "{}", got.text());
    assert_eq!(got.json()["error"]["type"], "upstream_error");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1600),
        "{took:?}"
    );
    assert_eq!(second.hits(), 0, "nothing was left for the second upstream");
    // The cut attempt was cancelled.
    assert!(eventually(Duration::from_secs(2), || *first
        .peer_gone
        .lock()
        .unwrap()
        == 1));
    // Backoffs too: a 500 forever with many retries (5 = 7.75 s of backoff, the most a config
    // may give) still ends within the deadline.
    let flaky = Mock::always(Reply::status(500));
    let gw = start(
        &format!("{QUIET}retries: 5\ndeadline: 1"),
        &[up("flaky", &flaky, "")],
    );
    let t = Instant::now();
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 500);
    assert!(
        t.elapsed() < Duration::from_millis(1600),
        "{:?}",
        t.elapsed()
    );
    assert!(flaky.hits() <= 4, "{} attempts in 1 s", flaky.hits());
}

#[actix_rt::test]
async fn deadline_zero_means_none() {
    let (first, _) = timed(|_, n| {
        if n == 0 {
            status_after(429, "1")
        } else {
            Reply::chat("first")
        }
    });
    let gw = start(
        &format!("{QUIET}retries: 1\ndeadline: 0"),
        &[up("first", &first, "")],
    );
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("x-upstream-attempts"), Some("2"));
}

// ---------------------------------------------------------------------------------------------
// Client going away during a wait.

#[actix_rt::test]
async fn a_client_that_leaves_during_a_retry_wait_cancels_it() {
    let first = Mock::always(status_after(429, "2"));
    let second = Mock::always(Reply::Hang);
    let gw = start(
        &format!("{QUIET}retries: 1\nretry_after_max: 5"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let client = awc::Client::builder()
        .timeout(Duration::from_millis(500))
        .finish();
    let sent = client
        .post(gw.url("/v1/chat/completions"))
        .insert_header(("authorization", format!("Bearer {TOKEN}")))
        .insert_header(("content-type", "application/json"))
        .send_body(chat_body(false).to_string())
        .await;
    assert!(sent.is_err(), "the gateway answered during the wait");
    drop(client);
    actix_rt::time::sleep(Duration::from_millis(2700)).await;
    assert_eq!(
        first.hits(),
        1,
        "the retry was sent after the client had left"
    );
    assert_eq!(second.hits(), 0, "the next upstream was asked for nobody");

    // The same during a backoff: 500s with attempts at 0, 0.25, 0.75, 1.75 s … The client leaves
    // at 0.45 s; a gateway that went on would have made 4 attempts by 2.45 s.
    let flaky = Mock::always(Reply::status(500));
    let second = Mock::always(Reply::Hang);
    let gw = start(
        &format!("{QUIET}retries: 5"),
        &[up("flaky", &flaky, ""), up("second", &second, "")],
    );
    let client = awc::Client::builder()
        .timeout(Duration::from_millis(450))
        .finish();
    let sent = client
        .post(gw.url("/v1/chat/completions"))
        .insert_header(("authorization", format!("Bearer {TOKEN}")))
        .insert_header(("content-type", "application/json"))
        .send_body(chat_body(false).to_string())
        .await;
    assert!(sent.is_err(), "the gateway answered during the backoffs");
    drop(client);
    actix_rt::time::sleep(Duration::from_millis(2000)).await;
    assert!(
        flaky.hits() <= 3,
        "retries went on after the client had left: {} attempts",
        flaky.hits()
    );
    assert!(flaky.hits() >= 2, "the first backoff was not waited out");
    assert_eq!(second.hits(), 0);
}

#[actix_rt::test]
async fn a_client_that_leaves_during_a_continuation_cancels_it() {
    use futures_util::StreamExt;
    let first = Mock::always(broken_stream("a", &["Hello"], Ending::Drop));
    let second = Mock::always(Reply::Delay(
        Duration::from_secs(5),
        Box::new(chat_stream("b", &[" world"])),
    ));
    let third = Mock::always(chat_stream("c", &[" world"]));
    let gw = start(
        &format!("{QUIET}resume: true\nidle_timeout: 1\ntimeout: 10\nstream_timeout: 10"),
        &[
            up("first", &first, ""),
            up("second", &second, ""),
            up("third", &third, ""),
        ],
    );
    let client = awc::Client::default();
    let mut resp = client
        .post(gw.url("/v1/chat/completions"))
        .insert_header(("authorization", format!("Bearer {TOKEN}")))
        .send_body(stream_body().to_string())
        .await
        .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("Hello") {
        match resp.next().await {
            Some(Ok(b)) => got.extend_from_slice(&b),
            other => panic!("stream ended early: {other:?}"),
        }
    }
    assert!(
        eventually(Duration::from_secs(3), || second.hits() == 1),
        "no continuation was requested"
    );
    drop(resp);
    drop(client);
    assert!(
        eventually(Duration::from_secs(3), || *second.peer_gone.lock().unwrap()
            == 1),
        "the continuation went on after the client left"
    );
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(third.hits(), 0);
}

// ---------------------------------------------------------------------------------------------
// failover_codes

#[actix_rt::test]
async fn a_400_in_failover_codes_fails_over_and_is_not_counted() {
    let first = Mock::always(bad_request("context_length_exceeded"));
    let second = Mock::always(Reply::chat("bigger context"));
    let gw = start(
        "cooldown: {failures: 1, seconds: 30}\nforce_usage: false",
        &[up("first", &first, ""), up("second", &second, "")],
    );
    for _ in 0..2 {
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(
            got.json()["choices"][0]["message"]["content"],
            "bigger context"
        );
        assert_eq!(got.header("x-upstream"), Some("second"));
        assert_eq!(got.header("x-upstream-attempts"), Some("2"));
    }
    assert_eq!(
        first.hits(),
        2,
        "a failover_codes 400 must not start a cooldown (failures: 1)"
    );
    let rows = gw.records(2);
    assert!(
        rows[0]["error"].as_str().unwrap_or("").contains("first: "),
        "{:?}",
        rows[0]
    );
    let m = scrape_until(&gw, Duration::from_secs(2), |m| counted(m, "second") >= 2.0).await;
    assert_eq!(counted(&m, "first"), 0.0, "counted in {REQUESTS}:\n{m}");
    assert_eq!(
        m.metric("openai_api_route_upstream_healthy")
            .label("upstream", "first")
            .value(),
        Some(1.0),
        "{m}"
    );
}

#[actix_rt::test]
async fn a_400_with_another_code_is_relayed_as_before() {
    let first = Mock::always(bad_request("invalid_value"));
    let second = Mock::always(Reply::chat("second"));
    let gw = start(QUIET, &[up("first", &first, ""), up("second", &second, "")]);
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 400);
    assert_eq!(got.json()["error"]["code"], "invalid_value");
    assert_eq!(got.header("x-upstream"), Some("first"));
    assert_eq!(got.header("x-upstream-attempts"), Some("1"));
    assert_eq!(second.hits(), 0);
}

#[actix_rt::test]
async fn failover_codes_match_error_code_else_error_type() {
    // A configured list replaces the default; `error.type` counts when there is no `code`.
    let first = Mock::script(|_, n| match n {
        0 => Reply::json(
            400,
            json!({"error": {"message": "busy model", "type": "model_busy"}}),
        ),
        1 => bad_request("quota_slice"),
        _ => bad_request("context_length_exceeded"),
    });
    let second = Mock::always(Reply::chat("second"));
    let gw = start(
        &format!("{QUIET}failover_codes: [model_busy, quota_slice]"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    for what in ["type", "code"] {
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.status, 200, "{what}: {}", got.text());
        assert_eq!(got.header("x-upstream"), Some("second"), "{what}");
    }
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(
        got.status, 400,
        "context_length_exceeded is no longer listed"
    );
    assert_eq!(second.hits(), 2);
}

// ---------------------------------------------------------------------------------------------
// In-band errors before commit.

#[actix_rt::test]
async fn a_stream_whose_first_event_is_an_error_fails_over_unseen() {
    let good = chat_stream("b", &["Hi", " there"]);
    let good_bytes: Vec<u8> = chat_parts("b", &["Hi", " there"], true).concat();
    let responses_good: Vec<u8> = [
        "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_b\",\"status\":\"in_progress\"}}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_b\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\"}\n\n",
        "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_b\",\"status\":\"completed\"}}\n\n",
    ]
    .concat()
    .into_bytes();
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("data error", "/v1/chat/completions", inband_error()),
        (
            "event: error",
            "/v1/chat/completions",
            b"event: error\ndata: {\"message\":\"mock overloaded\",\"code\":\"overloaded\"}\n\n".to_vec(),
        ),
        (
            "response.failed",
            "/v1/responses",
            b"event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"id\":\"resp_a\",\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"mock failed\"}}}\n\n".to_vec(),
        ),
        (
            "responses error",
            "/v1/responses",
            b"event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"mock failed\",\"param\":null}\n\n".to_vec(),
        ),
    ];
    for (what, path, first_event) in cases {
        let first = Mock::always(sse(vec![first_event], Ending::Finish));
        let (second_reply, expected) = if path == "/v1/responses" {
            (
                Reply::sse_chunks(vec![(Duration::ZERO, responses_good.clone())]),
                responses_good.clone(),
            )
        } else {
            (good.clone(), good_bytes.clone())
        };
        let second = Mock::always(second_reply);
        let gw = start(QUIET, &[up("first", &first, ""), up("second", &second, "")]);
        let body = if path == "/v1/responses" {
            json!({"model": "gpt-test", "stream": true, "input": "hi"})
        } else {
            chat_body(true)
        };
        let got = post(&gw, path, body).await;
        assert_eq!(got.status, 200, "{what}: {}", got.text());
        assert_eq!(got.header("x-upstream"), Some("second"), "{what}");
        assert_eq!(got.header("x-upstream-attempts"), Some("2"), "{what}");
        assert_eq!(
            got.text(),
            String::from_utf8_lossy(&expected),
            "{what}: the client got more than the second upstream's stream"
        );
        let m = scrape_until(&gw, Duration::from_secs(2), |m| {
            m.metric(REQUESTS)
                .label("upstream", "first")
                .label("outcome", "stream_error")
                .value()
                .is_some()
        })
        .await;
        assert_eq!(
            m.metric(REQUESTS)
                .label("upstream", "first")
                .label("outcome", "stream_error")
                .value(),
            Some(1.0),
            "{what}\n{m}"
        );
        let rows = gw.records(1);
        assert!(
            rows[0]["error"].as_str().unwrap_or("").contains("first: "),
            "{what}: {:?}",
            rows[0]
        );
    }
}

#[actix_rt::test]
async fn every_candidate_failing_in_band_is_502() {
    let one = Mock::always(sse(vec![inband_error()], Ending::Finish));
    let two = Mock::always(sse(vec![inband_error()], Ending::Finish));
    let gw = start(QUIET, &[up("one", &one, ""), up("two", &two, "")]);
    let got = post(&gw, "/v1/chat/completions", chat_body(true)).await;
    assert_eq!(got.status, 502, "{}", got.text());
    let msg = got.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(msg.contains("one: ") && msg.contains("two: "), "{msg}");
    assert_eq!((one.hits(), two.hits()), (1, 1));
}

// ---------------------------------------------------------------------------------------------
// Resume.

/// Continues "Hello, wor" with "ld!" when asked with a prefill; anything else gets a stream that
/// would show up in the client's text.
pub(crate) fn continuing(id: &'static str) -> Mock {
    Mock::script(move |seen, _| {
        if is_prefill(seen) && last_message(seen)["content"] == "Hello, wor" {
            chat_stream(id, &["ld", "!"])
        } else {
            chat_stream(id, &["UNEXPECTED REQUEST"])
        }
    })
}

fn first_breaking(ending: Ending) -> Mock {
    Mock::always(broken_stream("a", &["Hello", ", wor"], ending))
}

/// The scripts the resume tests rely on, asked directly (no gateway): they must hold today.
#[actix_rt::test]
async fn the_resume_mocks_behave_as_scripted() {
    let url = |m: &Mock| format!("{}/chat/completions", m.endpoint());
    let ct = [("content-type", "application/json")];
    let first = first_breaking(Ending::Drop);
    let got = send(
        "POST",
        &url(&first),
        &ct,
        stream_body().to_string().as_bytes(),
    )
    .await;
    assert_eq!(content(&got.text()), "Hello, wor");
    // (awc cannot tell a cut chunked body from a whole one: no `[DONE]` is the sign.)
    assert!(!ends_with_done(&got.text()));
    let second = continuing("b");
    let mut prefill = stream_body();
    prefill["messages"]
        .as_array_mut()
        .unwrap()
        .push(json!({"role": "assistant", "content": "Hello, wor"}));
    let got = send("POST", &url(&second), &ct, prefill.to_string().as_bytes()).await;
    assert_eq!(content(&got.text()), "ld!");
    assert!(ends_with_done(&got.text()) && got.error.is_none());
    let got = send(
        "POST",
        &url(&second),
        &ct,
        stream_body().to_string().as_bytes(),
    )
    .await;
    assert_eq!(content(&got.text()), "UNEXPECTED REQUEST");
    assert!(is_prefill(&second.seen()[0]) && !is_prefill(&second.seen()[1]));
}

#[actix_rt::test]
async fn a_broken_stream_is_continued_with_a_prefill_message() {
    let first = first_breaking(Ending::Drop);
    let second = continuing("b");
    let gw = start(
        &format!("{QUIET}{FAST}"),
        &[
            up("first", &first, ""),
            up("second", &second, "model_map: {gpt-test: second-model}"),
        ],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    let body = got.text();
    assert_eq!(got.status, 200);
    assert_eq!(content(&body), "Hello, world!", "{body}");
    assert!(ends_with_done(&body), "{body}");
    assert!(!body.contains("\"error\""), "{body}");
    // First upstream's bytes, then the continuation's verbatim, minus its role-only chunk.
    let first_bytes = chat_parts("a", &["Hello", ", wor"], false).concat();
    assert!(body.as_bytes().starts_with(&first_bytes), "{body}");
    let mut rest: Vec<u8> = chat_parts("b", &["ld", "!"], true).concat();
    rest.drain(..role("b").len());
    assert!(body.as_bytes().ends_with(&rest), "{body}");
    assert_eq!(body.matches("\"role\"").count(), 1, "{body}");
    // What the continuing upstream was asked.
    let seen = second.seen();
    assert_eq!(seen.len(), 1);
    let sent = seen[0].json();
    assert_eq!(sent["model"], "second-model", "after its model_map");
    assert_eq!(sent["temperature"], 0.3);
    assert_eq!(sent["stream"], true);
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello, wor"}
        ])
    );
    assert!(sent.get("continue_final_message").is_none(), "{sent}");
    // The record: the whole text, one continuation, the finisher, the break.
    let rows = gw.records(1);
    let r = &rows[0];
    assert_eq!(r["response"], "Hello, world!", "{r:?}");
    assert_eq!(r["resumed"], 1, "{r:?}");
    assert_eq!(r["complete"], 1, "{r:?}");
    assert_eq!(r["upstream"], "second", "{r:?}");
    assert_eq!(r["attempts"], 2, "{r:?}");
    assert_eq!(r["status"], 200);
    assert_eq!(r["finish_reason"], "stop", "{r:?}");
    assert!(
        r["error"].as_str().unwrap_or("").starts_with("first: "),
        "{r:?}"
    );
    let m = scrape_until(&gw, Duration::from_secs(2), |m| {
        sum(m, RESUMES, "result", "ok") >= 1.0
    })
    .await;
    assert_eq!(sum(&m, RESUMES, "result", "ok"), 1.0, "{m}");
    let ok_on = m
        .metric(RESUMES)
        .label("upstream", "first")
        .label("result", "ok")
        .value()
        .or(m
            .metric(RESUMES)
            .label("upstream", "second")
            .label("result", "ok")
            .value());
    assert_eq!(ok_on, Some(1.0), "labels are upstream and result:\n{m}");
}

#[actix_rt::test]
async fn prefill_shapes_message_vllm_deepseek() {
    for prefill in ["message", "vllm", "deepseek"] {
        let first = first_breaking(Ending::Drop);
        let second = continuing("b");
        let gw = start(
            &format!("{QUIET}{FAST}"),
            &[
                up("first", &first, ""),
                up("second", &second, &format!("prefill: {prefill}")),
            ],
        );
        let got = post(&gw, "/v1/chat/completions", stream_body()).await;
        assert_eq!(content(&got.text()), "Hello, world!", "{prefill}");
        let sent = second.seen()[0].json();
        let last = last_message(&second.seen()[0]);
        match prefill {
            "message" => {
                assert_eq!(last, json!({"role": "assistant", "content": "Hello, wor"}));
                assert!(sent.get("continue_final_message").is_none(), "{sent}");
                assert!(sent.get("add_generation_prompt").is_none(), "{sent}");
            }
            "vllm" => {
                assert_eq!(last, json!({"role": "assistant", "content": "Hello, wor"}));
                assert_eq!(sent["continue_final_message"], true, "{sent}");
                assert_eq!(sent["add_generation_prompt"], false, "{sent}");
            }
            _ => {
                assert_eq!(
                    last,
                    json!({"role": "assistant", "content": "Hello, wor", "prefix": true})
                );
                assert!(sent.get("continue_final_message").is_none(), "{sent}");
            }
        }
        assert_eq!(
            sent["messages"][0],
            json!({"role": "user", "content": "hi"})
        );
    }
    // The global key applies to upstreams that do not set their own.
    let first = first_breaking(Ending::Drop);
    let second = continuing("b");
    let gw = start(
        &format!("{QUIET}{FAST}prefill: vllm"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    assert_eq!(content(&got.text()), "Hello, world!");
    assert_eq!(second.seen()[0].json()["continue_final_message"], true);
}

#[actix_rt::test]
async fn a_break_right_after_the_role_chunk_sends_the_original_request() {
    let first = Mock::always(broken_stream("a", &[], Ending::Drop));
    let second = Mock::always(chat_stream("b", &["Hello", ", world!"]));
    let gw = start(
        &format!("{QUIET}{FAST}"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    let body = got.text();
    assert_eq!(got.status, 200);
    assert_eq!(content(&body), "Hello, world!", "{body}");
    assert!(ends_with_done(&body), "{body}");
    assert_eq!(body.matches("\"role\"").count(), 1, "{body}");
    assert_eq!(
        second.seen()[0].json()["messages"],
        json!([{"role": "user", "content": "hi"}]),
        "no prefill when no text was sent"
    );
    let rows = gw.records(1);
    assert_eq!(rows[0]["response"], "Hello, world!");
    assert_eq!(rows[0]["complete"], 1, "{:?}", rows[0]);
    assert_eq!(rows[0]["upstream"], "second");
}

#[actix_rt::test]
async fn a_stall_past_idle_timeout_is_continued() {
    let first = first_breaking(Ending::Stall);
    let second = continuing("b");
    let gw = start(
        &format!("{QUIET}{FAST}"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let t = Instant::now();
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    let took = t.elapsed();
    let body = got.text();
    assert_eq!(content(&body), "Hello, world!", "{body}");
    assert!(ends_with_done(&body), "{body}");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(3000),
        "{took:?}"
    );
    assert!(eventually(Duration::from_secs(2), || *first
        .peer_gone
        .lock()
        .unwrap()
        == 1));
    let rows = gw.records(1);
    assert_eq!(rows[0]["resumed"], 1, "{:?}", rows[0]);
    assert!(
        rows[0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("idle_timeout"),
        "{:?}",
        rows[0]
    );
}

#[actix_rt::test]
async fn an_in_band_error_mid_stream_is_continued_and_not_relayed() {
    let mut parts = chat_parts("a", &["Hello", ", wor"], false);
    parts.push(inband_error());
    let first = Mock::always(sse(parts, Ending::Finish));
    let second = continuing("b");
    let gw = start(
        &format!("{QUIET}{FAST}"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    let body = got.text();
    assert_eq!(content(&body), "Hello, world!", "{body}");
    assert!(ends_with_done(&body), "{body}");
    assert!(
        !body.contains("mock in-band overload"),
        "the error event reached the client: {body}"
    );
    let rows = gw.records(1);
    assert_eq!(rows[0]["resumed"], 1, "{:?}", rows[0]);
    assert_eq!(rows[0]["complete"], 1);
    assert!(rows[0]["error"].as_str().unwrap_or("").contains("first: "));
}

#[actix_rt::test]
async fn a_continuation_that_breaks_is_continued_again() {
    let first = Mock::always(broken_stream("a", &["Hello"], Ending::Drop));
    let second = Mock::script(|seen, _| {
        if last_message(seen)["content"] == "Hello" {
            broken_stream("b", &[", wor"], Ending::Drop)
        } else {
            chat_stream("b", &["UNEXPECTED REQUEST"])
        }
    });
    let third = continuing("c");
    let gw = start(
        &format!("{QUIET}{FAST}"),
        &[
            up("first", &first, ""),
            up("second", &second, ""),
            up("third", &third, "prefill: deepseek"),
        ],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    let body = got.text();
    assert_eq!(content(&body), "Hello, world!", "{body}");
    assert!(ends_with_done(&body), "{body}");
    assert_eq!(body.matches("\"role\"").count(), 1, "{body}");
    assert_eq!(
        last_message(&third.seen()[0]),
        json!({"role": "assistant", "content": "Hello, wor", "prefix": true})
    );
    let rows = gw.records(1);
    let r = &rows[0];
    assert_eq!(r["response"], "Hello, world!", "{r:?}");
    assert_eq!(r["resumed"], 2, "{r:?}");
    assert_eq!(r["upstream"], "third");
    assert_eq!(r["attempts"], 3);
    assert_eq!(r["complete"], 1);
    let err = r["error"].as_str().unwrap_or("");
    assert!(err.contains("first: ") && err.contains("second: "), "{err}");
}

#[actix_rt::test]
async fn a_silent_continuation_is_abandoned_after_stream_timeout() {
    let first = first_breaking(Ending::Drop);
    let second = Mock::always(Reply::Hang);
    let third = continuing("c");
    let gw = start(
        &format!("{QUIET}{FAST}timeout: 30"),
        &[
            up("first", &first, ""),
            up("second", &second, ""),
            up("third", &third, ""),
        ],
    );
    let t = Instant::now();
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    let took = t.elapsed();
    assert_eq!(content(&got.text()), "Hello, world!", "{}", got.text());
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(3000),
        "{took:?}"
    );
    assert_eq!(second.hits(), 1);
    assert!(is_prefill(&third.seen()[0]));
}

#[actix_rt::test]
async fn a_rejected_prefill_falls_back_to_regeneration() {
    let first = first_breaking(Ending::Drop);
    let second = Mock::script(|seen, _| {
        if is_prefill(seen) {
            bad_request("invalid_request")
        } else {
            // The same answer, cut differently: only what follows "Hello, wor" may be relayed.
            chat_stream("b", &["Hel", "lo, w", "orld!"])
        }
    });
    let gw = start(
        &format!("{QUIET}{FAST}"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    let body = got.text();
    assert_eq!(content(&body), "Hello, world!", "{body}");
    assert!(ends_with_done(&body), "{body}");
    let seen = second.seen();
    assert_eq!(seen.len(), 2, "prefill, then regeneration");
    assert!(is_prefill(&seen[0]));
    assert_eq!(
        seen[1].json()["messages"],
        json!([{"role": "user", "content": "hi"}])
    );
    let rows = gw.records(1);
    assert_eq!(rows[0]["response"], "Hello, world!", "{:?}", rows[0]);
    assert_eq!(rows[0]["complete"], 1, "{:?}", rows[0]);
    assert_eq!(rows[0]["attempts"], 3, "{:?}", rows[0]);
    assert_eq!(rows[0]["upstream"], "second");
    let m = scrape_until(&gw, Duration::from_secs(2), |m| {
        sum(m, RESUMES, "result", "rejected") >= 1.0
    })
    .await;
    assert_eq!(sum(&m, RESUMES, "result", "rejected"), 1.0, "{m}");
    assert_eq!(
        m.metric(REQUESTS)
            .label("upstream", "second")
            .label("outcome", "http_error")
            .value()
            .unwrap_or(0.0),
        0.0,
        "the rejected prefill is not counted:\n{m}"
    );
}

#[actix_rt::test]
async fn prefill_none_regenerates_and_relays_only_the_rest() {
    let first = first_breaking(Ending::Drop);
    let second = Mock::always(chat_stream("b", &["Hello", ", w", "orld", "!"]));
    let gw = start(
        &format!("{QUIET}{FAST}"),
        &[
            up("first", &first, ""),
            up("second", &second, "prefill: none"),
        ],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    let body = got.text();
    assert_eq!(content(&body), "Hello, world!", "{body}");
    assert!(ends_with_done(&body), "{body}");
    assert!(!body.contains("\"error\""), "{body}");
    let seen = second.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].json(),
        stream_body(),
        "regeneration is the original request"
    );
    let rows = gw.records(1);
    assert_eq!(rows[0]["response"], "Hello, world!");
    assert_eq!(rows[0]["resumed"], 1, "{:?}", rows[0]);
    assert_eq!(rows[0]["complete"], 1);
}

#[actix_rt::test]
async fn a_regeneration_that_diverges_ends_with_the_error_event() {
    // At once ("Goodbye") and part way ("Hello, WORLD"): nothing contradicting reaches the client.
    for pieces in [vec!["Goodbye", "!"], vec!["Hel", "lo, WOR", "LD"]] {
        let first = first_breaking(Ending::Drop);
        let p = pieces.clone();
        let second = Mock::script(move |_, _| chat_stream("b", &p));
        let gw = start(
            &format!("{QUIET}{FAST}"),
            &[
                up("first", &first, ""),
                up("second", &second, "prefill: none"),
            ],
        );
        let got = post(&gw, "/v1/chat/completions", stream_body()).await;
        let body = got.text();
        assert_eq!(got.status, 200);
        assert_eq!(content(&body), "Hello, wor", "{pieces:?}: {body}");
        assert!(ends_with_error_event(&body), "{pieces:?}: {body}");
        assert!(!body.contains("[DONE]"), "{body}");
        let rows = gw.records(1);
        assert_eq!(rows[0]["complete"], 0, "{:?}", rows[0]);
        assert_eq!(rows[0]["response"], "Hello, wor", "{:?}", rows[0]);
        let m = scrape_until(&gw, Duration::from_secs(2), |m| {
            sum(m, RESUMES, "result", "diverged") >= 1.0
        })
        .await;
        assert_eq!(sum(&m, RESUMES, "result", "diverged"), 1.0, "{m}");
        assert_eq!(sum(&m, RESUMES, "result", "ok"), 0.0, "{m}");
    }
}

#[actix_rt::test]
async fn a_continuation_nobody_can_make_ends_with_the_error_event() {
    let first = first_breaking(Ending::Drop);
    let second = Mock::always(Reply::status(500));
    let gw = start(
        &format!("{QUIET}{FAST}"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    let body = got.text();
    assert_eq!(content(&body), "Hello, wor", "{body}");
    assert!(ends_with_error_event(&body), "{body}");
    assert_eq!(second.hits(), 1);
    let rows = gw.records(1);
    assert_eq!(rows[0]["complete"], 0, "{:?}", rows[0]);
    let err = rows[0]["error"].as_str().unwrap_or("");
    assert!(err.contains("first: ") && err.contains("second: "), "{err}");
    let m = scrape_until(&gw, Duration::from_secs(2), |m| {
        sum(m, RESUMES, "result", "failed") >= 1.0
    })
    .await;
    assert_eq!(sum(&m, RESUMES, "result", "failed"), 1.0, "{m}");
}

#[actix_rt::test]
async fn not_resumed_tool_calls_n_logprobs_completions_last_candidate() {
    let tool = chunk(
        "a",
        json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"ci"}}]}),
    );
    let logprob = {
        let ev = json!({
            "id": "chatcmpl-a", "object": "chat.completion.chunk", "created": 1700000000, "model": "model-a",
            "choices": [{"index": 0, "delta": {"content": "Hello"},
                "logprobs": {"content": [{"token": "Hello", "logprob": -0.1, "bytes": [72], "top_logprobs": []}]},
                "finish_reason": null}]
        });
        format!("data: {ev}\n\n").into_bytes()
    };
    let completion =
        b"data: {\"id\":\"cmpl-a\",\"object\":\"text_completion\",\"model\":\"model-a\",\"choices\":[{\"index\":0,\"text\":\"Hello\",\"logprobs\":null,\"finish_reason\":null}]}\n\n".to_vec();
    let mut n2 = stream_body();
    n2["n"] = json!(2);
    let mut lp = stream_body();
    lp["logprobs"] = json!(true);
    let cases: Vec<(&str, &str, Value, Vec<Vec<u8>>)> = vec![
        (
            "tool_calls",
            "/v1/chat/completions",
            stream_body(),
            vec![role("a"), tool],
        ),
        (
            "n > 1",
            "/v1/chat/completions",
            n2,
            chat_parts("a", &["Hello"], false),
        ),
        (
            "logprobs",
            "/v1/chat/completions",
            lp,
            vec![role("a"), logprob],
        ),
        (
            "completions",
            "/v1/completions",
            json!({"model": "gpt-test", "stream": true, "prompt": "hi"}),
            vec![completion],
        ),
    ];
    for (what, path, body, parts) in cases {
        let first = Mock::always(sse(parts.clone(), Ending::Drop));
        let second = Mock::always(chat_stream("b", &["UNEXPECTED REQUEST"]));
        let gw = start(
            &format!("{QUIET}{FAST}"),
            &[up("first", &first, ""), up("second", &second, "")],
        );
        let got = post(&gw, path, body).await;
        let text = got.text();
        assert_eq!(got.status, 200, "{what}");
        assert!(
            text.as_bytes().starts_with(&parts.concat()),
            "{what}: {text}"
        );
        assert!(ends_with_error_event(&text), "{what}: {text}");
        assert_eq!(second.hits(), 0, "{what} was resumed");
        let rows = gw.records(1);
        assert_eq!(rows[0]["complete"], 0, "{what}: {:?}", rows[0]);
        assert_eq!(rows[0]["upstream"], "first", "{what}");
    }
    // No candidate left.
    let only = first_breaking(Ending::Drop);
    let gw = start(&format!("{QUIET}{FAST}"), &[up("only", &only, "")]);
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    let text = got.text();
    assert_eq!(content(&text), "Hello, wor");
    assert!(ends_with_error_event(&text), "{text}");
    assert_eq!(only.hits(), 1);
    let rows = gw.records(1);
    assert_eq!(rows[0]["complete"], 0, "{:?}", rows[0]);
    assert_eq!(rows[0]["resumed"], 0, "{:?}", rows[0]);
}

#[actix_rt::test]
async fn a_stream_whose_text_outgrew_the_capture_is_not_resumed() {
    // record_body_bytes: 10 → the capture holds 10 B + 64 KiB; 80 000 chars of text outgrow it.
    let long = "x".repeat(20_000);
    let pieces = [long.as_str(); 4];
    let first = Mock::always(broken_stream("a", &pieces, Ending::Drop));
    let second = Mock::always(chat_stream("b", &["UNEXPECTED REQUEST"]));
    let gw = start(
        &format!("{QUIET}{FAST}record_body_bytes: 10"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    let text = got.text();
    assert_eq!(content(&text).len(), 80_000);
    assert!(ends_with_error_event(&text));
    assert_eq!(second.hits(), 0, "resumed without knowing the whole text");
    let rows = gw.records(1);
    assert_eq!(rows[0]["complete"], 0, "{:?}", rows[0]["error"]);
}

#[actix_rt::test]
async fn a_stream_longer_than_resume_max_bytes_is_not_resumed() {
    // 70,000 bytes of text sent, then the first upstream drops: the capture (1 MiB) could hold
    // it, but a continuation would hand the next upstream a 70 kB prefill chosen by the first.
    let long = "y".repeat(10_000);
    let pieces = [long.as_str(); 7];
    let first = Mock::always(broken_stream("a", &pieces, Ending::Drop));
    let second = Mock::always(chat_stream("b", &["UNEXPECTED REQUEST"]));
    let gw = start(
        &format!("{QUIET}{FAST}"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    let text = got.text();
    assert_eq!(content(&text).len(), 70_000);
    assert!(
        ends_with_error_event(&text),
        "{}",
        &text[text.len() - 200..]
    );
    assert_eq!(
        second.hits(),
        0,
        "the default resume_max_bytes (65536) let it resume"
    );
    assert_eq!(gw.records(1)[0]["complete"], 0);
    drop(gw);
    // With the limit raised, the same break is continued on the second upstream.
    let gw = start(
        &format!("{QUIET}{FAST}resume_max_bytes: 100000"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let got = post(&gw, "/v1/chat/completions", stream_body()).await;
    assert_eq!(second.hits(), 1);
    assert!(got.text().contains("UNEXPECTED REQUEST"));
    assert!(last_message(&second.seen()[0]).to_string().len() > 70_000);
}

// ---------------------------------------------------------------------------------------------
// The official Python SDK as the client.

const SDK_SCRIPT: &str = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
parts = []
try:
    for chunk in client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    print("STREAM:" + "".join(parts))
except openai.APIError as e:
    print("PARTIAL:" + "".join(parts))
    print("ERROR:" + type(e).__name__)
"#;

/// Runs the SDK script against `gw` (tests that call this need `test_sdk_python`).
fn run_sdk(gw: &Gateway) -> String {
    run_python(&sdk_python(), SDK_SCRIPT, &[&gw.url("/v1"), TOKEN])
}

#[test]
#[cfg_attr(
    not(test_sdk_python),
    ignore = "needs the openai Python SDK: set OPENAI_SDK_PYTHON"
)]
fn openai_python_sdk_reads_one_resumed_stream() {
    let first = first_breaking(Ending::Drop);
    let second = continuing("b");
    let gw = start(
        &format!("{QUIET}{FAST}"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let out = run_sdk(&gw);
    assert!(out.contains("STREAM:Hello, world!\n"), "{out}");
    assert_eq!(second.hits(), 1);

    // Regeneration through the SDK: the same exact text.
    let first = first_breaking(Ending::Drop);
    let second = Mock::always(chat_stream("b", &["Hello, w", "orld!"]));
    let gw = start(
        &format!("{QUIET}{FAST}"),
        &[
            up("first", &first, ""),
            up("second", &second, "prefill: none"),
        ],
    );
    let out = run_sdk(&gw);
    assert!(out.contains("STREAM:Hello, world!\n"), "{out}");

    // A rejected prefill, then regeneration, through the SDK.
    let first = first_breaking(Ending::Drop);
    let second = Mock::script(|seen, _| {
        if is_prefill(seen) {
            bad_request("invalid_request")
        } else {
            chat_stream("b", &["Hello, world!"])
        }
    });
    let gw = start(
        &format!("{QUIET}{FAST}"),
        &[up("first", &first, ""), up("second", &second, "")],
    );
    let out = run_sdk(&gw);
    assert!(out.contains("STREAM:Hello, world!\n"), "{out}");
    assert_eq!(second.hits(), 2);
}

#[test]
#[cfg_attr(
    not(test_sdk_python),
    ignore = "needs the openai Python SDK: set OPENAI_SDK_PYTHON"
)]
fn openai_python_sdk_sees_a_diverged_regeneration_as_an_error() {
    let first = first_breaking(Ending::Drop);
    let second = Mock::always(chat_stream("b", &["Goodbye!"]));
    let gw = start(
        &format!("{QUIET}{FAST}"),
        &[
            up("first", &first, ""),
            up("second", &second, "prefill: none"),
        ],
    );
    let out = run_sdk(&gw);
    assert!(out.contains("PARTIAL:Hello, wor\n"), "{out}");
    assert!(out.contains("ERROR:"), "{out}");
    assert_eq!(second.hits(), 1);
}
