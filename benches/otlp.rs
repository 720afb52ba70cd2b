//! The exporter thread's encoding of finished spans into one OTLP `ExportTraceServiceRequest`
//! (docs/tracing.md, "Encoding cost"): CPU time, heap allocations and bytes per span.
//!
//! ```text
//! cargo bench --bench otlp                    # 5 rounds of 400 batches of 512 spans
//! OTLP_ROUNDS=9 OTLP_BATCHES=1000 cargo bench --bench otlp
//! ```
//! A batch is what the exporter sends at its default size: 512 spans from 234 requests, shaped
//! like the gateway's traffic (chat requests with one attempt; every 8th a failover with a failed
//! first attempt; every 16th a continuation; a client `tracestate` on every 4th). The encoder
//! keeps its buffers from one batch to the next, as the exporter does, and a warm-up batch runs
//! before the measured ones. CPU time is the bench thread's own (`/proc/thread-self/schedstat`),
//! so other work on a shared machine weighs less than in wall time; the round with the least CPU
//! is reported beside the median. A counting `#[global_allocator]` counts every allocation of
//! the (single-threaded) bench while a round runs.
//!
//! The last line is an FNV-1a hash of the first batch's encoded bytes: two encoders that print
//! the same hash wrote the same bytes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix_web::http::header::HeaderValue;
use actix_web::http::{Method, Uri};
use openai_api_route::trace::proto::Encoder;
use openai_api_route::trace::{AttemptSpan, End, Finished, Phase, ServerSpan};

/// Counts every allocation (the bench runs on one thread).
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(
            new_size.saturating_sub(layout.size()) as u64,
            Ordering::Relaxed,
        );
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Spans per batch: the exporter's default `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`.
const BATCH_SPANS: usize = 512;

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// This thread's CPU time so far, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Deterministic ids, so that the encoded bytes (and their hash) are the same on every run.
fn id<const N: usize>(seed: u64) -> [u8; N] {
    let mut out = [0u8; N];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in &mut out {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    out
}

fn attempt(i: u64, start: u64, upstream: &Arc<str>, ok: bool) -> AttemptSpan {
    AttemptSpan {
        span_id: id(i * 7 + 3),
        start,
        end: start + 900_000,
        first_byte: ok.then_some(start + 300_000),
        upstream: Some(upstream.clone()),
        address: Some(HeaderValue::from_static("api.example.com:8443")),
        status: Some(if ok { 200 } else { 500 }),
        outcome: if ok { "ok" } else { "http_error" },
        error: (!ok).then(|| "HTTP 500 Internal Server Error".to_string()),
        continuation: false,
        phase: Phase::Closed,
    }
}

/// Request `i`'s spans (see the module docs for the mix).
fn request(i: u64, model: &Arc<str>, key: &Arc<str>, ups: &[Arc<str>; 2]) -> Finished {
    let start = 1_750_000_000_000_000_000 + i * 1_000_000;
    let failover = i % 8 == 7;
    let continued = i % 16 == 5;
    let mut attempts = vec![attempt(i, start + 50_000, &ups[0], !failover)];
    if failover || continued {
        let mut second = attempt(i + 1_000_000, start + 1_000_000, &ups[1], true);
        second.continuation = continued;
        attempts.push(second);
    }
    if continued {
        attempts[0].outcome = "stream_error";
        attempts[0].error = Some("connection closed before the response was complete".into());
    }
    let server = ServerSpan {
        trace_id: id(i * 3 + 1),
        span_id: id(i * 5 + 2),
        parent: i.is_multiple_of(2).then(|| id(i * 11 + 4)),
        tracestate: i
            .is_multiple_of(4)
            .then(|| HeaderValue::from_static("vendor=abc123,other=x")),
        start,
        end: start + 2_500_000,
        request: End {
            method: Method::POST,
            uri: Uri::from_static("/v1/chat/completions"),
            model: Some(model.clone()),
            client_key: Some(key.clone()),
            attempts: attempts.len() as u32,
            resumed: u32::from(continued),
            status: 200,
            complete: true,
            input_tokens: Some(1_200 + i as i64 % 300),
            output_tokens: Some(180 + i as i64 % 50),
            finish_reason: Some("stop".into()),
            response_model: Some("gpt-4o-mini-2024-07-18".into()),
            ..End::default()
        },
    };
    Finished { server, attempts }
}

/// One exporter batch: requests until it holds [`BATCH_SPANS`] spans.
fn batch(first: u64) -> Vec<Finished> {
    let model: Arc<str> = "gpt-4o-mini".into();
    let key: Arc<str> = "sk-…abcd".into();
    let ups: [Arc<str>; 2] = ["openai-primary".into(), "azure-eu".into()];
    let mut out = Vec::new();
    let mut spans = 0;
    let mut i = first;
    while spans < BATCH_SPANS {
        let f = request(i, &model, &key, &ups);
        spans += f.len();
        out.push(f);
        i += 1;
    }
    out
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn main() {
    let rounds = env_or("OTLP_ROUNDS", 5).max(1);
    let batches = env_or("OTLP_BATCHES", 400).max(1);
    // A few distinct batches, as the exporter sees different requests each time.
    let inputs: Vec<Vec<Finished>> = (0..4).map(|k| batch(k * 10_000)).collect();
    let spans: usize = inputs[0].iter().map(Finished::len).sum();
    let mut encoder = Encoder::default();
    let first = encoder.encode("openai-api-route", &inputs[0]).concat();
    println!(
        "otlp: {} requests, {spans} spans, {} bytes per batch ({:.0} bytes per span)",
        inputs[0].len(),
        first.len(),
        first.len() as f64 / spans as f64
    );
    let mut results = Vec::new();
    for round in 0..rounds {
        let (a0, b0) = (
            ALLOCS.load(Ordering::Relaxed),
            BYTES.load(Ordering::Relaxed),
        );
        let cpu = thread_cpu_ns();
        let wall = Instant::now();
        let mut total = 0usize;
        for b in 0..batches {
            let parts = encoder.encode("openai-api-route", &inputs[b % inputs.len()]);
            total += parts.iter().map(|p| p.len()).sum::<usize>();
        }
        let wall = wall.elapsed().as_nanos() as f64;
        let cpu = (thread_cpu_ns() - cpu) as f64;
        let n = (batches * spans) as f64;
        let allocs = (ALLOCS.load(Ordering::Relaxed) - a0) as f64 / n;
        let bytes = (BYTES.load(Ordering::Relaxed) - b0) as f64 / n;
        std::hint::black_box(total);
        println!(
            "round {round}: {:.0} ns CPU per span ({:.0} ns wall), {allocs:.2} allocations and {bytes:.0} bytes allocated per span",
            cpu / n,
            wall / n
        );
        results.push((cpu / n, allocs, bytes));
    }
    results.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (best, allocs, bytes) = results[0];
    println!(
        "OTLP ns_per_span_min={best:.0} ns_per_span_median={:.0} allocs_per_span={allocs:.2} bytes_alloc_per_span={bytes:.0} bytes_out_per_span={:.0}",
        results[results.len() / 2].0,
        first.len() as f64 / spans as f64
    );
    println!("otlp: first batch hash {:016x}", fnv1a(&first));
}
