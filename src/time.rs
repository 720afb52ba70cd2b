//! RFC 3339 UTC timestamps without a date-time crate: records and the status page need only
//! formatting, and a fixed millisecond width keeps text comparison (retention) correct.

use std::time::{SystemTime, UNIX_EPOCH};

/// `2026-11-26T08:04:36.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    Rfc3339::new(t).as_str().to_string()
}

/// A formatted timestamp on the stack: the record writer formats one per row, and `format!`
/// costs a heap string and the formatting machinery each time.
pub struct Rfc3339([u8; 24]);

impl Rfc3339 {
    /// Formats `t` (years past 9999 are clamped: the width stays fixed).
    pub fn new(t: SystemTime) -> Rfc3339 {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs() as i64;
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (y, m, day) = civil_from_days(days);
        let mut b = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut v: u64| {
            for i in (at..at + width).rev() {
                b[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, 4, y.clamp(0, 9999) as u64);
        put(5, 2, u64::from(m));
        put(8, 2, u64::from(day));
        put(11, 2, (rem / 3600) as u64);
        put(14, 2, (rem % 3600 / 60) as u64);
        put(17, 2, (rem % 60) as u64);
        put(20, 3, u64::from(d.subsec_millis()));
        Rfc3339(b)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_680_276_123);
        assert_eq!(rfc3339(t), "2026-11-26T08:04:36.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn matches_the_format_machinery() {
        // A spread of instants from 1970 to 2200, every field width exercised.
        let mut ms: u64 = 0;
        while ms < 7_258_118_400_000 {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            let secs = d.as_secs() as i64;
            let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
            let (y, m, day) = civil_from_days(days);
            let expected = format!(
                "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
                rem / 3600,
                rem % 3600 / 60,
                rem % 60,
                d.subsec_millis()
            );
            assert_eq!(Rfc3339::new(t).as_str(), expected);
            ms += 3_999_999_937;
        }
    }
}
