//! The member a request belongs to, as its ledger keeps it (see the members guide): its limits
//! checked before the body is read and counted once the request is admitted, its place in flight
//! held until the answer ends, the tokens it used counted at the end, and OpenAI's rate-limit
//! headers on every answer to a member with `rpm` or `tpm`. With replicas sharing a PostgreSQL
//! store, the group's counters come on top of this replica's own (see the operations guide).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::capture::Usage;
use crate::config::{Member, Objects};
use crate::error::GatewayError;
use crate::member_limits::{Limit, Limited, MemberLimits, MemberState, Permit};
use crate::metrics::Metrics;
use crate::shared_limits::GroupPlace;

use super::Ledger;

/// The member of a request.
pub struct MemberRef {
    /// Its index in the config's `members`.
    pub idx: usize,
    /// Its name.
    pub name: Arc<str>,
    /// Its limits.
    pub limits: MemberLimits,
    /// Which objects it sees.
    pub objects: Objects,
    state: Arc<MemberState>,
    /// Its `rpm` and `tpm` as header values.
    limit_values: [Option<HeaderValue>; 2],
    /// Its place among the member's requests in flight, once admitted.
    place: Option<Place>,
}

/// An admitted request's place: the member's counter, and its `member_in_flight` series.
struct Place {
    _permit: Permit,
    /// Its place among the group's `concurrent`, when replicas share the limits.
    _group: Option<GroupPlace>,
    metrics: Metrics,
    name: Arc<str>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.metrics.member_done(&self.name);
    }
}

impl Ledger {
    /// The request comes from member `idx` of the config.
    pub fn member_is(&mut self, idx: usize, m: &Member) {
        self.info.member = Some(m.name.clone());
        self.member = Some(MemberRef {
            idx,
            name: m.name.clone(),
            limits: m.limits,
            objects: m.objects,
            state: m.state.clone(),
            limit_values: m.limit_values.clone(),
            place: None,
        });
    }

    /// The request's member, when it has one (not with `-noauth`).
    pub fn member(&self) -> Option<&MemberRef> {
        self.member.as_ref()
    }

    /// The limits this replica's own counters enforce for `l` now: the member's, or its share
    /// while the replicas cannot share through PostgreSQL.
    fn local_limits(&self, l: &MemberLimits) -> MemberLimits {
        self.sinks
            .sharing
            .as_ref()
            .map_or(*l, |s| s.local_limits(l))
    }

    /// Whether the member may send one more request now (nothing is counted yet): the check
    /// made before the body is read, from what this replica knows without waiting.
    pub fn check_limits(&self) -> Result<(), GatewayError> {
        let Some(m) = &self.member else {
            return Ok(());
        };
        let (now, wall) = (Instant::now(), SystemTime::now());
        let limits = self.local_limits(&m.limits);
        m.state
            .check(&limits, now, wall)
            .map_err(|l| self.limited(m, l))?;
        match &self.sinks.sharing {
            Some(s) => s.check(&m.name, &m.limits).map_err(|l| self.limited(m, l)),
            None => Ok(()),
        }
    }

    /// Admits the request for its member: counted in its limits, and in flight until the answer
    /// ends (a refused request counts toward no limit). With shared limits this may wait on
    /// PostgreSQL, for a second at most.
    pub async fn take_place(&mut self) -> Result<(), GatewayError> {
        let Some(m) = &self.member else {
            return Ok(());
        };
        let shared = self.sinks.sharing.as_ref().filter(|_| m.limits.any());
        let group = match shared {
            Some(s) => match s.admit(&m.name, &m.limits).await {
                Ok(g) => g,
                Err(l) => return Err(self.limited(m, l)),
            },
            None => None,
        };
        // Asked again: PostgreSQL may have gone away while the request waited.
        let limits = self.local_limits(&m.limits);
        match m.state.admit(&limits, Instant::now(), SystemTime::now()) {
            Ok(permit) => {
                if let Some(s) = &self.sinks.sharing {
                    s.admitted(&m.name, &m.limits);
                }
                let metrics = self.sinks.metrics.clone();
                metrics.member_admitted(&m.name);
                let place = Place {
                    _permit: permit,
                    _group: group,
                    metrics,
                    name: m.name.clone(),
                };
                if let Some(m) = self.member.as_mut() {
                    m.place = Some(place);
                }
                Ok(())
            }
            Err(l) => {
                if let Some(s) = shared {
                    s.unadmit(&m.name, &m.limits);
                }
                Err(self.limited(m, l))
            }
        }
    }

    /// The refusal, naming the member's own limit (not its share of it).
    fn limited(&self, m: &MemberRef, mut l: Limited) -> GatewayError {
        let own = match l.limit {
            Limit::Rpm => m.limits.rpm,
            Limit::Tpm => m.limits.tpm,
            Limit::TokensPerDay => m.limits.tokens_per_day,
            Limit::Concurrent => m.limits.concurrent,
        };
        l.value = own.unwrap_or(l.value);
        self.sinks.metrics.member_limited(&m.name, l.limit.label());
        GatewayError::RateLimited {
            member: m.name.clone(),
            limited: l,
        }
    }

    /// The request ended: the tokens it used count toward its member's `tpm` and
    /// `tokens_per_day` — its `total_tokens`, or, when the upstream reported none, a quarter of
    /// the request body's and the generated text's bytes.
    pub(super) fn member_ended(&mut self, usage: Usage, text_bytes: usize) {
        let Some(m) = self.member.as_mut() else {
            return;
        };
        if m.place.is_none() {
            return;
        }
        let body = self.info.body.len() as u64;
        let (input, output, total) = match (usage.total, usage.prompt, usage.completion) {
            (Some(t), p, c) => (
                p.unwrap_or(0).max(0) as u64,
                c.unwrap_or(0).max(0) as u64,
                t.max(0) as u64,
            ),
            (None, Some(p), Some(c)) => (p.max(0) as u64, c.max(0) as u64, (p + c).max(0) as u64),
            _ => {
                let (i, o) = (body / 4, text_bytes as u64 / 4);
                (i, o, (body + text_bytes as u64) / 4)
            }
        };
        let wall = SystemTime::now();
        m.state.add_tokens(total, Instant::now(), wall);
        if let Some(s) = &self.sinks.sharing {
            s.ended(&m.name, &m.limits, total, wall);
        }
        self.sinks.metrics.member_tokens(&m.name, input, output);
    }

    /// Whether the answer's text must be read even when nothing is recorded: the member has a
    /// token limit, and an answer without a reported usage counts by its text's bytes.
    pub fn counts_text(&self) -> bool {
        self.member
            .as_ref()
            .is_some_and(|m| m.limits.tpm.is_some() || m.limits.tokens_per_day.is_some())
    }

    /// Whether the answers carry the member's own rate-limit headers (it has `rpm` or `tpm`).
    pub fn has_rate_limits(&self) -> bool {
        self.member
            .as_ref()
            .is_some_and(|m| m.limits.rate_headers())
    }

    /// OpenAI's rate-limit headers for the member's own limits, when it has `rpm` or `tpm`; the
    /// upstream's own `x-ratelimit-*` are removed then (they describe the shared account).
    pub fn rate_headers(&self, headers: &mut HeaderMap) {
        if !self.has_rate_limits() {
            return;
        }
        let theirs: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("x-ratelimit-"))
            .cloned()
            .collect();
        for k in theirs {
            headers.remove(k);
        }
        self.each_rate_header(|name, value| {
            headers.insert(name, value);
        });
    }

    /// Hands each of the member's own rate-limit headers to `put` (none without `rpm` and
    /// `tpm`): one look at its counters, and nothing formatted on the heap (the limits were made
    /// with the config, a reset in whole seconds is a static value, a count is written straight
    /// into its value).
    pub fn each_rate_header(&self, mut put: impl FnMut(HeaderName, HeaderValue)) {
        let Some(m) = self.member.as_ref().filter(|m| m.limits.rate_headers()) else {
            return;
        };
        let mut used = m.state.used(Instant::now(), SystemTime::now());
        if let Some(s) = &self.sinks.sharing {
            // The group's numbers as this replica last saw them.
            let (tokens, _) = s.others_tokens(&m.name);
            used.tokens_last_minute += tokens;
            if let Some(group) = s.group_requests(&m.name) {
                used.requests_last_minute = used.requests_last_minute.max(group);
            }
        }
        let [rpm_value, tpm_value] = &m.limit_values;
        let kinds = [
            (
                m.limits.rpm,
                rpm_value,
                used.requests_last_minute,
                used.requests_reset,
                REQUESTS,
            ),
            (
                m.limits.tpm,
                tpm_value,
                used.tokens_last_minute,
                used.tokens_reset,
                TOKENS,
            ),
        ];
        for (limit, value, used, reset, [limit_name, left_name, reset_name]) in kinds {
            let Some(n) = limit else { continue };
            put(limit_name, value.clone().unwrap_or_else(|| n.into()));
            put(left_name, n.saturating_sub(used).into());
            put(reset_name, duration_value(reset));
        }
    }
}

/// The header names of the request limit and of the token limit: limit, remaining, reset
/// (made at compile time).
const REQUESTS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
const TOKENS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];

/// Whole seconds up to a minute in OpenAI's form, `1s` … `59s`, `1m`: what a reset of the
/// 60-second windows nearly always is.
const SECONDS: [&str; 60] = [
    "1m", "1s", "2s", "3s", "4s", "5s", "6s", "7s", "8s", "9s", "10s", "11s", "12s", "13s", "14s",
    "15s", "16s", "17s", "18s", "19s", "20s", "21s", "22s", "23s", "24s", "25s", "26s", "27s",
    "28s", "29s", "30s", "31s", "32s", "33s", "34s", "35s", "36s", "37s", "38s", "39s", "40s",
    "41s", "42s", "43s", "44s", "45s", "46s", "47s", "48s", "49s", "50s", "51s", "52s", "53s",
    "54s", "55s", "56s", "57s", "58s", "59s",
];

/// [`openai_duration`] as a header value: static for whole seconds up to a minute, else written
/// on the stack.
fn duration_value(d: std::time::Duration) -> HeaderValue {
    if d.as_millis() >= 1000 {
        let secs = d.as_secs() + u64::from(d.subsec_millis() >= 500);
        if (1..=60).contains(&secs) {
            return HeaderValue::from_static(SECONDS[(secs % 60) as usize]);
        }
    }
    let mut buf = [0u8; 32];
    let mut w = &mut buf[..];
    let _ = write_duration(&mut w, d);
    let len = 32 - w.len();
    HeaderValue::from_bytes(buf.get(..len).unwrap_or_default())
        .unwrap_or(HeaderValue::from_static("0ms"))
}

/// A duration as OpenAI's rate-limit headers write it: `6s`, `1m30s`, `250ms`.
pub fn openai_duration(d: std::time::Duration) -> String {
    let mut out = Vec::with_capacity(16);
    let _ = write_duration(&mut out, d);
    String::from_utf8(out).unwrap_or_default()
}

/// Writes `d` in OpenAI's form: milliseconds under a second, else whole seconds (rounded) as
/// `1h2m3s` without the leading zero units and without trailing zero seconds after minutes.
fn write_duration(w: &mut impl std::io::Write, d: std::time::Duration) -> std::io::Result<()> {
    let ms = d.as_millis();
    if ms < 1000 {
        return write!(w, "{ms}ms");
    }
    let secs = d.as_secs() + u64::from(d.subsec_millis() >= 500);
    match (secs / 3600, secs % 3600 / 60, secs % 60) {
        (0, 0, s) => write!(w, "{s}s"),
        (0, m, 0) => write!(w, "{m}m"),
        (0, m, s) => write!(w, "{m}m{s}s"),
        (h, m, s) => write!(w, "{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::openai_duration;
    use std::time::Duration;

    #[test]
    fn durations_in_openais_words() {
        assert_eq!(openai_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(openai_duration(Duration::from_secs(6)), "6s");
        assert_eq!(openai_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(openai_duration(Duration::from_secs(120)), "2m");
        assert_eq!(openai_duration(Duration::ZERO), "0ms");
        assert_eq!(openai_duration(Duration::from_millis(59_600)), "1m");
        assert_eq!(openai_duration(Duration::from_secs(3_725)), "1h2m5s");
        for ms in (0..200_000).step_by(97) {
            let d = Duration::from_millis(ms);
            assert_eq!(
                super::duration_value(d),
                openai_duration(d).as_str(),
                "{ms} ms"
            );
        }
    }
}
