//! A running WebSocket session: frames relayed both ways with one-frame backpressure, closes
//! handled on both sides, and the session's record and gauge when it ends.
//!
//! Bounds (version 0.3; see the security guide, "Second probe (0.3): limits"): a frame being read
//! counts against the shared buffer budget from its header until the other side has taken it, and a
//! session in which no whole frame passed either way for `realtime_idle_timeout` is closed with
//! 1001 on both sides (a frame dribbled byte by byte does not keep it open).

use std::cell::Cell;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_codec::Decoder;
use actix_http::ws::{CloseCode, CloseReason, Codec, Frame, Item, OpCode, Parser, ProtocolError};
use actix_web::web::{self, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};

use super::limits::{pending_frame_bytes, BufferBudget, Reservation, Slot};
use super::{Opened, Socket, CLOSE_WAIT, MAX_FRAME_BYTES};
use crate::capture::Reply;
use crate::escape::untrusted;
use crate::ledger::{BodyEnd, Ledger};

/// Room made for each read on the upstream socket while no frame is pending (the codec reserves
/// a partial frame's full size itself). Idle sessions hold no more than this per side.
const READ_CHUNK: usize = 8 * 1024;

/// The client's side of the session: the 101 answer whose body is fed by a one-frame queue.
pub(super) struct ClientBody(pub(super) mpsc::Receiver<Bytes>);

impl Stream for ClientBody {
    type Item = Result<Bytes, actix_web::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|b| b.map(Ok))
    }
}

/// An open session's bookkeeping: its ledger, finished (recorded) when the session ends.
pub(super) struct Live {
    /// The request's ledger, committed to the upstream that accepted.
    pub(super) ledger: Ledger,
    /// The upstream that accepted.
    pub(super) upstream: String,
    /// The session's place in the open-session counts, given back when it ends.
    pub(super) slot: Slot,
    /// `realtime_idle_timeout` as it was when the session opened.
    pub(super) idle: Duration,
    /// The budget of partly received frames.
    pub(super) budget: Arc<BufferBudget>,
}

/// How one direction of a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// The source sent a close frame (relayed, or answered our own).
    Closed,
    /// The source connection ended without a close frame.
    Dropped,
    /// The destination could not take a frame any more.
    DestinationGone,
    /// The source broke the protocol (or sent an oversized frame).
    Protocol(String),
    /// The source's frame would have taken the buffer budget beyond `realtime_buffer_bytes`.
    OverBudget,
}

/// Why a source's next frame is refused.
#[derive(Debug)]
enum FrameRefusal {
    /// A protocol error, or a frame over [`MAX_FRAME_BYTES`].
    Protocol(ProtocolError),
    /// The frame does not fit in what is left of the buffer budget.
    OverBudget,
}

/// Frames from the client: the request payload decoded by a server-side codec.
struct ClientFrames {
    payload: web::Payload,
    buf: BytesMut,
    codec: Codec,
    held: Reservation,
}

/// Frames from the upstream: its socket decoded by a client-side codec.
struct UpstreamFrames {
    io: ReadHalf<Socket>,
    buf: BytesMut,
    codec: Codec,
    held: Reservation,
}

/// The next frame already in `buf`, a protocol error, an oversized frame announced by its
/// header (refused before it is buffered), or a frame the budget cannot hold; None when more
/// bytes are needed. The reservation covers a returned frame until the next call (by then the
/// other side has taken it) and otherwise the incomplete frame `buf` starts with.
fn decoded(
    codec: &mut Codec,
    buf: &mut BytesMut,
    held: &mut Reservation,
) -> Option<Result<Frame, FrameRefusal>> {
    match codec.decode(buf) {
        Ok(Some(f)) => return Some(Ok(f)),
        Ok(None) => {}
        Err(e) => return Some(Err(FrameRefusal::Protocol(e))),
    }
    if too_large(buf) {
        return Some(Err(FrameRefusal::Protocol(ProtocolError::Overflow)));
    }
    (!held.resize(pending_frame_bytes(buf))).then_some(Err(FrameRefusal::OverBudget))
}

/// A source of frames; `None` when the connection ended.
trait Frames {
    async fn next(&mut self) -> Option<Result<Frame, FrameRefusal>>;
}

impl Frames for ClientFrames {
    async fn next(&mut self) -> Option<Result<Frame, FrameRefusal>> {
        loop {
            if let Some(ready) = decoded(&mut self.codec, &mut self.buf, &mut self.held) {
                return Some(ready);
            }
            match self.payload.next().await {
                // Take the chunk as the buffer when nothing is pending (no copy).
                Some(Ok(chunk)) if self.buf.is_empty() => self.buf = BytesMut::from(chunk),
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(_)) | None => return None,
            }
        }
    }
}

impl Frames for UpstreamFrames {
    async fn next(&mut self) -> Option<Result<Frame, FrameRefusal>> {
        loop {
            if let Some(ready) = decoded(&mut self.codec, &mut self.buf, &mut self.held) {
                return Some(ready);
            }
            self.buf.reserve(READ_CHUNK);
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

/// A destination for encoded frames; `send` returns once the frame has been taken.
trait Sink {
    /// Whether frames must be masked (client → server).
    const MASK: bool;
    async fn send(&mut self, bytes: Bytes) -> bool;
}

/// Towards the client: the one-frame queue the 101 body reads from.
struct ToClient(mpsc::Sender<Bytes>);

impl Sink for ToClient {
    const MASK: bool = false;
    async fn send(&mut self, bytes: Bytes) -> bool {
        self.0.send(bytes).await.is_ok()
    }
}

/// Towards the upstream: its socket.
struct ToUpstream(WriteHalf<Socket>);

impl Sink for ToUpstream {
    const MASK: bool = true;
    async fn send(&mut self, bytes: Bytes) -> bool {
        self.0.write_all(&bytes).await.is_ok() && self.0.flush().await.is_ok()
    }
}

/// Whether the frame starting `buf` declares a payload over [`MAX_FRAME_BYTES`]. The codec only
/// checks the size once the whole frame is buffered; this refuses it from its header.
fn too_large(buf: &[u8]) -> bool {
    let declared = match (buf.get(1).map(|b| b & 0x7f), buf.len()) {
        (Some(126), n) if n >= 4 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
        (Some(127), n) if n >= 10 => {
            let mut len = [0u8; 8];
            len.copy_from_slice(&buf[2..10]);
            u64::from_be_bytes(len)
        }
        (Some(len), _) if len < 126 => u64::from(len),
        _ => 0,
    };
    declared > MAX_FRAME_BYTES as u64
}

/// The wire form of `frame` as the other side must see it: same opcode, FIN bit and payload.
fn encode(frame: Frame, mask: bool) -> Bytes {
    let mut dst = BytesMut::new();
    match frame {
        Frame::Text(b) => Parser::write_message(&mut dst, b, OpCode::Text, true, mask),
        Frame::Binary(b) => Parser::write_message(&mut dst, b, OpCode::Binary, true, mask),
        Frame::Ping(b) => Parser::write_message(&mut dst, b, OpCode::Ping, true, mask),
        Frame::Pong(b) => Parser::write_message(&mut dst, b, OpCode::Pong, true, mask),
        Frame::Close(reason) => Parser::write_close(&mut dst, reason, mask),
        Frame::Continuation(Item::FirstText(b)) => {
            Parser::write_message(&mut dst, b, OpCode::Text, false, mask)
        }
        Frame::Continuation(Item::FirstBinary(b)) => {
            Parser::write_message(&mut dst, b, OpCode::Binary, false, mask)
        }
        Frame::Continuation(Item::Continue(b)) => {
            Parser::write_message(&mut dst, b, OpCode::Continue, false, mask)
        }
        Frame::Continuation(Item::Last(b)) => {
            Parser::write_message(&mut dst, b, OpCode::Continue, true, mask)
        }
    }
    dst.freeze()
}

fn close_frame(code: CloseCode, why: &str) -> Frame {
    Frame::Close(Some(CloseReason {
        code,
        description: Some(why.to_string()),
    }))
}

/// The close a session's sides get when it is stopped: why, as a frame.
type StopReason = Option<(CloseCode, &'static str)>;

/// One direction: read a frame from `src`, hand it to `dst`, wait until taken, repeat.
///
/// When the session is stopped (shutdown, or the other direction failed) `dst` gets a close
/// frame and the loop keeps reading `src` only to see its close answer, relaying nothing more.
async fn pump<F: Frames, S: Sink>(
    src: &mut F,
    dst: &mut S,
    stop: &watch::Sender<StopReason>,
    mut stopped: watch::Receiver<StopReason>,
    activity: &Cell<actix_rt::time::Instant>,
) -> End {
    let mut dst_closed = false;
    loop {
        let next = tokio::select! {
            biased;
            changed = stopped.changed(), if !dst_closed => {
                let reason = *stopped.borrow_and_update();
                match (changed, reason) {
                    (Ok(()), Some((code, why))) => {
                        dst_closed = true;
                        if !dst.send(encode(close_frame(code, why), S::MASK)).await {
                            return End::DestinationGone;
                        }
                    }
                    // The session (sender) is gone: nothing more to wait for here.
                    (Err(_), _) => dst_closed = true,
                    _ => {}
                }
                continue;
            }
            next = src.next() => next,
        };
        match next {
            Some(Ok(frame)) => {
                activity.set(actix_rt::time::Instant::now());
                let is_close = matches!(frame, Frame::Close(_));
                if dst_closed {
                    // Our own close is out: only the peer's close answer matters now.
                    if is_close {
                        return End::Closed;
                    }
                    continue;
                }
                if !dst.send(encode(frame, S::MASK)).await {
                    return End::DestinationGone;
                }
                if is_close {
                    return End::Closed;
                }
            }
            Some(Err(e)) => {
                let (code, why) = match &e {
                    FrameRefusal::Protocol(ProtocolError::Overflow) => {
                        (CloseCode::Size, "protocol error on the other side")
                    }
                    FrameRefusal::Protocol(_) => {
                        (CloseCode::Protocol, "protocol error on the other side")
                    }
                    FrameRefusal::OverBudget => {
                        (CloseCode::Size, "the gateway's frame buffers are full")
                    }
                };
                stop.send_if_modified(|r| {
                    let first = r.is_none();
                    if first {
                        *r = Some((code, why));
                    }
                    first
                });
                if !dst_closed {
                    let _ = dst.send(encode(close_frame(code, why), S::MASK)).await;
                }
                return match e {
                    FrameRefusal::Protocol(e) => End::Protocol(e.to_string()),
                    FrameRefusal::OverBudget => End::OverBudget,
                };
            }
            None => {
                if !dst_closed {
                    let _ = dst
                        .send(encode(
                            close_frame(CloseCode::Away, "the other side went away"),
                            S::MASK,
                        ))
                        .await;
                }
                return End::Dropped;
            }
        }
    }
}

/// Runs a session to its end, then records it.
pub(super) async fn relay(
    live: Live,
    payload: web::Payload,
    opened: Opened,
    to_client: mpsc::Sender<Bytes>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _gauge = live.ledger.session_gauge(&live.upstream);

    let (read, write) = tokio::io::split(opened.io);
    let mut from_client = ClientFrames {
        payload,
        buf: BytesMut::new(),
        codec: Codec::new().max_size(MAX_FRAME_BYTES),
        held: Reservation::new(live.budget.clone()),
    };
    let mut from_upstream = UpstreamFrames {
        io: read,
        buf: opened.read_buf,
        codec: Codec::new().max_size(MAX_FRAME_BYTES).client_mode(),
        held: Reservation::new(live.budget.clone()),
    };
    let activity = Cell::new(actix_rt::time::Instant::now());
    let idle = live.idle;
    // The body ends when every sender is gone: keep one until both directions are done, so the
    // client's close answer can still come in after the upstream's close went out.
    let mut client_sink = ToClient(to_client.clone());
    let mut upstream_sink = ToUpstream(write);
    let (stop_tx, stop_rx) = watch::channel::<StopReason>(None);

    let (up_end, down_end, idled) = {
        let up = pump(
            &mut from_client,
            &mut upstream_sink,
            &stop_tx,
            stop_rx.clone(),
            &activity,
        );
        let down = pump(
            &mut from_upstream,
            &mut client_sink,
            &stop_tx,
            stop_rx,
            &activity,
        );
        let mut up = std::pin::pin!(up);
        let mut down = std::pin::pin!(down);
        let mut shutdown_seen = *shutdown.borrow();
        if shutdown_seen {
            stop_tx.send_replace(Some((CloseCode::Away, "server shutting down")));
        }
        let (mut up_end, mut down_end) = (None, None);
        let mut deadline: Option<actix_rt::time::Instant> = None;
        let mut idled = false;
        while up_end.is_none() || down_end.is_none() {
            let idle_at = activity.get() + idle;
            let wait_until = async {
                match deadline {
                    Some(d) => actix_rt::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                end = &mut up, if up_end.is_none() => {
                    up_end = Some(end);
                    deadline.get_or_insert_with(|| actix_rt::time::Instant::now() + CLOSE_WAIT);
                }
                end = &mut down, if down_end.is_none() => {
                    down_end = Some(end);
                    deadline.get_or_insert_with(|| actix_rt::time::Instant::now() + CLOSE_WAIT);
                }
                changed = shutdown.changed(), if !shutdown_seen => {
                    shutdown_seen = true;
                    if changed.is_ok() && *shutdown.borrow() {
                        stop_tx.send_if_modified(|r| {
                            let first = r.is_none();
                            if first {
                                *r = Some((CloseCode::Away, "server shutting down"));
                            }
                            first
                        });
                        deadline.get_or_insert_with(|| actix_rt::time::Instant::now() + CLOSE_WAIT);
                    }
                }
                () = actix_rt::time::sleep_until(idle_at), if !idled && deadline.is_none() => {
                    if activity.get() + idle <= actix_rt::time::Instant::now() {
                        idled = true;
                        stop_tx.send_if_modified(|r| {
                            let first = r.is_none();
                            if first {
                                *r = Some((CloseCode::Away, "idle timeout"));
                            }
                            first
                        });
                        deadline.get_or_insert_with(|| actix_rt::time::Instant::now() + CLOSE_WAIT);
                    }
                }
                () = wait_until => break,
            }
        }
        (up_end, down_end, idled)
    };
    // The upstream connection closes here.
    drop(upstream_sink);
    drop(from_upstream);

    let Live {
        ledger,
        upstream,
        slot,
        ..
    } = live;
    let describe = |who: &str, end: &Option<End>| match end {
        Some(End::Closed) | Some(End::DestinationGone) => None,
        Some(End::Dropped) => Some(format!("{who} connection ended without a close frame")),
        Some(End::Protocol(e)) => Some(format!("{who} broke the WebSocket protocol: {e}")),
        Some(End::OverBudget) => Some(format!(
            "{who} sent a frame beyond what realtime_buffer_bytes leaves free"
        )),
        None => Some(format!(
            "{who} did not close within {}s",
            CLOSE_WAIT.as_secs()
        )),
    };
    log::info!(
        "{} {}: WebSocket session on upstream {} ended after {:.1}s (client: {}, upstream: {})",
        ledger.info().method,
        untrusted(ledger.info().path()),
        upstream,
        ledger.info().started.elapsed().as_secs_f64(),
        describe("client", &up_end).unwrap_or_else(|| "closed".into()),
        describe("upstream", &down_end).unwrap_or_else(|| "closed".into()),
    );
    // An upstream that ends a session without a close frame is noted in the record, but a
    // session that ran is not a failed attempt: it does not count against the upstream's health.
    let end = match describe("upstream", &down_end) {
        Some(why) => BodyEnd::Noted(why),
        None => BodyEnd::Complete,
    };
    let end = match end {
        BodyEnd::Complete if idled => BodyEnd::Noted(format!(
            "closed after {}s without a frame (realtime_idle_timeout)",
            idle.as_secs_f64()
        )),
        end => end,
    };
    ledger.finish_body(end, Reply::default());
    drop(slot);
    drop(client_sink);
    drop(to_client);
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_codec::Decoder;

    #[test]
    fn oversized_frames_are_seen_in_their_header() {
        let mut b = BytesMut::new();
        Parser::write_message(&mut b, vec![0u8; 70_000], OpCode::Binary, true, true);
        assert!(!too_large(&b[..10]));
        let mut head = vec![0x82u8, 0xff];
        head.extend_from_slice(&(MAX_FRAME_BYTES as u64 + 1).to_be_bytes());
        assert!(too_large(&head));
        assert!(!too_large(&head[..9]));
        head[2..10].copy_from_slice(&(MAX_FRAME_BYTES as u64).to_be_bytes());
        assert!(!too_large(&head));
    }

    #[test]
    fn frames_keep_opcode_fin_and_payload() {
        let mut codec = Codec::new().max_size(MAX_FRAME_BYTES);
        for (frame, mask) in [
            (Frame::Text(Bytes::from_static(b"hi")), true),
            (
                Frame::Continuation(Item::FirstBinary(Bytes::from_static(b"a"))),
                true,
            ),
            (
                Frame::Continuation(Item::Continue(Bytes::from_static(b"b"))),
                true,
            ),
            (
                Frame::Continuation(Item::Last(Bytes::from_static(b"c"))),
                true,
            ),
            (Frame::Ping(Bytes::from_static(b"p")), true),
            (close_frame(CloseCode::Other(4000), "bye"), true),
        ] {
            let want = format!("{frame:?}");
            let mut buf = BytesMut::from(&encode(frame, mask)[..]);
            let got = codec.decode(&mut buf).unwrap().unwrap();
            assert_eq!(format!("{got:?}"), want);
            assert!(buf.is_empty());
        }
    }
}
