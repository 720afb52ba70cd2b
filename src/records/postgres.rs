//! The PostgreSQL store, for several replicas sharing one record table (`-database postgres://…`).
//!
//! Same columns as SQLite, with `created_at timestamptz`. Migrations run under an advisory lock
//! so replicas starting together do not race; batches are multi-row `INSERT`s in one transaction.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use postgres::types::ToSql;
use postgres::NoTls;
use r2d2_postgres::PostgresConnectionManager;

use super::{DbError, Record, StoreError, COLUMN_COUNT as COLUMNS, INSERT_COLUMNS};

/// A pool of PostgreSQL connections.
pub type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// Key of the advisory lock held while migrating (any constant unique to this program).
const MIGRATION_LOCK: i64 = 0x006f_6172_5f6d_6967;

const MIGRATIONS: &[&str] = &[
    // 1: the SPEC table.
    "CREATE TABLE IF NOT EXISTS records (
        id BIGSERIAL PRIMARY KEY,
        created_at TIMESTAMPTZ NOT NULL,
        ip TEXT,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        model TEXT,
        stream SMALLINT NOT NULL DEFAULT 0,
        upstream TEXT,
        status INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        request_body TEXT,
        response TEXT,
        prompt_tokens BIGINT,
        completion_tokens BIGINT,
        total_tokens BIGINT,
        ttfb_ms BIGINT,
        duration_ms BIGINT,
        user_agent TEXT,
        client_key TEXT
    );
    CREATE INDEX IF NOT EXISTS records_created_at ON records(created_at);",
];

/// Rows per `INSERT` statement (19 parameters each, well under PostgreSQL's 65535).
const ROWS_PER_STATEMENT: usize = 500;

/// `postgres://user:secret@host/db` → `postgres://user@host/db` (and `password=…` removed from a
/// key/value string), for logs and the status page.
pub fn redact(url: &str) -> String {
    if !url.contains("://") {
        return url
            .split_whitespace()
            .filter(|t| !t.starts_with("password="))
            .collect::<Vec<_>>()
            .join(" ");
    }
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return strip_password_param(url);
    };
    let user = rest[..at].split(':').next().unwrap_or("");
    strip_password_param(&format!(
        "{}{}@{}",
        &url[..scheme_end + 3],
        user,
        &rest[at + 1..]
    ))
}

fn strip_password_param(url: &str) -> String {
    match url.split_once('?') {
        Some((base, query)) => {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|p| !p.starts_with("password="))
                .collect();
            if kept.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{}", kept.join("&"))
            }
        }
        None => url.to_string(),
    }
}

/// Connects, migrates under the advisory lock, and checks that inserts are allowed.
pub fn open(url: &str) -> Result<Pool, DbError> {
    let shown = redact(url);
    let fail = |reason: String| DbError::Open {
        target: shown.clone(),
        reason,
    };
    let config: postgres::Config = url
        .parse()
        .map_err(|e: postgres::Error| fail(e.to_string()))?;
    let manager = PostgresConnectionManager::new(config, NoTls);
    let pool = r2d2::Pool::builder()
        .max_size(2)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(3))
        .build(manager)
        .map_err(|e| fail(e.to_string()))?;
    let mut conn = pool.get().map_err(|e| fail(e.to_string()))?;
    conn.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .map_err(|e| fail(e.to_string()))?;
    let migrated = migrate(&mut conn);
    let _ = conn.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
    migrated.map_err(|e| fail(e.to_string()))?;
    Ok(pool)
}

fn migrate(conn: &mut postgres::Client) -> Result<(), postgres::Error> {
    conn.batch_execute(
        "CREATE TABLE IF NOT EXISTS openai_api_route_schema (version INTEGER NOT NULL)",
    )?;
    let version: i32 = match conn.query_opt("SELECT version FROM openai_api_route_schema", &[])? {
        Some(row) => row.get(0),
        None => {
            conn.execute(
                "INSERT INTO openai_api_route_schema (version) VALUES (0)",
                &[],
            )?;
            0
        }
    };
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let mut tx = conn.transaction()?;
        tx.batch_execute(m)?;
        tx.execute(
            "UPDATE openai_api_route_schema SET version = $1",
            &[&((i + 1) as i32)],
        )?;
        tx.commit()?;
    }
    Ok(())
}

/// PostgreSQL text cannot hold NUL.
fn clean(s: Option<String>) -> Option<String> {
    s.map(|t| {
        if t.contains('\0') {
            t.replace('\0', "\u{FFFD}")
        } else {
            t
        }
    })
}

/// Writes a batch in one transaction of multi-row inserts.
pub fn insert(pool: &Pool, batch: &[Record]) -> Result<(), StoreError> {
    let mut conn = pool.get().map_err(StoreError::unreachable)?;
    let mut tx = conn.transaction().map_err(StoreError::from_pg)?;
    for rows in batch.chunks(ROWS_PER_STATEMENT) {
        let mut sql = format!("INSERT INTO records ({INSERT_COLUMNS}) VALUES ");
        for i in 0..rows.len() {
            if i > 0 {
                sql.push(',');
            }
            sql.push('(');
            for c in 0..COLUMNS {
                if c > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!("${}", i * COLUMNS + c + 1));
            }
            sql.push(')');
        }
        // Owned values first, then a parameter list borrowing them.
        struct Row {
            created_at: SystemTime,
            ip: String,
            method: String,
            path: String,
            model: Option<String>,
            stream: i16,
            upstream: Option<String>,
            status: i32,
            attempts: i32,
            error: Option<String>,
            body: Option<String>,
            response: Option<String>,
            prompt: Option<i64>,
            completion: Option<i64>,
            total: Option<i64>,
            ttfb: Option<i64>,
            duration: i64,
            user_agent: Option<String>,
            client_key: Option<String>,
        }
        let owned: Vec<Row> = rows
            .iter()
            .map(|r| Row {
                created_at: r.created_at,
                ip: r.ip.replace('\0', ""),
                method: r.method.clone(),
                path: r.path.replace('\0', ""),
                model: clean(r.model.clone()),
                stream: i16::from(r.stream),
                upstream: r.upstream.clone(),
                status: i32::from(r.status),
                attempts: r.attempts as i32,
                error: clean(r.error.clone()),
                body: clean(r.stored_body().map(Cow::into_owned)),
                response: clean(r.stored_response().map(Cow::into_owned)),
                prompt: r.prompt_tokens,
                completion: r.completion_tokens,
                total: r.total_tokens,
                ttfb: r.ttfb_ms.map(|v| v as i64),
                duration: r.duration_ms as i64,
                user_agent: clean(r.user_agent.clone()),
                client_key: r.client_key.clone(),
            })
            .collect();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(owned.len() * COLUMNS);
        for r in &owned {
            params.extend_from_slice(&[
                &r.created_at,
                &r.ip,
                &r.method,
                &r.path,
                &r.model,
                &r.stream,
                &r.upstream,
                &r.status,
                &r.attempts,
                &r.error,
                &r.body,
                &r.response,
                &r.prompt,
                &r.completion,
                &r.total,
                &r.ttfb,
                &r.duration,
                &r.user_agent,
                &r.client_key,
            ]);
        }
        tx.execute(sql.as_str(), &params)
            .map_err(StoreError::from_pg)?;
    }
    tx.commit().map_err(StoreError::from_pg)
}

/// Rows in the table (all replicas').
pub fn count(pool: &Pool) -> u64 {
    pool.get()
        .ok()
        .and_then(|mut c| c.query_one("SELECT COUNT(*) FROM records", &[]).ok())
        .map(|row| row.get::<_, i64>(0))
        .unwrap_or(0) as u64
}

/// Deletes records created before `cutoff`; returns how many.
pub fn prune(pool: &Pool, cutoff: SystemTime) -> Result<u64, StoreError> {
    let mut conn = pool.get().map_err(StoreError::unreachable)?;
    conn.execute("DELETE FROM records WHERE created_at < $1", &[&cutoff])
        .map_err(StoreError::from_pg)
}

/// Whether the server answers at all.
pub fn ping(pool: &Pool) -> bool {
    pool.get()
        .ok()
        .is_some_and(|mut c| c.simple_query("SELECT 1").is_ok())
}
