//! `model_timeouts` (see the configuration guide): per model pattern, waits that override the
//! global and upstream `timeout`/`stream_timeout`, for models whose first chunk comes only after
//! their reasoning (`{"o*": {stream_timeout: 120}}`). First match in file order wins.

use std::time::Duration;

use serde_yaml::Value;

use super::parse::Parser;
use super::Pattern;

/// The keys of one `model_timeouts` entry.
pub(super) const MODEL_TIMEOUT_KEYS: &[&str] = &["timeout", "stream_timeout"];

/// One `model_timeouts` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelTimeout {
    /// The model pattern (`*` wildcards).
    pub pattern: Pattern,
    /// Overrides `timeout` for matching requests.
    pub timeout: Option<Duration>,
    /// Overrides `stream_timeout` for matching requests.
    pub stream_timeout: Option<Duration>,
}

impl Parser<'_> {
    /// Reads `model_timeouts`: a mapping of pattern → `{timeout, stream_timeout}`, in order.
    pub(super) fn model_timeouts(&mut self, v: Option<&Value>) -> Vec<ModelTimeout> {
        let m = match v {
            None | Some(Value::Null) => return Vec::new(),
            Some(Value::Mapping(m)) => m,
            Some(_) => {
                self.err(
                    "model_timeouts",
                    "expected a mapping of model patterns to {timeout, stream_timeout}",
                );
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (k, v) in m {
            let Some(pattern) = k.as_str().map(str::to_string) else {
                self.err("model_timeouts", "a model pattern must be a string");
                continue;
            };
            let key = format!("model_timeouts.{pattern}");
            let Value::Mapping(entry) = v else {
                self.err(&key, "expected a mapping {timeout: S, stream_timeout: S}");
                continue;
            };
            self.warn_unknown(entry, MODEL_TIMEOUT_KEYS, &key);
            let wait = |p: &mut Self, name: &str| {
                let k = format!("{key}.{name}");
                entry.get(name).and_then(|v| p.number(&k, v)).and_then(|s| {
                    if s == 0.0 {
                        p.err(&k, "must be greater than 0 seconds");
                        None
                    } else {
                        Some(Duration::from_secs_f64(s))
                    }
                })
            };
            let timeout = wait(self, "timeout");
            let stream_timeout = wait(self, "stream_timeout");
            out.push(ModelTimeout {
                pattern: Pattern(pattern),
                timeout,
                stream_timeout,
            });
        }
        out
    }
}
