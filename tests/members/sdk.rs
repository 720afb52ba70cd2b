//! Members with the official `openai` Python SDK (the venv `.ci/run` makes, named by
//! `OPENAI_SDK_PYTHON`): the SDK's own retry obeys the member's 429, and its file list shows
//! only the member's files.

use std::time::{Duration, Instant};

use serde_json::json;

use super::*;

const RETRY_SCRIPT: &str = r#"
import sys, time, openai
base, key = sys.argv[1], sys.argv[2]
msgs = [{"role": "user", "content": "hi"}]
once = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
try:
    once.chat.completions.create(model="gpt-test", messages=msgs)
    print("UNEXPECTED SUCCESS")
except openai.RateLimitError as e:
    print("LIMITED:%d:%s:%s:%s" % (e.status_code, e.type, e.code, e.response.headers.get("retry-after")))
# The SDK's defaults: two retries, and it honours Retry-After up to 60 s.
client = openai.OpenAI(base_url=base, api_key=key)
t = time.time()
r = client.chat.completions.create(model="gpt-test", messages=msgs)
print("ANSWER:%s:%.1f" % (r.choices[0].message.content, time.time() - t))
"#;

/// One call over `rpm`: with retries off the SDK raises `RateLimitError`; with its defaults it
/// waits the `Retry-After` and its own retry succeeds (the test adds no retry of its own).
#[test]
#[cfg_attr(
    not(test_sdk_python),
    ignore = "needs the openai Python SDK: set OPENAI_SDK_PYTHON"
)]
fn the_sdk_retries_a_members_429_after_retry_after_and_succeeds() {
    let python = sdk_python();
    let m = Mock::always(Reply::chat("after the wait"));
    let gw = start(
        &m.endpoint(),
        "",
        &format!("  - {{name: alice, key: {ALICE}, rpm: 1}}"),
    );
    let rt = actix_rt::System::new();
    let first = rt.block_on(chat_as(&gw, ALICE, "gpt-test"));
    assert_eq!(first.status, 200);
    let t = Instant::now();
    let out = run_python(&python, RETRY_SCRIPT, &[&gw.url("/v1"), ALICE]);
    let limited = out
        .lines()
        .find_map(|l| l.strip_prefix("LIMITED:"))
        .unwrap_or_else(|| panic!("{out}"));
    let parts: Vec<&str> = limited.split(':').collect();
    assert_eq!(
        parts[..3],
        ["429", "requests", "rate_limit_exceeded"],
        "{out}"
    );
    let retry_after: u64 = parts[3].parse().unwrap();
    assert!((30..=60).contains(&retry_after), "{out}");
    let answer = out
        .lines()
        .find_map(|l| l.strip_prefix("ANSWER:"))
        .unwrap_or_else(|| panic!("{out}"));
    let (text, waited) = answer.rsplit_once(':').unwrap();
    assert_eq!(text, "after the wait");
    let waited: f64 = waited.parse().unwrap();
    assert!(
        waited >= (retry_after - 2) as f64,
        "the SDK came back after {waited} s, before Retry-After {retry_after}"
    );
    assert!(t.elapsed() < Duration::from_secs(90));
    // Two requests reached the upstream: the first, and the SDK's own retry.
    let seen = m.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(seen[1].header("x-stainless-retry-count"), Some("1"));
    let rows = gw.records(4);
    let statuses: Vec<u64> = rows.iter().map(|r| r["status"].as_u64().unwrap()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        2,
        "{statuses:?}"
    );
}

const FILES_SCRIPT: &str = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
made = [client.files.create(file=("notes.jsonl", b'{"n": %d}\n' % i), purpose="batch").id for i in range(2)]
print("MADE:" + ",".join(made))
print("LISTED:" + ",".join(f.id for f in client.files.list()))
"#;

/// `client.files.list()` shows the member's own files only, not another member's.
#[test]
#[cfg_attr(
    not(test_sdk_python),
    ignore = "needs the openai Python SDK: set OPENAI_SDK_PYTHON"
)]
fn the_sdks_file_list_shows_only_the_members_files() {
    let python = sdk_python();
    let p = Provider::new("up");
    let gw = start(
        &p.endpoint(),
        "",
        &format!("  - {{name: alice, key: {ALICE}}}\n  - {{name: bob, key: {BOB}}}"),
    );
    let rt = actix_rt::System::new();
    let bobs = rt.block_on(call(
        &gw,
        BOB,
        "POST",
        "/v1/files",
        Some(json!({"n": "bob"})),
    ));
    let bobs = bobs.json()["id"].as_str().unwrap().to_string();
    let out = run_python(&python, FILES_SCRIPT, &[&gw.url("/v1"), ALICE]);
    let line = |prefix: &str| -> Vec<String> {
        let l = out
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("{out}"));
        let mut v: Vec<String> = l
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        v.sort();
        v
    };
    let (made, listed) = (line("MADE:"), line("LISTED:"));
    assert_eq!(made.len(), 2, "{out}");
    assert_eq!(listed, made, "{out}");
    assert!(!listed.contains(&bobs));
    assert_eq!(p.files.lock().unwrap().len(), 3);
}
