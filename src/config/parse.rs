//! The error-collecting walker: typed readers for scalars and lists, `${ENV}` substitution and
//! the top-level keys. Each problem becomes one `ConfigError`; parsing goes on so that one load
//! reports all of them.

use std::path::PathBuf;
use std::time::Duration;

use serde_yaml::{Mapping, Value};

use super::net::parse_endpoint;
use super::{Config, ConfigError, IpNet, LbPolicy, Prefill};

/// The walker's state: where it reads from and what it found wrong so far.
pub(super) struct Parser<'a> {
    pub(super) file: PathBuf,
    pub(super) errors: Vec<ConfigError>,
    pub(super) warnings: Vec<ConfigError>,
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
}

/// The top-level keys; any other one is warned about and ignored (listed in `KEY_SECTIONS`).
pub(super) const ROOT_KEYS: &[&str] = &[
    "authorization",
    "timeout",
    "stream_timeout",
    "idle_timeout",
    "body_timeout",
    "lb_policy",
    "max_body_bytes",
    "record_body_bytes",
    "retention_days",
    "record_queue",
    "cooldown",
    "trusted_proxies",
    "notify",
    "upstreams",
    "address",
    "database",
    "dbtype",
    "dbaddr",
    "models_refresh",
    "route_by_models",
    "force_usage",
    "retries",
    "retry_after_max",
    "deadline",
    "failover_codes",
    "resume",
    "prefill",
    "otel",
    // The 0.3 limits (see the security guide), read in `limits.rs`.
    "realtime_max_sessions",
    "realtime_max_sessions_per_token",
    "realtime_idle_timeout",
    "realtime_buffer_bytes",
    "resume_max_bytes",
    // State on one upstream (see the affinity guide).
    "rebuild",
    // Version 0.4.
    "model_timeouts",
    "rebuild_memory",
    "members",
    "probe_interval",
];
/// The keys of one `upstreams` entry; any other one is warned about and ignored.
pub(super) const UPSTREAM_KEYS: &[&str] = &[
    "name",
    "endpoint",
    "sk",
    "timeout",
    "stream_timeout",
    "allow",
    "deny",
    "model_map",
    "models",
    "force_usage",
    "retries",
    "prefill",
    "weight",
];

/// The most `retries` a config may give (global or per upstream).
pub const MAX_RETRIES: u32 = 5;

impl Parser<'_> {
    pub(super) fn err(&mut self, key: &str, problem: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            key: key.to_string(),
            problem: problem.into(),
        });
    }

    pub(super) fn warn_unknown(&mut self, map: &Mapping, known: &[&str], prefix: &str) {
        for k in map.keys() {
            let name = k
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{k:?}"));
            if !known.contains(&name.as_str()) {
                let problem = match nearest(&name, known) {
                    Some(near) => format!("unknown key, ignored (did you mean `{near}`?)"),
                    None => "unknown key, ignored".to_string(),
                };
                self.warnings.push(ConfigError {
                    file: self.file.clone(),
                    key: join(prefix, &name),
                    problem,
                });
            }
        }
    }

    /// Replaces `${VAR}` from the environment; a missing variable is an error naming it.
    pub(super) fn subst(&mut self, key: &str, s: &str) -> String {
        if !s.contains("${") {
            return s.to_string();
        }
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            match after.find('}') {
                Some(end) => {
                    let var = &after[..end];
                    match (self.env)(var) {
                        Some(v) => out.push_str(&v),
                        None => self.err(key, format!("environment variable {var} is not set")),
                    }
                    rest = &after[end + 1..];
                }
                None => {
                    out.push_str(&rest[start..]);
                    rest = "";
                }
            }
        }
        out.push_str(rest);
        out
    }

    pub(super) fn string(&mut self, key: &str, v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(self.subst(key, s)),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Null => None,
            _ => {
                self.err(key, "expected a string");
                None
            }
        }
    }

    /// A number, also accepted as a string (so `${ENV}` works for numbers too).
    pub(super) fn number(&mut self, key: &str, v: &Value) -> Option<f64> {
        let n = match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => self.subst(key, s).trim().parse::<f64>().ok(),
            Value::Null => return None,
            _ => None,
        };
        match n {
            Some(n) if n.is_finite() && n >= 0.0 => Some(n),
            _ => {
                self.err(key, "expected a non-negative number");
                None
            }
        }
    }

    pub(super) fn seconds(&mut self, key: &str, v: Option<&Value>, default: Duration) -> Duration {
        match v.and_then(|v| self.number(key, v)) {
            Some(0.0) => {
                self.err(key, "must be greater than 0 seconds");
                default
            }
            Some(s) => Duration::from_secs_f64(s),
            None => default,
        }
    }

    pub(super) fn integer(&mut self, key: &str, v: Option<&Value>, default: u64) -> u64 {
        match v.and_then(|v| self.number(key, v)) {
            Some(n) if n.fract() == 0.0 && n <= u64::MAX as f64 => n as u64,
            Some(_) => {
                self.err(key, "expected a whole number");
                default
            }
            None => default,
        }
    }

    /// `true`/`false` (also as strings, so `${ENV}` works).
    /// `retries` (global or per upstream): at most [`MAX_RETRIES`]; more only multiplies the
    /// load a client's one request puts on a failing upstream (see the security guide, "Retries
    /// are bounded").
    pub(super) fn retries(&mut self, key: &str, v: Option<&Value>, default: u32) -> u32 {
        let n = self.integer(key, v, default.into());
        // An inherited default was reported where it was written.
        if v.is_some() && n > u64::from(MAX_RETRIES) {
            self.err(key, format!("must be at most {MAX_RETRIES} (got {n})"));
        }
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    pub(super) fn boolean(&mut self, key: &str, v: Option<&Value>, default: bool) -> bool {
        let b = match v {
            None | Some(Value::Null) => return default,
            Some(Value::Bool(b)) => Some(*b),
            Some(Value::String(s)) => match self.subst(key, s).trim() {
                "true" | "yes" | "on" => Some(true),
                "false" | "no" | "off" => Some(false),
                _ => None,
            },
            Some(_) => None,
        };
        b.unwrap_or_else(|| {
            self.err(key, "expected true or false");
            default
        })
    }

    /// `message`, `vllm`, `deepseek` or `none`.
    pub(super) fn prefill(&mut self, key: &str, v: Option<&Value>, default: Prefill) -> Prefill {
        let Some(s) = v.and_then(|v| self.string(key, v)) else {
            return default;
        };
        match s.trim() {
            "message" => Prefill::Message,
            "vllm" => Prefill::Vllm,
            "deepseek" => Prefill::Deepseek,
            "none" => Prefill::None,
            other => {
                self.err(
                    key,
                    format!("{other:?} is not a prefill: use message, vllm, deepseek or none"),
                );
                default
            }
        }
    }

    /// A comma-separated string or a YAML list of strings.
    pub(super) fn list(&mut self, key: &str, v: Option<&Value>) -> Vec<String> {
        let mut out = Vec::new();
        match v {
            None | Some(Value::Null) => {}
            Some(Value::Sequence(items)) => {
                for (i, item) in items.iter().enumerate() {
                    if let Some(s) = self.string(&format!("{key}[{i}]"), item) {
                        out.extend(split_commas(&s));
                    }
                }
            }
            Some(other) => {
                if let Some(s) = self.string(key, other) {
                    out.extend(split_commas(&s));
                }
            }
        }
        out
    }

    pub(super) fn root(&mut self, root: &Value, noauth: bool) -> Config {
        let empty = Mapping::new();
        let map = match root {
            Value::Mapping(m) => m,
            Value::Null => {
                self.err("", "the file is empty");
                &empty
            }
            _ => {
                self.err("", "expected a mapping of keys at the top level");
                &empty
            }
        };
        self.warn_unknown(map, ROOT_KEYS, "");
        let get = |k: &str| map.get(k);

        let tokens = self.list("authorization", get("authorization"));
        let no_members = match get("members") {
            None | Some(Value::Null) => true,
            Some(Value::Sequence(s)) => s.is_empty(),
            Some(_) => false,
        };
        if tokens.is_empty() && no_members && !noauth {
            self.err(
                "authorization",
                "no client token configured: set `authorization` or `members`, or run with -noauth",
            );
        }
        let timeout = self.seconds("timeout", get("timeout"), Duration::from_secs(60));
        let stream_timeout = self.seconds(
            "stream_timeout",
            get("stream_timeout"),
            Duration::from_secs(5),
        );
        let idle_timeout = self.seconds(
            "idle_timeout",
            get("idle_timeout"),
            Duration::from_secs(120),
        );
        let body_timeout =
            self.seconds("body_timeout", get("body_timeout"), Duration::from_secs(30));
        let lb_policy = match get("lb_policy").and_then(|v| self.string("lb_policy", v)) {
            None => LbPolicy::Order,
            Some(s) => match s.trim() {
                "order" | "" => LbPolicy::Order,
                "random" => LbPolicy::Random,
                "round_robin" | "round-robin" => LbPolicy::RoundRobin,
                "sticky" => LbPolicy::Sticky,
                other => {
                    self.err(
                        "lb_policy",
                        format!(
                            "unknown policy {other:?}: use order, random, round_robin or sticky"
                        ),
                    );
                    LbPolicy::Order
                }
            },
        };
        let max_body_bytes = self.integer("max_body_bytes", get("max_body_bytes"), 32 << 20);
        if max_body_bytes == 0 {
            self.err("max_body_bytes", "must be greater than 0");
        }
        let record_body_bytes =
            self.integer("record_body_bytes", get("record_body_bytes"), 1 << 20);
        let retention_days = self.integer("retention_days", get("retention_days"), 0);
        let record_queue = self.integer("record_queue", get("record_queue"), 10_000);
        if record_queue == 0 {
            self.err("record_queue", "must be at least 1");
        }

        let (mut cooldown_failures, mut cooldown) = (3u64, Duration::from_secs(30));
        match get("cooldown") {
            None | Some(Value::Null) => {}
            Some(Value::Mapping(m)) => {
                self.warn_unknown(m, COOLDOWN_KEYS, "cooldown");
                cooldown_failures = self.integer("cooldown.failures", m.get("failures"), 3);
                if cooldown_failures == 0 {
                    self.err("cooldown.failures", "must be at least 1");
                }
                cooldown = self.seconds("cooldown.seconds", m.get("seconds"), cooldown);
            }
            Some(_) => self.err("cooldown", "expected a mapping {failures: N, seconds: S}"),
        }

        let mut trusted_proxies = Vec::new();
        for (i, s) in self
            .list("trusted_proxies", get("trusted_proxies"))
            .iter()
            .enumerate()
        {
            match IpNet::parse(s) {
                Some(n) => trusted_proxies.push(n),
                None => self.err(
                    &format!("trusted_proxies[{i}]"),
                    format!("{s:?} is not an IP address or CIDR"),
                ),
            }
        }

        let notify = self.notify(get("notify"));
        let address = get("address").and_then(|v| self.string("address", v));
        let mut dbtype_postgres = false;
        let database = match get("database").and_then(|v| self.string("database", v)) {
            Some(d) => Some(d),
            None => {
                let dbtype = get("dbtype").and_then(|v| self.string("dbtype", v));
                let dbaddr = get("dbaddr").and_then(|v| self.string("dbaddr", v));
                match dbtype.as_deref().map(str::trim) {
                    None | Some("") | Some("sqlite") => dbaddr,
                    Some("postgres") => {
                        // Whether `dbaddr` really names PostgreSQL is checked where the database
                        // is opened (the config does not know the records backends).
                        dbtype_postgres = true;
                        dbaddr
                    }
                    Some(other) => {
                        self.err(
                            "dbtype",
                            format!("{other:?} is not supported: use sqlite or postgres"),
                        );
                        None
                    }
                }
            }
        };

        let models_refresh = self.seconds(
            "models_refresh",
            get("models_refresh"),
            Duration::from_secs(600),
        );
        // 0 (the default) is off; negative values are refused like any other bad number.
        let probe_interval = get("probe_interval")
            .and_then(|v| self.number("probe_interval", v))
            .filter(|s| *s > 0.0)
            .map(Duration::from_secs_f64);
        let route_by_models = self.boolean("route_by_models", get("route_by_models"), false);
        let force_usage = self.boolean("force_usage", get("force_usage"), true);
        let retries = self.retries("retries", get("retries"), 0);
        let retry_after_max = get("retry_after_max")
            .and_then(|v| self.number("retry_after_max", v))
            .map_or(Duration::from_secs(5), Duration::from_secs_f64);
        let deadline = get("deadline")
            .and_then(|v| self.number("deadline", v))
            .filter(|d| *d > 0.0)
            .map(Duration::from_secs_f64);
        let failover_codes = match get("failover_codes") {
            None => vec!["context_length_exceeded".to_string()],
            v => self.list("failover_codes", v),
        };
        let resume = self.boolean("resume", get("resume"), false);
        let rebuild = self.boolean("rebuild", get("rebuild"), false);
        let prefill = self.prefill("prefill", get("prefill"), Prefill::Message);
        let otel = self.otel(get("otel"));
        let model_timeouts = self.model_timeouts(get("model_timeouts"));
        let members = self.members(get("members"), &tokens, noauth);

        let defaults = UpstreamDefaults {
            timeout,
            stream_timeout,
            force_usage,
            retries,
            prefill,
        };
        let upstreams = self.upstreams(get("upstreams"), defaults);
        let limits = self.limits(map);

        Config {
            file: self.file.clone(),
            tokens,
            noauth,
            timeout,
            stream_timeout,
            idle_timeout,
            body_timeout,
            lb_policy,
            max_body_bytes: usize::try_from(max_body_bytes).unwrap_or(usize::MAX),
            record_body_bytes: usize::try_from(record_body_bytes).unwrap_or(usize::MAX),
            retention_days: u32::try_from(retention_days).unwrap_or(u32::MAX),
            record_queue: usize::try_from(record_queue).unwrap_or(usize::MAX),
            cooldown_failures: u32::try_from(cooldown_failures).unwrap_or(u32::MAX),
            cooldown,
            trusted_proxies,
            notify,
            address,
            database,
            dbtype_postgres,
            upstreams,
            models_refresh,
            probe_interval,
            route_by_models,
            retry_after_max,
            deadline,
            failover_codes,
            resume,
            otel,
            limits,
            rebuild,
            model_timeouts,
            members,
            start_only: Default::default(),
        }
    }
}

/// The known key a misspelt `key` most likely meant: the one fewest edits away (a transposition
/// counts as one edit, case and `-`/`_` are ignored), when that is at most a third of the longer
/// name (at least one edit). `endpont` → `endpoint`, `stream-timeout` → `stream_timeout`; `zz`
/// → none. A typo in a key is otherwise silent until the value it was meant to set is missed.
pub(super) fn nearest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let norm = |s: &str| -> Vec<char> {
        s.chars()
            .map(|c| {
                if c == '-' {
                    '_'
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    };
    let typed = norm(key);
    known
        .iter()
        .map(|k| (edits(&typed, &norm(k)), *k))
        .filter(|(d, k)| *d <= (typed.len().max(k.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Optimal string alignment distance: insertions, deletions, substitutions and transpositions of
/// two neighbours, each one edit.
fn edits(a: &[char], b: &[char]) -> usize {
    let (n, m) = (a.len(), b.len());
    let mut d = vec![vec![0usize; m + 1]; n + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=n {
        for j in 1..=m {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[n][m]
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Global values that an upstream may override.
#[derive(Debug, Clone, Copy)]
pub(super) struct UpstreamDefaults {
    pub(super) timeout: Duration,
    pub(super) stream_timeout: Duration,
    pub(super) force_usage: bool,
    pub(super) retries: u32,
    pub(super) prefill: Prefill,
}

fn split_commas(s: &str) -> impl Iterator<Item = String> + '_ {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
}

pub(super) fn is_http_url(s: &str) -> bool {
    parse_endpoint(s).is_some()
}

/// The keys of the `cooldown` mapping; any other one is warned about and ignored.
pub(super) const COOLDOWN_KEYS: &[&str] = &["failures", "seconds"];
