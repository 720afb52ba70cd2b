//! A member's use per day and model, read from the records for the usage page (see the members
//! guide, "Usage"). Runs on a blocking thread, never on a request worker.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{Store, StoreError};

/// One day and model of a member's use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DayUse {
    /// `YYYY-MM-DD` (UTC).
    pub date: String,
    /// The request's `model`, if it had one.
    pub model: Option<String>,
    /// Requests recorded.
    pub requests: i64,
    /// Of which answered with a status of 400 or more.
    pub failed: i64,
    /// Sum of `prompt_tokens`.
    pub input_tokens: i64,
    /// Sum of `completion_tokens`.
    pub output_tokens: i64,
}

/// `member`'s use per day and model since `since`, oldest first.
pub fn member_days(
    store: &Store,
    member: &str,
    since: SystemTime,
) -> Result<Vec<DayUse>, StoreError> {
    let from = since.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    const COLUMNS: &str = "CAST(count(*) AS BIGINT), \
        CAST(sum(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS BIGINT), \
        CAST(sum(coalesce(prompt_tokens, 0)) AS BIGINT), \
        CAST(sum(coalesce(completion_tokens, 0)) AS BIGINT)";
    match store {
        Store::Sqlite(p) => {
            let conn = p.get().map_err(StoreError::unreachable)?;
            let sql = format!(
                "SELECT substr(created_at, 1, 10) AS d, model, {COLUMNS} FROM records \
                 WHERE member = ?1 AND created_at >= ?2 GROUP BY d, model ORDER BY d, model"
            );
            let since_text =
                crate::time::Rfc3339::new(UNIX_EPOCH + std::time::Duration::from_secs(from));
            let mut stmt = conn.prepare_cached(&sql).map_err(StoreError::failed)?;
            let rows = stmt
                .query_map(rusqlite::params![member, since_text.as_str()], |r| {
                    Ok(DayUse {
                        date: r.get(0)?,
                        model: r.get(1)?,
                        requests: r.get(2)?,
                        failed: r.get::<_, Option<i64>>(3)?.unwrap_or(0),
                        input_tokens: r.get::<_, Option<i64>>(4)?.unwrap_or(0),
                        output_tokens: r.get::<_, Option<i64>>(5)?.unwrap_or(0),
                    })
                })
                .map_err(StoreError::failed)?;
            rows.collect::<Result<_, _>>().map_err(StoreError::failed)
        }
        Store::Postgres(p) => {
            let mut conn = p.get().map_err(StoreError::unreachable)?;
            let sql = format!(
                "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS d, model, \
                 {COLUMNS} FROM records WHERE member = $1 AND created_at >= to_timestamp($2) \
                 GROUP BY d, model ORDER BY d, model"
            );
            let rows = conn
                .query(&sql, &[&member, &(from as f64)])
                .map_err(StoreError::from_pg)?;
            Ok(rows
                .into_iter()
                .map(|r| DayUse {
                    date: r.get(0),
                    model: r.get(1),
                    requests: r.get(2),
                    failed: r.get::<_, Option<i64>>(3).unwrap_or(0),
                    input_tokens: r.get::<_, Option<i64>>(4).unwrap_or(0),
                    output_tokens: r.get::<_, Option<i64>>(5).unwrap_or(0),
                })
                .collect())
        }
    }
}
