//! Traces (see the tracing guide): what the gateway exports, decoded by an in-test OTLP/HTTP
//! receiver with the `opentelemetry-proto` crate's own message types, and what each upstream
//! attempt receives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// An OTLP/HTTP receiver on 127.0.0.1:0: keeps every POSTed body, answers 200 after `delay`,
/// keeps connections alive (and counts them).
struct Receiver {
    addr: std::net::SocketAddr,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    paths: Arc<Mutex<Vec<String>>>,
    connections: Arc<Mutex<usize>>,
}

impl Receiver {
    fn start(delay: Duration) -> Receiver {
        Receiver::start_closing(delay, false)
    }

    /// With `close`, each connection is closed after its first answer, which does not say so
    /// (as a receiver whose idle timeout closes a kept connection).
    fn start_closing(delay: Duration, close: bool) -> Receiver {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let (b2, p2, c2) = (bodies.clone(), paths.clone(), connections.clone());
        let addr = spawn_server(move |mut sock| {
            let (bodies, paths) = (b2.clone(), p2.clone());
            *c2.lock().unwrap() += 1;
            async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 8192];
                loop {
                    let head_end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        match sock.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match sock.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    tokio::time::sleep(delay).await;
                    paths.lock().unwrap().push(path);
                    bodies
                        .lock()
                        .unwrap()
                        .push(buf[head_end..head_end + len].to_vec());
                    buf.drain(..head_end + len);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if sock.write_all(ok).await.is_err() || close {
                        return;
                    }
                }
            }
        });
        Receiver {
            addr,
            bodies,
            paths,
            connections,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| ExportTraceServiceRequest::decode(&b[..]).expect("a valid OTLP request"))
            .collect()
    }

    fn spans(&self) -> Vec<Span> {
        self.requests()
            .into_iter()
            .flat_map(|r| r.resource_spans)
            .flat_map(|rs| rs.scope_spans)
            .flat_map(|ss| ss.spans)
            .collect()
    }

    /// Waits until at least `n` spans arrived.
    fn wait_spans(&self, n: usize) -> Vec<Span> {
        eventually(Duration::from_secs(10), || self.spans().len() >= n);
        self.spans()
    }

    fn raw(&self) -> Vec<u8> {
        self.bodies.lock().unwrap().concat()
    }
}

/// A gateway exporting to `r` quickly (100 ms batches), with `env` on top.
fn traced(cfg: &str, r: &Receiver, env: &[(&str, &str)]) -> Gateway {
    let endpoint = r.endpoint();
    let mut all = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    all.extend_from_slice(env);
    Gateway::start_env(cfg, &all)
}

fn attr(span: &Span, key: &str) -> Option<String> {
    let v = span.attributes.iter().find(|kv| kv.key == key)?;
    Some(match v.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        Value::ArrayValue(a) => a
            .values
            .iter()
            .filter_map(|v| match v.value.as_ref()? {
                Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(","),
        other => format!("{other:?}"),
    })
}

/// The `service.name` of the resource of the first export `r` received.
fn service_name(r: &Receiver) -> Option<Value> {
    r.requests()[0].resource_spans[0]
        .resource
        .as_ref()
        .expect("a resource on the export")
        .attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

async fn chat(gw: &Gateway, headers: &[(&str, &str)], body: serde_json::Value) -> Got {
    let auth = auth();
    let mut h = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    h.extend_from_slice(headers);
    send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &h,
        body.to_string().as_bytes(),
    )
    .await
}

/// Prints a trace as an indented text tree (the docs show one).
fn render(spans: &[Span]) -> String {
    let mut out = String::new();
    let Some(root) = spans.iter().find(|s| s.kind == SpanKind::Server as i32) else {
        return out;
    };
    let t0 = root.start_time_unix_nano;
    let ms = |t: u64| (t.saturating_sub(t0)) as f64 / 1e6;
    let line =
        |s: &Span, indent: &str, rest: &str| {
            let mut keys: Vec<String> = s
                .attributes
                .iter()
                .map(|kv| format!("{}={}", kv.key, attr(s, &kv.key).unwrap_or_default()))
                .collect();
            keys.sort();
            let status = s
                .status
                .as_ref()
                .filter(|st| st.code == StatusCode::Error as i32)
                .map(|st| format!("  ERROR {:?}", st.message))
                .unwrap_or_default();
            let events: Vec<String> = s
                .events
                .iter()
                .map(|e| format!("{} @{:.1}ms", e.name, ms(e.time_unix_nano)))
                .collect();
            format!(
            "{indent}{} [{} span {}] {:.1}–{:.1} ms{status}\n{rest}    {}\n{rest}    events: {}\n",
            s.name,
            if s.kind == SpanKind::Server as i32 { "server" } else { "client" },
            hex(&s.span_id),
            ms(s.start_time_unix_nano),
            ms(s.end_time_unix_nano),
            keys.join(" "),
            if events.is_empty() { "-".into() } else { events.join(", ") },
        )
        };
    out.push_str(&format!(
        "trace {} (parent {})\n",
        hex(&root.trace_id),
        hex(&root.parent_span_id)
    ));
    out.push_str(&line(root, "", ""));
    for s in spans.iter().filter(|s| s.parent_span_id == root.span_id) {
        out.push_str(&line(s, "  └─ ", "     "));
    }
    out
}

#[actix_rt::test]
async fn a_client_trace_runs_through_the_gateway_and_each_failover_attempt() {
    let r = Receiver::start(Duration::ZERO);
    let bad = Mock::always(Reply::status(500));
    let good = Mock::always(Reply::chat("hello"));
    let gw = traced(
        &config(
            "",
            &[
                upstream("first", &bad.endpoint(), ""),
                upstream("second", &good.endpoint(), ""),
            ],
        ),
        &r,
        &[],
    );
    let tp = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    let got = chat(
        &gw,
        &[("traceparent", &tp), ("tracestate", "vendor=abc")],
        chat_body(false),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    let spans = r.wait_spans(3);
    println!("{}", render(&spans));
    assert_eq!(spans.len(), 3, "{spans:#?}");
    assert_eq!(r.paths.lock().unwrap()[0], "/v1/traces");
    for s in &spans {
        assert_eq!(
            hex(&s.trace_id),
            TRACE,
            "every span is in the client's trace"
        );
        assert_eq!(s.trace_state, "vendor=abc");
    }
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    assert_eq!(hex(&server.parent_span_id), CLIENT_SPAN);
    assert_eq!(server.name, "chat gpt-test");
    let want = [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.request.model", "gpt-test"),
        ("gen_ai.response.model", "gpt-test"),
        ("gen_ai.usage.input_tokens", "5"),
        ("gen_ai.usage.output_tokens", "7"),
        ("http.request.method", "POST"),
        ("url.path", "/v1/chat/completions"),
        ("http.response.status_code", "200"),
        ("openai_api_route.attempts", "2"),
        ("openai_api_route.resumed", "0"),
        ("openai_api_route.rebuilt", "false"),
        ("openai_api_route.complete", "true"),
        ("openai_api_route.client_key", "sk-…cdef"),
    ];
    for (k, v) in want {
        assert_eq!(attr(server, k).as_deref(), Some(v), "{k}");
    }
    // Records are on: the finish reason is read.
    assert_eq!(
        attr(server, "gen_ai.response.finish_reasons").as_deref(),
        Some("stop")
    );
    let attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    assert_eq!(attempts.len(), 2);
    let (a1, a2) = if attempts[0].start_time_unix_nano <= attempts[1].start_time_unix_nano {
        (attempts[0], attempts[1])
    } else {
        (attempts[1], attempts[0])
    };
    for a in [a1, a2] {
        assert_eq!(a.parent_span_id, server.span_id, "attempts are children");
        assert!(a.start_time_unix_nano >= server.start_time_unix_nano);
        assert!(a.end_time_unix_nano <= server.end_time_unix_nano);
        assert_eq!(attr(a, "server.address").as_deref(), Some("127.0.0.1"));
    }
    assert_eq!(
        attr(a1, "openai_api_route.upstream").as_deref(),
        Some("first")
    );
    assert_eq!(
        attr(a1, "http.response.status_code").as_deref(),
        Some("500")
    );
    assert_eq!(
        attr(a1, "openai_api_route.outcome").as_deref(),
        Some("http_error")
    );
    let st = a1.status.as_ref().unwrap();
    assert_eq!(st.code, StatusCode::Error as i32);
    assert!(st.message.contains("500"), "{}", st.message);
    assert_eq!(
        attr(a2, "openai_api_route.upstream").as_deref(),
        Some("second")
    );
    assert_eq!(attr(a2, "openai_api_route.outcome").as_deref(), Some("ok"));
    assert_eq!(
        attr(a2, "server.port").as_deref(),
        Some(good.addr.port().to_string().as_str())
    );
    assert!(a2
        .status
        .as_ref()
        .is_none_or(|s| s.code != StatusCode::Error as i32));
    let fb = a2.events.iter().find(|e| e.name == "first_byte").unwrap();
    assert!(fb.time_unix_nano >= a2.start_time_unix_nano);
    // Each upstream got its own attempt's span id, in the client's trace; the client's own
    // traceparent was replaced, its tracestate passed on.
    for (mock, span) in [(&bad, a1), (&good, a2)] {
        let seen = &mock.seen()[0];
        assert_eq!(
            seen.header("traceparent"),
            Some(format!("00-{TRACE}-{}-01", hex(&span.span_id)).as_str())
        );
        assert_eq!(seen.header("tracestate"), Some("vendor=abc"));
    }
    let service = service_name(&r);
    assert_eq!(service, Some(Value::StringValue("openai-api-route".into())));
}

#[actix_rt::test]
async fn a_malformed_traceparent_starts_a_new_trace_and_is_not_forwarded() {
    let r = Receiver::start(Duration::ZERO);
    let m = Mock::always(Reply::chat("hello"));
    let gw = traced(&config("", &[upstream("up", &m.endpoint(), "")]), &r, &[]);
    let hostile = [
        format!("00-{}-{CLIENT_SPAN}-01", TRACE.to_uppercase()),
        format!("00-{TRACE}-0000000000000000-01"),
        format!("ff-{TRACE}-{CLIENT_SPAN}-01"),
        format!("00-{TRACE}-{CLIENT_SPAN}-01-extra"),
        "garbage".repeat(100),
    ];
    for (i, bad) in hostile.iter().enumerate() {
        let headers = [("traceparent", bad.as_str()), ("tracestate", "evil=1")];
        // awc refuses to send some of these values at all; those that go out must be refused.
        let got = chat(&gw, &headers, chat_body(false)).await;
        assert_eq!(got.status, 200);
        let seen = &m.seen()[i];
        let sent = seen.header("traceparent").unwrap();
        assert_ne!(sent, bad.as_str());
        assert!(!sent.contains(TRACE), "{sent}");
        assert_eq!(
            seen.header("tracestate"),
            None,
            "tracestate goes with its traceparent"
        );
    }
    let spans = r.wait_spans(2 * hostile.len());
    let servers: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    assert_eq!(servers.len(), hostile.len());
    for s in servers {
        assert!(s.parent_span_id.is_empty(), "a new trace has no parent");
        assert_ne!(hex(&s.trace_id), TRACE);
        assert!(s.trace_state.is_empty());
    }
}

#[actix_rt::test]
async fn the_gateways_own_answers_get_spans_but_the_metrics_endpoint_does_not() {
    let r = Receiver::start(Duration::ZERO);
    let m = Mock::always(Reply::chat("hello"));
    // `otel:` in the file, the environment's service name beats it.
    let cfg = config(
        &format!(
            "otel:\n  endpoint: {}/v1/traces\n  service_name: from-file\n",
            r.endpoint()
        ),
        &[upstream("up", &m.endpoint(), "")],
    );
    let gw = Gateway::start_env(
        &cfg,
        &[
            ("OTEL_SERVICE_NAME", "from-env"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let models = get(&gw, "/v1/models").await;
    assert_eq!(models.status, 200);
    let refused = send("POST", &gw.url("/v1/chat/completions"), &[], b"{}").await;
    assert_eq!(refused.status, 401);
    scrape(&gw).await;
    let spans = r.wait_spans(2);
    std::thread::sleep(Duration::from_millis(500));
    let spans = if r.spans().len() > spans.len() {
        r.spans()
    } else {
        spans
    };
    let paths: Vec<String> = spans.iter().filter_map(|s| attr(s, "url.path")).collect();
    assert_eq!(spans.len(), 2, "{paths:?}");
    assert!(!paths.iter().any(|p| p == "/v1/metrics"));
    let by_path: HashMap<String, &Span> = spans
        .iter()
        .map(|s| (attr(s, "url.path").unwrap(), s))
        .collect();
    let list = by_path["/v1/models"];
    assert_eq!(list.name, "GET models");
    assert_eq!(
        attr(list, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attr(list, "openai_api_route.attempts").as_deref(),
        Some("0")
    );
    let no = by_path["/v1/chat/completions"];
    assert_eq!(
        attr(no, "http.response.status_code").as_deref(),
        Some("401")
    );
    assert_eq!(attr(no, "openai_api_route.client_key"), None);
    let service = service_name(&r);
    assert_eq!(service, Some(Value::StringValue("from-env".into())));
}

#[actix_rt::test]
async fn samplers_decide_what_is_exported() {
    let m = Mock::always(Reply::chat("hello"));
    let cfg = config("", &[upstream("up", &m.endpoint(), "")]);
    for env in [
        &[("OTEL_TRACES_SAMPLER", "always_off")][..],
        &[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0"),
        ],
    ] {
        let r = Receiver::start(Duration::ZERO);
        let gw = traced(&cfg, &r, env);
        for _ in 0..5 {
            assert_eq!(chat(&gw, &[], chat_body(false)).await.status, 200);
        }
        // The upstream still gets a (not sampled) traceparent of the request's trace.
        let sent = m
            .seen()
            .last()
            .unwrap()
            .header("traceparent")
            .unwrap()
            .to_string();
        assert!(sent.starts_with("00-") && sent.ends_with("-00"), "{sent}");
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(
            r.bodies.lock().unwrap().len(),
            0,
            "{env:?}: nothing exported"
        );
    }
    // Parent-based (the default): a client's sampled=0 is obeyed, its sampled=1 too.
    let r = Receiver::start(Duration::ZERO);
    let gw = traced(&cfg, &r, &[]);
    let off = format!("00-{TRACE}-{CLIENT_SPAN}-00");
    assert_eq!(
        chat(&gw, &[("traceparent", &off)], chat_body(false))
            .await
            .status,
        200
    );
    let sent = m
        .seen()
        .last()
        .unwrap()
        .header("traceparent")
        .unwrap()
        .to_string();
    assert!(
        sent.starts_with(&format!("00-{TRACE}-")) && sent.ends_with("-00"),
        "{sent}"
    );
    let on = "00-11111111111111111111111111111111-2222222222222222-01";
    assert_eq!(
        chat(&gw, &[("traceparent", on)], chat_body(false))
            .await
            .status,
        200
    );
    let spans = r.wait_spans(2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(r.spans().len(), 2);
    assert!(spans
        .iter()
        .all(|s| hex(&s.trace_id) == "11111111111111111111111111111111"));
}

#[actix_rt::test]
async fn no_key_token_body_or_reply_text_is_ever_in_a_span() {
    let r = Receiver::start(Duration::ZERO);
    let bad = Mock::always(Reply::json(
        500,
        serde_json::json!({"error": {"message": "UPSTREAM-ERROR-BODY-5d1"}}),
    ));
    let good = Mock::script(|seen, _| {
        if seen.json()["stream"] == true {
            Reply::sse_chat(&["REPLY-", "MARKER-", "9c1e"], Duration::from_millis(5))
        } else {
            Reply::chat("REPLY-MARKER-9c1e")
        }
    });
    let gw = traced(
        &config(
            "",
            &[
                upstream("first", &bad.endpoint(), ""),
                upstream("second", &good.endpoint(), ""),
            ],
        ),
        &r,
        &[],
    );
    for stream in [false, true] {
        let body = serde_json::json!({"model": "gpt-test", "stream": stream,
            "messages": [{"role": "user", "content": "PROMPT-MARKER-7f3a"}]});
        let got = chat(&gw, &[], body).await;
        assert_eq!(got.status, 200);
        assert!(got.text().contains("9c1e"));
    }
    r.wait_spans(6);
    let raw = r.raw();
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.contains("gpt-test"),
        "the search below looks in the right bytes"
    );
    for secret in [
        "sk-upstream-first-secret",
        "sk-upstream-second-secret",
        TOKEN,
        "PROMPT-MARKER",
        "REPLY-",
        "MARKER-9c1e",
        "UPSTREAM-ERROR-BODY",
        "Bearer",
    ] {
        assert!(!text.contains(secret), "{secret} is in an exported span");
    }
}

#[actix_rt::test]
async fn a_receiver_that_is_down_never_slows_a_request_and_its_spans_are_counted_dropped() {
    let m = Mock::always(Reply::chat("hello"));
    let closed = Mock::refused_endpoint();
    let closed = closed.trim_end_matches("/v1");
    let gw = Gateway::start_env(
        &config("", &[upstream("up", &m.endpoint(), "")]),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", closed),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(chat(&gw, &[], chat_body(false)).await.status, 200);
        worst = worst.max(t.elapsed());
    }
    assert!(
        worst < Duration::from_millis(1000),
        "slowest request {worst:?}"
    );
    // Two spans per request (server + attempt), every one dropped.
    let got = scrape_until(&gw, Duration::from_secs(10), |m| {
        m.metric("openai_api_route_spans_dropped_total").value() >= Some(40.0)
    })
    .await;
    assert_eq!(
        got.metric("openai_api_route_spans_dropped_total").value(),
        Some(40.0)
    );
    assert!(gw.log().contains("trace export to"), "{}", gw.log());
}

#[actix_rt::test]
async fn a_receiver_that_hangs_never_slows_a_request_and_a_full_queue_drops() {
    let r = Receiver::start(Duration::from_secs(10));
    let m = Mock::always(Reply::chat("hello"));
    let gw = traced(
        &config("", &[upstream("up", &m.endpoint(), "")]),
        &r,
        &[
            ("OTEL_BSP_MAX_QUEUE_SIZE", "4"),
            ("OTEL_BSP_SCHEDULE_DELAY", "10"),
        ],
    );
    // Baseline without a trace backend in the way is a few ms; the exporter is stuck for 10 s.
    let mut worst = Duration::ZERO;
    let t0 = Instant::now();
    for _ in 0..30 {
        let t = Instant::now();
        assert_eq!(chat(&gw, &[], chat_body(false)).await.status, 200);
        worst = worst.max(t.elapsed());
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        worst < Duration::from_millis(1000),
        "slowest request {worst:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    let got = scrape_until(&gw, Duration::from_secs(5), |m| {
        m.metric("openai_api_route_spans_dropped_total").value() >= Some(2.0)
    })
    .await;
    let dropped = got
        .metric("openai_api_route_spans_dropped_total")
        .value()
        .unwrap_or(0.0);
    // At most the batch in flight and the queue's 4 requests are held; the rest was dropped.
    assert!(dropped >= 40.0, "dropped {dropped}");
}

#[actix_rt::test]
async fn a_continuation_is_an_attempt_span_with_its_own_traceparent() {
    let r = Receiver::start(Duration::ZERO);
    let event = |text: &str| {
        let ev =
            serde_json::json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": text}}]});
        format!("data: {ev}\n\n").into_bytes()
    };
    let a = Mock::always(Reply::Chunks {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        chunks: vec![
            (Duration::ZERO, event("Hel")),
            (Duration::from_millis(20), event("lo")),
        ],
        ending: Ending::Drop,
    });
    let b = Mock::always(Reply::sse_chat(&[" world"], Duration::from_millis(5)));
    let gw = traced(
        &config(
            "resume: true\nstream_timeout: 2\nidle_timeout: 2",
            &[
                upstream("a", &a.endpoint(), ""),
                upstream("b", &b.endpoint(), ""),
            ],
        ),
        &r,
        &[],
    );
    let got = chat(&gw, &[], chat_body(true)).await;
    assert_eq!(got.status, 200);
    assert!(got.text().contains(" world"), "{}", got.text());
    let spans = r.wait_spans(3);
    println!("{}", render(&spans));
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    assert_eq!(
        attr(server, "openai_api_route.resumed").as_deref(),
        Some("1")
    );
    assert_eq!(
        attr(server, "openai_api_route.attempts").as_deref(),
        Some("2")
    );
    let by_up = |name: &str| {
        spans
            .iter()
            .find(|s| attr(s, "openai_api_route.upstream").as_deref() == Some(name))
            .unwrap()
    };
    let (sa, sb) = (by_up("a"), by_up("b"));
    assert_eq!(
        attr(sa, "openai_api_route.outcome").as_deref(),
        Some("stream_error")
    );
    assert_eq!(sa.status.as_ref().unwrap().code, StatusCode::Error as i32);
    assert_eq!(
        attr(sb, "openai_api_route.continuation").as_deref(),
        Some("true")
    );
    assert_eq!(attr(sb, "openai_api_route.outcome").as_deref(), Some("ok"));
    for (mock, span) in [(&a, sa), (&b, sb)] {
        assert_eq!(span.parent_span_id, server.span_id);
        let want = format!("00-{}-{}-01", hex(&server.trace_id), hex(&span.span_id));
        assert_eq!(mock.seen()[0].header("traceparent"), Some(want.as_str()));
    }
}

// tungstenite fixes the callback's error type (a whole HTTP response).
#[allow(clippy::result_large_err)]
#[actix_rt::test]
async fn a_websocket_session_is_a_server_span_with_its_handshake_attempt() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    let r = Receiver::start(Duration::ZERO);
    let headers: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let h2 = headers.clone();
    let upstream_addr = spawn_server(move |sock| {
        let h = h2.clone();
        async move {
            let cb = move |req: &Request, resp: Response| {
                *h.lock().unwrap() = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect();
                Ok(resp)
            };
            if let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(sock, cb).await {
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_close() || ws.send(m).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let gw = traced(
        &config(
            "",
            &[upstream("rt", &format!("http://{upstream_addr}/v1"), "")],
        ),
        &r,
        &[],
    );
    let url = format!("ws://{}/v1/realtime?model=gpt-rt", gw.addr);
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", auth().parse().unwrap());
    let tp = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    req.headers_mut().insert("traceparent", tp.parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(WsMessage::Text("hello".into())).await.unwrap();
    let echo = ws.next().await.unwrap().unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "hello");
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let spans = r.wait_spans(2);
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    assert_eq!(server.name, "realtime gpt-rt");
    assert_eq!(hex(&server.trace_id), TRACE);
    assert_eq!(hex(&server.parent_span_id), CLIENT_SPAN);
    assert_eq!(
        attr(server, "gen_ai.operation.name").as_deref(),
        Some("realtime")
    );
    assert_eq!(
        attr(server, "http.response.status_code").as_deref(),
        Some("101")
    );
    let attempt = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .unwrap();
    assert_eq!(attempt.parent_span_id, server.span_id);
    assert_eq!(
        attr(attempt, "openai_api_route.upstream").as_deref(),
        Some("rt")
    );
    let sent = headers
        .lock()
        .unwrap()
        .iter()
        .find(|(k, _)| k == "traceparent")
        .map(|(_, v)| v.clone());
    assert_eq!(
        sent,
        Some(format!("00-{TRACE}-{}-01", hex(&attempt.span_id)))
    );
}

#[actix_rt::test]
async fn exports_keep_one_connection_to_the_receiver() {
    let r = Receiver::start(Duration::ZERO);
    let m = Mock::always(Reply::chat("hello"));
    let gw = traced(&config("", &[upstream("up", &m.endpoint(), "")]), &r, &[]);
    for i in 1..=3 {
        assert_eq!(chat(&gw, &[], chat_body(false)).await.status, 200);
        r.wait_spans(2 * i);
    }
    assert_eq!(
        r.bodies.lock().unwrap().len(),
        3,
        "one export per request here"
    );
    assert_eq!(*r.connections.lock().unwrap(), 1);
}

#[actix_rt::test]
async fn a_kept_connection_the_receiver_closed_is_replaced_without_losing_spans() {
    let r = Receiver::start_closing(Duration::ZERO, true);
    let m = Mock::always(Reply::chat("hello"));
    let gw = traced(&config("", &[upstream("up", &m.endpoint(), "")]), &r, &[]);
    for i in 1..=3 {
        assert_eq!(chat(&gw, &[], chat_body(false)).await.status, 200);
        r.wait_spans(2 * i);
    }
    assert_eq!(r.bodies.lock().unwrap().len(), 3);
    assert_eq!(*r.connections.lock().unwrap(), 3);
    let got = scrape(&gw).await;
    assert_eq!(
        got.metric("openai_api_route_spans_dropped_total").value(),
        Some(0.0)
    );
}

/// An upstream's error text may quote the prompt: the public status page and the exported spans
/// show the gateway's own words for the failure, only the operator's record holds the upstream's
/// (see the security guide, "Upstream text stays with the operator").
#[actix_rt::test]
async fn upstream_error_text_reaches_the_record_but_not_the_page_or_the_spans() {
    use crate::rescue::{chat_stream, sse};
    const QUOTE: &str = "PROMPT-QUOTE-7731";
    let event = format!(
        "data: {{\"error\":{{\"message\":\"too long: {QUOTE} ...\",\"type\":\"server_error\"}}}}\n\n"
    );
    let r = Receiver::start(Duration::ZERO);
    let quoting = Mock::always(sse(vec![event.into_bytes()], Ending::Finish));
    let good = Mock::always(chat_stream("good", &["fine"]));
    let gw = traced(
        &config(
            "cooldown: {failures: 100, seconds: 1}",
            &[
                upstream("quoting", &quoting.endpoint(), ""),
                upstream("good", &good.endpoint(), ""),
            ],
        ),
        &r,
        &[],
    );
    let got = chat(&gw, &[], chat_body(true)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(quoting.hits(), 1, "the in-band error moved on");

    let rows = gw.records(1);
    let error = rows[0]["error"].as_str().unwrap_or("");
    assert!(
        error.contains(QUOTE),
        "the record keeps the upstream's words: {error}"
    );
    let html = send("GET", &gw.url("/"), &[], b"").await.text();
    assert!(
        html.contains("Last 20 failed attempts") && html.contains("in-band error event"),
        "the page lists the failure in the gateway's words: {html}"
    );
    assert!(!html.contains(QUOTE), "upstream text on the public page");
    let spans = r.wait_spans(3);
    let raw = String::from_utf8_lossy(&r.raw()).into_owned();
    assert!(
        raw.contains("in-band error event"),
        "the failed attempt's span names it in the gateway's words: {}",
        render(&spans)
    );
    assert!(!raw.contains(QUOTE), "upstream text in an exported span");
}
