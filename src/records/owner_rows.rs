//! The record store as the owner store (see the affinity guide): the `object_id`, `rebuilt` and
//! `response_items` columns (added to an existing table when missing), and the reads that fill
//! the in-memory owner map — at start, and for PostgreSQL every poll, the owners other replicas
//! wrote. None of these runs on a request's path.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Store, StoreError};

/// One owned object as a record holds it.
#[derive(Debug, Clone)]
pub struct OwnerRow {
    /// The record's id (the poll's cursor).
    pub row: i64,
    /// The object's id.
    pub object_id: String,
    /// The upstream that created it.
    pub upstream: String,
    /// The member whose request created it (see the members guide), if known.
    pub member: Option<String>,
    /// When its request started.
    pub created_at: SystemTime,
    /// A whole Responses answer whose chain part (request body, kept output items) is stored.
    pub has_chain: bool,
    /// Bytes of that part as stored (request body plus `response_items`; 0 without one): what
    /// reading it would cost, known before anything is read.
    pub chain_bytes: u64,
}

/// One chain part read back: the record's id, its request body and its kept output items.
pub type ChainPart = (i64, String, String);

/// Adds the version-0.3 and 0.4 columns and their index to a SQLite table that lacks them (the check
/// runs at every start, so a database from any earlier version gets them, whatever migration
/// number other columns took).
pub(super) fn sqlite_columns(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('records')")?;
    let cols: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let has = |c: &str| cols.iter().any(|x| x == c);
    let mut sql = String::new();
    if !has("object_id") {
        sql.push_str("ALTER TABLE records ADD COLUMN object_id TEXT;");
    }
    if !has("rebuilt") {
        sql.push_str("ALTER TABLE records ADD COLUMN rebuilt INTEGER NOT NULL DEFAULT 0;");
    }
    if !has("response_items") {
        sql.push_str("ALTER TABLE records ADD COLUMN response_items TEXT;");
    }
    if !has("request_id") {
        sql.push_str("ALTER TABLE records ADD COLUMN request_id TEXT;");
    }
    if !has("member") {
        sql.push_str("ALTER TABLE records ADD COLUMN member TEXT;");
    }
    sql.push_str(
        "CREATE INDEX IF NOT EXISTS records_object_id ON records(object_id) \
         WHERE object_id IS NOT NULL; \
         CREATE INDEX IF NOT EXISTS records_member ON records(member, created_at) \
         WHERE member IS NOT NULL;",
    );
    conn.execute_batch(&format!("BEGIN; {sql} COMMIT;"))
}

/// The same for PostgreSQL (run under the migration lock).
pub(super) fn postgres_columns(conn: &mut postgres::Client) -> Result<(), postgres::Error> {
    conn.batch_execute(
        "ALTER TABLE records
            ADD COLUMN IF NOT EXISTS object_id TEXT,
            ADD COLUMN IF NOT EXISTS rebuilt SMALLINT NOT NULL DEFAULT 0,
            ADD COLUMN IF NOT EXISTS response_items TEXT,
            ADD COLUMN IF NOT EXISTS request_id TEXT,
            ADD COLUMN IF NOT EXISTS member TEXT;
         CREATE INDEX IF NOT EXISTS records_object_id ON records(object_id)
            WHERE object_id IS NOT NULL;
         CREATE INDEX IF NOT EXISTS records_member ON records(member, created_at)
            WHERE member IS NOT NULL;
         CREATE TABLE IF NOT EXISTS openai_api_route_learned (
            id BIGSERIAL PRIMARY KEY,
            object_id TEXT NOT NULL,
            upstream TEXT NOT NULL,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now());",
    )
}

/// The columns every owner read selects, in [`OwnerRow`] order: no bodies, only their sizes
/// (`octet_length` materialises no text: PostgreSQL answers it from the TOAST pointer, SQLite
/// from the record header), so the chain parts worth reading are chosen before any is read.
const SELECT: &str = "SELECT id, object_id, upstream, created_epoch, \
     CASE WHEN path = '/v1/responses' AND complete = 1 AND response_items IS NOT NULL \
     AND request_body IS NOT NULL THEN 1 ELSE 0 END, \
     CASE WHEN path = '/v1/responses' AND complete = 1 AND response_items IS NOT NULL \
     AND request_body IS NOT NULL \
     THEN CAST(octet_length(request_body) AS BIGINT) + CAST(octet_length(response_items) AS BIGINT) \
     ELSE 0 END, member";

/// Ids per `IN (…)` list.
const IN_LIST: usize = 500;

/// Reads the chain parts of records `ids` (one query; the caller sizes the batch). Rows that
/// lost a part since (retention) are left out.
pub fn chain_parts(store: &Store, ids: &[i64]) -> Result<Vec<ChainPart>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let sql = format!(
        "SELECT id, request_body, response_items FROM records WHERE id IN ({list}) \
         AND request_body IS NOT NULL AND response_items IS NOT NULL"
    );
    match store {
        Store::Sqlite(p) => {
            let conn = p.get().map_err(StoreError::unreachable)?;
            let mut stmt = conn.prepare(&sql).map_err(StoreError::failed)?;
            let got = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(StoreError::failed)?;
            got.collect::<Result<_, _>>().map_err(StoreError::failed)
        }
        Store::Postgres(p) => {
            let mut conn = p.get().map_err(StoreError::unreachable)?;
            let rows = conn.query(&sql, &[]).map_err(StoreError::from_pg)?;
            Ok(rows
                .into_iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect())
        }
    }
}

/// The ids of the owner records after record `after`, oldest first, at most `limit`: the
/// poll's one query when nothing is new (a few integers; no row is read beyond its id and its
/// `object_id`/`upstream` test).
pub fn owner_ids_after(store: &Store, after: i64, limit: i64) -> Result<Vec<i64>, StoreError> {
    const Q: &str = "SELECT id FROM records WHERE object_id IS NOT NULL AND upstream IS NOT NULL \
                     AND id > {a} ORDER BY id LIMIT {l}";
    match store {
        Store::Sqlite(p) => {
            let conn = p.get().map_err(StoreError::unreachable)?;
            let mut stmt = conn
                .prepare_cached(&Q.replace("{a}", "?1").replace("{l}", "?2"))
                .map_err(StoreError::failed)?;
            let got = stmt
                .query_map([after, limit], |r| r.get(0))
                .map_err(StoreError::failed)?;
            got.collect::<Result<_, _>>().map_err(StoreError::failed)
        }
        Store::Postgres(p) => {
            let mut conn = p.get().map_err(StoreError::unreachable)?;
            let sql = Q.replace("{a}", "$1").replace("{l}", "$2");
            let rows = conn
                .query(&sql, &[&after, &limit])
                .map_err(StoreError::from_pg)?;
            Ok(rows.into_iter().map(|r| r.get(0)).collect())
        }
    }
}

/// The owner records `ids` (no bodies), oldest first, created at or after `since`.
pub fn owners_by_ids(
    store: &Store,
    ids: &[i64],
    since: SystemTime,
) -> Result<Vec<OwnerRow>, StoreError> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(IN_LIST) {
        let list = chunk
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let filter = format!(
            "object_id IS NOT NULL AND upstream IS NOT NULL AND id IN ({list}) \
             AND {{created}} >= {{since}} ORDER BY id"
        );
        out.extend(read(store, &filter, 0, since, 0)?);
    }
    out.sort_by_key(|r| r.row);
    Ok(out)
}

/// The newest `limit` owners created at or after `since` (the start-up load), oldest first.
pub fn newest_owners(
    store: &Store,
    since: SystemTime,
    limit: i64,
) -> Result<Vec<OwnerRow>, StoreError> {
    let filter = "object_id IS NOT NULL AND upstream IS NOT NULL AND id > {after} \
                  AND {created} >= {since} ORDER BY id DESC LIMIT {limit}";
    let mut rows = read(store, filter, 0, since, limit)?;
    rows.reverse();
    Ok(rows)
}

/// Ids of the owners learned through "not here" (see the affinity guide) written after row
/// `after` of the shared table, lowest first, at most `limit` (the poll's cheap first query).
/// PostgreSQL only: with SQLite one process learns, and what it learned lives in its memory.
pub fn learned_ids_after(store: &Store, after: i64, limit: i64) -> Result<Vec<i64>, StoreError> {
    let Store::Postgres(p) = store else {
        return Ok(Vec::new());
    };
    let mut conn = p.get().map_err(StoreError::unreachable)?;
    let rows = conn
        .query(
            "SELECT id FROM openai_api_route_learned WHERE id > $1 ORDER BY id LIMIT $2",
            &[&after, &limit],
        )
        .map_err(StoreError::from_pg)?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// The learned owners `ids` as owner rows (no member, no chain part), created at or after
/// `since`.
pub fn learned_by_ids(
    store: &Store,
    ids: &[i64],
    since: SystemTime,
) -> Result<Vec<OwnerRow>, StoreError> {
    let Store::Postgres(p) = store else {
        return Ok(Vec::new());
    };
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = p.get().map_err(StoreError::unreachable)?;
    let rows = conn
        .query(
            "SELECT id, object_id, upstream, \
             (EXTRACT(EPOCH FROM created_at) * 1000)::BIGINT \
             FROM openai_api_route_learned WHERE id = ANY($1) AND created_at >= $2 ORDER BY id",
            &[&ids, &since],
        )
        .map_err(StoreError::from_pg)?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let ms: i64 = r.get(3);
            OwnerRow {
                row: r.get(0),
                object_id: r.get(1),
                upstream: r.get(2),
                member: None,
                created_at: UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
                has_chain: false,
                chain_bytes: 0,
            }
        })
        .collect())
}

/// The newest learned owners created at or after `since`, at most `limit`, oldest first (the
/// start-up read).
pub fn newest_learned(
    store: &Store,
    since: SystemTime,
    limit: i64,
) -> Result<Vec<OwnerRow>, StoreError> {
    let Store::Postgres(p) = store else {
        return Ok(Vec::new());
    };
    let ids: Vec<i64> = {
        let mut conn = p.get().map_err(StoreError::unreachable)?;
        conn.query(
            "SELECT id FROM openai_api_route_learned WHERE created_at >= $1 \
             ORDER BY id DESC LIMIT $2",
            &[&since, &limit],
        )
        .map_err(StoreError::from_pg)?
        .into_iter()
        .map(|r| r.get(0))
        .collect()
    };
    learned_by_ids(store, &ids, since)
}

/// One owner looked up by the index, as the request path would if it asked the store (the
/// bench's "store hit"; the request path does not call it).
pub fn owner_by_index(store: &Store, object_id: &str) -> Result<Option<String>, StoreError> {
    const Q: &str = "SELECT upstream FROM records WHERE object_id = {p} LIMIT 1";
    match store {
        Store::Sqlite(p) => {
            let conn = p.get().map_err(StoreError::unreachable)?;
            let mut stmt = conn
                .prepare_cached(&Q.replace("{p}", "?1"))
                .map_err(StoreError::failed)?;
            let mut rows = stmt.query([object_id]).map_err(StoreError::failed)?;
            match rows.next().map_err(StoreError::failed)? {
                Some(r) => r.get(0).map_err(StoreError::failed),
                None => Ok(None),
            }
        }
        Store::Postgres(p) => {
            let mut conn = p.get().map_err(StoreError::unreachable)?;
            let row = conn
                .query_opt(&Q.replace("{p}", "$1"), &[&object_id])
                .map_err(StoreError::from_pg)?;
            Ok(row.and_then(|r| r.get(0)))
        }
    }
}

fn epoch(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn read(
    store: &Store,
    filter: &str,
    after: i64,
    since: SystemTime,
    limit: i64,
) -> Result<Vec<OwnerRow>, StoreError> {
    let fill = |created: &str, epoch_expr: &str| {
        format!(
            "{} FROM records WHERE {}",
            SELECT.replace("created_epoch", epoch_expr),
            filter
                .replace("{after}", &after.to_string())
                .replace("{created}", created)
                .replace("{since}", &epoch(since).to_string())
                .replace("{limit}", &limit.to_string())
        )
    };
    let row = |id: i64,
               o: String,
               u: String,
               at: i64,
               (has_chain, size, member): (bool, i64, Option<String>)| OwnerRow {
        row: id,
        object_id: o,
        upstream: u,
        member,
        created_at: UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap_or(0)),
        has_chain,
        chain_bytes: u64::try_from(size).unwrap_or(0),
    };
    match store {
        Store::Sqlite(p) => {
            let e = "CAST(strftime('%s', created_at) AS INTEGER)";
            let sql = fill(e, e);
            let conn = p.get().map_err(StoreError::unreachable)?;
            // Not cached: an id list makes each text new.
            let mut stmt = conn.prepare(&sql).map_err(StoreError::failed)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(row(
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get::<_, Option<i64>>(3)?.unwrap_or(0),
                        (
                            r.get::<_, i64>(4)? != 0,
                            r.get::<_, Option<i64>>(5)?.unwrap_or(0),
                            r.get(6)?,
                        ),
                    ))
                })
                .map_err(StoreError::failed)?;
            rows.collect::<Result<_, _>>().map_err(StoreError::failed)
        }
        Store::Postgres(p) => {
            let e = "EXTRACT(EPOCH FROM created_at)::BIGINT";
            let sql = fill(e, e);
            let mut conn = p.get().map_err(StoreError::unreachable)?;
            let rows = conn.query(&sql, &[]).map_err(StoreError::from_pg)?;
            Ok(rows
                .into_iter()
                .map(|r| {
                    row(
                        r.get(0),
                        r.get(1),
                        r.get(2),
                        r.get(3),
                        (
                            r.get::<_, i32>(4) != 0,
                            r.get::<_, Option<i64>>(5).unwrap_or(0),
                            r.get(6),
                        ),
                    )
                })
                .collect())
        }
    }
}
