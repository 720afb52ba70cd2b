//! Who owns an object, and when that changes (the affinity guide, "Version 0.4: owners that
//! cannot be misled"): `store: false` makes no owner, only answers teach owners and the first one
//! wins, the owner's "not found" is its answer (or, with `rebuild`, the chain goes back to it
//! rebuilt), ids are whole up to 1,024 bytes, and a deleted object is forgotten.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::{affinity, delete, healthy, id_of, outcome, row_with};
use crate::affinity::upload;
use crate::support::*;

/// Only the rule under test moves an upstream: no cooldown from the `set_down` used to steer a
/// create to the second upstream.
const STEADY: &str = "cooldown: {failures: 100, seconds: 30}\n";

/// A gateway in front of `a` then `b` (file order).
fn two(global: &str, a: &Provider, b: &Provider) -> Gateway {
    Gateway::start(&config(
        global,
        &[
            upstream("a", &a.endpoint(), ""),
            upstream("b", &b.endpoint(), ""),
        ],
    ))
}

/// A Responses turn: `extra` is merged into `{"model", "input"}`.
async fn turn(gw: &Gateway, input: &str, extra: Value) -> Got {
    let mut body = json!({"model": "gpt-test", "input": input});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    post(gw, "/v1/responses", body).await
}

/// A create answered by `b` although `a` comes first: `a` is down while it is made.
async fn made_on_b<F: std::future::Future<Output = Got>>(a: &Provider, make: F) -> Got {
    a.set_down(true);
    let got = make.await;
    a.set_down(false);
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("x-upstream"), Some("b"));
    got
}

/// The requests `p` got on `/v1/responses` that continue `id`.
fn continuing(p: &Provider, id: &str) -> usize {
    p.seen_on("/v1/responses")
        .iter()
        .filter(|s| s.json()["previous_response_id"] == id)
        .count()
}

/// Issue 32: `store: false` responses were owned and kept for rebuilding. Nobody owns one: a
/// follow-up naming it is routed as an unseen id, and no chain through it is rebuilt.
#[actix_rt::test]
async fn a_store_false_response_is_owned_by_nobody() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = two(&format!("{STEADY}rebuild: true\n"), &a, &b);
    let unstored = made_on_b(&a, turn(&gw, "keep nothing", json!({"store": false}))).await;
    let id = id_of(&unstored);
    // Unseen: `a` first ("not here"), then `b`, which has it.
    let next = turn(&gw, "and then", json!({"previous_response_id": id})).await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(next.header("x-upstream"), Some("b"));
    assert_eq!(next.header("x-upstream-attempts"), Some("2"));
    assert_eq!(continuing(&a, &id), 1, "a was asked first");
    let m = scrape(&gw).await;
    assert_eq!(affinity(&m, "owner"), 0.0, "{m}");
    assert_eq!(affinity(&m, "not_here"), 1.0, "{m}");
    let rows = gw.records(2);
    assert_eq!(
        row_with(&rows, "/v1/responses", "keep nothing")["object_id"],
        Value::Null
    );
    // The follow-up is b's, but its chain runs through a part nobody kept: when `b` fails, the
    // chain is not rebuilt elsewhere.
    let next_id = id_of(&next);
    b.set_down(true);
    let lost = turn(&gw, "b is down", json!({"previous_response_id": next_id})).await;
    assert_eq!(lost.status, 503, "{}", lost.text());
    assert_eq!(continuing(&a, &next_id), 0, "nothing rebuilt on a");
    assert_eq!(affinity(&scrape(&gw).await, "rebuilt"), 0.0);
}

/// Issue 32: one chat request with `"metadata": {"previous_response_id": …}` answered by `b`
/// made `b` that response's owner, and every follow-up then failed. A body reference routes a
/// request but a 2xx answer never teaches its owner; the follow-up finds the real owner.
#[actix_rt::test]
async fn a_reference_in_metadata_teaches_no_owner() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    a.add_response("resp_made_on_a");
    // `b` first: an unseen id goes there first.
    let gw = Gateway::start(&config(
        "",
        &[
            upstream("b", &b.endpoint(), ""),
            upstream("a", &a.endpoint(), ""),
        ],
    ));
    let chat = post(
        &gw,
        "/v1/chat/completions",
        json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}],
               "metadata": {"previous_response_id": "resp_made_on_a"}}),
    )
    .await;
    assert_eq!(chat.status, 200);
    assert_eq!(chat.header("x-upstream"), Some("b"));
    let next = turn(
        &gw,
        "go on",
        json!({"previous_response_id": "resp_made_on_a"}),
    )
    .await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(next.header("x-upstream"), Some("a"));
    assert_eq!(next.header("x-upstream-attempts"), Some("2"));
    // Learned from that answer: the next follow-up goes straight to `a`.
    let again = turn(
        &gw,
        "again",
        json!({"previous_response_id": "resp_made_on_a"}),
    )
    .await;
    assert_eq!(again.header("x-upstream"), Some("a"));
    assert_eq!(again.header("x-upstream-attempts"), Some("1"));
    assert_eq!(affinity(&scrape(&gw).await, "learned"), 1.0);
}

/// Issue 32: a hostile upstream answering a create with another upstream's id took it over.
/// The first owner keeps it; the conflict is counted.
#[actix_rt::test]
async fn a_hostile_upstream_cannot_take_an_owned_id() {
    let a = Provider::new("a");
    let stolen = Arc::new(Mutex::new(String::new()));
    let s = stolen.clone();
    let hostile = Mock::script(move |_, _| {
        Reply::json(
            200,
            json!({"id": *s.lock().unwrap(), "object": "response", "status": "completed",
                   "output": [], "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}}),
        )
    });
    let gw = Gateway::start(&config(
        STEADY,
        &[
            upstream("a", &a.endpoint(), ""),
            upstream("hostile", &hostile.endpoint(), ""),
        ],
    ));
    let mine = turn(&gw, "mine", json!({})).await;
    assert_eq!(mine.header("x-upstream"), Some("a"));
    let id = id_of(&mine);
    *stolen.lock().unwrap() = id.clone();
    a.set_down(true);
    let steal = turn(&gw, "steal", json!({})).await;
    a.set_down(false);
    assert_eq!(steal.status, 200, "the answer is relayed");
    assert_eq!(steal.header("x-upstream"), Some("hostile"));
    assert_eq!(id_of(&steal), id);
    let next = turn(&gw, "go on", json!({"previous_response_id": id})).await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(next.header("x-upstream"), Some("a"));
    assert_eq!(next.header("x-upstream-attempts"), Some("1"));
    assert_eq!(hostile.hits(), 1);
    assert_eq!(affinity(&scrape(&gw).await, "conflict"), 1.0);
    let rows = gw.records(3);
    assert_eq!(
        row_with(&rows, "/v1/responses", "mine")["object_id"],
        json!(id)
    );
    assert_eq!(
        row_with(&rows, "/v1/responses", "steal")["object_id"],
        Value::Null,
        "the hostile answer created nothing it owns"
    );
}

/// Issue 32: the owner's correct 404 for a deleted object became `owner_failed` (no body, no
/// `X-Upstream`, `upstream` null) and counted toward its cooldown — three GETs of a deleted file
/// took it out of everyone's order. It is the owner's answer, relayed as sent.
#[actix_rt::test]
async fn the_owners_not_found_is_its_answer_and_costs_it_nothing() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    // One counted failure would put `a` in cooldown.
    let gw = two("cooldown: {failures: 1, seconds: 60}\n", &a, &b);
    let file = upload(&gw, "soon gone").await;
    assert_eq!(file.header("x-upstream"), Some("a"));
    let id = id_of(&file);
    // Deleted behind the gateway's back (another client, an expiry).
    a.files.lock().unwrap().remove(&id);
    let sent = json!({"error": {"message": format!("No such File object: {id}"),
        "type": "invalid_request_error", "param": "id", "code": null}})
    .to_string();
    for i in 0..3 {
        let got = get(&gw, &format!("/v1/files/{id}")).await;
        assert_eq!(got.status, 404, "{i}");
        assert_eq!(got.text(), sent, "{i}: relayed as sent");
        assert_eq!(got.header("x-upstream"), Some("a"), "{i}");
        assert_eq!(got.header("x-upstream-attempts"), Some("1"), "{i}");
    }
    assert!(b.seen_on("/v1/files/").is_empty(), "b does not have it");
    let m = scrape(&gw).await;
    assert_eq!(outcome(&m, "a", "http_error"), 3.0, "{m}");
    // The same for a response the owner lost (rebuild is off).
    let first = turn(&gw, "hello", json!({})).await;
    let rid = id_of(&first);
    a.forget_responses();
    let got = turn(&gw, "go on", json!({"previous_response_id": rid})).await;
    assert_eq!(got.status, 400, "{}", got.text());
    assert_eq!(got.json()["error"]["code"], "previous_response_not_found");
    assert_eq!(got.header("x-upstream"), Some("a"));
    // Nothing counted against `a`: other requests still go there first.
    let chat = post(&gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(chat.header("x-upstream"), Some("a"));
    let m = scrape(&gw).await;
    assert_eq!(affinity(&m, "owner_failed"), 0.0, "{m}");
    assert_eq!(healthy(&m, "a"), 1.0, "{m}");
    let rows = gw.records(7);
    let reads: Vec<&Value> = rows
        .iter()
        .filter(|r| r["path"] == format!("/v1/files/{id}"))
        .collect();
    assert_eq!(reads.len(), 3, "{rows:#?}");
    assert!(
        reads
            .iter()
            .all(|r| r["upstream"] == "a" && r["status"] == 404),
        "{reads:#?}"
    );
}

/// Issue 32: ids over 256 bytes were cut in `object_id` and never routed, so with LiteLLM proxy
/// (409-byte Responses ids) as an upstream every second turn failed. Up to 1,024 bytes an id is
/// owned, routed and recorded whole; a longer one is never owned and never cut.
#[actix_rt::test]
async fn ids_up_to_1024_bytes_are_owned_whole_and_longer_ones_never() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = two(STEADY, &a, &b);
    b.set_id_len(409);
    let first = made_on_b(&a, turn(&gw, "litellm", json!({}))).await;
    let id = id_of(&first);
    assert_eq!(id.len(), 409);
    let next = turn(&gw, "second turn", json!({"previous_response_id": id})).await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(next.header("x-upstream"), Some("b"));
    assert_eq!(next.header("x-upstream-attempts"), Some("1"));
    let read = get(&gw, &format!("/v1/responses/{id}")).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.header("x-upstream-attempts"), Some("1"));
    assert_eq!(continuing(&a, &id), 0, "a was never asked");
    assert!(a.seen_on(&format!("/v1/responses/{id}")).is_empty());

    b.set_id_len(1100);
    let long = id_of(&made_on_b(&a, turn(&gw, "too long", json!({}))).await);
    assert_eq!(long.len(), 1100);
    for i in 0..2 {
        let got = turn(
            &gw,
            &format!("long {i}"),
            json!({"previous_response_id": long}),
        )
        .await;
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(got.header("x-upstream"), Some("b"));
        assert_eq!(
            got.header("x-upstream-attempts"),
            Some("2"),
            "{i}: never owned"
        );
    }
    assert_eq!(continuing(&a, &long), 2, "sent whole");
    assert_eq!(continuing(&b, &long), 2, "sent whole");
    let rows = gw.records(6);
    assert_eq!(
        row_with(&rows, "/v1/responses", "litellm")["object_id"],
        json!(id)
    );
    assert_eq!(
        row_with(&rows, "/v1/responses", "too long")["object_id"],
        Value::Null
    );
    assert!(
        rows.iter()
            .filter_map(|r| r["object_id"].as_str())
            .all(|o| o.len() == 409),
        "no id was cut"
    );
}

/// Issue 32: with `rebuild: true`, an owner that lost its state (restarted) answered
/// `previous_response_not_found`, which was relayed although the whole chain was held. The
/// chain is rebuilt and sent to that owner first, then to the next candidates.
#[actix_rt::test]
async fn an_owner_that_lost_a_held_chain_gets_it_rebuilt_first() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = two(&format!("{STEADY}rebuild: true\n"), &a, &b);
    let t1 = turn(&gw, "hello", json!({})).await;
    let id1 = id_of(&t1);
    let t2 = turn(&gw, "more", json!({"previous_response_id": id1})).await;
    let id2 = id_of(&t2);
    assert_eq!(t2.header("x-upstream"), Some("a"));
    a.forget_responses();
    let t3 = turn(
        &gw,
        "after the restart",
        json!({"previous_response_id": id2}),
    )
    .await;
    assert_eq!(t3.status, 200, "{}", t3.text());
    assert_eq!(t3.header("x-upstream"), Some("a"));
    assert_eq!(t3.header("x-upstream-attempts"), Some("2"));
    let rebuilt = a.seen_on("/v1/responses").pop().unwrap().json();
    assert!(rebuilt.get("previous_response_id").is_none(), "{rebuilt}");
    let input = rebuilt["input"].as_array().unwrap();
    assert_eq!(input.len(), 5, "two turns and this input: {rebuilt}");
    assert_eq!(input[0], json!({"role": "user", "content": "hello"}));
    assert_eq!(
        input[4],
        json!({"role": "user", "content": "after the restart"})
    );
    assert!(b.seen_on("/v1/responses").is_empty());
    // The new answer is `a`'s again: the conversation continues there.
    let id3 = id_of(&t3);
    let t4 = turn(&gw, "and on", json!({"previous_response_id": id3})).await;
    assert_eq!(t4.header("x-upstream"), Some("a"));
    assert_eq!(t4.header("x-upstream-attempts"), Some("1"));
    // Lost again, and now it fails the rebuilt request too: the next candidate gets it.
    let id4 = id_of(&t4);
    a.forget_responses();
    a.intercept(|req| {
        let stateless = req.json().get("previous_response_id").is_none();
        (req.method == "POST" && stateless).then(|| Reply::status(503))
    });
    let t5 = turn(&gw, "once more", json!({"previous_response_id": id4})).await;
    assert_eq!(t5.status, 200, "{}", t5.text());
    assert_eq!(t5.header("x-upstream"), Some("b"));
    assert_eq!(t5.header("x-upstream-attempts"), Some("3"));
    let sent = b.seen_on("/v1/responses").pop().unwrap().json();
    assert!(sent.get("previous_response_id").is_none(), "{sent}");
    let m = scrape(&gw).await;
    assert_eq!(affinity(&m, "rebuilt"), 2.0, "{m}");
    assert_eq!(affinity(&m, "owner_failed"), 0.0, "{m}");
    let rows = gw.records(5);
    let rebuilt: Vec<i64> = rows
        .iter()
        .map(|r| r["rebuilt"].as_i64().unwrap())
        .collect();
    assert_eq!(rebuilt, [0, 0, 1, 0, 1], "{rows:#?}");
}

/// Issue 32: a 2xx `DELETE` of an owned object forgets it: a later reference is routed as an
/// unseen id.
#[actix_rt::test]
async fn a_deleted_object_is_forgotten() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = two(STEADY, &a, &b);
    let file = made_on_b(&a, upload(&gw, "short-lived")).await;
    let id = id_of(&file);
    let read = get(&gw, &format!("/v1/files/{id}")).await;
    assert_eq!(read.header("x-upstream-attempts"), Some("1"), "owned by b");
    let gone = delete(&gw, &format!("/v1/files/{id}")).await;
    assert_eq!(gone.status, 200, "{}", gone.text());
    assert_eq!(gone.header("x-upstream"), Some("b"));
    let read = get(&gw, &format!("/v1/files/{id}")).await;
    assert_eq!(read.status, 404);
    assert_eq!(read.header("x-upstream"), Some("b"));
    assert_eq!(
        read.header("x-upstream-attempts"),
        Some("2"),
        "a asked first"
    );
    assert_eq!(a.seen_on(&format!("/v1/files/{id}")).len(), 1);

    let resp = made_on_b(&a, turn(&gw, "short-lived", json!({}))).await;
    let rid = id_of(&resp);
    let gone = delete(&gw, &format!("/v1/responses/{rid}")).await;
    assert_eq!(gone.status, 200, "{}", gone.text());
    let next = turn(&gw, "after", json!({"previous_response_id": rid})).await;
    assert_eq!(next.status, 400, "{}", next.text());
    assert_eq!(
        next.header("x-upstream-attempts"),
        Some("2"),
        "a asked first"
    );
    assert_eq!(continuing(&a, &rid), 1);
}

/// Deleted stays gone after a restart: the record that created the object no longer names it,
/// so the owners read back at start do not bring it back.
#[actix_rt::test]
async fn a_deleted_object_stays_forgotten_after_a_restart() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let cfg = config(
        STEADY,
        &[
            upstream("a", &a.endpoint(), ""),
            upstream("b", &b.endpoint(), ""),
        ],
    );
    let db_dir = tempfile::tempdir().unwrap();
    let db = db_dir.path().join("records.sqlite").display().to_string();
    let gw = Gateway::start_with(&cfg, &["-database", &db]);
    let kept = id_of(&made_on_b(&a, upload(&gw, "kept")).await);
    let gone = id_of(&made_on_b(&a, upload(&gw, "deleted")).await);
    let deleted = delete(&gw, &format!("/v1/files/{gone}")).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    // The records are written in batches: give the writer its tick, then restart on the file.
    std::thread::sleep(std::time::Duration::from_millis(400));
    gw.signal("TERM");
    drop(gw);
    let gw = Gateway::start_with(&cfg, &["-database", &db]);
    let read = get(&gw, &format!("/v1/files/{kept}")).await;
    assert_eq!(
        read.header("x-upstream-attempts"),
        Some("1"),
        "still owned by b"
    );
    let read = get(&gw, &format!("/v1/files/{gone}")).await;
    assert_eq!(read.status, 404, "{}", read.text());
    assert_eq!(
        read.header("x-upstream-attempts"),
        Some("2"),
        "routed as an unseen id: a asked first"
    );
}
