//! Where traces go and which are kept: the standard `OTEL_*` environment variables, else the
//! config file's `otel:` section (an environment variable beats the key). Read once at start.

use std::time::Duration;

use super::context::Sampler;
use crate::config::OtelConfig;

/// The resolved exporter settings; None of these is ever logged whole (headers carry API keys).
#[derive(Clone)]
pub struct Settings {
    /// The full URL spans are POSTed to (`…/v1/traces`).
    pub url: Url,
    /// Extra request headers (`OTEL_EXPORTER_OTLP_HEADERS`), validated.
    pub headers: Vec<(String, String)>,
    /// `service.name`.
    pub service_name: String,
    /// Which traces are kept.
    pub sampler: Sampler,
    /// How long one export may take (`OTEL_EXPORTER_OTLP_TIMEOUT`, ms; default 10 s).
    pub timeout: Duration,
    /// Requests' span sets that may wait for the exporter (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048).
    pub queue: usize,
    /// Longest wait before a partial batch goes out (`OTEL_BSP_SCHEDULE_DELAY`, ms; 1 s).
    pub delay: Duration,
    /// Spans per export (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, 512).
    pub batch: usize,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("url", &self.url.display())
            .field("headers", &self.headers.len())
            .field("service_name", &self.service_name)
            .field("sampler", &self.sampler)
            .finish()
    }
}

/// An `http(s)://host[:port]/path` URL taken apart for the exporter's own HTTP/1.1 client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `https`.
    pub tls: bool,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port (default 80 / 443).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    /// Parses an endpoint with the `url` crate (already in the build through actix-web), so
    /// that the WHATWG rules decide what a host, a port or an IPv6 address is, not a parser of
    /// our own; the path and query come out percent-encoded, fit for the request line. User info
    /// is refused (put credentials in the headers), and so are spaces and control characters,
    /// which those rules would quietly encode or drop although in an endpoint they are a typo.
    pub fn parse(s: &str) -> Result<Url, String> {
        const NOT_HTTP: &str = "the OTLP endpoint must be an http:// or https:// URL";
        let s = s.trim();
        if s.bytes().any(|c| c <= b' ' || c == 0x7f) {
            return Err("bad OTLP endpoint: it has spaces or control characters".into());
        }
        let url = match url::Url::parse(s) {
            Ok(url) => url,
            Err(url::ParseError::RelativeUrlWithoutBase) => return Err(NOT_HTTP.into()),
            Err(why) => return Err(format!("bad OTLP endpoint: {why}")),
        };
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            _ => return Err(NOT_HTTP.into()),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err("the OTLP endpoint must not carry user info: use the headers".into());
        }
        let host = match url.host() {
            Some(url::Host::Domain(name)) => name.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err("bad OTLP endpoint: no host".into()),
        };
        Ok(Url {
            tls,
            host,
            port: url
                .port_or_known_default()
                .unwrap_or(if tls { 443 } else { 80 }),
            path: url[url::Position::BeforePath..url::Position::AfterQuery].to_string(),
        })
    }

    /// What may be logged: scheme, host, port and path.
    pub fn display(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            format!("{scheme}://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

/// The settings from the environment (`env`) and the config's `otel:` section; None when no
/// endpoint is set anywhere (tracing off). A bad value is refused with its source named: the
/// environment variable, or `otel.<key>` of the config file `file`.
pub fn resolve(
    cfg: &OtelConfig,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Settings>, String> {
    let var = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let from_file = |key: &str| format!("{file}: otel.{key}");
    let (url, source) = match (
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        var("OTEL_EXPORTER_OTLP_ENDPOINT"),
        cfg.endpoint.as_deref(),
    ) {
        // The signal-specific one is used as is; the general one gets the signal's path.
        (Some(t), _, _) => (t, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".to_string()),
        (None, Some(base), _) => (
            format!("{}/v1/traces", base.trim().trim_end_matches('/')),
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
        ),
        (None, None, Some(e)) if !e.trim().is_empty() => {
            (e.trim().to_string(), from_file("endpoint"))
        }
        _ => return Ok(None),
    };
    let url = Url::parse(&url).map_err(|why| format!("{source}: {why}"))?;
    let headers = match var("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
        .or_else(|| var("OTEL_EXPORTER_OTLP_HEADERS"))
    {
        Some(h) => parse_headers(&h)?,
        None => {
            let mut out = Vec::new();
            for (k, v) in &cfg.headers {
                out.push(check_header(k.trim(), v.trim())?);
            }
            out
        }
    };
    let service_name = var("OTEL_SERVICE_NAME")
        .or_else(|| cfg.service_name.clone())
        .unwrap_or_else(|| "openai-api-route".into());
    let (name, arg, source) = match var("OTEL_TRACES_SAMPLER") {
        Some(n) => (
            n,
            var("OTEL_TRACES_SAMPLER_ARG"),
            "OTEL_TRACES_SAMPLER".to_string(),
        ),
        None => (
            cfg.sampler.clone().unwrap_or_default(),
            var("OTEL_TRACES_SAMPLER_ARG").or_else(|| cfg.sampler_arg.clone()),
            from_file("sampler"),
        ),
    };
    let sampler =
        Sampler::parse(&name, arg.as_deref()).map_err(|why| format!("{source}: {why}"))?;
    let number = |k: &str, default: u64| -> Result<u64, String> {
        match var(k) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("{k}={v:?} is not a whole number")),
        }
    };
    let timeout = number(
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        number("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000)?,
    )?;
    Ok(Some(Settings {
        url,
        headers,
        service_name,
        sampler,
        timeout: Duration::from_millis(timeout.max(1)),
        queue: number("OTEL_BSP_MAX_QUEUE_SIZE", 2048)?.clamp(1, 1 << 20) as usize,
        delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 1000)?.max(1)),
        batch: number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)?.clamp(1, 1 << 16) as usize,
    }))
}

/// `k1=v1,k2=v2` with percent-encoded values (the OTLP exporter's spelling).
fn parse_headers(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or("OTEL_EXPORTER_OTLP_HEADERS: expected key=value pairs")?;
        let v = match crate::escape::percent_decode(v.trim().as_bytes()) {
            None => v.trim().to_string(),
            Some(b) => String::from_utf8(b).map_err(|_| {
                "OTEL_EXPORTER_OTLP_HEADERS: a value is not valid percent-encoded UTF-8"
            })?,
        };
        out.push(check_header(k.trim(), &v)?);
    }
    Ok(out)
}

/// A header name that is a token and a value without control characters (no injection into the
/// request head); the value itself is never shown.
fn check_header(k: &str, v: &str) -> Result<(String, String), String> {
    let token = !k.is_empty()
        && k.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c));
    if !token {
        return Err(format!("OTLP header name {k:?} is not a valid header name"));
    }
    if v.bytes().any(|c| c < b' ' && c != b'\t' || c == 0x7f) {
        return Err(format!("OTLP header {k}: its value has control characters"));
    }
    Ok((k.to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn off_without_an_endpoint_and_env_beats_config() {
        let cfg = OtelConfig::default();
        assert!(resolve(&cfg, "t.yaml", &env(&[])).unwrap().is_none());
        let s = resolve(
            &cfg,
            "t.yaml",
            &env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.url.display(), "http://c:4318/v1/traces");
        assert_eq!(s.service_name, "openai-api-route");
        assert_eq!(
            s.sampler,
            Sampler::parse("parentbased_always_on", None).unwrap()
        );
        let cfg = OtelConfig {
            endpoint: Some("https://file:4318/v1/traces".into()),
            service_name: Some("gw".into()),
            sampler: Some("always_off".into()),
            headers: vec![("x-key".into(), "v".into())],
            ..OtelConfig::default()
        };
        let s = resolve(&cfg, "t.yaml", &env(&[])).unwrap().unwrap();
        assert_eq!(s.url.display(), "https://file:4318/v1/traces");
        assert_eq!(s.headers, vec![("x-key".to_string(), "v".to_string())]);
        let s = resolve(
            &cfg,
            "t.yaml",
            &env(&[
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t/custom"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored"),
                ("OTEL_SERVICE_NAME", "env"),
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "a=b%20c, d = e"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.url.display(), "http://t:80/custom");
        assert_eq!(s.service_name, "env");
        assert!(!s.sampler.parent_based);
        assert_eq!(s.headers[0], ("a".to_string(), "b c".to_string()));
        assert_eq!(s.headers[1], ("d".to_string(), "e".to_string()));
    }

    #[test]
    fn bad_values_are_refused() {
        let cfg = OtelConfig::default();
        for pairs in [
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://x")][..],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://u:p@x")],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x"),
                ("OTEL_TRACES_SAMPLER", "sometimes"),
            ],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "bad name=v"),
            ],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "a=b%0d%0aInjected: 1"),
            ],
        ] {
            assert!(resolve(&cfg, "t.yaml", &env(pairs)).is_err(), "{pairs:?}");
        }
        assert_eq!(
            Url::parse("http://[::1]:4318/v1/traces").unwrap().display(),
            "http://[::1]:4318/v1/traces"
        );
    }

    #[test]
    fn endpoints_are_taken_apart() {
        let url = |s: &str| Url::parse(s).map(|u| (u.tls, u.host, u.port, u.path));
        let ok = |tls: bool, host: &str, port: u16, path: &str| {
            Ok((tls, host.to_string(), port, path.to_string()))
        };
        assert_eq!(url(" http://c:4318 "), ok(false, "c", 4318, "/"));
        assert_eq!(url("https://c"), ok(true, "c", 443, "/"));
        assert_eq!(
            url("http://c:80/v1/traces"),
            ok(false, "c", 80, "/v1/traces")
        );
        assert_eq!(url("https://[::1]/x"), ok(true, "::1", 443, "/x"));
        assert_eq!(
            url("http://10.0.0.1:9/t?a=b@c#f"),
            ok(false, "10.0.0.1", 9, "/t?a=b@c")
        );
        for bad in [
            "c:4318",
            "/v1/traces",
            "ftp://c",
            "http://",
            "http://c:99999",
            "http://c:x",
            "http://[::1/",
            "http://u@c",
            "http://u:p@c",
            "http://c/a b",
            "http://c/a\nb",
        ] {
            assert!(url(bad).is_err(), "{bad}");
        }
    }
}
