//! A proxied request's body is parsed as JSON exactly once: the gateway runs in this process, so
//! its whole-body parse counter (`facts::parses`) can be read before and after a mix of requests
//! that each used to parse the body again (a `model_map` rewrite, the added `stream_options`, the
//! sticky key, references).

use std::time::Duration;

use serde_json::json;

use crate::support::*;

/// The gateway, in this process, on its own thread; returns its address.
fn in_process(config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("upstreams.yaml");
    std::fs::write(&cfg, config).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let args = [
        "openai-api-route".to_string(),
        "-addr".into(),
        format!("127.0.0.1:{port}"),
        "-config".into(),
        cfg.display().to_string(),
        "-database".into(),
        "none".into(),
    ];
    let cli = openai_api_route::cli::Cli::try_from_args(args).unwrap();
    let config = openai_api_route::server::load_config(&cli).unwrap();
    std::thread::spawn(move || {
        let _dir = dir;
        let _ = openai_api_route::server::run(cli, config);
    });
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return format!("http://127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("the in-process gateway did not start");
}

// The lock is held across the requests on purpose: the fuzz tests that also parse bodies block
// on their own threads until the count is taken; nothing awaited here takes it.
#[allow(clippy::await_holding_lock)]
#[actix_rt::test]
async fn a_proxied_requests_body_is_parsed_once() {
    let m = Mock::script(|seen, _| {
        if seen.target.contains("responses") {
            Reply::json(
                200,
                json!({"id": "resp_new", "object": "response", "output": []}),
            )
        } else if seen.json().get("stream") == Some(&json!(true)) {
            Reply::sse_chat(&["Hi", " there"], Duration::from_millis(1))
        } else {
            Reply::chat("hello")
        }
    });
    let cfg = config(
        "lb_policy: sticky",
        &[upstream(
            "a",
            &m.endpoint(),
            "model_map: {gpt-4o: mapped-model}",
        )],
    );
    // Nothing else in this test binary parses a request body while this runs.
    let _only = facts_lock();
    let base = in_process(&cfg);
    let auth = auth();
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let bodies = [
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": "gpt-4o-mini", "stream": true, "messages": [], "prompt_cache_key": "k1"}),
        json!({"model": "gpt-4o", "stream": true, "stream_options": {"x": 1}, "messages": [], "user": "u"}),
        json!({"model": "gpt-4o", "input": [{"type": "input_file", "file_id": "file-1"}], "previous_response_id": "resp_old"}),
    ];
    let before = openai_api_route::facts::parses();
    for (i, body) in bodies.iter().enumerate() {
        let path = if i == 3 {
            "/v1/responses"
        } else {
            "/v1/chat/completions"
        };
        let got = send(
            "POST",
            &format!("{base}{path}"),
            &headers,
            body.to_string().as_bytes(),
        )
        .await;
        assert_eq!(got.status, 200, "{i}: {}", got.text());
    }
    let parses = openai_api_route::facts::parses() - before;
    assert_eq!(
        parses,
        bodies.len() as u64,
        "whole-body parses for {} requests",
        bodies.len()
    );
    // The upstream got the edits all the same: the model mapped, usage asked for.
    let seen = m.seen();
    assert_eq!(seen[0].json()["model"], "mapped-model");
    assert_eq!(
        seen[2].json()["stream_options"],
        json!({"x": 1, "include_usage": true})
    );
}
