//! W3C Trace Context (`traceparent`, `tracestate`): strict parsing of what a client sends, the
//! value each upstream attempt gets, span ids, and the sampler (`OTEL_TRACES_SAMPLER`).
//!
//! A client's `traceparent` is hostile input: anything that is not exactly the W3C form (lower-case
//! hex, non-zero ids, version `ff` refused, a single header) is ignored and a new trace starts, and
//! its `tracestate` goes with it.

use std::cell::Cell;

use actix_web::http::header::{HeaderMap, HeaderValue};

/// A trace id (16 bytes) and a span id (8 bytes), as the wire carries them.
pub type TraceId = [u8; 16];
/// See [`TraceId`].
pub type SpanId = [u8; 8];

/// What a valid client `traceparent` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    /// The trace it belongs to.
    pub trace_id: TraceId,
    /// The client's span: the gateway's server span becomes its child.
    pub span_id: SpanId,
    /// The `sampled` flag.
    pub sampled: bool,
}

/// Longest `tracestate` kept (W3C: at most 32 members; 512 characters is what a vendor may
/// rely on being passed on).
pub const MAX_TRACESTATE: usize = 512;

/// The client's trace context, if its `traceparent` is valid (a `tracestate` only beside one).
pub fn incoming(headers: &HeaderMap) -> (Option<Parent>, Option<HeaderValue>) {
    let mut all = headers.get_all("traceparent");
    let (Some(tp), None) = (all.next(), all.next()) else {
        return (None, None);
    };
    let Some(parent) = parse_traceparent(tp.as_bytes()) else {
        return (None, None);
    };
    let mut states = headers.get_all("tracestate");
    let state = match (states.next(), states.next()) {
        (Some(s), None) if valid_tracestate(s.as_bytes()) => Some(s.clone()),
        _ => None,
    };
    (Some(parent), state)
}

/// Parses a `traceparent` value strictly (W3C Trace Context level 1).
pub fn parse_traceparent(v: &[u8]) -> Option<Parent> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex_byte(&v[0..2])?;
    // Version 00 has exactly these four fields; a later version may append `-…` fields.
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let mut trace_id = [0u8; 16];
    for (i, b) in trace_id.iter_mut().enumerate() {
        *b = hex_byte(&v[3 + 2 * i..5 + 2 * i])?;
    }
    let mut span_id = [0u8; 8];
    for (i, b) in span_id.iter_mut().enumerate() {
        *b = hex_byte(&v[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = hex_byte(&v[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

/// Two lower-case hex digits (W3C forbids upper case).
fn hex_byte(two: &[u8]) -> Option<u8> {
    let d = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(d(two[0])? << 4 | d(two[1])?)
}

/// A `tracestate` that is short and printable enough to pass on unchanged.
fn valid_tracestate(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= MAX_TRACESTATE
        && v.iter().all(|&c| (0x20..0x7f).contains(&c))
        && v.split(|&c| c == b',').count() <= 32
}

/// The `traceparent` an upstream attempt carries: the request's trace, the attempt's span.
pub fn traceparent(trace_id: &TraceId, span_id: &SpanId, sampled: bool) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 55];
    out[..3].copy_from_slice(b"00-");
    for (i, b) in trace_id.iter().enumerate() {
        out[3 + 2 * i] = HEX[usize::from(b >> 4)];
        out[4 + 2 * i] = HEX[usize::from(b & 15)];
    }
    out[35] = b'-';
    for (i, b) in span_id.iter().enumerate() {
        out[36 + 2 * i] = HEX[usize::from(b >> 4)];
        out[37 + 2 * i] = HEX[usize::from(b & 15)];
    }
    out[52] = b'-';
    out[53] = b'0';
    out[54] = if sampled { b'1' } else { b'0' };
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
}

thread_local! {
    /// Per-thread id generator state (splitmix64), seeded once from the system's randomness.
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // No system randomness: the clock and this thread's stack address still differ.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ (&b as *const _ as u64);
    }
    u64::from_le_bytes(b)
}

/// 64 random-looking bits; ids need uniqueness, not secrecy (W3C), so no system call per id.
fn next_u64() -> u64 {
    RNG.with(|s| {
        let x = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// A new non-zero span id.
pub fn new_span_id() -> SpanId {
    loop {
        let v = next_u64();
        if v != 0 {
            return v.to_be_bytes();
        }
    }
}

/// A new non-zero trace id.
pub fn new_trace_id() -> TraceId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&next_u64().to_be_bytes());
    id[8..].copy_from_slice(&new_span_id());
    id
}

/// What a root span (no parent) is decided by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Root {
    /// Every trace.
    On,
    /// None.
    Off,
    /// Traces whose id falls below this threshold of 2^63 (the SDKs' `TraceIdRatioBased`).
    Ratio(u64),
}

/// `OTEL_TRACES_SAMPLER` (+ `_ARG`) resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// For traces the gateway starts (and for all, unless parent-based).
    pub root: Root,
    /// A client's `sampled` flag decides when it sent a valid `traceparent`.
    pub parent_based: bool,
}

impl Sampler {
    /// The sampler of a standard name; `arg` is the ratio of the `traceidratio` ones (default 1).
    pub fn parse(name: &str, arg: Option<&str>) -> Result<Sampler, String> {
        let ratio = || -> Result<Root, String> {
            let r = match arg.map(str::trim).filter(|a| !a.is_empty()) {
                None => 1.0,
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| format!("sampler argument {a:?} is not a ratio from 0 to 1"))?,
            };
            Ok(Root::Ratio((r * (1u64 << 63) as f64) as u64))
        };
        let (root, parent_based) = match name.trim() {
            "always_on" => (Root::On, false),
            "always_off" => (Root::Off, false),
            "traceidratio" => (ratio()?, false),
            "parentbased_always_on" | "" => (Root::On, true),
            "parentbased_always_off" => (Root::Off, true),
            "parentbased_traceidratio" => (ratio()?, true),
            other => {
                return Err(format!(
                    "unknown sampler {other:?}: use always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                ))
            }
        };
        Ok(Sampler { root, parent_based })
    }

    /// Whether the trace `trace_id` (with the client's `parent`, if any) is recorded.
    pub fn sample(&self, trace_id: &TraceId, parent: Option<&Parent>) -> bool {
        if let (true, Some(p)) = (self.parent_based, parent) {
            return p.sampled;
        }
        match self.root {
            Root::On => true,
            Root::Off => false,
            Root::Ratio(threshold) => {
                let mut low = [0u8; 8];
                low.copy_from_slice(&trace_id[8..]);
                (u64::from_be_bytes(low) >> 1) < threshold
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_is_parsed_strictly() {
        let p = parse_traceparent(GOOD).unwrap();
        assert!(p.sampled);
        assert_eq!(p.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(traceparent(&p.trace_id, &p.span_id, true).as_bytes(), GOOD);
        for bad in [
            &b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"[..],
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            b"",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
        // A later version may carry more fields after a dash.
        assert!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-xyz")
                .is_some()
        );
    }

    #[test]
    fn two_traceparents_or_a_bad_one_start_a_new_trace_without_tracestate() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent".parse().unwrap(),
            HeaderValue::from_static(std::str::from_utf8(GOOD).unwrap()),
        );
        h.insert(
            "tracestate".parse().unwrap(),
            HeaderValue::from_static("a=1"),
        );
        assert!(matches!(incoming(&h), (Some(_), Some(_))));
        h.append(
            "traceparent".parse().unwrap(),
            HeaderValue::from_static(std::str::from_utf8(GOOD).unwrap()),
        );
        assert_eq!(incoming(&h), (None, None));
    }

    #[test]
    fn samplers() {
        let id = new_trace_id();
        let p = Parent {
            trace_id: id,
            span_id: new_span_id(),
            sampled: false,
        };
        let s = Sampler::parse("parentbased_always_on", None).unwrap();
        assert!(s.sample(&id, None));
        assert!(!s.sample(&id, Some(&p)));
        assert!(!Sampler::parse("traceidratio", Some("0"))
            .unwrap()
            .sample(&id, None));
        assert!(Sampler::parse("traceidratio", Some("1"))
            .unwrap()
            .sample(&id, None));
        assert!(Sampler::parse("always_on", None)
            .unwrap()
            .sample(&id, Some(&p)));
        assert!(Sampler::parse("bogus", None).is_err());
        assert!(Sampler::parse("traceidratio", Some("2")).is_err());
        let half = Sampler::parse("traceidratio", Some("0.5")).unwrap();
        let n = (0..4000)
            .filter(|_| half.sample(&new_trace_id(), None))
            .count();
        assert!((1600..2400).contains(&n), "{n}");
    }
}
