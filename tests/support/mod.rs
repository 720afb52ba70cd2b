//! Test support: the real gateway binary as a child process, and scriptable mock upstreams.
//!
//! Mocks speak raw HTTP/1.1 over tokio sockets on 127.0.0.1:0 so that tests can script what real
//! upstreams do wrong: reset before headers, stall after headers, cut a stream, never answer.
//! Everything is re-exported here: tests `use crate::support::*`.

#![allow(dead_code)]

mod alert;
mod browser;
mod client;
mod db;
mod gateway;
mod metrics;
mod mock;
mod provider;
mod python;

pub use alert::*;
pub use browser::*;
pub use client::*;
pub use db::*;
pub use gateway::*;
pub use metrics::*;
pub use mock::*;
pub use provider::*;
pub use python::*;

/// Held by whatever parses request bodies in this test process (the fuzz tests) and by the test
/// that counts the gateway's parses, so that the count is the gateway's alone.
pub fn facts_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The value of `var`, which names a service a test needs (PostgreSQL, the Python SDK, Chromium,
/// root). Such a test carries `#[cfg_attr(not(<cfg>), ignore = "…")]`, so `build.rs` leaves it
/// ignored (and counted so in `cargo test`'s summary) when `var` was not set at build time; run
/// anyway (`--ignored`) without it, the test fails here, naming what to set. Never a silent pass.
pub fn service(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!("{var} is not set: this test needs it (see the README's \"Two commands\")"),
    }
}

/// Every variable that enables tests, and whether this build saw it (from `build.rs`).
pub fn test_services() -> Vec<(&'static str, bool)> {
    env!("OPENAI_API_ROUTE_TEST_SERVICES")
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(var, on)| (var, on == "on"))
        .collect()
}

/// CI runs every test: a variable `.ci/run` forgot would otherwise leave its tests ignored, and
/// an ignored test is not a failure.
#[test]
fn under_ci_every_service_test_runs() {
    let services = test_services();
    assert!(services.len() >= 4, "{services:?}");
    if std::env::var_os("CI").is_none() {
        return;
    }
    let off: Vec<&str> = services
        .iter()
        .filter(|(_, on)| !on)
        .map(|(var, _)| *var)
        .collect();
    assert!(off.is_empty(), "CI must set {off:?} (see .ci/run)");
}
