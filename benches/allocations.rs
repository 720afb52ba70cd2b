//! Heap allocations per proxied request (issue "Half the CPU per request": ≤ 16 for a JSON
//! request, ≤ 20 for a 10-chunk stream, recording on).
//!
//! ```text
//! cargo bench --bench allocations                 # 2,000 requests of each kind
//! ALLOC_N=500 cargo bench --bench allocations
//! ALLOC_TOP=1 cargo bench --bench allocations     # also name the gateway's busiest allocation sites
//! ```
//! With `ALLOC_TOP=1` the totals include the sampler's own allocations (backtraces); read the
//! per-site counts (allocations per request at each site) instead.
//! A counting `#[global_allocator]` wraps the system allocator. The gateway runs in-process,
//! started by the real [`openai_api_route::server::run`] (same App, workers, records actor) on
//! its own threads, twice: recording ON (SQLite in a temporary directory) and `-database none`.
//! The mock upstream and the client run on threads marked as "not the gateway", whose
//! allocations are not counted, so a figure is what the gateway (its workers, arbiters and the
//! records writer) allocates per request. The records writer works in batches: each measured
//! phase waits past its flush interval before the counters are read.
//!
//! Prints one `ALLOC` line per phase for `bench/run.sh`: `allocs` (new blocks, `alloc` +
//! `alloc_zeroed`), `reallocs` and `bytes` (allocated bytes, reallocs counted by their growth),
//! each per request.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Counts every allocation made on a thread that is not marked as outside the gateway.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
/// With `ALLOC_TOP=1`: sample allocation sites (backtraces) during the measured phases.
static SAMPLE: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The client, the mock upstream and the bench's own main thread set this.
    static OUTSIDE: Cell<bool> = const { Cell::new(false) };
    /// Re-entrancy guard while a backtrace is being taken (it allocates itself).
    static IN_SAMPLE: Cell<bool> = const { Cell::new(false) };
}

fn counted() -> bool {
    !OUTSIDE.try_with(Cell::get).unwrap_or(true)
}

fn mark_outside() {
    OUTSIDE.with(|o| o.set(true));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counted() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
            sample(layout.size());
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if counted() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
            sample(layout.size());
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counted() {
            REALLOCS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(
                new_size.saturating_sub(layout.size()) as u64,
                Ordering::Relaxed,
            );
            sample(new_size);
        }
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocation sites seen while sampling: the first frames inside this workspace's or a
/// dependency's code (allocator and std frames skipped), with a count.
static SITES: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

fn sample(size: usize) {
    if !SAMPLE.load(Ordering::Relaxed) || IN_SAMPLE.with(Cell::get) {
        return;
    }
    IN_SAMPLE.with(|s| s.set(true));
    let bt = std::backtrace::Backtrace::force_capture().to_string();
    let mut frames = Vec::new();
    for line in bt.lines() {
        let line = line.trim();
        let Some((_, name)) = line.split_once(": ") else {
            continue;
        };
        if !line.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            continue;
        }
        let skip = [
            "alloc::",
            "std::",
            "core::",
            "<alloc::",
            "__rust",
            "<core::",
            "<std::",
            "allocations::",
            "bytes::bytes::",
            "bytes::bytes_mut::",
            "<bytes::",
            "<T as alloc::",
            "<T as core::",
            "<&mut alloc::",
            "hashbrown::raw",
            "<str as alloc::",
            "serde_core::de::impls",
        ];
        if skip.iter().any(|s| name.starts_with(s)) || name.contains("Counting") {
            continue;
        }
        frames.push(name.to_string());
        if frames.len()
            == std::env::var("ALLOC_DEPTH")
                .ok()
                .and_then(|d| d.parse().ok())
                .unwrap_or(4)
        {
            break;
        }
    }
    let key = format!("{} [{}B]", frames.join(" < "), size);
    if let Ok(mut sites) = SITES.lock() {
        *sites
            .get_or_insert_with(HashMap::new)
            .entry(key)
            .or_insert(0) += 1;
    }
    IN_SAMPLE.with(|s| s.set(false));
}

const CHAT_JSON: &str = r#"{"id":"chatcmpl-bench0000000000000000000001","object":"chat.completion","created":1735689600,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! The capital of France is Paris. It is known for the Eiffel Tower, the Louvre and its cafes.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":24,"completion_tokens":25,"total_tokens":49},"system_fingerprint":"fp_bench"}"#;

const REQUEST_JSON: &str = r#"{"model":"gpt-4o-mini","temperature":0.7,"max_tokens":256,"messages":[{"role":"system","content":"You are a helpful assistant. Answer briefly and precisely."},{"role":"user","content":"What is the capital of France, and what is it known for? Please answer in two sentences."}]}"#;

const REQUEST_STREAM: &str = r#"{"model":"gpt-4o-mini","stream":true,"temperature":0.7,"max_tokens":256,"messages":[{"role":"system","content":"You are a helpful assistant. Answer briefly and precisely."},{"role":"user","content":"What is the capital of France, and what is it known for? Please answer in two sentences."}]}"#;

/// Chunks per streamed answer (the issue's "10-chunk stream").
const CHUNKS: usize = 10;
const WORDS: [&str; CHUNKS] = [
    "Hello", "!", " The", " capital", " of", " France", " is", " Paris", ".", " It",
];

fn sse_event(i: usize) -> String {
    if i + 1 == CHUNKS {
        format!(
            "data: {{\"id\":\"chatcmpl-bench1\",\"object\":\"chat.completion.chunk\",\"created\":1735689600,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}},\"finish_reason\":\"stop\"}}],\"usage\":{{\"prompt_tokens\":24,\"completion_tokens\":{CHUNKS},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
            WORDS[i],
            24 + CHUNKS
        )
    } else {
        format!(
            "data: {{\"id\":\"chatcmpl-bench1\",\"object\":\"chat.completion.chunk\",\"created\":1735689600,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}},\"finish_reason\":null}}]}}\n\n",
            WORDS[i]
        )
    }
}

/// The mock upstream: one thread per connection, keep-alive, a fixed completion or a stream of
/// [`CHUNKS`] events (each written and flushed on its own, a little apart, so the gateway reads
/// them as separate chunks as it would from a real model).
fn mock_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| die(&e.to_string()));
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let events: Vec<Vec<u8>> = (0..CHUNKS)
        .map(|i| {
            let e = sse_event(i);
            format!("{:x}\r\n{e}\r\n", e.len()).into_bytes()
        })
        .collect();
    std::thread::spawn(move || {
        mark_outside();
        for conn in listener.incoming().flatten() {
            let events = events.clone();
            std::thread::spawn(move || {
                mark_outside();
                let _ = conn.set_nodelay(true);
                let _ = serve_mock(conn, &events);
            });
        }
    });
    port
}

fn serve_mock(conn: TcpStream, events: &[Vec<u8>]) -> std::io::Result<()> {
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    let mut body = Vec::new();
    loop {
        let mut len = 0usize;
        let mut first = true;
        let mut get = false;
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if first {
                get = line.starts_with("GET ");
                first = false;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        body.resize(len, 0);
        r.read_exact(&mut body)?;
        let stream = body.windows(13).any(|w| w == b"\"stream\":true");
        if get {
            let models = r#"{"object":"list","data":[{"id":"gpt-4o-mini","object":"model","owned_by":"bench"}]}"#;
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{models}",
                models.len()
            )?;
        } else if stream {
            w.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")?;
            for e in events {
                w.write_all(e)?;
                w.flush()?;
                std::thread::sleep(Duration::from_micros(300));
            }
            w.write_all(b"0\r\n\r\n")?;
        } else {
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{CHAT_JSON}",
                CHAT_JSON.len()
            )?;
        }
        w.flush()?;
    }
}

/// A keep-alive HTTP/1.1 client that reads whole answers (Content-Length or chunked).
struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
    line: String,
    buf: Vec<u8>,
}

impl Client {
    fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| die(&e.to_string()));
        let _ = s.set_nodelay(true);
        let r = BufReader::new(s.try_clone().unwrap_or_else(|e| die(&e.to_string())));
        Client {
            w: s,
            r,
            line: String::new(),
            buf: Vec::new(),
        }
    }

    /// Sends one POST and reads its answer; returns the status and the body's length.
    fn post(&mut self, body: &str) -> std::io::Result<(u16, usize)> {
        write!(
            self.w,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nUser-Agent: OpenAI/Python 1.54.0\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        self.w.flush()?;
        let mut status = 0u16;
        let mut len = None;
        let mut chunked = false;
        let mut first = true;
        loop {
            self.line.clear();
            if self.r.read_line(&mut self.line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let l = self.line.trim_end();
            if first {
                status = l
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                first = false;
                continue;
            }
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().ok();
                } else if k.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = v.to_ascii_lowercase().contains("chunked");
                }
            }
        }
        let mut total = 0;
        if chunked {
            loop {
                self.line.clear();
                self.r.read_line(&mut self.line)?;
                let n = usize::from_str_radix(self.line.trim(), 16).unwrap_or(0);
                self.buf.resize(n + 2, 0);
                self.r.read_exact(&mut self.buf)?;
                total += n;
                if n == 0 {
                    break;
                }
            }
        } else if let Some(n) = len {
            self.buf.resize(n, 0);
            self.r.read_exact(&mut self.buf)?;
            total = n;
        }
        Ok((status, total))
    }
}

const TOKEN: &str = "sk-bench-client-token";

fn die(msg: &str) -> ! {
    eprintln!("alloc bench: {msg}");
    std::process::exit(1)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| die(&e.to_string()))
}

/// Starts a gateway on its own thread (its own actix system); returns its port.
fn start_gateway(dir: &std::path::Path, name: &str, mock: u16, database: &str) -> u16 {
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "authorization: {TOKEN}\nupstreams:\n  - name: mock\n    endpoint: http://127.0.0.1:{mock}/v1\n    sk: sk-bench-upstream-key\n"
        ),
    )
    .unwrap_or_else(|e| die(&e.to_string()));
    let port = free_port();
    let args = [
        "openai-api-route".to_string(),
        "-addr".into(),
        format!("127.0.0.1:{port}"),
        "-config".into(),
        cfg.display().to_string(),
        "-database".into(),
        database.to_string(),
    ];
    let cli =
        openai_api_route::cli::Cli::try_from_args(args).unwrap_or_else(|e| die(&e.to_string()));
    let config =
        openai_api_route::server::load_config(&cli).unwrap_or_else(|e| die(&e.to_string()));
    std::thread::Builder::new()
        .name(format!("gateway-{name}"))
        .spawn(move || {
            if let Err(e) = openai_api_route::server::run(cli, config) {
                die(&e.to_string());
            }
        })
        .unwrap_or_else(|e| die(&e.to_string()));
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return port;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    die("the gateway did not start")
}

/// Counter snapshot.
fn counters() -> [u64; 3] {
    [
        ALLOCS.load(Ordering::SeqCst),
        REALLOCS.load(Ordering::SeqCst),
        BYTES.load(Ordering::SeqCst),
    ]
}

/// Sends `n` requests of one kind over one keep-alive connection and prints the gateway's
/// allocations per request.
fn phase(gw: u16, label: &str, body: &str, n: u64, warm: u64) {
    let mut c = Client::connect(gw);
    for _ in 0..warm {
        check(c.post(body), label);
    }
    // Past the records writer's batch interval: the warm-up's rows are written.
    std::thread::sleep(Duration::from_millis(400));
    let sampling = std::env::var_os("ALLOC_TOP").is_some();
    SAMPLE.store(sampling, Ordering::SeqCst);
    let before = counters();
    let parses = openai_api_route::facts::parses();
    for _ in 0..n {
        check(c.post(body), label);
    }
    let parses = openai_api_route::facts::parses() - parses;
    // The measured rows are written before the counters are read.
    std::thread::sleep(Duration::from_millis(400));
    let after = counters();
    SAMPLE.store(false, Ordering::SeqCst);
    let per = |i: usize| (after[i] - before[i]) as f64 / n as f64;
    println!(
        "ALLOC {label} requests={n} allocs={:.1} reallocs={:.1} bytes={:.0} body_parses={:.2}",
        per(0),
        per(1),
        per(2),
        parses as f64 / n as f64
    );
    if sampling {
        let mut sites: Vec<(String, u64)> = SITES
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        sites.sort_by_key(|s| std::cmp::Reverse(s.1));
        for (site, count) in sites.iter().take(60) {
            println!("  {:6.2}  {site}", *count as f64 / n as f64);
        }
    }
}

fn check(r: std::io::Result<(u16, usize)>, label: &str) {
    match r {
        Ok((200, len)) if len > 0 => {}
        Ok((status, len)) => die(&format!("{label}: answered {status} with {len} bytes")),
        Err(e) => die(&format!("{label}: {e}")),
    }
}

fn main() {
    mark_outside();
    let n: u64 = std::env::var("ALLOC_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let dir = std::env::temp_dir().join(format!("alloc-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| die(&e.to_string()));
    let mock = mock_upstream();
    let db = dir.join("records.sqlite").display().to_string();
    let on = start_gateway(&dir, "on", mock, &db);
    let off = start_gateway(&dir, "off", mock, "none");
    // The model-list fetches at start are not part of any request.
    std::thread::sleep(Duration::from_millis(500));
    let warm = (n / 10).max(20);
    phase(on, "json recording=on", REQUEST_JSON, n, warm);
    phase(on, "stream10 recording=on", REQUEST_STREAM, n / 4, warm);
    phase(off, "json recording=off", REQUEST_JSON, n, warm);
    phase(off, "stream10 recording=off", REQUEST_STREAM, n / 4, warm);
    let _ = std::fs::remove_dir_all(&dir);
    // The gateways run until the process ends.
    std::process::exit(0);
}
