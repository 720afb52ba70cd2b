//! State that lives on one upstream (see the affinity guide): owners, references, owner-only
//! routing, "not here", rebuilt chains, and `sticky` with `weight` — through the real binary,
//! against mock providers that know only the objects they created.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

fn two(global: &str, a: &Provider, b: &Provider, extra: &str) -> Gateway {
    Gateway::start(&config(
        global,
        &[
            upstream("a", &a.endpoint(), extra),
            upstream("b", &b.endpoint(), extra),
        ],
    ))
}

async fn get(gw: &Gateway, path: &str) -> Got {
    send("GET", &gw.url(path), &[("authorization", &auth())], b"").await
}

/// One turn of a Responses conversation; returns the answer.
async fn turn(gw: &Gateway, prev: Option<&str>, input: Value) -> Got {
    let mut body = json!({"model": "gpt-test", "input": input});
    if let Some(p) = prev {
        body["previous_response_id"] = json!(p);
    }
    post(gw, "/v1/responses", body).await
}

const BOUNDARY: &str = "affinity-test-boundary";

/// Uploads `content` as a JSONL file through `POST /v1/files` (multipart, with the client key).
pub(crate) async fn upload(gw: &Gateway, content: &str) -> Got {
    let body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"notes.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{content}\r\n--{BOUNDARY}--\r\n"
    );
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    send(
        "POST",
        &gw.url("/v1/files"),
        &[("authorization", &auth()), ("content-type", &ct)],
        body.as_bytes(),
    )
    .await
}

async fn affinity(gw: &Gateway, result: &str) -> f64 {
    scrape(gw)
        .await
        .metric("openai_api_route_affinity_total")
        .label("result", result)
        .value()
        .unwrap_or(0.0)
}

#[actix_rt::test]
async fn a_six_turn_chain_under_round_robin_stays_on_its_owner() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = two("lb_policy: round_robin", &a, &b, "");
    let mut prev: Option<String> = None;
    let mut owner = None;
    for i in 0..6 {
        let got = turn(&gw, prev.as_deref(), json!(format!("turn {i}"))).await;
        assert_eq!(got.status, 200, "turn {i}: {}", got.text());
        let up = got.header("x-upstream").unwrap().to_string();
        assert_eq!(got.header("x-upstream-attempts"), Some("1"), "turn {i}");
        owner.get_or_insert(up.clone());
        assert_eq!(Some(&up), owner.as_ref(), "turn {i} left the chain's owner");
        prev = Some(got.json()["id"].as_str().unwrap().to_string());
    }
    // Other requests still spread.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        seen.insert(got.header("x-upstream").unwrap().to_string());
    }
    assert_eq!(seen.len(), 2, "round_robin still spreads free requests");
    assert_eq!(affinity(&gw, "owner").await, 5.0);
    // The record names the object each answer created.
    let rows = gw.records(10);
    let ids: Vec<&str> = rows
        .iter()
        .filter(|r| r["path"] == "/v1/responses")
        .filter_map(|r| r["object_id"].as_str())
        .collect();
    assert_eq!(ids.len(), 6, "{rows:#?}");
    assert!(ids.iter().all(|id| id.starts_with("resp_")), "{ids:?}");
}

#[actix_rt::test]
async fn a_chain_survives_a_failover_and_a_recovery() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = two("cooldown: {failures: 1, seconds: 1}", &a, &b, "");
    a.set_down(true);
    let mut prev: Option<String> = None;
    for i in 0..6 {
        if i == 3 {
            // `a` comes back and its cooldown runs out: new conversations go there again...
            a.set_down(false);
            actix_rt::time::sleep(Duration::from_millis(1200)).await;
            let fresh = turn(&gw, None, json!("a new conversation")).await;
            assert_eq!(fresh.header("x-upstream"), Some("a"));
        }
        let got = turn(&gw, prev.as_deref(), json!(format!("turn {i}"))).await;
        assert_eq!(got.status, 200, "turn {i}: {}", got.text());
        // ...but this one, started on the fallback, stays there.
        assert_eq!(got.header("x-upstream"), Some("b"), "turn {i}");
        prev = Some(got.json()["id"].as_str().unwrap().to_string());
    }
    // And a conversation started on `a` while it is healthy stays on `a` after `b` fails.
    let first = turn(&gw, None, json!("hello")).await;
    assert_eq!(first.header("x-upstream"), Some("a"));
    let id = first.json()["id"].as_str().unwrap().to_string();
    b.set_down(true);
    let next = turn(&gw, Some(&id), json!("again")).await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(next.header("x-upstream"), Some("a"));
}

#[actix_rt::test]
async fn an_uploaded_file_is_read_from_the_upstream_that_has_it() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = two("lb_policy: round_robin", &a, &b, "");
    let mut ids = Vec::new();
    for i in 0..2 {
        let got = upload(&gw, &format!("line {i}")).await;
        assert_eq!(got.status, 200, "{}", got.text());
        ids.push((
            got.json()["id"].as_str().unwrap().to_string(),
            got.header("x-upstream").unwrap().to_string(),
        ));
    }
    assert_ne!(ids[0].1, ids[1].1, "round_robin spread the uploads");
    for (id, owner) in &ids {
        for _ in 0..3 {
            let meta = get(&gw, &format!("/v1/files/{id}")).await;
            assert_eq!(meta.status, 200, "{}", meta.text());
            assert_eq!(meta.header("x-upstream"), Some(owner.as_str()));
            assert_eq!(meta.header("x-upstream-attempts"), Some("1"));
            let content = get(&gw, &format!("/v1/files/{id}/content")).await;
            assert_eq!(content.status, 200);
            assert!(content.text().starts_with(&format!("{owner}:")));
        }
    }
    // No request for a file ever reached an upstream that does not hold it.
    for p in [&a, &b] {
        for s in p.seen_on("/v1/files/") {
            assert!(
                s.target.contains(&format!("file-{}-", p.name)),
                "{}",
                s.target
            );
        }
    }
}

#[actix_rt::test]
async fn when_the_owner_fails_its_failure_is_the_answer_naming_object_and_owner() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = two("", &a, &b, "");
    let first = turn(&gw, None, json!("hi")).await;
    assert_eq!(first.header("x-upstream"), Some("a"));
    let id = first.json()["id"].as_str().unwrap().to_string();
    a.set_down(true);
    let b_before = b.mock.hits();
    let got = turn(&gw, Some(&id), json!("again")).await;
    assert_eq!(got.status, 503, "{}", got.text());
    let msg = got.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains(&id) && msg.contains("upstream a"), "{msg}");
    assert_eq!(got.json()["error"]["code"], "owner_failed");
    assert_eq!(
        b.mock.hits(),
        b_before,
        "the next upstream does not have the object"
    );
    assert_eq!(affinity(&gw, "owner_failed").await, 1.0);
}

#[actix_rt::test]
async fn objects_of_two_owners_in_one_request_are_a_conflict() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = two("lb_policy: round_robin", &a, &b, "");
    let f1 = upload(&gw, "one").await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let f2 = upload(&gw, "two").await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let hits = a.mock.hits() + b.mock.hits();
    let got = post(
        &gw,
        "/v1/responses",
        json!({"model": "gpt-test", "input": [{"role": "user", "content": [
            {"type": "input_file", "file_id": f1}, {"type": "input_file", "file_id": f2}]}]}),
    )
    .await;
    assert_eq!(got.status, 409, "{}", got.text());
    assert_eq!(got.json()["error"]["type"], "invalid_request_error");
    assert_eq!(a.mock.hits() + b.mock.hits(), hits, "nothing was sent");
    assert_eq!(affinity(&gw, "conflict").await, 1.0);
}

#[actix_rt::test]
async fn not_here_moves_on_without_a_health_penalty_and_teaches_the_owner() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    b.add_file("file-old", b"made before the gateway");
    b.add_response("resp_old");
    let gw = two("cooldown: {failures: 1, seconds: 60}", &a, &b, "");
    let got = get(&gw, "/v1/files/file-old").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("x-upstream"), Some("b"));
    assert_eq!(got.header("x-upstream-attempts"), Some("2"));
    // A 400 whose code ends in `_not_found` is "not here" too.
    let cont = turn(&gw, Some("resp_old"), json!("go on")).await;
    assert_eq!(cont.status, 200, "{}", cont.text());
    assert_eq!(cont.header("x-upstream"), Some("b"));
    let m = scrape(&gw).await;
    let a_attempts: f64 = [
        "ok",
        "http_error",
        "timeout",
        "connect_error",
        "stream_error",
    ]
    .iter()
    .filter_map(|o| {
        m.metric("openai_api_route_upstream_requests_total")
            .label("upstream", "a")
            .label("outcome", o)
            .value()
    })
    .sum();
    assert_eq!(a_attempts, 0.0, "{m}");
    assert_eq!(
        m.metric("openai_api_route_upstream_healthy")
            .label("upstream", "a")
            .value(),
        Some(1.0)
    );
    assert_eq!(affinity(&gw, "not_here").await, 2.0);
    assert_eq!(affinity(&gw, "learned").await, 2.0);
    // Learned: the next read goes straight to `b`; `a` keeps serving other requests first.
    let a_before = a.mock.hits();
    let again = get(&gw, "/v1/files/file-old/content").await;
    assert_eq!(again.header("x-upstream-attempts"), Some("1"));
    assert_eq!(a.mock.hits(), a_before);
    let chat = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(chat.header("x-upstream"), Some("a"), "a is healthy");
    // Nobody has it: the last answer is relayed.
    let none = get(&gw, "/v1/files/file-nowhere").await;
    assert_eq!(none.status, 404);
    assert!(none.text().contains("file-nowhere"), "{}", none.text());
    assert_eq!(none.header("x-upstream"), Some("b"));
}

/// Turns 1–2 on `a` (the second with a function call), then `a` goes down: turn 3 is rebuilt.
async fn chain_then_owner_down(gw: &Gateway, a: &Provider) -> (String, Got) {
    let t1 = turn(gw, None, json!("hello")).await;
    assert_eq!(t1.header("x-upstream"), Some("a"));
    let id1 = t1.json()["id"].as_str().unwrap().to_string();
    let t2 = turn(
        gw,
        Some(&id1),
        json!([{"role": "user", "content": "please use the tool"}]),
    )
    .await;
    assert_eq!(t2.status, 200, "{}", t2.text());
    let id2 = t2.json()["id"].as_str().unwrap().to_string();
    // Records reach the writer within its batch interval; the links are in memory at once.
    a.set_down(true);
    let t3 = turn(
        gw,
        Some(&id2),
        json!([{"type": "function_call_output", "call_id": format!("call_{id2}"), "output": "42"}]),
    )
    .await;
    (id2, t3)
}

#[actix_rt::test]
async fn a_chain_whose_owner_is_down_is_rebuilt_on_the_next_upstream() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = two("rebuild: true", &a, &b, "");
    let (id2, t3) = chain_then_owner_down(&gw, &a).await;
    assert_eq!(t3.status, 200, "{}", t3.text());
    assert_eq!(t3.header("x-upstream"), Some("b"));
    let sent = b.seen_on("/v1/responses").pop().unwrap().json();
    assert!(sent.get("previous_response_id").is_none(), "{sent}");
    assert_eq!(sent["model"], "gpt-test");
    let id1 = id2.replace("_1", "_0");
    let input = sent["input"].as_array().unwrap().clone();
    let expected = vec![
        json!({"role": "user", "content": "hello"}),
        json!({"type": "message", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": format!("a answers {id1}"), "annotations": []}]}),
        json!({"role": "user", "content": "please use the tool"}),
        json!({"type": "message", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": format!("a answers {id2}"), "annotations": []}]}),
        json!({"type": "function_call", "call_id": format!("call_{id2}"), "name": "lookup",
               "arguments": "{\"q\":1}", "status": "completed"}),
        json!({"type": "function_call_output", "call_id": format!("call_{id2}"), "output": "42"}),
    ];
    assert_eq!(input, expected, "rebuilt input, item by item");
    // The new response is b's: the conversation continues there.
    let id3 = t3.json()["id"].as_str().unwrap().to_string();
    let t4 = turn(&gw, Some(&id3), json!("and then?")).await;
    assert_eq!(t4.status, 200, "{}", t4.text());
    assert_eq!(t4.header("x-upstream"), Some("b"));
    assert_eq!(t4.header("x-upstream-attempts"), Some("1"));
    assert_eq!(affinity(&gw, "rebuilt").await, 1.0);
    let rows = gw.records(4);
    let rebuilt: Vec<i64> = rows
        .iter()
        .map(|r| r["rebuilt"].as_i64().unwrap())
        .collect();
    assert_eq!(rebuilt, [0, 0, 1, 0], "{rows:#?}");
}

#[actix_rt::test]
async fn a_chain_with_a_cut_part_is_not_rebuilt() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    // The second turn's body is longer than what records keep: the chain is not whole.
    let gw = two("rebuild: true\nrecord_body_bytes: 120", &a, &b, "");
    let (_, t3) = chain_then_owner_down(&gw, &a).await;
    assert_eq!(t3.status, 503, "{}", t3.text());
    assert_eq!(t3.json()["error"]["code"], "owner_failed");
    assert!(b.seen_on("/v1/responses").is_empty(), "nothing went to b");
    assert_eq!(affinity(&gw, "rebuilt").await, 0.0);
}

#[actix_rt::test]
async fn without_rebuild_the_owners_failure_is_the_answer() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = two("", &a, &b, "");
    let (_, t3) = chain_then_owner_down(&gw, &a).await;
    assert_eq!(t3.status, 503, "{}", t3.text());
    assert!(b.seen_on("/v1/responses").is_empty());
}

#[actix_rt::test]
async fn a_streamed_chain_is_pinned_by_its_first_event() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = two("lb_policy: round_robin", &a, &b, "");
    let mut prev: Option<String> = None;
    let mut owner = None;
    for i in 0..4 {
        let mut body = json!({"model": "gpt-test", "stream": true, "input": format!("turn {i}")});
        if let Some(p) = &prev {
            body["previous_response_id"] = json!(p);
        }
        let got = post(&gw, "/v1/responses", body).await;
        assert_eq!(got.status, 200, "turn {i}: {}", got.text());
        let text = got.text();
        assert!(text.contains("response.completed"), "{text}");
        let up = got.header("x-upstream").unwrap().to_string();
        owner.get_or_insert(up.clone());
        assert_eq!(Some(&up), owner.as_ref(), "turn {i}");
        let id = text
            .split("\"id\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap()
            .to_string();
        assert!(id.starts_with("resp_"), "{id}");
        prev = Some(id);
    }
}

#[actix_rt::test]
async fn without_a_database_owners_live_in_memory() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = Gateway::start_with(
        &config(
            "lb_policy: round_robin\nrebuild: true",
            &[
                upstream("a", &a.endpoint(), ""),
                upstream("b", &b.endpoint(), ""),
            ],
        ),
        &["-database", "none"],
    );
    let mut prev: Option<String> = None;
    for i in 0..4 {
        let got = turn(&gw, prev.as_deref(), json!(format!("turn {i}"))).await;
        assert_eq!(got.status, 200, "turn {i}: {}", got.text());
        assert_eq!(got.header("x-upstream-attempts"), Some("1"));
        prev = Some(got.json()["id"].as_str().unwrap().to_string());
    }
    // Rebuilding works from memory too.
    let owner = if prev.as_deref().unwrap().contains("_a_") {
        &a
    } else {
        &b
    };
    owner.set_down(true);
    let got = turn(&gw, prev.as_deref(), json!("after the owner went down")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_ne!(got.header("x-upstream"), Some(owner.name.as_str()));
}

#[actix_rt::test]
async fn owners_are_read_back_from_the_records_after_a_restart() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite").display().to_string();
    let cfg = config(
        "lb_policy: round_robin",
        &[
            upstream("a", &a.endpoint(), ""),
            upstream("b", &b.endpoint(), ""),
        ],
    );
    let mut files = Vec::new();
    {
        let mut gw = Gateway::start_with(&cfg, &["-database", &db]);
        for i in 0..2 {
            let got = upload(&gw, &format!("line {i}")).await;
            files.push((
                got.json()["id"].as_str().unwrap().to_string(),
                got.header("x-upstream").unwrap().to_string(),
            ));
        }
        gw.signal("TERM");
        assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    }
    assert_ne!(files[0].1, files[1].1);
    // In file order now: without the owners read back, `b`'s file would be asked of `a` first.
    let cfg = cfg.replace("lb_policy: round_robin", "");
    let gw = Gateway::start_with(&cfg, &["-database", &db]);
    for (id, owner) in &files {
        let got = get(&gw, &format!("/v1/files/{id}")).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.header("x-upstream"), Some(owner.as_str()));
        assert_eq!(got.header("x-upstream-attempts"), Some("1"));
    }
}

#[actix_rt::test]
async fn an_owner_removed_by_a_reload_is_forgotten() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = two("lb_policy: round_robin", &a, &b, "");
    let f1 = upload(&gw, "x").await;
    let f2 = upload(&gw, "y").await;
    let on_b = [f1, f2]
        .into_iter()
        .find(|g| g.header("x-upstream") == Some("b"))
        .unwrap();
    let id = on_b.json()["id"].as_str().unwrap().to_string();
    std::fs::write(
        &gw.config_path,
        config("", &[upstream("a", &a.endpoint(), "")]),
    )
    .unwrap();
    gw.signal("HUP");
    assert!(eventually(Duration::from_secs(5), || gw
        .log()
        .contains("SIGHUP: reloaded")));
    // Not pinned to a `b` that is gone: asked like any unseen object, and `a` says not here.
    let got = get(&gw, &format!("/v1/files/{id}")).await;
    assert_eq!(got.status, 404, "{}", got.text());
    assert_eq!(got.header("x-upstream"), Some("a"));
    assert!(!got.text().contains("lives on upstream"), "{}", got.text());
}

#[actix_rt::test]
async fn a_database_of_version_0_2_gains_object_id_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "CREATE TABLE records (id INTEGER PRIMARY KEY, created_at TEXT NOT NULL, ip TEXT,
                method TEXT NOT NULL, path TEXT NOT NULL, model TEXT, stream INTEGER NOT NULL DEFAULT 0,
                upstream TEXT, status INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
                request_body TEXT, response TEXT, prompt_tokens INTEGER, completion_tokens INTEGER,
                total_tokens INTEGER, ttfb_ms INTEGER, duration_ms INTEGER, user_agent TEXT,
                client_key TEXT, finish_reason TEXT, resumed INTEGER NOT NULL DEFAULT 0,
                complete INTEGER NOT NULL DEFAULT 0);
             CREATE INDEX records_created_at ON records(created_at);
             CREATE TABLE records_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO records (created_at, method, path, status) VALUES ('2026-01-01T00:00:00.000Z', 'GET', '/v1/old', 200);
             PRAGMA user_version = 3;",
        )
        .unwrap();
    }
    let p = Provider::new("a");
    let db_arg = db.display().to_string();
    let gw = Gateway::start_with(
        &config("", &[upstream("a", &p.endpoint(), "")]),
        &["-database", &db_arg],
    );
    let id = upload(&gw, "x").await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(eventually(Duration::from_secs(5), || read_rows(&db).len() == 2));
    let rows = read_rows(&db);
    assert_eq!(
        (&rows[0]["object_id"], &rows[0]["rebuilt"]),
        (&Value::Null, &json!(0))
    );
    assert_eq!(
        (&rows[1]["object_id"], &rows[1]["rebuilt"]),
        (&json!(id), &json!(0))
    );
    let index: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'records_object_id'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(index, 1, "object_id is indexed");
}

#[actix_rt::test]
async fn a_chain_whose_owner_is_cooling_is_rebuilt_without_asking_it() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = two(
        "rebuild: true\ncooldown: {failures: 1, seconds: 60}",
        &a,
        &b,
        "",
    );
    let t1 = turn(&gw, None, json!("hello")).await;
    let id1 = t1.json()["id"].as_str().unwrap().to_string();
    a.set_down(true);
    // A request without references fails over from `a`, which goes into cooldown.
    let chat = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(chat.header("x-upstream"), Some("b"));
    let a_hits = a.mock.hits();
    let t2 = turn(&gw, Some(&id1), json!("go on")).await;
    assert_eq!(t2.status, 200, "{}", t2.text());
    assert_eq!(t2.header("x-upstream"), Some("b"));
    assert_eq!(t2.header("x-upstream-attempts"), Some("1"));
    assert_eq!(a.mock.hits(), a_hits, "the cooling owner was not asked");
    assert_eq!(affinity(&gw, "rebuilt").await, 1.0);
}

#[actix_rt::test]
async fn an_owner_that_does_not_serve_the_model_is_a_clear_400() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = Gateway::start(&config(
        "",
        &[
            upstream("a", &a.endpoint(), "deny: [gpt-other]"),
            upstream("b", &b.endpoint(), ""),
        ],
    ));
    let t1 = turn(&gw, None, json!("hello")).await;
    assert_eq!(t1.header("x-upstream"), Some("a"));
    let id1 = t1.json()["id"].as_str().unwrap().to_string();
    let got = post(
        &gw,
        "/v1/responses",
        json!({"model": "gpt-other", "input": "x", "previous_response_id": id1}),
    )
    .await;
    assert_eq!(got.status, 400, "{}", got.text());
    let msg = got.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains(&id1) && msg.contains("upstream a") && msg.contains("gpt-other"),
        "{msg}"
    );
    assert!(b.seen_on("/v1/responses").is_empty());
}
