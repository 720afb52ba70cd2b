//! openai-api-route: an OpenAI API gateway that tries an ordered list of OpenAI-compatible
//! upstreams until one answers, streaming the answer through and recording every request.
//!
//! The modules follow SPEC.md: [`cli`] §2, [`config`] §3, [`proxy`]/[`relay`]/[`headers`] §4,
//! [`registry`] failover order and health, [`records`]/[`capture`] §5, [`metrics`] §6,
//! [`notify`] §7, [`status`] §8, [`server`] start-up, reload and shutdown (§9).

#![warn(missing_docs)]

pub mod capture;
pub mod charts;
pub mod cli;
pub mod config;
pub mod error;
pub mod headers;
pub mod history;
pub mod http_metrics;
pub mod metrics;
pub mod notify;
pub mod proxy;
pub mod records;
pub mod registry;
pub mod relay;
pub mod server;
pub mod state;
pub mod status;
pub mod time;
pub mod transport;
