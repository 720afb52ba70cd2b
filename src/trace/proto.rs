//! The OTLP `ExportTraceServiceRequest` of a batch of finished spans, on the exporter thread:
//! `opentelemetry-proto`'s message types, encoded by `prost`.
//!
//! Why these crates and not a hand-written encoder: tags, varints and lengths are the generated
//! code's concern (the same code the tests decode the output with), and this file only says what
//! goes into a span. Two things keep the cost near the hand-written encoder it replaced (figures
//! in docs/tracing.md, "Encoding cost", measured by `benches/otlp.rs`):
//!
//! - Spans are rewritten in place, one `Span` per kind kept from one span to the next, so that
//!   their strings and lists keep their memory: built anew, every attribute is two `String`s and
//!   a span some twenty allocations.
//! - Each span is encoded on its own into the `ScopeSpans` body, and the three messages around
//!   it (request, `ResourceSpans`, `ScopeSpans`) are framed after it from its length: prost,
//!   encoding one nested message, computes every inner message's length again at each level.

use std::fmt::Write;

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, SpanKind};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{Span, Status};
use prost::Message;

use super::{AttemptSpan, Finished, ServerSpan};

/// The exporter's encoder, kept from one batch to the next (public for `benches/otlp.rs`).
pub struct Encoder {
    /// The service (its attributes are written per batch) and the instrumentation scope.
    resource: Resource,
    scope: InstrumentationScope,
    /// The span last written of each kind, rewritten for the next one of its kind.
    server: Span,
    client: Span,
    /// The request's envelope and its spans, sent one after the other.
    head: Vec<u8>,
    spans: Vec<u8>,
}

impl Default for Encoder {
    fn default() -> Encoder {
        Encoder {
            resource: Resource::default(),
            scope: InstrumentationScope {
                name: "openai-api-route".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                ..InstrumentationScope::default()
            },
            server: Span::default(),
            client: Span::default(),
            head: Vec::new(),
            spans: Vec::new(),
        }
    }
}

/// Keys of the envelope's fields (field number << 3 | 2, length-delimited; one byte each, as the
/// field numbers are below 16): see the module docs for why the envelope is framed here.
const RESOURCE_SPANS: u8 = 1 << 3 | 2; // ExportTraceServiceRequest.resource_spans
const RESOURCE: u8 = 1 << 3 | 2; // ResourceSpans.resource
const SCOPE_SPANS: u8 = 2 << 3 | 2; // ResourceSpans.scope_spans
const SCOPE: u8 = 1 << 3 | 2; // ScopeSpans.scope
const SPAN: u8 = 2 << 3 | 2; // ScopeSpans.spans

impl Encoder {
    /// `batch` as one `ExportTraceServiceRequest`, in two parts sent one after the other.
    pub fn encode(&mut self, service_name: &str, batch: &[Finished]) -> [&[u8]; 2] {
        let mut a = Attrs::new(&mut self.resource.attributes);
        a.string("service.name", service_name);
        a.string("service.version", env!("CARGO_PKG_VERSION"));
        drop(a);
        let out = &mut self.spans;
        out.clear();
        out.push(SCOPE);
        // A Vec grows as needed: encoding into one cannot fail.
        let _ = self.scope.encode_length_delimited(out);
        for f in batch {
            server_span(&mut self.server, &f.server);
            out.push(SPAN);
            let _ = self.server.encode_length_delimited(out);
            for at in &f.attempts {
                attempt_span(&mut self.client, &f.server, at);
                out.push(SPAN);
                let _ = self.client.encode_length_delimited(out);
            }
        }
        // The framing, from the lengths: each key is one byte.
        let scope_spans = out.len();
        let resource = self.resource.encoded_len();
        let resource_spans = 1
            + prost::length_delimiter_len(resource)
            + resource
            + 1
            + prost::length_delimiter_len(scope_spans)
            + scope_spans;
        let head = &mut self.head;
        head.clear();
        head.push(RESOURCE_SPANS);
        let _ = prost::encode_length_delimiter(resource_spans, head);
        head.push(RESOURCE);
        let _ = self.resource.encode_length_delimited(head);
        head.push(SCOPE_SPANS);
        let _ = prost::encode_length_delimiter(scope_spans, head);
        [&self.head, &self.spans]
    }
}

/// `s` now holds `v`, in the memory it had.
fn set(s: &mut String, v: &str) {
    s.clear();
    s.push_str(v);
}

/// See [`set`].
fn set_bytes(b: &mut Vec<u8>, v: &[u8]) {
    b.clear();
    b.extend_from_slice(v);
}

/// Writes a span's attributes over the ones it had; those left over are dropped with the writer,
/// so that nothing of an earlier span stays in this one.
struct Attrs<'a> {
    list: &'a mut Vec<KeyValue>,
    used: usize,
}

impl Drop for Attrs<'_> {
    fn drop(&mut self) {
        self.list.truncate(self.used);
    }
}

impl<'a> Attrs<'a> {
    fn new(list: &'a mut Vec<KeyValue>) -> Attrs<'a> {
        Attrs { list, used: 0 }
    }

    /// The next attribute, named `key`; its old value for the caller to overwrite.
    fn next(&mut self, key: &str) -> &mut Option<Value> {
        if self.used == self.list.len() {
            self.list.push(KeyValue::default());
        }
        let kv = &mut self.list[self.used];
        self.used += 1;
        set(&mut kv.key, key);
        &mut kv.value.get_or_insert_with(AnyValue::default).value
    }

    fn string(&mut self, key: &str, v: &str) {
        match self.next(key) {
            Some(Value::StringValue(s)) => set(s, v),
            slot => *slot = Some(Value::StringValue(v.into())),
        }
    }

    fn int(&mut self, key: &str, v: impl Into<i64>) {
        *self.next(key) = Some(Value::IntValue(v.into()));
    }

    fn boolean(&mut self, key: &str, v: bool) {
        *self.next(key) = Some(Value::BoolValue(v));
    }

    /// A list of one string.
    fn strings(&mut self, key: &str, v: &str) {
        let slot = self.next(key);
        if let Some(Value::ArrayValue(list)) = slot {
            if let [AnyValue {
                value: Some(Value::StringValue(s)),
            }] = &mut list.values[..]
            {
                return set(s, v);
            }
        }
        let values = vec![AnyValue {
            value: Some(Value::StringValue(v.into())),
        }];
        *slot = Some(Value::ArrayValue(ArrayValue { values }));
    }
}

/// Rewrites the fields both kinds have (ids, trace state, kind, times) and clears the status;
/// returns the name, emptied, and the attributes' writer. Events are the client span's alone
/// ([`attempt_span`] rewrites them).
fn rewrite<'a>(
    span: &'a mut Span,
    s: &ServerSpan,
    id: &[u8],
    parent: Option<&[u8]>,
    kind: SpanKind,
    (start, end): (u64, u64),
) -> (&'a mut String, Attrs<'a>) {
    set_bytes(&mut span.trace_id, &s.trace_id);
    set_bytes(&mut span.span_id, id);
    set(
        &mut span.trace_state,
        s.tracestate
            .as_ref()
            .and_then(|t| t.to_str().ok())
            .unwrap_or_default(),
    );
    set_bytes(&mut span.parent_span_id, parent.unwrap_or_default());
    span.kind = kind as i32;
    span.start_time_unix_nano = start;
    span.end_time_unix_nano = end.max(start);
    span.status = None;
    span.name.clear();
    (&mut span.name, Attrs::new(&mut span.attributes))
}

/// Status ERROR with `why` as its message.
fn error(why: &str) -> Option<Status> {
    Some(Status {
        message: why.into(),
        code: StatusCode::Error as i32,
    })
}

/// A request path as a span shows it: object ids replaced by `{id}` (an id is the client's and
/// its upstream's business, not the trace backend's; see the tracing guide).
fn span_path(path: &str) -> std::borrow::Cow<'_, str> {
    let ids: Vec<&str> = crate::affinity::refs::path_ids(path).collect();
    if ids.is_empty() {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    let mut at = 0;
    for id in ids {
        let start = id.as_ptr() as usize - path.as_ptr() as usize;
        out.push_str(&path[at..start]);
        out.push_str("{id}");
        at = start + id.len();
    }
    out.push_str(&path[at..]);
    std::borrow::Cow::Owned(out)
}

/// Rewrites `span` as the server span `s`.
fn server_span(span: &mut Span, s: &ServerSpan) {
    let r = &s.request;
    let path = span_path(crate::records::cut_path(r.uri.path()));
    let op = super::operation(&r.method, r.uri.path(), r.websocket);
    let method = crate::http_metrics::method_label(&r.method);
    let parent = s.parent.as_ref().map(|p| &p[..]);
    let times = (s.start, s.end);
    let (name, mut a) = rewrite(span, s, &s.span_id, parent, SpanKind::Server, times);
    let _ = match (op, r.model.as_deref()) {
        (Some(op), Some(model)) => write!(name, "{op} {}", cut(model, 128)),
        (Some(op), None) => write!(name, "{op}"),
        (None, _) => write!(
            name,
            "{method} {}",
            crate::http_metrics::family(r.uri.path())
        ),
    };
    if let Some(op) = op {
        a.string("gen_ai.operation.name", op);
        a.string("gen_ai.provider.name", "openai");
    }
    if let Some(m) = &r.model {
        a.string("gen_ai.request.model", cut(m, 256));
    }
    if let Some(m) = &r.response_model {
        a.string("gen_ai.response.model", cut(m, 256));
    }
    if let Some(n) = r.input_tokens {
        a.int("gen_ai.usage.input_tokens", n);
    }
    if let Some(n) = r.output_tokens {
        a.int("gen_ai.usage.output_tokens", n);
    }
    if let Some(reason) = &r.finish_reason {
        a.strings("gen_ai.response.finish_reasons", cut(reason, 64));
    }
    a.string("http.request.method", method);
    a.string("url.path", &path);
    a.int("http.response.status_code", r.status);
    a.int("openai_api_route.attempts", r.attempts);
    a.int("openai_api_route.resumed", r.resumed);
    a.boolean("openai_api_route.rebuilt", r.rebuilt);
    a.boolean("openai_api_route.complete", r.complete);
    if let Some(k) = &r.client_key {
        a.string("openai_api_route.client_key", k);
    }
    if let Some(id) = r.request_id.as_ref().and_then(|v| v.to_str().ok()) {
        a.string("openai_api_route.request_id", cut(id, 256));
    }
    if r.status >= 500 {
        a.string("error.type", status_text(r.status));
        drop(a);
        span.status = error(r.error.as_deref().unwrap_or(""));
    }
}

/// Rewrites `span` as the client span of the attempt `at` of `s`.
fn attempt_span(span: &mut Span, s: &ServerSpan, at: &AttemptSpan) {
    let upstream = at.upstream.as_deref().unwrap_or("");
    let method = crate::http_metrics::method_label(&s.request.method);
    let times = (at.start, at.end);
    let parent = Some(&s.span_id[..]);
    let (name, mut a) = rewrite(span, s, &at.span_id, parent, SpanKind::Client, times);
    name.push_str(method);
    if !upstream.is_empty() {
        name.push(' ');
        name.push_str(upstream);
    }
    a.string("http.request.method", method);
    if !upstream.is_empty() {
        a.string("openai_api_route.upstream", upstream);
    }
    if let Some(host) = at.address.as_ref().and_then(|h| h.to_str().ok()) {
        let (addr, port) = split_host(host);
        a.string("server.address", addr);
        if let Some(p) = port {
            a.int("server.port", p);
        }
    }
    if let Some(st) = at.status {
        a.int("http.response.status_code", st);
    }
    a.string("openai_api_route.outcome", at.outcome);
    if at.continuation {
        a.boolean("openai_api_route.continuation", true);
    }
    if at.error.is_some() {
        a.string("error.type", at.outcome);
    }
    drop(a);
    // The only event a client span has; its name keeps its memory from one span to the next.
    span.events.truncate(usize::from(at.first_byte.is_some()));
    if let Some(t) = at.first_byte {
        if span.events.is_empty() {
            span.events.push(Event {
                name: "first_byte".into(),
                ..Event::default()
            });
        }
        span.events[0].time_unix_nano = t;
    }
    span.status = at.error.as_deref().and_then(error);
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
    use std::sync::Arc;

    use actix_web::http::header::HeaderValue;
    use actix_web::http::{Method, Uri};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    use super::super::{End, Phase};
    use super::*;

    #[test]
    fn hosts_and_cuts() {
        assert_eq!(split_host("api.example.com"), ("api.example.com", None));
        assert_eq!(split_host("127.0.0.1:8080"), ("127.0.0.1", Some(8080)));
        assert_eq!(split_host("[::1]:9"), ("::1", Some(9)));
        assert_eq!(split_host("[::1]"), ("::1", None));
        assert_eq!(cut("héllo", 2), "h");
    }

    /// Requests of every shape: optional parts present or not, strings empty or long.
    fn requests(n: u64) -> Vec<Finished> {
        let pick = |i: u64, of: &[&'static str]| of[(i % of.len() as u64) as usize];
        (0..n)
            .map(|i| {
                let attempts = (0..i % 4)
                    .map(|k| {
                        let j = i * 10 + k;
                        AttemptSpan {
                            span_id: [j as u8 | 1; 8],
                            start: 1_000 + j,
                            end: if j % 5 == 0 { 0 } else { 2_000 + j },
                            first_byte: (j % 3 == 0).then_some(1_500 + j),
                            upstream: (j % 4 != 0).then(|| Arc::from(pick(j, &["", "up", "ü"]))),
                            address: (j % 6 != 0).then(|| {
                                HeaderValue::from_static(pick(
                                    j,
                                    &["h", "h:8080", "[::1]:9", "[::1]"],
                                ))
                            }),
                            status: (j % 2 == 0).then_some(500 + (j % 5) as u16),
                            outcome: pick(j, &["ok", "http_error", "timeout", ""]),
                            error: (j % 3 != 0).then(|| pick(j, &["", "HTTP 503"]).to_string()),
                            continuation: j % 7 == 1,
                            phase: Phase::Closed,
                        }
                    })
                    .collect();
                let request = End {
                    method: [Method::POST, Method::GET][(i % 2) as usize].clone(),
                    uri: Uri::from_static(pick(
                        i,
                        &[
                            "/v1/chat/completions",
                            "/v1/embeddings",
                            "/v1/models",
                            "/v1/x?y",
                        ],
                    )),
                    model: (i % 4 != 0).then(|| Arc::from("m".repeat((i % 3 * 100) as usize))),
                    client_key: (i % 5 != 0).then(|| "sk-…abcd".into()),
                    websocket: i % 11 == 3,
                    attempts: (i % 4) as u32,
                    resumed: (i % 3) as u32,
                    rebuilt: i % 2 == 1,
                    status: [200, 404, 500, 502, 599][(i % 5) as usize],
                    complete: i % 3 != 1,
                    input_tokens: (i % 4 != 0).then_some(i as i64 - 3),
                    output_tokens: (i % 6 != 0).then_some(-(i as i64)),
                    finish_reason: (i % 3 != 0).then(|| pick(i, &["", "stop"]).into()),
                    error: (i % 4 != 0).then(|| pick(i, &["", "all failed"]).into()),
                    response_model: (i % 2 == 0).then(|| "ü".repeat(200)),
                    ..End::default()
                };
                let server = ServerSpan {
                    trace_id: [i as u8 | 1; 16],
                    span_id: [i as u8 | 2; 8],
                    parent: (i % 2 == 0).then_some([7; 8]),
                    tracestate: (i % 3 != 0)
                        .then(|| HeaderValue::from_static(pick(i, &["", "v=1"]))),
                    start: 5_000 + i,
                    end: if i % 13 == 0 { 0 } else { 9_000 + i },
                    request,
                };
                Finished { server, attempts }
            })
            .collect()
    }

    #[test]
    fn the_envelope_is_what_prost_writes_for_the_whole_request() {
        let batch = requests(60);
        let bytes = Encoder::default().encode("svc", &batch).concat();
        let request = ExportTraceServiceRequest::decode(&bytes[..]).unwrap();
        assert_eq!(request.encode_to_vec(), bytes);
        let [rs] = &request.resource_spans[..] else {
            panic!("one resource")
        };
        let [ss] = &rs.scope_spans[..] else {
            panic!("one scope")
        };
        assert_eq!(ss.scope.as_ref().unwrap().name, "openai-api-route");
        assert_eq!(
            ss.spans.len(),
            batch.iter().map(Finished::len).sum::<usize>()
        );
        let service = &rs.resource.as_ref().unwrap().attributes[0];
        assert_eq!(service.key, "service.name");
        let empty = Encoder::default().encode("svc", &[]).concat();
        let request = ExportTraceServiceRequest::decode(&empty[..]).unwrap();
        assert!(request.resource_spans[0].scope_spans[0].spans.is_empty());
    }

    #[test]
    fn a_rewritten_span_keeps_nothing_of_the_one_before() {
        let all = requests(300);
        let mut kept = Encoder::default();
        for batch in all.chunks(7).chain(all.rchunks(5)) {
            assert_eq!(
                kept.encode("svc", batch).concat(),
                Encoder::default().encode("svc", batch).concat()
            );
        }
    }
}
