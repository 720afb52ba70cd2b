//! Models and usage (see the observability guide, "Models and token usage (0.2)"): `/v1/models`
//! answered by the gateway from every upstream's list, `route_by_models`, and `force_usage`
//! (usage for every stream, the usage-only chunk kept from the client).

use std::time::{Duration, Instant};

use crate::support::*;

async fn get(gw: &Gateway, path: &str) -> Got {
    let auth = auth();
    send("GET", &gw.url(path), &[("authorization", &auth)], b"").await
}

/// The ids of `/v1/models`, in order.
async fn model_ids(gw: &Gateway) -> Vec<String> {
    let got = get(gw, "/v1/models").await;
    assert_eq!(got.status, 200, "{}", got.text());
    got.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

/// Polls `/v1/models` until `pred` holds on its ids (lists arrive in the background).
async fn wait_for_ids(gw: &Gateway, what: &str, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let ids = model_ids(gw).await;
        if pred(&ids) {
            return ids;
        }
        assert!(Instant::now() < deadline, "{what}: ids stayed {ids:?}");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics(gw: &Gateway) -> String {
    send("GET", &gw.url("/v1/metrics"), &[], b"").await.text()
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[actix_rt::test]
async fn union_of_every_list_in_order_with_filters_map_keys_and_lookups() {
    // One upstream lists 200 models (plus a shared one and an id with a slash), one is down,
    // one has its list in the file.
    let mut big: Vec<String> = (0..200).map(|i| format!("big-{i:03}")).collect();
    big.push("shared".into());
    big.push("meta-llama/Llama-3".into());
    big.push("hidden-1".into());
    let a = Mock::always(Reply::chat("a"));
    a.set_models(Reply::models(
        &big.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let c = Mock::always(Reply::chat("c"));
    let gw = Gateway::start(&config(
        "",
        &[
            upstream("a", &a.endpoint(), "deny: [hidden-*]"),
            upstream("down", &Mock::refused_endpoint(), "model_map: {down-alias: x}"),
            upstream(
                "c",
                &c.endpoint(),
                "models: [shared, c-only, denied-c]\ndeny: [denied-*]\nmodel_map: {alias-c: c-only, \"gpt-*\": c-only}",
            ),
        ],
    ));
    let ids = wait_for_ids(&gw, "a's list", |ids| ids.len() > 200).await;
    let mut want: Vec<String> = big[..202].to_vec();
    want.extend(["down-alias", "c-only", "alias-c"].map(String::from));
    assert_eq!(ids, want);

    let got = get(&gw, "/v1/models").await;
    assert_eq!(got.header("access-control-allow-origin"), Some("*"));
    assert!(got
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let body = got.json();
    assert_eq!(body["object"], "list");
    let entry = |id: &str| {
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        entry("shared"),
        serde_json::json!({"id": "shared", "object": "model", "created": 1700000000, "owned_by": "mock-org"}),
        "the first upstream listing an id gives its entry"
    );
    assert_eq!(entry("c-only")["owned_by"], "c");
    assert_eq!(entry("down-alias")["owned_by"], "down");
    assert_eq!(entry("c-only")["object"], "model");
    // The mock with a file list was never asked; the fetched one got its key.
    assert!(c.model_fetches().is_empty());
    let fetch = &a.model_fetches()[0];
    assert_eq!(fetch.target, "/v1/models");
    assert_eq!(
        fetch.header("authorization"),
        Some("Bearer sk-upstream-a-secret")
    );
    assert_eq!(a.hits(), 0, "a list fetch is not a proxied request");

    // Lookups: hit (also with a slash in the id), miss.
    let t = Instant::now();
    let one = get(&gw, "/v1/models/meta-llama/Llama-3").await;
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(one.status, 200, "{}", one.text());
    assert_eq!(one.json()["id"], "meta-llama/Llama-3");
    assert_eq!(one.json()["owned_by"], "mock-org");
    assert_eq!(one.header("access-control-allow-origin"), Some("*"));
    let enc = get(&gw, "/v1/models/meta-llama%2FLlama-3").await;
    assert_eq!(enc.status, 200);
    assert_eq!(enc.json()["id"], "meta-llama/Llama-3");
    assert_eq!(get(&gw, "/v1/models/alias-c").await.json()["owned_by"], "c");
    for missing in ["hidden-1", "denied-c", "nope", "gpt-*"] {
        let miss = get(&gw, &format!("/v1/models/{missing}")).await;
        assert_eq!(miss.status, 404, "{missing}");
        assert_eq!(miss.json()["error"]["code"], "model_not_found");
        assert_eq!(miss.header("access-control-allow-origin"), Some("*"));
    }

    // Same auth as every /v1 route; preflight still local.
    for path in ["/v1/models", "/v1/models/shared"] {
        let no = send("GET", &gw.url(path), &[], b"").await;
        assert_eq!(no.status, 401);
        assert_eq!(no.json()["error"]["code"], "invalid_api_key");
        assert_eq!(no.header("access-control-allow-origin"), Some("*"));
        let wrong = send(
            "GET",
            &gw.url(path),
            &[("authorization", "Bearer nope")],
            b"",
        )
        .await;
        assert_eq!(wrong.status, 401);
        let pre = send("OPTIONS", &gw.url(path), &[], b"").await;
        assert_eq!(pre.status, 204);
    }
    assert_eq!(a.hits() + c.hits(), 0, "nothing about models was proxied");

    // The status page shows each list's state, never a key.
    let page = send("GET", &gw.url("/"), &[], b"").await.text();
    assert!(page.contains("203 ids"), "a's count");
    assert!(page.contains("3 ids <small>(from config)</small>"));
    assert!(page.contains("request failed"), "down's fetch error");
    assert!(!page.contains("sk-upstream-"));
    assert!(!gw.log().contains("sk-upstream-"));
}

#[actix_rt::test]
async fn listening_and_proxying_do_not_wait_for_a_hanging_list() {
    let hang = Mock::always(Reply::chat("still served"));
    hang.set_models(Reply::Hang);
    let gw = Gateway::start(&config("", &[upstream("hang", &hang.endpoint(), "")]));
    let t = Instant::now();
    let health = send("GET", &gw.url("/healthz"), &[], b"").await;
    assert_eq!(health.status, 200);
    assert_served(&gw, Duration::from_secs(2)).await;
    // The list is unknown while its fetch hangs: the answer is there at once, and empty.
    let list = get(&gw, "/v1/models").await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["data"], serde_json::json!([]));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(eventually(Duration::from_secs(2), || hang
        .model_fetches()
        .len()
        == 1));
    // Unknown list = no filtering, even with route_by_models.
    let gw2 = Gateway::start(&config(
        "route_by_models: true",
        &[upstream("hang", &hang.endpoint(), "")],
    ));
    assert_served(&gw2, Duration::from_secs(2)).await;
}

#[actix_rt::test]
async fn lists_refresh_on_the_interval_and_on_sighup_and_a_failed_fetch_keeps_the_last() {
    let a = Mock::always(Reply::chat("a"));
    a.set_models(Reply::models(&["a1"]));
    let gw = Gateway::start(&config(
        "models_refresh: 0.3",
        &[upstream("a", &a.endpoint(), "")],
    ));
    wait_for_ids(&gw, "first fetch", |ids| ids == ["a1"]).await;
    a.set_models(Reply::models(&["a2", "a3"]));
    wait_for_ids(&gw, "refresh", |ids| ids == ["a2", "a3"]).await;

    // A failing upstream keeps its last good list; the page shows the error and when.
    a.set_models(Reply::status(500));
    let n = a.model_fetches().len();
    assert!(eventually(Duration::from_secs(3), || a
        .model_fetches()
        .len()
        >= n + 2));
    assert_eq!(model_ids(&gw).await, ["a2", "a3"]);
    let page = send("GET", &gw.url("/"), &[], b"").await.text();
    assert!(page.contains("HTTP 500"), "fetch error on the page");
    assert!(page.contains("2 ids"), "last good list on the page");
    assert!(gw.log().contains("model list not fetched (HTTP 500)"));

    // SIGHUP: a long interval now, so only the reload can fetch the new list.
    std::fs::write(
        &gw.config_path,
        config("models_refresh: 600", &[upstream("a", &a.endpoint(), "")]),
    )
    .unwrap();
    gw.signal("HUP");
    assert!(eventually(Duration::from_secs(3), || gw
        .log()
        .contains("SIGHUP: reloaded")));
    actix_rt::time::sleep(Duration::from_millis(400)).await;
    let settled = a.model_fetches().len();
    a.set_models(Reply::models(&["after-reload"]));
    actix_rt::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        a.model_fetches().len(),
        settled,
        "models_refresh: 600 still fetching"
    );
    gw.signal("HUP");
    wait_for_ids(&gw, "reload", |ids| ids == ["after-reload"]).await;
    assert!(!gw.log().contains("sk-upstream-"));
    // Version 0.4: the error is shown only while it is the latest fetch's.
    let page = send("GET", &gw.url("/"), &[], b"").await.text();
    assert!(
        page.contains("1 id<br>"),
        "the new list on the page: {page}"
    );
    assert!(!page.contains("HTTP 500"), "an error a later fetch cured");
    // Fetches are not attempts: no upstream request counted, health untouched.
    let m = metrics(&gw).await;
    assert!(
        !m.contains("openai_api_route_upstream_requests_total{"),
        "{m}"
    );
    assert_eq!(
        metric(&m, "openai_api_route_upstream_healthy{upstream=\"a\"}"),
        Some(1.0)
    );
}

#[actix_rt::test]
async fn route_by_models_skips_upstreams_whose_list_lacks_the_model() {
    let a = Mock::always(Reply::chat("a"));
    a.set_models(Reply::models(&["only-a"]));
    let b = Mock::always(Reply::chat("b"));
    b.set_models(Reply::models(&["gpt-test", "b-deployment"]));
    let unknown = Mock::always(Reply::chat("unknown"));
    let gw = Gateway::start(&config(
        "route_by_models: true",
        &[
            upstream("a", &a.endpoint(), ""),
            upstream("b", &b.endpoint(), "model_map: {b-alias: b-deployment}"),
            upstream("unknown", &unknown.endpoint(), ""),
        ],
    ));
    wait_for_ids(&gw, "both lists", |ids| ids.len() == 4).await;
    assert!(eventually(Duration::from_secs(2), || unknown
        .model_fetches()
        .len()
        == 1));
    let ask = |model: &'static str| {
        let gw = &gw;
        async move {
            let got = post(
                gw,
                "/v1/chat/completions",
                serde_json::json!({"model": model, "messages": []}),
            )
            .await;
            assert_eq!(got.status, 200, "{}", got.text());
            got.header("x-upstream").unwrap().to_string()
        }
    };
    assert_eq!(ask("gpt-test").await, "b");
    assert_eq!(a.hits(), 0, "a does not list gpt-test");
    assert_eq!(ask("only-a").await, "a");
    assert_eq!(ask("b-alias").await, "b", "compared after model_map");
    assert_eq!(b.seen().last().unwrap().json()["model"], "b-deployment");
    assert_eq!(
        ask("elsewhere").await,
        "unknown",
        "an unknown list does not filter"
    );
    assert_eq!((a.hits(), b.hits(), unknown.hits()), (1, 2, 1));

    // Without route_by_models the first upstream is tried for anything.
    let gw = Gateway::start(&config("", &[upstream("a", &a.endpoint(), "")]));
    wait_for_ids(&gw, "a's list", |ids| ids == ["only-a"]).await;
    let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.header("x-upstream"), Some("a"));
}

const E1: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-test\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n";
const E2: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-test\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}],\"usage\":null}\n\n";
const E3: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-test\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"},\"finish_reason\":null}],\"usage\":null}\n\n";
const E4: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-test\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n";
const USAGE: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-test\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2,\"total_tokens\":13}}\n\n";
const DONE: &str = "data: [DONE]\n\n";

/// A stream the way an upstream answers `include_usage`: `"usage": null` on every chunk, then
/// the usage-only chunk; events split across TCP writes at awkward places.
fn usage_stream(with_usage: bool) -> Reply {
    let gap = Duration::from_millis(15);
    let mut chunks = vec![
        (Duration::ZERO, format!("{E1}{}", &E2[..10])),
        (gap, format!("{}{E3}", &E2[10..])),
    ];
    if with_usage {
        chunks.push((gap, format!("{E4}{}", &USAGE[..25])));
        chunks.push((gap, USAGE[25..].to_string()));
    } else {
        chunks.push((gap, E4.to_string()));
    }
    chunks.push((gap, DONE.to_string()));
    Reply::Chunks {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        chunks: chunks
            .into_iter()
            .map(|(d, c)| (d, c.into_bytes()))
            .collect(),
        ending: Ending::Finish,
    }
}

/// Answers like OpenAI: the usage chunk only when the request asked for it.
fn openai_like() -> Mock {
    Mock::script(|req, _| {
        let j = req.json();
        if j["stream"] == true {
            usage_stream(j["stream_options"]["include_usage"] == true)
        } else {
            Reply::chat("plain")
        }
    })
}

fn stream_body(extra: serde_json::Value) -> String {
    let mut v = serde_json::json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    for (k, val) in extra.as_object().unwrap() {
        v[k] = val.clone();
    }
    v.to_string()
}

async fn post_raw(gw: &Gateway, path: &str, body: &str) -> Got {
    let auth = auth();
    send(
        "POST",
        &gw.url(path),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await
}

#[actix_rt::test]
async fn forced_usage_is_recorded_and_counted_but_not_relayed() {
    let up = openai_like();
    let gw = Gateway::start(&config("", &[upstream("u", &up.endpoint(), "")]));
    // Member order and spacing the gateway must keep.
    let body = "{\"stream\": true, \"model\": \"gpt-test\",\n \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"stream_options\": {\"x_keep\": 1}}";
    let got = post_raw(&gw, "/v1/chat/completions", body).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.text(),
        format!("{E1}{E2}{E3}{E4}{DONE}"),
        "byte-exact minus the usage chunk"
    );
    // A naive client that reads choices[0] of every chunk does not break.
    for ev in got.text().split("\n\n").filter(|e| !e.is_empty()) {
        let data = ev.strip_prefix("data: ").unwrap();
        if data != "[DONE]" {
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            assert!(v["choices"][0].is_object(), "{ev}");
        }
    }
    let sent = String::from_utf8(up.seen()[0].body.clone()).unwrap();
    assert_eq!(
        sent,
        "{\"stream\": true, \"model\": \"gpt-test\",\n \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"stream_options\": {\"x_keep\": 1,\"include_usage\":true}}"
    );
    let rec = &gw.records(1)[0];
    assert_eq!(rec["prompt_tokens"], 11);
    assert_eq!(rec["completion_tokens"], 2);
    assert_eq!(rec["total_tokens"], 13);
    assert_eq!(rec["response"], "Hello world");
    assert_eq!(
        rec["request_body"], body,
        "the record keeps the client's body"
    );
    let m = metrics(&gw).await;
    assert_eq!(
        metric(
            &m,
            "openai_api_route_tokens_total{kind=\"prompt\",upstream=\"u\"}"
        ),
        Some(11.0)
    );
    assert_eq!(
        metric(
            &m,
            "openai_api_route_tokens_total{kind=\"completion\",upstream=\"u\"}"
        ),
        Some(2.0)
    );

    // /v1/completions too; a client that asked for usage itself gets it, body untouched.
    let own = stream_body(serde_json::json!({"stream_options": {"include_usage": true}}));
    let got = post_raw(&gw, "/v1/completions", &own).await;
    assert_eq!(got.text(), format!("{E1}{E2}{E3}{E4}{USAGE}{DONE}"));
    assert_eq!(up.seen()[1].body, own.as_bytes());
    let plain = stream_body(serde_json::json!({}));
    post_raw(&gw, "/v1/completions", &plain).await;
    assert_eq!(up.seen()[2].json()["stream_options"]["include_usage"], true);
    // Not a stream, or another endpoint: untouched.
    let embed = "{\"model\":\"e\",\"stream\":true,\"input\":\"x\"}";
    post_raw(&gw, "/v1/embeddings", embed).await;
    assert_eq!(up.seen()[3].body, embed.as_bytes());
    let nonstream = "{\"model\":\"gpt-test\",\"messages\":[]}";
    post_raw(&gw, "/v1/chat/completions", nonstream).await;
    assert_eq!(up.seen()[4].body, nonstream.as_bytes());
}

#[actix_rt::test]
async fn force_usage_false_leaves_the_body_and_stream_untouched() {
    let up = openai_like();
    let other = openai_like();
    let gw = Gateway::start(&config(
        "force_usage: false",
        &[
            upstream("u", &up.endpoint(), ""),
            upstream("forced", &other.endpoint(), "force_usage: true"),
        ],
    ));
    let body = stream_body(serde_json::json!({}));
    let got = post_raw(&gw, "/v1/chat/completions", &body).await;
    assert_eq!(got.text(), format!("{E1}{E2}{E3}{E4}{DONE}"));
    assert_eq!(up.seen()[0].body, body.as_bytes());
    let rec = &gw.records(1)[0];
    assert!(rec["total_tokens"].is_null());
    // A per-upstream value beats the global one.
    let gw = Gateway::start(&config(
        "force_usage: false",
        &[upstream("forced", &other.endpoint(), "force_usage: true")],
    ));
    post_raw(&gw, "/v1/chat/completions", &body).await;
    assert_eq!(
        other.seen()[0].json()["stream_options"]["include_usage"],
        true
    );
}

#[actix_rt::test]
async fn a_400_naming_stream_options_is_repeated_once_without_it_until_reload() {
    let strict = Mock::script(|req, _| {
        if req.json().get("stream_options").is_some() {
            Reply::json(
                400,
                serde_json::json!({"error": {"message": "Unrecognized request argument supplied: stream_options", "type": "invalid_request_error", "param": "stream_options"}}),
            )
        } else {
            usage_stream(false)
        }
    });
    let gw = Gateway::start(&config("", &[upstream("strict", &strict.endpoint(), "")]));
    let body = stream_body(serde_json::json!({}));
    let got = post_raw(&gw, "/v1/chat/completions", &body).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.text(), format!("{E1}{E2}{E3}{E4}{DONE}"));
    assert_eq!(got.header("x-upstream-attempts"), Some("2"));
    let seen = strict.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].json()["stream_options"]["include_usage"], true);
    assert_eq!(
        seen[1].body,
        body.as_bytes(),
        "repeated exactly as the client sent it"
    );
    // Not added again to that upstream.
    let got = post_raw(&gw, "/v1/chat/completions", &body).await;
    assert_eq!(got.status, 200);
    assert_eq!(strict.hits(), 3);
    assert_eq!(strict.seen()[2].body, body.as_bytes());
    // A client's own stream_options is always forwarded (and this 400 is its answer).
    let own = stream_body(serde_json::json!({"stream_options": {"include_usage": true}}));
    let got = post_raw(&gw, "/v1/chat/completions", &own).await;
    assert_eq!(got.status, 400);
    assert!(got.text().contains("stream_options"));
    assert_eq!(strict.hits(), 4);
    // The repeat is no failure: no error, no failed attempt, healthy.
    let recs = gw.records(3);
    assert!(recs[0]["error"].is_null(), "{:?}", recs[0]);
    assert_eq!(recs[0]["attempts"], 2);
    assert_eq!(recs[0]["status"], 200);
    let m = metrics(&gw).await;
    assert_eq!(
        metric(
            &m,
            "openai_api_route_upstream_requests_total{outcome=\"ok\",upstream=\"strict\"}"
        ),
        Some(3.0),
        "{m}"
    );
    assert!(!m.contains("outcome=\"http_error\""), "{m}");
    // After a reload the gateway tries adding it again.
    gw.signal("HUP");
    assert!(eventually(Duration::from_secs(3), || gw
        .log()
        .contains("SIGHUP: reloaded")));
    post_raw(&gw, "/v1/chat/completions", &body).await;
    let seen = strict.seen();
    assert_eq!(seen.len(), 6);
    assert_eq!(seen[4].json()["stream_options"]["include_usage"], true);
    assert_eq!(seen[5].body, body.as_bytes());
}

#[actix_rt::test]
async fn a_crafted_400_cannot_turn_forced_usage_off_for_others() {
    // The upstream refuses this client's body for its own reasons, with `stream_options` in the
    // error text, whether or not the option is there.
    let up = Mock::script(|req, _| {
        if String::from_utf8_lossy(&req.body).contains("poison") {
            Reply::json(
                400,
                serde_json::json!({"error": {"message": "poison is not allowed next to stream_options", "type": "invalid_request_error", "param": "stream_options"}}),
            )
        } else {
            usage_stream(req.json().get("stream_options").is_some())
        }
    });
    let gw = Gateway::start(&config("", &[upstream("u", &up.endpoint(), "")]));
    let crafted = stream_body(serde_json::json!({"user": "poison"}));
    let got = post_raw(&gw, "/v1/chat/completions", &crafted).await;
    assert_eq!(got.status, 400);
    assert!(got.text().contains("stream_options"));
    assert_eq!(up.hits(), 2, "repeated once without the option");
    assert!(up.seen()[1].json().get("stream_options").is_none());
    // The next normal client still gets stream_options added, and its tokens counted.
    let body = stream_body(serde_json::json!({}));
    let got = post_raw(&gw, "/v1/chat/completions", &body).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), format!("{E1}{E2}{E3}{E4}{DONE}"));
    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[2].json()["stream_options"]["include_usage"], true);
    assert!(gw.log().contains("not only because of it"), "{}", gw.log());
    let recs = gw.records(2);
    assert_eq!(recs[1]["total_tokens"], 13);
}

#[actix_rt::test]
async fn another_400_is_relayed_intact_and_not_repeated() {
    let err = serde_json::json!({"error": {"message": "messages must not be empty", "type": "invalid_request_error", "param": "messages"}});
    let e2 = err.clone();
    let up = Mock::always(Reply::json(400, e2));
    let gw = Gateway::start(&config("", &[upstream("u", &up.endpoint(), "")]));
    let got = post_raw(
        &gw,
        "/v1/chat/completions",
        &stream_body(serde_json::json!({})),
    )
    .await;
    assert_eq!(got.status, 400);
    assert_eq!(got.body, err.to_string().as_bytes());
    assert_eq!(up.hits(), 1);
    assert_eq!(got.header("x-upstream-attempts"), Some("1"));
}

const SDK_SCRIPT: &str = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
print("MODELS:" + ",".join(m.id for m in client.models.list()))
print("ONE:" + client.models.retrieve("sdk-model").owned_by)
try:
    client.models.retrieve("missing")
except openai.NotFoundError as e:
    print("MISSING:" + e.code)
parts, empty = [], 0
for chunk in client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True):
    if not chunk.choices:
        empty += 1
    elif chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
print("STREAM:" + "".join(parts) + " EMPTY:%d" % empty)
last = None
for chunk in client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}):
    last = chunk
print("USAGE:%d" % last.usage.total_tokens)
"#;

#[test]
#[cfg_attr(
    not(test_sdk_python),
    ignore = "needs the openai Python SDK: set OPENAI_SDK_PYTHON"
)]
fn openai_python_sdk_models_and_streams_with_forced_usage() {
    let python = sdk_python();
    let up = openai_like();
    up.set_models(Reply::models(&["sdk-model"]));
    let gw = Gateway::start(&config("", &[upstream("u", &up.endpoint(), "")]));
    assert!(eventually(Duration::from_secs(5), || !up
        .model_fetches()
        .is_empty()));
    std::thread::sleep(Duration::from_millis(200));
    let stdout = run_python(&python, SDK_SCRIPT, &[&gw.url("/v1"), TOKEN]);
    assert!(stdout.contains("MODELS:sdk-model\n"), "{stdout}");
    assert!(stdout.contains("ONE:mock-org"), "{stdout}");
    assert!(stdout.contains("MISSING:model_not_found"), "{stdout}");
    assert!(stdout.contains("STREAM:Hello world EMPTY:0"), "{stdout}");
    assert!(stdout.contains("USAGE:13"), "{stdout}");
    // The model list answers are not recorded (0.3; see the security guide, "Second probe (0.3):
    // limits"); the 404 and the two streams are.
    let recs = gw.records(3);
    let streams: Vec<_> = recs.iter().filter(|r| r["stream"] == 1).collect();
    assert_eq!(streams.len(), 2);
    assert!(
        streams.iter().all(|r| r["total_tokens"] == 13),
        "{streams:?}"
    );
}
