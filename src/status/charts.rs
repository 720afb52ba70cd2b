//! Small inline-SVG charts of an upstream's last hour for the status page (version 0.2; see the
//! observability guide, "Status page").
//!
//! A chart is as wide as its box (`preserveAspectRatio="none"`): the stylesheet sizes it, so the
//! same markup fills a card's chart column at 1280 px and the whole card on a phone.
//!
//! Inline SVG needs no JavaScript and no external asset, and takes its colours from the page's
//! CSS classes, so the dark scheme applies to the charts too. Each series is one `<path>` (not one
//! element per minute), which keeps the page small with 20 upstreams: about 2 KB per chart.
//! Only numbers are written here; nothing from a client or upstream reaches the SVG.

use std::fmt::Write;
use std::time::Duration;

use super::text::counted;
use crate::history::{MinutePoint, MINUTES};

/// Chart height in SVG units; bars are scaled into `HEIGHT - 1` so a full bar keeps a top margin.
const HEIGHT: f64 = 24.0;
/// Width of one minute in SVG units (bar plus gap).
const STEP: f64 = 2.0;
const BAR: f64 = 1.6;

fn bars(out: &mut String, class: &str, values: &[f64], max: f64) {
    if max <= 0.0 || values.iter().all(|v| *v <= 0.0) {
        return;
    }
    let _ = write!(out, "<path class=\"{class}\" d=\"");
    for (i, v) in values.iter().enumerate() {
        if *v <= 0.0 {
            continue;
        }
        // At least a sliver, so a single request in a busy hour still shows.
        let h = (v / max * (HEIGHT - 1.0)).max(0.8);
        let _ = write!(
            out,
            "M{:.1} {HEIGHT}v-{h:.1}h{BAR}v{h:.1}z",
            i as f64 * STEP
        );
    }
    out.push_str("\"/>");
}

fn open(out: &mut String, label: &str) {
    let _ = write!(
        out,
        "<svg class=\"chart\" viewBox=\"0 0 {w} {HEIGHT}\" preserveAspectRatio=\"none\" \
         role=\"img\" aria-label=\"{label}\"><title>{label}</title>\
         <path class=\"axis\" d=\"M0 {HEIGHT}H{w}\"/>",
        w = MINUTES as f64 * STEP,
    );
}

fn short_ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms >= 10_000.0 {
        format!("{:.0} s", ms / 1000.0)
    } else if ms >= 1000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{ms:.0} ms")
    }
}

/// The two charts of one upstream's hour (attempts with failed ones over them; median first
/// byte per minute) with a one-line summary each. `hour` is oldest first.
pub fn last_hour(out: &mut String, hour: &[MinutePoint]) {
    let requests: Vec<f64> = hour.iter().map(|p| f64::from(p.requests)).collect();
    // A stream that breaks after its start adds a failure, not an attempt: keep failed ≤ attempts
    // visually by scaling both to the larger of the two.
    let failed: Vec<f64> = hour.iter().map(|p| f64::from(p.failed)).collect();
    let latency: Vec<f64> = hour
        .iter()
        .map(|p| p.median_first_byte.map_or(0.0, |d| d.as_secs_f64()))
        .collect();
    let total_req: u64 = hour.iter().map(|p| u64::from(p.requests)).sum();
    let total_failed: u64 = hour.iter().map(|p| u64::from(p.failed)).sum();
    let max_count = requests
        .iter()
        .chain(&failed)
        .fold(0.0f64, |a, b| a.max(*b));
    let max_latency = latency.iter().fold(0.0f64, |a, b| a.max(*b));
    let peak = hour.iter().filter_map(|p| p.median_first_byte).max();

    out.push_str("<div class=\"hour\"><figure>");
    let attempts = counted(total_req, "attempt", "attempts");
    let label = format!("attempts per minute, last 60 minutes: {attempts}, {total_failed} failed");
    open(out, &label);
    bars(out, "req", &requests, max_count);
    bars(out, "fail", &failed, max_count);
    let _ = write!(
        out,
        "</svg><figcaption><span class=\"key req\"></span>{attempts} \
         <span class=\"key fail\"></span>{total_failed} failed \
         <small>(peak {max_count:.0}/min)</small></figcaption></figure><figure>"
    );
    let label = match peak {
        Some(p) => format!(
            "median first byte per minute, last 60 minutes: highest {}",
            short_ms(p)
        ),
        None => "median first byte per minute, last 60 minutes: no successful attempt".into(),
    };
    open(out, &label);
    bars(out, "lat", &latency, max_latency);
    let _ = write!(
        out,
        "</svg><figcaption><span class=\"key lat\"></span>median first byte {}</figcaption></figure>\
         <div class=\"ticks\"><span>−60 min</span><span>now</span></div></div>",
        match peak {
            Some(p) => format!("<small>(peak {})</small>", short_ms(p)),
            None => "<small>(none)</small>".into(),
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hour(f: impl Fn(usize) -> (u32, u32, Option<u64>)) -> Vec<MinutePoint> {
        (0..MINUTES)
            .map(|i| {
                let (requests, failed, ms) = f(i);
                MinutePoint {
                    minute: i as u32,
                    requests,
                    failed,
                    median_first_byte: ms.map(Duration::from_millis),
                }
            })
            .collect()
    }

    #[test]
    fn an_empty_hour_draws_axes_only() {
        let mut s = String::new();
        last_hour(&mut s, &hour(|_| (0, 0, None)));
        assert_eq!(s.matches("<svg").count(), 2);
        assert!(!s.contains("class=\"req\" d="));
        assert!(s.contains("0 attempts"));
        assert!(s.contains("(none)"));
    }

    #[test]
    fn bars_are_scaled_to_the_busiest_minute() {
        let mut s = String::new();
        last_hour(
            &mut s,
            &hour(|i| match i {
                59 => (10, 2, Some(1500)),
                30 => (5, 0, Some(300)),
                _ => (0, 0, None),
            }),
        );
        // Minute 59 is the full height, minute 30 half of it.
        assert!(s.contains("M118.0 24v-23.0h1.6v23.0z"), "{s}");
        assert!(s.contains("M60.0 24v-11.5h1.6v11.5z"), "{s}");
        assert!(s.contains("15 attempts"));
        assert!(s.contains("2 failed"));
        assert!(s.contains("peak 1.5 s"));
    }

    #[test]
    fn one_attempt_is_one_attempt() {
        let mut s = String::new();
        last_hour(
            &mut s,
            &hour(|i| if i == 59 { (1, 1, None) } else { (0, 0, None) }),
        );
        assert!(
            s.contains(">1 attempt <span class=\"key fail\"></span>1 failed"),
            "{s}"
        );
        assert!(s.contains("last 60 minutes: 1 attempt, 1 failed"), "{s}");
        assert!(!s.contains("1 attempts"), "{s}");
    }
}
