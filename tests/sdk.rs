//! End to end with a client nobody here wrote: the official `openai` Python SDK.
//!
//! `.ci/run` installs it into a venv and sets `OPENAI_SDK_PYTHON`; without it (a laptop) the test
//! says so and passes, except under CI, where a missing SDK is a failure.

use crate::support::*;

const SCRIPT: &str = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
r = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
print("NONSTREAM:" + r.choices[0].message.content)
print("USAGE:%d" % r.usage.total_tokens)
parts = []
for chunk in client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
print("STREAM:" + "".join(parts))
"#;

#[test]
#[cfg_attr(
    not(test_sdk_python),
    ignore = "needs the openai Python SDK: set OPENAI_SDK_PYTHON"
)]
fn openai_python_sdk_through_a_failing_first_upstream() {
    let python = sdk_python();
    let down = Mock::always(Reply::status(503));
    let good = Mock::script(|req, _| {
        if req.json()["stream"] == true {
            Reply::sse_chat(
                &["Hello", ", ", "world"],
                std::time::Duration::from_millis(5),
            )
        } else {
            Reply::chat("Hi from the mock")
        }
    });
    let gw = Gateway::start(&config(
        "",
        &[
            upstream("down", &down.endpoint(), ""),
            upstream("good", &good.endpoint(), ""),
        ],
    ));
    let stdout = run_python(&python, SCRIPT, &[&gw.url("/v1"), TOKEN]);
    assert!(stdout.contains("NONSTREAM:Hi from the mock"), "{stdout}");
    assert!(stdout.contains("USAGE:12"), "{stdout}");
    assert!(stdout.contains("STREAM:Hello, world"), "{stdout}");
    assert_eq!(
        down.hits(),
        2,
        "both requests tried the failing upstream first"
    );
}

const ALL_FAIL: &str = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2])
try:
    client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    print("UNEXPECTED SUCCESS")
except openai.APIStatusError as e:
    print("STATUS:%d" % e.status_code)
"#;

/// When every upstream failed, the SDK (which retries a 5xx twice by default) does not start a
/// second round: one call costs at most 1 + `retries` requests per upstream (see the rescue guide,
/// "A client's own retry where it helps (0.4)").
#[test]
#[cfg_attr(
    not(test_sdk_python),
    ignore = "needs the openai Python SDK: set OPENAI_SDK_PYTHON"
)]
fn the_python_sdk_does_not_retry_an_answer_after_every_upstream_failed() {
    let python = sdk_python();
    let a = Mock::always(Reply::status(500));
    let b = Mock::always(Reply::status(500));
    let gw = Gateway::start(&config(
        "retries: 1\ncooldown: {failures: 100, seconds: 30}",
        &[
            upstream("a", &a.endpoint(), ""),
            upstream("b", &b.endpoint(), ""),
        ],
    ));
    let stdout = run_python(&python, ALL_FAIL, &[&gw.url("/v1"), TOKEN]);
    assert!(stdout.contains("STATUS:500"), "{stdout}");
    assert_eq!(a.hits(), 2, "1 + retries requests to a");
    assert_eq!(b.hits(), 2, "1 + retries requests to b");
}

const AFFINITY_SCRIPT: &str = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
prev, ups = None, []
for i in range(5):
    extra = {"previous_response_id": prev} if prev else {}
    raw = client.responses.with_raw_response.create(model="gpt-test", input="turn %d" % i, **extra)
    ups.append(raw.headers.get("x-upstream") + "/" + raw.headers.get("x-upstream-attempts"))
    r = raw.parse()
    assert r.output_text.endswith(r.id), r.output_text
    prev = r.id
print("TURNS:" + ",".join(ups))
for i in range(2):
    f = client.files.create(file=("notes.jsonl", b'{"n": %d}\n' % i), purpose="batch")
    for _ in range(2):
        got = client.files.retrieve(f.id)
        assert got.id == f.id
        body = client.files.content(f.id).read().decode()
        print("FILE:%s:%s" % (f.id, body.strip()))
"#;

/// State on one upstream (see the affinity guide) with the official SDK: a Responses chain over
/// several turns and files written then read, under `round_robin` across two upstreams that each
/// know only their own objects.
#[test]
#[cfg_attr(
    not(test_sdk_python),
    ignore = "needs the openai Python SDK: set OPENAI_SDK_PYTHON"
)]
fn openai_python_sdk_continues_chains_and_reads_files_under_round_robin() {
    let python = sdk_python();
    let (a, b) = (Provider::new("a"), Provider::new("b"));
    let gw = Gateway::start(&config(
        "lb_policy: round_robin",
        &[
            upstream("a", &a.endpoint(), ""),
            upstream("b", &b.endpoint(), ""),
        ],
    ));
    let stdout = run_python(&python, AFFINITY_SCRIPT, &[&gw.url("/v1"), TOKEN]);
    let turns = stdout
        .lines()
        .find_map(|l| l.strip_prefix("TURNS:"))
        .unwrap_or_default();
    let turns: Vec<&str> = turns.split(',').collect();
    assert_eq!(turns.len(), 5, "{stdout}");
    assert!(
        turns.iter().all(|t| *t == turns[0] && t.ends_with("/1")),
        "every turn on the chain's owner at the first attempt: {stdout}"
    );
    let files: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FILE:")).collect();
    assert_eq!(files.len(), 4, "{stdout}");
    for line in files {
        // `FILE:file-a-3:a:{"n": 0}`: the content came from the upstream that holds the file.
        let mut parts = line.splitn(4, ':');
        let (id, owner) = (parts.nth(1).unwrap(), parts.next().unwrap());
        assert!(id.starts_with(&format!("file-{owner}-")), "{line}");
    }
}
