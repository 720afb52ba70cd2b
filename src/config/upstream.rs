//! Upstreams: who serves a model (`allow`/`deny` patterns), what it is called there
//! (`model_map`), what `Authorization` it gets, and the `upstreams` list's parsing.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use awc::http::header::HeaderValue;
use awc::http::Uri;
use serde_yaml::Value;

use super::net::parse_endpoint;
use super::parse::{Parser, UpstreamDefaults, UPSTREAM_KEYS};
use super::Prefill;

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
    pub name: std::sync::Arc<str>,
    /// Base URL without a trailing slash; request paths are appended to it.
    pub base: String,
    /// `base` taken apart once, so that a request's URL and `Host` are assembled from shared
    /// pieces instead of being formatted and parsed per request.
    pub origin: Origin,
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
    /// `models`: the model list given in the file (then never fetched); None = fetch it (see the
    /// observability guide, "Models and token usage (0.2)").
    pub models: Option<Vec<String>>,
    /// `force_usage`: add `stream_options.include_usage` to stream requests (see the
    /// observability guide, "Models and token usage (0.2)").
    pub force_usage: bool,
    /// `retries`: extra attempts on this upstream before moving on (see the rescue guide).
    pub retries: u32,
    /// `prefill`: how this upstream continues a partial answer on `resume` (see the rescue guide).
    pub prefill: Prefill,
    /// `weight`: this upstream's share under `random` and `sticky` (see the affinity guide,
    /// "Sticky and weight"); positive.
    pub weight: f64,
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

impl Parser<'_> {
    pub(super) fn upstreams(
        &mut self,
        v: Option<&Value>,
        defaults: UpstreamDefaults,
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
            let timeout = self.seconds(&key("timeout"), m.get("timeout"), defaults.timeout);
            let stream_timeout = self.seconds(
                &key("stream_timeout"),
                m.get("stream_timeout"),
                defaults.stream_timeout,
            );
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
            let force_usage = self.boolean(
                &key("force_usage"),
                m.get("force_usage"),
                defaults.force_usage,
            );
            let retries = self.retries(&key("retries"), m.get("retries"), defaults.retries);
            let prefill = self.prefill(&key("prefill"), m.get("prefill"), defaults.prefill);
            let weight = match m.get("weight").and_then(|v| self.number(&key("weight"), v)) {
                Some(w) if w > 0.0 => w,
                Some(_) => {
                    self.err(&key("weight"), "must be a positive number");
                    1.0
                }
                None => 1.0,
            };
            out.push((
                name.clone(),
                Upstream {
                    name: name.unwrap_or(host).into(),
                    origin: Origin::of(&base),
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
                    retries,
                    prefill,
                    weight,
                },
            ));
        }
        // Explicit names must be unique; default names (the host) get #2, #3 … and avoid them.
        let mut taken: HashSet<std::sync::Arc<str>> = HashSet::new();
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
                    u.name = format!("{host}#{n}").into();
                }
                taken.insert(u.name.clone());
            }
            result.push(u);
        }
        result
    }
}

/// An upstream's scheme, authority, base path and `Host` value.
#[derive(Debug, Clone)]
pub struct Origin {
    scheme: Option<awc::http::uri::Scheme>,
    authority: Option<awc::http::uri::Authority>,
    path: String,
    host: Option<HeaderValue>,
}

impl Origin {
    /// Takes apart a base URL that [`parse_endpoint`] produced.
    fn of(base: &str) -> Origin {
        let uri: Option<Uri> = base.parse().ok();
        let parts = uri.map(Uri::into_parts);
        let (scheme, authority) = match parts {
            Some(p) => (p.scheme, p.authority),
            None => (None, None),
        };
        // The value awc would write itself: the host, and the port unless it is 80 or 443.
        let host = authority.as_ref().and_then(|a| {
            let text = match a.port_u16() {
                None | Some(80) | Some(443) => a.host().to_string(),
                Some(port) => format!("{}:{port}", a.host()),
            };
            HeaderValue::from_str(&text).ok()
        });
        let path = match (&scheme, &authority) {
            (Some(s), Some(a)) => base
                .strip_prefix(s.as_str())
                .and_then(|r| r.strip_prefix("://"))
                .and_then(|r| r.strip_prefix(a.as_str()))
                .unwrap_or("")
                .to_string(),
            _ => String::new(),
        };
        Origin {
            scheme,
            authority,
            path,
            host,
        }
    }

    /// The upstream URL of a client request: its path with `/v1` taken off, appended to the base
    /// path, and its query. The scheme and authority are shared; the path and query too when the
    /// result is the client's own (a base path of `/v1`, the usual case), else one allocation.
    /// None if the pieces do not make a URI (the caller then formats and parses the URL as text).
    pub fn uri(&self, client: &Uri) -> Option<Uri> {
        let full = client.path();
        let path = full.strip_prefix("/v1").unwrap_or(full);
        let query = client.query();
        let mut parts = awc::http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone()?);
        parts.authority = Some(self.authority.clone()?);
        // `path` is a suffix of `full`: base path + path is `full` itself when this holds.
        if full.len() == self.path.len() + path.len() && full.starts_with(self.path.as_str()) {
            if let Some(pq) = client.path_and_query() {
                parts.path_and_query = Some(pq.clone());
                return Uri::from_parts(parts).ok();
            }
        }
        let mut pq =
            String::with_capacity(self.path.len() + path.len() + query.map_or(0, |q| q.len() + 1));
        pq.push_str(&self.path);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        parts.path_and_query = Some(
            awc::http::uri::PathAndQuery::from_maybe_shared(actix_web::web::Bytes::from(pq))
                .ok()?,
        );
        Uri::from_parts(parts).ok()
    }

    /// The `Host` header for this upstream (awc would otherwise format it per request).
    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }
}

/// A URL with any user info removed, for error messages.
pub fn redact_url(s: &str) -> String {
    match (s.find("://"), s.find('@')) {
        (Some(p), Some(at)) if at > p => format!("{}://…@{}", &s[..p], &s[at + 1..]),
        _ => s.to_string(),
    }
}
