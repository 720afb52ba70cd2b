//! Alerts (see the operations guide, "Alerts"): the `NotifierActor` posts to Feishu and/or
//! Matrix, off the request path.
//!
//! Requests and the registry `do_send` events here and move on. Same-kind alerts inside
//! `notify.min_interval` are held and sent as one "and N more" message when the interval ends.
//! Each delivery has a 5 s deadline and is counted; a failed delivery is logged and dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;

use crate::config::{FeishuConfig, MatrixConfig, NotifyConfig};
use crate::escape::untrusted;
use crate::metrics::Metrics;
use crate::registry::HealthEvent;
use crate::time::rfc3339;

/// Deadline of one delivery.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// A request that failed on every candidate.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct RequestFailed {
    /// When.
    pub at: SystemTime,
    /// Client address.
    pub ip: String,
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Model, if any.
    pub model: Option<String>,
    /// Final status sent to the client.
    pub status: u16,
    /// `name: reason` per attempt.
    pub attempts: Vec<String>,
}

/// Replaces the channels after a config reload.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reconfigure(pub NotifyConfig);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AlertKind {
    AllFailed,
    Cooldown,
    Recovered,
}

#[derive(Default)]
struct KindState {
    last_sent: Option<Instant>,
    held: u32,
    latest: Option<String>,
    flush_scheduled: bool,
}

/// The actor; start it on the system arbiter (it owns a `!Send` awc client).
pub struct NotifierActor {
    config: NotifyConfig,
    metrics: Metrics,
    tls: Arc<rustls::ClientConfig>,
    client: Option<awc::Client>,
    kinds: HashMap<AlertKind, KindState>,
}

static TXN: AtomicU64 = AtomicU64::new(0);

impl NotifierActor {
    /// A notifier over the configured channels.
    pub fn new(config: NotifyConfig, metrics: Metrics, tls: Arc<rustls::ClientConfig>) -> Self {
        NotifierActor {
            config,
            metrics,
            tls,
            client: None,
            kinds: HashMap::new(),
        }
    }

    /// Whether any channel is configured.
    pub fn enabled(config: &NotifyConfig) -> bool {
        config.feishu.is_some() || config.matrix.is_some()
    }

    fn alert(&mut self, kind: AlertKind, text: String, ctx: &mut Context<Self>) {
        let interval = self.config.min_interval;
        let st = self.kinds.entry(kind).or_default();
        let now = Instant::now();
        match st.last_sent {
            Some(t) if now.duration_since(t) < interval => {
                st.held += 1;
                st.latest = Some(text);
                if !st.flush_scheduled {
                    st.flush_scheduled = true;
                    let wait = interval - now.duration_since(t);
                    ctx.run_later(wait, move |act, ctx| act.flush_held(kind, ctx));
                }
            }
            _ => {
                st.last_sent = Some(now);
                self.deliver(text);
            }
        }
    }

    fn flush_held(&mut self, kind: AlertKind, _ctx: &mut Context<Self>) {
        let Some(st) = self.kinds.get_mut(&kind) else {
            return;
        };
        st.flush_scheduled = false;
        if st.held == 0 {
            return;
        }
        let n = st.held;
        let latest = st.latest.take().unwrap_or_default();
        st.held = 0;
        st.last_sent = Some(Instant::now());
        let text = if n == 1 {
            latest
        } else {
            format!(
                "{latest}\n(and {} more like this in the last {}s)",
                n - 1,
                self.config.min_interval.as_secs()
            )
        };
        self.deliver(text);
    }

    fn deliver(&mut self, text: String) {
        let tls = self.tls.clone();
        let client = self
            .client
            .get_or_insert_with(|| {
                awc::Client::builder()
                    .connector(awc::Connector::new().rustls_0_23(tls).timeout(SEND_TIMEOUT))
                    .timeout(SEND_TIMEOUT)
                    .disable_redirects()
                    .finish()
            })
            .clone();
        if let Some(f) = self.config.feishu.clone() {
            let (client, metrics, text) = (client.clone(), self.metrics.clone(), text.clone());
            actix_rt::spawn(async move {
                let result = send_feishu(&client, &f, &text).await;
                report(&metrics, "feishu", result);
            });
        }
        if let Some(m) = self.config.matrix.clone() {
            let metrics = self.metrics.clone();
            actix_rt::spawn(async move {
                let result = send_matrix(&client, &m, &text).await;
                report(&metrics, "matrix", result);
            });
        }
    }
}

fn report(metrics: &Metrics, channel: &str, result: Result<(), String>) {
    match result {
        Ok(()) => metrics.notification(channel, "ok"),
        Err(e) => {
            // The error text never holds the webhook URL or token: see send_*.
            log::warn!("{channel} alert not delivered: {e}");
            metrics.notification(channel, "error");
        }
    }
}

async fn send_json(req: awc::ClientRequest, body: serde_json::Value) -> Result<(), String> {
    let fut = req.send_json(&body);
    let mut resp = match actix_rt::time::timeout(SEND_TIMEOUT, fut).await {
        Err(_) => return Err("timed out".into()),
        Ok(Err(e)) => {
            return Err(match e {
                awc::error::SendRequestError::Connect(_) => "connection failed".to_string(),
                awc::error::SendRequestError::Timeout => "timed out".to_string(),
                _ => "request failed".to_string(),
            })
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    let body = actix_rt::time::timeout(SEND_TIMEOUT, resp.body().limit(64 * 1024))
        .await
        .ok()
        .and_then(|b| b.ok())
        .unwrap_or_default();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    // Feishu answers 200 with a non-zero code on a bad signature or payload.
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
        if let Some(code) = v.get("code").and_then(|c| c.as_i64()).filter(|c| *c != 0) {
            let msg = v.get("msg").and_then(|m| m.as_str()).unwrap_or("");
            // The sink's own words: escaped before they reach a log line (see the security guide).
            return Err(format!("rejected: code {code} {}", untrusted(msg)));
        }
    }
    Ok(())
}

/// `base64(HMAC-SHA256(key = "{timestamp}\n{secret}", message = ""))`, Feishu's bot signature.
pub fn feishu_sign(timestamp: u64, secret: &str) -> String {
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        format!("{timestamp}\n{secret}").as_bytes(),
    );
    let tag = ring::hmac::sign(&key, b"");
    base64(tag.as_ref())
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

async fn send_feishu(client: &awc::Client, f: &FeishuConfig, text: &str) -> Result<(), String> {
    let mut body = serde_json::json!({"msg_type": "text", "content": {"text": text}});
    if let Some(secret) = &f.secret {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        body["timestamp"] = serde_json::Value::String(ts.to_string());
        body["sign"] = serde_json::Value::String(feishu_sign(ts, secret));
    }
    send_json(client.post(f.webhook.as_str()), body).await
}

async fn send_matrix(client: &awc::Client, m: &MatrixConfig, text: &str) -> Result<(), String> {
    let txn = format!(
        "oar-{}-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
        TXN.fetch_add(1, Ordering::Relaxed)
    );
    let url = format!(
        "{}/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
        m.homeserver.trim_end_matches('/'),
        percent_encode(&m.room_id),
        txn
    );
    let req = client
        .put(url.as_str())
        .insert_header(("Authorization", format!("Bearer {}", m.access_token)));
    send_json(req, serde_json::json!({"msgtype": "m.text", "body": text})).await
}

/// Room ids (`!abc:server`) must be escaped as a path segment.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The alert text of a request that failed everywhere.
pub fn request_failed_text(r: &RequestFailed) -> String {
    // Everything but the time and status came from a client or an upstream: one line each.
    let mut s = format!(
        "[openai-api-route] request failed on every upstream\ntime: {}\nclient: {}\nrequest: {} {}\nmodel: {}\nstatus: {}\nattempts:",
        rfc3339(r.at),
        untrusted(&r.ip),
        untrusted(&r.method),
        untrusted(&r.path),
        untrusted(r.model.as_deref().unwrap_or("-")),
        r.status
    );
    for a in &r.attempts {
        s.push_str("\n- ");
        s.push_str(&untrusted(a));
    }
    s
}

impl Actor for NotifierActor {
    type Context = Context<Self>;
}

impl Handler<RequestFailed> for NotifierActor {
    type Result = ();

    fn handle(&mut self, msg: RequestFailed, ctx: &mut Context<Self>) {
        let text = request_failed_text(&msg);
        self.alert(AlertKind::AllFailed, text, ctx);
    }
}

impl Handler<HealthEvent> for NotifierActor {
    type Result = ();

    fn handle(&mut self, msg: HealthEvent, ctx: &mut Context<Self>) {
        let now = rfc3339(SystemTime::now());
        match msg {
            HealthEvent::CooldownStarted {
                upstream,
                failures,
                last_error,
                cooldown,
            } => self.alert(
                AlertKind::Cooldown,
                format!(
                    "[openai-api-route] upstream {upstream} is cooling down\ntime: {now}\nfailures in a row: {failures}\nlast error: {}\nmoved to the back for {}s",
                    untrusted(&last_error),
                    cooldown.as_secs()
                ),
                ctx,
            ),
            HealthEvent::Recovered { upstream } => self.alert(
                AlertKind::Recovered,
                format!("[openai-api-route] upstream {upstream} recovered\ntime: {now}"),
                ctx,
            ),
        }
    }
}

impl Handler<Reconfigure> for NotifierActor {
    type Result = ();

    fn handle(&mut self, msg: Reconfigure, _: &mut Context<Self>) {
        self.config = msg.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn room_ids_are_escaped() {
        assert_eq!(percent_encode("!abc:example.org"), "%21abc%3Aexample.org");
    }
}
