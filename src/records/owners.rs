//! The record store as the owner store of SPEC 4f: the `object_id`, `rebuilt` and
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
    /// That part, once read by [`fill_chains`].
    pub chain: Option<(String, String)>,
}

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
            WHERE member IS NOT NULL;",
    )
}

/// The columns every owner read selects, in [`OwnerRow`] order: no bodies (a poll re-reads a
/// window of rows; [`fill_chains`] reads the bodies of the new ones only).
const SELECT: &str = "SELECT id, object_id, upstream, created_epoch, \
     CASE WHEN path = '/v1/responses' AND complete = 1 AND response_items IS NOT NULL \
     THEN 1 ELSE 0 END, member";

/// Reads the chain parts of the `rows` that have one (by record id, 500 per query).
pub fn fill_chains(store: &Store, rows: &mut [OwnerRow]) -> Result<(), StoreError> {
    let wanted: Vec<i64> = rows.iter().filter(|r| r.has_chain).map(|r| r.row).collect();
    let mut found = std::collections::HashMap::new();
    for ids in wanted.chunks(500) {
        let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        let sql =
            format!("SELECT id, request_body, response_items FROM records WHERE id IN ({list})");
        match store {
            Store::Sqlite(p) => {
                let conn = p.get().map_err(StoreError::unreachable)?;
                let mut stmt = conn.prepare(&sql).map_err(StoreError::failed)?;
                let got = stmt
                    .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get(1)?, r.get(2)?)))
                    .map_err(StoreError::failed)?;
                for g in got {
                    let (id, body, items): (i64, Option<String>, Option<String>) =
                        g.map_err(StoreError::failed)?;
                    found.insert(id, body.zip(items));
                }
            }
            Store::Postgres(p) => {
                let mut conn = p.get().map_err(StoreError::unreachable)?;
                for r in conn.query(&sql, &[]).map_err(StoreError::from_pg)? {
                    let (body, items): (Option<String>, Option<String>) = (r.get(1), r.get(2));
                    found.insert(r.get::<_, i64>(0), body.zip(items));
                }
            }
        }
    }
    for r in rows.iter_mut().filter(|r| r.has_chain) {
        r.chain = found.remove(&r.row).flatten();
    }
    Ok(())
}

/// Owners written after record `after` (the poll), oldest first, at most `limit`, created at or
/// after `since`.
pub fn owners_after(
    store: &Store,
    after: i64,
    since: SystemTime,
    limit: i64,
) -> Result<Vec<OwnerRow>, StoreError> {
    let filter = "object_id IS NOT NULL AND upstream IS NOT NULL AND id > {after} \
                  AND {created} >= {since} ORDER BY id LIMIT {limit}";
    read(store, filter, after, since, limit)
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
    let row = |id: i64, o: String, u: String, at: i64, has_chain: bool, member| OwnerRow {
        row: id,
        object_id: o,
        upstream: u,
        member,
        created_at: UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap_or(0)),
        has_chain,
        chain: None,
    };
    match store {
        Store::Sqlite(p) => {
            let e = "CAST(strftime('%s', created_at) AS INTEGER)";
            let sql = fill(e, e);
            let conn = p.get().map_err(StoreError::unreachable)?;
            let mut stmt = conn.prepare_cached(&sql).map_err(StoreError::failed)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(row(
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get::<_, Option<i64>>(3)?.unwrap_or(0),
                        r.get::<_, i64>(4)? != 0,
                        r.get(5)?,
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
                        r.get::<_, i32>(4) != 0,
                        r.get(5),
                    )
                })
                .collect())
        }
    }
}
