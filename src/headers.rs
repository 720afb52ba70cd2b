//! Header rewriting between client and upstream (see the observability guide, "Routes":
//! "Forwarding").
//!
//! Kept apart from the proxy loop so the rules read as one list and can be tested (and fuzzed)
//! without sockets: what passes, what is dropped, what is replaced.

use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::UpstreamAuth;

/// The `Via` token this gateway adds to every upstream request, for loop detection (see the
/// security guide).
pub const VIA: &str = "1.1 openai-api-route";

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus `Keep-Alive`
/// relatives that proxies are expected to drop.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` (lower case, as `HeaderName` stores it) is hop-by-hop.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Whether the `Connection` header(s) of `headers` declare `name` hop-by-hop. Scanned in place
/// (it used to collect the list into a `Vec<String>`: one allocation per listed name per message).
fn connection_lists(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers
        .get_all(header::CONNECTION)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|s| s.trim().eq_ignore_ascii_case(name.as_str()))
}

/// Client headers that never go upstream, besides hop-by-hop ones: the upstream gets its own
/// `Host`, `Authorization` and length, client addresses are not leaked, and `Expect` is answered
/// here (the body is already read, so an upstream `100 Continue` would only add a round trip).
fn dropped_towards_upstream(name: &HeaderName) -> bool {
    let n = name.as_str();
    is_hop_by_hop(name)
        || n == "host"
        || n == "authorization"
        || n == "content-length"
        || n == "accept-encoding"
        || n == "expect"
        || n == "forwarded"
        || n == "x-real-ip"
        || n.starts_with("x-forwarded-")
        || CLIENT_IDENTITY_AND_OVERRIDES.contains(&n)
}

/// Client headers that name the client's address or identity to a front proxy, or ask a server
/// to treat the request as another method or path: an upstream must see neither (see the
/// security guide, "Headers").
const CLIENT_IDENTITY_AND_OVERRIDES: &[&str] = &[
    "cookie",
    "true-client-ip",
    "cf-connecting-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    // 0.3 (second probe): more spellings of the same overrides and client addresses.
    "x-http-method",
    "x-method-override",
    "x-original-host",
    "x-host",
    "x-envoy-original-path",
    "client-ip",
    "x-original-forwarded-for",
];

/// Builds the headers of one upstream attempt into `out` (which starts empty).
pub fn upstream_request_headers(client: &HeaderMap, auth: &UpstreamAuth, out: &mut HeaderMap) {
    let has_connection = client.contains_key(header::CONNECTION);
    for (name, value) in client.iter() {
        if dropped_towards_upstream(name) || (has_connection && connection_lists(client, name)) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    match auth {
        UpstreamAuth::None => {}
        UpstreamAuth::Bearer(v) => {
            out.insert(header::AUTHORIZATION, v.clone());
        }
        UpstreamAuth::AsIs => {
            for v in client.get_all(header::AUTHORIZATION) {
                out.append(header::AUTHORIZATION, v.clone());
            }
        }
    }
    // Plain bytes so the reply text can be read for the record, and relayed verbatim.
    out.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    // Lets a chain of gateways see a loop (see the security guide): the client's own `Via`
    // values passed above.
    out.append(header::VIA, HeaderValue::from_static(VIA));
}

/// Whether an upstream response header is relayed to the client. `Content-Length` is handled by
/// the body type; CORS is set by the gateway itself on every `/v1/*` response. `upstream` is the
/// response's header map (its `Connection` header may list more hop-by-hop names).
pub fn relayed_to_client(name: &HeaderName, upstream: &HeaderMap) -> bool {
    !(is_hop_by_hop(name)
        || name == header::CONTENT_LENGTH
        || name == header::ACCESS_CONTROL_ALLOW_ORIGIN
        || connection_lists(upstream, name))
}

/// Upstream response headers to copy, in order.
pub fn response_headers(upstream: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    upstream
        .iter()
        .filter(move |(name, _)| relayed_to_client(name, upstream))
}

/// Most distinct upstream names one worker keeps a ready `x-upstream` value for; past that (many
/// reloads renaming upstreams) the cache starts over.
const NAME_VALUES: usize = 64;

thread_local! {
    /// `x-upstream` values per upstream name, built once per worker: cloning one is a reference
    /// count, building one from the name was an allocation per response.
    static UPSTREAM_NAME_VALUES: std::cell::RefCell<Vec<(Box<str>, HeaderValue)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The `x-upstream` header value for an upstream name (None if the name is not a valid value).
pub fn upstream_name_value(name: &str) -> Option<HeaderValue> {
    UPSTREAM_NAME_VALUES.with(|cell| {
        let mut cache = cell.borrow_mut();
        if let Some((_, v)) = cache.iter().find(|(n, _)| &**n == name) {
            return Some(v.clone());
        }
        let v = HeaderValue::from_str(name).ok()?;
        if cache.len() >= NAME_VALUES {
            cache.clear();
        }
        cache.push((name.into(), v.clone()));
        Some(v)
    })
}

/// A small count as a header value (`x-upstream-attempts`): static for 0–9, formatted above.
pub fn count_value(n: u32) -> HeaderValue {
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match DIGITS.get(n as usize) {
        Some(d) => HeaderValue::from_static(d),
        None => HeaderValue::from(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn ready_made_values() {
        assert_eq!(count_value(1), "1");
        assert_eq!(count_value(9), "9");
        assert_eq!(count_value(10), "10");
        assert_eq!(count_value(123), "123");
        assert_eq!(
            upstream_name_value("primary")
                .as_ref()
                .map(|v| v.as_bytes()),
            Some(&b"primary"[..])
        );
        // Served again from the worker's cache, and a different name is not confused with it.
        assert_eq!(upstream_name_value("primary").unwrap(), "primary");
        assert_eq!(upstream_name_value("backup").unwrap(), "backup");
        assert!(upstream_name_value("bad\nname").is_none());
        for i in 0..(NAME_VALUES + 5) {
            let n = format!("u{i}");
            assert_eq!(upstream_name_value(&n).unwrap(), n.as_str());
        }
    }

    #[test]
    fn forwards_end_to_end_only() {
        let client = map(&[
            ("host", "gateway"),
            ("authorization", "Bearer client-token"),
            ("openai-beta", "assistants=v2"),
            ("content-type", "application/json"),
            ("content-length", "10"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
            ("accept-encoding", "gzip"),
            ("te", "trailers"),
            ("expect", "100-continue"),
            ("cookie", "session=1"),
            ("true-client-ip", "1.2.3.4"),
            ("cf-connecting-ip", "1.2.3.4"),
            ("x-client-ip", "1.2.3.4"),
            ("x-cluster-client-ip", "1.2.3.4"),
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("x-http-method-override", "DELETE"),
            ("via", "1.1 front"),
        ]);
        let mut out = HeaderMap::new();
        let mut key = HeaderValue::from_static("Bearer sk-up");
        key.set_sensitive(true);
        upstream_request_headers(&client, &UpstreamAuth::Bearer(key), &mut out);
        assert_eq!(out.get("openai-beta").unwrap(), "assistants=v2");
        assert_eq!(out.get("content-type").unwrap(), "application/json");
        assert_eq!(out.get("authorization").unwrap(), "Bearer sk-up");
        assert_eq!(out.get("accept-encoding").unwrap(), "identity");
        let via: Vec<_> = out.get_all("via").collect();
        assert_eq!(via, vec!["1.1 front", "1.1 openai-api-route"]);
        for gone in [
            "host",
            "content-length",
            "connection",
            "x-secret-hop",
            "x-forwarded-for",
            "x-real-ip",
            "forwarded",
            "te",
            "expect",
            "cookie",
            "true-client-ip",
            "cf-connecting-ip",
            "x-client-ip",
            "x-cluster-client-ip",
            "x-original-url",
            "x-rewrite-url",
            "x-http-method-override",
        ] {
            assert!(out.get(gone).is_none(), "{gone} leaked upstream");
        }

        let mut out = HeaderMap::new();
        upstream_request_headers(&client, &UpstreamAuth::AsIs, &mut out);
        assert_eq!(out.get("authorization").unwrap(), "Bearer client-token");
        let mut out = HeaderMap::new();
        upstream_request_headers(&client, &UpstreamAuth::None, &mut out);
        assert!(out.get("authorization").is_none());
    }

    #[test]
    fn response_drops_hop_by_hop_and_length() {
        let up = map(&[
            ("content-type", "text/event-stream"),
            ("transfer-encoding", "chunked"),
            ("content-length", "5"),
            ("x-request-id", "abc"),
            ("access-control-allow-origin", "https://evil"),
        ]);
        let mut names: Vec<&str> = response_headers(&up).map(|(n, _)| n.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["content-type", "x-request-id"]);
    }
}
