//! Headless Chromium driven over the DevTools protocol, for the tests of the pages a person
//! reads (the status page, the usage page): Debian's `chromium`, named by
//! `OPENAI_API_ROUTE_TEST_CHROMIUM` (a test that uses it carries
//! `#[cfg_attr(not(test_chromium), ignore = …)]`, see [`super::service`]).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Headless Chromium with its DevTools socket; killed (by its own handle) on drop.
/// The layouts every page is checked (and shot) in: label, width, height, mobile, dark scheme.
pub const LAYOUTS: [(&str, u32, u32, bool, bool); 3] = [
    ("desktop", 1280, 900, false, false),
    ("phone", 390, 844, true, false),
    ("dark", 1280, 900, false, true),
];

pub struct Browser {
    child: Child,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
    /// Every DevTools event seen so far (e.g. `Network.requestWillBeSent` once `Network.enable`d).
    pub events: Vec<Value>,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    pub async fn launch(chromium: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                &format!("--user-data-dir={}", profile.path().display()),
                "about:blank",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{chromium} did not start: {e}"));
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut seen = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    if let Some(t) = tx.take() {
                        let _ = t.send(Ok(url.trim().to_string()));
                    }
                } else if tx.is_some() {
                    seen.push(line);
                }
            }
            if let Some(t) = tx.take() {
                let _ = t.send(Err(seen.join("\n")));
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(url)) => url,
            Ok(Err(log)) => panic!("chromium exited before its DevTools socket: {log}"),
            Err(_) => panic!("chromium printed no DevTools socket within 60 s"),
        };
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap_or_else(|e| panic!("DevTools socket {url}: {e}"));
        Browser {
            child,
            ws,
            next_id: 0,
            events: Vec::new(),
            _profile: profile,
        }
    }

    /// One DevTools command; events that arrive meanwhile are kept in [`Browser::events`].
    pub async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{method}: no answer within 60 s"));
            let Some(Ok(Message::Text(text))) = frame else {
                match frame {
                    Some(Ok(_)) => continue,
                    other => panic!("{method}: DevTools socket ended: {other:?}"),
                }
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Opens `url` in a new tab of `width`×`height` CSS px (a touch phone when `mobile`), in the
    /// dark colour scheme when `dark`, and waits until the page is loaded and the expression
    /// `ready` is true; returns the tab's session.
    pub async fn open(
        &mut self,
        url: &str,
        (width, height): (u32, u32),
        mobile: bool,
        dark: bool,
        ready: &str,
    ) -> String {
        let target = self
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        let session = attached["sessionId"].as_str().unwrap().to_string();
        let s = Some(session.as_str());
        self.call(
            s,
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
        if mobile {
            self.call(
                s,
                "Emulation.setTouchEmulationEnabled",
                json!({"enabled": true}),
            )
            .await;
        }
        let scheme = if dark { "dark" } else { "light" };
        self.call(
            s,
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-color-scheme", "value": scheme}]}),
        )
        .await;
        self.call(s, "Page.navigate", json!({"url": url})).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let state = self.eval(&session, "document.readyState").await;
            let is_ready = self.eval(&session, ready).await;
            if state == json!("complete") && is_ready == json!(true) {
                break;
            }
            assert!(Instant::now() < deadline, "{url} did not load: {state}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        session
    }

    pub async fn eval(&mut self, session: &str, expression: &str) -> Value {
        let got = self
            .call(
                Some(session),
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(got.get("exceptionDetails").is_none(), "{got}");
        got["result"]["value"].clone()
    }

    /// The whole page (not only the first screen) as PNG bytes.
    /// With `OPENAI_API_ROUTE_SCREENSHOTS=<dir>` (`.ci/screenshots.sh`), writes the page's
    /// full-height screenshot as `<dir>/<name>.png`; otherwise nothing.
    pub async fn keep_screenshot(&mut self, session: &str, width: u32, name: &str) {
        let Ok(dir) = std::env::var("OPENAI_API_ROUTE_SCREENSHOTS") else {
            return;
        };
        let png = self.screenshot(session, width).await;
        let path = std::path::Path::new(&dir).join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("wrote {}", path.display());
    }

    pub async fn screenshot(&mut self, session: &str, width: u32) -> Vec<u8> {
        let height = self
            .eval(session, "document.documentElement.scrollHeight")
            .await
            .as_f64()
            .unwrap();
        let shot = self
            .call(
                Some(session),
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true,
                       "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}}),
            )
            .await;
        base64_decode(shot["data"].as_str().unwrap())
    }
}

pub fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let clean: Vec<u8> = s.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= u32::from(val(*c)) << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}
