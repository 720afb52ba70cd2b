//! The Python end of the end-to-end tests: the official `openai` SDK (and `websockets`) in the
//! venv that `.ci/run` creates and names in `OPENAI_SDK_PYTHON`.

use std::process::Command;

/// The Python to run SDK scripts with. On a machine without it the test is skipped (and says
/// so); under CI its absence is a failure, never a silent skip.
pub fn sdk_python(test: &str) -> Option<String> {
    super::required_env("OPENAI_SDK_PYTHON", test)
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
