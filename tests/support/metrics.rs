//! The one reader of `/v1/metrics` (Prometheus text format) for every test: a scrape is parsed
//! into samples, and a sample is found by its name and its exact label set.

use std::fmt;
use std::time::{Duration, Instant};

use super::client::send;
use super::gateway::Gateway;

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// Label pairs as written (values unescaped).
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A parsed scrape of `/v1/metrics`.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The text as served (for substring checks and failure messages).
    pub text: String,
    /// Every sample line, in order (comments and unparsable lines skipped).
    pub samples: Vec<Sample>,
}

/// A query for one series: a metric name and the labels it must have (all of them, no others).
pub struct Series<'a> {
    metrics: &'a Metrics,
    name: &'a str,
    labels: Vec<(String, String)>,
}

impl Metrics {
    /// Parses Prometheus text exposition.
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_sample)
            .collect();
        Metrics {
            text: text.to_string(),
            samples,
        }
    }

    /// The series `name`; add its labels with [`Series::label`].
    pub fn metric<'a>(&'a self, name: &'a str) -> Series<'a> {
        Series {
            metrics: self,
            name,
            labels: Vec::new(),
        }
    }

    /// How many sample lines the scrape has.
    pub fn series_count(&self) -> usize {
        self.samples.len()
    }
}

impl fmt::Display for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Series<'_> {
    /// Requires the label `key` with this value.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.to_string(), value.to_string()));
        self
    }

    /// The value of the sample with this name and exactly these labels, if the scrape has one.
    pub fn value(&self) -> Option<f64> {
        self.metrics
            .samples
            .iter()
            .find(|s| {
                s.name == self.name
                    && s.labels.len() == self.labels.len()
                    && self.labels.iter().all(|l| s.labels.contains(l))
            })
            .map(|s| s.value)
    }
}

/// `name{k="v",…} value [timestamp]`, label values with `\\`, `\"` and `\n` escapes.
fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        loop {
            // key
            let (start, c) = chars.next()?;
            if c == '}' {
                rest = &body[start + 1..];
                break;
            }
            let start = if c == ',' { chars.next()?.0 } else { start };
            let eq = body[start..].find('=')? + start;
            let key = body[start..eq].trim().to_string();
            while chars.next()?.0 < eq {}
            // `="`
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break,
                    other => value.push(other),
                }
            }
            labels.push((key, value));
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// GETs `/v1/metrics` (200, readable from any origin, plain text) and parses it.
pub async fn scrape(gw: &Gateway) -> Metrics {
    let got = send("GET", &gw.url("/v1/metrics"), &[], b"").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("access-control-allow-origin"), Some("*"));
    assert!(got
        .header("content-type")
        .unwrap_or("")
        .starts_with("text/plain"));
    Metrics::parse(&got.text())
}

/// Scrapes every 200 ms until `done` accepts a scrape or `within` passes; returns the last one.
pub async fn scrape_until(
    gw: &Gateway,
    within: Duration,
    done: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let deadline = Instant::now() + within;
    loop {
        let m = scrape(gw).await;
        if done(&m) || Instant::now() >= deadline {
            return m;
        }
        actix_rt::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn samples_are_found_by_name_and_exact_labels() {
    let m = Metrics::parse(
        "# HELP x_total a\n# TYPE x_total counter\nx_total 3\nx_total{a=\"1\",b=\"q\\\"}\\\\\"} 2.5\nx_total_more 9\ny{e=\"/v1/{tail}*\"} 1 1700000000\n",
    );
    assert_eq!(m.metric("x_total").value(), Some(3.0));
    assert_eq!(
        m.metric("x_total")
            .label("b", "q\"}\\")
            .label("a", "1")
            .value(),
        Some(2.5)
    );
    assert_eq!(m.metric("x_total").label("a", "1").value(), None);
    assert_eq!(m.metric("x_total_more").value(), Some(9.0));
    assert_eq!(m.metric("y").label("e", "/v1/{tail}*").value(), Some(1.0));
    assert_eq!(m.metric("nope").value(), None);
    assert_eq!(m.series_count(), 4);
}
