//! The exporter's HTTP/1.1 client: one POST at a time over `std::net` (rustls for `https`), on a
//! connection kept alive from one export to the next, every step within the export's deadline.
//!
//! A kept connection the receiver closed in the meantime fails before any byte of an answer; the
//! POST is then sent once more on a new connection. Anything unexpected in an answer (no
//! `Content-Length`, a chunked or oversized body, `Connection: close`) closes the connection
//! after it instead of being parsed further.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::settings::Settings;

/// Largest answer head or body read to keep a connection.
const MAX_ANSWER: usize = 64 << 10;

/// An open connection to the receiver.
enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(t) => t,
            Conn::Tls(s) => &s.sock,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(t) => t.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(t) => t.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(t) => t.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// Why an exchange failed.
enum Fail {
    /// The connection was gone before any answer (worth one more try on a new one).
    Stale(String),
    /// Anything else.
    Other(String),
}

/// See the module docs.
#[derive(Default)]
pub struct Client {
    conn: Option<Conn>,
}

impl Client {
    /// POSTs `body` (sent in its parts) to the settings' URL; Ok on a 2xx answer.
    pub fn post(
        &mut self,
        s: &Settings,
        tls: &Arc<rustls::ClientConfig>,
        body: [&[u8]; 2],
    ) -> Result<(), String> {
        let deadline = Instant::now() + s.timeout;
        let head = request_head(s, body[0].len() + body[1].len());
        if let Some(mut conn) = self.conn.take() {
            match exchange(&mut conn, &head, body, deadline) {
                Ok(keep) => {
                    self.conn = keep.then_some(conn);
                    return Ok(());
                }
                Err(Fail::Other(why)) => return Err(why),
                Err(Fail::Stale(_)) => {}
            }
        }
        let mut conn = connect(s, tls, deadline)?;
        match exchange(&mut conn, &head, body, deadline) {
            Ok(keep) => {
                self.conn = keep.then_some(conn);
                Ok(())
            }
            Err(Fail::Stale(why) | Fail::Other(why)) => Err(why),
        }
    }
}

/// What is left of the deadline, or an error once it passed.
fn left(deadline: Instant) -> Result<Duration, String> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| "timed out".to_string())
}

fn request_head(s: &Settings, len: usize) -> String {
    let url = &s.url;
    let default_port = if url.tls { 443 } else { 80 };
    let host = match (url.host.contains(':'), url.port == default_port) {
        (true, true) => format!("[{}]", url.host),
        (true, false) => format!("[{}]:{}", url.host, url.port),
        (false, true) => url.host.clone(),
        (false, false) => format!("{}:{}", url.host, url.port),
    };
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {len}\r\nUser-Agent: openai-api-route/{}\r\n",
        url.path,
        env!("CARGO_PKG_VERSION")
    );
    for (k, v) in &s.headers {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head
}

fn connect(
    s: &Settings,
    tls: &Arc<rustls::ClientConfig>,
    deadline: Instant,
) -> Result<Conn, String> {
    let url = &s.url;
    let addrs = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve the endpoint's host: {e}"))?;
    let mut last = String::from("the endpoint's host has no address");
    let mut tcp = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, left(deadline)?) {
            Ok(t) => {
                tcp = Some(t);
                break;
            }
            Err(e) => last = format!("connect failed: {e}"),
        }
    }
    let tcp = tcp.ok_or(last)?;
    let _ = tcp.set_nodelay(true);
    if !url.tls {
        return Ok(Conn::Plain(tcp));
    }
    let name = rustls::pki_types::ServerName::try_from(url.host.clone())
        .map_err(|_| "the endpoint's host is not a valid TLS server name".to_string())?;
    let conn = rustls::ClientConnection::new(tls.clone(), name).map_err(|e| format!("TLS: {e}"))?;
    Ok(Conn::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
}

/// Writes the request and reads the answer; Ok(whether the connection may be kept) on 2xx.
fn exchange(
    conn: &mut Conn,
    head: &str,
    body: [&[u8]; 2],
    deadline: Instant,
) -> Result<bool, Fail> {
    let other = |e: String| Fail::Other(e);
    let timeouts = |c: &Conn| -> Result<(), Fail> {
        let d = left(deadline).map_err(other)?;
        let _ = c.tcp().set_write_timeout(Some(d));
        c.tcp()
            .set_read_timeout(Some(d))
            .map_err(|e| Fail::Other(e.to_string()))
    };
    let timed_out = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        )
    };
    timeouts(conn)?;
    for part in [head.as_bytes(), body[0], body[1]] {
        if let Err(e) = conn.write_all(part) {
            return Err(if timed_out(&e) {
                Fail::Other("timed out".into())
            } else {
                Fail::Stale(e.to_string())
            });
        }
    }
    let _ = conn.flush();
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > MAX_ANSWER {
            return Err(other("the endpoint's answer head is too long".into()));
        }
        timeouts(conn)?;
        match conn.read(&mut chunk) {
            Ok(0) if buf.is_empty() => {
                return Err(Fail::Stale("the endpoint closed the connection".into()))
            }
            Ok(0) => return Err(other("the endpoint's answer was cut".into())),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) if timed_out(&e) => return Err(other("timed out".into())),
            Err(e) if buf.is_empty() => return Err(Fail::Stale(e.to_string())),
            Err(e) => return Err(other(e.to_string())),
        }
    };
    let text = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = text.split("\r\n");
    // `HTTP/1.1 200 OK`
    let code = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.trim().parse::<u16>().ok())
        .ok_or_else(|| other("the endpoint's answer is not HTTP".into()))?;
    let (mut length, mut keep) = (None, true);
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            length = v.parse::<usize>().ok();
        } else if k.eq_ignore_ascii_case("transfer-encoding")
            || (k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close"))
        {
            keep = false;
        }
    }
    if !(200..300).contains(&code) {
        return Err(other(format!("the endpoint answered HTTP {code}")));
    }
    // The body (an `ExportTraceServiceResponse`, usually empty) is read to keep the connection.
    let Some(length) = length.filter(|n| keep && *n <= MAX_ANSWER) else {
        return Ok(false);
    };
    let mut have = buf.len() - head_end;
    while have < length {
        if timeouts(conn).is_err() {
            return Ok(false);
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return Ok(false),
            Ok(k) => have += k,
        }
    }
    Ok(have == length)
}
