//! openai-api-route: an OpenAI API gateway that tries an ordered list of OpenAI-compatible
//! upstreams until one answers, streaming the answer through and recording every request.
//!
//! The modules, by the guide in `docs/` that tells users what they do:
//! - the configuration guide: [`cli`], [`config`];
//! - the security guide: [`admission`], the first step of every `/v1/*` route (auth, paths, loop
//!   guard);
//! - the rescue guide: [`proxy`] (admit → attempt → respond → relay), [`failure`] (the failover
//!   vocabulary), [`registry`] (failover order and health);
//! - the observability guide: [`headers`] ("Routes": forwarding), [`records`]/[`capture`],
//!   [`metrics`], [`models`]/[`include_usage`], [`realtime`] (WebSocket sessions), [`status`] (the
//!   status page);
//! - the operations guide: [`notify`] ("Alerts"), [`server`] (start-up, reload and shutdown);
//! - the tracing guide: [`trace`] (OpenTelemetry traces).
//!
//! [`ledger`], one per request, is the only writer of metrics, health reports, alerts and records.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admission;
pub mod affinity;
pub mod capture;
pub mod cli;
pub mod config;
pub mod error;
pub mod escape;
pub mod facts;
pub mod failure;
pub mod headers;
pub mod history;
pub mod http_metrics;
pub mod include_usage;
pub mod ledger;
pub mod member_limits;
pub mod member_usage;
pub mod metrics;
pub mod models;
pub mod notify;
pub mod policy;
pub mod proxy;
pub mod realtime;
pub mod records;
pub mod registry;
pub mod reject_gate;
pub mod replicas;
pub mod series;
pub mod server;
pub mod shared_limits;
pub mod sse;
pub mod state;
pub mod status;
pub mod time;
pub mod trace;
pub mod transport;
