//! The gateway binary as a child process, and the config builders tests start it with.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::mock::Mock;

/// The gateway binary running as a child process.
pub struct Gateway {
    child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub db_path: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

pub const TOKEN: &str = "sk-client-token-0123456789abcdef";

/// The `Authorization` value of [`TOKEN`].
pub fn auth() -> String {
    format!("Bearer {TOKEN}")
}

impl Gateway {
    /// Starts with `config` (YAML) and the default SQLite database in a temp dir.
    pub fn start(config: &str) -> Gateway {
        Gateway::start_with(config, &[])
    }

    /// Starts with extra flags (a `-database` in `extra` replaces the default one).
    pub fn start_with(config: &str, extra: &[&str]) -> Gateway {
        Gateway::try_start(config, extra).unwrap_or_else(|e| panic!("gateway did not start: {e}"))
    }

    /// Starts with these environment variables set for the gateway (e.g. `OTEL_*`).
    pub fn start_env(config: &str, env: &[(&str, &str)]) -> Gateway {
        Gateway::try_start_env(config, &[], env)
            .unwrap_or_else(|e| panic!("gateway did not start: {e}"))
    }

    /// Starts, or returns what it printed if it exited first.
    pub fn try_start(config: &str, extra: &[&str]) -> Result<Gateway, String> {
        Gateway::try_start_env(config, extra, &[])
    }

    /// [`Gateway::try_start`] with environment variables for the gateway.
    pub fn try_start_env(
        config: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("upstreams.yaml");
        std::fs::write(&config_path, config).unwrap();
        let db_path = dir.path().join("db.sqlite");
        let mut args: Vec<String> = vec!["-config".into(), config_path.display().to_string()];
        if !extra
            .iter()
            .any(|a| a.trim_start_matches('-').starts_with("addr"))
        {
            args.push("-addr".into());
            args.push("127.0.0.1:0".into());
        }
        if !extra
            .iter()
            .any(|a| a.trim_start_matches('-').starts_with("database"))
        {
            args.push("-database".into());
            args.push(db_path.display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = Command::new(binary())
            .args(&args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    if let Some(t) = tx.take() {
                        let _ = t.send(rest.split(' ').next().unwrap_or("").to_string());
                    }
                }
                log2.lock().unwrap().push(line);
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => Ok(Gateway {
                child,
                addr,
                dir,
                config_path,
                db_path,
                log,
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                Err(log.lock().unwrap().join("\n"))
            }
        }
    }

    /// A field of /proc/PID/status in kB (VmRSS, VmHWM).
    pub fn mem_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gateway binary the tests start: this build's, unless `OPENAI_API_ROUTE_TEST_BINARY`
/// names another. That is how a test is shown to fail on an earlier version (an issue asks for
/// tests "that failed before the change"): build the old commit in a worktree and point this at
/// its `target/debug/openai-api-route`. Read when a test runs, so no rebuild is needed.
pub fn binary() -> PathBuf {
    match std::env::var_os("OPENAI_API_ROUTE_TEST_BINARY") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_openai-api-route")),
    }
}

/// A config with `authorization: TOKEN` and these upstream entries (YAML list items).
pub fn config(extra_global: &str, upstreams: &[String]) -> String {
    let mut s = format!("authorization: {TOKEN}\n{extra_global}\nupstreams:\n");
    for u in upstreams {
        s.push_str(u);
        if !u.ends_with('\n') {
            s.push('\n');
        }
    }
    s
}

/// One upstream list item.
pub fn upstream(name: &str, endpoint: &str, extra: &str) -> String {
    let mut s =
        format!("  - name: {name}\n    endpoint: {endpoint}\n    sk: sk-upstream-{name}-secret\n");
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        s.push_str("    ");
        s.push_str(line.trim_start());
        s.push('\n');
    }
    s
}

/// A gateway with one upstream, named `up`, in front of `m`; `global` adds top-level config keys.
pub fn one(m: &Mock, global: &str) -> Gateway {
    Gateway::start(&config(global, &[upstream("up", &m.endpoint(), "")]))
}
