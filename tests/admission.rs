//! The second probe's rules of version 0.3 for admission and input (see the security guide, "Second
//! probe (0.3): admission and input"): one admission step for the HTTP proxy, the model list and
//! WebSocket upgrades; the new path rules; JSON that is not UTF-8; more override headers; escaping
//! of line separators and bidi controls; `retries` bound. Every attack goes through the real
//! binary; a refusal is only believed when the upstream saw nothing and a well-formed request
//! through the same gateway still works.

use std::time::{Duration, Instant};

use crate::hardening::raw_status;
use crate::realtime::{connect, status_of, WsMock};
use crate::support::*;

/// Paths the second probe sent; each must be refused on every route.
const BAD_PATHS: &[&str] = &[
    "/v1/../admin",
    "/v1/%2e%2e/admin",
    "/v1/..;/admin",
    "/v1/realtime/..;jsessionid=1/x",
    "/v1/%2e%2e%3b/admin",
    "/v1/..%00/admin",
    "/v1/real%00time",
    "/v1/real%09time",
    "/v1/x%0d%0aSet-Cookie:a",
    "/v1/%c0%ae%c0%ae/admin",
    "/v1/%e0%80%ae/admin",
    "/v1/%u002e%u002e/admin",
    "/v1/%25c0%25ae/admin",
];

/// The routes of `/v1/*` that reach an upstream or answer from the gateway's own data: a raw
/// request for `path` by each (HTTP proxy, model list, WebSocket upgrade).
fn route_request(route: &str, path: &str, headers: &str) -> String {
    match route {
        "http" => format!(
            "POST /v1/chat/completions{path} HTTP/1.1\r\nhost: x\r\n{headers}content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
        ),
        "models" => format!(
            "GET /v1/models{path} HTTP/1.1\r\nhost: x\r\n{headers}connection: close\r\n\r\n"
        ),
        _ => format!(
            "GET /v1/realtime{path}?model=m HTTP/1.1\r\nhost: x\r\n{headers}connection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ),
    }
}

/// One admission for every route: each rule of the common step, on each route, answers the same
/// status and sends nothing upstream. A rule added to `admission::admit` gets a row here.
#[actix_rt::test]
async fn every_route_takes_every_admission_rule() {
    let m = Mock::always(Reply::chat("x"));
    let gw = one(&m, "");
    let token = format!("authorization: Bearer {TOKEN}\r\n");
    let looped = format!("{token}via: {}\r\n", ["1.1 openai-api-route"; 5].join(", "));
    // (rule, path suffix, headers, status)
    let rules: &[(&str, &str, &str, u16)] = &[
        ("no token", "", "", 401),
        ("wrong token", "", "authorization: Bearer sk-wrong\r\n", 401),
        ("dot segment", "/%2e%2e", &token, 400),
        ("dot with ;", "/..;", &token, 400),
        ("control character", "/x%00", &token, 400),
        ("overlong UTF-8", "/%c0%ae", &token, 400),
        ("%u escape", "/%u002e", &token, 400),
        ("Via loop", "", &looped, 508),
    ];
    for route in ["http", "models", "websocket"] {
        for (rule, path, headers, want) in rules {
            let (code, _, out) = raw_status(&gw, &route_request(route, path, headers));
            assert_eq!(
                code,
                *want,
                "{route}, {rule}: {}",
                String::from_utf8_lossy(&out)
            );
        }
        assert_eq!(
            m.hits(),
            0,
            "{route}: a refused request reached the upstream"
        );
    }
    // The same requests without the fault: the HTTP proxy and the WebSocket upgrade reach the
    // upstream (which does not speak WebSocket), the model list is answered locally.
    for (route, hits) in [("http", 1), ("models", 1), ("websocket", 2)] {
        let (code, _, out) = raw_status(&gw, &route_request(route, "", &token));
        assert_ne!(code, 0, "{route}: {}", String::from_utf8_lossy(&out));
        assert!(code < 400 || route == "websocket", "{route}: {code}");
        assert_eq!(m.hits(), hits, "{route}");
    }
}

#[actix_rt::test]
async fn websocket_upgrades_take_the_path_rules_and_refuse_a_model_with_a_semicolon() {
    let up = WsMock::start();
    let gw = Gateway::start(&config(
        "",
        &[upstream("rt", &up.endpoint(), "deny: [denied]")],
    ));
    for path in BAD_PATHS.iter().map(|p| format!("{p}?model=m")).chain([
        "/v1/realtime?model=m;model=denied".to_string(),
        "/v1/realtime?model=m%3Bx".to_string(),
        "/v1/realtime?x=1;model=denied".to_string(),
    ]) {
        let err = connect(&gw, &path, &[])
            .await
            .err()
            .unwrap_or_else(|| panic!("{path}: handshake accepted"));
        assert_eq!(status_of(err), 400, "{path}");
    }
    assert!(
        up.handshakes().is_empty(),
        "refused upgrades reached the upstream: {:?}",
        up.handshakes()
    );
    let text = scrape(&gw).await;
    assert_eq!(
        text.metric("openai_api_route_rejected_total")
            .label("reason", "bad_request")
            .value(),
        Some((BAD_PATHS.len() + 3) as f64)
    );
    // Unauthenticated: 401 before anything else.
    let req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/v1/realtime?model=m", gw.addr),
    )
    .unwrap();
    let err = tokio_tungstenite::connect_async(req).await.err().unwrap();
    assert_eq!(status_of(err), 401);

    // A plain session still opens, and override headers do not reach the upstream's handshake.
    let (ws, resp) = connect(
        &gw,
        "/v1/realtime?model=m&x=a;b",
        &[
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("x-original-host", "admin.internal"),
            ("x-host", "admin.internal"),
            ("x-envoy-original-path", "/admin"),
            ("client-ip", "1.2.3.4"),
            ("x-original-forwarded-for", "1.2.3.4"),
            ("openai-beta", "realtime=v1"),
        ],
    )
    .await
    .expect("a plain upgrade opens");
    assert_eq!(resp.status().as_u16(), 101);
    drop(ws);
    assert_eq!(up.handshakes().len(), 1);
    for h in OVERRIDES {
        assert!(up.header(0, h).is_none(), "{h} reached the upstream");
    }
    assert_eq!(up.header(0, "openai-beta").as_deref(), Some("realtime=v1"));
}

#[actix_rt::test]
async fn a_websocket_self_loop_stops_at_five_hops_and_a_looping_via_is_refused() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let cfg = format!(
        "authorization: {TOKEN}\nupstreams:\n  - name: myself\n    endpoint: http://{addr}/v1\n    sk: {TOKEN}\n"
    );
    let gw = Gateway::start_with(&cfg, &["-addr", &addr]);
    let t = Instant::now();
    let err = connect(&gw, "/v1/realtime?model=m", &[])
        .await
        .expect_err("a self-loop must not open");
    assert_eq!(status_of(err), 508);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The client's handshake and the five nested ones it caused, the last refused with 508.
    gw.records(6);
    std::thread::sleep(Duration::from_millis(300));
    let rows: Vec<_> = read_rows(&gw.db_path)
        .into_iter()
        .filter(|r| r["path"] == "/v1/realtime")
        .collect();
    assert_eq!(rows.len(), 6, "{rows:#?}");
    assert!(rows.iter().all(|r| r["status"] == 508), "{rows:#?}");

    // A client's own Via naming the gateway five times: refused, the upstream sees no handshake.
    let up = WsMock::start();
    let gw = Gateway::start(&config("", &[upstream("rt", &up.endpoint(), "")]));
    let via = ["1.1 openai-api-route"; 5].join(", ");
    let err = connect(&gw, "/v1/realtime?model=m", &[("via", &via)])
        .await
        .expect_err("a looping Via must not open");
    assert_eq!(status_of(err), 508);
    assert!(up.handshakes().is_empty());
    let (_ws, resp) = connect(
        &gw,
        "/v1/realtime?model=m",
        &[("via", "1.1 openai-api-route")],
    )
    .await
    .expect("one hop is a chain, not a loop");
    assert_eq!(resp.status().as_u16(), 101);
    let via: Vec<String> = up.handshakes()[0]
        .1
        .iter()
        .filter(|(k, _)| k == "via")
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(via, ["1.1 openai-api-route", "1.1 openai-api-route"]);
}

#[actix_rt::test]
async fn the_model_list_takes_the_same_admission() {
    let m = Mock::always(Reply::chat("x"));
    m.set_models(Reply::models(&["gpt-test"]));
    let gw = one(&m, "");
    let auth = auth();
    let got = get(&gw, "/v1/models").await;
    assert_eq!(got.status, 200, "{}", got.text());
    let via = ["1.1 openai-api-route"; 5].join(", ");
    let got = send(
        "GET",
        &gw.url("/v1/models"),
        &[("authorization", &auth), ("via", &via)],
        b"",
    )
    .await;
    assert_eq!(got.status, 508, "{}", got.text());
    assert_eq!(got.json()["error"]["code"], "loop_detected");
    for path in [
        "/v1/models/%2e%2e",
        "/v1/models/..;",
        "/v1/models/gpt%00",
        "/v1/models/%c0%ae%c0%ae",
        "/v1/models/%u002e",
    ] {
        let req = format!(
            "GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\nconnection: close\r\n\r\n"
        );
        let (code, _, out) = raw_status(&gw, &req);
        assert_eq!(code, 400, "{path}: {}", String::from_utf8_lossy(&out));
    }
    assert_eq!(m.hits(), 0);
    let text = scrape(&gw).await;
    assert_eq!(
        text.metric("openai_api_route_rejected_total")
            .label("reason", "loop")
            .value(),
        Some(1.0)
    );
}

#[actix_rt::test]
async fn http_paths_with_the_second_probe_forms_are_refused() {
    let m = Mock::always(Reply::chat("x"));
    let gw = one(&m, "");
    for path in BAD_PATHS {
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
        );
        let (code, _, out) = raw_status(&gw, &req);
        assert_eq!(code, 400, "{path}: {}", String::from_utf8_lossy(&out));
        assert!(
            String::from_utf8_lossy(&out).contains("invalid_request_error"),
            "{path}"
        );
    }
    assert_eq!(m.hits(), 0, "a refused path reached the upstream");
    for ok in [
        "/v1/files/file-1.jsonl",
        "/v1/x/a;b",
        "/v1/models/caf%C3%A9",
    ] {
        let got = post(&gw, ok, serde_json::json!({})).await;
        assert_eq!(got.status, 200, "{ok}: {}", got.text());
    }
}

/// `{"model":"gpt-4o",…}` in another encoding: (what, bytes).
fn wide_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let json = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    let le: Vec<u8> = json.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let be: Vec<u8> = json.encode_utf16().flat_map(u16::to_be_bytes).collect();
    let le32: Vec<u8> = json
        .chars()
        .flat_map(|c| (c as u32).to_le_bytes())
        .collect();
    let be32: Vec<u8> = json
        .chars()
        .flat_map(|c| (c as u32).to_be_bytes())
        .collect();
    let bom = |b: &[u8], body: &[u8]| [b, body].concat();
    vec![
        ("UTF-16LE", le.clone()),
        ("UTF-16LE with BOM", bom(b"\xFF\xFE", &le)),
        ("UTF-16BE", be.clone()),
        ("UTF-16BE with BOM", bom(b"\xFE\xFF", &be)),
        ("UTF-32LE", le32.clone()),
        ("UTF-32LE with BOM", bom(b"\xFF\xFE\x00\x00", &le32)),
        ("UTF-32BE", be32.clone()),
        ("UTF-32BE with BOM", bom(b"\x00\x00\xFE\xFF", &be32)),
    ]
}

#[actix_rt::test]
async fn json_in_utf16_or_utf32_cannot_pass_deny() {
    let m = Mock::always(Reply::chat("should not be served"));
    let gw = Gateway::start(&config(
        "",
        &[upstream("up", &m.endpoint(), "deny: [\"gpt-4*\"]")],
    ));
    let auth = auth();
    let bodies = wide_bodies();
    let n = bodies.len();
    for (what, body) in &bodies {
        for ct in [
            Some("application/json"),
            Some("application/json; charset=utf-16"),
            None,
        ] {
            let mut headers = vec![("authorization", auth.as_str())];
            headers.extend(ct.map(|c| ("content-type", c)));
            let got = send("POST", &gw.url("/v1/chat/completions"), &headers, body).await;
            assert_eq!(got.status, 400, "{what} {ct:?}: {}", got.text());
            assert_eq!(got.json()["error"]["type"], "invalid_request_error");
        }
    }
    assert_eq!(m.hits(), 0, "a UTF-16/32 body reached the upstream");
    let text = scrape(&gw).await;
    assert_eq!(
        text.metric("openai_api_route_rejected_total")
            .label("reason", "bad_request")
            .value(),
        Some((3 * n) as f64)
    );
    // A body that is not JSON by its content type still passes (uploads are bytes).
    let got = send(
        "POST",
        &gw.url("/v1/files"),
        &[
            ("authorization", &auth),
            ("content-type", "application/octet-stream"),
        ],
        b"\x00\x01\x02\x03",
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(m.hits(), 1);
}

/// Headers the second probe found forwarded (0.3; see the security guide, "Headers").
const OVERRIDES: &[&str] = &[
    "x-http-method",
    "x-method-override",
    "x-original-host",
    "x-host",
    "x-envoy-original-path",
    "client-ip",
    "x-original-forwarded-for",
];

#[actix_rt::test]
async fn more_override_headers_are_not_forwarded_over_http() {
    let m = Mock::always(Reply::chat("x"));
    let gw = one(&m, "");
    let auth = auth();
    let mut headers: Vec<(&str, &str)> = vec![
        ("authorization", &auth),
        ("content-type", "application/json"),
        ("openai-beta", "assistants=v2"),
    ];
    headers.extend(OVERRIDES.iter().map(|h| (*h, "DELETE")));
    let got = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &headers,
        chat_body(false).to_string().as_bytes(),
    )
    .await;
    assert_eq!(got.status, 200);
    let seen = &m.seen()[0];
    for h in OVERRIDES {
        assert!(seen.header(h).is_none(), "{h} reached the upstream");
    }
    assert_eq!(seen.header("openai-beta"), Some("assistants=v2"));
}

/// Characters that break or reorder a line (U+2028, U+2029, bidi controls).
const REORDERING: &[char] = &[
    '\u{2028}', '\u{2029}', '\u{200e}', '\u{200f}', '\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}',
    '\u{202e}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}',
];

#[actix_rt::test]
async fn line_separators_and_bidi_controls_are_escaped_in_alerts_logs_and_the_page() {
    // The sink refuses with a message that would reorder the log line.
    let model: String = std::iter::once("gpt".to_string())
        .chain(REORDERING.iter().map(|c| format!("{c}x")))
        .collect();
    let RefusedAlert { gw, alert, log, .. } =
        refused_alert("bad\u{2028}forged\u{202e}desrever", &model).await;
    assert!(alert.contains("gpt\\u{2028}x\\u{2029}x"), "{alert}");
    assert!(alert.contains("\\u{202e}x"), "{alert}");
    assert!(log.contains("bad\\u{2028}forged\\u{202e}desrever"), "{log}");
    let page = send("GET", &gw.url("/"), &[], b"").await.text();
    assert!(page.contains("gpt\\u{2028}x"), "model not on the page");
    for c in REORDERING {
        assert!(!alert.contains(*c), "{c:?} raw in the alert: {alert}");
        assert!(!log.contains(*c), "{c:?} raw in the log");
        assert!(!page.contains(*c), "{c:?} raw on the status page");
        let reference = format!("&#x{:x};", *c as u32);
        assert!(
            !page.to_lowercase().contains(&reference),
            "{c:?} as {reference}"
        );
    }
}

#[test]
fn retries_above_five_are_a_config_error() {
    let cfg = config(
        "retries: 6",
        &[upstream("u", "http://127.0.0.1:9/v1", "retries: 50")],
    );
    let err = Gateway::try_start(&cfg, &[])
        .err()
        .expect("started with retries above 5");
    assert!(
        err.contains("upstreams.yaml: retries: must be at most 5 (got 6)"),
        "{err}"
    );
    assert!(
        err.contains("upstreams.yaml: upstreams[0].retries: must be at most 5 (got 50)"),
        "{err}"
    );
    let ok = config("retries: 5", &[upstream("u", "http://127.0.0.1:9/v1", "")]);
    Gateway::start(&ok);
}
