//! The command line and config validation as a user meets them (see the configuration guide).

use std::process::Command;

use crate::support::*;

fn run(args: &[&str], config: Option<&str>) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("upstreams.yaml");
    if let Some(c) = config {
        std::fs::write(&path, c).unwrap();
    }
    let mut all: Vec<String> = vec!["-config".into(), path.display().to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    let out = Command::new(env!("CARGO_BIN_EXE_openai-api-route"))
        .args(&all)
        .env("RUST_LOG", "warn")
        .env("UPSTREAM_KEY", "sk-from-env-secret")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configs_give_one_clear_line_and_exit_non_zero() {
    let cases: &[(&str, &str)] = &[
        ("upstreams: [", "invalid YAML"),
        (
            "authorization: x\nlb_policy: fastest\nupstreams:\n  - endpoint: http://h/v1\n",
            "lb_policy: unknown policy \"fastest\"",
        ),
        (
            "authorization: x\nupstreams:\n  - sk: k\n",
            "upstreams[0].endpoint: missing",
        ),
        (
            "authorization: x\nupstreams:\n  - endpoint: ftp://h/v1\n",
            "upstreams[0].endpoint: \"ftp://h/v1\" is not an http(s) URL",
        ),
        (
            "upstreams:\n  - endpoint: http://h/v1\n",
            "authorization: no client token configured",
        ),
        (
            "authorization: x\nupstreams: []\n",
            "upstreams: at least one upstream is required",
        ),
        (
            "authorization: x\ntimeout: soon\nupstreams:\n  - endpoint: http://h/v1\n",
            "timeout: expected a non-negative number",
        ),
        (
            "authorization: x\ndbtype: postgres\ndbaddr: ./db.sqlite\nupstreams:\n  - endpoint: http://h/v1\n",
            "dbaddr: with dbtype: postgres, give a postgres:// URL",
        ),
        (
            "authorization: x\ndbtype: postgres\nupstreams:\n  - endpoint: http://h/v1\n",
            "dbaddr: with dbtype: postgres, give a postgres:// URL",
        ),
    ];
    for (yaml, expected) in cases {
        let (code, _, err) = run(&["-addr", "127.0.0.1:0"], Some(yaml));
        assert_eq!(code, Some(2), "{yaml}: {err}");
        assert!(
            err.contains("upstreams.yaml") && err.contains(expected),
            "{yaml}\nexpected {expected:?} in:\n{err}"
        );
        assert!(!err.contains("listening"), "must not listen");
    }
    let (code, _, err) = run(&[], None);
    assert_eq!(code, Some(2));
    assert!(err.contains("upstreams.yaml: cannot read file"), "{err}");
}

#[test]
fn original_go_config_loads_and_list_shows_no_key() {
    let yaml = "authorization: woshimima\nupstreams:\n  - sk: \"secret_key_1\"\n    endpoint: \"https://api.openai.com/v2\"\n  - sk: \"${UPSTREAM_KEY}\"\n    endpoint: \"https://api.openai.com/v1\"\n    timeout: 30\n    allow: [gpt-4o]\n";
    for flag in ["-list", "--list", "-list=true"] {
        let (code, out, err) = run(&[flag], Some(yaml));
        assert_eq!(code, Some(0), "{err}");
        assert!(out.contains("1. api.openai.com  endpoint=https://api.openai.com/v2  timeout=60s  stream_timeout=5s"), "{out}");
        assert!(
            out.contains("2. api.openai.com#2  endpoint=https://api.openai.com/v1  timeout=30s"),
            "{out}"
        );
        assert!(out.contains("allow=gpt-4o"));
        for secret in ["secret_key_1", "sk-from-env-secret", "woshimima"] {
            assert!(
                !out.contains(secret) && !err.contains(secret),
                "{secret} printed"
            );
        }
    }
}

#[test]
fn unknown_keys_warn_but_load() {
    let (code, out, err) = run(&["-list"], Some("authorization: x\ndbtype: sqlite\nfancy: 1\nupstreams:\n  - endpoint: http://h/v1\n    colour: red\n"));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("1. h  endpoint=http://h/v1"));
    assert!(err.contains("fancy: unknown key, ignored"), "{err}");
    assert!(
        err.contains("upstreams[0].colour: unknown key, ignored"),
        "{err}"
    );
    assert!(
        !err.contains("dbtype"),
        "the Go tool's keys are known: {err}"
    );
}

#[test]
fn a_misspelt_key_gets_the_nearest_known_one_also_when_the_file_has_errors() {
    // The misspelt `endpoint` is the cause of the error: the warning must reach the user with it.
    let (code, _, err) = run(
        &["-addr", "127.0.0.1:0"],
        Some("authorization: x\nstream-timeout: 3\nupstreams:\n  - endpont: http://h/v1\n"),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("upstreams[0].endpont: unknown key, ignored (did you mean `endpoint`?)"),
        "{err}"
    );
    assert!(
        err.contains("stream-timeout: unknown key, ignored (did you mean `stream_timeout`?)"),
        "{err}"
    );
    assert!(err.contains("upstreams[0].endpoint: missing"), "{err}");
    assert!(!err.contains("listening"), "must not listen: {err}");
    // A file that loads gets the suggestion too; a key near nothing known gets none.
    let (code, _, err) = run(
        &["-list"],
        Some("authorization: x\ntimout: 5\nzz: 1\nupstreams:\n  - endpoint: http://h/v1\n"),
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("timout: unknown key, ignored (did you mean `timeout`?)"),
        "{err}"
    );
    assert!(err.contains("zz: unknown key, ignored\n"), "{err}");
}

#[test]
fn version_and_help() {
    for flag in ["-version", "--version"] {
        let (code, out, _) = run(&[flag], None);
        assert_eq!(code, Some(0));
        assert!(out.contains(env!("CARGO_PKG_VERSION")));
    }
    let (code, out, _) = run(&["-help"], None);
    assert_eq!(code, Some(0));
    for flag in ["--addr", "--upstreams", "--database", "--list", "--noauth"] {
        assert!(out.contains(flag), "{flag} missing from help:\n{out}");
    }
    // The README and the Go tool say `-config`: the help names it too.
    assert!(out.contains("-config"), "-config missing from help:\n{out}");
}

#[actix_rt::test]
async fn go_style_flags_and_flag_beats_config() {
    let m = Mock::always(Reply::chat("x"));
    // `address` in the file is used when no flag is given; here the flag wins.
    let yaml = format!(
        "address: 127.0.0.1:1\n{}",
        config("", &[upstream("u", &m.endpoint(), "")])
    );
    for form in [["-addr=127.0.0.1:0"], ["--addr=127.0.0.1:0"]] {
        let gw = Gateway::start_with(&yaml, &form);
        assert!(
            gw.addr.starts_with("127.0.0.1:") && !gw.addr.ends_with(":1"),
            "{}",
            gw.addr
        );
        assert_eq!(
            post(&gw, "/v1/chat/completions", chat_body(false))
                .await
                .status,
            200
        );
    }
}

#[actix_rt::test]
async fn colon_port_listens_on_all_interfaces() {
    let m = Mock::always(Reply::chat("x"));
    let probe = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let gw = Gateway::start_with(
        &config("", &[upstream("u", &m.endpoint(), "")]),
        &["-addr", &format!(":{port}")],
    );
    assert_eq!(gw.addr, format!("0.0.0.0:{port}"));
    let got = send("GET", &format!("http://127.0.0.1:{port}/healthz"), &[], b"").await;
    assert_eq!(got.status, 200);
}

#[test]
fn a_bad_trace_setting_stops_the_start_naming_its_source() {
    let cases: &[(&str, &str)] = &[
        (
            "authorization: x\notel: {endpoint: ftp://collector:4318}\nupstreams:\n  - endpoint: http://h/v1\n",
            "upstreams.yaml: otel.endpoint: the OTLP endpoint must be an http:// or https:// URL",
        ),
        (
            "authorization: x\notel: {endpoint: http://c:4318/v1/traces, sampler: sometimes}\nupstreams:\n  - endpoint: http://h/v1\n",
            "upstreams.yaml: otel.sampler:",
        ),
    ];
    for (yaml, expected) in cases {
        let (code, _, err) = run(&["-addr", "127.0.0.1:0"], Some(yaml));
        assert!(code.is_some_and(|c| c != 0), "{yaml}: {err}");
        assert!(
            err.contains(expected),
            "{yaml}\nexpected {expected:?} in:\n{err}"
        );
        assert!(!err.contains("listening"), "must not listen");
    }
}

#[test]
fn the_example_config_loads_without_a_warning() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/upstreams.example.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_openai-api-route"))
        .args(["-config", example, "-list"])
        .env("RUST_LOG", "warn")
        .env("GATEWAY_TOKEN", "example-token")
        .env("OPENAI_API_KEY", "sk-example-secret")
        .output()
        .unwrap();
    let (out_text, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.trim().is_empty(), "warnings: {err}");
    assert!(out_text.contains("1. openai"), "{out_text}");
    assert!(!out_text.contains("sk-example-secret"), "{out_text}");
}
