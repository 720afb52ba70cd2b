//! Prometheus metrics (see the observability guide, "Metrics"): the gateway's own series,
//! registered in the same registry that actix-web-prom exposes on `/v1/metrics`.
//!
//! Every label value is an upstream name from the config or one of a fixed set, so no client can
//! create a new series. Counters are atomics: updating them on the request path costs nanoseconds
//! and needs no actor.

use crate::series::{LATENCY_BUCKETS, NAMESPACE};
use actix_web_prom::{ActixMetricsConfiguration, PrometheusMetrics, PrometheusMetricsBuilder};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// Handles to the gateway's metrics; cheap to clone (every field is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    /// The registry actix-web-prom serves.
    pub registry: Registry,
    upstream_requests: IntCounterVec,
    first_byte: HistogramVec,
    failovers: IntCounterVec,
    healthy: IntGaugeVec,
    tokens: IntCounterVec,
    records_dropped: IntCounter,
    record_write_failures: IntCounter,
    database_up: prometheus::IntGauge,
    notifications: IntCounterVec,
    record_batch_size: Histogram,
    rejected: IntCounterVec,
    retries: IntCounterVec,
    resumes: IntCounterVec,
    websocket_sessions: IntGaugeVec,
    spans_dropped: IntCounter,
    affinity: IntCounterVec,
    member_requests: IntCounterVec,
    member_tokens: IntCounterVec,
    member_in_flight: IntGaugeVec,
    member_limited: IntCounterVec,
    probes: IntCounterVec,
    replicas: prometheus::IntGauge,
    /// The HTTP request series with bounded labels (see [`crate::http_metrics`]).
    pub http: crate::http_metrics::HttpMetrics,
}

impl Metrics {
    /// Creates and registers every series.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace(NAMESPACE);
        let upstream_requests = IntCounterVec::new(
            opts(
                "upstream_requests_total",
                "Attempts against an upstream, by outcome",
            ),
            &["upstream", "outcome"],
        )?;
        let first_byte = HistogramVec::new(
            HistogramOpts::new(
                "upstream_first_byte_seconds",
                "Attempt start to the response head (and first chunk, for streams)",
            )
            .namespace(NAMESPACE)
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["upstream"],
        )?;
        let failovers = IntCounterVec::new(
            opts(
                "failovers_total",
                "Attempts that failed and moved on, by the upstream that failed",
            ),
            &["upstream"],
        )?;
        let healthy = IntGaugeVec::new(
            opts(
                "upstream_healthy",
                "1 while the upstream is below its failure threshold",
            ),
            &["upstream"],
        )?;
        let tokens = IntCounterVec::new(
            opts("tokens_total", "Tokens reported in upstream usage, by kind"),
            &["upstream", "kind"],
        )?;
        let records_dropped = IntCounter::with_opts(opts(
            "records_dropped_total",
            "Request records lost: the writer queue was full, or the database refused them",
        ))?;
        let record_write_failures = IntCounter::with_opts(opts(
            "record_write_failures_total",
            "Database write attempts that failed (records are retried while the database is unreachable, else dropped)",
        ))?;
        let database_up = prometheus::IntGauge::with_opts(opts(
            "database_up",
            "1 while the record database accepts writes, 0 while it is unreachable",
        ))?;
        let notifications = IntCounterVec::new(
            opts(
                "notifications_total",
                "Alert deliveries, by channel and result",
            ),
            &["channel", "result"],
        )?;
        let record_batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "record_batch_size",
                "Records written per database transaction",
            )
            .namespace(NAMESPACE)
            .buckets(vec![1.0, 4.0, 16.0, 64.0, 256.0, 1024.0]),
        )?;
        let rejected = IntCounterVec::new(
            opts(
                "rejected_total",
                "Requests the gateway answered itself without any upstream, by reason",
            ),
            &["reason"],
        )?;
        for r in crate::error::Rejection::ALL {
            rejected.with_label_values(&[r.label()]);
        }
        registry.register(Box::new(rejected.clone()))?;
        let retries = IntCounterVec::new(
            opts(
                "retries_total",
                "Extra attempts on the same upstream after a retryable failure (see the rescue guide)",
            ),
            &["upstream"],
        )?;
        registry.register(Box::new(retries.clone()))?;
        let resumes = IntCounterVec::new(
            opts(
                "resumes_total",
                "Continuations of a broken chat stream, by the upstream asked to continue and result",
            ),
            &["upstream", "result"],
        )?;
        registry.register(Box::new(resumes.clone()))?;
        let websocket_sessions = IntGaugeVec::new(
            opts(
                "websocket_sessions",
                "Open WebSocket (Realtime API) sessions, by upstream",
            ),
            &["upstream"],
        )?;
        registry.register(Box::new(websocket_sessions.clone()))?;
        let spans_dropped = IntCounter::with_opts(opts(
            "spans_dropped_total",
            "Trace spans lost: the exporter queue was full, or the export failed (see the tracing guide)",
        ))?;
        registry.register(Box::new(spans_dropped.clone()))?;
        let affinity = IntCounterVec::new(
            opts(
                "affinity_total",
                "Requests routed by the object they refer to (see the affinity guide), by result",
            ),
            &["result"],
        )?;
        registry.register(Box::new(affinity.clone()))?;
        let member_requests = IntCounterVec::new(
            opts(
                "member_requests_total",
                "Requests admitted for a member (see the members guide)",
            ),
            &["member"],
        )?;
        registry.register(Box::new(member_requests.clone()))?;
        let member_tokens = IntCounterVec::new(
            opts(
                "member_tokens_total",
                "Tokens a member's requests used, by kind (input, output)",
            ),
            &["member", "kind"],
        )?;
        registry.register(Box::new(member_tokens.clone()))?;
        let member_in_flight = IntGaugeVec::new(
            opts(
                "member_in_flight",
                "A member's requests and WebSocket sessions in flight",
            ),
            &["member"],
        )?;
        registry.register(Box::new(member_in_flight.clone()))?;
        let member_limited = IntCounterVec::new(
            opts(
                "member_limited_total",
                "A member's requests refused by one of its limits, by limit",
            ),
            &["member", "limit"],
        )?;
        registry.register(Box::new(member_limited.clone()))?;
        let probes = IntCounterVec::new(
            opts(
                "probes_total",
                "Probes of upstreams in cooldown (probe_interval), by result",
            ),
            &["upstream", "result"],
        )?;
        registry.register(Box::new(probes.clone()))?;
        let replicas = prometheus::IntGauge::with_opts(opts(
            "replicas",
            "Replicas sharing the PostgreSQL store, seen in the last minute",
        ))?;
        registry.register(Box::new(replicas.clone()))?;
        registry.register(Box::new(upstream_requests.clone()))?;
        registry.register(Box::new(first_byte.clone()))?;
        registry.register(Box::new(failovers.clone()))?;
        registry.register(Box::new(healthy.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(records_dropped.clone()))?;
        registry.register(Box::new(record_write_failures.clone()))?;
        registry.register(Box::new(database_up.clone()))?;
        registry.register(Box::new(notifications.clone()))?;
        registry.register(Box::new(record_batch_size.clone()))?;
        let http = crate::http_metrics::HttpMetrics::new(&registry)?;
        Ok(Metrics {
            http,
            registry,
            upstream_requests,
            first_byte,
            failovers,
            healthy,
            tokens,
            records_dropped,
            record_write_failures,
            database_up,
            notifications,
            record_batch_size,
            rejected,
            retries,
            resumes,
            websocket_sessions,
            spans_dropped,
            affinity,
            member_requests,
            member_tokens,
            member_in_flight,
            member_limited,
            probes,
            replicas,
        })
    }

    /// A member's request admitted (it now counts in flight until [`Self::member_done`]).
    pub fn member_admitted(&self, member: &str) {
        self.member_requests.with_label_values(&[member]).inc();
        self.member_in_flight.with_label_values(&[member]).inc();
    }

    /// A member's admitted request (or WebSocket session) ended.
    pub fn member_done(&self, member: &str) {
        self.member_in_flight.with_label_values(&[member]).dec();
    }

    /// Tokens a member's request used.
    pub fn member_tokens(&self, member: &str, input: u64, output: u64) {
        if input > 0 {
            self.member_tokens
                .with_label_values(&[member, "input"])
                .inc_by(input);
        }
        if output > 0 {
            self.member_tokens
                .with_label_values(&[member, "output"])
                .inc_by(output);
        }
    }

    /// A member's request refused by `limit` (`rpm`, `tpm`, `tokens_per_day`, `concurrent`).
    pub fn member_limited(&self, member: &str, limit: &'static str) {
        self.member_limited
            .with_label_values(&[member, limit])
            .inc();
    }

    /// Creates a member's series at 0, so that each shows before its first request.
    pub fn member_known(&self, member: &str) {
        self.member_requests.with_label_values(&[member]);
        self.member_in_flight.with_label_values(&[member]);
    }

    /// The actix-web-prom middleware over our registry, exposing `/v1/metrics`.
    ///
    /// It only serves the exposition: the HTTP request series are ours ([`Self::http`], bounded
    /// labels). Its own two series get names of their own (no clash with ours) and every request
    /// is excluded from them, so they never hold a sample and never appear in the scrape.
    pub fn http_middleware(&self) -> Result<PrometheusMetrics, String> {
        PrometheusMetricsBuilder::new(NAMESPACE)
            .registry(self.registry.clone())
            .endpoint("/v1/metrics")
            .metrics_configuration(
                ActixMetricsConfiguration::default()
                    .http_requests_total_name("exposition_unused_total")
                    .http_requests_duration_seconds_name("exposition_unused_seconds"),
            )
            .exclude_regex("")
            .mask_unmatched_patterns("UNKNOWN")
            .build()
            .map_err(|e| e.to_string())
    }

    /// One attempt's outcome (`ok` or a [`crate::failure::FailKind`] label).
    pub fn attempt(&self, upstream: &str, outcome: &str) {
        self.upstream_requests
            .with_label_values(&[upstream, outcome])
            .inc();
    }

    /// Time to first byte of a committed attempt.
    pub fn first_byte(&self, upstream: &str, secs: f64) {
        self.first_byte.with_label_values(&[upstream]).observe(secs);
    }

    /// An attempt that failed and let the request move on.
    pub fn failover(&self, upstream: &str) {
        self.failovers.with_label_values(&[upstream]).inc();
    }

    /// Health gauge.
    pub fn set_healthy(&self, upstream: &str, healthy: bool) {
        self.healthy
            .with_label_values(&[upstream])
            .set(i64::from(healthy));
    }

    /// One probe of an upstream in cooldown (`ok`, `http_error`, `timeout`, `connect_error`).
    pub fn probe(&self, upstream: &str, result: &str) {
        self.probes.with_label_values(&[upstream, result]).inc();
    }

    /// The replicas sharing the store, as the roster last read them.
    pub fn set_replicas(&self, n: usize) {
        self.replicas.set(n as i64);
    }

    /// Removes the series of an upstream that a reload removed.
    pub fn forget_upstream(&self, upstream: &str) {
        let _ = self.healthy.remove_label_values(&[upstream]);
    }

    /// Token usage reported by an upstream.
    pub fn tokens(&self, upstream: &str, prompt: Option<i64>, completion: Option<i64>) {
        if let Some(p) = prompt.filter(|p| *p > 0) {
            self.tokens
                .with_label_values(&[upstream, "prompt"])
                .inc_by(p as u64);
        }
        if let Some(c) = completion.filter(|c| *c > 0) {
            self.tokens
                .with_label_values(&[upstream, "completion"])
                .inc_by(c as u64);
        }
    }

    /// A record dropped at the full queue.
    pub fn record_dropped(&self) {
        self.records_dropped.inc();
    }

    /// `n` records dropped at once (a batch the database refused).
    pub fn records_dropped_n(&self, n: usize) {
        self.records_dropped.inc_by(n as u64);
    }

    /// Records dropped since start (`openai_api_route_records_dropped_total`).
    pub fn records_dropped(&self) -> u64 {
        self.records_dropped.get()
    }

    /// A failed database write attempt.
    pub fn record_write_failure(&self) {
        self.record_write_failures.inc();
    }

    /// Database reachability gauge.
    pub fn set_database_up(&self, up: bool) {
        self.database_up.set(i64::from(up));
    }

    /// Size of one write transaction.
    pub fn record_batch(&self, n: usize) {
        self.record_batch_size.observe(n as f64);
    }

    /// A same-upstream retry (`retries`: see the rescue guide).
    pub fn retry(&self, upstream: &str) {
        self.retries.with_label_values(&[upstream]).inc();
    }

    /// A continuation of a broken stream on `upstream`: `ok`, `rejected` (prefill refused, so
    /// regenerated), `diverged` (the regeneration did not begin with the text sent), `failed`,
    /// or `restarted` (it ignored the prefill and answered from the start: see the rescue guide,
    /// "Truthful ends (0.3)").
    pub fn resume(&self, upstream: &str, result: &str) {
        self.resumes.with_label_values(&[upstream, result]).inc();
    }

    /// One routing decision by owner (see the affinity guide, "The metric"): `owner`, `not_here`,
    /// `learned`, `owner_failed`, `rebuilt` or `conflict` (a fixed set: never a value from a
    /// request).
    pub fn affinity(&self, result: &'static str) {
        self.affinity.with_label_values(&[result]).inc();
    }

    /// Retries and continuations since start, for the status page: the retry total, and the
    /// resume totals by result (`ok`, `rejected`, `diverged`, `failed`, `restarted`).
    pub fn rescue_totals(&self) -> (u64, [u64; 5]) {
        use prometheus::core::Collector;
        let sum = |v: &IntCounterVec, label: Option<&str>| -> u64 {
            v.collect()
                .iter()
                .flat_map(|mf| mf.get_metric())
                .filter(|m| {
                    label.is_none_or(|want| {
                        m.get_label()
                            .iter()
                            .any(|l| l.name() == "result" && l.value() == want)
                    })
                })
                .map(|m| m.get_counter().get_value() as u64)
                .sum()
        };
        let results = ["ok", "rejected", "diverged", "failed", "restarted"]
            .map(|r| sum(&self.resumes, Some(r)));
        (sum(&self.retries, None), results)
    }

    /// A request the gateway refused by itself (see the security guide); every one is counted,
    /// recorded or not.
    pub fn rejected(&self, reason: crate::error::Rejection) {
        self.rejected.with_label_values(&[reason.label()]).inc();
    }

    /// A WebSocket session opened (+1) or ended (-1) on `upstream`.
    pub fn websocket_sessions(&self, upstream: &str, delta: i64) {
        self.websocket_sessions
            .with_label_values(&[upstream])
            .add(delta);
    }

    /// One alert delivery.
    pub fn notification(&self, channel: &str, result: &str) {
        self.notifications
            .with_label_values(&[channel, result])
            .inc();
    }

    /// `openai_api_route_spans_dropped_total`, for the trace exporter (see the tracing guide).
    pub fn spans_dropped(&self) -> IntCounter {
        self.spans_dropped.clone()
    }
}
