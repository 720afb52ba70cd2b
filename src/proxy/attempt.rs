//! One upstream attempt over HTTP: the URL and headers, the send, the response head and (for
//! streams) the first event, each failure typed and classified for the policy
//! ([`classify_result`]). What to do about it is the engine's (`super::engine`).

use std::time::Duration;

use actix_web::http::header;
use actix_web::http::Method;
use actix_web::web::{Bytes, BytesMut};
use actix_web::HttpRequest;
use awc::error::SendRequestError;
use futures_util::StreamExt;

use crate::config::{ModelTimeout, Upstream, LONG_PROMPT_BYTES, LONG_PROMPT_MIN_WAIT};
use crate::failure::{is_failover_status, FailKind};
use crate::headers;
use crate::ledger::http_reason;
use crate::policy::{self, Outcome};
use crate::sse;
use crate::trace::Propagation;

use super::engine::{Attempt, Tried};
use super::plan::is_not_found;
use super::rescue;

/// How long an attempt may take to produce its head (and first chunk, for streams): the
/// upstream's timeouts, or a matching `model_timeouts` entry's (see the configuration guide).
pub fn first_byte_wait(
    up: &Upstream,
    over: Option<&ModelTimeout>,
    stream: bool,
    last: bool,
    body_len: usize,
) -> Duration {
    let timeout = over.and_then(|o| o.timeout).unwrap_or(up.timeout);
    let stream_timeout = over
        .and_then(|o| o.stream_timeout)
        .unwrap_or(up.stream_timeout);
    let mut wait = if stream && !last {
        stream_timeout
    } else if stream {
        // Nothing to fail over to: waiting longer can only help.
        timeout.max(stream_timeout)
    } else {
        timeout
    };
    if body_len > LONG_PROMPT_BYTES {
        wait = wait.max(LONG_PROMPT_MIN_WAIT);
    }
    wait
}

/// Why an attempt failed before an answer could be committed.
#[derive(Debug, Clone)]
pub struct AttemptError {
    /// Failure class.
    pub kind: FailKind,
    /// Human summary (may hold upstream text: an in-band error's message).
    pub reason: String,
    /// The gateway's own description, for the status page and spans.
    pub public: String,
    /// The same upstream may be tried again (see the rescue guide, `retries`): a connection
    /// closed or reset before complete headers; never a refused connection, a timeout or an
    /// ambiguous head.
    pub retry_same: bool,
}

impl AttemptError {
    /// A failure in the gateway's own words.
    pub fn new(kind: FailKind, reason: String) -> AttemptError {
        AttemptError {
            kind,
            public: reason.clone(),
            reason,
            retry_same: false,
        }
    }
}

/// Names what went wrong with a send, as an attempt failure.
pub fn classify(e: SendRequestError) -> AttemptError {
    match e {
        // A pooled connection the upstream closed as the request went out: closed before a
        // complete head, not refused.
        SendRequestError::Connect(awc::error::ConnectError::Disconnected) => AttemptError {
            retry_same: true,
            ..AttemptError::new(
                FailKind::Connect,
                "connection closed before a complete response head".into(),
            )
        },
        SendRequestError::Connect(c) => {
            AttemptError::new(FailKind::Connect, format!("connect failed: {c}"))
        }
        SendRequestError::Timeout => AttemptError::new(FailKind::Timeout, "timed out".into()),
        other => AttemptError {
            retry_same: true,
            ..AttemptError::new(
                FailKind::Connect,
                format!("connection closed before a complete response head: {other}"),
            )
        },
    }
}

/// The upstream's response, head read.
pub type Upstreamed = awc::ClientResponse;

/// The upstream's body alone, as the relay keeps it: the response head (its header map, a few
/// KiB) is not kept alive for as long as a stream lasts.
pub type UpstreamBody = actix_http::Payload<actix_http::BoxedPayloadStream>;

/// Takes the body out of an upstream response.
pub fn body_of(resp: &mut Upstreamed) -> UpstreamBody {
    use actix_web::HttpMessage;
    resp.take_payload()
}

/// One attempt: send, wait for the head, and for streams the first chunk too. A traced request
/// (`trace`) sends the attempt's own `traceparent` (see the tracing guide).
pub async fn attempt(
    client: &awc::Client,
    up: &Upstream,
    req: &HttpRequest,
    body: Bytes,
    stream: bool,
    trace: Option<Propagation>,
) -> Result<(Upstreamed, Option<Bytes>), AttemptError> {
    let mut creq = match up.origin.uri(req.uri()) {
        Some(uri) => client.request(req.method().clone(), uri),
        None => {
            let path = req.uri().path();
            let path = path.strip_prefix("/v1").unwrap_or(path);
            let query = req
                .uri()
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            client.request(req.method().clone(), format!("{}{path}{query}", up.base))
        }
    };
    // The body is relayed as it comes (`Accept-Encoding: identity` is set below); this also
    // keeps awc from building its own `Accept-Encoding` value for every request.
    creq = creq.no_decompress();
    headers::upstream_request_headers(req.headers(), &up.auth, creq.headers_mut());
    if let Some(t) = &trace {
        t.apply(creq.headers_mut());
    }
    if let Some(host) = up.origin.host() {
        creq.headers_mut().insert(header::HOST, host.clone());
    }
    let mut resp = if body.is_empty()
        && matches!(*req.method(), Method::GET | Method::HEAD | Method::DELETE)
    {
        creq.send().await
    } else {
        creq.send_body(body).await
    }
    .map_err(classify)?;
    if resp.headers().contains_key(header::TRANSFER_ENCODING)
        && resp.headers().contains_key(header::CONTENT_LENGTH)
    {
        // Two framings in one head: which one ends the body is ambiguous (see the security guide).
        return Err(AttemptError::new(
            FailKind::Connect,
            "response head has both Transfer-Encoding and Content-Length".into(),
        ));
    }
    if !stream || is_failover_status(resp.status()) {
        return Ok((resp, None));
    }
    let sse = is_sse(&resp);
    let first = if sse && resp.status().is_success() {
        first_event(&mut resp).await?
    } else {
        match resp.next().await {
            Some(Ok(chunk)) => Some(chunk),
            None => None,
            Some(Err(e)) => {
                return Err(AttemptError::new(
                    FailKind::Stream,
                    format!("stream broke before its first chunk: {e}"),
                ))
            }
        }
    };
    if first.is_none() {
        // An ended awc payload panics if polled again: the relay gets an empty one.
        use actix_web::HttpMessage;
        drop(resp.take_payload());
    }
    Ok((resp, first))
}

/// Whether the response is an SSE stream.
pub fn is_sse(resp: &Upstreamed) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| {
            let c = c.trim_start().as_bytes();
            let want = b"text/event-stream";
            c.len() >= want.len() && c[..want.len()].eq_ignore_ascii_case(want)
        })
}

/// The most read ahead while waiting for the first whole SSE event.
const FIRST_EVENT_MAX: usize = 64 << 10;

/// Reads an SSE stream up to its first event with content (see the rescue guide, "In-band
/// errors before commit"): an upstream whose first event is an error has failed the attempt,
/// and nothing of it is sent. A comment (`: …`) is a sign of life but not a first event. The one
/// SSE reader frames it; an upstream that ends events with single newlines is judged by its
/// first whole `data:` line instead of being waited on. Returns the bytes read so far, to be
/// relayed first.
async fn first_event(resp: &mut Upstreamed) -> Result<Option<Bytes>, AttemptError> {
    let mut held: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut reader = sse::Reader::new(FIRST_EVENT_MAX);
    loop {
        let chunk = match resp.next().await {
            Some(Ok(chunk)) => chunk,
            None => break,
            Some(Err(e)) => {
                return Err(AttemptError::new(
                    FailKind::Stream,
                    format!("stream broke before its first chunk: {e}"),
                ))
            }
        };
        match (&held, buf.is_empty()) {
            (None, true) => held = Some(chunk.clone()),
            _ => {
                if let Some(h) = held.take() {
                    buf.extend_from_slice(&h);
                }
                buf.extend_from_slice(&chunk);
            }
        }
        let mut verdict: Option<Result<(), String>> = None;
        reader.feed(&chunk, &mut |ev| {
            verdict = first_verdict(&ev);
            match verdict {
                Some(_) => sse::Flow::Stop,
                None => sse::Flow::Continue,
            }
        });
        if verdict.is_none() {
            verdict = reader.pending().and_then(|ev| first_verdict(&ev));
        }
        let seen = held.as_ref().map_or(buf.len(), Bytes::len);
        match verdict {
            Some(Err(message)) => {
                return Err(AttemptError {
                    public: "in-band error event before the first token".into(),
                    ..AttemptError::new(
                        FailKind::Stream,
                        format!("in-band error before the first token: {message}"),
                    )
                })
            }
            Some(Ok(())) => break,
            None if seen >= FIRST_EVENT_MAX => break,
            None => {}
        }
    }
    Ok(match held {
        Some(h) => Some(h),
        None if buf.is_empty() => None,
        None => Some(buf.freeze()),
    })
}

/// What a first event says: nothing yet (a comment or a blank line), fine, or an in-band error
/// with its message.
fn first_verdict(ev: &sse::Event<'_>) -> Option<Result<(), String>> {
    if !ev.substantive() {
        return None;
    }
    let p = ev.payload();
    Some(match ev.is_error(&p) {
        true => Err(ev.error_message(&p)),
        false => Ok(()),
    })
}

/// A duration as the failure reasons show it: `5s`, `0.250s`.
pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s:.3}s")
    }
}

/// What came back of an attempt (or its timeout), classified for the policy; a 400 whose body
/// could move it on (`failover_codes`) or say "not found" (see the affinity guide) is read first.
pub async fn classify_result(
    result: Result<Result<(Upstreamed, Option<Bytes>), AttemptError>, tokio::time::error::Elapsed>,
    a: &Attempt<'_>,
    stream: bool,
    failover_codes: &[String],
    t0: std::time::Instant,
) -> Tried<(Upstreamed, Option<Bytes>)> {
    match result {
        Ok(Ok((mut resp, mut first))) => {
            let status = resp.status();
            let code = status.as_u16();
            let mut failover_code = None;
            let mut not_found = code == 404;
            if policy::wants_400_body_pinned(code, a.last, !failover_codes.is_empty(), a.pin) {
                let left = a.wait.saturating_sub(t0.elapsed());
                let (body, whole) = rescue::read_head_of_body(&mut resp, first.take(), left).await;
                failover_code = whole
                    .then(|| rescue::failover_code(&body, failover_codes))
                    .flatten();
                not_found = whole && is_not_found(400, Some(&body));
                first = (!body.is_empty()).then_some(body);
            }
            let (reason, public) = match &failover_code {
                // e.g. context_length_exceeded: another upstream may fit it.
                Some(code) => (
                    format!("HTTP 400 {code}"),
                    "HTTP 400 (failover_codes)".to_string(),
                ),
                // A 2xx is relayed, never a failure's reason: no string for every success.
                None if status.is_success() => (String::new(), String::new()),
                None => {
                    let r = http_reason(code);
                    (r.clone(), r)
                }
            };
            let outcome = Outcome::Answered {
                status: code,
                failover_code: failover_code.is_some(),
                retry_after: rescue::retry_after(&resp, status),
                not_found,
            };
            Tried {
                outcome,
                answer: Some((resp, first)),
                kind: FailKind::Http,
                status: Some(code),
                reason,
                public,
                first_byte: t0.elapsed(),
            }
        }
        Ok(Err(e)) => Tried {
            first_byte: t0.elapsed(),
            ..Tried::failed(
                e.kind,
                Outcome::Failed {
                    retry_same: e.retry_same,
                },
                e.reason,
                e.public,
            )
        },
        Err(_) => {
            let what = if stream {
                "no first chunk"
            } else {
                "no response head"
            };
            let reason = format!("{what} within {}", secs(a.wait));
            Tried {
                first_byte: t0.elapsed(),
                ..Tried::failed(FailKind::Timeout, Outcome::TimedOut, reason.clone(), reason)
            }
        }
    }
}
