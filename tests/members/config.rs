//! The `members` config (see docs/members.md): what it refuses at start, what an old Go config
//! becomes, `key_sha256`, and `-noauth`.

use serde_json::{json, Value};

use super::*;

/// Starts with `text`, expecting a refusal: what the gateway printed.
fn refused(text: &str) -> String {
    match Gateway::try_start(text, &[]) {
        Ok(_) => panic!("started with a bad config:\n{text}"),
        Err(log) => log,
    }
}

#[test]
fn a_key_given_twice_a_bad_limit_or_a_bad_name_is_refused_at_start() {
    let up = upstream("up", "http://127.0.0.1:9/v1", "");
    let digest = sha256_hex(ALICE);
    let long = "n".repeat(65);
    // (members, global, what the one line must say)
    let cases: Vec<(String, &str, Vec<&str>)> = vec![
        (
            format!("  - {{name: alice, key: {ALICE}}}\n  - {{name: bob, key: {ALICE}}}"),
            "",
            vec!["members[1]", "the same key as member \"alice\""],
        ),
        (
            format!("  - {{name: alice, key: {ALICE}}}\n  - {{name: bob, key_sha256: {digest}}}"),
            "",
            vec!["members[1]", "the same key as member \"alice\""],
        ),
        (
            format!("  - {{name: alice, key: {ALICE}}}"),
            "authorization: [sk-other-token-0000000001, ALICE]",
            vec!["authorization", "also the key of"],
        ),
        (
            format!("  - {{name: alice, key: {ALICE}, rpm: 0}}"),
            "",
            vec!["members[0].rpm", "positive whole number"],
        ),
        (
            format!("  - {{name: alice, key: {ALICE}, tpm: -5}}"),
            "",
            vec!["members[0].tpm", "positive whole number"],
        ),
        (
            format!("  - {{name: alice, key: {ALICE}, tokens_per_day: 1.5}}"),
            "",
            vec!["members[0].tokens_per_day", "positive whole number"],
        ),
        (
            format!("  - {{name: alice, key: {ALICE}, concurrent: eight}}"),
            "",
            vec!["members[0].concurrent"],
        ),
        (
            format!("  - {{name: 'alice smith', key: {ALICE}}}"),
            "",
            vec!["members[0].name", "1 to 64 characters"],
        ),
        (
            format!("  - {{name: {long}, key: {ALICE}}}"),
            "",
            vec!["members[0].name", "1 to 64 characters"],
        ),
        (
            format!("  - {{name: 'al/ice', key: {ALICE}}}"),
            "",
            vec!["members[0].name"],
        ),
        (
            format!("  - {{key: {ALICE}}}"),
            "",
            vec!["members[0].name", "required"],
        ),
        (
            format!("  - {{name: alice, key: {ALICE}}}\n  - {{name: alice, key: {BOB}}}"),
            "",
            vec!["members[1].name", "used by another member"],
        ),
        (
            "  - {name: alice}".to_string(),
            "",
            vec!["members[0]", "needs `key` or `key_sha256`"],
        ),
        (
            "  - {name: alice, key_sha256: abc123}".to_string(),
            "",
            vec!["members[0].key_sha256", "64 hexadecimal digits"],
        ),
        (
            format!("  - {{name: alice, key: {ALICE}, objects: mine}}"),
            "",
            vec!["members[0].objects", "own or all"],
        ),
    ];
    for (members, global, wants) in cases {
        let global = global.replace("ALICE", ALICE);
        let log = refused(&members_config(
            &global,
            &members,
            std::slice::from_ref(&up),
        ));
        for want in wants {
            assert!(
                log.contains(want),
                "{members} / {global}: {want:?} not in:\n{log}"
            );
        }
        assert!(
            log.contains("upstreams.yaml"),
            "the line names the file: {log}"
        );
        assert!(!log.contains(ALICE), "a key was printed: {log}");
    }
}

#[actix_rt::test]
async fn members_alone_need_no_authorization() {
    let m = Mock::always(Reply::chat("ok"));
    let gw = start(
        &m.endpoint(),
        "",
        &format!("  - {{name: alice, key: {ALICE}}}"),
    );
    assert_eq!(chat_as(&gw, ALICE, "gpt-test").await.status, 200);
    let got = chat_as(&gw, "sk-someone-else-000000000", "gpt-test").await;
    assert_eq!(got.status, 401, "{}", got.text());
    assert_eq!(got.json()["error"]["code"], "invalid_api_key");
    assert_eq!(m.hits(), 1);
}

/// Two tokens sharing a label (`sk-…1234`) and a third.
const GO_TOKENS: [&str; 3] = [
    "sk-go-token-aaaaaaaaaa-1234",
    "sk-go-token-bbbbbbbbbb-1234",
    "sk-go-token-cccccccccc-9876",
];

/// A Go config (`authorization` only) keeps working: each token is a member named by its label
/// (`#2` for the second with the same label), without limits, seeing every object.
#[actix_rt::test]
async fn an_authorization_only_go_config_keeps_working() {
    let p = Provider::new("up");
    p.mock
        .set_models(Reply::models(&["gpt-4o", "o1", "whatever"]));
    let text = format!(
        "authorization: {}\nupstreams:\n{}",
        GO_TOKENS.join(", "),
        upstream("up", &p.endpoint(), "")
    );
    let gw = Gateway::start(&text);
    // The first token creates a file; the second reads it, lists it and sees every model.
    let made = call(
        &gw,
        GO_TOKENS[0],
        "POST",
        "/v1/files",
        Some(json!({"x": 1})),
    )
    .await;
    assert_eq!(made.status, 200, "{}", made.text());
    let id = made.json()["id"].as_str().unwrap().to_string();
    let read = call(&gw, GO_TOKENS[1], "GET", &format!("/v1/files/{id}"), None).await;
    assert_eq!(read.status, 200, "{}", read.text());
    let list = call(&gw, GO_TOKENS[2], "GET", "/v1/files", None).await;
    assert_eq!(list.json()["data"][0]["id"], json!(id), "{}", list.text());
    let models = call(&gw, GO_TOKENS[2], "GET", "/v1/models", None).await;
    assert_eq!(models.json()["data"].as_array().unwrap().len(), 3);
    // No limits: no rate-limit headers of the gateway's own.
    assert_eq!(read.header("x-ratelimit-limit-requests"), None);
    for _ in 0..5 {
        assert_eq!(chat_as(&gw, GO_TOKENS[2], "o1").await.status, 200);
    }
    // The model list is answered by the gateway and not recorded.
    let rows = gw.records(8);
    let member_of = |key: &str| -> Vec<Value> {
        rows.iter()
            .filter(|r| r["client_key"] == key)
            .map(|r| r["member"].clone())
            .collect()
    };
    assert_eq!(rows[0]["member"], "sk-…1234");
    assert_eq!(rows[1]["member"], "sk-…1234#2");
    assert_eq!(rows[0]["client_key"], "sk-…1234");
    assert!(member_of("sk-…9876").iter().all(|m| m == "sk-…9876"));
    assert_eq!(member_of("sk-…9876").len(), 6);
    // Each token reads its own usage by its name.
    let u = usage_of(&gw, Some(GO_TOKENS[1]), "").await;
    assert_eq!(u.status, 200, "{}", u.text());
    assert_eq!(u.json()["member"], "sk-…1234#2");
    assert_eq!(
        u.json()["limits"],
        json!({"rpm": null, "tpm": null, "tokens_per_day": null, "concurrent": null})
    );
}

/// `key_sha256` (made as the members guide says) admits the key it is the digest of, and the
/// digest itself is no key.
#[actix_rt::test]
async fn key_sha256_admits_its_key() {
    let m = Mock::always(Reply::chat("ok"));
    let digest = sha256_hex(BOB);
    let gw = start(
        &m.endpoint(),
        "",
        &format!(
            "  - {{name: bob, key_sha256: \"{}\"}}",
            digest.to_uppercase()
        ),
    );
    assert_eq!(chat_as(&gw, BOB, "gpt-test").await.status, 200);
    assert_eq!(chat_as(&gw, &digest, "gpt-test").await.status, 401);
    let rows = gw.records(2);
    assert_eq!(rows[0]["member"], "bob");
    assert_eq!(rows[0]["client_key"], "sk-…0002");
    let log = gw.log();
    assert!(!log.contains(BOB) && !log.contains(&digest), "{log}");
    for file in ["db.sqlite", "db.sqlite-wal"] {
        let bytes = std::fs::read(gw.dir.path().join(file)).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(BOB) && !text.contains(&digest), "{file}");
    }
}

/// With `-noauth` there are no members: no limit, no private object, `member` null.
#[actix_rt::test]
async fn noauth_has_no_members() {
    let m = Mock::always(Reply::chat("ok"));
    let text = members_config(
        "",
        &format!("  - {{name: alice, key: {ALICE}, rpm: 1, allow: [gpt-4o]}}"),
        &[upstream("up", &m.endpoint(), "")],
    );
    let gw = Gateway::start_with(&text, &["-noauth"]);
    for _ in 0..3 {
        let got = chat_as(&gw, ALICE, "o1").await;
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(got.header("x-ratelimit-limit-requests"), None);
    }
    let rows = gw.records(3);
    assert!(rows.iter().all(|r| r["member"].is_null()), "{rows:#?}");
    assert_eq!(usage_of(&gw, Some(ALICE), "").await.status, 401);
    let metrics = scrape(&gw).await;
    assert!(!metrics.text.contains("member=\"alice\""), "{metrics}");
}

/// A reload (SIGHUP) applies new limits and members at once, and a member that stays keeps
/// what it used.
#[actix_rt::test]
async fn a_reload_keeps_what_a_member_used() {
    let m = Mock::always(Reply::chat("ok"));
    let ups = [upstream("up", &m.endpoint(), "")];
    let before =
        format!("  - {{name: alice, key: {ALICE}, rpm: 2}}\n  - {{name: bob, key: {BOB}}}");
    let gw = Gateway::start(&members_config("", &before, &ups));
    for _ in 0..2 {
        assert_eq!(chat_as(&gw, ALICE, "gpt-test").await.status, 200);
    }
    assert_eq!(chat_as(&gw, ALICE, "gpt-test").await.status, 429);
    let after =
        format!("  - {{name: alice, key: {ALICE}, rpm: 3}}\n  - {{name: dave, key: {DAVE}}}");
    std::fs::write(&gw.config_path, members_config("", &after, &ups)).unwrap();
    gw.signal("HUP");
    assert!(eventually(std::time::Duration::from_secs(10), || gw
        .log()
        .contains("SIGHUP: reloaded")));
    // Two of alice's three are already used.
    assert_eq!(chat_as(&gw, ALICE, "gpt-test").await.status, 200);
    let got = chat_as(&gw, ALICE, "gpt-test").await;
    assert_eq!(got.status, 429, "{}", got.text());
    assert!(
        got.text().contains("3 requests per minute"),
        "{}",
        got.text()
    );
    assert_eq!(chat_as(&gw, DAVE, "gpt-test").await.status, 200);
    assert_eq!(chat_as(&gw, BOB, "gpt-test").await.status, 401);
    assert_eq!(m.hits(), 4);
}
