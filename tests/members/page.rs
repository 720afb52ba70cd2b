//! The usage page (`GET /usage` asked by a browser, see docs/members.md) in headless Chromium at
//! 1280 and 390 px: a wrong key gets a clear message; the right one draws the gauges, the bars
//! and the table without sideways scroll; and the key never leaves the tab's session storage
//! except in the `Authorization` header — not in the page's URL, any request's URL, local
//! storage, a cookie or the page itself.
//!
//! With `OPENAI_API_ROUTE_SCREENSHOTS=<dir>` it also writes `usage-desktop.png`,
//! `usage-phone.png` and `usage-dark.png` (`.ci/screenshots.sh` keeps them in `docs/`).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::*;

const WRONG: &str = "sk-this-is-not-a-member-key-77";

/// What the page shows once drawn; measured in the page.
const MEASURE: &str = r#"(() => {
  const de = document.documentElement;
  const vw = de.clientWidth;
  const box = el => { const r = el.getBoundingClientRect();
    return { left: r.left, right: r.right, width: r.width, height: r.height,
             visible: getComputedStyle(el).visibility === 'visible' && r.width > 0 && r.height > 0 }; };
  const bars = [...document.querySelectorAll('#bars .bar')].map(b => {
    const r = b.getBoundingClientRect();
    const filled = [...b.children].reduce((h, s) => h + s.getBoundingClientRect().height, 0);
    return { left: r.left, right: r.right, width: r.width, filled };
  });
  return {
    viewport: vw, scrollWidth: de.scrollWidth, bodyScrollWidth: document.body.scrollWidth,
    chart: box(document.getElementById('bars')),
    bars,
    gauges: [...document.querySelectorAll('.gauge')].map(g => ({
      text: g.innerText, box: box(g), meter: box(g.querySelector('.meter')),
      fill: g.querySelector('.meter > span').getBoundingClientRect().width })),
    rows: [...document.querySelectorAll('#models tbody tr')].map(r => r.innerText),
    who: document.getElementById('who').textContent,
  };
})()"#;

/// Where the key could have gone besides session storage and the Authorization header.
const LEAKS: &str = r#"(() => {
  const local = []; for (let i = 0; i < localStorage.length; i++) {
    const k = localStorage.key(i); local.push(k + '=' + localStorage.getItem(k)); }
  const session = []; for (let i = 0; i < sessionStorage.length; i++) {
    const k = sessionStorage.key(i); session.push(sessionStorage.getItem(k)); }
  return { href: location.href, local: local.join('\n'), cookie: document.cookie,
           html: document.documentElement.outerHTML, session,
           inputs: [...document.querySelectorAll('input')].map(i => i.value).join('\n') };
})()"#;

/// Records of the last three weeks for `member`, as a gateway that ran that long would hold.
fn weeks_of_records(db: &str, member: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for ago in 0..21u64 {
        let secs = now - ago * 86_400;
        let at = format!("{}T01:00:00.000Z", utc_date(secs));
        for (i, model) in ["gpt-4o", "gpt-4o-mini", "o3-mini"].iter().enumerate() {
            if (ago + i as u64) % 4 == 3 {
                continue;
            }
            let input = 20_000 + (ago * 7_919 + i as u64 * 3_001) % 60_000;
            let output = input / (2 + i as u64);
            let status = if (ago + i as u64).is_multiple_of(9) {
                500
            } else {
                200
            };
            conn.execute(
                "INSERT INTO records (created_at, method, path, model, status, prompt_tokens, \
                 completion_tokens, member) VALUES (?1, 'POST', '/v1/chat/completions', ?2, ?3, ?4, ?5, ?6)",
                rusqlite::params![at, model, status, input as i64, output as i64, member],
            )
            .unwrap();
        }
    }
}

async fn wait_for(browser: &mut Browser, session: &str, expression: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while browser.eval(session, expression).await != json!(true) {
        assert!(Instant::now() < deadline, "never true: {expression}");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Types `key` into the key field as a person would, and submits.
async fn enter_key(browser: &mut Browser, session: &str, key: &str) {
    browser
        .eval(session, "document.getElementById('key').focus(), true")
        .await;
    browser
        .call(Some(session), "Input.insertText", json!({"text": key}))
        .await;
    browser
        .eval(
            session,
            "document.querySelector('#key-form button[type=submit]').click(), true",
        )
        .await;
}

#[actix_rt::test]
#[cfg_attr(
    not(test_chromium),
    ignore = "needs headless Chromium: set OPENAI_API_ROUTE_TEST_CHROMIUM"
)]
async fn the_usage_page_draws_a_members_use_and_keeps_the_key_in_the_tab() {
    let chromium = service("OPENAI_API_ROUTE_TEST_CHROMIUM");
    let m = Mock::always(Reply::chat("ok"));
    let db = tempfile::tempdir().unwrap();
    let path = db.path().join("records.sqlite").display().to_string();
    let members = format!(
        "  - {{name: alice-research_team.eu, key: {ALICE}, rpm: 60, tpm: 200000, tokens_per_day: 5000000, concurrent: 8}}"
    );
    let text = members_config("", &members, &[upstream("up", &m.endpoint(), "")]);
    drop(Gateway::start_with(&text, &["-database", &path]));
    weeks_of_records(&path, "alice-research_team.eu");
    let gw = Gateway::start_with(&text, &["-database", &path]);
    for _ in 0..3 {
        assert_eq!(chat_as(&gw, ALICE, "gpt-4o").await.status, 200);
    }
    let mut browser = Browser::launch(&chromium).await;
    for (label, width, height, mobile, dark) in LAYOUTS {
        let ready = "document.getElementById('key-form') !== null";
        let session = browser
            .open(&gw.url("/usage"), (width, height), mobile, dark, ready)
            .await;
        let s = session.as_str();
        browser.call(Some(s), "Network.enable", json!({})).await;
        browser.events.clear();

        // A wrong key: a clear message, nothing drawn, nothing kept.
        enter_key(&mut browser, s, WRONG).await;
        wait_for(
            &mut browser,
            s,
            "!document.getElementById('message').hidden",
        )
        .await;
        let message = browser
            .eval(s, "document.getElementById('message').innerText")
            .await;
        let message = message.as_str().unwrap().to_string();
        assert!(message.contains("not accepted"), "{label}: {message}");
        let shown = browser
            .eval(s, "document.getElementById('data').hidden")
            .await;
        assert_eq!(shown, json!(true), "{label}");

        // The right key: everything drawn.
        enter_key(&mut browser, s, ALICE).await;
        wait_for(
            &mut browser,
            s,
            "!document.getElementById('data').hidden && document.querySelectorAll('#bars .bar').length > 0",
        )
        .await;
        let hidden = browser
            .eval(
                s,
                "[document.getElementById('message').hidden, document.getElementById('ask').hidden]",
            )
            .await;
        assert_eq!(
            hidden,
            json!([true, true]),
            "{label}: the old message or the form stayed"
        );
        let got = browser.eval(s, MEASURE).await;
        browser
            .keep_screenshot(s, width, &format!("usage-{label}"))
            .await;
        let why = format!("{label} {width}x{height}: {got:#}");
        let viewport = got["viewport"].as_f64().unwrap();
        assert_eq!(viewport, f64::from(width), "{why}");
        assert!(
            got["scrollWidth"].as_f64().unwrap() <= viewport,
            "sideways scroll: {why}"
        );
        assert_eq!(got["who"], "alice-research_team.eu");
        // Thirty days of bars, all inside the page, the days with tokens visibly filled.
        let chart = &got["chart"];
        assert_eq!(chart["visible"], true, "{why}");
        assert!(chart["height"].as_f64().unwrap() >= 100.0, "{why}");
        let bars = got["bars"].as_array().unwrap();
        assert_eq!(bars.len(), 30, "{why}");
        for b in bars {
            assert!(b["left"].as_f64().unwrap() >= 0.0, "{why}");
            assert!(b["right"].as_f64().unwrap() <= viewport, "{why}");
            assert!(b["width"].as_f64().unwrap() >= 1.0, "{why}");
        }
        let filled = bars
            .iter()
            .filter(|b| b["filled"].as_f64().unwrap() >= 4.0)
            .count();
        assert!(filled >= 15, "{filled} bars drawn: {why}");
        // Four gauges; the three of limits that are in use show a fill.
        let gauges = got["gauges"].as_array().unwrap();
        assert_eq!(gauges.len(), 4, "{why}");
        for g in gauges {
            assert_eq!(g["box"]["visible"], true, "{why}");
            assert_eq!(g["meter"]["visible"], true, "{why}");
            assert!(g["box"]["right"].as_f64().unwrap() <= viewport, "{why}");
        }
        // The three requests' 36 tokens today (the requests themselves leave the minute's gauge
        // after 60 s, which a slow machine may take to get here).
        let today = gauges[2]["text"].as_str().unwrap();
        assert!(today.contains("36 / 5,000,000"), "{why}");
        assert!(gauges[2]["fill"].as_f64().unwrap() > 0.0, "{why}");
        assert!(
            gauges[0]["text"].as_str().unwrap().contains(" / 60"),
            "{why}"
        );
        let rows: Vec<&str> = got["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        assert_eq!(rows.len(), 3, "{why}");
        assert!(rows[0].starts_with("gpt-4o"), "{why}");

        // Where the key is, and where it is not.
        let leaks = browser.eval(s, LEAKS).await;
        assert_eq!(leaks["session"], json!([ALICE]), "{label}: {leaks:#}");
        for (what, v) in [
            ("the page's URL", &leaks["href"]),
            ("local storage", &leaks["local"]),
            ("a cookie", &leaks["cookie"]),
            ("the page", &leaks["html"]),
            ("an input", &leaks["inputs"]),
        ] {
            let v = v.as_str().unwrap();
            assert!(
                !v.contains(ALICE) && !v.contains(WRONG),
                "{label}: the key is in {what}"
            );
        }
        let cookies = browser.call(Some(s), "Network.getCookies", json!({})).await;
        assert!(!cookies.to_string().contains(ALICE), "{label}: {cookies}");
        let sent: Vec<&Value> = browser
            .events
            .iter()
            .filter(|e| e["method"] == "Network.requestWillBeSent")
            .map(|e| &e["params"]["request"])
            .collect();
        let usage: Vec<&&Value> = sent
            .iter()
            .filter(|r| r["url"].as_str().unwrap().contains("/usage?"))
            .collect();
        assert_eq!(usage.len(), 2, "{label}: the two asks: {sent:#?}");
        assert_eq!(
            usage[1]["headers"]["Authorization"],
            json!(format!("Bearer {ALICE}"))
        );
        for r in &sent {
            let url = r["url"].as_str().unwrap();
            assert!(
                !url.contains(ALICE) && !url.contains(WRONG),
                "{label}: {url}"
            );
            assert!(
                url.starts_with(&gw.url("/")),
                "{label}: a request elsewhere: {url}"
            );
        }
    }
    // A reload of the tab shows the usage again from the key in its session storage.
    let ready = "document.getElementById('key-form') !== null";
    let session = browser
        .open(&gw.url("/usage"), (1280, 900), false, false, ready)
        .await;
    let fresh = browser.eval(&session, "sessionStorage.length").await;
    assert_eq!(fresh, json!(0), "a new tab starts without the key");
    enter_key(&mut browser, &session, ALICE).await;
    wait_for(
        &mut browser,
        &session,
        "!document.getElementById('data').hidden",
    )
    .await;
    browser.call(Some(&session), "Page.reload", json!({})).await;
    wait_for(
        &mut browser,
        &session,
        "document.readyState === 'complete' && !document.getElementById('data').hidden",
    )
    .await;
    // "Forget key" takes it out of the tab.
    browser
        .eval(&session, "document.getElementById('forget').click(), true")
        .await;
    let after = browser
        .eval(
            &session,
            "[sessionStorage.length, document.getElementById('ask').hidden, document.getElementById('data').hidden]",
        )
        .await;
    assert_eq!(after, json!([0, false, true]));
}
