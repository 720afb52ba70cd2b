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
fn openai_python_sdk_through_a_failing_first_upstream() {
    let Some(python) = sdk_python("openai SDK end-to-end test") else {
        return;
    };
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

/// SPEC 4e: when every upstream failed, the SDK (which retries a 5xx twice by default) does not
/// start a second round: one call costs at most 1 + `retries` requests per upstream.
#[test]
fn the_python_sdk_does_not_retry_an_answer_after_every_upstream_failed() {
    let Some(python) = sdk_python("openai SDK no-second-round test") else {
        return;
    };
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
