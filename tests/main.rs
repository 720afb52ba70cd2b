//! One integration-test binary (link once): the real gateway binary against mock upstreams.

mod support;

mod admission;
mod affinity;
mod chains;
mod cli;
mod docs;
mod ends;
mod failover;
mod faults;
mod fuzz;
mod hardening;
mod health_shared;
mod layout;
mod limits;
mod limits_ws;
mod models;
mod observability;
mod operator;
mod parse_once;
mod postgres;
mod probe3;
mod probes;
mod realtime;
mod records;
mod reload;
mod replicas;
mod rescue;
mod resume;
mod routing;
mod sdk;
mod shared_limits;
mod status_browser;
mod sticky;
mod streaming;
mod tracing;
