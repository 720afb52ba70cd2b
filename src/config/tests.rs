//! Unit tests of the config parser: defaults, errors, patterns and networks.

use std::path::Path;
use std::time::Duration;

use super::net::parse_endpoint;
use super::*;

fn parse_str(text: &str) -> Result<Config, ConfigErrors> {
    parse(Path::new("t.yaml"), text, false, &|k| {
        (k == "KEY").then(|| "from-env".to_string())
    })
    .map(|(c, _)| c)
}

#[test]
fn original_file_loads() {
    let c = parse_str(
        "authorization: woshimima\nupstreams:\n  - sk: \"secret_key_1\"\n    endpoint: \"https://api.openai.com/v2\"\n  - sk: \"secret_key_2\"\n    endpoint: \"https://api.openai.com/v1\"\n    timeout: 30\n",
    )
    .unwrap();
    assert_eq!(c.tokens, vec!["woshimima"]);
    assert_eq!(&*c.upstreams[0].name, "api.openai.com");
    assert_eq!(&*c.upstreams[1].name, "api.openai.com#2");
    assert_eq!(c.upstreams[1].timeout, Duration::from_secs(30));
    assert_eq!(c.upstreams[0].timeout, Duration::from_secs(60));
    assert_eq!(c.upstreams[0].stream_timeout, Duration::from_secs(5));
    assert_eq!(c.upstreams[0].base, "https://api.openai.com/v2");
    assert_eq!(c.max_body_bytes, 32 << 20);
    assert_eq!(c.cooldown_failures, 3);
}

#[test]
fn env_substitution_and_lists() {
    let c = parse_str(
        "authorization: [a, \"b, c\"]\nupstreams:\n  - endpoint: http://x/v1\n    sk: ${KEY}\n    allow: gpt-*, o1\n",
    )
    .unwrap();
    assert_eq!(c.tokens, vec!["a", "b", "c"]);
    assert!(matches!(&c.upstreams[0].auth, UpstreamAuth::Bearer(v) if v == "Bearer from-env"));
    assert!(c.upstreams[0].admits(Some("gpt-4o")));
    assert!(c.upstreams[0].admits(Some("o1")));
    assert!(!c.upstreams[0].admits(Some("claude")));
    assert!(c.upstreams[0].admits(None));
}

#[test]
fn errors_name_file_key_and_problem() {
    let e = parse_str(
        "authorization: x\nlb_policy: fastest\nupstreams:\n  - sk: a\n  - endpoint: ftp://h/\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("t.yaml: lb_policy: unknown policy \"fastest\""),
        "{e}"
    );
    assert!(e.contains("t.yaml: upstreams[0].endpoint: missing"), "{e}");
    assert!(
        e.contains("t.yaml: upstreams[1].endpoint: \"ftp://h/\" is not an http(s) URL"),
        "{e}"
    );
    let e = parse_str("upstreams:\n  - endpoint: http://h\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("t.yaml: authorization: no client token"), "{e}");
    let e = parse_str("authorization: x\nupstreams:\n  - endpoint: http://h\n    sk: ${NOPE}\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("upstreams[0].sk: environment variable NOPE is not set"),
        "{e}"
    );
}

#[test]
fn model_map_exact_beats_wildcard() {
    let c = parse_str(
        "authorization: x\nupstreams:\n  - endpoint: http://h\n    model_map: {\"*\": fallback, gpt-4o: dep}\n",
    )
    .unwrap();
    let u = &c.upstreams[0];
    assert_eq!(u.mapped_model("gpt-4o"), Some("dep"));
    assert_eq!(u.mapped_model("other"), Some("fallback"));
}

#[test]
fn glob_and_cidr() {
    assert!(Pattern("gpt-*-mini".into()).matches("gpt-4o-mini"));
    assert!(!Pattern("gpt-*-mini".into()).matches("gpt-4o"));
    assert!(Pattern("*".into()).matches(""));
    let n = IpNet::parse("10.0.0.0/8").unwrap();
    assert!(n.contains("10.1.2.3".parse().unwrap()));
    assert!(n.contains("::ffff:10.1.2.3".parse().unwrap()));
    assert!(!n.contains("11.0.0.1".parse().unwrap()));
    assert!(IpNet::parse("0.0.0.0/0")
        .unwrap()
        .contains("1.2.3.4".parse().unwrap()));
    assert!(IpNet::parse("nope").is_none());
}

#[test]
fn endpoint_display_drops_userinfo() {
    let (base, display, host) = parse_endpoint("https://user:pw@h.example:8443/api/v1/").unwrap();
    assert_eq!(base, "https://user:pw@h.example:8443/api/v1");
    assert_eq!(display, "https://h.example:8443/api/v1");
    assert_eq!(host, "h.example");
}

#[test]
fn models_and_usage_keys() {
    let c = parse_str(
            "authorization: x\nmodels_refresh: 30\nroute_by_models: true\nforce_usage: false\nupstreams:\n  - endpoint: http://h\n    models: [a, \"b/c\"]\n  - endpoint: http://h2\n    force_usage: \"true\"\n",
        )
        .unwrap();
    assert_eq!(c.models_refresh, Duration::from_secs(30));
    assert!(c.route_by_models);
    assert_eq!(c.upstreams[0].models, Some(vec!["a".into(), "b/c".into()]));
    assert!(
        !c.upstreams[0].force_usage,
        "the global value is the default"
    );
    assert!(c.upstreams[1].force_usage);
    assert_eq!(c.upstreams[1].models, None);
    let d = parse_str("authorization: x\nupstreams:\n  - endpoint: http://h\n").unwrap();
    assert_eq!(d.models_refresh, Duration::from_secs(600));
    assert!(!d.route_by_models);
    assert!(d.upstreams[0].force_usage);
    let e = parse_str(
            "authorization: x\nroute_by_models: maybe\nmodels_refresh: 0\nupstreams:\n  - endpoint: http://h\n    force_usage: 3\n",
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("t.yaml: route_by_models: expected true or false"),
        "{e}"
    );
    assert!(
        e.contains("t.yaml: models_refresh: must be greater than 0"),
        "{e}"
    );
    assert!(
        e.contains("upstreams[0].force_usage: expected true or false"),
        "{e}"
    );
}

#[test]
fn upstream_urls_and_host_are_assembled_from_the_parsed_endpoint() {
    let c = parse_str(
        "authorization: t\nupstreams:\n  - endpoint: https://api.openai.com/v1\n  - endpoint: http://127.0.0.1:8080/openai/v1/\n  - endpoint: http://[::1]:9000\n  - endpoint: http://u:p@h.example:80/x\n",
    )
    .unwrap();
    let url = |i: usize, target: &str| {
        let client: awc::http::Uri = target.parse().unwrap();
        c.upstreams[i]
            .origin
            .uri(&client)
            .map(|u| u.to_string())
            .unwrap_or_default()
    };
    let host = |i: usize| {
        c.upstreams[i]
            .origin
            .host()
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        url(0, "/v1/chat/completions"),
        "https://api.openai.com/v1/chat/completions"
    );
    assert_eq!(host(0), "api.openai.com");
    assert_eq!(
        url(1, "/v1/embeddings?a=1&b"),
        "http://127.0.0.1:8080/openai/v1/embeddings?a=1&b"
    );
    assert_eq!(host(1), "127.0.0.1:8080");
    assert_eq!(url(2, "/v1/models"), "http://[::1]:9000/models");
    assert_eq!(host(2), "[::1]:9000");
    // User info stays in the URL as configured and never in `Host`; port 80 is not written.
    assert_eq!(url(3, "/v1/m"), "http://u:p@h.example:80/x/m");
    assert_eq!(host(3), "h.example");
    // A base path of `/v1` sends the client's own path and query, shared rather than copied.
    let client: awc::http::Uri = "/v1/chat/completions?x=1".parse().unwrap();
    let sent = c.upstreams[0].origin.uri(&client).unwrap();
    assert_eq!(
        sent.to_string(),
        "https://api.openai.com/v1/chat/completions?x=1"
    );
    assert_eq!(
        sent.path_and_query().unwrap().as_str().as_ptr(),
        client.path_and_query().unwrap().as_str().as_ptr()
    );
    // Paths outside /v1 keep their mapping: appended to the base path as they are.
    assert_eq!(url(0, "/other"), "https://api.openai.com/v1/other");
}

#[test]
fn key_sections_name_the_mappings_the_parser_warns_in() {
    // Every listed key of the nested sections is accepted without a warning, and one unknown key
    // in each section of `KEY_SECTIONS` is warned about under that section's path.
    let text = "authorization: x\nzz: 1\n\
        cooldown: {failures: 2, seconds: 5, zz: 1}\n\
        notify:\n  min_interval: 5\n  zz: 1\n\
        \x20 feishu: {webhook: http://f/hook, secret: s, zz: 1}\n\
        \x20 matrix: {homeserver: http://m, access_token: t, room_id: r, zz: 1}\n\
        otel: {endpoint: http://c:4318/v1/traces, zz: 1}\n\
        model_timeouts: {\"*\": {timeout: 1, stream_timeout: 2, zz: 1}}\n\
        members: [{name: m, key: k, zz: 1}]\n\
        upstreams:\n  - endpoint: http://h/v1\n    zz: 1\n";
    let (_, warnings) = parse(Path::new("t.yaml"), text, false, &|_| None).unwrap();
    let mut got: Vec<String> = warnings.into_iter().map(|w| w.key).collect();
    got.sort();
    let mut want: Vec<String> = KEY_SECTIONS
        .iter()
        .map(|(path, _)| match *path {
            "" => "zz".to_string(),
            "upstreams[]" => "upstreams[0].zz".to_string(),
            "members[]" => "members[0].zz".to_string(),
            p => format!("{p}.zz"),
        })
        .collect();
    want.sort();
    assert_eq!(got, want);
    for (path, keys) in KEY_SECTIONS {
        assert!(!keys.is_empty() && !keys.contains(&"zz"), "{path}");
    }
}

#[test]
fn retries_above_five_are_an_error_where_written() {
    let e = parse_str(
        "authorization: x\nretries: 6\nupstreams:\n  - endpoint: http://h\n  - endpoint: http://h2\n    retries: 100\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("t.yaml: retries: must be at most 5 (got 6)"),
        "{e}"
    );
    assert!(
        e.contains("t.yaml: upstreams[1].retries: must be at most 5 (got 100)"),
        "{e}"
    );
    assert!(!e.contains("upstreams[0]"), "{e}");
    let c =
        parse_str("authorization: x\nretries: 5\nupstreams:\n  - endpoint: http://h\n").unwrap();
    assert_eq!(c.upstreams[0].retries, 5);
}

#[test]
fn a_misspelt_key_is_matched_to_the_nearest_known_one_and_nothing_else_is() {
    use super::parse::{nearest, ROOT_KEYS, UPSTREAM_KEYS};
    for (typed, want) in [
        ("endpont", Some("endpoint")),
        ("endpiont", Some("endpoint")),
        ("Endpoint", Some("endpoint")),
        ("end-point", Some("endpoint")),
        ("modelmap", Some("model_map")),
        ("key", None),
        ("zz", None),
        ("colour", None),
    ] {
        assert_eq!(nearest(typed, UPSTREAM_KEYS), want, "{typed}");
    }
    for (typed, want) in [
        ("timout", Some("timeout")),
        ("stream-timeout", Some("stream_timeout")),
        ("upstream", Some("upstreams")),
        ("retention", None),
        ("fancy", None),
    ] {
        assert_eq!(nearest(typed, ROOT_KEYS), want, "{typed}");
    }
}

#[test]
fn a_file_with_errors_keeps_its_unknown_key_warnings() {
    let (config, warnings) = super::parse_all(
        Path::new("t.yaml"),
        "authorization: x\nupstreams:\n  - endpont: http://h/v1\n",
        false,
        &|_| None,
    );
    let errors = config.unwrap_err().to_string();
    assert!(
        errors.contains("upstreams[0].endpoint: missing"),
        "{errors}"
    );
    let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        ["t.yaml: upstreams[0].endpont: unknown key, ignored (did you mean `endpoint`?)"]
    );
}
