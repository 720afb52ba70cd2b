//! The statements of the replicas' thread, one small statement per exchange (the tables are in
//! `records::shared`). Every time is computed by PostgreSQL's clock and read back as seconds
//! from its `now()`, so replicas whose clocks differ still agree on when a cooldown ends.

use std::time::{Duration, SystemTime};

use postgres::Client;

use super::Replica;
use crate::registry::SharedRow;

/// A row as [`row`] reads it (after `UPDATE … RETURNING` too).
const COLUMNS: &str = "upstream, version, epoch, down, \
    EXTRACT(EPOCH FROM until - now())::float8, opener, \
    EXTRACT(EPOCH FROM open_until - now())::float8, \
    EXTRACT(EPOCH FROM next_probe - now())::float8, changed_by, last_probe, \
    EXTRACT(EPOCH FROM probed - now())::float8";

fn row(r: &postgres::Row) -> SharedRow {
    SharedRow {
        upstream: r.get(0),
        version: r.get(1),
        epoch: r.get(2),
        down: r.get(3),
        until_left: r.get(4),
        opener: r.get(5),
        open_left: r.get(6),
        next_probe_left: r.get(7),
        changed_by: r.get(8),
        last_probe: r.get(9),
        probed_left: r.get(10),
    }
}

/// Gives every configured upstream its row (a write then always finds one to lock).
pub(super) fn ensure(c: &mut Client, names: &[String]) -> Result<(), postgres::Error> {
    c.execute(
        "INSERT INTO openai_api_route_health (upstream, version) \
         SELECT n, nextval('openai_api_route_health_version') FROM unnest($1::text[]) n \
         ON CONFLICT (upstream) DO NOTHING",
        &[&names],
    )
    .map(drop)
}

/// The rows of these upstreams: the poll.
pub(super) fn rows(c: &mut Client, names: &[String]) -> Result<Vec<SharedRow>, postgres::Error> {
    let sql = format!("SELECT {COLUMNS} FROM openai_api_route_health WHERE upstream = ANY($1)");
    Ok(c.query(&sql, &[&names])?.iter().map(row).collect())
}

/// A cooldown of `secs` from now (a longer one running is kept); returns the row and whether
/// the upstream was down before.
pub(super) fn cooldown(
    c: &mut Client,
    upstream: &str,
    secs: f64,
    down: bool,
    me: &str,
    probe_every: Option<f64>,
) -> Result<Option<(SharedRow, bool)>, postgres::Error> {
    let sql = format!(
        "UPDATE openai_api_route_health h SET \
           version = nextval('openai_api_route_health_version'), epoch = h.epoch + 1, \
           down = h.down OR $3, \
           until = GREATEST(COALESCE(h.until, now()), now() + $2::float8 * interval '1 second'), \
           opener = NULL, open_until = NULL, \
           next_probe = now() + $5::float8 * interval '1 second', \
           changed_by = $4, changed = now() \
         FROM (SELECT down AS was_down FROM openai_api_route_health \
               WHERE upstream = $1 FOR UPDATE) o \
         WHERE h.upstream = $1 RETURNING {COLUMNS}, o.was_down"
    );
    let r = c.query_opt(&sql, &[&upstream, &secs, &down, &me, &probe_every])?;
    Ok(r.map(|r| (row(&r), r.get(11))))
}

/// The cooldown of generation `epoch` ends (or the last change was this replica's own); returns
/// the row and whether the upstream was down before, None when it was not this replica's to end.
pub(super) fn recovered(
    c: &mut Client,
    upstream: &str,
    epoch: i64,
    me: &str,
) -> Result<Option<(SharedRow, bool)>, postgres::Error> {
    let sql = format!(
        "UPDATE openai_api_route_health h SET \
           version = nextval('openai_api_route_health_version'), epoch = h.epoch + 1, \
           down = false, until = NULL, opener = NULL, open_until = NULL, next_probe = NULL, \
           changed_by = $3, changed = now() \
         FROM (SELECT down AS was_down FROM openai_api_route_health \
               WHERE upstream = $1 FOR UPDATE) o \
         WHERE h.upstream = $1 AND (h.epoch = $2 OR h.changed_by = $3) \
           AND (h.down OR h.until IS NOT NULL) \
         RETURNING {COLUMNS}, o.was_down"
    );
    let r = c.query_opt(&sql, &[&upstream, &epoch, &me])?;
    Ok(r.map(|r| (row(&r), r.get(11))))
}

/// Takes the half-open claim of a cooldown ending within `preclaim`, unless another replica
/// holds one that does not run out within it; the row when taken.
pub(super) fn claim_half_open(
    c: &mut Client,
    upstream: &str,
    hold: f64,
    me: &str,
    preclaim: f64,
) -> Result<Option<SharedRow>, postgres::Error> {
    let sql = format!(
        "UPDATE openai_api_route_health SET \
           version = nextval('openai_api_route_health_version'), opener = $3, \
           open_until = GREATEST(until, now()) + $2::float8 * interval '1 second' \
         WHERE upstream = $1 AND until IS NOT NULL \
           AND until <= now() + $4::float8 * interval '1 second' \
           AND (opener IS NULL OR open_until <= now() + $4::float8 * interval '1 second') \
         RETURNING {COLUMNS}"
    );
    Ok(c.query_opt(&sql, &[&upstream, &hold, &me, &preclaim])?
        .map(|r| row(&r)))
}

/// Gives back this replica's unused claim; the row when it held one.
pub(super) fn release(
    c: &mut Client,
    upstream: &str,
    me: &str,
) -> Result<Option<SharedRow>, postgres::Error> {
    let sql = format!(
        "UPDATE openai_api_route_health SET \
           version = nextval('openai_api_route_health_version'), opener = NULL, open_until = NULL \
         WHERE upstream = $1 AND opener = $2 RETURNING {COLUMNS}"
    );
    Ok(c.query_opt(&sql, &[&upstream, &me])?.map(|r| row(&r)))
}

/// Takes the probe that is due (and sets the next one `every` seconds on); the row when taken.
pub(super) fn claim_probe(
    c: &mut Client,
    upstream: &str,
    every: f64,
) -> Result<Option<SharedRow>, postgres::Error> {
    let sql = format!(
        "UPDATE openai_api_route_health SET \
           version = nextval('openai_api_route_health_version'), \
           next_probe = now() + $2::float8 * interval '1 second' \
         WHERE upstream = $1 AND until IS NOT NULL \
           AND (next_probe IS NULL OR next_probe <= now() + interval '100 milliseconds') \
         RETURNING {COLUMNS}"
    );
    Ok(c.query_opt(&sql, &[&upstream, &every])?.map(|r| row(&r)))
}

/// A probe's result, for every replica's status page; the row.
pub(super) fn probed(
    c: &mut Client,
    upstream: &str,
    result: &str,
) -> Result<Option<SharedRow>, postgres::Error> {
    let sql = format!(
        "UPDATE openai_api_route_health SET \
           version = nextval('openai_api_route_health_version'), last_probe = $2, probed = now() \
         WHERE upstream = $1 RETURNING {COLUMNS}"
    );
    Ok(c.query_opt(&sql, &[&upstream, &result])?.map(|r| row(&r)))
}

/// This replica's heartbeat, and the replicas seen in the last minute (as of before this
/// beat: one round trip for both).
pub(super) fn beat(
    c: &mut Client,
    me: &Replica,
    id: &str,
) -> Result<Vec<Replica>, postgres::Error> {
    let rows = c.query(
        "WITH beat AS (
            INSERT INTO openai_api_route_replicas (id, host, listen, version, seen)
            VALUES ($1, $2, $3, $4, now())
            ON CONFLICT (id) DO UPDATE SET seen = now(), listen = EXCLUDED.listen
            RETURNING id)
         SELECT id, host, listen, version, EXTRACT(EPOCH FROM now() - seen)::float8
         FROM openai_api_route_replicas
         WHERE seen > now() - interval '1 minute' ORDER BY host, listen, id",
        &[&id, &me.host, &me.listen, &me.version],
    )?;
    let now = SystemTime::now();
    let mut list: Vec<Replica> = rows
        .iter()
        .map(|r| {
            let ago: Option<f64> = r.get(4);
            let ago = Duration::from_secs_f64(ago.unwrap_or(0.0).clamp(0.0, 1e7));
            Replica {
                id: r.get(0),
                host: r.get(1),
                listen: r.get(2),
                version: r.get(3),
                seen: now.checked_sub(ago).unwrap_or(now),
            }
        })
        .collect();
    if let Some(own) = list.iter_mut().find(|r| r.id == id) {
        own.seen = now;
    } else {
        list.push(Replica {
            seen: now,
            ..me.clone()
        });
    }
    Ok(list)
}

/// Forgets replicas not seen for an hour (the roster shows only the last minute's).
pub(super) fn forget_old(c: &mut Client) -> Result<(), postgres::Error> {
    c.execute(
        "DELETE FROM openai_api_route_replicas WHERE seen < now() - interval '1 hour'",
        &[],
    )
    .map(drop)
}
