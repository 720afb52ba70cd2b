//! One integration-test binary (link once): the real gateway binary against mock upstreams.

mod support;

mod cli;
mod docs;
mod failover;
mod faults;
mod fuzz;
mod hardening;
mod models;
mod observability;
mod operator;
mod postgres;
mod realtime;
mod records;
mod reload;
mod rescue;
mod resume;
mod routing;
mod sdk;
mod status_browser;
mod streaming;
mod tracing;
