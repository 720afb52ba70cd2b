//! State that lives on one upstream (see the affinity guide): who owns which object ([`owners`])
//! and how owners and chain parts are read back from the record store within a budget
//! ([`reading`]), which objects a request refers to ([`refs`]), how a Responses chain is rebuilt as
//! a stateless request when its owner cannot answer ([`rebuild`]), and the `sticky` ordering with
//! `weight` ([`sticky`]).
//!
//! Nothing here imports the proxy, the ledger or the capture: they call in with plain values.

pub mod owners;
pub mod reading;
pub mod rebuild;
pub mod refs;
pub mod sticky;

pub use self::owners::Owners;

/// What routing by owner (see the affinity guide) notes about one request, kept in its ledger.
#[derive(Debug, Default, Clone, Copy)]
pub struct Marks {
    /// It went out as a rebuilt Responses chain (the record's `rebuilt`).
    pub rebuilt: bool,
    /// The answer about to be committed says the object is not there: relayed without counting
    /// for or against its upstream.
    pub not_here: bool,
}

/// An object a request deleted at its owner, for its record to forget.
pub type Forgotten = Option<std::sync::Arc<str>>;

/// Whether `body` holds one of `keys` as a quoted JSON key (`"key"`): one pass that jumps from
/// quote to quote, so a body naming none of them costs a byte scan and no parse.
pub fn names_a_key(body: &[u8], keys: &[&[u8]]) -> bool {
    let mut from = 0;
    while let Some(off) = body
        .get(from..)
        .and_then(|r| r.iter().position(|&b| b == b'"'))
    {
        let at = from + off + 1;
        let rest = &body[at..];
        if keys
            .iter()
            .any(|k| rest.len() > k.len() && rest.starts_with(k) && rest[k.len()] == b'"')
        {
            return true;
        }
        from = at;
    }
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_a_key_needs_the_quotes() {
        assert!(super::names_a_key(br#"{"user":"x"}"#, &[b"user"]));
        assert!(!super::names_a_key(br#"{"users":"x"}"#, &[b"user"]));
        assert!(!super::names_a_key(br#"{"a":"user"#, &[b"user"]));
    }
}
