//! `GET /usage` (see docs/members.md, "Usage"): the JSON shape, days from the records by UTC
//! date and model, `days=N`, who may read whose usage, and `-database none`.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::*;

/// alice (rpm 60, tpm 200000, tokens_per_day 5000000, concurrent 8, not the model `bad`), bob,
/// and carol the admin.
fn three_members() -> String {
    format!(
        "  - {{name: alice, key: {ALICE}, rpm: 60, tpm: 200000, tokens_per_day: 5000000, concurrent: 8, deny: [bad]}}\n  - {{name: bob, key: {BOB}}}\n  - {{name: carol, key: {CAROL}, admin: true}}"
    )
}

/// `YYYY-MM-DD` (UTC) of `days_ago` days before now, and an RFC 3339 time at noon that day.
fn day(days_ago: u64) -> (String, String) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - days_ago * 86_400;
    let date = utc_date(secs);
    (date.clone(), format!("{date}T12:00:00.000Z"))
}

/// Records of earlier days written straight into the database, as an older gateway would have.
fn add_old_records(db: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let rows: [(u64, &str, &str, u16, i64, i64); 5] = [
        (1, "alice", "gpt-4o", 200, 100, 10),
        (1, "alice", "gpt-4o", 500, 50, 0),
        (1, "bob", "gpt-4o", 200, 1000, 1000),
        (2, "alice", "o1", 200, 7, 3),
        (40, "alice", "gpt-4o", 200, 1, 1),
    ];
    for (ago, member, model, status, input, output) in rows {
        let (_, at) = day(ago);
        conn.execute(
            "INSERT INTO records (created_at, method, path, model, status, prompt_tokens, \
             completion_tokens, member) VALUES (?1, 'POST', '/v1/chat/completions', ?2, ?3, ?4, ?5, ?6)",
            rusqlite::params![at, model, status, input, output, member],
        )
        .unwrap();
    }
}

/// The JSON as the members guide shows it ("Reading usage"), days from the records grouped by
/// UTC date and model (oldest first), `days=N` choosing how far back.
#[actix_rt::test]
async fn usage_is_the_members_limits_now_and_days_from_the_records() {
    let m = Mock::always(Reply::chat("ok"));
    let db = tempfile::tempdir().unwrap();
    let path = db.path().join("records.sqlite").display().to_string();
    let text = members_config("", &three_members(), &[upstream("up", &m.endpoint(), "")]);
    // A first run creates the table; the records of earlier days are added while it is down.
    drop(Gateway::start_with(&text, &["-database", &path]));
    add_old_records(&path);
    let gw = Gateway::start_with(&text, &["-database", &path]);
    for model in ["gpt-4o", "gpt-4o", "bad"] {
        chat_as(&gw, ALICE, model).await;
    }
    chat_as(&gw, BOB, "gpt-4o").await;
    records_in(std::path::Path::new(&path), 9);
    let now = now_until(&gw, ALICE, |n| n["tokens_today"] == 24).await;
    let got = usage_of(&gw, Some(ALICE), "").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(got
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(got.header("cache-control"), Some("no-store"));
    let (today, yesterday, before) = (day(0).0, day(1).0, day(2).0);
    let row = |date: &str, model: &str, requests, failed, input, output| {
        json!({"date": date, "model": model, "requests": requests, "failed": failed,
               "input_tokens": input, "output_tokens": output})
    };
    let expected = json!({
        "member": "alice",
        "limits": {"rpm": 60, "tpm": 200000, "tokens_per_day": 5000000, "concurrent": 8},
        "now": {"requests_last_minute": 2, "tokens_last_minute": 24, "tokens_today": 24, "in_flight": 0},
        "days": [
            row(&before, "o1", 1, 0, 7, 3),
            row(&yesterday, "gpt-4o", 2, 1, 150, 10),
            row(&today, "bad", 1, 1, 0, 0),
            row(&today, "gpt-4o", 2, 0, 10, 14),
        ],
    });
    assert_eq!(got.json(), expected, "now was {now}");
    // days=1: today only; days=60: the record of 40 days ago too; days=90 is the most.
    let got = usage_of(&gw, Some(ALICE), "?days=1").await;
    let dates: Vec<Value> = got.json()["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["date"].clone())
        .collect();
    assert_eq!(dates, vec![json!(today), json!(today)]);
    let got = usage_of(&gw, Some(ALICE), "?days=60").await;
    assert_eq!(got.json()["days"][0], row(&day(40).0, "gpt-4o", 1, 0, 1, 1));
    assert_eq!(usage_of(&gw, Some(ALICE), "?days=90").await.status, 200);
    // bob's own days are his alone.
    let got = usage_of(&gw, Some(BOB), "").await;
    let days = got.json()["days"].clone();
    assert_eq!(days.as_array().unwrap().len(), 2, "{days}");
    assert_eq!(
        got.json()["limits"],
        json!({"rpm": null, "tpm": null, "tokens_per_day": null, "concurrent": null})
    );
}

/// Who may read whose usage: a member itself; an admin anyone (`?member=`); without a key 401;
/// `days` outside 1–90 is 400. Reading it counts toward no limit.
#[actix_rt::test]
async fn usage_is_the_callers_own_unless_an_admin_asks() {
    let m = Mock::always(Reply::chat("ok"));
    let gw = start(&m.endpoint(), "", &three_members());
    let got = usage_of(&gw, None, "").await;
    assert_eq!(got.status, 401);
    assert_eq!(got.json()["error"]["code"], "invalid_api_key");
    assert_eq!(got.json()["error"]["type"], "invalid_request_error");
    assert_eq!(
        usage_of(&gw, Some("sk-not-a-member-000000000"), "")
            .await
            .status,
        401
    );
    for bad in [
        "?days=0",
        "?days=91",
        "?days=abc",
        "?days=-1",
        "?days=1.5",
        "?days=",
    ] {
        let got = usage_of(&gw, Some(ALICE), bad).await;
        assert_eq!(got.status, 400, "{bad}: {}", got.text());
        assert_eq!(got.json()["error"]["type"], "invalid_request_error");
    }
    let got = usage_of(&gw, Some(BOB), "?member=alice").await;
    assert_eq!(got.status, 403, "{}", got.text());
    assert_eq!(
        usage_of(&gw, Some(BOB), "?member=bob").await.json()["member"],
        "bob"
    );
    let got = usage_of(&gw, Some(CAROL), "?member=alice&days=7").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["member"], "alice");
    assert_eq!(got.json()["limits"]["rpm"], 60);
    assert_eq!(
        usage_of(&gw, Some(CAROL), "").await.json()["member"],
        "carol"
    );
    let got = usage_of(&gw, Some(CAROL), "?member=nobody").await;
    assert_eq!(got.status, 404, "{}", got.text());
    for _ in 0..5 {
        usage_of(&gw, Some(ALICE), "").await;
    }
    assert_eq!(now_of(&gw, ALICE).await["requests_last_minute"], 0);
    assert_eq!(m.hits(), 0);
    // A browser gets the page, which holds no data and no key.
    let page = send(
        "GET",
        &gw.url("/usage"),
        &[("accept", "text/html,*/*")],
        b"",
    )
    .await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().contains("/static/usage.js"));
}

/// With `-database none` there are no records: `days` is empty, the rest is there.
#[actix_rt::test]
async fn without_records_days_are_empty() {
    let m = Mock::always(Reply::chat("ok"));
    let text = members_config("", &three_members(), &[upstream("up", &m.endpoint(), "")]);
    let gw = Gateway::start_with(&text, &["-database", "none"]);
    assert_eq!(chat_as(&gw, ALICE, "gpt-4o").await.status, 200);
    let now = now_until(&gw, ALICE, |n| n["tokens_today"] == 12).await;
    assert_eq!(now["requests_last_minute"], 1);
    let got = usage_of(&gw, Some(ALICE), "?days=90").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["days"], json!([]));
    assert_eq!(got.json()["member"], "alice");
}
