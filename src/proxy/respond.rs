//! The committed answer: its response head towards the client, the capture that reads its text
//! for the record, and the relayed body that owns the ledger until the body ends.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use actix_web::HttpResponse;

use crate::capture::Capture;
use crate::headers;
use crate::ledger::Ledger;
use crate::registry::RegistryView;

use super::attempt::{is_sse, Upstreamed};
use super::relay::RelayBody;
use super::resume::{ResumePlan, Resumer};

/// The attempt whose answer goes to the client.
pub struct Committed<'a> {
    /// The registry view the candidates came from.
    pub view: &'a Arc<RegistryView>,
    /// The upstream's index in it.
    pub idx: usize,
    /// Attempt start to response head (and first chunk, for streams).
    pub first_byte: Duration,
    /// The gateway added `stream_options.include_usage` (4b): the usage-only chunk is not relayed.
    pub usage_added: bool,
    /// A `Retry-After` the relayed (failover-status) answer announced, as a cooldown (4a).
    pub cooldown: Option<Duration>,
    /// How to continue the stream if it breaks (4a `resume`), when it may be continued.
    pub resume: Option<ResumePlan>,
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
        cooldown,
        resume,
    } = at;
    let cfg = &view.config;
    let status = resp.status();
    ledger.commit(view, idx, status, first_byte, cooldown);

    // Borrowed from the upstream's head until the capture is built (no copies, no lower-cased
    // strings: each was one allocation per request).
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let sse = is_sse(&resp);
    let length = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());

    let mut builder = HttpResponse::build(status);
    for (name, value) in headers::response_headers(resp.headers()) {
        builder.append_header((name.clone(), value.clone()));
    }
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

    let encoding = resp
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok());
    // Without recording, the usage is still read: `openai_api_route_tokens_total` counts it.
    let capture = if ledger.recording() {
        Capture::new(content_type, encoding, cfg.record_body_bytes)
    } else {
        Capture::usage_only(content_type, encoding, cfg.record_body_bytes)
    };
    // A HEAD answer has a head only, whatever its Content-Length says (SPEC 4d).
    let head_request = ledger.info().method == actix_web::http::Method::HEAD;
    let no_body = head_request
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational();
    let chunked = resp
        .headers()
        .get(header::TRANSFER_ENCODING)
        .is_some_and(|v| {
            v.as_bytes()
                .windows(7)
                .any(|w| w.eq_ignore_ascii_case(b"chunked"))
        });
    let body = RelayBody::new(
        resp,
        first,
        cfg.idle_timeout,
        sse,
        (length, chunked),
        ledger,
        capture,
    );
    let body = match resume {
        Some(plan) if sse && status.is_success() => {
            body.with_resume(Resumer::new(plan, view.clone(), idx, usage_added))
        }
        _ if usage_added && sse => body.with_usage_filter(),
        _ => body,
    };
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
