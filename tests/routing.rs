//! The `/v1/*` routing that replaced the router's regex (issue 18): every path under `/v1/` still
//! reaches the proxy (or the model list, the WebSocket session, the local preflight), and `/v1`
//! alone is still not a route.

use crate::support::*;

#[actix_rt::test]
async fn v1_paths_reach_the_same_handlers_as_before() {
    let m = Mock::always(Reply::chat("routed"));
    let gw = one(&m, "");
    let a = auth();
    let h = [
        ("authorization", a.as_str()),
        ("content-type", "application/json"),
    ];

    // Any path under /v1/ is proxied, with its path and query as sent.
    for path in [
        "/v1/chat/completions",
        "/v1/embeddings?x=1",
        "/v1/",
        "/v1/a/b/c",
    ] {
        let got = send("POST", &gw.url(path), &h, b"{\"model\":\"m\"}").await;
        assert_eq!(got.status, 200, "{path}: {}", got.text());
        assert!(got.header("x-upstream").is_some(), "{path}");
        assert_eq!(got.header("x-upstream-attempts"), Some("1"), "{path}");
    }
    let seen: Vec<String> = m.seen().iter().map(|s| s.target.clone()).collect();
    for want in [
        "/v1/chat/completions",
        "/v1/embeddings?x=1",
        "/v1/",
        "/v1/a/b/c",
    ] {
        assert!(
            seen.iter()
                .any(|p| p.ends_with(want.trim_start_matches("/v1"))),
            "{want} not forwarded: {seen:?}"
        );
    }

    // The CORS preflight is answered locally, without a token, for any /v1/ path.
    let got = preflight(&gw).await;
    assert!(got.status == 200 || got.status == 204, "{}", got.status);
    assert_eq!(got.header("access-control-allow-origin"), Some("*"));
    let forwarded = m.seen().len();

    // `/v1` itself and paths merely starting with "v1" are not routes; nothing is forwarded.
    for path in ["/v1", "/v1x/chat/completions", "/v2/chat/completions"] {
        let got = send("POST", &gw.url(path), &h, b"{}").await;
        assert_eq!(got.status, 404, "{path}");
    }
    assert_eq!(m.seen().len(), forwarded);

    // The model list is still the gateway's own.
    let got = send(
        "GET",
        &gw.url("/v1/models"),
        &[("authorization", a.as_str())],
        b"",
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["object"], "list");
}

/// The upstream URL and `Host` are assembled from pieces parsed once per upstream, and awc's
/// request buffer is reused across requests (issue 18): on one kept-alive upstream connection,
/// requests of very different sizes, with and without queries, under an endpoint with a base path,
/// arrive exactly as sent.
#[actix_rt::test]
async fn requests_of_any_size_arrive_intact_over_a_reused_upstream_connection() {
    let m = Mock::always(Reply::chat("ok"));
    let endpoint = format!("http://{}/base/v1/", m.addr);
    let gw = Gateway::start(&config("", &[upstream("up", &endpoint, "")]));
    let a = auth();
    let h = [
        ("authorization", a.as_str()),
        ("content-type", "application/json"),
    ];
    let sizes = [10usize, 200_000, 3, 70_000, 9_000, 1, 8_192, 65_536, 2];
    let mut sent = Vec::new();
    for (i, n) in sizes.iter().enumerate() {
        let body = format!("{{\"model\":\"m\",\"pad\":\"{}\"}}", "x".repeat(*n));
        let path = if i % 2 == 0 {
            format!("/v1/chat/completions?i={i}")
        } else {
            "/v1/chat/completions".to_string()
        };
        let got = send("POST", &gw.url(&path), &h, body.as_bytes()).await;
        assert_eq!(got.status, 200, "request {i}: {}", got.text());
        sent.push((path, body));
    }
    let seen = m.seen();
    assert_eq!(seen.len(), sizes.len());
    for (s, (path, body)) in seen.iter().zip(&sent) {
        let want_target = format!("/base{path}");
        assert_eq!(s.target, want_target);
        assert_eq!(s.body, body.as_bytes(), "{want_target}");
        assert_eq!(s.header("host"), Some(m.addr.to_string().as_str()));
        assert_eq!(s.headers.iter().filter(|(k, _)| k == "host").count(), 1);
    }
}
