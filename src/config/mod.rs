//! The upstreams file (see the configuration guide): parsing, `${ENV}` substitution, defaults and
//! validation.
//!
//! The file is walked key by key rather than deserialised straight into structs so that every
//! problem can be reported as one line naming the file, the key path and what is wrong, and so that
//! unknown keys are warnings instead of hard errors (the Go tool's files carry keys we do not use).
//!
//! This module holds the resolved types and the entry points; the walker is in `parse`, and each
//! section's types and parsing live in `upstream`, `notify` and `net`.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml::Value;

mod limits;
mod members;
mod net;
mod notify;
mod otel;
mod parse;
mod shared;
#[cfg(test)]
mod tests;
mod timeouts;
mod upstream;

pub use limits::Limits;
pub use members::{digest, Member, MemberLimits, Members, Objects};
pub use net::IpNet;
pub use notify::{FeishuConfig, MatrixConfig, NotifyConfig};
pub use otel::OtelConfig;
pub use shared::SharedConfig;
pub use timeouts::ModelTimeout;
pub use upstream::{redact_url, Pattern, Upstream, UpstreamAuth};

use parse::Parser;

/// Every mapping the parser walks, as (dotted path of the mapping, the keys it accepts): the very
/// lists it warns about unknown keys with, so a key added to the parser is listed here at once.
/// `""` is the top level and `"upstreams[]"` each upstream. The docs test (`tests/docs.rs`) reads
/// it to check that every accepted key has a row in `docs/configuration.md`.
pub const KEY_SECTIONS: &[(&str, &[&str])] = &[
    ("", parse::ROOT_KEYS),
    ("upstreams[]", parse::UPSTREAM_KEYS),
    ("cooldown", parse::COOLDOWN_KEYS),
    ("notify", notify::NOTIFY_KEYS),
    ("notify.feishu", notify::FEISHU_KEYS),
    ("notify.matrix", notify::MATRIX_KEYS),
    ("otel", otel::OTEL_KEYS),
    ("model_timeouts.*", timeouts::MODEL_TIMEOUT_KEYS),
    ("members[]", members::MEMBER_KEYS),
];

/// Top-level keys read once, when the process starts (the listener, the database, the record
/// queue, the trace exporter are made from them then): a reload that changes one says it is not
/// applied until a restart (docs/configuration.md, "Config file").
pub const START_ONLY_KEYS: &[&str] = &[
    "address",
    "database",
    "dbtype",
    "dbaddr",
    "record_queue",
    "otel",
];

/// What the file said for each of [`START_ONLY_KEYS`], as a hash of its YAML value (so no
/// secret of `database` or `otel.headers` is kept twice): enough to tell whether a reload
/// changed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartOnly(Vec<(&'static str, u64)>);

impl StartOnly {
    fn of(root: &Value) -> StartOnly {
        use std::hash::{Hash, Hasher};
        StartOnly(
            START_ONLY_KEYS
                .iter()
                .map(|k| {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    root.get(k).hash(&mut h);
                    (*k, h.finish())
                })
                .collect(),
        )
    }
}

/// Request bodies above this size are "long prompts" that get a longer first-chunk wait.
pub const LONG_PROMPT_BYTES: usize = 128 * 1024;
/// The least a long prompt waits for its first chunk.
pub const LONG_PROMPT_MIN_WAIT: Duration = Duration::from_secs(20);

/// One problem found in a config file, printed as `file: key: problem`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: PathBuf,
    /// Dotted key path such as `upstreams[1].endpoint`; empty for whole-file problems.
    pub key: String,
    /// What is wrong, in words an operator can act on.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.problem)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.problem)
        }
    }
}

/// All problems of one load; the file is rejected when there is at least one.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// How candidates are ordered before cooled-down upstreams are moved to the back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    /// The file's order.
    Order,
    /// A fresh shuffle per request.
    Random,
    /// The start rotates by one per request.
    RoundRobin,
    /// Weighted rendezvous hashing of the request's affinity key (see the affinity guide, "Sticky
    /// and weight").
    Sticky,
}

impl LbPolicy {
    /// The spelling used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            LbPolicy::Order => "order",
            LbPolicy::Random => "random",
            LbPolicy::RoundRobin => "round_robin",
            LbPolicy::Sticky => "sticky",
        }
    }
}

/// How an upstream continues a partial answer (`prefill`: see the rescue guide).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefill {
    /// One trailing assistant message.
    Message,
    /// That, plus `continue_final_message: true, add_generation_prompt: false`.
    Vllm,
    /// That message with `"prefix": true`.
    Deepseek,
    /// It cannot: regenerate and relay what follows the text already sent.
    None,
}

impl Prefill {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Prefill::Message => "message",
            Prefill::Vllm => "vllm",
            Prefill::Deepseek => "deepseek",
            Prefill::None => "none",
        }
    }
}

/// The whole resolved configuration; shared read-only as `Arc<Config>` and swapped on reload.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub file: PathBuf,
    /// Accepted client tokens (never logged).
    pub tokens: Vec<String>,
    /// `-noauth` (set from the command line, kept here so reloads keep it).
    pub noauth: bool,
    /// Default header wait, non-stream.
    pub timeout: Duration,
    /// Default headers-and-first-chunk wait, stream.
    pub stream_timeout: Duration,
    /// Longest silence inside a started response.
    pub idle_timeout: Duration,
    /// Longest a request body may take to arrive (see the security guide).
    pub body_timeout: Duration,
    /// Candidate ordering.
    pub lb_policy: LbPolicy,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Record text limit, 0 = unlimited.
    pub record_body_bytes: usize,
    /// Record retention, 0 = forever.
    pub retention_days: u32,
    /// Records that may wait for the writer before new ones are dropped (read at start).
    pub record_queue: usize,
    /// Consecutive failures before cooldown.
    pub cooldown_failures: u32,
    /// Cooldown length.
    pub cooldown: Duration,
    /// How often an upstream in cooldown is asked `GET /models` (see the operations guide,
    /// "Probes"); None = never.
    pub probe_interval: Option<Duration>,
    /// Peers whose forwarding headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Alert channels.
    pub notify: NotifyConfig,
    /// Listen address from the file (`address`), if any.
    pub address: Option<String>,
    /// Database from the file (`database`, or the Go tool's `dbaddr`), if any.
    pub database: Option<String>,
    /// The file said `dbtype: postgres`, so `database` (its `dbaddr`) must name PostgreSQL;
    /// checked at start-up by the server, which knows the backends.
    pub dbtype_postgres: bool,
    /// The upstreams, in file order.
    pub upstreams: Vec<Upstream>,
    /// How often each upstream's model list is fetched again (see the observability guide,
    /// "Models and token usage (0.2)").
    pub models_refresh: Duration,
    /// Skip an upstream whose known model list lacks the request's model (see the observability
    /// guide, "Models and token usage (0.2)").
    pub route_by_models: bool,
    /// A 429/503 `Retry-After` up to this long is waited out on the same upstream (see the rescue
    /// guide).
    pub retry_after_max: Duration,
    /// Time a request may spend before its first byte, across attempts; None = no limit.
    pub deadline: Option<Duration>,
    /// `error.code` (else `error.type`) values that make a 400 fail over (see the rescue guide).
    pub failover_codes: Vec<String>,
    /// Continue a broken chat stream on the next candidate (see the rescue guide).
    pub resume: bool,
    /// `otel:` (see the tracing guide); the `OTEL_*` environment beats it. Read at start only.
    pub otel: OtelConfig,
    /// WebSocket and continuation limits (version 0.3; see the security guide, "Second probe
    /// (0.3): limits").
    pub limits: Limits,
    /// Rebuild a Responses chain whose owner cannot answer as a stateless request (see the
    /// affinity guide, "Rebuilding a Responses chain").
    pub rebuild: bool,
    /// Waits per model pattern, overriding `timeout`/`stream_timeout` (first match wins).
    pub model_timeouts: Vec<ModelTimeout>,
    /// The file's values of the keys read only at start, to compare on reload.
    pub start_only: StartOnly,
    /// Who may call, and within which limits (`members` and the `authorization` tokens).
    pub members: Members,
}

impl Config {
    /// The first `model_timeouts` entry whose pattern matches `model`.
    pub fn model_timeout(&self, model: Option<&str>) -> Option<&ModelTimeout> {
        let model = model?;
        self.model_timeouts
            .iter()
            .find(|t| t.pattern.matches(model))
    }

    /// The keys read only at start whose value in `reloaded` differs from this config's: a
    /// reload cannot apply them (this config should be the one the process started with).
    pub fn not_applied_on_reload(&self, reloaded: &Config) -> Vec<&'static str> {
        self.start_only
            .0
            .iter()
            .zip(&reloaded.start_only.0)
            .filter(|(a, b)| a != b)
            .map(|((k, _), _)| *k)
            .collect()
    }

    /// Whether `ip` is a trusted proxy.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(ip))
    }
}

/// Reads and validates `path`; warnings (unknown keys) are logged, errors returned all together.
/// The warnings are logged when the file is rejected too: a misspelt key ("did you mean
/// `endpoint`?") is often the cause of the error beside it.
pub fn load(path: &Path, noauth: bool) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            key: String::new(),
            problem: format!("cannot read file: {e}"),
        }])
    })?;
    let (config, warnings) = parse_all(path, &text, noauth, &|k| std::env::var(k).ok());
    for w in warnings {
        log::warn!("{w}");
    }
    config
}

/// Parses config text; `env` resolves `${VAR}`. Returns the config and its warnings.
pub fn parse(
    path: &Path,
    text: &str,
    noauth: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Vec<ConfigError>), ConfigErrors> {
    let (config, warnings) = parse_all(path, text, noauth, env);
    config.map(|c| (c, warnings))
}

/// [`parse`], with the warnings whether or not the file has errors.
pub fn parse_all(
    path: &Path,
    text: &str,
    noauth: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> (Result<Config, ConfigErrors>, Vec<ConfigError>) {
    let mut p = Parser {
        file: path.to_path_buf(),
        errors: Vec::new(),
        warnings: Vec::new(),
        env,
    };
    let root: Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let error = ConfigError {
                file: path.to_path_buf(),
                key: String::new(),
                problem: format!("invalid YAML: {e}"),
            };
            return (Err(ConfigErrors(vec![error])), Vec::new());
        }
    };
    let mut config = p.root(&root, noauth);
    config.start_only = StartOnly::of(&root);
    if p.errors.is_empty() {
        (Ok(config), p.warnings)
    } else {
        (Err(ConfigErrors(p.errors)), p.warnings)
    }
}

/// A label that tells tokens apart without revealing them: `sk-…abcd` for long tokens, less for
/// short ones.
pub fn token_label(token: &str) -> String {
    // Char boundaries of the first 3 and the last 4 characters, without collecting all of them.
    let n = token.chars().count();
    let head_end = token.char_indices().nth(3).map_or(token.len(), |(i, _)| i);
    let tail = |k: usize| token.char_indices().rev().nth(k - 1).map_or(0, |(i, _)| i);
    // Built at its exact size (`format!` grew it: an allocation and a reallocation).
    let join = |head: &str, tail: &str| {
        let mut s = String::with_capacity(head.len() + '…'.len_utf8() + tail.len());
        s.push_str(head);
        s.push('…');
        s.push_str(tail);
        s
    };
    if n >= 16 {
        join(&token[..head_end], &token[tail(4)..])
    } else if n >= 8 {
        join("", &token[tail(2)..])
    } else {
        "…".to_string()
    }
}
