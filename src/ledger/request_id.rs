//! The id every `/v1/*` answer carries in `x-request-id` when its upstream gave none (see the
//! observability guide): `req_` and 24 letters and digits, unique within a process and, seeded
//! from the clock and the process id, between processes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use actix_web::http::header::HeaderValue;

/// Ids made so far (the counter that makes each unique).
static NEXT: AtomicU64 = AtomicU64::new(0);

/// This process's seed: two words mixed into every id.
static SEED: LazyLock<(u64, u64)> = LazyLock::new(|| {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let pid = u64::from(std::process::id());
    (
        mix(now ^ pid.rotate_left(32)),
        mix(now.rotate_left(17) ^ pid),
    )
});

/// splitmix64's finaliser: a bijection on u64, so distinct counters give distinct ids.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Writes 12 base-62 digits of `v` (62^12 > 2^64 would need 11; the 12th spreads the first).
fn push_base62(out: &mut [u8], mut v: u64) {
    for b in out.iter_mut() {
        *b = DIGITS[(v % 62) as usize];
        v /= 62;
    }
}

/// A new request id.
pub fn new_request_id() -> HeaderValue {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let (a, b) = *SEED;
    let mut id = *b"req_000000000000000000000000";
    // The first half is a bijection of the counter (unique); the second spreads the process.
    push_base62(&mut id[4..16], mix(n ^ a));
    push_base62(&mut id[16..28], mix(n.wrapping_add(b)));
    HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("req_unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = new_request_id();
            let s = id.to_str().unwrap().to_string();
            assert!(s.starts_with("req_") && s.len() == 28, "{s}");
            assert!(s[4..].bytes().all(|b| b.is_ascii_alphanumeric()), "{s}");
            assert!(seen.insert(s));
        }
    }
}
