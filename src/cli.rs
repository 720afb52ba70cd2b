//! Command line (see the configuration guide, "Command line"): the Go tool's flags in every
//! spelling Go's `flag` package accepts.
//!
//! clap only knows `--long`; Go users type `-addr :8080` and `-noauth=true`. We rewrite the
//! single-dash spelling of our own long flags to the double-dash one before clap sees them, so
//! the help text, errors and parsing stay clap's.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

/// Long flags that may be written with one dash, as in Go.
const LONG_FLAGS: &[&str] = &[
    "addr",
    "upstreams",
    "config",
    "database",
    "dbtype",
    "list",
    "noauth",
    "version",
    "help",
];

/// Parsed command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "openai-api-route",
    version,
    about = "OpenAI API gateway: tries each upstream in order until one answers, records every request",
    long_about = None,
    after_help = "Each flag also works with one dash, as in the Go version: -addr :8080, -config upstreams.yaml, -noauth.",
    disable_help_flag = false
)]
pub struct Cli {
    /// Listen address; ":8888" means all interfaces, port 8888 [default: :8888, or `address` in the config]
    #[arg(long, value_name = "ADDR")]
    pub addr: Option<String>,

    /// Upstream config file
    #[arg(
        long,
        visible_alias = "config",
        value_name = "FILE",
        default_value = "./upstreams.yaml"
    )]
    pub upstreams: PathBuf,

    /// Where requests are recorded: a SQLite database file (created if missing), a postgres://… URL (PostgreSQL, for several replicas), or "none" (recording off) [default: ./db.sqlite, or `database` in the config]
    #[arg(long, value_name = "FILE|URL")]
    pub database: Option<String>,

    /// The Go tool's `-dbtype` (sqlite|postgres); kept so old command lines still start
    #[arg(long, value_name = "TYPE", hide = true)]
    pub dbtype: Option<String>,

    /// Print the configured upstreams (never their keys) and exit
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_name = "BOOL")]
    pub list: bool,

    /// Do not check the incoming Authorization header
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_name = "BOOL")]
    pub noauth: bool,
}

impl Cli {
    /// Parses the process arguments (exits with clap's message on error, as Go's flag does).
    pub fn from_env() -> Cli {
        Cli::parse_from(normalize(std::env::args_os()))
    }

    /// Parses the given arguments, the first being the program name.
    pub fn try_from_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        Cli::try_parse_from(normalize(args))
    }
}

/// Turns `-addr`, `-addr=x` into `--addr`, `--addr=x` for our own long flags only.
fn normalize<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    args.into_iter()
        .map(Into::into)
        .map(|a| {
            let Some(s) = a.to_str() else { return a };
            if s.starts_with("--") || !s.starts_with('-') {
                return a;
            }
            let name = s[1..].split('=').next().unwrap_or("");
            if LONG_FLAGS.contains(&name) {
                OsString::from(format!("-{s}"))
            } else {
                a
            }
        })
        .collect()
}

/// Turns Go's `:8888` into something we can bind: all interfaces on that port.
pub fn bind_address(addr: &str) -> String {
    if let Some(port) = addr.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else {
        addr.to_string()
    }
}

/// The `-list` output: one line per upstream, never a key.
pub fn list_text(cfg: &crate::config::Config) -> String {
    let mut out = String::new();
    for (i, u) in cfg.upstreams.iter().enumerate() {
        let auth = match u.auth {
            crate::config::UpstreamAuth::None => "none",
            crate::config::UpstreamAuth::Bearer(_) => "key (hidden)",
            crate::config::UpstreamAuth::AsIs => "client's own (asis)",
        };
        let pats = |v: &[crate::config::Pattern]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.iter().map(|p| p.0.as_str()).collect::<Vec<_>>().join(",")
            }
        };
        out.push_str(&format!(
            "{}. {}  endpoint={}  timeout={}s  stream_timeout={}s  allow={}  deny={}  auth={}\n",
            i + 1,
            u.name,
            u.display,
            u.timeout.as_secs_f64(),
            u.stream_timeout.as_secs_f64(),
            pats(&u.allow),
            pats(&u.deny),
            auth
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let mut v = vec!["openai-api-route"];
        v.extend_from_slice(args);
        Cli::try_from_args(v).unwrap()
    }

    #[test]
    fn go_spellings() {
        for args in [
            &["-addr", ":1"][..],
            &["-addr=:1"],
            &["--addr", ":1"],
            &["--addr=:1"],
        ] {
            assert_eq!(parse(args).addr.as_deref(), Some(":1"), "{args:?}");
        }
        assert_eq!(
            parse(&["-config", "x.yaml"]).upstreams,
            PathBuf::from("x.yaml")
        );
        assert_eq!(
            parse(&["-upstreams=y.yaml"]).upstreams,
            PathBuf::from("y.yaml")
        );
        assert!(parse(&["-noauth"]).noauth);
        assert!(parse(&["-noauth=true"]).noauth);
        assert!(!parse(&["-noauth=false"]).noauth);
        assert!(!parse(&[]).noauth);
        assert!(parse(&["-list", "-noauth"]).list);
        assert_eq!(
            parse(&["-database", "none"]).database.as_deref(),
            Some("none")
        );
    }

    #[test]
    fn help_names_every_database_kind() {
        use clap::CommandFactory;
        let help = Cli::command().render_help().to_string();
        for want in ["-database <FILE|URL>", "SQLite", "postgres://", "\"none\""] {
            assert!(help.contains(want), "{want} missing from:\n{help}");
        }
    }

    #[test]
    fn colon_port_means_all_interfaces() {
        assert_eq!(bind_address(":8888"), "0.0.0.0:8888");
        assert_eq!(bind_address("127.0.0.1:1"), "127.0.0.1:1");
    }
}
