//! Errors the gateway itself answers with, mapped to HTTP and OpenAI-style JSON in one place.
//!
//! Clients are OpenAI SDKs: they read `error.message`, `error.type` and `error.code`, so every
//! locally generated error uses that shape and every `/v1/*` answer carries CORS.

use actix_web::http::{header, StatusCode};
use actix_web::HttpResponse;

use serde::Serialize;

/// A request the gateway answers without (or after failing to get) an upstream answer.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Missing or wrong client token.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Body over `max_body_bytes`.
    #[error("request body is larger than the gateway's limit of {0} bytes")]
    BodyTooLarge(usize),
    /// The client's body could not be read.
    #[error("could not read the request body: {0}")]
    BadBody(String),
    /// The request is malformed in a way the gateway refuses to forward (see the security guide).
    #[error("{0}")]
    BadRequest(String),
    /// A WebSocket upgrade without a valid handshake (see the observability guide, "Realtime API
    /// (WebSocket)").
    #[error("not a valid WebSocket handshake: {0}")]
    BadHandshake(String),
    /// The body did not arrive within `body_timeout`.
    #[error("the request body did not arrive within {0}s (body_timeout)")]
    BodyTimeout(u64),
    /// The request has passed through this gateway too often: a loop of chained gateways.
    #[error("request loop detected: it has already passed through openai-api-route {0} times")]
    LoopDetected(usize),
    /// No upstream's allow/deny admits the model.
    #[error("model {0:?} is not served by any configured upstream")]
    NoUpstreamForModel(String),
    /// Every candidate failed without an HTTP answer; the text lists `name: reason` per attempt.
    #[error("all upstreams failed: {summary}")]
    AllFailed {
        /// Whether the last failure was a timeout (504) rather than a connection problem (502).
        timed_out: bool,
        /// `name: reason; name: reason`.
        summary: String,
    },
    /// A WebSocket handshake beyond `realtime_max_sessions` or `realtime_max_sessions_per_token`
    /// (see the security guide, "Second probe (0.3): limits"); the text names which.
    #[error("{0}")]
    TooManySessions(&'static str),
    /// Something inside the gateway broke (an actor went away).
    #[error("internal gateway error: {0}")]
    Internal(&'static str),
    /// The request refers to objects that live on two different upstreams (see the affinity
    /// guide, "How a request is routed").
    #[error("{0}")]
    ObjectConflict(String),
    /// The only upstream holding the object the request refers to failed (see the affinity guide,
    /// "How a request is routed"); `status` is its failure's HTTP status, else 502 (or 504 after a
    /// timeout).
    #[error("{message}")]
    OwnerFailed {
        /// Status sent to the client.
        status: u16,
        /// Names the object, its owner and what the owner's attempt came to.
        message: String,
    },
    /// A member over one of its limits (see the members guide).
    #[error("Rate limit reached for {member}: {}. Try again in {}s.", limit_text(.limited), .limited.retry_after.as_secs())]
    RateLimited {
        /// The member's name.
        member: std::sync::Arc<str>,
        /// Which limit, and when the member would be admitted.
        limited: crate::member_limits::Limited,
    },
    /// A model the member may not use.
    #[error("model {0:?} is not available to this key")]
    ModelNotAllowed(String),
    /// An object of another member, or one the gateway has not seen created, named by a
    /// member that sees only its own (see the members guide, "Objects").
    #[error("No such object: {0}")]
    NoSuchObject(String),
}

/// How a limit reads in a 429's message: `60 requests per minute`.
fn limit_text(l: &crate::member_limits::Limited) -> String {
    use crate::member_limits::Limit;
    let what = match l.limit {
        Limit::Rpm => "requests per minute",
        Limit::Tpm => "tokens per minute",
        Limit::TokensPerDay => "tokens per day",
        Limit::Concurrent => "requests at a time",
    };
    format!("{} {what}", l.value)
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'a str,
    code: &'a str,
}

impl GatewayError {
    /// The status code sent to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BadBody(_)
            | GatewayError::BadRequest(_)
            | GatewayError::BadHandshake(_) => StatusCode::BAD_REQUEST,
            GatewayError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            GatewayError::LoopDetected(_) => StatusCode::LOOP_DETECTED,
            GatewayError::NoUpstreamForModel(_) => StatusCode::NOT_FOUND,
            GatewayError::AllFailed {
                timed_out: true, ..
            } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::AllFailed {
                timed_out: false, ..
            } => StatusCode::BAD_GATEWAY,
            GatewayError::TooManySessions(_) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::ObjectConflict(_) => StatusCode::CONFLICT,
            GatewayError::OwnerFailed { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            GatewayError::NoSuchObject(_) => StatusCode::NOT_FOUND,
        }
    }

    fn kind_and_code(&self) -> (&'static str, &'static str) {
        match self {
            GatewayError::Unauthorized(_) => ("invalid_request_error", "invalid_api_key"),
            GatewayError::BodyTooLarge(_) => ("invalid_request_error", "request_too_large"),
            GatewayError::BadBody(_) => ("invalid_request_error", "invalid_body"),
            GatewayError::BadRequest(_) => ("invalid_request_error", "invalid_request"),
            GatewayError::BadHandshake(_) => {
                ("invalid_request_error", "invalid_websocket_handshake")
            }
            GatewayError::BodyTimeout(_) => ("invalid_request_error", "request_timeout"),
            GatewayError::LoopDetected(_) => ("invalid_request_error", "loop_detected"),
            GatewayError::NoUpstreamForModel(_) => ("invalid_request_error", "model_not_found"),
            GatewayError::AllFailed {
                timed_out: true, ..
            } => ("upstream_error", "upstream_timeout"),
            GatewayError::AllFailed {
                timed_out: false, ..
            } => ("upstream_error", "upstream_unavailable"),
            GatewayError::TooManySessions(_) => ("rate_limit_error", "too_many_sessions"),
            GatewayError::Internal(_) => ("server_error", "internal_error"),
            GatewayError::ObjectConflict(_) => ("invalid_request_error", "object_conflict"),
            GatewayError::OwnerFailed { .. } => ("upstream_error", "owner_failed"),
            GatewayError::RateLimited { limited, .. } => {
                (limited.limit.kind(), "rate_limit_exceeded")
            }
            GatewayError::ModelNotAllowed(_) => ("invalid_request_error", "model_not_allowed"),
            GatewayError::NoSuchObject(_) => ("invalid_request_error", "not_found"),
        }
    }

    /// Why the gateway refused the request by itself, for `openai_api_route_rejected_total`;
    /// None for the answers that come after trying upstreams (or from inside the gateway).
    pub fn rejection(&self) -> Option<Rejection> {
        Some(match self {
            GatewayError::Unauthorized(_) => Rejection::Auth,
            GatewayError::BodyTooLarge(_) => Rejection::TooLarge,
            GatewayError::BadBody(_)
            | GatewayError::BadRequest(_)
            | GatewayError::BadHandshake(_) => Rejection::BadRequest,
            GatewayError::NoUpstreamForModel(_) => Rejection::NotFound,
            GatewayError::BodyTimeout(_) => Rejection::Timeout,
            GatewayError::LoopDetected(_) => Rejection::Loop,
            GatewayError::RateLimited { .. } => Rejection::RateLimited,
            GatewayError::ModelNotAllowed(_) => Rejection::Forbidden,
            GatewayError::NoSuchObject(_) => Rejection::NotFound,
            GatewayError::AllFailed { .. }
            | GatewayError::TooManySessions(_)
            | GatewayError::Internal(_)
            | GatewayError::ObjectConflict(_)
            | GatewayError::OwnerFailed { .. } => return None,
        })
    }

    /// An answer given after every candidate the request may go to was tried (the client must not
    /// try them all again: see the rescue guide, "Truthful ends (0.3)").
    pub fn after_every_candidate(&self) -> bool {
        match self {
            GatewayError::AllFailed { .. } => true,
            GatewayError::OwnerFailed { .. } => self.retry_after().is_none(),
            _ => false,
        }
    }

    /// Seconds a client should wait before it tries again, when it should (`x-should-retry:
    /// true` with this `Retry-After`): the owner's 429, 503 or 408, which a direct call would
    /// have retried too (see the rescue guide, "A client's own retry where it helps (0.4)").
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            GatewayError::OwnerFailed {
                status: 429 | 503 | 408,
                ..
            } => Some(1),
            GatewayError::RateLimited { limited, .. } => {
                Some(u32::try_from(limited.retry_after.as_secs().max(1)).unwrap_or(u32::MAX))
            }
            _ => None,
        }
    }

    /// The JSON body text (also what the record keeps as the reply).
    pub fn body(&self) -> String {
        let (kind, code) = self.kind_and_code();
        let with_param = matches!(
            self,
            GatewayError::RateLimited { .. } | GatewayError::NoSuchObject(_)
        );
        let body = Body {
            error: Detail {
                message: self.to_string(),
                kind,
                code,
            },
        };
        if with_param {
            let v = serde_json::json!({"error": {"message": body.error.message, "type": kind, "param": null, "code": code}});
            return v.to_string();
        }
        serde_json::to_string(&body).unwrap_or_else(|_| String::from("{\"error\":{}}"))
    }

    /// The full response. A body that never finished arriving closes the connection: what is
    /// left of it on the socket cannot be told from the next request.
    pub fn response(&self) -> HttpResponse {
        let mut b = HttpResponse::build(self.status());
        if matches!(self, GatewayError::BodyTimeout(_)) {
            b.force_close();
        }
        b.insert_header((header::CONTENT_TYPE, "application/json"))
            .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
            .body(self.body())
    }
}

/// Why the gateway answered a request itself; the `reason` label of
/// `openai_api_route_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// 401.
    Auth,
    /// 400.
    BadRequest,
    /// 404.
    NotFound,
    /// 405.
    Method,
    /// 408.
    Timeout,
    /// 413.
    TooLarge,
    /// 431.
    Headers,
    /// 508.
    Loop,
    /// 429: a member over one of its limits.
    RateLimited,
    /// 403: a model the member may not use.
    Forbidden,
}

impl Rejection {
    /// Every reason, for registering the series up front.
    pub const ALL: [Rejection; 10] = [
        Rejection::Auth,
        Rejection::BadRequest,
        Rejection::NotFound,
        Rejection::Method,
        Rejection::Timeout,
        Rejection::TooLarge,
        Rejection::Headers,
        Rejection::Loop,
        Rejection::RateLimited,
        Rejection::Forbidden,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Auth => "auth",
            Rejection::BadRequest => "bad_request",
            Rejection::NotFound => "not_found",
            Rejection::Method => "method",
            Rejection::Timeout => "timeout",
            Rejection::TooLarge => "too_large",
            Rejection::Headers => "headers",
            Rejection::Loop => "loop",
            Rejection::RateLimited => "rate_limited",
            Rejection::Forbidden => "forbidden",
        }
    }
}
