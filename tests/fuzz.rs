//! Property-based fuzzing of the parsers that see untrusted bytes: the SSE reply-text extractor,
//! the config loader, the header rewriter, the `model` rewriter, the JSON meta reader (duplicate
//! keys, BOM, deep nesting) and the dot-segment path check. Nightly (cargo fuzz) is not
//! available here, so proptest drives them; `PROPTEST_CASES=100000 cargo test --test main fuzz::`
//! runs a long session. Failures are saved under `proptest-regressions/` and replayed first.

use std::path::Path;

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use openai_api_route::admission::path_problem;
use openai_api_route::capture::Capture;
use openai_api_route::config::{self, Pattern, UpstreamAuth};
/// The one parse of a body, under the lock that keeps the parse-once test's count its own.
fn body_meta(
    body: &[u8],
) -> Result<openai_api_route::facts::RequestFacts, openai_api_route::facts::Unreadable> {
    let _only = crate::support::facts_lock();
    openai_api_route::facts::read(body)
}
use openai_api_route::headers::{response_headers, upstream_request_headers};
use openai_api_route::proxy::body::rewrite_model;

use proptest::prelude::*;

fn sse_of(deltas: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for d in deltas {
        let ev = serde_json::json!({"choices": [{"index": 0, "delta": {"content": d}}]});
        out.extend_from_slice(format!("data: {ev}\n\n").as_bytes());
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    out
}

fn feed_split(c: &mut Capture, bytes: &[u8], cuts: &[usize]) {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort();
    let mut last = 0;
    for p in points {
        c.feed(&bytes[last..p]);
        last = p;
    }
    c.feed(&bytes[last..]);
}

proptest! {
    #[test]
    fn sse_text_survives_any_split(deltas in prop::collection::vec(".{0,12}", 0..12), cuts in prop::collection::vec(any::<usize>(), 0..8)) {
        let body = sse_of(&deltas);
        let mut c = Capture::new(Some("text/event-stream"), None, 0);
        feed_split(&mut c, &body, &cuts);
        let text = c.finish().text;
        prop_assert_eq!(text.unwrap(), deltas.concat());
    }

    #[test]
    fn capture_never_panics_on_garbage(ct in prop::sample::select(vec!["text/event-stream", "application/json", "text/plain", "image/png"]), bytes in prop::collection::vec(any::<u8>(), 0..2048), cuts in prop::collection::vec(any::<usize>(), 0..6), limit in 0usize..64) {
        let mut c = Capture::new(Some(ct), None, limit);
        feed_split(&mut c, &bytes, &cuts);
        let text = c.finish().text;
        if let (Some(t), true) = (text, limit > 0) {
            prop_assert!(t.len() <= limit * 3 + 64 || ct == "text/event-stream");
        }
    }

    #[test]
    fn config_loader_never_panics(text in "(?s).{0,400}") {
        let _ = config::parse(Path::new("f.yaml"), &text, false, &|_| None);
    }

    #[test]
    fn config_loader_never_panics_on_yamlish(lines in prop::collection::vec(prop::sample::select(vec![
        "authorization: a", "authorization: [a, b]", "timeout: 1.5", "timeout: -1", "timeout: x",
        "lb_policy: random", "lb_policy: 7", "upstreams:", "  - endpoint: http://h/v1", "  - endpoint: ftp://x",
        "    sk: ${K}", "    sk: asis", "    allow: [\"*\"]", "    model_map: {a: b}", "    model_map: [1]",
        "    timeout: 0", "cooldown: {failures: 0}", "cooldown: 3", "notify: {matrix: {homeserver: x}}",
        "trusted_proxies: 10.0.0.0/8, ::1", "trusted_proxies: [nope]", "record_queue: 0", "  - 5", "- ", ": :",
    ]), 0..14)) {
        let text = lines.join("\n");
        let _ = config::parse(Path::new("f.yaml"), &text, false, &|k| (k == "K").then(|| "v".to_string()));
    }

    #[test]
    fn header_rewrite_never_leaks(pairs in prop::collection::vec(("[a-z][a-z0-9-]{0,20}", "[ -~]{0,40}"), 0..24), forbidden in prop::sample::select(vec!["host", "x-forwarded-for", "x-forwarded-proto", "x-real-ip", "forwarded", "connection", "transfer-encoding", "content-length", "accept-encoding"])) {
        let mut client = HeaderMap::new();
        for (k, v) in &pairs {
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
                client.append(name, value);
            }
        }
        client.append(HeaderName::from_static("authorization"), HeaderValue::from_static("Bearer client"));
        client.append(HeaderName::from_bytes(forbidden.as_bytes()).unwrap(), HeaderValue::from_static("1"));
        let mut out = HeaderMap::new();
        let key = HeaderValue::from_static("Bearer upstream");
        upstream_request_headers(&client, &UpstreamAuth::Bearer(key), &mut out);
        if forbidden != "accept-encoding" {
            prop_assert!(out.get(forbidden).is_none());
        }
        prop_assert_eq!(out.get_all("authorization").count(), 1);
        prop_assert_eq!(out.get("authorization").unwrap(), "Bearer upstream");
        prop_assert_eq!(out.get("accept-encoding").unwrap(), "identity");
        for (name, _) in response_headers(&client) {
            prop_assert!(name != "transfer-encoding" && name != "content-length" && name != "connection");
        }
    }

    #[test]
    fn model_rewrite_changes_only_the_model(extra in prop::collection::btree_map("[a-z_]{1,8}", any::<i32>(), 0..6), text in ".{0,20}", to in "[a-zA-Z0-9._-]{1,20}") {
        let mut obj = serde_json::Map::new();
        obj.insert("model".into(), serde_json::Value::String("from".into()));
        obj.insert("text".into(), serde_json::Value::String(text));
        for (k, v) in extra {
            obj.entry(k).or_insert(serde_json::Value::from(v));
        }
        let body = serde_json::to_vec(&serde_json::Value::Object(obj.clone())).unwrap();
        let facts = body_meta(&body).unwrap();
        let out = rewrite_model(&body, &facts, &to).unwrap();
        let mut parsed: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&out).unwrap();
        prop_assert_eq!(parsed.remove("model").unwrap(), serde_json::Value::String(to.clone()));
        obj.remove("model");
        prop_assert_eq!(parsed, obj);
        let meta = body_meta(&out).unwrap();
        prop_assert_eq!(meta.model.as_deref(), Some(to.as_str()));
        prop_assert!(!meta.stream);
    }

    #[test]
    fn body_meta_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(facts) = body_meta(&bytes) {
            let _ = rewrite_model(&bytes, &facts, "m");
        }
    }

    /// Whatever the JSON meta reader accepts as an object, serde_json reads as the same object
    /// with the same `model` and `stream`: nothing it lets through can mean another model.
    #[test]
    fn json_meta_agrees_with_a_full_parse(bytes in prop::collection::vec(any::<u8>(), 0..256), text in r#"\{[ "a-z:0-9,\[\]{}\\]{0,40}"#) {
        for input in [bytes.as_slice(), text.as_bytes()] {
            if let Ok(meta) = body_meta(input) {
                if meta.json {
                    let v: serde_json::Value = serde_json::from_slice(input).expect("accepted but not JSON");
                    let obj = v.as_object().expect("accepted but not an object");
                    prop_assert_eq!(meta.model.as_deref(), obj.get("model").and_then(|m| m.as_str()));
                    prop_assert_eq!(meta.stream, obj.get("stream") == Some(&serde_json::Value::Bool(true)));
                }
            }
        }
    }

    /// A duplicated top-level key or a BOM is always refused; deep nesting never crashes the reader.
    #[test]
    fn json_meta_refuses_duplicates_bom_and_depth(keys in prop::collection::vec("[a-z]{1,6}", 1..24), dup in any::<prop::sample::Index>(), depth in 0usize..400) {
        let mut members: Vec<String> = keys.iter().enumerate().map(|(i, k)| format!("\"{k}{i}\":{i}")).collect();
        let again = dup.get(&members).clone();
        members.push(again);
        let body = format!("{{{}}}", members.join(","));
        prop_assert!(body_meta(body.as_bytes()).is_err(), "{}", body);
        let mut bom = b"\xEF\xBB\xBF".to_vec();
        bom.extend_from_slice(b"{\"model\":\"m\"}");
        prop_assert!(body_meta(&bom).is_err());
        let nested = format!("{{\"a\":{}1{}}}", "[".repeat(depth), "]".repeat(depth));
        // Nesting inside a skipped member is read without recursion: never a crash, always read.
        prop_assert!(body_meta(nested.as_bytes()).is_ok(), "depth {}", depth);
    }

    /// A path whose segments decode to `.` or `..` is always caught, however it is spelled;
    /// plain segments never are.
    #[test]
    fn dot_segments_are_caught(segs in prop::collection::vec(prop::sample::select(vec!["a", "files", "x-1", "%2e", "%2E", ".", "%2e%2E", "..", ".%2e", "%252e"]), 1..6), sep in prop::sample::select(vec!["/", "%2f", "%2F", "%5c", "\\"])) {
        let path = format!("/v1/{}", segs.join(sep));
        // Every spelling in the list but the plain names decodes (in at most two rounds) to `.` or `..`.
        let dotty = segs.iter().any(|s| !matches!(*s, "a" | "files" | "x-1"));
        prop_assert_eq!(path_problem(&path).is_some(), dotty, "{}", path);
    }

    #[test]
    fn glob_without_star_is_equality(a in "[a-z0-9.-]{0,12}", b in "[a-z0-9.-]{0,12}") {
        prop_assert_eq!(Pattern(a.clone()).matches(&b), a == b);
        prop_assert!(Pattern("*".into()).matches(&b));
        let prefix = format!("{}*", &a);
        let joined = format!("{}{}", a, b);
        prop_assert!(Pattern(prefix).matches(&joined));
    }
}
