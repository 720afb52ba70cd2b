//! The status page in a real browser (version 0.3; see the observability guide, "Status page"): at
//! 1280 px and on a 390 px phone, with three upstreams with long names and endpoints, the page
//! needs no sideways scroll, every 60-minute chart is visible, and names and endpoints wrap only at
//! natural break points.
//!
//! Headless Chromium (Debian's `chromium`, named by `OPENAI_API_ROUTE_TEST_CHROMIUM`; `.ci/run`
//! installs it) is driven over the DevTools protocol: the page has no JavaScript of its own, so
//! the test evaluates its measuring script in the page from outside. Built without that variable
//! the test is ignored (and counted so in the summary); CI must set it.
//!
//! With `OPENAI_API_ROUTE_SCREENSHOTS=<dir>` it also writes the full-page screenshots kept in
//! `docs/` (`status-desktop.png`, `status-phone.png`, `status-dark.png`): `.ci/screenshots.sh`.

use serde_json::{json, Value};

use crate::support::*;

/// Long, realistic names: separators (`-`, `.`, `_`) are where they may wrap.
const NAMES: [&str; 3] = [
    "azure-openai-eastus2-gpt-4o-production-primary-deployment",
    "openrouter.ai-anthropic-claude-3.5-sonnet-fallback-pool-europe",
    "self_hosted_vllm_llama-3.1-70b-instruct_rack-b07-canary",
];

/// Endpoint paths as long as an Azure deployment's.
const PATHS: [&str; 3] = [
    "/openai/deployments/gpt-4o-2024-08-06-production-eastus2-primary/v1",
    "/api/v1/providers/anthropic/models/claude-3.5-sonnet-20241022/fallback",
    "/cluster/rack-b07/vllm-llama-3.1-70b-instruct-awq/serving/canary/v1",
];

/// What the browser reports about the page; see the script in [`MEASURE`].
const MEASURE: &str = r#"(async () => {
  await document.fonts.ready;
  const de = document.documentElement;
  const vw = de.clientWidth;
  const clipped = (el, r) => {
    for (let a = el.parentElement; a && a !== de; a = a.parentElement) {
      const s = getComputedStyle(a);
      if (s.overflowX !== 'visible' || s.overflowY !== 'visible') {
        const b = a.getBoundingClientRect();
        if (r.left < b.left - 0.5 || r.right > b.right + 0.5 ||
            r.top < b.top - 0.5 || r.bottom > b.bottom + 0.5) return a.className || a.tagName;
      }
    }
    return null;
  };
  const charts = [...document.querySelectorAll('svg.chart')].map(s => {
    const r = s.getBoundingClientRect();
    return { left: r.left, right: r.right, width: r.width, height: r.height,
             clippedBy: clipped(s, r),
             hidden: getComputedStyle(s).visibility !== 'visible' };
  });
  // A line break inside a name or an endpoint is allowed at a space, after a separator, or where
  // the markup allows one (a <wbr>, a <br>: the text nodes on either side differ); nowhere else.
  const breaks = [];
  for (const el of document.querySelectorAll('.name, .endpoint, .facts b')) {
    const chars = [];
    const walk = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    for (let n, k = 0; (n = walk.nextNode()); k++) {
      for (let i = 0; i < n.length; i++) {
        const r = document.createRange();
        r.setStart(n, i); r.setEnd(n, i + 1);
        const rects = r.getClientRects();
        if (rects.length) chars.push({ ch: n.data[i], node: k, top: rects[0].top, bottom: rects[0].bottom });
      }
    }
    for (let i = 1; i < chars.length; i++) {
      const a = chars[i - 1], b = chars[i];
      if (b.top >= a.bottom - 1 && a.node === b.node && !/[\s\/.\-_:?&=@,·]/.test(a.ch) && !/\s/.test(b.ch)) {
        breaks.push(el.textContent.slice(0, 80) + ' | broken between "' +
          chars.slice(Math.max(0, i - 8), i).map(c => c.ch).join('') + '" and "' +
          chars.slice(i, i + 8).map(c => c.ch).join('') + '"');
      }
    }
  }
  return { viewport: vw, scrollWidth: de.scrollWidth, bodyScrollWidth: document.body.scrollWidth,
           innerWidth: innerWidth, charts, breaks, text: document.body.innerText };
})()"#;

/// Three upstreams with long names and endpoints and an hour with traffic and failures: the first
/// fails every other request, the second fails once, the third has taken exactly one attempt.
async fn busy_gateway() -> (Gateway, Vec<Mock>) {
    let first = Mock::script(|_, n| {
        if n % 2 == 0 {
            Reply::status(500)
        } else {
            Reply::chat("ok")
        }
    });
    first.set_models(Reply::models(&["gpt-4o", "gpt-4o-mini", "o3-mini"]));
    let second = Mock::script(|_, n| {
        if n == 0 {
            Reply::status(503)
        } else {
            Reply::chat("ok")
        }
    });
    let third = Mock::always(Reply::chat("ok"));
    third.set_models(Reply::models(&["llama-3.1-70b-instruct"]));
    let mocks = vec![first, second, third];
    let ups: Vec<String> = mocks
        .iter()
        .zip(NAMES.iter().zip(PATHS))
        .map(|(m, (name, path))| upstream(name, &format!("http://{}{path}", m.addr), ""))
        .collect();
    let gw = Gateway::start(&config("cooldown: {failures: 100, seconds: 1}", &ups));
    for _ in 0..8 {
        let got = post(&gw, "/v1/chat/completions", chat_body(false)).await;
        assert_eq!(got.status, 200, "{}", got.text());
    }
    (gw, mocks)
}

#[actix_rt::test]
#[cfg_attr(
    not(test_chromium),
    ignore = "needs headless Chromium: set OPENAI_API_ROUTE_TEST_CHROMIUM"
)]
async fn status_page_fits_1280_and_390_px_with_every_chart_visible() {
    let chromium = service("OPENAI_API_ROUTE_TEST_CHROMIUM");
    let (gw, _mocks) = busy_gateway().await;
    let html = send("GET", &gw.url("/"), &[], b"").await.text();
    assert!(
        !html.contains("<script"),
        "the page works without JavaScript"
    );
    let mut browser = Browser::launch(&chromium).await;
    for (label, width, height, mobile, dark) in LAYOUTS {
        let ready = "document.querySelectorAll('svg.chart').length > 0";
        let session = browser
            .open(&gw.url("/"), (width, height), mobile, dark, ready)
            .await;
        let m = browser.eval(&session, MEASURE).await;
        // Written before the checks, so that a failing layout can be looked at.
        browser
            .keep_screenshot(&session, width, &format!("status-{label}"))
            .await;
        let why = format!("{label} {width}x{height}: {m:#}");
        let viewport = m["viewport"].as_f64().unwrap();
        assert_eq!(viewport, f64::from(width), "{why}");
        assert!(
            m["scrollWidth"].as_f64().unwrap() <= viewport,
            "sideways scroll at {label}: {why}"
        );
        let charts = m["charts"].as_array().unwrap();
        assert_eq!(charts.len(), 6, "two charts per upstream: {why}");
        for c in charts {
            assert!(
                c["left"].as_f64().unwrap() >= 0.0,
                "chart off the left: {why}"
            );
            assert!(
                c["right"].as_f64().unwrap() <= viewport,
                "chart off the right: {why}"
            );
            assert!(
                c["width"].as_f64().unwrap() >= 120.0,
                "chart too narrow: {why}"
            );
            assert!(
                c["height"].as_f64().unwrap() >= 16.0,
                "chart too flat: {why}"
            );
            assert_eq!(
                c["clippedBy"],
                Value::Null,
                "chart scrolled out of sight: {why}"
            );
            assert_eq!(c["hidden"], json!(false), "{why}");
        }
        let breaks = m["breaks"].as_array().unwrap();
        assert!(breaks.is_empty(), "broken mid-word at {label}: {breaks:#?}");
        let text = m["text"].as_str().unwrap();
        for name in NAMES {
            assert!(text.contains(name), "{name} not shown whole at {label}");
        }
    }
    // Counts agree in number: the third upstream took exactly one attempt.
    assert!(html.contains("1 attempt <span"), "{html}");
    for wrong in ["1 attempts", "1 ids", "1 failures"] {
        assert!(!html.contains(wrong), "{wrong} on the page");
    }
}
