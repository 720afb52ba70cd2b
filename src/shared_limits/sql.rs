//! The statements of the sharing of members' limits: the tables, the two functions that take
//! slots and places, and the statements each connection prepares once (a statement prepared
//! per call would cost a second round trip).

use postgres::{Client, Statement};

/// The tables and the two functions that take slots and places. Each function takes a
/// transaction-scoped advisory lock on the member first, so that two replicas asking for the
/// same member's last slot are served one after the other; every statement after the lock sees
/// what the previous holder committed.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS openai_api_route_member_slots (
    id BIGSERIAL PRIMARY KEY,
    member TEXT NOT NULL,
    replica TEXT NOT NULL,
    n INTEGER NOT NULL,
    taken TIMESTAMPTZ NOT NULL,
    counts_until TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS openai_api_route_member_slots_member
    ON openai_api_route_member_slots (member, counts_until);
CREATE TABLE IF NOT EXISTS openai_api_route_member_places (
    member TEXT NOT NULL,
    replica TEXT NOT NULL,
    held INTEGER NOT NULL,
    PRIMARY KEY (member, replica)
);
CREATE TABLE IF NOT EXISTS openai_api_route_member_tokens (
    member TEXT NOT NULL,
    replica TEXT NOT NULL,
    second BIGINT NOT NULL,
    tokens BIGINT NOT NULL,
    PRIMARY KEY (member, replica, second)
);
CREATE OR REPLACE FUNCTION openai_api_route_take_slots(
    p_member TEXT, p_replica TEXT, p_limit INTEGER, p_want INTEGER, p_life_ms INTEGER)
RETURNS TABLE (lease BIGINT, granted INTEGER, counted INTEGER, retry_ms INTEGER)
LANGUAGE plpgsql AS $$
DECLARE u INTEGER; g INTEGER; i BIGINT; r INTEGER;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('openai_api_route_member_slots'), hashtext(p_member));
    DELETE FROM openai_api_route_member_slots s WHERE s.member = p_member AND s.counts_until <= now();
    SELECT coalesce(sum(s.n), 0) INTO u FROM openai_api_route_member_slots s WHERE s.member = p_member;
    g := least(p_want, p_limit - u);
    IF g <= 0 THEN
        SELECT ceil(extract(epoch FROM min(s.counts_until) - clock_timestamp()) * 1000)
            INTO r FROM openai_api_route_member_slots s WHERE s.member = p_member;
        RETURN QUERY SELECT 0::BIGINT, 0, u, greatest(coalesce(r, 1000), 1);
        RETURN;
    END IF;
    INSERT INTO openai_api_route_member_slots (member, replica, n, taken, counts_until)
        VALUES (p_member, p_replica, g, now(),
                now() + make_interval(secs => 60 + p_life_ms / 1000.0))
        RETURNING id INTO i;
    RETURN QUERY SELECT i, g, u + g, 0;
END $$;
CREATE OR REPLACE FUNCTION openai_api_route_take_places(
    p_member TEXT, p_replica TEXT, p_limit INTEGER, p_want INTEGER, p_least INTEGER)
RETURNS INTEGER
LANGUAGE plpgsql AS $$
DECLARE o INTEGER; h INTEGER;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('openai_api_route_member_places'), hashtext(p_member));
    SELECT coalesce(sum(p.held), 0) INTO o FROM openai_api_route_member_places p
        JOIN openai_api_route_replicas r ON r.id = p.replica
        WHERE p.member = p_member AND p.replica <> p_replica
          AND r.seen > now() - interval '10 seconds';
    h := greatest(p_least, least(p_want, p_limit - o));
    INSERT INTO openai_api_route_member_places (member, replica, held)
        VALUES (p_member, p_replica, h)
        ON CONFLICT (member, replica) DO UPDATE SET held = excluded.held;
    RETURN h;
END $$;
";

/// The prepared statements of one connection.
pub(super) struct Statements {
    pub(super) slots: Statement,
    pub(super) places: Statement,
    pub(super) release: Statement,
    pub(super) give_back: Statement,
    pub(super) push: Statement,
    pub(super) others: Statement,
    pub(super) usage: Statement,
    pub(super) count: Statement,
    pub(super) alone: Statement,
}

pub(super) const RELEASE: &str = "UPDATE openai_api_route_member_places SET held = $3 \
     WHERE member = $1 AND replica = $2";
pub(super) const GIVE_BACK: &str =
    "UPDATE openai_api_route_member_slots SET n = greatest(n - $2, 0) \
     WHERE id = $1";
pub(super) const PUSH: &str =
    "INSERT INTO openai_api_route_member_tokens (member, replica, second, tokens) \
     SELECT m, $1, s, t FROM unnest($2::TEXT[], $3::BIGINT[], $4::BIGINT[]) AS x(m, s, t) \
     ON CONFLICT (member, replica, second) \
     DO UPDATE SET tokens = openai_api_route_member_tokens.tokens + excluded.tokens";
pub(super) const OTHERS: &str = "SELECT member, \
     coalesce(sum(tokens) FILTER (WHERE second > $3), 0)::BIGINT, \
     coalesce(sum(tokens) FILTER (WHERE second >= $4), 0)::BIGINT, \
     min(second) FILTER (WHERE second > $3) \
     FROM openai_api_route_member_tokens \
     WHERE member = ANY($1) AND replica <> $2 AND second > least($3, $4 - 1) GROUP BY member";
pub(super) const USAGE: &str = "SELECT \
     (SELECT coalesce(sum(n), 0)::BIGINT FROM openai_api_route_member_slots \
      WHERE member = $1 AND replica <> $2 AND taken > now() - interval '60 seconds'), \
     (SELECT coalesce(sum(p.held), 0)::BIGINT FROM openai_api_route_member_places p \
      JOIN openai_api_route_replicas r ON r.id = p.replica \
      WHERE p.member = $1 AND p.replica <> $2 AND r.seen > now() - interval '10 seconds'), \
     (SELECT coalesce(sum(tokens), 0)::BIGINT FROM openai_api_route_member_tokens \
      WHERE member = $1 AND replica <> $2 AND second > $3), \
     (SELECT coalesce(sum(tokens), 0)::BIGINT FROM openai_api_route_member_tokens \
      WHERE member = $1 AND replica <> $2 AND second >= $4)";
pub(super) const ALONE: &str =
    "INSERT INTO openai_api_route_member_slots (member, replica, n, taken, \
     counts_until) VALUES ($1, $2, $3, now(), now() + make_interval(secs => $4))";
pub(super) const PRUNE: &str = "DELETE FROM openai_api_route_member_tokens WHERE second < $1; \
     DELETE FROM openai_api_route_member_places p WHERE NOT EXISTS \
     (SELECT 1 FROM openai_api_route_replicas r WHERE r.id = p.replica \
      AND r.seen > now() - interval '1 minute')";

/// Replicas seen in the last minute in the roster (the share's divisor).
pub(super) const COUNT: &str =
    "SELECT count(*) FROM openai_api_route_replicas WHERE seen > now() - interval '1 minute'";

/// Prepares every statement on a new connection.
pub(super) fn prepare(client: &mut Client) -> Result<Statements, postgres::Error> {
    Ok(Statements {
        slots: client.prepare("SELECT * FROM openai_api_route_take_slots($1, $2, $3, $4, $5)")?,
        places: client.prepare("SELECT openai_api_route_take_places($1, $2, $3, $4, $5)")?,
        release: client.prepare(RELEASE)?,
        give_back: client.prepare(GIVE_BACK)?,
        push: client.prepare(PUSH)?,
        others: client.prepare(OTHERS)?,
        usage: client.prepare(USAGE)?,
        count: client.prepare(COUNT)?,
        alone: client.prepare(ALONE)?,
    })
}
