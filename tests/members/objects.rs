//! Private objects (see docs/members.md, "Objects"): a member with `objects: own` reaches only
//! what its own requests created; everything else is `404 No such object`, sent nowhere; lists
//! keep only its own items. `objects: all` members work as in version 0.3.

use serde_json::{json, Value};

use super::*;

/// alice and bob see their own objects, carol every object.
fn three_members() -> String {
    format!(
        "  - {{name: alice, key: {ALICE}}}\n  - {{name: bob, key: {BOB}, objects: own}}\n  - {{name: carol, key: {CAROL}, objects: all}}"
    )
}

fn no_such(id: &str) -> Value {
    error_body(
        &format!("No such object: {id}"),
        "invalid_request_error",
        "not_found",
    )
}

/// The upstream's counters for `up`: requests by outcome and health.
async fn upstream_counts(gw: &Gateway) -> (f64, Option<f64>) {
    let m = scrape(gw).await;
    let sent: f64 = m
        .samples
        .iter()
        .filter(|s| s.name == "openai_api_route_upstream_requests_total")
        .map(|s| s.value)
        .sum();
    let healthy = m
        .metric("openai_api_route_upstream_healthy")
        .label("upstream", "up")
        .value();
    (sent, healthy)
}

/// bob refers to alice's file and response by path and by every kind of body reference: each is
/// `404 No such object: <id>`, nothing goes upstream, no upstream is blamed; alice and carol
/// still reach them, also after a restart on the same records.
#[actix_rt::test]
async fn another_members_objects_are_no_such_object_and_never_sent() {
    let p = Provider::new("up");
    let db = tempfile::tempdir().unwrap();
    let db_path = db.path().join("records.sqlite").display().to_string();
    let text = members_config("", &three_members(), &[upstream("up", &p.endpoint(), "")]);
    let mut gw = Gateway::start_with(&text, &["-database", &db_path]);
    let file = call(&gw, ALICE, "POST", "/v1/files", Some(json!({"n": 1}))).await;
    let file = file.json()["id"].as_str().unwrap().to_string();
    let body = json!({"model": "gpt-test", "input": "A-SECRET: my password is hunter2"});
    let resp = call(&gw, ALICE, "POST", "/v1/responses", Some(body)).await;
    let resp = resp.json()["id"].as_str().unwrap().to_string();
    let hits = p.mock.hits();
    let sent_before = upstream_counts(&gw).await;
    let attempts: Vec<(&str, String, Option<Value>, &str)> = vec![
        ("GET", format!("/v1/files/{file}"), None, &file),
        ("GET", format!("/v1/files/{file}/content"), None, &file),
        ("DELETE", format!("/v1/files/{file}"), None, &file),
        ("GET", format!("/v1/responses/{resp}"), None, &resp),
        (
            "POST",
            "/v1/responses".into(),
            Some(json!({"model": "gpt-test", "input": "go on", "previous_response_id": resp})),
            &resp,
        ),
        (
            "POST",
            "/v1/batches".into(),
            Some(
                json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
            ),
            &file,
        ),
        (
            "POST",
            "/v1/responses".into(),
            Some(
                json!({"model": "gpt-test", "input": [{"role": "user", "content": [
                {"type": "input_file", "file_id": file}]}]}),
            ),
            &file,
        ),
    ];
    for (method, path, body, id) in &attempts {
        let got = call(&gw, BOB, method, path, body.clone()).await;
        assert_eq!(got.status, 404, "{method} {path}: {}", got.text());
        assert_eq!(got.json(), no_such(id), "{method} {path}");
    }
    assert_eq!(p.mock.hits(), hits, "bob's requests went upstream");
    assert_eq!(
        upstream_counts(&gw).await,
        sent_before,
        "bob's refusals counted upstream"
    );
    // The owner and an `all` member still reach them.
    for key in [ALICE, CAROL] {
        let got = call(&gw, key, "GET", &format!("/v1/files/{file}"), None).await;
        assert_eq!(got.status, 200, "{}", got.text());
    }
    let rows = records_in(std::path::Path::new(&db_path), 2 + attempts.len() + 2);
    let bobs: Vec<&Value> = rows.iter().filter(|r| r["member"] == "bob").collect();
    assert_eq!(bobs.len(), attempts.len());
    assert!(bobs
        .iter()
        .all(|r| r["status"] == 404 && r["upstream"].is_null()));
    assert!(!bobs.iter().any(|r| r.to_string().contains("hunter2")));
    // Owners (and whose they are) come back from the records after a restart.
    drop(gw);
    gw = Gateway::start_with(&text, &["-database", &db_path]);
    let got = call(&gw, BOB, "GET", &format!("/v1/files/{file}"), None).await;
    assert_eq!(got.json(), no_such(&file));
    let got = call(&gw, ALICE, "GET", &format!("/v1/files/{file}"), None).await;
    assert_eq!(got.status, 200, "{}", got.text());
    // alice deletes her file: gone for everyone, then unseen (404 for an own member).
    let got = call(&gw, ALICE, "DELETE", &format!("/v1/files/{file}"), None).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let got = call(&gw, ALICE, "GET", &format!("/v1/files/{file}"), None).await;
    assert_eq!(got.json(), no_such(&file));
}

/// With `rebuild: true` and the chain's owner down, bob's `previous_response_id` to alice's
/// chain is not rebuilt for him (it would show him her conversation): 404, and no upstream saw it.
#[actix_rt::test]
async fn no_member_rebuilds_anothers_chain() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let text = members_config(
        "rebuild: true\ncooldown: {failures: 1, seconds: 60}",
        &three_members(),
        &[
            upstream("a", &a.endpoint(), ""),
            upstream("b", &b.endpoint(), ""),
        ],
    );
    let gw = Gateway::start(&text);
    let mut prev: Option<String> = None;
    for turn in ["A-SECRET: my password is hunter2", "and my pin is 1234"] {
        let mut body = json!({"model": "gpt-test", "input": turn});
        if let Some(p) = &prev {
            body["previous_response_id"] = json!(p);
        }
        let got = call(&gw, ALICE, "POST", "/v1/responses", Some(body)).await;
        assert_eq!(got.status, 200, "{}", got.text());
        prev = got.json()["id"].as_str().map(str::to_string);
    }
    let last = prev.unwrap();
    assert!(last.starts_with("resp_a_"), "{last}");
    a.set_down(true);
    let seen = (a.mock.hits(), b.mock.hits());
    let body =
        json!({"model": "gpt-test", "input": "what did I say?", "previous_response_id": last});
    let got = call(&gw, BOB, "POST", "/v1/responses", Some(body.clone())).await;
    assert_eq!(got.json(), no_such(&last));
    assert_eq!(
        (a.mock.hits(), b.mock.hits()),
        seen,
        "bob's request was sent"
    );
    let m = scrape(&gw).await;
    let rebuilt = m
        .metric("openai_api_route_affinity_total")
        .label("result", "rebuilt")
        .value()
        .unwrap_or(0.0);
    assert_eq!(rebuilt, 0.0);
    // alice's own continuation is rebuilt on b: the refusal was bob's, not the chain's.
    let got = call(&gw, ALICE, "POST", "/v1/responses", Some(body)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("x-upstream"), Some("b"));
    let sent = b.seen_on("/v1/responses");
    assert_eq!(sent.len(), 1, "only alice's rebuilt request reached b");
    assert!(sent[0].json().to_string().contains("hunter2"));
}

/// An id the gateway never saw created: an `own` member gets 404 before any upstream (and
/// teaches nobody an owner); an `all` member's request still looks for it ("not here") and finds
/// it on the second upstream.
#[actix_rt::test]
async fn an_unseen_id_is_404_for_own_members_and_not_here_for_all() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    b.add_file("file-elsewhere-77", b"made outside the gateway");
    let text = members_config(
        "",
        &three_members(),
        &[
            upstream("a", &a.endpoint(), ""),
            upstream("b", &b.endpoint(), ""),
        ],
    );
    let gw = Gateway::start(&text);
    let path = "/v1/files/file-elsewhere-77";
    for key in [ALICE, BOB] {
        let got = call(&gw, key, "GET", path, None).await;
        assert_eq!(got.json(), no_such("file-elsewhere-77"));
    }
    assert_eq!((a.mock.hits(), b.mock.hits()), (0, 0));
    // carol's request goes to a (not here), then b.
    let got = call(&gw, CAROL, "GET", path, None).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("x-upstream"), Some("b"));
    assert_eq!(a.seen_on(path).len(), 1, "bob's refusal taught an owner");
    // Learned through carol's request, the file is still nobody's own: bob cannot reach it.
    let got = call(&gw, BOB, "GET", path, None).await;
    assert_eq!(got.json(), no_such("file-elsewhere-77"));
    assert_eq!(b.seen_on(path).len(), 1);
    let m = scrape(&gw).await;
    let healthy = |up| {
        m.metric("openai_api_route_upstream_healthy")
            .label("upstream", up)
            .value()
    };
    assert_eq!((healthy("a"), healthy("b")), (Some(1.0), Some(1.0)));
}

/// The `data` ids of a list answer.
fn ids(got: &Got) -> Vec<String> {
    got.json()["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", got.text()))
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

/// `GET /v1/files` and `GET /v1/batches` answered to an `own` member keep only its objects:
/// `first_id`/`last_id` describe what is kept, `has_more` is the upstream's.
#[actix_rt::test]
async fn lists_keep_only_the_members_own_objects() {
    let p = Provider::new("up");
    let gw = start(&p.endpoint(), "", &three_members());
    let mut made: Vec<(&str, String)> = Vec::new();
    for key in [ALICE, BOB, ALICE, CAROL, BOB, ALICE] {
        let got = call(
            &gw,
            key,
            "POST",
            "/v1/files",
            Some(json!({"n": made.len()})),
        )
        .await;
        made.push((key, got.json()["id"].as_str().unwrap().to_string()));
    }
    // Newest first, as OpenAI lists them.
    let own = |key: &str| -> Vec<String> {
        made.iter()
            .rev()
            .filter(|(k, _)| *k == key)
            .map(|(_, id)| id.clone())
            .collect()
    };
    let got = call(&gw, ALICE, "GET", "/v1/files", None).await;
    assert_eq!(got.status, 200);
    assert_eq!(ids(&got), own(ALICE));
    let v = got.json();
    assert_eq!(v["first_id"], json!(own(ALICE)[0]));
    assert_eq!(v["last_id"], json!(own(ALICE)[2]));
    assert_eq!(v["has_more"], false);
    assert_eq!(v["object"], "list");
    assert_eq!(
        got.header("content-length")
            .map(|l| l.parse::<usize>().unwrap()),
        Some(got.body.len())
    );
    assert_eq!(
        ids(&call(&gw, BOB, "GET", "/v1/files", None).await),
        own(BOB)
    );
    // carol sees every object.
    let all = call(&gw, CAROL, "GET", "/v1/files", None).await;
    assert_eq!(ids(&all).len(), 6);
    // A page of the four newest: alice's two of them, and the upstream's has_more.
    let got = call(&gw, ALICE, "GET", "/v1/files?limit=4", None).await;
    assert_eq!(ids(&got), own(ALICE)[..2].to_vec());
    assert_eq!(got.json()["has_more"], true);
    assert_eq!(got.json()["last_id"], json!(own(ALICE)[1]));
    // A page without any of bob's: empty, with null ids.
    let got = call(&gw, BOB, "GET", "/v1/files?limit=1", None).await;
    assert_eq!(ids(&got), Vec::<String>::new());
    assert_eq!(got.json()["first_id"], Value::Null);
    assert_eq!(got.json()["has_more"], true);
    // Batches, made from each member's own file.
    for key in [ALICE, BOB] {
        let body = json!({"input_file_id": own(key)[0], "endpoint": "/v1/chat/completions", "completion_window": "24h"});
        let got = call(&gw, key, "POST", "/v1/batches", Some(body)).await;
        assert_eq!(got.status, 200, "{}", got.text());
    }
    let alices = call(&gw, ALICE, "GET", "/v1/batches", None).await;
    let bobs = call(&gw, BOB, "GET", "/v1/batches", None).await;
    assert_eq!((ids(&alices).len(), ids(&bobs).len()), (1, 1));
    assert_ne!(ids(&alices), ids(&bobs));
    assert_eq!(
        ids(&call(&gw, CAROL, "GET", "/v1/batches", None).await).len(),
        2
    );
}
