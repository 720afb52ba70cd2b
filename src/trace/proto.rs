//! The OTLP `ExportTraceServiceRequest` protobuf encoding of finished spans (opentelemetry-proto's
//! `collector/trace/v1`, `trace/v1`, `common/v1`, `resource/v1` messages), written by hand: the
//! exporter needs only these few messages one way, and a hundred lines here cost no dependency,
//! no build script and no generated code in the binary. The tests decode the output with the
//! `opentelemetry-proto` crate's own types.

use super::{AttemptSpan, Finished, ServerSpan};

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;

/// OTLP `Span.SpanKind`.
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
/// OTLP `Status.StatusCode`.
const STATUS_ERROR: u64 = 2;

fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn tag(buf: &mut Vec<u8>, field: u32, wire: u8) {
    varint(buf, u64::from(field) << 3 | u64::from(wire));
}

fn bytes(buf: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(buf, field, LEN);
    varint(buf, b.len() as u64);
    buf.extend_from_slice(b);
}

fn uint(buf: &mut Vec<u8>, field: u32, v: u64) {
    tag(buf, field, VARINT);
    varint(buf, v);
}

fn fixed64(buf: &mut Vec<u8>, field: u32, v: u64) {
    tag(buf, field, FIXED64);
    buf.extend_from_slice(&v.to_le_bytes());
}

/// A nested message: written to `buf` after its length, which is known once it is built.
fn message(buf: &mut Vec<u8>, field: u32, build: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    build(&mut inner);
    bytes(buf, field, &inner);
}

/// An attribute value (`AnyValue`).
enum Value<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
    StrList(&'a [&'a str]),
}

/// Bytes of `v` as a varint.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// `KeyValue { key = 1; AnyValue value = 2 }`, `AnyValue { string = 1; bool = 2; int = 3; array = 5 }`.
/// Scalars are written straight into `buf` (their lengths are computed, not built): the
/// attributes are most of a span, and this keeps encoding free of a buffer per attribute.
fn attr(buf: &mut Vec<u8>, field: u32, key: &str, value: Value<'_>) {
    let any_len = match &value {
        Value::Str(s) => 1 + varint_len(s.len() as u64) + s.len(),
        Value::Bool(_) => 2,
        Value::Int(i) => 1 + varint_len(*i as u64),
        Value::StrList(_) => 0,
    };
    if any_len > 0 {
        let kv_len = 1 + varint_len(key.len() as u64) + key.len() + 1 + varint_len(any_len as u64);
        tag(buf, field, LEN);
        varint(buf, (kv_len + any_len) as u64);
        bytes(buf, 1, key.as_bytes());
        tag(buf, 2, LEN);
        varint(buf, any_len as u64);
        match value {
            Value::Str(s) => bytes(buf, 1, s.as_bytes()),
            Value::Bool(b) => uint(buf, 2, u64::from(b)),
            Value::Int(i) => uint(buf, 3, i as u64),
            Value::StrList(_) => {}
        }
        return;
    }
    message(buf, field, |kv| {
        bytes(kv, 1, key.as_bytes());
        message(kv, 2, |any| match value {
            Value::Str(s) => bytes(any, 1, s.as_bytes()),
            Value::Bool(b) => uint(any, 2, u64::from(b)),
            Value::Int(i) => uint(any, 3, i as u64),
            Value::StrList(items) => message(any, 5, |arr| {
                for s in items {
                    message(arr, 1, |v| bytes(v, 1, s.as_bytes()));
                }
            }),
        });
    });
}

/// The exporter's encoder: its two buffers are kept from one batch to the next (public for
/// `benches/otlp.rs`, which measures it; docs/tracing.md has the figures).
#[derive(Default)]
pub struct Encoder {
    head: Vec<u8>,
    spans: Vec<u8>,
}

impl Encoder {
    /// `batch` as one `ExportTraceServiceRequest`, in two parts to be sent one after the other.
    pub fn encode(&mut self, service_name: &str, batch: &[Finished]) -> [&[u8]; 2] {
        encode(service_name, batch, &mut self.head, &mut self.spans);
        [&self.head, &self.spans]
    }
}

/// `ExportTraceServiceRequest` with one `ResourceSpans` (the service) and one `ScopeSpans`, as
/// two parts sent one after the other: `head` (the request's, the resource's and the scope's
/// framing) and `spans` (the `ScopeSpans` body). Both buffers are the caller's and reused, and the
/// spans are written once: the framing's lengths are computed after them instead of copying
/// every span into each enclosing message.
fn encode(service_name: &str, batch: &[Finished], head: &mut Vec<u8>, spans: &mut Vec<u8>) {
    head.clear();
    spans.clear();
    message(spans, 1, |scope| {
        bytes(scope, 1, b"openai-api-route");
        bytes(scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
    });
    // One buffer for every span's body, reused.
    let mut span = Vec::with_capacity(1024);
    for f in batch {
        span.clear();
        server_span(&mut span, &f.server);
        bytes(spans, 2, &span);
        for a in &f.attempts {
            span.clear();
            attempt_span(&mut span, &f.server, a);
            bytes(spans, 2, &span);
        }
    }
    let mut resource = Vec::with_capacity(128);
    message(&mut resource, 1, |res| {
        attr(res, 1, "service.name", Value::Str(service_name));
        attr(
            res,
            1,
            "service.version",
            Value::Str(env!("CARGO_PKG_VERSION")),
        );
    });
    let ss_len = spans.len() as u64;
    let rs_len = resource.len() as u64 + 1 + varint_len(ss_len) as u64 + ss_len;
    tag(head, 1, LEN);
    varint(head, rs_len);
    head.extend_from_slice(&resource);
    tag(head, 2, LEN);
    varint(head, ss_len);
}

/// Fields shared by both kinds: ids, trace state, name, kind, times.
#[allow(clippy::too_many_arguments)]
fn head(
    span: &mut Vec<u8>,
    s: &ServerSpan,
    id: &[u8],
    parent: Option<&[u8]>,
    name: &str,
    kind: u64,
    start: u64,
    end: u64,
) {
    bytes(span, 1, &s.trace_id);
    bytes(span, 2, id);
    if let Some(ts) = &s.tracestate {
        bytes(span, 3, ts.as_bytes());
    }
    if let Some(p) = parent {
        bytes(span, 4, p);
    }
    bytes(span, 5, name.as_bytes());
    uint(span, 6, kind);
    fixed64(span, 7, start);
    fixed64(span, 8, end.max(start));
}

/// `Status { message = 2; code = 3 }` with code ERROR.
fn error_status(span: &mut Vec<u8>, why: &str) {
    message(span, 15, |st| {
        bytes(st, 2, why.as_bytes());
        uint(st, 3, STATUS_ERROR);
    });
}

/// The body of a server `Span` message.
fn server_span(span: &mut Vec<u8>, s: &ServerSpan) {
    let path = crate::records::cut_path(s.request.uri.path());
    let op = super::operation(&s.request.method, s.request.uri.path(), s.request.websocket);
    let method = crate::http_metrics::method_label(&s.request.method);
    let name = match (op, s.request.model.as_deref()) {
        (Some(op), Some(model)) => format!("{op} {}", cut(model, 128)),
        (Some(op), None) => op.to_string(),
        (None, _) => format!(
            "{method} {}",
            crate::http_metrics::family(s.request.uri.path())
        ),
    };
    head(
        span,
        s,
        &s.span_id,
        s.parent.as_ref().map(|p| &p[..]),
        &name,
        KIND_SERVER,
        s.start,
        s.end,
    );
    if let Some(op) = op {
        attr(span, 9, "gen_ai.operation.name", Value::Str(op));
        attr(span, 9, "gen_ai.provider.name", Value::Str("openai"));
    }
    if let Some(m) = &s.request.model {
        attr(span, 9, "gen_ai.request.model", Value::Str(cut(m, 256)));
    }
    if let Some(m) = &s.request.response_model {
        attr(span, 9, "gen_ai.response.model", Value::Str(cut(m, 256)));
    }
    if let Some(n) = s.request.input_tokens {
        attr(span, 9, "gen_ai.usage.input_tokens", Value::Int(n));
    }
    if let Some(n) = s.request.output_tokens {
        attr(span, 9, "gen_ai.usage.output_tokens", Value::Int(n));
    }
    if let Some(r) = &s.request.finish_reason {
        let list = [cut(r, 64)];
        attr(
            span,
            9,
            "gen_ai.response.finish_reasons",
            Value::StrList(&list),
        );
    }
    attr(span, 9, "http.request.method", Value::Str(method));
    attr(span, 9, "url.path", Value::Str(path));
    attr(
        span,
        9,
        "http.response.status_code",
        Value::Int(i64::from(s.request.status)),
    );
    attr(
        span,
        9,
        "openai_api_route.attempts",
        Value::Int(i64::from(s.request.attempts)),
    );
    attr(
        span,
        9,
        "openai_api_route.resumed",
        Value::Int(i64::from(s.request.resumed)),
    );
    attr(
        span,
        9,
        "openai_api_route.rebuilt",
        Value::Bool(s.request.rebuilt),
    );
    attr(
        span,
        9,
        "openai_api_route.complete",
        Value::Bool(s.request.complete),
    );
    if let Some(k) = &s.request.client_key {
        attr(span, 9, "openai_api_route.client_key", Value::Str(k));
    }
    if s.request.status >= 500 {
        attr(
            span,
            9,
            "error.type",
            Value::Str(status_text(s.request.status)),
        );
        error_status(span, s.request.error.as_deref().unwrap_or(""));
    }
}

/// The body of an attempt's client `Span` message.
fn attempt_span(span: &mut Vec<u8>, s: &ServerSpan, a: &AttemptSpan) {
    let upstream = a.upstream.as_deref().unwrap_or("");
    let method = crate::http_metrics::method_label(&s.request.method);
    let name = if upstream.is_empty() {
        method.to_string()
    } else {
        format!("{method} {upstream}")
    };
    head(
        span,
        s,
        &a.span_id,
        Some(&s.span_id),
        &name,
        KIND_CLIENT,
        a.start,
        a.end,
    );
    attr(span, 9, "http.request.method", Value::Str(method));
    if !upstream.is_empty() {
        attr(span, 9, "openai_api_route.upstream", Value::Str(upstream));
    }
    if let Some(host) = a.address.as_ref().and_then(|h| h.to_str().ok()) {
        let (addr, port) = split_host(host);
        attr(span, 9, "server.address", Value::Str(addr));
        if let Some(p) = port {
            attr(span, 9, "server.port", Value::Int(i64::from(p)));
        }
    }
    if let Some(st) = a.status {
        attr(
            span,
            9,
            "http.response.status_code",
            Value::Int(i64::from(st)),
        );
    }
    attr(span, 9, "openai_api_route.outcome", Value::Str(a.outcome));
    if a.continuation {
        attr(span, 9, "openai_api_route.continuation", Value::Bool(true));
    }
    if let Some(t) = a.first_byte {
        // Event { time_unix_nano = 1; name = 2 }
        message(span, 11, |ev| {
            fixed64(ev, 1, t);
            bytes(ev, 2, b"first_byte");
        });
    }
    if let Some(why) = &a.error {
        attr(span, 9, "error.type", Value::Str(a.outcome));
        error_status(span, why);
    }
}

/// `host:port` (or `[v6]:port`) apart; the port only when it is written.
fn split_host(host: &str) -> (&str, Option<u16>) {
    match host.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => match p.parse::<u16>() {
            Ok(port) => (h.trim_start_matches('[').trim_end_matches(']'), Some(port)),
            Err(_) => (host, None),
        },
        _ => (host.trim_start_matches('[').trim_end_matches(']'), None),
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The semantic conventions' `error.type` of a gateway answer: its status code.
fn status_text(status: u16) -> &'static str {
    match status {
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        508 => "508",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_hosts() {
        let mut b = Vec::new();
        varint(&mut b, 300);
        assert_eq!(b, [0xac, 0x02]);
        assert_eq!(split_host("api.example.com"), ("api.example.com", None));
        assert_eq!(split_host("127.0.0.1:8080"), ("127.0.0.1", Some(8080)));
        assert_eq!(split_host("[::1]:9"), ("::1", Some(9)));
        assert_eq!(split_host("[::1]"), ("::1", None));
        assert_eq!(cut("héllo", 2), "h");
        for v in [0u64, 1, 127, 128, 16383, 16384, u64::MAX] {
            let mut b = Vec::new();
            varint(&mut b, v);
            assert_eq!(varint_len(v), b.len(), "{v}");
        }
    }
}
