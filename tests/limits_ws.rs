//! The WebSocket limits of version 0.3 (see the security guide, "Second probe (0.3): limits")
//! through the real binary with a real WebSocket client: session caps in all and per token (429
//! before any upstream), the idle timeout (1001 both ways), and the shared budget of partly
//! received frames (1009) with the gateway's memory measured.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use crate::realtime::{connect, recv, status_of, wait_event, wait_gauge, Client, WsMock};
use crate::support::*;

const TOKEN2: &str = "sk-second-token-for-limits-0002";
const TOKEN3: &str = "sk-third-token-for-limits-00003";

/// A config with three client tokens, `global` keys and one WebSocket upstream `good`.
fn three_tokens(good: &WsMock, global: &str) -> String {
    format!(
        "authorization: [{TOKEN}, {TOKEN2}, {TOKEN3}]\n{global}\nupstreams:\n{}",
        upstream("good", &good.endpoint(), "")
    )
}

async fn open_as(gw: &Gateway, token: &str) -> Result<Client, u16> {
    let bearer = format!("Bearer {token}");
    match connect(gw, "/v1/realtime?model=m", &[("authorization", &bearer)]).await {
        Ok((ws, _)) => Ok(ws),
        Err(e) => Err(status_of(e)),
    }
}

#[actix_rt::test]
async fn sessions_beyond_the_caps_get_429_before_any_upstream() {
    let good = WsMock::start();
    let gw = Gateway::start(&three_tokens(
        &good,
        "realtime_max_sessions: 2\nrealtime_max_sessions_per_token: 1",
    ));
    let mut first = open_as(&gw, TOKEN).await.unwrap();
    first.send(Message::text("one")).await.unwrap();
    assert_eq!(recv(&mut first).await, Message::text("one"));
    // The same token again: beyond its one session.
    assert_eq!(open_as(&gw, TOKEN).await.unwrap_err(), 429);
    let _second = open_as(&gw, TOKEN2).await.unwrap();
    // Another token, but two sessions are open in all.
    assert_eq!(open_as(&gw, TOKEN3).await.unwrap_err(), 429);
    assert_eq!(
        good.handshakes().len(),
        2,
        "a refused handshake reached the upstream"
    );
    // A closed session gives its place back.
    first.close(None).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), first.next()).await;
    wait_gauge(&gw, "good", 1).await;
    let mut again = None;
    for _ in 0..50 {
        if let Ok(ws) = open_as(&gw, TOKEN3).await {
            again = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut again = again.expect("the closed session's place was never given back");
    again.send(Message::text("three")).await.unwrap();
    assert_eq!(recv(&mut again).await, Message::text("three"));
    assert_eq!(good.handshakes().len(), 3);
    let rows = gw.records(3);
    let refused: Vec<_> = rows.iter().filter(|r| r["status"] == 429).collect();
    assert_eq!(refused.len(), 2, "{rows:?}");
    assert!(refused
        .iter()
        .all(|r| r["upstream"].is_null() && r["attempts"] == 0));
}

#[actix_rt::test]
async fn a_silent_session_is_closed_with_1001_both_ways() {
    let good = WsMock::start();
    let gw = one_ws(&good, "realtime_idle_timeout: 1");
    // Traffic every 400 ms keeps a session open past the timeout.
    let (mut busy, _) = connect(&gw, "/v1/realtime", &[]).await.unwrap();
    for i in 0..6 {
        busy.send(Message::text(format!("tick{i}"))).await.unwrap();
        assert_eq!(recv(&mut busy).await, Message::text(format!("tick{i}")));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // A silent one is closed after about a second, on both sides.
    let (mut quiet, _) = connect(&gw, "/v1/realtime", &[]).await.unwrap();
    let t = Instant::now();
    match recv(&mut quiet).await {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1001),
        other => panic!("expected a 1001 close, got {other:?}"),
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    wait_event(&good, |e| e.starts_with("close:1001")).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), quiet.next()).await;
    let rows = gw.records(1);
    assert!(
        rows.iter().any(|r| r["status"] == 101
            && r["error"]
                .as_str()
                .unwrap_or("")
                .contains("realtime_idle_timeout")),
        "{rows:?}"
    );
}

/// A gateway with one WebSocket upstream `good` and `global` keys.
fn one_ws(good: &WsMock, global: &str) -> Gateway {
    Gateway::start(&config(global, &[upstream("good", &good.endpoint(), "")]))
}

/// The header of a masked (zero mask) binary frame that announces `len` payload bytes.
fn frame_header(len: u64) -> Vec<u8> {
    let mut h = vec![0x82u8, 0x80 | 127];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0]);
    h
}

/// How a session that sent a partial frame ended up.
#[derive(Debug, PartialEq)]
enum Fate {
    Closed(u16),
    Open,
    Gone,
}

#[actix_rt::test]
async fn partial_frames_of_all_sessions_share_one_bounded_buffer() {
    const SESSIONS: usize = 20;
    const FRAME: u64 = 16 << 20;
    const SENT: usize = 15 << 20;
    const BUDGET: usize = 64 << 20;
    let good = WsMock::start();
    let gw = one_ws(
        &good,
        &format!("realtime_buffer_bytes: {BUDGET}\nrealtime_idle_timeout: 60"),
    );
    let mut clients = Vec::new();
    for _ in 0..SESSIONS {
        let (ws, _) = connect(&gw, "/v1/realtime", &[]).await.unwrap();
        clients.push(ws);
    }
    wait_gauge(&gw, "good", SESSIONS as i64).await;
    let before = gw.mem_kb("VmRSS");
    // Each session announces a 16 MiB frame and sends 15 MiB of it, then holds it.
    let payload = vec![b'p'; SENT];
    join_all(clients.iter_mut().map(|ws| {
        let payload = &payload;
        async move {
            let MaybeTlsStream::Plain(sock) = ws.get_mut() else {
                panic!("not a plain socket");
            };
            let write = async {
                sock.write_all(&frame_header(FRAME)).await?;
                sock.write_all(payload).await?;
                sock.flush().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(15), write).await;
        }
    }))
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = gw.mem_kb("VmRSS");
    let fates = join_all(clients.iter_mut().map(|ws| async move {
        match tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
            Err(_) => Fate::Open,
            Ok(Some(Ok(Message::Close(Some(f))))) => Fate::Closed(u16::from(f.code)),
            Ok(_) => Fate::Gone,
        }
    }))
    .await;
    let grown_mib = held.saturating_sub(before) as f64 / 1024.0;
    let open = fates.iter().filter(|f| **f == Fate::Open).count();
    let closed = fates.iter().filter(|f| **f == Fate::Closed(1009)).count();
    eprintln!(
        "{SESSIONS} sessions × a 16 MiB frame (15 MiB sent) with realtime_buffer_bytes {} MiB: \
         RSS {before} kB → {held} kB (+{grown_mib:.1} MiB); {open} held, {closed} closed with 1009: {fates:?}",
        BUDGET >> 20
    );
    assert!(open <= BUDGET / FRAME as usize, "{fates:?}");
    assert!(closed >= SESSIONS - BUDGET / FRAME as usize, "{fates:?}");
    assert!(
        grown_mib < (BUDGET >> 20) as f64 + 16.0,
        "partial frames pinned {grown_mib:.1} MiB with a {} MiB budget",
        BUDGET >> 20
    );
    // The upstream of a refused session was told too.
    wait_event(&good, |e| e.starts_with("close:1009")).await;
    // Once the held sessions end, the budget is free again: a whole 16 MiB message passes.
    drop(clients);
    wait_gauge(&gw, "good", 0).await;
    let (mut ws, _) = connect(&gw, "/v1/realtime", &[]).await.unwrap();
    let big = vec![9u8; 16 << 20];
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::binary(big));
}
