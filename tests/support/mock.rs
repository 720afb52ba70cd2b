//! Scriptable mock upstreams: raw HTTP/1.1 on 127.0.0.1:0, replies scripted per request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves every connection to a fresh 127.0.0.1 port with `handler`, on a thread and runtime of
/// its own (so a mock never competes with the test's own runtime); returns the address.
pub fn spawn_server<F, Fut>(handler: F) -> std::net::SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(handler(sock));
            }
        });
    });
    rx.recv().unwrap()
}

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
    /// Send nothing more for this long, then the proper terminator: an upstream whose body
    /// ends a while after its last event (a client may leave in between).
    FinishAfter(Duration),
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
        Reply::sse_chunks(chunks)
    }

    /// A 200 `text/event-stream` answer of `chunks` (each after its delay) that ends cleanly.
    pub fn sse_chunks(chunks: Vec<(Duration, Vec<u8>)>) -> Reply {
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
    /// The gateway's background `GET …/models` fetches (see the observability guide, "Models and
    /// token usage (0.2)"): answered with `models_reply`, kept out of `seen`/`hits` and of the
    /// script's request count.
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
        let (seen2, gone2, models2) = (seen.clone(), peer_gone.clone(), models.clone());
        let counter = Arc::new(Mutex::new(0usize));
        let addr = spawn_server(move |sock| {
            let _ = sock.set_nodelay(true);
            serve_conn(
                sock,
                script.clone(),
                seen2.clone(),
                counter.clone(),
                gone2.clone(),
                models2.clone(),
            )
        });
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
                    Ending::FinishAfter(d) => {
                        tokio::select! {
                            _ = tokio::time::sleep(d) => {}
                            _ = wait_closed(&mut sock) => { *gone.lock().unwrap() += 1; return; }
                        }
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
                if !write_x_chunks(&mut sock, total, chunk).await {
                    *gone.lock().unwrap() += 1;
                    return;
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
                if !write_x_chunks(&mut sock, total, chunk).await {
                    *gone.lock().unwrap() += 1;
                    return;
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
/// Writes `total / chunk` chunked frames of `chunk` bytes of `x`; false when the peer left.
async fn write_x_chunks(sock: &mut TcpStream, total: usize, chunk: usize) -> bool {
    let mut frame = format!("{chunk:x}\r\n").into_bytes();
    frame.extend(std::iter::repeat_n(b'x', chunk));
    frame.extend_from_slice(b"\r\n");
    let mut sent = 0;
    while sent + chunk <= total {
        if sock.write_all(&frame).await.is_err() {
            return false;
        }
        sent += chunk;
    }
    true
}

async fn wait_closed(sock: &mut TcpStream) {
    let mut tmp = [0u8; 1024];
    loop {
        match sock.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
