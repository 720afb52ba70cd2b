//! The `otel:` section (see the tracing guide): where traces go when the standard `OTEL_*`
//! environment variables do not say. Its shape is checked here like every other key; the
//! endpoint and the sampler are checked by the trace module when it merges the environment in,
//! once, before the port opens (so the config needs nothing of the trace module).

use serde_yaml::{Mapping, Value};

use super::parse::Parser;

/// The keys of `otel:`; any other is warned about and ignored.
pub(super) const OTEL_KEYS: &[&str] = &[
    "endpoint",
    "headers",
    "service_name",
    "sampler",
    "sampler_arg",
];

/// `otel:` as written (each value may use `${ENV}`); empty when the section is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtelConfig {
    /// OTLP/HTTP traces URL, used as is (e.g. `http://collector:4318/v1/traces`).
    pub endpoint: Option<String>,
    /// Extra export request headers (e.g. a vendor's API key); never logged.
    pub headers: Vec<(String, String)>,
    /// `service.name` of the exported spans.
    pub service_name: Option<String>,
    /// One of the standard sampler names.
    pub sampler: Option<String>,
    /// The sampler's ratio (for the `traceidratio` ones).
    pub sampler_arg: Option<String>,
}

impl Parser<'_> {
    pub(super) fn otel(&mut self, v: Option<&Value>) -> OtelConfig {
        let map = match v {
            None | Some(Value::Null) => return OtelConfig::default(),
            Some(Value::Mapping(m)) => m,
            Some(_) => {
                self.err("otel", "expected a mapping");
                return OtelConfig::default();
            }
        };
        self.warn_unknown(
            map,
            &[
                "endpoint",
                "headers",
                "service_name",
                "sampler",
                "sampler_arg",
            ],
            "otel",
        );
        let s = |p: &mut Self, k: &str| {
            map.get(k)
                .and_then(|v| p.string(&format!("otel.{k}"), v))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        // The endpoint and sampler are checked where they are resolved with the environment
        // (`trace::settings::resolve`, before the port opens): an environment variable beats
        // them, and the config does not know the trace module's types.
        let endpoint = s(self, "endpoint");
        let service_name = s(self, "service_name");
        let sampler = s(self, "sampler");
        let sampler_arg = s(self, "sampler_arg");
        let mut headers = Vec::new();
        match map.get("headers") {
            None | Some(Value::Null) => {}
            Some(Value::Mapping(h)) => headers = self.otel_headers(h),
            Some(_) => self.err("otel.headers", "expected a mapping of header: value"),
        }
        OtelConfig {
            endpoint,
            headers,
            service_name,
            sampler,
            sampler_arg,
        }
    }

    fn otel_headers(&mut self, h: &Mapping) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (k, v) in h {
            let Some(name) = k.as_str() else {
                self.err("otel.headers", "header names must be strings");
                continue;
            };
            let key = format!("otel.headers.{name}");
            let Some(value) = self.string(&key, v) else {
                continue;
            };
            let token = !name.is_empty()
                && name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c));
            if !token {
                self.err(&key, "not a valid header name");
            } else if value.bytes().any(|c| (c < b' ' && c != b'\t') || c == 0x7f) {
                self.err(&key, "the value has control characters");
            } else {
                out.push((name.to_string(), value));
            }
        }
        out
    }
}
