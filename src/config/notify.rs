//! Alert channels (`notify`): Feishu and Matrix settings, each also read from the environment.

use std::time::Duration;

use serde_yaml::{Mapping, Value};

use super::parse::{is_http_url, Parser};

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

/// The keys of the `notify` mapping; any other one is warned about and ignored.
pub(super) const NOTIFY_KEYS: &[&str] = &["feishu", "matrix", "min_interval"];
/// The keys of `notify.feishu`.
pub(super) const FEISHU_KEYS: &[&str] = &["webhook", "secret"];
/// The keys of `notify.matrix`.
pub(super) const MATRIX_KEYS: &[&str] = &["homeserver", "access_token", "room_id"];

impl Parser<'_> {
    pub(super) fn notify(&mut self, v: Option<&Value>) -> NotifyConfig {
        let empty = Mapping::new();
        let map = match v {
            None | Some(Value::Null) => &empty,
            Some(Value::Mapping(m)) => m,
            Some(_) => {
                self.err("notify", "expected a mapping");
                &empty
            }
        };
        self.warn_unknown(map, NOTIFY_KEYS, "notify");
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
        self.warn_unknown(&fm, FEISHU_KEYS, "notify.feishu");
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
        self.warn_unknown(&mm, MATRIX_KEYS, "notify.matrix");
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
}
