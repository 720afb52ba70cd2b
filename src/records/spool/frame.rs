//! The spool's frames: one record each, `[len u32][len ^ CHECK u32][record]`, the record's
//! fields in a fixed order, little-endian, lengths as u32 (`u32::MAX`: none). Written and read
//! by this program only, but read as hostile all the same: a frame that does not read stops the
//! reading, never a misread row.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use actix_web::http::header::HeaderValue;
use actix_web::http::{Method, Uri};
use actix_web::web::Bytes;

use super::super::Record;

/// Mixed into each frame's length as its check: a torn or zeroed tail fails it.
const CHECK: u32 = 0xA5C3_5A3C;
/// Frame head: length and check.
pub const FRAME_HEAD: usize = 8;

/// Appends `records` as frames to `buf`, offering the CPU every 16 (see `priority.rs`).
pub fn encode_all(records: &[Record], buf: &mut Vec<u8>) {
    for (i, r) in records.iter().enumerate() {
        let at = buf.len();
        buf.extend_from_slice(&[0; FRAME_HEAD]);
        encode(r, buf);
        let len = (buf.len() - at - FRAME_HEAD) as u32;
        buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
        buf[at + 4..at + 8].copy_from_slice(&(len ^ CHECK).to_le_bytes());
        if i % 16 == 15 {
            super::super::priority::pause_point();
        }
    }
}

/// The length of the frame starting with `head` (its head included), for a read that must hold
/// all of it; None when the head does not check out.
pub fn checked_frame_len(head: &[u8; FRAME_HEAD]) -> Option<u64> {
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let check = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    (len ^ CHECK == check).then(|| u64::from(len) + FRAME_HEAD as u64)
}

/// The whole frames of `bytes` (which start at file offset `base`), the file offset just after
/// each, and where reading stopped if a frame did not read (None: all of `bytes` read, or it
/// ends inside a frame that a longer read completes).
pub fn decode_frames(
    bytes: &Bytes,
    base: u64,
    names: &mut Names,
) -> (Vec<Record>, Vec<u64>, Option<u64>) {
    let (mut out, mut ends) = (Vec::new(), Vec::new());
    let mut at = 0usize;
    let word = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    while bytes.len() - at >= FRAME_HEAD {
        let (len, check) = (word(at), word(at + 4));
        if len ^ CHECK != check {
            return (out, ends, Some(base + at as u64));
        }
        let start = at + FRAME_HEAD;
        let Some(end) = start
            .checked_add(len as usize)
            .filter(|&e| e <= bytes.len())
        else {
            break;
        };
        match decode(&bytes.slice(start..end), names) {
            Some(r) => {
                out.push(r);
                ends.push(base + end as u64);
            }
            None => return (out, ends, Some(base + at as u64)),
        }
        at = end;
    }
    (out, ends, None)
}

// ---- the record's encoding: fixed order, little-endian, lengths as u32 (u32::MAX: none) ----

const NONE: u32 = u32::MAX;

fn put_u8(b: &mut Vec<u8>, v: u8) {
    b.push(v);
}
fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    put_u32(b, v.len() as u32);
    b.extend_from_slice(v);
}
fn put_opt(b: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        Some(v) => put_bytes(b, v),
        None => put_u32(b, NONE),
    }
}
fn put_opt_i64(b: &mut Vec<u8>, v: Option<i64>) {
    match v {
        Some(v) => {
            put_u8(b, 1);
            put_u64(b, v as u64);
        }
        None => put_u8(b, 0),
    }
}

/// Appends one record's encoding.
fn encode(r: &Record, b: &mut Vec<u8>) {
    let since = r.created_at.duration_since(UNIX_EPOCH).unwrap_or_default();
    put_u64(b, since.as_secs());
    put_u32(b, since.subsec_nanos());
    match r.ip {
        None => put_u8(b, 0),
        Some(IpAddr::V4(a)) => {
            put_u8(b, 4);
            b.extend_from_slice(&a.octets());
        }
        Some(IpAddr::V6(a)) => {
            put_u8(b, 6);
            b.extend_from_slice(&a.octets());
        }
    }
    put_bytes(b, r.method.as_str().as_bytes());
    put_bytes(b, r.path_text().as_bytes());
    put_opt(b, r.model.as_deref().map(str::as_bytes));
    put_u8(b, u8::from(r.stream));
    put_opt(b, r.upstream.as_deref().map(str::as_bytes));
    put_u32(b, u32::from(r.status));
    put_u32(b, r.attempts);
    put_opt(b, r.error.as_deref().map(str::as_bytes));
    put_bytes(b, &spooled_body(&r.request_body, r.body_limit));
    put_opt(b, r.response.as_deref().map(str::as_bytes));
    put_opt(b, r.response_json.as_deref());
    put_opt_i64(b, r.prompt_tokens);
    put_opt_i64(b, r.completion_tokens);
    put_opt_i64(b, r.total_tokens);
    put_opt_i64(b, r.ttfb_ms.map(|v| v as i64));
    put_u64(b, r.duration_ms);
    put_opt(b, r.user_agent.as_ref().map(HeaderValue::as_bytes));
    put_opt(b, r.client_key.as_deref().map(str::as_bytes));
    put_u64(b, r.body_limit as u64);
    put_opt(b, r.finish_reason.as_deref().map(str::as_bytes));
    put_u32(b, r.resumed);
    put_u8(b, u8::from(r.complete));
    put_opt(b, r.object_id.as_deref().map(str::as_bytes));
    put_u8(b, u8::from(r.rebuilt));
    put_opt(b, r.response_items.as_deref().map(str::as_bytes));
    put_opt(b, r.request_id.as_ref().map(HeaderValue::as_bytes));
    put_opt(b, r.member.as_deref().map(str::as_bytes));
    put_opt(b, r.forgets.as_deref().map(str::as_bytes));
    // `learned` is shared through PostgreSQL only, which has no spool.
}

/// What of a request body the spool keeps: bytes that give the same `request_body` column as
/// the whole body (`columns::request_body_text`) — the whole body when it is within `limit`,
/// else its first `limit` bytes and one character more (so that the column is cut at the same
/// place, with its marker), or, for a binary body, the column's own description. A 30 MiB upload
/// must not take 30 MiB of the spool's bound for a column of 1 MiB.
fn spooled_body(body: &[u8], limit: usize) -> std::borrow::Cow<'_, [u8]> {
    if limit == 0 || body.len() <= limit {
        return body.into();
    }
    match std::str::from_utf8(body) {
        Ok(text) if !body.contains(&0) => {
            let kept = crate::escape::cut_bytes(text, limit).len();
            let next = text[kept..].chars().next().map_or(0, char::len_utf8);
            body[..kept + next].into()
        }
        _ => {
            // The column does not cut its description; a body replaced by it would be cut
            // where `limit` is shorter than the description (a few tens of bytes): kept whole.
            let described = format!("[binary body, {} bytes]", body.len());
            if described.len() <= limit {
                described.into_bytes().into()
            } else {
                body.into()
            }
        }
    }
}

/// The names a run of records repeats (model, upstream, client key, member): the last of each,
/// shared by the next record that has the same instead of allocated again (about 1,500
/// instructions a record, with its free; see the benchmarks guide).
#[derive(Default)]
pub struct Names([Option<Arc<str>>; 4]);

/// Reads a record back; None when the bytes are not one.
struct Reader<'a> {
    bytes: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len())?;
        let bytes: &'a Bytes = self.bytes;
        let s = &bytes[self.at..end];
        self.at = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bool(&mut self) -> Option<bool> {
        Some(self.u8()? != 0)
    }
    /// A length-prefixed value, borrowed.
    fn raw(&mut self) -> Option<Option<&'a [u8]>> {
        let len = self.u32()?;
        if len == NONE {
            return Some(None);
        }
        Some(Some(self.take(len as usize)?))
    }
    /// A length-prefixed value as a slice of the shared buffer (no copy).
    fn shared(&mut self) -> Option<Option<Bytes>> {
        let len = self.u32()?;
        if len == NONE {
            return Some(None);
        }
        let start = self.at;
        self.take(len as usize)?;
        Some(Some(self.bytes.slice(start..self.at)))
    }
    fn bytes(&mut self) -> Option<Bytes> {
        self.shared()?
    }
    /// A length-prefixed text, borrowed; None (outer) when it is not UTF-8.
    fn str(&mut self) -> Option<Option<&'a str>> {
        match self.raw()? {
            Some(b) => Some(Some(std::str::from_utf8(b).ok()?)),
            None => Some(None),
        }
    }
    fn text(&mut self) -> Option<Option<String>> {
        Some(self.str()?.map(str::to_owned))
    }
    fn arc(&mut self) -> Option<Option<Arc<str>>> {
        Some(self.str()?.map(Arc::from))
    }
    /// A name that the last record may have had too (`Names`, slot `i`).
    fn name(&mut self, names: &mut Names, i: usize) -> Option<Option<Arc<str>>> {
        let Some(text) = self.str()? else {
            return Some(None);
        };
        let slot = &mut names.0[i];
        match slot.as_ref().filter(|last| last.as_ref() == text) {
            Some(last) => Some(Some(last.clone())),
            None => {
                let new: Arc<str> = Arc::from(text);
                *slot = Some(new.clone());
                Some(Some(new))
            }
        }
    }
    fn header(&mut self) -> Option<Option<HeaderValue>> {
        match self.shared()? {
            Some(b) => Some(Some(HeaderValue::from_maybe_shared(b).ok()?)),
            None => Some(None),
        }
    }
    fn opt_i64(&mut self) -> Option<Option<i64>> {
        match self.u8()? {
            0 => Some(None),
            _ => Some(Some(self.u64()? as i64)),
        }
    }
}

/// One record from its encoding.
fn decode(bytes: &Bytes, names: &mut Names) -> Option<Record> {
    let mut r = Reader { bytes, at: 0 };
    let secs = r.u64()?;
    let nanos = r.u32()?;
    let created_at = UNIX_EPOCH.checked_add(Duration::new(secs, nanos.min(999_999_999)))?;
    let ip = match r.u8()? {
        0 => None,
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(r.take(4)?).ok()?)),
        6 => Some(IpAddr::from(<[u8; 16]>::try_from(r.take(16)?).ok()?)),
        _ => return None,
    };
    let method = Method::from_bytes(&r.bytes()?).ok()?;
    let path = Uri::from_maybe_shared(r.bytes()?).unwrap_or_else(|_| Uri::from_static("/"));
    let record = Record {
        created_at,
        ip,
        method,
        path,
        model: r.name(names, 0)?,
        stream: r.bool()?,
        upstream: r.name(names, 1)?,
        status: u16::try_from(r.u32()?).ok()?,
        attempts: r.u32()?,
        error: r.text()?,
        request_body: r.bytes()?,
        response: r.text()?,
        response_json: r.shared()?,
        prompt_tokens: r.opt_i64()?,
        completion_tokens: r.opt_i64()?,
        total_tokens: r.opt_i64()?,
        ttfb_ms: r.opt_i64()?.map(|v| v as u64),
        duration_ms: r.u64()?,
        user_agent: r.header()?,
        client_key: r.name(names, 2)?,
        body_limit: usize::try_from(r.u64()?).ok()?,
        finish_reason: r.text()?.map(std::borrow::Cow::Owned),
        resumed: r.u32()?,
        complete: r.bool()?,
        object_id: r.arc()?,
        rebuilt: r.bool()?,
        response_items: r.text()?,
        request_id: r.header()?,
        member: r.name(names, 3)?,
        forgets: r.arc()?,
        learned: Vec::new(),
    };
    (r.at == bytes.len()).then_some(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: u32) -> Record {
        Record {
            created_at: UNIX_EPOCH + Duration::new(1_765_000_000 + u64::from(i), 123_456_789),
            ip: Some(IpAddr::from([10, 0, 0, 7])),
            method: Method::POST,
            path: Uri::from_static("/v1/chat/completions"),
            model: Some("gpt-x".into()),
            stream: i.is_multiple_of(2),
            upstream: Some("a".into()),
            status: 200,
            attempts: 2,
            error: Some("b: 500".into()),
            request_body: Bytes::from(format!("{{\"n\":{i}}}")),
            response: Some("héllo".into()),
            response_json: None,
            prompt_tokens: Some(3),
            completion_tokens: None,
            total_tokens: Some(-1),
            ttfb_ms: Some(12),
            duration_ms: 34,
            user_agent: Some(HeaderValue::from_static("curl/8")),
            client_key: Some("sk-…abcd".into()),
            body_limit: 1000,
            finish_reason: Some("stop".into()),
            resumed: 1,
            complete: true,
            object_id: Some("resp_1".into()),
            rebuilt: true,
            response_items: Some("[]".into()),
            request_id: Some(HeaderValue::from_static("req-1")),
            member: Some("alice".into()),
            forgets: None,
            learned: Vec::new(),
        }
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let mut buf = Vec::new();
        let r = sample(1);
        encode(&r, &mut buf);
        let mut names = Names::default();
        let back = decode(&Bytes::from(buf.clone()), &mut names).expect("decodes");
        // The same names again are shared, not allocated: and still read back as written.
        let again = decode(&Bytes::from(buf.clone()), &mut names).expect("decodes");
        assert!(Arc::ptr_eq(
            back.member.as_ref().unwrap(),
            again.member.as_ref().unwrap()
        ));
        assert_eq!(format!("{again:?}"), format!("{r:?}"));
        assert_eq!(format!("{back:?}"), format!("{r:?}"));
        // Every shorter prefix is refused, not misread.
        for n in 0..buf.len() {
            assert!(
                decode(&Bytes::copy_from_slice(&buf[..n]), &mut names).is_none(),
                "{n}"
            );
        }
    }

    #[test]
    fn a_spooled_body_gives_the_column_the_whole_body_gives() {
        use crate::records::columns::request_body_text;
        let long = "é".repeat(40);
        let cases: [(&[u8], usize); 8] = [
            (b"short", 100),
            (long.as_bytes(), 0),
            (long.as_bytes(), 7),
            (long.as_bytes(), 8),
            (&[0xff; 300], 10),
            (&[0xff; 300], 100),
            (b"text with a \0 nul in it, long enough", 5),
            (b"", 3),
        ];
        for (body, limit) in cases {
            let kept = spooled_body(body, limit);
            assert!(kept.len() <= body.len().max(40), "{limit}");
            assert_eq!(
                request_body_text(&kept, limit),
                request_body_text(body, limit),
                "limit {limit}"
            );
        }
    }

    #[test]
    fn frames_stop_at_a_torn_or_zeroed_tail() {
        let mut buf = Vec::new();
        encode_all(&[sample(0), sample(1), sample(2)], &mut buf);
        let whole = Bytes::from(buf.clone());
        let (all, ends, cut) = decode_frames(&whole, 100, &mut Names::default());
        assert_eq!((all.len(), cut), (3, None));
        assert_eq!(ends[2], 100 + buf.len() as u64);
        // Torn inside the last frame: two read, the third waits for more bytes.
        let torn = Bytes::copy_from_slice(&buf[..buf.len() - 5]);
        let (two, _, cut) = decode_frames(&torn, 0, &mut Names::default());
        assert_eq!((two.len(), cut), (2, None));
        // Zeroes after the frames: refused at once.
        let mut zeroed = buf.clone();
        zeroed.extend_from_slice(&[0; 64]);
        let (three, _, cut) = decode_frames(&Bytes::from(zeroed), 0, &mut Names::default());
        assert_eq!((three.len(), cut), (3, Some(buf.len() as u64)));
    }
}
