//! Members (see the members guide) through the real binary: the config's rules, each limit and its
//! 429, the rate-limit headers, models per member, private objects and lists, the usage route and
//! its page, the member metrics and the `member` column, and the official Python SDK against a
//! member's limits and lists.
//!
//! A refusal is believed only when the upstream saw nothing of it.

mod config;
mod limits;
mod objects;
mod page;
mod sdk;
mod usage;

use serde_json::{json, Value};

use crate::support::*;

/// The members' keys (each with a distinct label: `sk-…0001` …).
pub const ALICE: &str = "sk-alice-member-key-0001";
pub const BOB: &str = "sk-bob-member-key-000002";
pub const CAROL: &str = "sk-carol-member-key-0003";
pub const DAVE: &str = "sk-dave-member-key-00004";

/// A config with `members` (YAML list items, indented by two), `global` top-level keys and the
/// upstream entries `ups`; no `authorization` unless `global` has one.
pub fn members_config(global: &str, members: &str, ups: &[String]) -> String {
    let mut s = format!("{global}\nmembers:\n{members}\nupstreams:\n");
    for u in ups {
        s.push_str(u);
        if !u.ends_with('\n') {
            s.push('\n');
        }
    }
    s
}

/// A gateway with `members` in front of the one upstream `up` at `endpoint`.
pub fn start(endpoint: &str, global: &str, members: &str) -> Gateway {
    Gateway::start(&members_config(
        global,
        members,
        &[upstream("up", endpoint, "")],
    ))
}

/// `method path` with `key` as Bearer and `body` as JSON (none: no body).
pub async fn call(gw: &Gateway, key: &str, method: &str, path: &str, body: Option<Value>) -> Got {
    let auth = format!("Bearer {key}");
    let mut headers = vec![("authorization", auth.as_str())];
    if body.is_some() {
        headers.push(("content-type", "application/json"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    send(method, &gw.url(path), &headers, body.as_bytes()).await
}

/// A chat request for `model` by `key`.
pub async fn chat_as(gw: &Gateway, key: &str, model: &str) -> Got {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    call(gw, key, "POST", "/v1/chat/completions", Some(body)).await
}

/// `GET /usage` (JSON) by `key` (none: no Authorization) with `query`.
pub async fn usage_of(gw: &Gateway, key: Option<&str>, query: &str) -> Got {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("accept", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    send("GET", &gw.url(&format!("/usage{query}")), &headers, b"").await
}

/// The member's `now` as `/usage` tells it.
pub async fn now_of(gw: &Gateway, key: &str) -> Value {
    let got = usage_of(gw, Some(key), "").await;
    assert_eq!(got.status, 200, "{}", got.text());
    got.json()["now"].clone()
}

/// Polls `/usage` until `f` accepts the member's `now` (tokens count when a request has ended,
/// which is a moment after its client read the last byte); returns the last one.
pub async fn now_until(gw: &Gateway, key: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = now_of(gw, key).await;
        if f(&now) || std::time::Instant::now() > deadline {
            return now;
        }
        actix_rt::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The error body a member's refusal must have, exactly.
pub fn error_body(message: &str, kind: &str, code: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

/// The SHA-256 of `key` as the members guide has it made: `printf %s "$KEY" | sha256sum`.
pub fn sha256_hex(key: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", "printf %s \"$KEY\" | sha256sum"])
        .env("KEY", key)
        .output()
        .expect("sha256sum");
    let text = String::from_utf8(out.stdout).unwrap();
    let hex = text.split_whitespace().next().unwrap().to_string();
    assert_eq!(hex.len(), 64, "{text}");
    hex
}

/// The UTC date (`YYYY-MM-DD`) of `secs` since the epoch (Howard Hinnant's civil_from_days).
pub fn utc_date(secs: u64) -> String {
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[test]
fn utc_dates() {
    assert_eq!(utc_date(0), "1970-01-01");
    assert_eq!(utc_date(1_796_659_200), "2026-12-07");
    assert_eq!(utc_date(951_782_400), "2000-02-29");
}

/// Whether `v` is a duration in OpenAI's rate-limit form: `250ms`, `6s`, `1m30s`, `2m`, `1h0m5s`.
pub fn openai_duration(v: &str) -> bool {
    if let Some(ms) = v.strip_suffix("ms") {
        return !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit());
    }
    let mut rest = v;
    let mut parts = 0;
    for unit in ['h', 'm', 's'] {
        if let Some(at) = rest.find(unit) {
            let n = &rest[..at];
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return false;
            }
            rest = &rest[at + 1..];
            parts += 1;
        }
    }
    parts > 0 && rest.is_empty()
}

#[test]
fn openai_durations_are_told_apart() {
    for good in ["250ms", "6s", "1m30s", "2m", "1h0m5s", "0ms"] {
        assert!(openai_duration(good), "{good}");
    }
    for bad in ["", "6", "1.5s", "s", "ms", "1m30", "x6s", "6s1"] {
        assert!(!openai_duration(bad), "{bad}");
    }
}
