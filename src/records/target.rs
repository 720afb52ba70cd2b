//! What `-database` names (see the configuration guide, "Command line", and the security guide):
//! a SQLite file, a PostgreSQL URL, or a libpq key/value string — and how each is shown without
//! its password.
//!
//! A key/value string is read with libpq's own rules (spaces around `=`, single-quoted values
//! with backslash escapes), because anything looser turned `host=h password = hunter2` into a
//! SQLite file named after the whole string, password included. A string that contains `=` but
//! is not valid conninfo is refused at start with a message that does not echo it.

/// Keywords libpq accepts in a conninfo string; any other is refused, as libpq does.
const KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "require_auth",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "sslmode",
    "sslnegotiation",
    "requiressl",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcertmode",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "service",
    "target_session_attrs",
    "load_balance_hosts",
];

/// Keys whose values are secrets.
fn secret_key(key: &str) -> bool {
    key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("sslpassword")
}

/// A `-database` value, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An embedded SQLite file path.
    Sqlite(String),
    /// A PostgreSQL URL or conninfo string, as given (the driver parses it).
    Postgres(String),
}

/// Why a `-database` value was refused; never contains the value itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("-database: {0} (the value is not shown: it may hold a password)")]
pub struct TargetError(pub String);

/// Parses a `-database` value (already trimmed, not `none`).
pub fn parse(target: &str) -> Result<Target, TargetError> {
    let t = target.trim();
    if is_url(t) {
        return Ok(Target::Postgres(t.to_string()));
    }
    if !t.contains('=') {
        return Ok(Target::Sqlite(t.to_string()));
    }
    let pairs = conninfo(t)?;
    if pairs.is_empty() {
        return Err(TargetError("empty PostgreSQL connection string".into()));
    }
    Ok(Target::Postgres(t.to_string()))
}

fn is_url(t: &str) -> bool {
    let lower = t.get(..13).unwrap_or(t).to_ascii_lowercase();
    lower.starts_with("postgres://") || lower.starts_with("postgresql://")
}

/// Splits a libpq conninfo string into `(keyword, value)` pairs, by libpq's rules.
pub fn conninfo(s: &str) -> Result<Vec<(String, String)>, TargetError> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = it.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.next() != Some('=') {
            return Err(TargetError(format!(
                "{} is not followed by \"=\" in the PostgreSQL connection string",
                shown_key(&key)
            )));
        }
        if key.is_empty() {
            return Err(TargetError(
                "a value without a keyword in the PostgreSQL connection string".into(),
            ));
        }
        if !KEYWORDS.contains(&key.as_str()) {
            return Err(TargetError(format!(
                "{} is not a PostgreSQL connection keyword",
                shown_key(&key)
            )));
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if it.next_if_eq(&'\'').is_some() {
            loop {
                match it.next() {
                    None => {
                        return Err(TargetError(format!(
                            "unterminated quoted value for {key} in the PostgreSQL connection string"
                        )))
                    }
                    Some('\\') => match it.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(TargetError(format!(
                                "unterminated quoted value for {key} in the PostgreSQL connection string"
                            )))
                        }
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = it.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(e) = it.next() {
                        value.push(e);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// A keyword fit to show: short and plain, else a description.
fn shown_key(key: &str) -> String {
    if key.is_empty() {
        "an empty keyword".into()
    } else if key.len() <= 40
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        format!("keyword {key:?}")
    } else {
        "a keyword".into()
    }
}

/// The target as shown in logs, errors and the status page: every password and sslpassword is
/// `***`. A string that cannot be read is not shown at all.
pub fn redact(target: &str) -> String {
    let t = target.trim();
    if is_url(t) {
        return redact_url(t);
    }
    if !t.contains('=') {
        return t.to_string();
    }
    match conninfo(t) {
        Ok(pairs) => pairs
            .iter()
            .map(|(k, v)| {
                if secret_key(k) {
                    format!("{k}=***")
                } else if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == '\'') {
                    format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => "<unreadable connection string>".into(),
    }
}

/// `postgres://user:secret@host/db?password=x` → `postgres://user:***@host/db?password=***`.
/// The user info ends at the last `@` before the query: a password may itself contain `@`.
fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return "<unreadable connection string>".into();
    };
    let (head, rest) = url.split_at(scheme_end + 3);
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let mut out = String::from(head);
    match before_query.rfind('@') {
        Some(at) => {
            let userinfo = &before_query[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&before_query[at..]);
        }
        None => out.push_str(before_query),
    }
    if let Some(q) = query {
        out.push('?');
        let params: Vec<String> = q
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if secret_key(k.trim()) => format!("{}=***", k.trim()),
                _ => p.to_string(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_spellings_never_show_the_password() {
        for (input, shown) in [
            (
                "host=h password = hunter2 dbname=d",
                "host=h password=*** dbname=d",
            ),
            (
                "host=h password='hunter2 two' dbname=d",
                "host=h password=*** dbname=d",
            ),
            (
                "host=h password =hunter2 sslpassword= 'hunter2' user=u",
                "host=h password=*** sslpassword=*** user=u",
            ),
            ("postgres://u:p@ss@h:5432/db", "postgres://u:***@h:5432/db"),
            (
                "postgresql://u:hunter2@h/db?sslpassword=hunter2&sslmode=require&password=hunter2",
                "postgresql://u:***@h/db?sslpassword=***&sslmode=require&password=***",
            ),
            ("postgres://h/db", "postgres://h/db"),
        ] {
            assert_eq!(redact(input), shown, "{input}");
            assert!(!redact(input).contains("hunter2"));
            assert!(!redact(input).contains("ss@h"));
            assert!(matches!(parse(input), Ok(Target::Postgres(_))), "{input}");
        }
    }

    #[test]
    fn sqlite_paths_and_refused_strings() {
        assert_eq!(
            parse("./db.sqlite"),
            Ok(Target::Sqlite("./db.sqlite".into()))
        );
        for bad in [
            "host=h password hunter2",
            "host=h secret=hunter2",
            "host=h password='hunter2",
            "./data/a=hunter2.sqlite",
            "=hunter2",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(!e.to_string().contains("hunter2"), "{bad}: {e}");
        }
    }
}
