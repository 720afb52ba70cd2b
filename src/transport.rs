//! Connections to upstreams: one TLS config for the process, one pooled awc client per worker,
//! and a TCP wrapper that sets `TCP_NODELAY` and notices end-of-stream.
//!
//! awc reports a connection that closes in the middle of a chunked body exactly like a body
//! that ended properly (its payload stream just ends). To never relay a silently truncated
//! answer as a success, [`UpstreamIo`] raises a thread-local flag whenever a read returns EOF;
//! the relay clears it before each poll of the upstream body and checks it when the body ends.
//! A properly framed body ends on its terminator without reading EOF, so the flag means "cut".

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_rt::net::{ActixStream, Ready, TcpStream};
use actix_service::ServiceExt;
use actix_tls::connect::{Connection, Resolver};
use actix_web::http::Uri;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

thread_local! {
    static EOF_SEEN: Cell<bool> = const { Cell::new(false) };
}

/// Clears the end-of-stream flag before polling an upstream body on this thread.
pub fn clear_eof() {
    EOF_SEEN.with(|f| f.set(false));
}

/// Whether an upstream read on this thread hit end-of-stream since [`clear_eof`].
pub fn eof_seen() -> bool {
    EOF_SEEN.with(|f| f.get())
}

/// An upstream TCP connection (see the module docs).
#[derive(Debug)]
pub struct UpstreamIo(TcpStream);

impl AsyncRead for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.0).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() == before && buf.remaining() > 0
        {
            EOF_SEEN.with(|f| f.set(true));
        }
        res
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl ActixStream for UpstreamIo {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        ActixStream::poll_read_ready(&self.0, cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        ActixStream::poll_write_ready(&self.0, cx)
    }
}

fn wrap(conn: Connection<Uri, TcpStream>) -> Connection<Uri, UpstreamIo> {
    let (io, req) = conn.into_parts();
    // Without this, a request head and body written separately wait on Nagle + delayed ACK.
    let _ = io.set_nodelay(true);
    Connection::new(req, UpstreamIo(io))
}

/// The TLS settings every upstream connection uses, built once.
pub fn tls_config() -> Arc<rustls::ClientConfig> {
    // Only `ring` is compiled in; installing it explicitly keeps awc from guessing.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // HTTP/1.1 to upstreams: predictable streaming and one connection per in-flight request.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// One worker's upstream client: pooled keep-alive connections, no redirects, no default
/// headers (the client's own `User-Agent` passes), our deadlines instead of awc's.
pub fn upstream_client(tls: Arc<rustls::ClientConfig>) -> awc::Client {
    let tcp = actix_tls::connect::Connector::new(Resolver::default())
        .service()
        .map(wrap as fn(_) -> _);
    let connector = awc::Connector::new()
        .connector(tcp)
        .rustls_0_23(tls)
        .timeout(Duration::from_secs(30))
        .limit(0)
        .conn_keep_alive(Duration::from_secs(30));
    awc::Client::builder()
        .connector(connector)
        .disable_timeout()
        .disable_redirects()
        .no_default_headers()
        .finish()
}
