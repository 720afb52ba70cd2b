//! Test support: the real gateway binary as a child process, and scriptable mock upstreams.
//!
//! Mocks speak raw HTTP/1.1 over tokio sockets on 127.0.0.1:0 so that tests can script what real
//! upstreams do wrong: reset before headers, stall after headers, cut a stream, never answer.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request as the mock upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query as sent.
    pub target: String,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// How a stream ends.
#[derive(Debug, Clone)]
pub enum Ending {
    /// Proper chunked terminator.
    Finish,
    /// Close the socket mid-stream (no terminator).
    Drop,
    /// Keep the connection open and send nothing more.
    Stall,
}

/// What the mock does with a request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A complete response with Content-Length.
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// A chunked response: each chunk after its delay.
    Chunks {
        status: u16,
        headers: Vec<(String, String)>,
        chunks: Vec<(Duration, Vec<u8>)>,
        ending: Ending,
    },
    /// Wait, then answer.
    Delay(Duration, Box<Reply>),
    /// `total` bytes of `x` as a chunked `text/plain` body, generated on the fly.
    Bulk { total: usize, chunk: usize },
    /// One endless SSE `data:` line: `total` bytes of `x` in `chunk`-sized chunks, never a newline
    /// until the end.
    SseLine { total: usize, chunk: usize },
    /// These exact bytes as the response (head and body), then the connection stays usable.
    Raw(Vec<u8>),
    /// Close with RST before any response byte.
    Reset,
    /// Close cleanly before any response byte.
    Close,
    /// Never answer; keep the socket open.
    Hang,
}

impl Reply {
    pub fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply::Full {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }

    pub fn chat(text: &str) -> Reply {
        Reply::json(
            200,
            serde_json::json!({
                "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-test",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
            }),
        )
    }

    /// An OpenAI-style SSE chat stream of `words`, `gap` apart, with usage and `[DONE]`.
    pub fn sse_chat(words: &[&str], gap: Duration) -> Reply {
        let mut chunks = Vec::new();
        for (i, w) in words.iter().enumerate() {
            let ev = serde_json::json!({
                "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-test",
                "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": null}]
            });
            chunks.push((
                if i == 0 { Duration::ZERO } else { gap },
                format!("data: {ev}\n\n").into_bytes(),
            ));
        }
        let usage = serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-test",
            "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": words.len(), "total_tokens": 3 + words.len()}
        });
        chunks.push((gap, format!("data: {usage}\n\n").into_bytes()));
        chunks.push((Duration::ZERO, b"data: [DONE]\n\n".to_vec()));
        Reply::Chunks {
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            chunks,
            ending: Ending::Finish,
        }
    }

    /// An OpenAI-style model list of `ids` (`owned_by` "mock-org").
    pub fn models(ids: &[&str]) -> Reply {
        let data: Vec<serde_json::Value> = ids
            .iter()
            .map(|id| serde_json::json!({"id": id, "object": "model", "created": 1700000000, "owned_by": "mock-org"}))
            .collect();
        Reply::json(200, serde_json::json!({"object": "list", "data": data}))
    }

    pub fn status(status: u16) -> Reply {
        Reply::json(
            status,
            serde_json::json!({"error": {"message": format!("mock says {status}"), "type": "mock"}}),
        )
    }
}

type Script = Arc<dyn Fn(&Seen, usize) -> Reply + Send + Sync>;

/// A mock upstream on 127.0.0.1:0, served by its own thread and runtime.
pub struct Mock {
    pub addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections whose request was abandoned by the peer (EOF/RST while we were sending).
    pub peer_gone: Arc<Mutex<u32>>,
    /// The gateway's background `GET …/models` fetches (SPEC 4b): answered with `models_reply`,
    /// kept out of `seen`/`hits` and of the script's request count.
    models: ModelsSide,
}

/// How a mock answers the gateway's model-list fetches, and what it saw of them.
#[derive(Clone)]
pub struct ModelsSide {
    reply: Arc<Mutex<Reply>>,
    fetches: Arc<Mutex<Vec<Seen>>>,
}

impl Mock {
    /// A mock whose every request gets `reply`.
    pub fn always(reply: Reply) -> Mock {
        Mock::script(move |_, _| reply.clone())
    }

    /// A mock scripted per request (`n` counts requests from 0).
    pub fn script(f: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> Mock {
        let script: Script = Arc::new(f);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let peer_gone = Arc::new(Mutex::new(0));
        let models = ModelsSide {
            reply: Arc::new(Mutex::new(Reply::status(404))),
            fetches: Arc::new(Mutex::new(Vec::new())),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let (seen2, gone2, models2) = (seen.clone(), peer_gone.clone(), models.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let counter = Arc::new(Mutex::new(0usize));
                loop {
                    let Ok((sock, _)) = listener.accept().await else {
                        return;
                    };
                    let _ = sock.set_nodelay(true);
                    let (script, seen, counter, gone, models) = (
                        script.clone(),
                        seen2.clone(),
                        counter.clone(),
                        gone2.clone(),
                        models2.clone(),
                    );
                    tokio::spawn(async move {
                        serve_conn(sock, script, seen, counter, gone, models).await;
                    });
                }
            });
        });
        let addr = rx.recv().unwrap();
        Mock {
            addr,
            seen,
            peer_gone,
            models,
        }
    }

    /// What the gateway's `GET …/models` fetches get from now on (default: 404).
    pub fn set_models(&self, reply: Reply) {
        *self.models.reply.lock().unwrap() = reply;
    }

    /// The model-list fetches seen so far.
    pub fn model_fetches(&self) -> Vec<Seen> {
        self.models.fetches.lock().unwrap().clone()
    }

    /// A port where nothing listens (connection refused).
    pub fn refused_endpoint() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        format!("http://127.0.0.1:{port}/v1")
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Seen> {
    let head_end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            break p;
        }
        let mut tmp = [0u8; 8192];
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    buf.drain(..head_end + 4);
    while buf.len() < len {
        let mut tmp = [0u8; 65536];
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body: Vec<u8> = buf.drain(..len).collect();
    Some(Seen {
        method,
        target,
        headers,
        body,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

async fn serve_conn(
    mut sock: TcpStream,
    script: Script,
    seen: Arc<Mutex<Vec<Seen>>>,
    counter: Arc<Mutex<usize>>,
    gone: Arc<Mutex<u32>>,
    models: ModelsSide,
) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut sock, &mut buf).await {
        let path = req.target.split('?').next().unwrap_or("");
        let mut reply = if req.method == "GET" && path.ends_with("/models") {
            models.fetches.lock().unwrap().push(req.clone());
            models.reply.lock().unwrap().clone()
        } else {
            let n = {
                let mut c = counter.lock().unwrap();
                *c += 1;
                *c - 1
            };
            seen.lock().unwrap().push(req.clone());
            script(&req, n)
        };
        while let Reply::Delay(d, inner) = reply {
            // Notice a peer that gives up while we wait.
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = wait_closed(&mut sock) => { *gone.lock().unwrap() += 1; return; }
            }
            reply = *inner;
        }
        match reply {
            Reply::Full {
                status,
                headers,
                body,
            } => {
                let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
                for (k, v) in &headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
                let mut bytes = out.into_bytes();
                bytes.extend_from_slice(&body);
                if sock.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Reply::Chunks {
                status,
                headers,
                chunks,
                ending,
            } => {
                let mut out = format!(
                    "HTTP/1.1 {status} {}\r\ntransfer-encoding: chunked\r\n",
                    reason(status)
                );
                for (k, v) in &headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n");
                if sock.write_all(out.as_bytes()).await.is_err() {
                    return;
                }
                for (delay, data) in chunks {
                    if !delay.is_zero() {
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = wait_closed(&mut sock) => { *gone.lock().unwrap() += 1; return; }
                        }
                    }
                    let mut frame = format!("{:x}\r\n", data.len()).into_bytes();
                    frame.extend_from_slice(&data);
                    frame.extend_from_slice(b"\r\n");
                    if sock.write_all(&frame).await.is_err() {
                        *gone.lock().unwrap() += 1;
                        return;
                    }
                }
                match ending {
                    Ending::Finish => {
                        if sock.write_all(b"0\r\n\r\n").await.is_err() {
                            return;
                        }
                    }
                    Ending::Drop => return,
                    Ending::Stall => {
                        wait_closed(&mut sock).await;
                        *gone.lock().unwrap() += 1;
                        return;
                    }
                }
            }
            Reply::Bulk { total, chunk } => {
                let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/plain\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let mut frame = format!("{chunk:x}\r\n").into_bytes();
                frame.extend(std::iter::repeat_n(b'x', chunk));
                frame.extend_from_slice(b"\r\n");
                let mut sent = 0;
                while sent + chunk <= total {
                    if sock.write_all(&frame).await.is_err() {
                        *gone.lock().unwrap() += 1;
                        return;
                    }
                    sent += chunk;
                }
                if sock.write_all(b"0\r\n\r\n").await.is_err() {
                    return;
                }
            }
            Reply::SseLine { total, chunk } => {
                let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n6\r\ndata: \r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let mut frame = format!("{chunk:x}\r\n").into_bytes();
                frame.extend(std::iter::repeat_n(b'x', chunk));
                frame.extend_from_slice(b"\r\n");
                let mut sent = 0;
                while sent + chunk <= total {
                    if sock.write_all(&frame).await.is_err() {
                        *gone.lock().unwrap() += 1;
                        return;
                    }
                    sent += chunk;
                }
                if sock.write_all(b"2\r\n\n\n\r\n0\r\n\r\n").await.is_err() {
                    return;
                }
            }
            Reply::Raw(bytes) => {
                if sock.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Reply::Reset => {
                let _ = sock.set_zero_linger();
                return;
            }
            Reply::Close => return,
            Reply::Hang => {
                wait_closed(&mut sock).await;
                *gone.lock().unwrap() += 1;
                return;
            }
            Reply::Delay(..) => unreachable!(),
        }
    }
}

/// Resolves when the peer closes the connection.
async fn wait_closed(sock: &mut TcpStream) {
    let mut tmp = [0u8; 1024];
    loop {
        match sock.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// The gateway binary running as a child process.
pub struct Gateway {
    child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub db_path: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

pub const TOKEN: &str = "sk-client-token-0123456789abcdef";

impl Gateway {
    /// Starts with `config` (YAML) and the default SQLite database in a temp dir.
    pub fn start(config: &str) -> Gateway {
        Gateway::start_with(config, &[])
    }

    /// Starts with extra flags (a `-database` in `extra` replaces the default one).
    pub fn start_with(config: &str, extra: &[&str]) -> Gateway {
        Gateway::try_start(config, extra).unwrap_or_else(|e| panic!("gateway did not start: {e}"))
    }

    /// Starts, or returns what it printed if it exited first.
    pub fn try_start(config: &str, extra: &[&str]) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("upstreams.yaml");
        std::fs::write(&config_path, config).unwrap();
        let db_path = dir.path().join("db.sqlite");
        let mut args: Vec<String> = vec!["-config".into(), config_path.display().to_string()];
        if !extra
            .iter()
            .any(|a| a.trim_start_matches('-').starts_with("addr"))
        {
            args.push("-addr".into());
            args.push("127.0.0.1:0".into());
        }
        if !extra
            .iter()
            .any(|a| a.trim_start_matches('-').starts_with("database"))
        {
            args.push("-database".into());
            args.push(db_path.display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_openai-api-route"))
            .args(&args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    if let Some(t) = tx.take() {
                        let _ = t.send(rest.split(' ').next().unwrap_or("").to_string());
                    }
                }
                log2.lock().unwrap().push(line);
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => Ok(Gateway {
                child,
                addr,
                dir,
                config_path,
                db_path,
                log,
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                Err(log.lock().unwrap().join("\n"))
            }
        }
    }

    /// A field of /proc/PID/status in kB (VmRSS, VmHWM).
    pub fn mem_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Opens the records database read-only.
    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(&self.db_path).unwrap()
    }

    /// Waits until the table has at least `n` rows, then returns all rows as JSON objects.
    pub fn records(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let rows = read_rows(&self.db_path);
            if rows.len() >= n || Instant::now() > deadline {
                assert!(
                    rows.len() >= n,
                    "expected {n} records, found {}: {rows:#?}",
                    rows.len()
                );
                return rows;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// Every row of `records`, column name → value.
pub fn read_rows(db: &Path) -> Vec<serde_json::Value> {
    let Ok(conn) = rusqlite::Connection::open(db) else {
        return vec![];
    };
    let Ok(mut stmt) = conn.prepare("SELECT * FROM records ORDER BY id") else {
        return vec![];
    };
    let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
    let rows = stmt.query_map([], |row| {
        let mut obj = serde_json::Map::new();
        for (i, name) in names.iter().enumerate() {
            let v = match row.get_ref(i)? {
                rusqlite::types::ValueRef::Null => serde_json::Value::Null,
                rusqlite::types::ValueRef::Integer(n) => n.into(),
                rusqlite::types::ValueRef::Real(f) => f.into(),
                rusqlite::types::ValueRef::Text(t) => {
                    String::from_utf8_lossy(t).into_owned().into()
                }
                rusqlite::types::ValueRef::Blob(b) => format!("<blob {}>", b.len()).into(),
            };
            obj.insert(name.clone(), v);
        }
        Ok(serde_json::Value::Object(obj))
    });
    match rows {
        Ok(r) => r.filter_map(Result::ok).collect(),
        Err(_) => vec![],
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config with `authorization: TOKEN` and these upstream entries (YAML list items).
pub fn config(extra_global: &str, upstreams: &[String]) -> String {
    let mut s = format!("authorization: {TOKEN}\n{extra_global}\nupstreams:\n");
    for u in upstreams {
        s.push_str(u);
        if !u.ends_with('\n') {
            s.push('\n');
        }
    }
    s
}

/// One upstream list item.
pub fn upstream(name: &str, endpoint: &str, extra: &str) -> String {
    let mut s =
        format!("  - name: {name}\n    endpoint: {endpoint}\n    sk: sk-upstream-{name}-secret\n");
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        s.push_str("    ");
        s.push_str(line.trim_start());
        s.push('\n');
    }
    s
}

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
