//! openai-api-route: an OpenAI API gateway that tries an ordered list of OpenAI-compatible
//! upstreams until one answers, streaming the answer through and recording every request.
//!
//! The modules follow SPEC.md: [`cli`] §2, [`config`] §3, [`admission`] the first step of every
//! `/v1/*` route (auth, paths, loop guard; 4d), [`proxy`] (admit → attempt → respond → relay)
//! and [`headers`] §4 and 4d, [`failure`] the failover vocabulary, [`ledger`]
//! one per request (the only writer of metrics, health reports, alerts and records),
//! [`registry`] failover order and health, [`records`]/[`capture`] §5, [`metrics`] §6,
//! [`models`]/[`usage`] §4b, [`notify`] §7, [`realtime`] §4c (WebSocket sessions), [`status`] §8,
//! [`server`] start-up, reload and shutdown (§9), [`trace`] OpenTelemetry traces (§6a).

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
