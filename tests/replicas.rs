//! Several replicas (see the affinity guide, "Several replicas"): two gateway processes sharing one
//! PostgreSQL database know each other's object owners within a second, and `sticky` orders every
//! key the same way in both. Runs when `OPENAI_API_ROUTE_TEST_POSTGRES` is set at build time (else
//! ignored), like `postgres.rs` (whose database helper and lock it shares).
#![allow(clippy::await_holding_lock)]

use std::time::Duration;

use serde_json::json;

use crate::postgres::{admin_url, lock, TestDb};
use crate::support::*;

/// A gateway recording into `url` with these upstreams, in this order.
fn replica(url: &str, global: &str, ups: &[(&str, &Provider)]) -> Gateway {
    let ups: Vec<String> = ups
        .iter()
        .map(|(n, p)| upstream(n, &p.endpoint(), ""))
        .collect();
    Gateway::start_with(&config(global, &ups), &["-database", url])
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn a_chain_started_through_one_replica_continues_through_the_other() {
    let admin = admin_url();
    let _guard = lock();
    let db = TestDb::new(&admin);
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    // Each replica lists the upstreams in another order: without the shared owners, the
    // second would ask `b` first for a chain that lives on `a`.
    let one = replica(&db.url, "", &[("a", &a), ("b", &b)]);
    let two = replica(&db.url, "", &[("b", &b), ("a", &a)]);
    let mut prev: Option<String> = None;
    for i in 0..6 {
        let gw = if i % 2 == 0 { &one } else { &two };
        let mut body = json!({"model": "gpt-test", "input": format!("turn {i}")});
        if let Some(p) = &prev {
            body["previous_response_id"] = json!(p);
        }
        let got = post(gw, "/v1/responses", body).await;
        assert_eq!(got.status, 200, "turn {i}: {}", got.text());
        assert_eq!(got.header("x-upstream"), Some("a"), "turn {i}");
        assert_eq!(got.header("x-upstream-attempts"), Some("1"), "turn {i}");
        prev = Some(got.json()["id"].as_str().unwrap().to_string());
        // Every replica knows an owner at most 1 s after the answer ended (see the affinity
        // guide, "Several replicas").
        actix_rt::time::sleep(Duration::from_millis(1000)).await;
    }
    assert!(
        b.seen_on("/v1/responses").is_empty(),
        "no turn was asked of b"
    );
    let ids: Vec<String> = db.with(|c| {
        c.query(
            "SELECT object_id FROM records WHERE object_id IS NOT NULL ORDER BY id",
            &[],
        )
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect()
    });
    assert_eq!(ids.len(), 6, "{ids:?}");
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn sticky_orders_every_key_the_same_way_in_both_replicas() {
    let admin = admin_url();
    let _guard = lock();
    let db = TestDb::new(&admin);
    let (a, b, c) = (Provider::new("a"), Provider::new("b"), Provider::new("c"));
    let one = replica(
        &db.url,
        "lb_policy: sticky",
        &[("a", &a), ("b", &b), ("c", &c)],
    );
    let two = replica(
        &db.url,
        "lb_policy: sticky",
        &[("c", &c), ("a", &a), ("b", &b)],
    );
    let mut spread = std::collections::HashSet::new();
    for k in 0..150 {
        let body = json!({"model": "gpt-test", "prompt_cache_key": format!("key-{k}"),
                          "messages": [{"role": "user", "content": "hi"}]});
        let x = post(&one, "/v1/chat/completions", body.clone()).await;
        let y = post(&two, "/v1/chat/completions", body).await;
        assert_eq!(x.header("x-upstream"), y.header("x-upstream"), "key-{k}");
        spread.insert(x.header("x-upstream").unwrap().to_string());
    }
    assert_eq!(spread.len(), 3);
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn a_chain_relayed_by_one_replica_is_rebuilt_by_the_other() {
    let admin = admin_url();
    let _guard = lock();
    let db = TestDb::new(&admin);
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let one = replica(&db.url, "rebuild: true", &[("a", &a), ("b", &b)]);
    let two = replica(&db.url, "rebuild: true", &[("a", &a), ("b", &b)]);
    let t1 = post(
        &one,
        "/v1/responses",
        json!({"model": "gpt-test", "input": "hello"}),
    )
    .await;
    let id1 = t1.json()["id"].as_str().unwrap().to_string();
    let t2 = post(
        &one,
        "/v1/responses",
        json!({"model": "gpt-test", "input": "more", "previous_response_id": id1}),
    )
    .await;
    let id2 = t2.json()["id"].as_str().unwrap().to_string();
    actix_rt::time::sleep(Duration::from_millis(1000)).await;
    a.set_down(true);
    let t3 = post(
        &two,
        "/v1/responses",
        json!({"model": "gpt-test", "input": "and now?", "previous_response_id": id2}),
    )
    .await;
    assert_eq!(t3.status, 200, "{}", t3.text());
    assert_eq!(t3.header("x-upstream"), Some("b"));
    let sent = b.seen_on("/v1/responses").pop().unwrap().json();
    let texts: Vec<String> = sent["input"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["content"].to_string())
        .collect();
    assert_eq!(texts.len(), 5, "{sent}");
    assert!(
        texts[0].contains("hello") && texts[2].contains("more") && texts[4].contains("and now?")
    );
}

#[actix_rt::test]
#[cfg_attr(
    not(test_postgres),
    ignore = "needs PostgreSQL: set OPENAI_API_ROUTE_TEST_POSTGRES"
)]
async fn an_owner_learned_through_not_here_is_known_to_the_other_replica() {
    let admin = admin_url();
    let _guard = lock();
    let db = TestDb::new(&admin);
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    // A file made outside the gateway: no record names it, only asking finds its owner.
    b.add_file("file-made-elsewhere", b"hello");
    let one = replica(&db.url, "", &[("a", &a), ("b", &b)]);
    let two = replica(&db.url, "", &[("a", &a), ("b", &b)]);
    let got = get(&one, "/v1/files/file-made-elsewhere").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("x-upstream"), Some("b"));
    assert_eq!(
        got.header("x-upstream-attempts"),
        Some("2"),
        "a said not here"
    );
    // Every replica knows an owner at most 1 s after the answer ended (see the affinity guide,
    // "Several replicas").
    actix_rt::time::sleep(Duration::from_millis(1000)).await;
    let got = get(&two, "/v1/files/file-made-elsewhere").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("x-upstream"), Some("b"));
    assert_eq!(
        got.header("x-upstream-attempts"),
        Some("1"),
        "the second replica asked the owner first"
    );
    assert_eq!(
        a.seen_on("/v1/files").len(),
        1,
        "a was asked once, by the first"
    );
    // A restarted replica reads it back too.
    drop(two);
    let three = replica(&db.url, "", &[("a", &a), ("b", &b)]);
    let got = get(&three, "/v1/files/file-made-elsewhere").await;
    assert_eq!(got.header("x-upstream-attempts"), Some("1"));
    assert_eq!(a.seen_on("/v1/files").len(), 1);
}
