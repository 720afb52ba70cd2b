//! Test support: the real gateway binary as a child process, and scriptable mock upstreams.
//!
//! Mocks speak raw HTTP/1.1 over tokio sockets on 127.0.0.1:0 so that tests can script what real
//! upstreams do wrong: reset before headers, stall after headers, cut a stream, never answer.
//! Everything is re-exported here: tests `use crate::support::*`.

#![allow(dead_code)]

mod alert;
mod client;
mod db;
mod gateway;
mod metrics;
mod mock;
mod provider;
mod python;

pub use alert::*;
pub use client::*;
pub use db::*;
pub use gateway::*;
pub use metrics::*;
pub use mock::*;
pub use provider::*;
pub use python::*;

/// A service a test needs, named by the environment variable `var`. On a machine without it the
/// test is skipped (and says so as `skipped`); under CI its absence is a failure, never a silent
/// skip.
pub fn required_env(var: &str, skipped: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ => {
            assert!(
                std::env::var("CI").is_err(),
                "CI must set {var} (see .ci/run)"
            );
            eprintln!("SKIPPED {skipped}: {var} is not set");
            None
        }
    }
}
