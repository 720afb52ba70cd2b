//! The HTTP request series (`openai_api_route_http_requests_total` and
//! `openai_api_route_http_requests_duration_seconds`, labels `endpoint`, `method`, `status`) with
//! bounded labels only (see the observability guide, "Metrics").
//!
//! Why our own middleware rather than actix-web-prom's series: actix-web-prom takes the `endpoint`
//! label from the route pattern (every proxied request would be `/v1/{tail}*`, so chat and
//! embeddings traffic could not be told apart) and the `method` label from the raw request method
//! (60,000 made-up methods made ~14 series each: memory ×10 and a 1 GB scrape). Neither can be
//! configured away, and re-routing every API family to get distinct patterns would put a regex per
//! family on the hot path. So this middleware labels requests itself, from fixed sets only:
//! - `/v1/*`: the API family ([`FAMILIES`]) read from the path's leading segments;
//! - other matched routes (`/`, `/healthz`, `/static/style.css`, `/v1/metrics`): their route
//!   pattern, which comes from our own code; unmatched paths: `UNKNOWN`;
//! - `method`: one of `GET POST PUT PATCH DELETE HEAD OPTIONS`, else `other`;
//! - `status`: the status sent when it is one of [`STATUSES`], else its class `1xx`…`5xx`
//!   (anything outside 100–599 is `5xx`): an upstream answering with made-up statuses adds at
//!   most five series per endpoint and method (version 0.3, see the security guide, "Second
//!   probe (0.3): limits"; before, 40,000 odd statuses made 26,893 series and a 17.9 s scrape).
//!
//! actix-web-prom still serves `/v1/metrics` (see [`crate::metrics::Metrics::http_middleware`]);
//! its own two series are renamed and never receive a sample, so they never appear and never clash.
//!
//! Cost per request: the label handles of every (endpoint, method, status) triple are created
//! once and cached in a fixed table, so a request does two atomic updates and no allocation; the
//! sample is taken when the response body is dropped (sent completely, or the client went away),
//! so a two-minute stream counts two minutes.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{forward_ready, Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::{Method, StatusCode};
use actix_web::web::Bytes;
use actix_web::Error;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

use crate::series::{LATENCY_BUCKETS, NAMESPACE};

/// The `endpoint` values of `/v1/*` requests, in order as the observability guide lists them
/// ("Metrics"; `other` last).
pub const FAMILIES: [&str; 10] = [
    "chat/completions",
    "completions",
    "embeddings",
    "responses",
    "audio",
    "images",
    "files",
    "models",
    "realtime",
    "other",
];

/// Route patterns outside the API families that get a cached label; `UNKNOWN` is every
/// unmatched path.
const ROUTES: [&str; 5] = [
    "/",
    "/healthz",
    "/static/style.css",
    "/v1/metrics",
    "UNKNOWN",
];
const UNKNOWN: usize = FAMILIES.len() + 4;
const METRICS_ROUTE: usize = FAMILIES.len() + 3;
const ENDPOINTS: usize = FAMILIES.len() + ROUTES.len();

/// The `method` label values; anything else is `other`.
pub const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other",
];

/// Statuses that are their own `status` label (see the observability guide, "Metrics"); every
/// other status is its class.
pub const STATUSES: [u16; 26] = [
    200, 201, 204, 206, 301, 302, 304, 400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 431,
    499, 500, 501, 502, 503, 504, 508,
];

/// The class labels, after [`STATUSES`] in the label table.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Number of distinct `status` label values.
const STATUS_LABELS: usize = STATUSES.len() + CLASSES.len();

/// The `status` label of a status code: itself when listed, else its class.
pub fn status_label(status: u16) -> &'static str {
    let i = status_index(status);
    STATUS_TEXT[i]
}

/// The label texts of [`STATUSES`] then [`CLASSES`].
const STATUS_TEXT: [&str; STATUS_LABELS] = [
    "200", "201", "204", "206", "301", "302", "304", "400", "401", "403", "404", "405", "408",
    "409", "413", "415", "422", "429", "431", "499", "500", "501", "502", "503", "504", "508",
    "1xx", "2xx", "3xx", "4xx", "5xx",
];

fn status_index(status: u16) -> usize {
    match STATUSES.binary_search(&status) {
        Ok(i) => i,
        Err(_) => {
            let class = match status {
                100..=599 => usize::from(status / 100 - 1),
                _ => 4,
            };
            STATUSES.len() + class
        }
    }
}

/// The API family of a request path (`/v1/chat/completions` → `chat/completions`); a path
/// outside `/v1/` or of no known family is `other`.
pub fn family(path: &str) -> &'static str {
    FAMILIES[family_index(path)]
}

fn family_index(path: &str) -> usize {
    let Some(tail) = path.strip_prefix("/v1/") else {
        return FAMILIES.len() - 1;
    };
    let mut segs = tail.split('/');
    match segs.next().unwrap_or("") {
        "chat" if segs.next() == Some("completions") => 0,
        "completions" => 1,
        "embeddings" => 2,
        "responses" => 3,
        "audio" => 4,
        "images" => 5,
        "files" => 6,
        "models" => 7,
        "realtime" => 8,
        _ => 9,
    }
}

/// The bounded `method` label of a request method.
pub fn method_label(m: &Method) -> &'static str {
    METHODS[method_index(m)]
}

fn method_index(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::PATCH => 3,
        Method::DELETE => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

type Handles = (IntCounter, Histogram);

/// The two series and the cache of their label handles; cheap to clone.
#[derive(Clone)]
pub struct HttpMetrics(Arc<Series>);

struct Series {
    total: IntCounterVec,
    duration: HistogramVec,
    cache: Box<[OnceLock<Handles>]>,
}

impl HttpMetrics {
    /// Registers `openai_api_route_http_requests_total` and
    /// `openai_api_route_http_requests_duration_seconds` in `registry`.
    pub fn new(registry: &Registry) -> Result<HttpMetrics, prometheus::Error> {
        let labels = ["endpoint", "method", "status"];
        let total = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests answered").namespace(NAMESPACE),
            &labels,
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "http_requests_duration_seconds",
                "HTTP request start to the end of its response body",
            )
            .namespace(NAMESPACE)
            .buckets(LATENCY_BUCKETS.to_vec()),
            &labels,
        )?;
        registry.register(Box::new(total.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        let cache = (0..ENDPOINTS * METHODS.len() * STATUS_LABELS)
            .map(|_| OnceLock::new())
            .collect();
        Ok(HttpMetrics(Arc::new(Series {
            total,
            duration,
            cache,
        })))
    }

    fn handles(&self, endpoint: Endpoint, method: usize, status: StatusCode) -> Handles {
        let s = &self.0;
        let si = status_index(status.as_u16());
        let make = |endpoint: &str| {
            let labels = [endpoint, METHODS[method], STATUS_TEXT[si]];
            (
                s.total.with_label_values(&labels),
                s.duration.with_label_values(&labels),
            )
        };
        match endpoint {
            Endpoint::Fixed(e) => {
                let label = if e < FAMILIES.len() {
                    FAMILIES[e]
                } else {
                    ROUTES[e - FAMILIES.len()]
                };
                let slot = (e * METHODS.len() + method) * STATUS_LABELS + si;
                s.cache[slot].get_or_init(|| make(label)).clone()
            }
            Endpoint::Pattern(p) => make(&p),
        }
    }
}

/// Where a request's `endpoint` label comes from.
enum Endpoint {
    /// An index into [`FAMILIES`] then [`ROUTES`].
    Fixed(usize),
    /// A route pattern of our own that is not in [`ROUTES`] (rare: a route added later).
    Pattern(String),
}

/// Decided before the request runs where possible: a `/v1/*` path needs no routing result.
#[derive(Clone, Copy)]
enum Early {
    Known(usize),
    AfterRouting,
}

fn early(req: &ServiceRequest) -> Early {
    let path = req.path();
    if path == "/v1/metrics" && req.method() == Method::GET {
        Early::Known(METRICS_ROUTE)
    } else if path.starts_with("/v1/") {
        Early::Known(family_index(path))
    } else {
        Early::AfterRouting
    }
}

fn after_routing(req: &actix_web::HttpRequest) -> Endpoint {
    match req.match_pattern() {
        None => Endpoint::Fixed(UNKNOWN),
        Some(p) => match ROUTES[..ROUTES.len() - 1].iter().position(|r| *r == p) {
            Some(i) => Endpoint::Fixed(FAMILIES.len() + i),
            None => Endpoint::Pattern(p),
        },
    }
}

impl<S, B> Transform<S, ServiceRequest> for HttpMetrics
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error>,
    B: MessageBody + Unpin,
{
    type Response = ServiceResponse<MeteredBody<B>>;
    type Error = Error;
    type Transform = HttpMetricsService<S>;
    type InitError = ();
    type Future = std::future::Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        std::future::ready(Ok(HttpMetricsService {
            service,
            metrics: self.clone(),
        }))
    }
}

/// The middleware service (see [`HttpMetrics`]).
pub struct HttpMetricsService<S> {
    service: S,
    metrics: HttpMetrics,
}

impl<S, B> Service<ServiceRequest> for HttpMetricsService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error>,
    B: MessageBody + Unpin,
{
    type Response = ServiceResponse<MeteredBody<B>>;
    type Error = Error;
    type Future = Metered<S::Future>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let early = early(&req);
        let method = method_index(req.method());
        Metered {
            fut: self.service.call(req),
            metrics: self.metrics.clone(),
            early,
            method,
            start: Instant::now(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's future; labels the response when it is ready.
    pub struct Metered<F> {
        #[pin]
        fut: F,
        metrics: HttpMetrics,
        early: Early,
        method: usize,
        start: Instant,
    }
}

impl<F, B> Future for Metered<F>
where
    F: Future<Output = Result<ServiceResponse<B>, Error>>,
    B: MessageBody + Unpin,
{
    type Output = Result<ServiceResponse<MeteredBody<B>>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.fut.poll(cx));
        let metrics = &*this.metrics;
        let endpoint = |req: &actix_web::HttpRequest| match *this.early {
            Early::Known(i) => Endpoint::Fixed(i),
            Early::AfterRouting => after_routing(req),
        };
        Poll::Ready(match result {
            Ok(res) => {
                let handles = metrics.handles(endpoint(res.request()), *this.method, res.status());
                let start = *this.start;
                Ok(res.map_body(move |_, body| MeteredBody {
                    body,
                    handles: Some(handles),
                    start,
                }))
            }
            Err(e) => {
                // The error becomes a response further out; count it with the status it will get.
                let status = e.as_response_error().status_code();
                let ep = match *this.early {
                    Early::Known(i) => Endpoint::Fixed(i),
                    Early::AfterRouting => Endpoint::Fixed(UNKNOWN),
                };
                let (total, duration) = metrics.handles(ep, *this.method, status);
                total.inc();
                duration.observe(this.start.elapsed().as_secs_f64());
                Err(e)
            }
        })
    }
}

/// A response body that records its request's sample when it is dropped: after the last byte,
/// or when the client went away.
pub struct MeteredBody<B> {
    body: B,
    handles: Option<Handles>,
    start: Instant,
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        if let Some((total, duration)) = self.handles.take() {
            total.inc();
            duration.observe(self.start.elapsed().as_secs_f64());
        }
    }
}

impl<B: MessageBody + Unpin> MessageBody for MeteredBody<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_from_paths() {
        for (path, fam) in [
            ("/v1/chat/completions", "chat/completions"),
            ("/v1/chat/completions/abc/messages", "chat/completions"),
            ("/v1/chat/other", "other"),
            ("/v1/chat", "other"),
            ("/v1/completions", "completions"),
            ("/v1/embeddings", "embeddings"),
            ("/v1/responses/resp_1/cancel", "responses"),
            ("/v1/audio/transcriptions", "audio"),
            ("/v1/images/generations", "images"),
            ("/v1/files/file-1/content", "files"),
            ("/v1/models", "models"),
            ("/v1/models/gpt-4o", "models"),
            ("/v1/realtime", "realtime"),
            ("/v1/x", "other"),
            ("/v1/", "other"),
            ("/v1/Chat/Completions", "other"),
            ("/elsewhere", "other"),
        ] {
            assert_eq!(family(path), fam, "{path}");
        }
    }

    #[test]
    fn methods_are_bounded() {
        assert_eq!(method_label(&Method::POST), "POST");
        assert_eq!(method_label(&Method::OPTIONS), "OPTIONS");
        assert_eq!(method_label(&Method::CONNECT), "other");
        assert_eq!(method_label(&Method::TRACE), "other");
        let made_up = Method::from_bytes(b"M1XXXX").unwrap();
        assert_eq!(method_label(&made_up), "other");
    }

    #[test]
    fn statuses_are_sorted_and_labelled() {
        assert!(STATUSES.windows(2).all(|w| w[0] < w[1]));
        for (i, s) in STATUSES.iter().enumerate() {
            assert_eq!(STATUS_TEXT[i], s.to_string());
            assert_eq!(status_label(*s), s.to_string());
        }
        for (s, want) in [
            (101, "1xx"),
            (202, "2xx"),
            (230, "2xx"),
            (307, "3xx"),
            (418, "4xx"),
            (460, "4xx"),
            (498, "4xx"),
            (505, "5xx"),
            (599, "5xx"),
            (600, "5xx"),
            (999, "5xx"),
            (42, "5xx"),
        ] {
            assert_eq!(status_label(s), want, "{s}");
        }
    }

    #[test]
    fn same_triple_same_series() {
        let registry = Registry::new();
        let m = HttpMetrics::new(&registry).unwrap();
        for _ in 0..3 {
            let (c, _) = m.handles(Endpoint::Fixed(0), 7, StatusCode::OK);
            c.inc();
        }
        let (c, _) = m.handles(Endpoint::Fixed(0), 7, StatusCode::IM_A_TEAPOT);
        c.inc();
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(text.contains(
            "openai_api_route_http_requests_total{endpoint=\"chat/completions\",method=\"other\",status=\"200\"} 3"
        ), "{text}");
        assert!(text.contains("status=\"4xx\"} 1"), "{text}");
    }
}
