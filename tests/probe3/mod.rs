//! The third probe and a day of real clients (issue 32): every finding, through the binary.
//!
//! Each test reproduces one finding as a user met it on 0.3.0 — three requests that took the
//! primary out of everyone's order, a chain whose owner was stolen, a stream recorded whole
//! that was cut — and asserts what a user sees now: status, bytes, headers, record rows,
//! metrics. Each was run against the binary of the commit before the fix
//! (`OPENAI_API_ROUTE_TEST_BINARY`, see `support::binary`) and failed there, except the one
//! whose docs say that 0.3 already kept its rule.
//!
//! - `health`: which failures count for health (the rescue guide, "Which failures count (0.4)"),
//!   what the status page shows of an upstream's error, `model_timeouts` and SSE comments.
//! - `owners`: who owns an object and when that changes (the affinity guide, "Version 0.4:
//!   owners that cannot be misled").
//! - `ends`: where a stream ends and what a client that leaves at the end leaves in the record
//!   (the rescue guide, "Truthful ends").
//! - `clients`: what an answer tells the client's SDK (retry, `Retry-After`, `x-request-id`).

mod clients;
mod ends;
mod health;
mod owners;

use serde_json::Value;

use crate::support::*;

/// A metric's value with exactly these labels, 0 when the series does not exist.
pub(crate) fn value(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    labels
        .iter()
        .fold(m.metric(name), |s, (k, v)| s.label(k, v))
        .value()
        .unwrap_or(0.0)
}

/// `openai_api_route_upstream_healthy` of `upstream`.
pub(crate) fn healthy(m: &Metrics, upstream: &str) -> f64 {
    value(
        m,
        "openai_api_route_upstream_healthy",
        &[("upstream", upstream)],
    )
}

/// `openai_api_route_upstream_requests_total` of `upstream` with `outcome`.
pub(crate) fn outcome(m: &Metrics, upstream: &str, outcome: &str) -> f64 {
    value(
        m,
        "openai_api_route_upstream_requests_total",
        &[("upstream", upstream), ("outcome", outcome)],
    )
}

/// `openai_api_route_affinity_total` with `result`.
pub(crate) fn affinity(m: &Metrics, result: &str) -> f64 {
    value(m, "openai_api_route_affinity_total", &[("result", result)])
}

/// The `id` of a JSON answer.
pub(crate) fn id_of(got: &Got) -> String {
    got.json()["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id: {}", got.text()))
        .to_string()
}

/// The one record whose `path` is `path` and whose request body contains `marker`.
pub(crate) fn row_with(rows: &[Value], path: &str, marker: &str) -> Value {
    let found: Vec<&Value> = rows
        .iter()
        .filter(|r| r["path"] == path)
        .filter(|r| r["request_body"].as_str().unwrap_or("").contains(marker))
        .collect();
    assert_eq!(found.len(), 1, "{path} with {marker:?}: {rows:#?}");
    found[0].clone()
}

/// A DELETE with the client token.
pub(crate) async fn delete(gw: &Gateway, path: &str) -> Got {
    send("DELETE", &gw.url(path), &[("authorization", &auth())], b"").await
}
