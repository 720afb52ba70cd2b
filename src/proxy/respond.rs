//! The committed answer: its response head towards the client, the capture that reads its text
//! for the record, and the relayed body that owns the ledger until the body ends.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::web::Bytes;
use actix_web::HttpResponse;

use crate::affinity::refs;
use crate::capture::objects::ObjectWatch;
use crate::capture::Capture;
use crate::headers;
use crate::ledger::{Ledger, Verdict};
use crate::policy::{self, Counts};
use crate::registry::RegistryView;

use super::attempt::{is_sse, Upstreamed};
use super::continuation::ResumePlan;
use super::ends::Protocol;
use super::relay::{RelayBody, Setup};
use super::resume::Resumer;

/// The attempt whose answer goes to the client.
pub struct Committed<'a> {
    /// The registry view the candidates came from.
    pub view: &'a Arc<RegistryView>,
    /// The upstream's index in it.
    pub idx: usize,
    /// Attempt start to response head (and first chunk, for streams).
    pub first_byte: Duration,
    /// The gateway added `stream_options.include_usage` (`force_usage`): the usage-only chunk is
    /// not relayed.
    pub usage_added: bool,
    /// How the answer counts for its upstream.
    pub verdict: Verdict,
    /// How to continue the stream if it breaks (`resume`), when it may be continued.
    pub resume: Option<ResumePlan>,
    /// The body was read and rewritten (a member's own list): its length; `first` holds it.
    pub replaced: Option<u64>,
}

/// Sends the committed answer to the client, streaming; from here the relayed body owns the
/// ledger and finishes it when the body ends.
pub fn respond(
    mut ledger: Ledger,
    at: Committed<'_>,
    resp: Upstreamed,
    first: Option<Bytes>,
) -> HttpResponse {
    let Committed {
        view,
        idx,
        first_byte,
        usage_added,
        verdict,
        resume,
        replaced,
    } = at;
    let cfg = &view.config;
    let status = resp.status();
    ledger.commit(view, idx, status, first_byte, verdict);
    // The last candidate's failure (or "not here" everywhere), relayed after every candidate
    // was tried.
    let all_tried = matches!(
        verdict,
        Verdict::Failure { .. }
            | Verdict::Neutral {
                counts: Counts::Record
            }
    );
    let upstream_id = resp.headers().get("x-request-id");
    if let Some(id) = upstream_id {
        ledger.upstream_request_id(id);
    }

    // Borrowed from the upstream's head until the capture is built (no copies, no lower-cased
    // strings: each was one allocation per request).
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let sse = is_sse(&resp);
    let length = replaced.or_else(|| {
        resp.headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    });

    let mut builder = HttpResponse::build(status);
    // A member with its own limits is told about them, not about the shared account's.
    let own_limits = ledger.has_rate_limits();
    for (name, value) in headers::response_headers(resp.headers()) {
        if own_limits && name.as_str().starts_with("x-ratelimit-") {
            continue;
        }
        builder.append_header((name.clone(), value.clone()));
    }
    // Appended: the upstream's `x-ratelimit-*` were left out above.
    ledger.each_rate_header(|name, value| {
        builder.append_header((name, value));
    });
    builder.insert_header((
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    ));
    if let Some(up) = cfg.upstreams.get(idx) {
        if let Some(v) = headers::upstream_name_value(&up.name) {
            builder.insert_header((HeaderName::from_static("x-upstream"), v));
        }
    }
    builder.insert_header((
        HeaderName::from_static("x-upstream-attempts"),
        headers::count_value(ledger.attempts()),
    ));
    if sse {
        builder.insert_header((
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        ));
    }
    if upstream_id.is_none() {
        builder.insert_header((
            HeaderName::from_static("x-request-id"),
            ledger.request_id().clone(),
        ));
    }
    if all_tried {
        // See the rescue guide, "A client's own retry where it helps (0.4)": an SDK retries what it
        // would retry against the upstream directly, and never starts a second round over every
        // candidate.
        let own = super::rescue::retry_after(&resp, status).map(|d| d.as_secs_f64());
        match policy::client_retry(status.as_u16(), own) {
            policy::ClientRetry::No => {
                builder.insert_header(should_retry(false));
            }
            policy::ClientRetry::After(upstream_secs) => {
                builder.insert_header(should_retry(true));
                let secs = upstream_secs
                    .or_else(|| ledger.first_cooldown_end(view).map(ceil_secs))
                    .unwrap_or(1)
                    .max(1);
                builder.insert_header((header::RETRY_AFTER, headers::count_value(secs)));
            }
        }
    }
    // A chat, completions or Responses stream is whole only at its protocol's end (see the rescue
    // guide, "Truthful ends (0.3)").
    let protocol = (sse && status.is_success())
        .then(|| Protocol::of_path(ledger.info().path()))
        .flatten();

    let encoding = resp
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok());
    // Without recording, the usage is still read: `openai_api_route_tokens_total` counts it. A
    // member with a token limit needs the text too: without a reported usage, its bytes count.
    let mut capture = if ledger.recording() {
        // A whole JSON reply's text is read by the record writer, off this path.
        let mut c = Capture::new(content_type, encoding, cfg.record_body_bytes);
        c.defer_json();
        c
    } else if ledger.counts_text() {
        Capture::usage_or_text(content_type, encoding, cfg.record_body_bytes)
    } else {
        Capture::usage_only(content_type, encoding, cfg.record_body_bytes)
    };
    if ledger.traced() {
        // The trace's `gen_ai.response.model` (see the tracing guide).
        capture.watch_model();
    }
    // The object a 2xx answer creates is owned by this upstream from its first read (see the
    // affinity guide, "What is pinned").
    if let (true, Some(up)) = (status.is_success(), cfg.upstreams.get(idx)) {
        if let Some(w) = object_watch(&ledger, &up.name, cfg.record_body_bytes) {
            capture.watch_objects(w);
        }
    }
    // A HEAD answer has a head only, whatever its Content-Length says (see the observability
    // guide, "Routes").
    let head_request = ledger.info().method == actix_web::http::Method::HEAD;
    let no_body = head_request
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational();
    let chunked = replaced.is_none()
        && resp
            .headers()
            .get(header::TRANSFER_ENCODING)
            .is_some_and(|v| {
                v.as_bytes()
                    .windows(7)
                    .any(|w| w.eq_ignore_ascii_case(b"chunked"))
            });
    let resumer = match resume {
        Some(plan) if sse && status.is_success() => {
            Some(Resumer::new(plan, view.clone(), idx, usage_added))
        }
        _ => None,
    };
    let setup = Setup {
        first,
        idle: cfg.idle_timeout,
        sse,
        framing: (length, chunked),
        protocol,
        hide_usage: usage_added,
        resumer,
        line_max: capture_bound(cfg.record_body_bytes),
    };
    let body = RelayBody::new(resp, setup, ledger, capture);
    if no_body {
        body.finish_empty();
        if let (true, Some(len)) = (head_request, length) {
            builder.no_chunking(len);
        }
        return builder.finish();
    }
    match length {
        Some(len) if !sse => builder.body(actix_web::body::SizedStream::new(len, body)),
        _ => builder.streaming(body),
    }
}

/// `x-should-retry`, which the official SDKs obey instead of their own rules.
pub fn should_retry(yes: bool) -> (HeaderName, HeaderValue) {
    let v = if yes { "true" } else { "false" };
    (
        HeaderName::from_static("x-should-retry"),
        HeaderValue::from_static(v),
    )
}

/// Whole seconds, rounded up (a `Retry-After` of 0 would invite the client back too early).
fn ceil_secs(d: Duration) -> u32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
}

/// A watch for the id of the object this request creates, when it creates one (a `POST` to an
/// owning path answered 2xx by `upstream`): the id becomes `upstream`'s the moment it is read,
/// unless another upstream owns it already (the first owner wins; the conflict is logged and
/// counted). See the affinity guide, "Owners".
fn object_watch(ledger: &Ledger, upstream: &Arc<str>, limit: usize) -> Option<ObjectWatch> {
    let info = ledger.info();
    let path = info.uri.path();
    if info.method != Method::POST || !refs::creates_object(path, info.facts.store) {
        return None;
    }
    let sinks = ledger.sinks().clone();
    let up = upstream.clone();
    let member = ledger.info().member.clone();
    let want_output = path.trim_end_matches('/') == "/v1/responses";
    let on_id = move |id: &str| {
        if let Err(first) = sinks.owners.learn_for(id, &up, member.as_ref()) {
            sinks.metrics.affinity("conflict");
            log::warn!(
                "upstream {up} answered a create with id {:?}, which upstream {first} owns; the first owner keeps it",
                crate::escape::untrusted(id)
            );
        }
    };
    Some(ObjectWatch::new(Box::new(on_id), want_output, limit))
}

/// The longest SSE line read whole: the capture's own bound (see the security guide).
fn capture_bound(record_body_bytes: usize) -> usize {
    match record_body_bytes {
        0 => crate::capture::UNLIMITED_CAPTURE,
        n => n + crate::capture::SLACK,
    }
}
