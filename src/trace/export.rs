//! The exporter: a bounded queue the request path `try_send`s finished span sets into, and one
//! thread that batches them, encodes OTLP protobuf and POSTs it ([`super::http`]: HTTP/1.1 over
//! `std::net`, or rustls for `https`, on a kept-alive connection) with a deadline.
//!
//! Why a thread of its own and not awc: awc's client is `!Send` and lives on the workers, whose
//! event loops must never wait for a trace backend; a plain thread with blocking I/O and a
//! deadline is the simplest thing that cannot slow a request. A full queue drops the span set at
//! once (no waiting), a failed or timed-out export drops its batch; both are counted in
//! `openai_api_route_spans_dropped_total`, and the log says so once per outage.

use std::io;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntCounter;

use super::context::Sampler;
use super::http::Client;
use super::proto::Encoder;
use super::settings::Settings;
use super::Finished;

/// What the queue carries. Spans travel by value (no allocation per request to box them); the
/// channel's buffer is allocated once: queue size × ~360 bytes (720 KiB at the default 2048).
#[allow(clippy::large_enum_variant)]
enum Msg {
    /// One request's spans.
    Spans(Finished),
    /// Export what is queued now, then answer (at shutdown).
    Flush(mpsc::Sender<()>),
}

/// The process's trace pipeline (in [`crate::state::AppState`] when tracing is on). Cheap to
/// share: the sender is `Sync`.
pub struct Tracer {
    tx: SyncSender<Msg>,
    sampler: Sampler,
    dropped: IntCounter,
}

impl Tracer {
    /// Starts the exporter thread; `dropped` is `openai_api_route_spans_dropped_total`, `tls` the
    /// process's TLS settings (for an `https` endpoint).
    pub fn start(
        settings: Settings,
        dropped: IntCounter,
        tls: Arc<rustls::ClientConfig>,
    ) -> io::Result<Tracer> {
        let (tx, rx) = mpsc::sync_channel(settings.queue);
        let sampler = settings.sampler;
        let counter = dropped.clone();
        log::info!(
            "tracing on: OTLP/HTTP to {} (service {:?})",
            settings.url.display(),
            settings.service_name
        );
        std::thread::Builder::new()
            .name("otlp-exporter".into())
            .spawn(move || Exporter::new(settings, counter, tls).run(rx))?;
        Ok(Tracer {
            tx,
            sampler,
            dropped,
        })
    }

    /// Which traces are kept.
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// Queues one request's spans; never waits (a full queue drops and counts them).
    pub fn submit(&self, f: Finished) {
        match self.tx.try_send(Msg::Spans(f)) {
            Ok(()) => {}
            Err(TrySendError::Full(Msg::Spans(f)) | TrySendError::Disconnected(Msg::Spans(f))) => {
                self.dropped.inc_by(f.len() as u64);
            }
            Err(_) => {}
        }
    }

    /// Exports what is queued, waiting at most `wait` (shutdown).
    pub fn flush(&self, wait: Duration) {
        let (ack, done) = mpsc::channel();
        let deadline = Instant::now() + wait;
        let mut msg = Msg::Flush(ack);
        // The queue may be full for a moment: try until the deadline, never block on it.
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
        let _ = done.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// Longest sleep of the exporter between two looks at the queue: at 40,000 spans a second the
/// default queue (2048 requests) holds a tick's worth with room to spare.
const TICK: Duration = Duration::from_millis(50);

/// The exporter thread's state.
struct Exporter {
    settings: Settings,
    dropped: IntCounter,
    tls: Arc<rustls::ClientConfig>,
    batch: Vec<Finished>,
    spans: usize,
    /// Kept from one export to the next: its buffers and spans are rewritten, not rebuilt.
    encoder: Encoder,
    /// Keeps the connection to the receiver between exports.
    client: Client,
    due: Option<Instant>,
    failing: bool,
}

impl Exporter {
    fn new(settings: Settings, dropped: IntCounter, tls: Arc<rustls::ClientConfig>) -> Exporter {
        Exporter {
            settings,
            dropped,
            tls,
            batch: Vec::new(),
            spans: 0,
            encoder: Encoder::default(),
            client: Client::default(),
            due: None,
            failing: false,
        }
    }

    /// Drains the queue every tick instead of blocking on it: a receiver blocked in `recv` must
    /// be woken by every `try_send` (a futex call and a context switch per request, measured at
    /// ~14 µs of CPU per request under load); one that polls is never woken by a sender.
    fn run(mut self, rx: Receiver<Msg>) {
        let tick = self.settings.delay.min(TICK);
        loop {
            loop {
                match rx.try_recv() {
                    Ok(Msg::Spans(f)) => {
                        self.spans += f.len();
                        self.batch.push(f);
                        if self.due.is_none() {
                            self.due = Some(Instant::now() + self.settings.delay);
                        }
                        if self.spans >= self.settings.batch {
                            self.export();
                        }
                    }
                    Ok(Msg::Flush(ack)) => {
                        self.export();
                        let _ = ack.send(());
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.export();
                        return;
                    }
                }
            }
            if self.due.is_some_and(|d| d <= Instant::now()) {
                self.export();
            }
            std::thread::sleep(tick);
        }
    }

    /// Sends the batch; a failure drops (and counts) its spans.
    fn export(&mut self) {
        self.due = None;
        if self.batch.is_empty() {
            return;
        }
        let body = self
            .encoder
            .encode(&self.settings.service_name, &self.batch);
        let n = self.spans;
        self.batch.clear();
        self.spans = 0;
        match self.client.post(&self.settings, &self.tls, body) {
            Ok(()) => {
                if self.failing {
                    log::info!(
                        "trace export to {} works again",
                        self.settings.url.display()
                    );
                    self.failing = false;
                }
            }
            Err(why) => {
                self.dropped.inc_by(n as u64);
                if !self.failing {
                    log::warn!(
                        "trace export to {} failed, spans are dropped until it works: {why}",
                        self.settings.url.display()
                    );
                    self.failing = true;
                }
            }
        }
    }
}
