//! `lb_policy: sticky` and `weight` (see the affinity guide, "Sticky and weight") through the real
//! binary: a key stays on one upstream while it is healthy, keys spread by weight, and a cooldown
//! or a reload that removes an upstream moves only the keys that preferred it.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::support::*;

/// The upstream each key lands on.
async fn placement(gw: &Gateway, keys: std::ops::Range<usize>) -> HashMap<usize, String> {
    let mut out = HashMap::new();
    for k in keys {
        let body = json!({"model": "gpt-test", "prompt_cache_key": format!("key-{k}"),
                          "messages": [{"role": "user", "content": "hi"}]});
        let got = post(gw, "/v1/chat/completions", body).await;
        assert_eq!(got.status, 200, "{}", got.text());
        out.insert(k, got.header("x-upstream").unwrap().to_string());
    }
    out
}

fn shares(placed: &HashMap<usize, String>, names: &[&str]) -> Vec<f64> {
    names
        .iter()
        .map(|n| placed.values().filter(|v| v == n).count() as f64 / placed.len() as f64)
        .collect()
}

fn three(global: &str, ps: &[&Provider], weights: [u32; 3]) -> String {
    let names = ["a", "b", "c"];
    let ups: Vec<String> = ps
        .iter()
        .zip(names)
        .zip(weights)
        .map(|((p, n), w)| upstream(n, &p.endpoint(), &format!("weight: {w}")))
        .collect();
    config(global, &ups)
}

#[actix_rt::test]
async fn a_key_stays_on_one_upstream_and_keys_spread_by_weight() {
    let (a, b, c) = (Provider::new("a"), Provider::new("b"), Provider::new("c"));
    let gw = Gateway::start(&three("lb_policy: sticky", &[&a, &b, &c], [1, 2, 1]));
    let placed = placement(&gw, 0..1000).await;
    let s = shares(&placed, &["a", "b", "c"]);
    for (share, want) in s.iter().zip([0.25, 0.5, 0.25]) {
        assert!(
            (share - want).abs() < 0.04,
            "shares {s:?} for weights 1,2,1"
        );
    }
    // The same key lands where it did, every time.
    for _ in 0..2 {
        let again = placement(&gw, 0..60).await;
        for (k, up) in again {
            assert_eq!(
                placed[&k], up,
                "key-{k} moved while every upstream is healthy"
            );
        }
    }
}

#[actix_rt::test]
async fn a_cooldown_moves_only_that_upstreams_keys() {
    let (a, b, c) = (Provider::new("a"), Provider::new("b"), Provider::new("c"));
    let gw = Gateway::start(&three(
        "lb_policy: sticky\ncooldown: {failures: 1, seconds: 60}",
        &[&a, &b, &c],
        [1, 1, 1],
    ));
    let before = placement(&gw, 0..300).await;
    b.set_down(true);
    // One key of b's sends it into cooldown (and its request fails over).
    let on_b = before
        .iter()
        .find(|(_, u)| *u == "b")
        .map(|(k, _)| *k)
        .unwrap();
    let _ = placement(&gw, on_b..on_b + 1).await;
    b.set_down(false);
    let after = placement(&gw, 0..300).await;
    let mut moved = 0;
    for (k, up) in &before {
        if up == "b" {
            assert_ne!(after[k], "b", "key-{k} still on the cooling upstream");
            moved += 1;
        } else {
            assert_eq!(
                &after[k], up,
                "key-{k} moved although its upstream is healthy"
            );
        }
    }
    assert!(moved > 50, "{moved}");
}

#[actix_rt::test]
async fn removing_an_upstream_by_reload_moves_only_the_keys_that_preferred_it() {
    let (a, b, c) = (Provider::new("a"), Provider::new("b"), Provider::new("c"));
    let gw = Gateway::start(&three("lb_policy: sticky", &[&a, &b, &c], [1, 1, 1]));
    let before = placement(&gw, 0..300).await;
    std::fs::write(
        &gw.config_path,
        config(
            "lb_policy: sticky",
            &[
                upstream("a", &a.endpoint(), ""),
                upstream("c", &c.endpoint(), ""),
            ],
        ),
    )
    .unwrap();
    gw.signal("HUP");
    assert!(eventually(Duration::from_secs(5), || gw
        .log()
        .contains("SIGHUP: reloaded")));
    let after = placement(&gw, 0..300).await;
    for (k, up) in &before {
        if up != "b" {
            assert_eq!(&after[k], up, "key-{k} moved although its upstream stayed");
        }
    }
}

#[actix_rt::test]
async fn random_honours_weight() {
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = Gateway::start(&config(
        "lb_policy: random",
        &[
            upstream("a", &a.endpoint(), "weight: 1"),
            upstream("b", &b.endpoint(), "weight: 3"),
        ],
    ));
    let mut on_b = 0;
    for _ in 0..1000 {
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        on_b += usize::from(got.header("x-upstream") == Some("b"));
    }
    assert!(
        (on_b as f64 / 1000.0 - 0.75).abs() < 0.05,
        "{on_b} of 1000 on b"
    );
}

#[test]
fn weight_must_be_positive() {
    let m = Mock::always(Reply::chat("x"));
    let err = Gateway::try_start(
        &config("", &[upstream("a", &m.endpoint(), "weight: 0")]),
        &[],
    )
    .err()
    .expect("weight 0 is refused");
    assert!(err.contains("weight") && err.contains("positive"), "{err}");
}
