//! An alert that a Feishu sink refuses: the set-up of the tests that check what an alert, and
//! the log line about its refusal, make of hostile text.

use std::time::Duration;

use super::*;

/// What became of one request for `model` that failed everywhere: the alert's text as the sink
/// received it, and the gateway's log once it says the alert was not delivered.
pub struct RefusedAlert {
    pub gw: Gateway,
    pub alert: String,
    pub log: String,
    _sink: Mock,
    _upstream: Mock,
}

/// Starts a gateway whose one upstream answers 500 and whose Feishu sink refuses every alert with
/// `sink_msg`, sends one chat request for `model` (answered 500), and waits for the alert and for
/// the log line about its refusal.
pub async fn refused_alert(sink_msg: &str, model: &str) -> RefusedAlert {
    let sink = Mock::always(Reply::json(
        200,
        serde_json::json!({"code": 19001, "msg": sink_msg}),
    ));
    let upstream_mock = Mock::always(Reply::status(500));
    let gw = Gateway::start(&config(
        &format!(
            "notify:\n  min_interval: 1\n  feishu: {{webhook: \"http://{}/hook\"}}",
            sink.addr
        ),
        &[upstream("up", &upstream_mock.endpoint(), "")],
    ));
    let got = post(
        &gw,
        "/v1/chat/completions",
        serde_json::json!({"model": model, "messages": []}),
    )
    .await;
    assert_eq!(got.status, 500);
    assert!(eventually(Duration::from_secs(10), || sink.hits() >= 1));
    let alert = sink.seen()[0].json()["content"]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(eventually(Duration::from_secs(10), || gw
        .log()
        .contains("alert not delivered")));
    let log = gw.log();
    RefusedAlert {
        gw,
        alert,
        log,
        _sink: sink,
        _upstream: upstream_mock,
    }
}
