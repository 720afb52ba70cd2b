//! `members` (see the members guide): the people and services that share the gateway's upstream
//! account, each with its key, its limits, the models it may use, and which objects it sees.
//!
//! Every `authorization` token becomes a member too, named by its label, without limits and
//! seeing every object, so a Go config keeps working unchanged. Keys are held only as SHA-256
//! digests: a `key_sha256` keeps the secret out of the file, and a request's token is found by
//! its digest, then compared in constant time (see the security guide).

use std::collections::HashMap;
use std::sync::Arc;

use actix_web::http::header::HeaderValue;
use serde_yaml::Value;

use super::parse::Parser;
use super::{token_label, Pattern};
pub use crate::member_limits::MemberLimits;
use crate::member_limits::MemberState;

/// The keys of one `members` entry.
pub(super) const MEMBER_KEYS: &[&str] = &[
    "name",
    "key",
    "key_sha256",
    "rpm",
    "tpm",
    "tokens_per_day",
    "concurrent",
    "allow",
    "deny",
    "objects",
    "admin",
];

/// Which objects a member may refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objects {
    /// Only those its own requests created (the default for `members` entries).
    Own,
    /// Every object, as in version 0.3 (`authorization` tokens).
    All,
}

/// One member.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its name: in records, metrics, logs.
    pub name: Arc<str>,
    /// SHA-256 of its key.
    pub digest: [u8; 32],
    /// The record's `client_key` label, when the key is in the file (else made per request from
    /// the token sent).
    pub label: Option<Arc<str>>,
    /// Its limits.
    pub limits: MemberLimits,
    /// Models it may use (none: all).
    pub allow: Vec<Pattern>,
    /// Models it may not use.
    pub deny: Vec<Pattern>,
    /// Which objects it sees.
    pub objects: Objects,
    /// May read every member's usage.
    pub admin: bool,
    /// What it used: kept across a reload for a member of the same name.
    pub state: Arc<MemberState>,
    /// Its `rpm` and `tpm` as the values of `x-ratelimit-limit-requests` and `-tokens`, made once
    /// (every answer to it carries them).
    pub limit_values: [Option<HeaderValue>; 2],
}

impl Member {
    /// Whether the member may use `model` (requests without a model are never refused).
    pub fn may_use(&self, model: Option<&str>) -> bool {
        let Some(model) = model else { return true };
        if self.deny.iter().any(|p| p.matches(model)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|p| p.matches(model))
    }
}

/// Every member, found by the digest of its key.
#[derive(Debug, Clone, Default)]
pub struct Members {
    /// In file order: `members` entries, then `authorization` tokens.
    pub list: Vec<Member>,
    by_digest: HashMap<[u8; 32], usize>,
}

impl Members {
    /// The member whose key's digest is `digest`: a hash lookup (the digest of a secret tells
    /// nothing of it), then a constant-time comparison of the whole digest.
    pub fn by_digest(&self, digest: &[u8; 32]) -> Option<(usize, &Member)> {
        let idx = *self.by_digest.get(digest)?;
        let m = self.list.get(idx)?;
        ct_eq(&m.digest, digest).then_some((idx, m))
    }

    /// The member named `name`.
    pub fn by_name(&self, name: &str) -> Option<&Member> {
        self.list.iter().find(|m| &*m.name == name)
    }

    /// Takes over what the members of an earlier config used, by name (a reload).
    pub fn adopt(&mut self, earlier: &Members) {
        for m in &mut self.list {
            if let Some(old) = earlier.by_name(&m.name) {
                m.state = old.state.clone();
            }
        }
    }

    /// Whether there is no member (`-noauth`).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// Constant-time comparison of two digests.
pub fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The SHA-256 digest of a token.
pub fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A member name: `[A-Za-z0-9_.-]`, 1–64 characters (safe in a metric label, a log line, a
/// record and a URL query).
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl Parser<'_> {
    /// Reads `members` and turns the `authorization` tokens into members too.
    pub(super) fn members(
        &mut self,
        v: Option<&Value>,
        tokens: &[String],
        noauth: bool,
    ) -> Members {
        let mut out = Members::default();
        if noauth {
            return out;
        }
        let mut seen: HashMap<[u8; 32], String> = HashMap::new();
        let entries = match v {
            None | Some(Value::Null) => &[][..],
            Some(Value::Sequence(s)) => &s[..],
            Some(_) => {
                self.err("members", "expected a list of members");
                &[][..]
            }
        };
        for (i, entry) in entries.iter().enumerate() {
            let at = format!("members[{i}]");
            let Value::Mapping(m) = entry else {
                self.err(&at, "expected a mapping {name, key, …}");
                continue;
            };
            self.warn_unknown(m, MEMBER_KEYS, &at);
            let key = |k: &str| format!("{at}.{k}");
            let name = m.get("name").and_then(|v| self.string(&key("name"), v));
            let Some(name) = name.filter(|n| valid_name(n)) else {
                self.err(
                    &key("name"),
                    "required: 1 to 64 characters of A-Z, a-z, 0-9, `_`, `.` and `-`",
                );
                continue;
            };
            if out.by_name(&name).is_some() {
                self.err(&key("name"), format!("{name:?} is used by another member"));
                continue;
            }
            let plain = m.get("key").and_then(|v| self.string(&key("key"), v));
            let hashed = m
                .get("key_sha256")
                .and_then(|v| self.string(&key("key_sha256"), v));
            let (digest, label) = match (plain.filter(|k| !k.trim().is_empty()), hashed) {
                (Some(_), Some(_)) => {
                    self.err(&at, "give `key` or `key_sha256`, not both");
                    continue;
                }
                (Some(k), None) => {
                    let k = k.trim();
                    (digest(k), Some(Arc::<str>::from(token_label(k))))
                }
                (None, Some(h)) => match parse_hex(h.trim()) {
                    Some(d) => (d, None),
                    None => {
                        self.err(&key("key_sha256"), "expected 64 hexadecimal digits");
                        continue;
                    }
                },
                (None, None) => {
                    self.err(&at, "a member needs `key` or `key_sha256`");
                    continue;
                }
            };
            if let Some(other) = seen.insert(digest, name.clone()) {
                self.err(&at, format!("the same key as member {other:?}"));
                continue;
            }
            let limits = MemberLimits {
                rpm: self.limit(&key("rpm"), m.get("rpm")),
                tpm: self.limit(&key("tpm"), m.get("tpm")),
                tokens_per_day: self.limit(&key("tokens_per_day"), m.get("tokens_per_day")),
                concurrent: self.limit(&key("concurrent"), m.get("concurrent")),
            };
            let patterns = |p: &mut Self, k: &str| -> Vec<Pattern> {
                p.list(&key(k), m.get(k)).into_iter().map(Pattern).collect()
            };
            let allow = patterns(self, "allow");
            let deny = patterns(self, "deny");
            let objects = match m
                .get("objects")
                .and_then(|v| self.string(&key("objects"), v))
            {
                None => Objects::Own,
                Some(s) => match s.trim() {
                    "own" => Objects::Own,
                    "all" => Objects::All,
                    other => {
                        self.err(&key("objects"), format!("{other:?}: use own or all"));
                        Objects::Own
                    }
                },
            };
            let admin = self.boolean(&key("admin"), m.get("admin"), false);
            out.by_digest.insert(digest, out.list.len());
            out.list.push(Member {
                name: name.into(),
                digest,
                label,
                limit_values: [
                    limits.rpm.map(HeaderValue::from),
                    limits.tpm.map(HeaderValue::from),
                ],
                limits,
                allow,
                deny,
                objects,
                admin,
                state: Arc::default(),
            });
        }
        // Every `authorization` token is a member named by its label (`#2`, `#3`… when two
        // tokens share one), without limits, seeing every object.
        for (i, token) in tokens.iter().enumerate() {
            let token = token.trim();
            let d = digest(token);
            if let Some(other) = seen.insert(d, format!("authorization[{i}]")) {
                self.err(
                    "authorization",
                    format!("token {} is also the key of {other:?}", i + 1),
                );
                continue;
            }
            let label = token_label(token);
            let mut name = label.clone();
            let mut n = 1;
            while out.by_name(&name).is_some() {
                n += 1;
                name = format!("{label}#{n}");
            }
            out.by_digest.insert(d, out.list.len());
            out.list.push(Member {
                name: name.into(),
                digest: d,
                label: Some(label.into()),
                limits: MemberLimits::default(),
                allow: Vec::new(),
                deny: Vec::new(),
                objects: Objects::All,
                admin: false,
                state: Arc::default(),
                limit_values: [None, None],
            });
        }
        out
    }

    /// A limit: absent, or a positive whole number (`${ENV}` included).
    fn limit(&mut self, key: &str, v: Option<&Value>) -> Option<u64> {
        let n = match v? {
            Value::Null => return None,
            Value::Number(n) => n.as_f64(),
            Value::String(s) => self.subst(key, s).trim().parse::<f64>().ok(),
            _ => None,
        };
        match n {
            Some(n) if n.fract() == 0.0 && (1.0..=1e15).contains(&n) => Some(n as u64),
            _ => {
                self.err(key, "must be a positive whole number");
                None
            }
        }
    }
}

/// 64 hexadecimal digits as 32 bytes.
fn parse_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Members, String> {
        crate::config::parse(std::path::Path::new("t.yaml"), text, false, &|_| None)
            .map(|(c, _)| c.members)
            .map_err(|e| e.to_string())
    }

    const UP: &str = "upstreams: [{endpoint: 'http://h/v1'}]\n";

    #[test]
    fn members_and_tokens() {
        let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"; // "test"
        let m = parse(&format!(
            "{UP}authorization: sk-aaaaaaaaaaaaaaaa1234, sk-bbbbbbbbbbbbbbbb1234\nmembers:\n  - {{name: alice, key: alice-key-0001, rpm: 60, tpm: 1000, allow: ['gpt-4o*'], admin: true}}\n  - {{name: bob, key_sha256: {hash}, objects: all, concurrent: 2}}\n"
        ))
        .unwrap();
        let names: Vec<&str> = m.list.iter().map(|m| &*m.name).collect();
        assert_eq!(names, ["alice", "bob", "sk-…1234", "sk-…1234#2"]);
        let alice = m.by_digest(&digest("alice-key-0001")).unwrap().1;
        assert_eq!(alice.limits.rpm, Some(60));
        assert_eq!(alice.objects, Objects::Own);
        assert!(alice.admin && alice.may_use(Some("gpt-4o-mini")) && !alice.may_use(Some("o1")));
        let bob = m.by_digest(&digest("test")).unwrap().1;
        assert_eq!((&*bob.name, bob.objects), ("bob", Objects::All));
        assert!(bob.label.is_none());
        let token = m.by_digest(&digest("sk-bbbbbbbbbbbbbbbb1234")).unwrap().1;
        assert_eq!(&*token.name, "sk-…1234#2");
        assert!(!token.limits.any() && token.objects == Objects::All);
        assert!(m.by_digest(&digest("nope")).is_none());
    }

    #[test]
    fn a_key_given_twice_or_a_bad_limit_is_an_error() {
        for (text, want) in [
            (
                "members: [{name: a, key: k1}, {name: b, key: k1}]",
                "the same key as member \"a\"",
            ),
            (
                "authorization: k1\nmembers: [{name: a, key: k1}]",
                "is also the key of",
            ),
            (
                "members: [{name: a, key: k1, rpm: 0}]",
                "members[0].rpm: must be a positive whole number",
            ),
            (
                "members: [{name: a, key: k1, tpm: 1.5}]",
                "members[0].tpm: must be a positive whole number",
            ),
            ("members: [{name: 'a b', key: k1}]", "members[0].name"),
            ("members: [{name: a}]", "needs `key` or `key_sha256`"),
            ("members: [{name: a, key: k, key_sha256: x}]", "not both"),
            (
                "members: [{name: a, key_sha256: abc}]",
                "64 hexadecimal digits",
            ),
            (
                "members: [{name: a, key: k1}, {name: a, key: k2}]",
                "used by another member",
            ),
            (
                "members: [{name: a, key: k1, objects: mine}]",
                "use own or all",
            ),
        ] {
            let e = parse(&format!("{UP}{text}\n")).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        // A key and the digest of the same key are one key given twice.
        let d: String = digest("k1").iter().map(|b| format!("{b:02x}")).collect();
        let e = parse(&format!(
            "{UP}members: [{{name: a, key: k1}}, {{name: b, key_sha256: {d}}}]\n"
        ))
        .unwrap_err();
        assert!(e.contains("the same key"), "{e}");
    }

    #[test]
    fn noauth_has_no_members() {
        let (c, _) = crate::config::parse(
            std::path::Path::new("t.yaml"),
            &format!("{UP}members: [{{name: a, key: k1}}]\n"),
            true,
            &|_| None,
        )
        .unwrap();
        assert!(c.members.is_empty());
    }
}
