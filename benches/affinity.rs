//! What the owner lookups cost a request (the affinity guide quotes these figures, "What the
//! lookup costs").
//!
//! ```text
//! cargo bench --bench affinity
//! AFFINITY_POSTGRES=postgres://postgres@127.0.0.1:5432/test cargo bench --bench affinity
//! ```
//! Measures, per request: finding the references of a body that has none (the common case) and
//! of one that names a `previous_response_id`; an owner lookup in the in-memory map holding
//! 100,000 owners (hit and miss); and, for comparison, the same lookup as an indexed query of
//! the record store (SQLite, and PostgreSQL when `AFFINITY_POSTGRES` is set) — the read the
//! request path does *not* make. Prints one `RESULT` line per figure.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use openai_api_route::affinity::{refs, Owners};
use openai_api_route::facts;
use openai_api_route::records::owner_rows::owner_by_index;
use openai_api_route::records::Store;

const OWNERS: usize = 100_000;

fn per_call(name: &str, n: usize, mut f: impl FnMut(usize)) {
    for i in 0..n.min(1000) {
        f(i);
    }
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    println!("RESULT {name}: {ns:.0} ns");
}

fn chat_body(user_bytes: usize) -> Vec<u8> {
    let mut user = String::from("Please summarise the meeting notes. ");
    while user.len() < user_bytes {
        user.push_str("The team discussed the migration plan, the rollout and the on-call rota. ");
    }
    format!(
        r#"{{"model":"gpt-4o-mini","temperature":0.7,"messages":[{{"role":"system","content":"You are concise."}},{{"role":"user","content":"{user}"}}],"tools":[{{"type":"function","function":{{"name":"lookup","parameters":{{"type":"object"}}}}}}],"user":"u-1"}}"#
    )
    .into_bytes()
}

fn main() {
    let small = chat_body(1_000);
    let large = chat_body(100_000);
    per_call(
        "the one parse, 1 KB chat body without references",
        200_000,
        |_| {
            black_box(facts::read(black_box(&small)).ok());
            black_box(refs::path_ids(black_box("/v1/chat/completions")).count());
        },
    );
    per_call(
        "the one parse, 100 KB chat body without references",
        2_000,
        |_| {
            black_box(facts::read(black_box(&large)).ok());
        },
    );
    per_call(
        "baseline: serde_json parse of the 1 KB body (admission reads it already)",
        50_000,
        |_| {
            black_box(serde_json::from_slice::<serde_json::Value>(black_box(&small)).ok());
        },
    );
    let follow_up = br#"{"model":"gpt-4o-mini","previous_response_id":"resp_0123456789abcdef0123456789abcdef","input":"and then?"}"#;
    per_call(
        "the one parse, Responses follow-up with previous_response_id",
        200_000,
        |_| {
            black_box(facts::read(black_box(follow_up)).ok());
        },
    );

    let owners = Owners::default();
    let up: Arc<str> = "primary".into();
    let ids: Vec<String> = (0..OWNERS).map(|i| format!("resp_{i:032x}")).collect();
    for id in &ids {
        let _ = owners.learn(id, &up);
    }
    let cfg = config();
    per_call(
        "owner lookup, in-memory hit (100,000 owners)",
        1_000_000,
        |i| {
            black_box(owners.owner_of(&ids[i % OWNERS], &cfg));
        },
    );
    per_call("owner lookup, in-memory miss", 1_000_000, |i| {
        black_box(owners.owner_of(
            black_box(if i % 2 == 0 { "file-unknown" } else { "resp_x" }),
            &cfg,
        ));
    });

    let dir = std::env::temp_dir().join(format!("affinity-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("db.sqlite");
    let store = Store::open(&path.display().to_string()).expect("open SQLite");
    {
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.execute_batch("BEGIN").unwrap();
        let mut stmt = conn
            .prepare("INSERT INTO records (created_at, method, path, status, upstream, object_id) VALUES ('2026-12-06T00:00:00.000Z', 'POST', '/v1/responses', 200, 'primary', ?1)")
            .unwrap();
        for id in &ids {
            stmt.execute([id]).unwrap();
        }
        drop(stmt);
        conn.execute_batch("COMMIT").unwrap();
    }
    per_call(
        "owner lookup, SQLite indexed query (store hit)",
        20_000,
        |i| {
            black_box(owner_by_index(&store, &ids[(i * 7919) % OWNERS]).ok());
        },
    );
    per_call(
        "owner lookup, SQLite indexed query (store miss)",
        20_000,
        |_| {
            black_box(owner_by_index(&store, "resp_missing").ok());
        },
    );
    let _ = std::fs::remove_dir_all(&dir);

    if let Ok(url) = std::env::var("AFFINITY_POSTGRES") {
        let store = Store::open(&url).expect("open PostgreSQL");
        let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        c.batch_execute("DELETE FROM records WHERE path = '/v1/affinity-bench'")
            .unwrap();
        let mut tx = c.transaction().unwrap();
        let stmt = tx
            .prepare("INSERT INTO records (created_at, method, path, status, upstream, object_id) VALUES (now(), 'POST', '/v1/affinity-bench', 200, 'primary', $1)")
            .unwrap();
        for id in &ids {
            tx.execute(&stmt, &[id]).unwrap();
        }
        tx.commit().unwrap();
        per_call(
            "owner lookup, PostgreSQL indexed query over loopback (store hit)",
            5_000,
            |i| {
                black_box(owner_by_index(&store, &ids[(i * 7919) % OWNERS]).ok());
            },
        );
        c.batch_execute("DELETE FROM records WHERE path = '/v1/affinity-bench'")
            .unwrap();
    }
}

/// A config naming the one upstream the owners belong to.
fn config() -> openai_api_route::config::Config {
    let text =
        "authorization: x\nupstreams:\n  - name: primary\n    endpoint: http://127.0.0.1:9/v1\n";
    openai_api_route::config::parse(std::path::Path::new("bench.yaml"), text, false, &|_| None)
        .expect("config")
        .0
}
