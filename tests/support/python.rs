//! The Python end of the end-to-end tests: the official `openai` SDK (and `websockets`) in the
//! venv that `.ci/run` creates and names in `OPENAI_SDK_PYTHON`.

use std::process::Command;

/// The Python to run SDK scripts with (a test that calls this carries
/// `#[cfg_attr(not(test_sdk_python), ignore = …)]`, see [`super::service`]).
pub fn sdk_python() -> String {
    super::service("OPENAI_SDK_PYTHON")
}

/// Runs `script` with `args`, asserts that it succeeded, and returns what it printed.
pub fn run_python(python: &str, script: &str, args: &[&str]) -> String {
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the Python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
