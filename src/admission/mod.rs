//! Admission: the one step every `/v1/*` route takes before any upstream is tried (see the
//! security guide, "One admission for every route").
//!
//! The HTTP proxy, the model list and WebSocket upgrades each used to run their own checks, and
//! the second probe found a rule that held on one route but not another: a WebSocket upgrade to
//! `/v1/../x` reached the upstream with the operator's key, and a WebSocket self-loop ran 90
//! hops. Now each route calls [`admit`] first, which opens the request's ledger and runs the
//! common rules in one place — auth, the path rules ([`path`]), the `Via` loop guard — so a rule
//! added here holds on every route. Route-specific steps (the HTTP body, the WebSocket `model`
//! query) come after it, in the route.
//!
//! This module imports neither `proxy` nor `models`: both import it.

pub mod body;
pub mod member;
pub mod path;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use actix_web::http::header::{self, HeaderMap};
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};

use crate::config::{token_label, Config};
use crate::error::GatewayError;
use crate::headers::VIA;
use crate::ledger::{Ledger, RequestInfo};
use crate::state::AppState;

pub use self::body::preflight;
pub use self::path::path_problem;
pub use crate::escape::percent_decode;

/// A request admitted by the common rules: its ledger (with the client's token label) and the
/// config it was admitted under (the route's own steps read their limits from it).
pub struct Admitted {
    /// The request's ledger, opened here.
    pub ledger: Ledger,
    /// The config in force when the request arrived.
    pub config: Arc<Config>,
}

/// A request refused by admission: its ledger and why. Boxed where returned (a ledger is large
/// and refusals are the rare path).
pub struct Refusal {
    ledger: Ledger,
    error: GatewayError,
}

impl Refusal {
    fn new(ledger: Ledger, error: GatewayError) -> Box<Refusal> {
        Box::new(Refusal { ledger, error })
    }

    /// Answers the client; the ledger counts the refusal and records it (within the
    /// rejected-records bound).
    pub fn answer(self) -> HttpResponse {
        self.ledger.finish_local(self.error)
    }

    /// The ledger and the error, for a route that finishes refusals of its own the same way.
    pub fn into_parts(self) -> (Ledger, GatewayError) {
        (self.ledger, self.error)
    }
}

/// Whether a route's requests count toward a member's limits (`/v1/models` does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counting {
    /// Checked against the member's limits before anything else is read.
    Counted,
    /// Never counted nor refused by a limit.
    Free,
}

/// The common admission of every `/v1/*` route, in order: auth (401), the path rules (400), the
/// `Via` loop guard (508), and for a counted route the member's limits (429, before any body
/// is read: a request over a limit costs almost nothing). Nothing has gone upstream when it
/// returns.
pub fn admit(
    req: &HttpRequest,
    state: &web::Data<AppState>,
    counting: Counting,
) -> Result<Admitted, Box<Refusal>> {
    let config = state.config.get();
    let mut ledger = Ledger::open(state.sinks.clone(), request_info(req, &config));
    match authorize(req, &config) {
        Ok(who) => {
            let info = ledger.info_mut();
            info.client_key = who.label;
            if let Some(idx) = who.member {
                if let Some(m) = config.members.list.get(idx) {
                    ledger.member_is(idx, m);
                }
            }
        }
        Err(e) => return Err(Refusal::new(ledger, e)),
    }
    if let Some(why) = path_problem(req.uri().path()) {
        return Err(Refusal::new(ledger, GatewayError::BadRequest(why.into())));
    }
    let hops = via_hops(req.headers());
    if hops >= MAX_VIA_HOPS {
        return Err(Refusal::new(ledger, GatewayError::LoopDetected(hops)));
    }
    if counting == Counting::Counted {
        if let Err(e) = ledger.check_limits() {
            return Err(Refusal::new(ledger, e));
        }
    }
    Ok(Admitted { ledger, config })
}

/// A request that already passed through this many gateways is a loop (answered 508).
pub const MAX_VIA_HOPS: usize = 5;

/// How many times [`VIA`] appears in the request's `Via` headers.
pub fn via_hops(headers: &HeaderMap) -> usize {
    headers
        .get_all("via")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter(|hop| hop.trim().eq_ignore_ascii_case(VIA))
        .count()
}

/// What is known about a request before its body is read: its record's first columns. Every
/// field shares what the request already holds (the URI's and the header's bytes, the method);
/// nothing is copied or formatted here: the record's writer does that, off the request path.
pub fn request_info(req: &HttpRequest, cfg: &Config) -> RequestInfo {
    // A header lookup when the client sends none; parsed strictly when it does (see the tracing
    // guide).
    let (trace_parent, tracestate) = crate::trace::context::incoming(req.headers());
    RequestInfo {
        created_at: SystemTime::now(),
        started: Instant::now(),
        ip: client_ip(req, cfg),
        method: req.method().clone(),
        uri: req.uri().clone(),
        model: None,
        stream: false,
        facts: Default::default(),
        body: Bytes::new(),
        user_agent: req.headers().get(header::USER_AGENT).cloned(),
        client_key: None,
        member: None,
        body_limit: cfg.record_body_bytes,
        websocket: false,
        trace_parent,
        tracestate,
    }
}

/// The bearer token of a request, trimmed.
fn bearer(req: &HttpRequest) -> Option<&str> {
    let v = req
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let token = if v.len() >= 7 && v[..7].eq_ignore_ascii_case("bearer ") {
        &v[7..]
    } else {
        v
    };
    Some(token.trim())
}

/// Who sent a request: its member (an index into the config's `members`), and the record's
/// `client_key` label of its token.
pub struct Caller {
    /// The member, None with `-noauth`.
    pub member: Option<usize>,
    /// The token's non-secret label (shared with the config when the key is in it).
    pub label: Option<Arc<str>>,
}

/// Checks the client token: the member whose key it is, found by the token's SHA-256 digest and
/// compared in constant time (see the security guide).
pub fn authorize(req: &HttpRequest, cfg: &Config) -> Result<Caller, GatewayError> {
    let token = bearer(req).filter(|t| !t.is_empty());
    if cfg.noauth {
        return Ok(Caller {
            member: None,
            label: token.map(|t| token_label(t).into()),
        });
    }
    let Some(token) = token else {
        return Err(GatewayError::Unauthorized(
            "missing API key: send `Authorization: Bearer <token>`",
        ));
    };
    let digest = crate::config::digest(token);
    let Some((idx, member)) = cfg.members.by_digest(&digest) else {
        return Err(GatewayError::Unauthorized("incorrect API key provided"));
    };
    let label = match &member.label {
        Some(label) => label.clone(),
        None => token_label(token).into(),
    };
    Ok(Caller {
        member: Some(idx),
        label: Some(label),
    })
}

/// The client address: the peer, unless the peer is a trusted proxy that says otherwise.
pub fn client_ip(req: &HttpRequest, cfg: &Config) -> Option<IpAddr> {
    let peer = req.peer_addr()?.ip();
    if !cfg.is_trusted_proxy(peer) {
        return Some(peer);
    }
    // Walk X-Forwarded-For from the right: the first hop that is not a trusted proxy is the client.
    let xff: Vec<IpAddr> = req
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    if let Some(ip) = xff
        .iter()
        .rev()
        .find(|ip| !cfg.is_trusted_proxy(**ip))
        .or(xff.first())
    {
        return Some(*ip);
    }
    Some(
        req.headers()
            .get("x-real-ip")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<IpAddr>().ok())
            .unwrap_or(peer),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn via_counting() {
        let mut h = HeaderMap::new();
        h.append(
            header::VIA,
            header::HeaderValue::from_static(
                "1.1 openai-api-route, 1.1 other, 1.1 openai-api-route",
            ),
        );
        h.append(
            header::VIA,
            header::HeaderValue::from_static("1.1 openai-api-route"),
        );
        assert_eq!(via_hops(&h), 3);
    }
}

#[cfg(test)]
mod token_tests {
    use crate::config::token_label;

    /// The label as first written: collect the characters, then pick.
    fn reference(token: &str) -> String {
        let chars: Vec<char> = token.chars().collect();
        let n = chars.len();
        if n >= 16 {
            let head: String = chars[..3].iter().collect();
            let tail: String = chars[n - 4..].iter().collect();
            format!("{head}…{tail}")
        } else if n >= 8 {
            let tail: String = chars[n - 2..].iter().collect();
            format!("…{tail}")
        } else {
            "…".to_string()
        }
    }

    #[test]
    fn token_labels() {
        assert_eq!(token_label("sk-bench-client-token"), "sk-…oken");
        assert_eq!(token_label("abcdefgh"), "…gh");
        assert_eq!(token_label("short"), "…");
        assert_eq!(token_label(""), "…");
        for t in [
            "ключ-очень-длинный-токен",
            "é1234567890123456789ü",
            "日本語のトークンです。長いもの",
            "日本語のトーク",
            "日本語のトークンです",
            "🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑",
            "sk-1234567890abcdef",
            "exactly8",
            "fifteen-chars!!",
            "sixteen-chars!!!",
        ] {
            assert_eq!(token_label(t), reference(t), "{t}");
        }
    }
}
