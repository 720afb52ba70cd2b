//! Record columns made from a record's values: `request_body` and `response` cut at
//! `record_body_bytes` (see the observability guide, "Request records"), the client address
//! as text.

use std::borrow::Cow;
use std::net::IpAddr;

use crate::capture::TRUNCATED;

/// Cuts `body` for the `request_body` column: text kept up to `limit` bytes (0 = all) on a char
/// boundary with a marker; binary bodies become a short description.
pub fn request_body_text(body: &[u8], limit: usize) -> Option<Cow<'_, str>> {
    if body.is_empty() {
        return None;
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return Some(format!("[binary body, {} bytes]", body.len()).into());
    };
    if text.as_bytes().contains(&0) {
        return Some(format!("[binary body, {} bytes]", body.len()).into());
    }
    Some(cut(text, limit))
}

/// Cuts a text at `limit` bytes (0 = no limit) on a char boundary, adding the marker. Borrows
/// when nothing is cut: the writer binds it straight from the record.
pub fn cut(text: &str, limit: usize) -> Cow<'_, str> {
    if limit == 0 || text.len() <= limit {
        return Cow::Borrowed(text);
    }
    Cow::Owned(format!(
        "{}{TRUNCATED}",
        crate::escape::cut_bytes(text, limit)
    ))
}

/// Longest address text (an IPv6 address with an embedded IPv4 one is 45 bytes).
const IP_TEXT: usize = 48;

/// An address as text without a heap allocation.
pub struct IpText {
    buf: [u8; IP_TEXT],
    len: usize,
}

/// An address as the `ip` column shows it, formatted on the stack (empty when unknown).
pub fn ip_text(ip: Option<IpAddr>) -> IpText {
    let mut t = IpText {
        buf: [0; IP_TEXT],
        len: 0,
    };
    match ip {
        // By hand: the formatter took 1,100 instructions of the writer's row (see the
        // benchmarks guide, "Recording nearly free"); an IPv4 address is four numbers.
        Some(IpAddr::V4(v4)) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    t.buf[t.len] = b'.';
                    t.len += 1;
                }
                if octet >= 100 {
                    t.buf[t.len] = b'0' + octet / 100;
                    t.len += 1;
                }
                if octet >= 10 {
                    t.buf[t.len] = b'0' + octet / 10 % 10;
                    t.len += 1;
                }
                t.buf[t.len] = b'0' + octet % 10;
                t.len += 1;
            }
        }
        Some(ip) => {
            use std::io::Write;
            let mut w: &mut [u8] = &mut t.buf;
            if write!(w, "{ip}").is_ok() {
                t.len = IP_TEXT - w.len();
            }
        }
        None => {}
    }
    t
}

impl IpText {
    /// The text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_text_is_the_address_as_displayed() {
        let v4 = [
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [10, 0, 100, 9],
            [127, 0, 0, 1],
            [192, 168, 10, 99],
        ];
        for o in v4 {
            let ip = IpAddr::from(o);
            assert_eq!(ip_text(Some(ip)).as_str(), ip.to_string());
        }
        let v6: IpAddr = "2001:db8::ff00:42:8329".parse().unwrap();
        assert_eq!(ip_text(Some(v6)).as_str(), v6.to_string());
        assert_eq!(ip_text(None).as_str(), "");
    }

    #[test]
    fn cuts_and_markers() {
        assert_eq!(cut("héllo", 2), format!("h{TRUNCATED}"));
        assert_eq!(
            request_body_text(&[0xff, 0xfe], 10).unwrap(),
            "[binary body, 2 bytes]"
        );
        assert_eq!(request_body_text(b"", 10), None);
    }
}
