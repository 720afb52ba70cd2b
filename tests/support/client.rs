//! The test client: requests to the gateway as an SDK or a raw socket sends them.

use std::time::{Duration, Instant};

use super::gateway::{Gateway, TOKEN};

/// A response as the test client got it.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Arrival time of each body chunk, from the request start.
    pub chunk_times: Vec<(Duration, Vec<u8>)>,
    pub error: Option<String>,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Sends a request through a fresh awc client and reads the body chunk by chunk.
pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Got {
    use futures_util::StreamExt;
    let client = awc::Client::builder()
        .disable_timeout()
        .disable_redirects()
        .finish();
    let mut req = client.request(
        awc::http::Method::from_bytes(method.as_bytes()).unwrap(),
        url,
    );
    for (k, v) in headers {
        req = req.insert_header((*k, *v));
    }
    let start = Instant::now();
    let mut resp = req
        .send_body(body.to_vec())
        .await
        .expect("request to the gateway failed");
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let mut body = Vec::new();
    let mut chunk_times = Vec::new();
    let mut error = None;
    while let Some(chunk) = resp.next().await {
        match chunk {
            Ok(b) => {
                chunk_times.push((start.elapsed(), b.to_vec()));
                body.extend_from_slice(&b);
            }
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    Got {
        status,
        headers,
        body,
        chunk_times,
        error,
    }
}

/// GET with the client token.
pub async fn get(gw: &Gateway, path: &str) -> Got {
    let auth = format!("Bearer {TOKEN}");
    send("GET", &gw.url(path), &[("authorization", &auth)], b"").await
}

/// A browser's CORS preflight for `POST /v1/chat/completions` (no token: it carries none).
pub async fn preflight(gw: &Gateway) -> Got {
    send(
        "OPTIONS",
        &gw.url("/v1/chat/completions"),
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
        ],
        b"",
    )
    .await
}

/// POST JSON with the client token.
pub async fn post(gw: &Gateway, path: &str, body: serde_json::Value) -> Got {
    let auth = format!("Bearer {TOKEN}");
    send(
        "POST",
        &gw.url(path),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .await
}

pub fn chat_body(stream: bool) -> serde_json::Value {
    serde_json::json!({"model": "gpt-test", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

/// Polls `f` until it returns true or `within` passes.
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Sends raw bytes and returns everything the gateway sends back until it closes (or `within`).
pub fn raw_exchange(addr: &str, request: &[u8], within: Duration) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// POSTs a chat request and asserts a 200 within `within`: the gateway is not slowed by a fault.
pub async fn assert_served(gw: &Gateway, within: Duration) {
    let t = Instant::now();
    let got = post(gw, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(t.elapsed() < within, "request took {:?}", t.elapsed());
}
