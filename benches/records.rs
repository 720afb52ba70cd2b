//! Sustained request-record throughput into SQLite through the real `Recorder` / `DbActor`
//! (issue: ≥ 10,000 records/s on the 2-core machine, none dropped).
//!
//! ```text
//! cargo bench --bench records            # 200,000 records into a fresh SQLite file
//! RECORDS_DATABASE=postgres://postgres@127.0.0.1:5432/test cargo bench --bench records
//! RECORDS_N=20000 cargo bench --bench records
//! ```
//! Submits realistic records (≈1 KB request body, ≈500 B reply text, usage, timings) as fast as
//! the queue accepts them, keeping it below its capacity the way a busy proxy would, then flushes
//! and reports records/s from first submit to the end of the flush, the rows written and
//! `openai_api_route_records_dropped_total`. Prints one `RESULT` line for `bench/run.sh`.

use std::time::{Duration, Instant, SystemTime};

use actix_web::web::Bytes;
use openai_api_route::metrics::Metrics;
use openai_api_route::records::{Record, Recorder, Store};

const CAPACITY: usize = 10_000;

fn request_body(i: usize) -> Bytes {
    let mut user = format!(
        "Request {i}: please summarise the following meeting notes for the weekly report. "
    );
    while user.len() < 780 {
        user.push_str(
            "The team discussed the migration plan, the rollout schedule and the on-call rota. ",
        );
    }
    Bytes::from(format!(
        r#"{{"model":"gpt-4o-mini","stream":{},"temperature":0.7,"max_tokens":512,"messages":[{{"role":"system","content":"You are a concise assistant that writes clear summaries."}},{{"role":"user","content":"{user}"}}]}}"#,
        i.is_multiple_of(2)
    ))
}

fn response_text(i: usize) -> String {
    let mut s = format!("Summary {i}: ");
    while s.len() < 500 {
        s.push_str("The team agreed on the migration plan and the rollout dates. ");
    }
    s.truncate(500);
    s
}

fn record(i: usize, body: &Bytes, reply: &str) -> Record {
    Record {
        created_at: SystemTime::now(),
        ip: Some(std::net::IpAddr::from([
            10,
            1,
            (i / 256 % 256) as u8,
            (i % 256) as u8,
        ])),
        method: actix_web::http::Method::POST,
        path: actix_web::http::Uri::from_static("/v1/chat/completions"),
        model: Some("gpt-4o-mini".into()),
        stream: i.is_multiple_of(2),
        upstream: Some("primary".into()),
        status: 200,
        attempts: 1,
        error: None,
        request_body: body.clone(),
        response: Some(reply.to_string()),
        response_json: None,
        prompt_tokens: Some(230),
        completion_tokens: Some(110),
        total_tokens: Some(340),
        ttfb_ms: Some(180 + (i % 50) as u64),
        duration_ms: 900 + (i % 400) as u64,
        user_agent: Some(actix_web::http::header::HeaderValue::from_static(
            "OpenAI/Python 1.54.0",
        )),
        client_key: Some("sk-…cdef".into()),
        body_limit: 1 << 20,
        finish_reason: Some("stop".into()),
        resumed: 0,
        complete: true,
        object_id: None,
        rebuilt: false,
        response_items: None,
        request_id: None,
        member: None,
        forgets: None,
        learned: Vec::new(),
    }
}

fn counter(metrics: &Metrics, name: &str) -> f64 {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&metrics.registry.gather())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .unwrap_or(0.0)
}

/// CPU time (ns) of this process's threads: (the main thread, which builds and submits records,
/// all others, which is the `DbActor` writer). From `/proc/self/task/*/schedstat` (Linux).
fn thread_cpu_ns() -> (u64, u64) {
    let main = std::process::id().to_string();
    let (mut submit, mut writer) = (0, 0);
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let ns: u64 = std::fs::read_to_string(task.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0);
        if task.file_name().to_string_lossy() == main {
            submit += ns;
        } else {
            writer += ns;
        }
    }
    (submit, writer)
}

fn main() {
    let n: usize = std::env::var("RECORDS_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().expect("temp dir");
    // RECORDS_DATABASE=postgres://… measures PostgreSQL instead of a fresh SQLite file.
    let target = std::env::var("RECORDS_DATABASE")
        .unwrap_or_else(|_| dir.path().join("bench.sqlite").display().to_string());
    let store = Store::open(&target).expect("open the record store");
    println!("records: store {}", store.kind());
    let initial = Recorder::initial_rows(&store);
    // Distinct bodies for a share of the records so SQLite does not see one repeated value only.
    let bodies: Vec<Bytes> = (0..64).map(request_body).collect();
    let replies: Vec<String> = (0..64).map(response_text).collect();
    let body_len = bodies[0].len();

    actix_rt::System::new().block_on(async move {
        let metrics = Metrics::new().expect("metrics");
        let recorder = Recorder::start(store, initial, metrics.clone(), CAPACITY);
        let before = recorder.rows();
        let mut waits = 0u64;
        let cpu_before = thread_cpu_ns();
        let start = Instant::now();
        for i in 0..n {
            // A busy proxy never lets the queue fill: back off just below capacity.
            while recorder.queued() >= CAPACITY - 100 {
                waits += 1;
                actix_rt::time::sleep(Duration::from_micros(200)).await;
            }
            recorder.submit(record(i, &bodies[i % 64], &replies[i % 64]));
            if i % 1024 == 1023 {
                // Let the runtime breathe like a real server would between requests.
                actix_rt::task::yield_now().await;
            }
        }
        let submitted = start.elapsed();
        recorder.flush().await;
        let elapsed = start.elapsed();
        let cpu_after = thread_cpu_ns();
        let per_record = |a: u64, b: u64| (b - a) as f64 / 1000.0 / n as f64;
        let submit_us = per_record(cpu_before.0, cpu_after.0);
        let writer_us = per_record(cpu_before.1, cpu_after.1);
        let written = recorder.rows() - before;
        let dropped = counter(&metrics, "openai_api_route_records_dropped_total") as u64;
        let rate = n as f64 / elapsed.as_secs_f64();
        println!(
            "records: {n} submitted in {:.2}s, flushed after {:.2}s; {written} rows written, {dropped} dropped; {rate:.0} records/s (request body {body_len} B, reply 500 B, queue {CAPACITY}, {waits} back-offs)",
            submitted.as_secs_f64(),
            elapsed.as_secs_f64(),
        );
        println!(
            "records: CPU per record {writer_us:.2} µs in the writer thread, {submit_us:.2} µs building and submitting"
        );
        println!(
            "RESULT records={n} written={written} dropped={dropped} seconds={:.3} records_per_s={rate:.0} writer_us={writer_us:.2}",
            elapsed.as_secs_f64()
        );
        if rate < 10_000.0 {
            println!("records: below the 10,000 records/s target");
        }
    });
    drop(dir);
}
