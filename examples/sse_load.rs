//! SSE load client for the benchmark harness (`bench/run.sh`): N concurrent chat streams over
//! raw HTTP/1.1, each timed event by event.
//!
//! ```text
//! cargo run --release --example sse_load -- URL N TOKEN [--chunks 20] [--gap-ms 50]
//!     [--batch 250] [--batch-ms 20] [--late-ms 100] [--timeout-s 60]
//! ```
//! URL is `http://127.0.0.1:PORT/v1/chat/completions`; `chunks=…&gap_ms=…` is appended to its
//! query so that `bench_mock` paces the stream the way this client expects. Connections are
//! opened `--batch` at a time, `--batch-ms` apart (a ramp, not a SYN flood).
//!
//! For each stream it records the arrival time of every SSE event. Event k (0-based) should
//! arrive k·gap after event 0, since the upstream sends it then; it is *late* when it arrives
//! more than `--late-ms` after that. `data: [DONE]` is due with the last content event.
//! A stream is complete when it got all N content events and `[DONE]` with a 200 status;
//! anything else (connect error, non-200, error event, early close, timeout) counts as failed.
//!
//! Prints a summary and one machine-readable line starting with `RESULT`.
//! Raise the fd limit (`ulimit -n`) before opening thousands of streams.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const BODY_TEMPLATE: &str = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"temperature":0.7,"max_tokens":256,"messages":[{"role":"system","content":"You are a helpful assistant. Answer briefly and precisely."},{"role":"user","content":"What is the capital of France, and what is it known for? Please answer in two sentences."}]}"#;

struct Opts {
    host: String,
    path: String,
    n: usize,
    token: String,
    chunks: usize,
    gap: Duration,
    batch: usize,
    batch_gap: Duration,
    late: Duration,
    timeout: Duration,
}

#[derive(Default)]
struct Outcome {
    ok: bool,
    error: Option<String>,
    /// Lateness of every event beyond pacing, in µs (may be negative: early).
    late_us: Vec<i64>,
    /// Request sent → first event.
    ttfb: Option<Duration>,
    /// `data: [DONE]` → end of the response body (terminating chunk): a proxy that holds the
    /// end of a finished stream shows here.
    end_lag: Option<Duration>,
    /// TCP connect time (a full accept queue shows as a 1 s SYN retransmit here).
    connect: Option<Duration>,
}

fn die(msg: &str) -> ! {
    eprintln!("sse_load: {msg}");
    eprintln!("usage: sse_load URL N TOKEN [--chunks 20] [--gap-ms 50] [--batch 250] [--batch-ms 20] [--late-ms 100] [--timeout-s 60]");
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut pos = Vec::new();
    let mut chunks = 20usize;
    let mut gap_ms = 50u64;
    let mut batch = 250usize;
    let mut batch_ms = 20u64;
    let mut late_ms = 100u64;
    let mut timeout_s = 60u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if !a.starts_with("--") {
            pos.push(a);
            continue;
        }
        let v: u64 = args
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| die(&format!("{a} needs a number")));
        match a.as_str() {
            "--chunks" => chunks = v.max(1) as usize,
            "--gap-ms" => gap_ms = v,
            "--batch" => batch = v.max(1) as usize,
            "--batch-ms" => batch_ms = v,
            "--late-ms" => late_ms = v,
            "--timeout-s" => timeout_s = v.max(1),
            _ => die(&format!("unknown option {a}")),
        }
    }
    if pos.len() != 3 {
        die("need URL N TOKEN");
    }
    let url = pos[0]
        .strip_prefix("http://")
        .unwrap_or_else(|| die("URL must be http://HOST:PORT/PATH"));
    let (host, path) = match url.find('/') {
        Some(i) => (url[..i].to_string(), url[i..].to_string()),
        None => (url.to_string(), "/".to_string()),
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    let path = format!("{path}{sep}chunks={chunks}&gap_ms={gap_ms}");
    Opts {
        host,
        path,
        n: pos[1].parse().unwrap_or_else(|_| die("N must be a number")),
        token: pos[2].clone(),
        chunks,
        gap: Duration::from_millis(gap_ms),
        batch,
        batch_gap: Duration::from_millis(batch_ms),
        late: Duration::from_millis(late_ms),
        timeout: Duration::from_secs(timeout_s),
    }
}

fn main() {
    let opts = std::sync::Arc::new(parse_args());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(opts));
}

async fn run(opts: std::sync::Arc<Opts>) {
    let request = std::sync::Arc::new(
        format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nUser-Agent: sse_load/1\r\nContent-Length: {}\r\n\r\n{}",
            opts.path,
            opts.host,
            opts.token,
            BODY_TEMPLATE.len(),
            BODY_TEMPLATE
        )
        .into_bytes(),
    );
    let start = Instant::now();
    let mut handles = Vec::with_capacity(opts.n);
    let mut opened = 0;
    while opened < opts.n {
        let this = opts.batch.min(opts.n - opened);
        for _ in 0..this {
            let (o, r) = (opts.clone(), request.clone());
            handles.push(tokio::spawn(async move {
                match tokio::time::timeout(o.timeout, one_stream(&o, &r)).await {
                    Ok(out) => out,
                    Err(_) => Outcome {
                        error: Some("timeout".into()),
                        ..Default::default()
                    },
                }
            }));
        }
        opened += this;
        if opened < opts.n {
            tokio::time::sleep(opts.batch_gap).await;
        }
    }
    let ramp = start.elapsed();
    let mut completed = 0usize;
    let mut failed = 0usize;
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut lates: Vec<i64> = Vec::new();
    let mut ttfbs: Vec<Duration> = Vec::new();
    let mut lags: Vec<Duration> = Vec::new();
    let mut connects: Vec<Duration> = Vec::new();
    for h in handles {
        let out = h.await.unwrap_or_else(|e| Outcome {
            error: Some(format!("task: {e}")),
            ..Default::default()
        });
        if out.ok {
            completed += 1;
        } else {
            failed += 1;
            *errors
                .entry(out.error.unwrap_or_else(|| "unknown".into()))
                .or_default() += 1;
        }
        lates.extend_from_slice(&out.late_us);
        ttfbs.extend(out.ttfb);
        lags.extend(out.end_lag);
        connects.extend(out.connect);
    }
    let total = start.elapsed();
    let late_limit = opts.late.as_micros() as i64;
    let late_count = lates.iter().filter(|&&l| l > late_limit).count();
    lates.sort_unstable();
    ttfbs.sort_unstable();
    lags.sort_unstable();
    connects.sort_unstable();
    let slow_connects = connects
        .iter()
        .filter(|d| **d > Duration::from_millis(500))
        .count();
    let pct_i = |v: &[i64], p: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i] as f64 / 1000.0
    };
    let pct_d = |v: &[Duration], p: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i].as_secs_f64() * 1000.0
    };
    let max_late = lates.last().map(|&l| l as f64 / 1000.0).unwrap_or(0.0);
    println!(
        "sse_load: {} streams to {}{} ({} chunks, {} ms apart), ramp {:.2}s",
        opts.n,
        opts.host,
        opts.path,
        opts.chunks,
        opts.gap.as_millis(),
        ramp.as_secs_f64()
    );
    println!(
        "  completed {completed}, failed {failed}; events {} of which {late_count} > {} ms late; lateness p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lates.len(),
        opts.late.as_millis(),
        pct_i(&lates, 0.5),
        pct_i(&lates, 0.99),
        max_late
    );
    println!(
        "  first event after request: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; total {:.2}s",
        pct_d(&ttfbs, 0.5),
        pct_d(&ttfbs, 0.99),
        pct_d(&ttfbs, 1.0),
        total.as_secs_f64()
    );
    println!(
        "  [DONE] → end of response: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct_d(&lags, 0.5),
        pct_d(&lags, 0.99),
        pct_d(&lags, 1.0)
    );
    println!(
        "  connect: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {slow_connects} took > 500 ms (SYN retransmit: accept queue full)",
        pct_d(&connects, 0.5),
        pct_d(&connects, 0.99),
        pct_d(&connects, 1.0)
    );
    for (e, n) in &errors {
        println!("  failure: {n} × {e}");
    }
    println!(
        "RESULT n={} completed={completed} failed={failed} events={} late={late_count} max_late_ms={max_late:.1} p99_late_ms={:.1} ttfb_p50_ms={:.1} ttfb_p99_ms={:.1} ttfb_max_ms={:.1} end_lag_p50_ms={:.1} end_lag_max_ms={:.1} connect_max_ms={:.1} slow_connects={slow_connects} total_s={:.2}",
        opts.n,
        lates.len(),
        pct_i(&lates, 0.99),
        pct_d(&ttfbs, 0.5),
        pct_d(&ttfbs, 0.99),
        pct_d(&ttfbs, 1.0),
        pct_d(&lags, 0.5),
        pct_d(&lags, 1.0),
        pct_d(&connects, 1.0),
        total.as_secs_f64()
    );
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

enum Framing {
    Chunked,
    Length(usize),
    Close,
}

async fn one_stream(o: &Opts, request: &[u8]) -> Outcome {
    let mut out = Outcome::default();
    macro_rules! fail {
        ($($t:tt)*) => {{
            out.error = Some(format!($($t)*));
            return out;
        }};
    }
    let t_connect = Instant::now();
    let mut sock = match TcpStream::connect(&o.host).await {
        Ok(s) => {
            out.connect = Some(t_connect.elapsed());
            s
        }
        Err(e) => fail!("connect: {}", e.kind()),
    };
    let _ = sock.set_nodelay(true);
    let sent = Instant::now();
    if let Err(e) = sock.write_all(request).await {
        fail!("write: {}", e.kind());
    }
    let mut raw: Vec<u8> = Vec::with_capacity(4096);
    // Response head.
    let framing = loop {
        if let Some(p) = find(&raw, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..p]).to_ascii_lowercase();
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if status != 200 {
                fail!("status {status}");
            }
            let mut framing = Framing::Close;
            for line in head.split("\r\n").skip(1) {
                if let Some((k, v)) = line.split_once(':') {
                    let v = v.trim();
                    if k == "transfer-encoding" && v.contains("chunked") {
                        framing = Framing::Chunked;
                    } else if k == "content-length" {
                        if let Ok(n) = v.parse() {
                            if !matches!(framing, Framing::Chunked) {
                                framing = Framing::Length(n);
                            }
                        }
                    }
                }
            }
            raw.drain(..p + 4);
            break framing;
        }
        raw.reserve(4096);
        match sock.read_buf(&mut raw).await {
            Ok(0) => fail!("closed before response head"),
            Ok(_) => {}
            Err(e) => fail!("read head: {}", e.kind()),
        }
    };
    let mut body: Vec<u8> = Vec::with_capacity(4096);
    let mut body_left = match framing {
        Framing::Length(n) => n,
        _ => usize::MAX,
    };
    let mut events = 0usize; // content events seen
    let mut first_at: Option<Instant> = None;
    let mut done_at: Option<Instant> = None;
    let mut ended = false; // body framing complete
    let mut now = Instant::now();
    loop {
        // De-frame whatever raw bytes we have into `body`.
        match framing {
            Framing::Chunked => {
                while let Some(p) = find(&raw, b"\r\n") {
                    let size_str = String::from_utf8_lossy(&raw[..p]);
                    let Ok(size) =
                        usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
                    else {
                        fail!("bad chunk size line");
                    };
                    if size == 0 {
                        ended = true;
                        raw.clear();
                        break;
                    }
                    if raw.len() < p + 2 + size + 2 {
                        break;
                    }
                    body.extend_from_slice(&raw[p + 2..p + 2 + size]);
                    raw.drain(..p + 2 + size + 2);
                }
            }
            Framing::Length(_) => {
                let take = raw.len().min(body_left);
                body.extend_from_slice(&raw[..take]);
                raw.drain(..take);
                body_left -= take;
                if body_left == 0 {
                    ended = true;
                }
            }
            Framing::Close => {
                body.append(&mut raw);
            }
        }
        // Split complete SSE events.
        while let Some(p) = find(&body, b"\n\n") {
            let ev = &body[..p];
            let data = ev
                .split(|&b| b == b'\n')
                .filter_map(|l| l.strip_prefix(b"data:"))
                .map(|d| d.strip_prefix(b" ").unwrap_or(d))
                .next()
                .unwrap_or(b"");
            if data == b"[DONE]" {
                done_at = Some(now);
                let k = o.chunks.saturating_sub(1);
                if let Some(t0) = first_at {
                    out.late_us.push(lateness(now, t0, o.gap, k));
                }
            } else if find(data, b"\"error\"").is_some() && find(data, b"\"choices\"").is_none() {
                fail!("error event from proxy");
            } else if !data.is_empty() {
                let t0 = *first_at.get_or_insert_with(|| {
                    out.ttfb = Some(now - sent);
                    now
                });
                out.late_us.push(lateness(now, t0, o.gap, events));
                events += 1;
            }
            body.drain(..p + 2);
        }
        if ended {
            break;
        }
        raw.reserve(4096);
        match sock.read_buf(&mut raw).await {
            Ok(0) => {
                if matches!(framing, Framing::Close) {
                    break;
                }
                fail!("closed mid-stream after {events} events");
            }
            Ok(_) => now = Instant::now(),
            Err(e) => fail!("read: {} after {events} events", e.kind()),
        }
    }
    let Some(done_at) = done_at else {
        fail!("no [DONE] ({events} events)");
    };
    out.end_lag = Some(now - done_at);
    if events != o.chunks {
        fail!("{events} events, expected {}", o.chunks);
    }
    out.ok = true;
    out
}

fn lateness(at: Instant, t0: Instant, gap: Duration, k: usize) -> i64 {
    let due = t0 + gap * k as u32;
    if at >= due {
        (at - due).as_micros() as i64
    } else {
        -((due - at).as_micros() as i64)
    }
}
