//! The upstreams file (SPEC §3): parsing, `${ENV}` substitution, defaults and validation.
//!
//! The file is walked key by key rather than deserialised straight into structs so that every
//! problem can be reported as one line naming the file, the key path and what is wrong, and so that
//! unknown keys are warnings instead of hard errors (the Go tool's files carry keys we do not use).

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use awc::http::header::HeaderValue;
use awc::http::Uri;
use serde_yaml::{Mapping, Value};

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
}

impl LbPolicy {
    /// The spelling used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            LbPolicy::Order => "order",
            LbPolicy::Random => "random",
            LbPolicy::RoundRobin => "round_robin",
        }
    }
}

/// What `Authorization` an upstream receives.
#[derive(Clone, PartialEq, Eq)]
pub enum UpstreamAuth {
    /// No `Authorization` header at all.
    None,
    /// `Bearer <sk>`, prepared once; marked sensitive so it never prints.
    Bearer(HeaderValue),
    /// The client's own `Authorization` (`sk: asis`).
    AsIs,
}

impl fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key, whatever debug output someone adds later.
        f.write_str(match self {
            UpstreamAuth::None => "none",
            UpstreamAuth::Bearer(_) => "bearer(<redacted>)",
            UpstreamAuth::AsIs => "asis",
        })
    }
}

/// A model-name pattern where `*` matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(pub String);

impl Pattern {
    /// Whether `name` matches; without `*` this is plain equality.
    pub fn matches(&self, name: &str) -> bool {
        glob_match(self.0.as_bytes(), name.as_bytes())
    }
}

fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    // Iterative matcher with single-star backtracking: linear enough for model names.
    let (mut p, mut i) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while i < s.len() {
        if p < pat.len() && pat[p] != b'*' && pat[p] == s[i] {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some(p);
            mark = i;
            p += 1;
        } else if let Some(sp) = star {
            p = sp + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    while p < pat.len() && pat[p] == b'*' {
        p += 1;
    }
    p == pat.len()
}

/// One configured upstream, resolved and validated.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Unique label used everywhere an upstream is named.
    pub name: String,
    /// Base URL without a trailing slash; request paths are appended to it.
    pub base: String,
    /// The endpoint as it may be shown: scheme, host and path, never user info.
    pub display: String,
    /// What `Authorization` to send.
    pub auth: UpstreamAuth,
    /// Wait for response headers (non-stream).
    pub timeout: Duration,
    /// Wait for headers and first chunk (stream).
    pub stream_timeout: Duration,
    /// Models served; empty means all.
    pub allow: Vec<Pattern>,
    /// Models refused.
    pub deny: Vec<Pattern>,
    /// `model` rewrites, exact names first, then patterns in file order.
    pub model_map: Vec<(Pattern, String)>,
    /// `models`: the model list given in the file (then never fetched); None = fetch it (SPEC 4b).
    pub models: Option<Vec<String>>,
    /// `force_usage`: add `stream_options.include_usage` to stream requests (SPEC 4b).
    pub force_usage: bool,
}

impl Upstream {
    /// Whether this upstream may serve `model`; requests without a model are never filtered.
    pub fn admits(&self, model: Option<&str>) -> bool {
        let Some(model) = model else { return true };
        if self.deny.iter().any(|p| p.matches(model)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|p| p.matches(model))
    }

    /// The model name to send upstream, if `model_map` rewrites it.
    pub fn mapped_model(&self, model: &str) -> Option<&str> {
        self.model_map
            .iter()
            .find(|(p, _)| !p.0.contains('*') && p.0 == model)
            .or_else(|| self.model_map.iter().find(|(p, _)| p.matches(model)))
            .map(|(_, to)| to.as_str())
            .filter(|to| *to != model)
    }
}

/// An IP network that is allowed to tell us the client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Parses `10.0.0.1` or `10.0.0.0/8` (IPv6 alike).
    pub fn parse(s: &str) -> Option<IpNet> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip.trim(), Some(p.trim().parse::<u8>().ok()?)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = ip.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(IpNet { addr, prefix })
    }

    /// Whether `ip` is inside this network (IPv4-mapped IPv6 peers count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Feishu custom-bot settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeishuConfig {
    /// The bot's webhook URL (itself a secret: never logged).
    pub webhook: String,
    /// Optional signing secret.
    pub secret: Option<String>,
}

/// Matrix room settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatrixConfig {
    /// Homeserver base URL.
    pub homeserver: String,
    /// Access token of the sending account (never logged).
    pub access_token: String,
    /// Room to post to.
    pub room_id: String,
}

/// Alert channels and their rate limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyConfig {
    /// Feishu channel, if configured.
    pub feishu: Option<FeishuConfig>,
    /// Matrix channel, if configured.
    pub matrix: Option<MatrixConfig>,
    /// Least time between two alerts of the same kind.
    pub min_interval: Duration,
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
    /// Longest a request body may take to arrive (SPEC 4d "Slow bodies").
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
    /// Peers whose forwarding headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Alert channels.
    pub notify: NotifyConfig,
    /// Listen address from the file (`address`), if any.
    pub address: Option<String>,
    /// Database from the file (`database`, or the Go tool's `dbaddr`), if any.
    pub database: Option<String>,
    /// The upstreams, in file order.
    pub upstreams: Vec<Upstream>,
    /// How often each upstream's model list is fetched again (SPEC 4b).
    pub models_refresh: Duration,
    /// Skip an upstream whose known model list lacks the request's model (SPEC 4b).
    pub route_by_models: bool,
}

impl Config {
    /// Whether `ip` is a trusted proxy.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(ip))
    }
}

/// Reads and validates `path`; warnings (unknown keys) are logged, errors returned all together.
pub fn load(path: &Path, noauth: bool) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            key: String::new(),
            problem: format!("cannot read file: {e}"),
        }])
    })?;
    let (config, warnings) = parse(path, &text, noauth, &|k| std::env::var(k).ok())?;
    for w in warnings {
        log::warn!("{w}");
    }
    Ok(config)
}

/// Parses config text; `env` resolves `${VAR}`. Returns the config and its warnings.
pub fn parse(
    path: &Path,
    text: &str,
    noauth: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Vec<ConfigError>), ConfigErrors> {
    let mut p = Parser {
        file: path.to_path_buf(),
        errors: Vec::new(),
        warnings: Vec::new(),
        env,
    };
    let root: Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return Err(ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                key: String::new(),
                problem: format!("invalid YAML: {e}"),
            }]))
        }
    };
    let config = p.root(&root, noauth);
    if p.errors.is_empty() {
        Ok((config, p.warnings))
    } else {
        Err(ConfigErrors(p.errors))
    }
}

struct Parser<'a> {
    file: PathBuf,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
    env: &'a dyn Fn(&str) -> Option<String>,
}

const ROOT_KEYS: &[&str] = &[
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
];
const UPSTREAM_KEYS: &[&str] = &[
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
];

impl Parser<'_> {
    fn err(&mut self, key: &str, problem: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            key: key.to_string(),
            problem: problem.into(),
        });
    }

    fn warn_unknown(&mut self, map: &Mapping, known: &[&str], prefix: &str) {
        for k in map.keys() {
            let name = k
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{k:?}"));
            if !known.contains(&name.as_str()) {
                self.warnings.push(ConfigError {
                    file: self.file.clone(),
                    key: join(prefix, &name),
                    problem: "unknown key, ignored".into(),
                });
            }
        }
    }

    /// Replaces `${VAR}` from the environment; a missing variable is an error naming it.
    fn subst(&mut self, key: &str, s: &str) -> String {
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

    fn string(&mut self, key: &str, v: &Value) -> Option<String> {
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
    fn number(&mut self, key: &str, v: &Value) -> Option<f64> {
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

    fn seconds(&mut self, key: &str, v: Option<&Value>, default: Duration) -> Duration {
        match v.and_then(|v| self.number(key, v)) {
            Some(0.0) => {
                self.err(key, "must be greater than 0 seconds");
                default
            }
            Some(s) => Duration::from_secs_f64(s),
            None => default,
        }
    }

    fn integer(&mut self, key: &str, v: Option<&Value>, default: u64) -> u64 {
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
    fn boolean(&mut self, key: &str, v: Option<&Value>, default: bool) -> bool {
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

    /// A comma-separated string or a YAML list of strings.
    fn list(&mut self, key: &str, v: Option<&Value>) -> Vec<String> {
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

    fn root(&mut self, root: &Value, noauth: bool) -> Config {
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
        if tokens.is_empty() && !noauth {
            self.err(
                "authorization",
                "no client token configured: set `authorization` or run with -noauth",
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
                other => {
                    self.err(
                        "lb_policy",
                        format!("unknown policy {other:?}: use order, random or round_robin"),
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
                self.warn_unknown(m, &["failures", "seconds"], "cooldown");
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
        let database = match get("database").and_then(|v| self.string("database", v)) {
            Some(d) => Some(d),
            None => {
                let dbtype = get("dbtype").and_then(|v| self.string("dbtype", v));
                let dbaddr = get("dbaddr").and_then(|v| self.string("dbaddr", v));
                match dbtype.as_deref().map(str::trim) {
                    None | Some("") | Some("sqlite") => dbaddr,
                    Some("postgres") => match dbaddr {
                        Some(a) if crate::records::is_postgres_target(&a) => Some(a),
                        _ => {
                            self.err(
                                "dbaddr",
                                "with dbtype: postgres, give a postgres:// URL or a \"host=… dbname=…\" string",
                            );
                            None
                        }
                    },
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
        let route_by_models = self.boolean("route_by_models", get("route_by_models"), false);
        let force_usage = self.boolean("force_usage", get("force_usage"), true);

        let global = (timeout, stream_timeout);
        let upstreams = self.upstreams(get("upstreams"), global, force_usage);

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
            upstreams,
            models_refresh,
            route_by_models,
        }
    }

    fn notify(&mut self, v: Option<&Value>) -> NotifyConfig {
        let empty = Mapping::new();
        let map = match v {
            None | Some(Value::Null) => &empty,
            Some(Value::Mapping(m)) => m,
            Some(_) => {
                self.err("notify", "expected a mapping");
                &empty
            }
        };
        self.warn_unknown(map, &["feishu", "matrix", "min_interval"], "notify");
        let env = self.env;
        let sub = |p: &mut Self, name: &str| -> Mapping {
            match map.get(name) {
                None | Some(Value::Null) => Mapping::new(),
                Some(Value::Mapping(m)) => m.clone(),
                Some(_) => {
                    p.err(&format!("notify.{name}"), "expected a mapping");
                    Mapping::new()
                }
            }
        };
        let fm = sub(self, "feishu");
        self.warn_unknown(&fm, &["webhook", "secret"], "notify.feishu");
        let webhook = fm
            .get("webhook")
            .and_then(|v| self.string("notify.feishu.webhook", v))
            .or_else(|| env("FEISHU_WEBHOOK"))
            .filter(|s| !s.trim().is_empty());
        let secret = fm
            .get("secret")
            .and_then(|v| self.string("notify.feishu.secret", v))
            .or_else(|| env("FEISHU_SECRET"))
            .filter(|s| !s.trim().is_empty());
        let feishu = webhook.map(|webhook| {
            if !is_http_url(&webhook) {
                self.err("notify.feishu.webhook", "expected an http(s) URL");
            }
            FeishuConfig { webhook, secret }
        });

        let mm = sub(self, "matrix");
        self.warn_unknown(
            &mm,
            &["homeserver", "access_token", "room_id"],
            "notify.matrix",
        );
        let field = |p: &mut Self, k: &str, var: &str| {
            mm.get(k)
                .and_then(|v| p.string(&format!("notify.matrix.{k}"), v))
                .or_else(|| env(var))
                .filter(|s| !s.trim().is_empty())
        };
        let homeserver = field(self, "homeserver", "MATRIX_HOMESERVER");
        let access_token = field(self, "access_token", "MATRIX_ACCESS_TOKEN");
        let room_id = field(self, "room_id", "MATRIX_ROOM_ID");
        let matrix = match (homeserver, access_token, room_id) {
            (Some(homeserver), Some(access_token), Some(room_id)) => {
                if !is_http_url(&homeserver) {
                    self.err("notify.matrix.homeserver", "expected an http(s) URL");
                }
                Some(MatrixConfig {
                    homeserver,
                    access_token,
                    room_id,
                })
            }
            (None, None, None) => None,
            _ => {
                self.err(
                    "notify.matrix",
                    "homeserver, access_token and room_id are all needed",
                );
                None
            }
        };
        let min_interval = match map
            .get("min_interval")
            .and_then(|v| self.number("notify.min_interval", v))
        {
            Some(s) => Duration::from_secs_f64(s),
            None => Duration::from_secs(60),
        };
        NotifyConfig {
            feishu,
            matrix,
            min_interval,
        }
    }

    fn upstreams(
        &mut self,
        v: Option<&Value>,
        global: (Duration, Duration),
        force_usage: bool,
    ) -> Vec<Upstream> {
        let items = match v {
            Some(Value::Sequence(items)) if !items.is_empty() => items,
            Some(Value::Sequence(_)) | None | Some(Value::Null) => {
                self.err("upstreams", "at least one upstream is required");
                return Vec::new();
            }
            Some(_) => {
                self.err("upstreams", "expected a list of upstreams");
                return Vec::new();
            }
        };
        let mut out: Vec<(Option<String>, Upstream)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let prefix = format!("upstreams[{i}]");
            let Value::Mapping(m) = item else {
                self.err(&prefix, "expected a mapping with at least `endpoint`");
                continue;
            };
            self.warn_unknown(m, UPSTREAM_KEYS, &prefix);
            let key = |k: &str| format!("{prefix}.{k}");
            let endpoint = m
                .get("endpoint")
                .and_then(|v| self.string(&key("endpoint"), v));
            let Some(endpoint) = endpoint
                .map(|e| e.trim().to_string())
                .filter(|e| !e.is_empty())
            else {
                self.err(
                    &key("endpoint"),
                    "missing: every upstream needs an endpoint URL",
                );
                continue;
            };
            let Some((base, display, host)) = parse_endpoint(&endpoint) else {
                self.err(
                    &key("endpoint"),
                    format!("{:?} is not an http(s) URL", redact_url(&endpoint)),
                );
                continue;
            };
            let name = m
                .get("name")
                .and_then(|v| self.string(&key("name"), v))
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty());
            let auth = match m.get("sk").and_then(|v| self.string(&key("sk"), v)) {
                None => UpstreamAuth::None,
                Some(sk) if sk.trim().is_empty() => UpstreamAuth::None,
                Some(sk) if sk.trim() == "asis" => UpstreamAuth::AsIs,
                Some(sk) => match HeaderValue::from_str(&format!("Bearer {}", sk.trim())) {
                    Ok(mut hv) => {
                        hv.set_sensitive(true);
                        UpstreamAuth::Bearer(hv)
                    }
                    Err(_) => {
                        self.err(
                            &key("sk"),
                            "contains characters not allowed in an HTTP header",
                        );
                        UpstreamAuth::None
                    }
                },
            };
            let timeout = self.seconds(&key("timeout"), m.get("timeout"), global.0);
            let stream_timeout =
                self.seconds(&key("stream_timeout"), m.get("stream_timeout"), global.1);
            let allow = self
                .list(&key("allow"), m.get("allow"))
                .into_iter()
                .map(Pattern)
                .collect();
            let deny = self
                .list(&key("deny"), m.get("deny"))
                .into_iter()
                .map(Pattern)
                .collect();
            let mut model_map = Vec::new();
            match m.get("model_map") {
                None | Some(Value::Null) => {}
                Some(Value::Mapping(mm)) => {
                    for (from, to) in mm {
                        let from_s = self.string(&key("model_map"), from);
                        let to_s = self.string(&key("model_map"), to);
                        match (from_s, to_s) {
                            (Some(f), Some(t)) if !t.trim().is_empty() => {
                                model_map.push((Pattern(f), t.trim().to_string()))
                            }
                            _ => self.err(
                                &key("model_map"),
                                "every entry needs a model name and a target",
                            ),
                        }
                    }
                }
                Some(_) => self.err(&key("model_map"), "expected a mapping {from: to}"),
            }
            let models = match m.get("models") {
                None | Some(Value::Null) => None,
                v => Some(self.list(&key("models"), v)),
            };
            let force_usage = self.boolean(&key("force_usage"), m.get("force_usage"), force_usage);
            out.push((
                name.clone(),
                Upstream {
                    name: name.unwrap_or(host),
                    base,
                    display,
                    auth,
                    timeout,
                    stream_timeout,
                    allow,
                    deny,
                    model_map,
                    models,
                    force_usage,
                },
            ));
        }
        // Explicit names must be unique; default names (the host) get #2, #3 … and avoid them.
        let mut taken: HashSet<String> = HashSet::new();
        for (i, (explicit, u)) in out.iter().enumerate() {
            if explicit.is_some() && !taken.insert(u.name.clone()) {
                self.err(
                    &format!("upstreams[{i}].name"),
                    format!("{:?} is used twice", u.name),
                );
            }
        }
        let mut result = Vec::with_capacity(out.len());
        for (explicit, mut u) in out {
            if explicit.is_none() {
                let host = u.name.clone();
                let mut n = 1;
                while taken.contains(&u.name) {
                    n += 1;
                    u.name = format!("{host}#{n}");
                }
                taken.insert(u.name.clone());
            }
            result.push(u);
        }
        result
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn split_commas(s: &str) -> impl Iterator<Item = String> + '_ {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
}

fn is_http_url(s: &str) -> bool {
    parse_endpoint(s).is_some()
}

/// Splits an endpoint into (base URL without trailing slash, displayable URL, host).
fn parse_endpoint(s: &str) -> Option<(String, String, String)> {
    let uri: Uri = s.parse().ok()?;
    let scheme = uri.scheme_str()?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let auth = uri.authority()?;
    let host = auth
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return None;
    }
    let hostport = auth.as_str().rsplit('@').next().unwrap_or("").to_string();
    let path = uri.path().trim_end_matches('/');
    let base = format!("{scheme}://{}{path}", auth.as_str());
    let display = format!("{scheme}://{hostport}{path}");
    Some((base, display, host))
}

/// A URL with any user info removed, for error messages.
pub fn redact_url(s: &str) -> String {
    match (s.find("://"), s.find('@')) {
        (Some(p), Some(at)) if at > p => format!("{}://…@{}", &s[..p], &s[at + 1..]),
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Config, ConfigErrors> {
        parse(Path::new("t.yaml"), text, false, &|k| {
            (k == "KEY").then(|| "from-env".to_string())
        })
        .map(|(c, _)| c)
    }

    #[test]
    fn original_file_loads() {
        let c = parse_str(
            "authorization: woshimima\nupstreams:\n  - sk: \"secret_key_1\"\n    endpoint: \"https://api.openai.com/v2\"\n  - sk: \"secret_key_2\"\n    endpoint: \"https://api.openai.com/v1\"\n    timeout: 30\n",
        )
        .unwrap();
        assert_eq!(c.tokens, vec!["woshimima"]);
        assert_eq!(c.upstreams[0].name, "api.openai.com");
        assert_eq!(c.upstreams[1].name, "api.openai.com#2");
        assert_eq!(c.upstreams[1].timeout, Duration::from_secs(30));
        assert_eq!(c.upstreams[0].timeout, Duration::from_secs(60));
        assert_eq!(c.upstreams[0].stream_timeout, Duration::from_secs(5));
        assert_eq!(c.upstreams[0].base, "https://api.openai.com/v2");
        assert_eq!(c.max_body_bytes, 32 << 20);
        assert_eq!(c.cooldown_failures, 3);
    }

    #[test]
    fn env_substitution_and_lists() {
        let c = parse_str(
            "authorization: [a, \"b, c\"]\nupstreams:\n  - endpoint: http://x/v1\n    sk: ${KEY}\n    allow: gpt-*, o1\n",
        )
        .unwrap();
        assert_eq!(c.tokens, vec!["a", "b", "c"]);
        assert!(matches!(&c.upstreams[0].auth, UpstreamAuth::Bearer(v) if v == "Bearer from-env"));
        assert!(c.upstreams[0].admits(Some("gpt-4o")));
        assert!(c.upstreams[0].admits(Some("o1")));
        assert!(!c.upstreams[0].admits(Some("claude")));
        assert!(c.upstreams[0].admits(None));
    }

    #[test]
    fn errors_name_file_key_and_problem() {
        let e = parse_str(
            "authorization: x\nlb_policy: fastest\nupstreams:\n  - sk: a\n  - endpoint: ftp://h/\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("t.yaml: lb_policy: unknown policy \"fastest\""),
            "{e}"
        );
        assert!(e.contains("t.yaml: upstreams[0].endpoint: missing"), "{e}");
        assert!(
            e.contains("t.yaml: upstreams[1].endpoint: \"ftp://h/\" is not an http(s) URL"),
            "{e}"
        );
        let e = parse_str("upstreams:\n  - endpoint: http://h\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.yaml: authorization: no client token"), "{e}");
        let e =
            parse_str("authorization: x\nupstreams:\n  - endpoint: http://h\n    sk: ${NOPE}\n")
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("upstreams[0].sk: environment variable NOPE is not set"),
            "{e}"
        );
    }

    #[test]
    fn model_map_exact_beats_wildcard() {
        let c = parse_str(
            "authorization: x\nupstreams:\n  - endpoint: http://h\n    model_map: {\"*\": fallback, gpt-4o: dep}\n",
        )
        .unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.mapped_model("gpt-4o"), Some("dep"));
        assert_eq!(u.mapped_model("other"), Some("fallback"));
    }

    #[test]
    fn glob_and_cidr() {
        assert!(Pattern("gpt-*-mini".into()).matches("gpt-4o-mini"));
        assert!(!Pattern("gpt-*-mini".into()).matches("gpt-4o"));
        assert!(Pattern("*".into()).matches(""));
        let n = IpNet::parse("10.0.0.0/8").unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(IpNet::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(IpNet::parse("nope").is_none());
    }

    #[test]
    fn models_and_usage_keys() {
        let c = parse_str(
            "authorization: x\nmodels_refresh: 30\nroute_by_models: true\nforce_usage: false\nupstreams:\n  - endpoint: http://h\n    models: [a, \"b/c\"]\n  - endpoint: http://h2\n    force_usage: \"true\"\n",
        )
        .unwrap();
        assert_eq!(c.models_refresh, Duration::from_secs(30));
        assert!(c.route_by_models);
        assert_eq!(c.upstreams[0].models, Some(vec!["a".into(), "b/c".into()]));
        assert!(
            !c.upstreams[0].force_usage,
            "the global value is the default"
        );
        assert!(c.upstreams[1].force_usage);
        assert_eq!(c.upstreams[1].models, None);
        let d = parse_str("authorization: x\nupstreams:\n  - endpoint: http://h\n").unwrap();
        assert_eq!(d.models_refresh, Duration::from_secs(600));
        assert!(!d.route_by_models);
        assert!(d.upstreams[0].force_usage);
        let e = parse_str(
            "authorization: x\nroute_by_models: maybe\nmodels_refresh: 0\nupstreams:\n  - endpoint: http://h\n    force_usage: 3\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("t.yaml: route_by_models: expected true or false"),
            "{e}"
        );
        assert!(
            e.contains("t.yaml: models_refresh: must be greater than 0"),
            "{e}"
        );
        assert!(
            e.contains("upstreams[0].force_usage: expected true or false"),
            "{e}"
        );
    }

    #[test]
    fn endpoint_display_drops_userinfo() {
        let (base, display, host) =
            parse_endpoint("https://user:pw@h.example:8443/api/v1/").unwrap();
        assert_eq!(base, "https://user:pw@h.example:8443/api/v1");
        assert_eq!(display, "https://h.example:8443/api/v1");
        assert_eq!(host, "h.example");
    }
}
