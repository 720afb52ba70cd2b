//! The one parse's table of bodies: what it reads, what it refuses.

use super::*;

#[test]
fn model_names_are_shared_within_a_worker_and_bounded() {
    let a = super::shared_model("gpt-4o-mini");
    let b = super::shared_model("gpt-4o-mini");
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert_eq!(&*a, "gpt-4o-mini");
    let long = "m".repeat(super::SHARED_MODEL_BYTES + 1);
    let (x, y) = (super::shared_model(&long), super::shared_model(&long));
    assert!(!std::sync::Arc::ptr_eq(&x, &y));
    assert_eq!(*x, *long);
    // A stream of new names empties the cache rather than growing it; names stay right.
    for i in 0..3 * super::SHARED_MODELS {
        assert_eq!(&*super::shared_model(&format!("m{i}")), format!("m{i}"));
    }
    super::MODELS.with(|m| assert!(m.borrow().len() <= super::SHARED_MODELS));
    assert_eq!(&*super::shared_model("gpt-4o-mini"), "gpt-4o-mini");
}

fn meta(s: &str) -> Result<RequestFacts, Unreadable> {
    read(s.as_bytes())
}

#[test]
fn json_bodies_are_read_or_refused() {
    let m = meta(r#" {"model":"gpt-4o","stream":true,"messages":[]}"#).unwrap();
    assert_eq!(m.model.as_deref(), Some("gpt-4o"));
    assert!(m.stream && m.json);
    assert!(!meta(r#"{"stream":"true"}"#).unwrap().stream);
    assert_eq!(meta(r#"{"model":null}"#).unwrap().model, None);
    for bad in [
        r#"{"model":"gpt-3.5","model":"gpt-4o"}"#,
        r#"{"stream":false,"stream":true}"#,
        r#"{"model":"a","x":1,"x":2}"#,
        r#"{"mod\u0065l":"a","model":"b"}"#,
        "\u{feff}{\"model\":\"gpt-4o\"}",
        " \u{feff}{}",
        r#"{"model":"a",}"#,
        r#"{"model":"a"} trailing"#,
        r#"{"model":5}"#,
        r#"{"model":"a""#,
        "{",
    ] {
        assert!(meta(bad).is_err(), "{bad:?} was accepted");
    }
    // Deep nesting in a member the gateway skips costs no stack (serde_json skips it
    // iteratively): read, not refused, and no crash.
    let deep = format!(
        "{{\"a\":{}{},\"model\":\"m\"}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert_eq!(meta(&deep).unwrap().model.as_deref(), Some("m"));
    let unclosed = format!("{{\"a\":{}", "[".repeat(100_000));
    assert!(meta(&unclosed).is_err());
    let many: String = (0..1000).map(|i| format!("\"k{i}\":{i},")).collect();
    assert!(meta(&format!("{{{many}\"model\":\"m\"}}")).is_ok());
    assert!(meta(&format!("{{{many}\"k999\":0}}")).is_err());
    // Around the switch from the stack array to the hash set.
    for n in 14..=18 {
        let keys: String = (0..n).map(|i| format!("\"k{i}\":{i},")).collect();
        assert!(meta(&format!("{{{keys}\"model\":\"m\"}}")).is_ok(), "{n}");
        assert!(meta(&format!("{{{keys}\"k0\":0}}")).is_err(), "{n}");
        assert!(meta(&format!("{{{keys}\"k{}\":0}}", n - 1)).is_err(), "{n}");
    }
    assert_eq!(meta("hello").unwrap(), RequestFacts::default());
    assert_eq!(meta("").unwrap(), RequestFacts::default());
    assert_eq!(meta("[1]").unwrap(), RequestFacts::default());
}

#[test]
fn facts_locate_the_members_the_proxy_edits() {
    let body = r#"{"model" : "gpt-4o","stream":true,"stream_options":{"x":1},"messages":[{"role":"user","content":"hi"}],"input":"q","n":1,"store":true}"#;
    let f = meta(body).unwrap();
    let at = |r: &Option<Range<usize>>| &body[r.clone().unwrap()];
    assert_eq!(at(&f.model_at), "\"gpt-4o\"");
    assert_eq!(at(&f.stream_options), r#"{"x":1}"#);
    assert_eq!(at(&f.messages), r#"[{"role":"user","content":"hi"}]"#);
    assert_eq!(at(&f.input), "\"q\"");
    assert!(!f.many_choices);
    assert_eq!(f.store, Some(true));
    assert!(meta(r#"{"n":2}"#).unwrap().many_choices);
    assert!(!meta(r#"{"n":null}"#).unwrap().many_choices);
    assert!(meta(r#"{"n":"1"}"#).unwrap().many_choices);
    assert_eq!(meta(r#"{"store":"yes"}"#).unwrap().store, None);
}

#[test]
fn the_affinity_key_is_the_cache_key_else_the_user() {
    let key = |s: &str| meta(s).unwrap().affinity.map(String::from);
    assert_eq!(
        key(r#"{"user":"u","prompt_cache_key":"p"}"#).as_deref(),
        Some("pck:p")
    );
    assert_eq!(key(r#"{"user":"u"}"#).as_deref(), Some("user:u"));
    assert_eq!(key(r#"{"user":"","prompt_cache_key":7}"#), None);
    assert_eq!(key(r#"{"model":"m"}"#), None);
}

#[test]
fn every_read_is_counted() {
    let before = parses();
    meta(r#"{"model":"m"}"#).unwrap();
    meta("plain text").unwrap();
    assert!(parses() > before);
}
