//! A fast mock OpenAI upstream for the benchmark harness (`bench/run.sh`).
//!
//! Raw HTTP/1.1 over tokio, keep-alive, `TCP_NODELAY`, no allocation-heavy parsing:
//! - `POST /v1/chat/completions` without `"stream": true` → a fixed chat completion
//!   (`Content-Length`);
//! - with `"stream": true` → an SSE stream (chunked) of N `chat.completion.chunk` events spaced
//!   M ms apart on an absolute schedule (event k leaves at start + k·M, so the mock's own
//!   scheduling never accumulates lateness), the last one carrying `usage`, then `data: [DONE]`;
//! - anything else → a small JSON body.
//!
//! N and M default to 20 and 50; set them with `--chunks N --gap-ms M`, the env variables
//! `BENCH_SSE_CHUNKS` / `BENCH_SSE_GAP_MS`, or per request with the query string
//! `?chunks=N&gap_ms=M`.
//!
//! ```text
//! cargo run --release --example bench_mock -- [ADDR] [--chunks N] [--gap-ms M] [--threads T]
//! ```
//! ADDR defaults to `127.0.0.1:0`; the mock prints `port NNNNN` on stdout once it listens.
//! `--threads T` (default 1) runs T single-threaded runtimes accepting on the same socket.

use std::io::Write;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const CHAT_JSON: &str = r#"{"id":"chatcmpl-bench0000000000000000000001","object":"chat.completion","created":1735689600,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! The capital of France is Paris. It is known for the Eiffel Tower, the Louvre and its cafes.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":24,"completion_tokens":25,"total_tokens":49},"system_fingerprint":"fp_bench"}"#;

const OTHER_JSON: &str =
    r#"{"object":"list","data":[{"id":"gpt-4o-mini","object":"model","owned_by":"bench"}]}"#;

const WORDS: &[&str] = &[
    "Hello", "!", " The", " capital", " of", " France", " is", " Paris", ".", " It", " is",
    " known", " for", " the", " Eiffel", " Tower", ",", " the", " Louvre", " and",
];

#[derive(Clone, Copy)]
struct Pacing {
    chunks: usize,
    gap: Duration,
}

fn main() {
    let mut addr = "127.0.0.1:0".to_string();
    let mut pacing = Pacing {
        chunks: env_num("BENCH_SSE_CHUNKS").unwrap_or(20),
        gap: Duration::from_millis(env_num("BENCH_SSE_GAP_MS").unwrap_or(50) as u64),
    };
    let mut threads = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| die(&format!("{name} needs a number")))
        };
        match a.trim_start_matches('-') {
            "chunks" => pacing.chunks = val("--chunks").max(1),
            "gap-ms" | "gap_ms" => pacing.gap = Duration::from_millis(val("--gap-ms") as u64),
            "threads" => threads = val("--threads").max(1),
            "h" | "help" => {
                println!("bench_mock [ADDR] [--chunks N] [--gap-ms M] [--threads T]");
                return;
            }
            _ if !a.starts_with('-') => addr = a,
            _ => die(&format!("unknown argument {a}")),
        }
    }
    // tokio's TcpSocket gives a deep accept backlog (std's is 128: thousands of streams opened
    // at once would overflow it and stall on SYN retransmits) and SO_REUSEPORT, so that each
    // thread has its own listening socket on the same port.
    let bind_addr: std::net::SocketAddr = addr
        .parse()
        .unwrap_or_else(|e| die(&format!("bad address {addr}: {e}")));
    let socket = |at: std::net::SocketAddr| -> tokio::net::TcpSocket {
        let s = if at.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .unwrap_or_else(|e| die(&format!("socket: {e}")));
        let _ = s.set_reuseaddr(true);
        let _ = s.set_reuseport(true);
        s.bind(at)
            .unwrap_or_else(|e| die(&format!("cannot listen on {at}: {e}")));
        s
    };
    let first = socket(bind_addr);
    let local = first.local_addr().unwrap();
    let mut sockets = vec![first];
    for _ in 1..threads {
        sockets.push(socket(local));
    }
    let mut handles = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    for s in sockets {
        let ready = ready_tx.clone();
        handles.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = s
                    .listen(8192)
                    .unwrap_or_else(|e| die(&format!("listen: {e}")));
                let _ = ready.send(());
                loop {
                    match listener.accept().await {
                        Ok((sock, _)) => {
                            let _ = sock.set_nodelay(true);
                            tokio::spawn(serve(sock, pacing));
                        }
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            eprintln!("bench_mock: accept: {e}");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            });
        }));
    }
    // Every socket listens: announce the port.
    for _ in 0..threads {
        let _ = ready_rx.recv();
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "port {}", local.port());
        let _ = out.flush();
    }
    eprintln!(
        "bench_mock listening on {local} (sse: {} chunks, {} ms apart; {threads} thread(s))",
        pacing.chunks,
        pacing.gap.as_millis()
    );
    for h in handles {
        let _ = h.join();
    }
}

fn env_num(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn die(msg: &str) -> ! {
    eprintln!("bench_mock: {msg}");
    std::process::exit(2)
}

struct Request {
    /// Path and query.
    target: String,
    stream: bool,
    close: bool,
}

/// Serves one keep-alive connection.
async fn serve(mut sock: TcpStream, pacing: Pacing) {
    let mut buf: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    loop {
        let req = match read_request(&mut sock, &mut buf).await {
            Some(r) => r,
            None => return,
        };
        let path = req.target.split('?').next().unwrap_or("");
        if path.ends_with("/chat/completions") && req.stream {
            let p = query_pacing(&req.target, pacing);
            if stream_sse(&mut sock, p).await.is_err() || req.close {
                return;
            }
            continue;
        }
        let body = if path.ends_with("/chat/completions") {
            CHAT_JSON
        } else {
            OTHER_JSON
        };
        out.clear();
        out.extend_from_slice(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ",
        );
        out.extend_from_slice(body.len().to_string().as_bytes());
        if req.close {
            out.extend_from_slice(b"\r\nconnection: close");
        }
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body.as_bytes());
        if sock.write_all(&out).await.is_err() || req.close {
            return;
        }
    }
}

fn query_pacing(target: &str, mut p: Pacing) -> Pacing {
    if let Some((_, q)) = target.split_once('?') {
        for kv in q.split('&') {
            match kv.split_once('=') {
                Some(("chunks", v)) => {
                    if let Ok(n) = v.parse::<usize>() {
                        p.chunks = n.max(1);
                    }
                }
                Some(("gap_ms", v)) => {
                    if let Ok(n) = v.parse::<u64>() {
                        p.gap = Duration::from_millis(n);
                    }
                }
                _ => {}
            }
        }
    }
    p
}

fn sse_event(i: usize, last: bool) -> Vec<u8> {
    let word = WORDS[i % WORDS.len()];
    let ev = if last {
        format!(
            r#"data: {{"id":"chatcmpl-bench1","object":"chat.completion.chunk","created":1735689600,"model":"gpt-4o-mini-2024-07-18","choices":[{{"index":0,"delta":{{"content":"{word}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":24,"completion_tokens":{},"total_tokens":{}}}}}

data: [DONE]

"#,
            i + 1,
            i + 25
        )
    } else if i == 0 {
        format!(
            r#"data: {{"id":"chatcmpl-bench1","object":"chat.completion.chunk","created":1735689600,"model":"gpt-4o-mini-2024-07-18","choices":[{{"index":0,"delta":{{"role":"assistant","content":"{word}"}},"finish_reason":null}}]}}

"#
        )
    } else {
        format!(
            r#"data: {{"id":"chatcmpl-bench1","object":"chat.completion.chunk","created":1735689600,"model":"gpt-4o-mini-2024-07-18","choices":[{{"index":0,"delta":{{"content":"{word}"}},"finish_reason":null}}]}}

"#
        )
    };
    let mut frame = format!("{:x}\r\n", ev.len()).into_bytes();
    frame.extend_from_slice(ev.as_bytes());
    frame.extend_from_slice(b"\r\n");
    if last {
        frame.extend_from_slice(b"0\r\n\r\n");
    }
    frame
}

async fn stream_sse(sock: &mut TcpStream, p: Pacing) -> std::io::Result<()> {
    let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
    let start = Instant::now();
    // The head and the first event leave together, as a real upstream's usually do.
    let mut first = head.to_vec();
    first.extend_from_slice(&sse_event(0, p.chunks == 1));
    sock.write_all(&first).await?;
    for i in 1..p.chunks {
        tokio::time::sleep_until(start + p.gap * i as u32).await;
        sock.write_all(&sse_event(i, i + 1 == p.chunks)).await?;
    }
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one request (head + body, Content-Length or chunked) from `buf`/`sock`.
async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    let head_end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 1 << 20 || !fill(sock, buf).await {
            return None;
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).ok()?.to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let _method = first.next()?;
    let target = first.next()?.to_string();
    let http10 = first.next().is_some_and(|v| v == "HTTP/1.0");
    let mut len = 0usize;
    let mut chunked = false;
    let mut close = http10;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            len = v.parse().ok()?;
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.to_ascii_lowercase().contains("chunked");
        } else if k.eq_ignore_ascii_case("connection") {
            let v = v.to_ascii_lowercase();
            close = v.contains("close") || (http10 && !v.contains("keep-alive"));
        }
    }
    buf.drain(..head_end);
    let body: Vec<u8> = if chunked {
        read_chunked(sock, buf).await?
    } else {
        while buf.len() < len {
            if !fill(sock, buf).await {
                return None;
            }
        }
        buf.drain(..len).collect()
    };
    Some(Request {
        target,
        stream: is_stream(&body),
        close,
    })
}

async fn read_chunked(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(p) = find(buf, b"\r\n") {
                break p;
            }
            if !fill(sock, buf).await {
                return None;
            }
        };
        let size_str = std::str::from_utf8(&buf[..line_end]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers (none expected) end with an empty line.
            loop {
                if let Some(p) = find(buf, b"\r\n") {
                    let empty = p == 0;
                    buf.drain(..p + 2);
                    if empty {
                        return Some(body);
                    }
                } else if !fill(sock, buf).await {
                    return None;
                }
            }
        }
        while buf.len() < size + 2 {
            if !fill(sock, buf).await {
                return None;
            }
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

/// Reads more bytes into `buf` (no stack buffer: thousands of idle connections stay small).
async fn fill(sock: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    buf.reserve(4096);
    matches!(sock.read_buf(buf).await, Ok(n) if n > 0)
}

/// `"stream"` followed by optional spaces, `:`, optional spaces and `true`.
fn is_stream(body: &[u8]) -> bool {
    let mut rest = body;
    while let Some(p) = find(rest, b"\"stream\"") {
        let mut t = &rest[p + 8..];
        while let [b' ' | b'\t' | b'\r' | b'\n', tail @ ..] = t {
            t = tail;
        }
        if let [b':', tail @ ..] = t {
            t = tail;
            while let [b' ' | b'\t' | b'\r' | b'\n', tail @ ..] = t {
                t = tail;
            }
            if t.starts_with(b"true") {
                return true;
            }
        }
        rest = &rest[p + 8..];
    }
    false
}
