//! The one parse of a request body: every fact a later step needs, read in a single pass
//! ([`read`]). The ranges it notes let the proxy edit the body an upstream gets without parsing
//! it again (`proxy::body`).
//!
//! Before this, admission, the sticky key, the object references, a rebuild, the `n` check of a
//! continuation and the usage option each parsed the body on their own, and each could read it
//! differently. Now admission reads it once, refuses what it cannot read (see the security
//! guide: a filter or `model_map` is never passed by a body the gateway could not read), and
//! hands the facts on in the request's info. [`parses`] counts the whole-body parses, so a test
//! can show that a proxied request's body is parsed exactly once.
//!
//! A body whose first non-whitespace bytes are a UTF-8 BOM or `{` is JSON whatever its content
//! type, and must be one JSON object without a BOM and without a duplicate top-level key; any
//! other body (multipart, plain text, empty) has no facts.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

pub mod refs;

use self::refs::{may_refer, walk_raw, Key, RefValue, Refs, Walk};
pub use self::refs::{MAX_ID_BYTES, MAX_REFS, REF_KEYS};

/// Whole-body JSON parses of request bodies since start (see [`parses`]).
static PARSES: AtomicU64 = AtomicU64::new(0);

/// How many times a request body has been parsed as JSON as a whole since the process started:
/// once per proxied JSON request by design (tests and the allocation bench read it).
pub fn parses() -> u64 {
    PARSES.load(Ordering::Relaxed)
}

/// Counts one whole-body parse made outside [`read`] (a rebuilt chain's body).
pub fn count_parse() {
    PARSES.fetch_add(1, Ordering::Relaxed);
}

/// What the gateway reads from a request body, in one pass; see the module docs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestFacts {
    /// The body is a JSON object (so it can be edited).
    pub json: bool,
    /// Top-level `model`, when a string (shared: see [`shared_model`]).
    pub model: Option<Arc<str>>,
    /// Where the top-level `model` value sits (rewritten by `model_map` in place).
    pub model_at: Option<Range<usize>>,
    /// Top-level `"stream": true`.
    pub stream: bool,
    /// Where the top-level `stream_options` value sits (`force_usage` edits it).
    pub stream_options: Option<Range<usize>>,
    /// Where the top-level `input` value sits (a Responses chain keeps it for rebuilding).
    pub input: Option<Range<usize>>,
    /// Where the top-level `messages` value sits (a continuation appends its prefill to it).
    pub messages: Option<Range<usize>>,
    /// `n` asks for more than one choice (a stream of several choices is never resumed).
    pub many_choices: bool,
    /// Top-level `store`, when a boolean.
    pub store: Option<bool>,
    /// `pck:<prompt_cache_key>`, else `user:<user>` (non-empty strings): the sticky key's first
    /// choices (see the affinity guide).
    pub affinity: Option<Box<str>>,
    /// Top-level `previous_response_id`, when a non-empty string of at most [`MAX_ID_BYTES`].
    pub previous_response_id: Option<Box<str>>,
    /// Ids under the referring keys, at any depth, deduplicated, at most [`MAX_REFS`]; each at
    /// most [`MAX_ID_BYTES`] long.
    pub refs: Vec<Box<str>>,
    /// A referring key held an id longer than [`MAX_ID_BYTES`] (never owned: such a request
    /// follows the "not here" rule and teaches no owner).
    pub long_ref: bool,
    /// The body names one of the keys a vLLM prefill sets (its edit then rewrites the body).
    pub names_prefill_keys: bool,
}

impl RequestFacts {
    /// The body text of a fact's range (for a body these facts were read from).
    pub fn slice<'a>(&self, body: &'a [u8], at: &Option<Range<usize>>) -> Option<&'a [u8]> {
        at.as_ref().and_then(|r| body.get(r.clone()))
    }
}

/// Why a body was refused; the text goes to the client in a 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable(pub String);

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reads the facts of a request body in one pass; see the module docs.
pub fn read(body: &[u8]) -> Result<RequestFacts, Unreadable> {
    let start = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(body.len());
    let rest = &body[start..];
    if rest.starts_with(BOM) {
        return Err(Unreadable(
            "the JSON body starts with a byte order mark; send plain UTF-8 JSON".into(),
        ));
    }
    if rest.first() != Some(&b'{') {
        return Ok(RequestFacts::default());
    }
    PARSES.fetch_add(1, Ordering::Relaxed);
    let mut de = serde_json::Deserializer::from_slice(body);
    let top = TopLevel {
        base: body.as_ptr() as usize,
        refs: may_refer(body),
    };
    top.deserialize(&mut de)
        .and_then(|m| de.end().map(|()| m))
        .map_err(|e| Unreadable(format!("the request body is not valid JSON: {e}")))
}

/// Deserializes the top-level object, checking keys for duplicates.
struct TopLevel {
    /// Address of the body's first byte: raw values borrowed from the body are located by it.
    base: usize,
    /// The body may hold references: values are walked for them.
    refs: bool,
}

impl<'de> DeserializeSeed<'de> for TopLevel {
    type Value = RequestFacts;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RequestFacts, D::Error> {
        d.deserialize_map(self)
    }
}

/// The value of `model`: a string, or null (no model); anything else cannot be filtered.
struct ModelValue;

impl<'de> DeserializeSeed<'de> for ModelValue {
    type Value = Option<Arc<str>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Arc<str>>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Option<Arc<str>>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`model` as a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<Arc<str>>, E> {
                Ok(Some(shared_model(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Option<Arc<str>>, E> {
                Ok(None)
            }
        }
        d.deserialize_any(V)
    }
}

/// Model names a worker keeps to share: a gateway sees a handful of models, asked for again and
/// again. Bounded: a client sending a new name every time only empties it.
const SHARED_MODELS: usize = 64;
/// Longer names are not kept (they are copied per request, as any other name would be).
const SHARED_MODEL_BYTES: usize = 128;

thread_local! {
    static MODELS: std::cell::RefCell<Vec<Arc<str>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `name` as a shared string: the worker's copy when it has one (a reference count instead of an
/// allocation per request).
pub fn shared_model(name: &str) -> Arc<str> {
    if name.len() > SHARED_MODEL_BYTES {
        return name.into();
    }
    MODELS.with(|cell| {
        let mut known = cell.borrow_mut();
        if let Some(m) = known.iter().find(|m| &***m == name) {
            return m.clone();
        }
        if known.len() >= SHARED_MODELS {
            known.clear();
        }
        let m: Arc<str> = name.into();
        known.push(m.clone());
        m
    })
}

/// A scalar value as far as the facts care: a string, `true`/`false`, a small integer, or
/// anything else (walked for references when asked, else skipped).
enum Scalar<'de> {
    Str(Cow<'de, str>),
    Bool(bool),
    Int(u64),
    Null,
    Other,
}

/// Reads one value as a [`Scalar`], walking a container for references into `refs` when `walk`.
struct ScalarOr<'a> {
    refs: Option<&'a mut Refs>,
}

impl<'de> DeserializeSeed<'de> for ScalarOr<'_> {
    type Value = Scalar<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Scalar<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ScalarOr<'_> {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_string())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Int(v))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar<'de>, A::Error> {
        match self.refs {
            Some(refs) => Walk::new(refs).visit_seq(seq)?,
            None => IgnoredAny.visit_seq(seq).map(|_| ())?,
        }
        Ok(Scalar::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar<'de>, A::Error> {
        match self.refs {
            Some(refs) => Walk::new(refs).visit_map(map)?,
            None => IgnoredAny.visit_map(map).map(|_| ())?,
        }
        Ok(Scalar::Other)
    }
}

/// Key sets up to this size are checked by a linear scan; larger ones by a hash set, so a body
/// of a million keys costs no quadratic time.
const LINEAR_KEYS: usize = 16;

impl<'de> Visitor<'de> for TopLevel {
    type Value = RequestFacts;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RequestFacts, A::Error> {
        let mut facts = RequestFacts {
            json: true,
            ..RequestFacts::default()
        };
        let mut refs = Refs::default();
        let (mut cache_key, mut user) = (None, None);
        let range_of = |raw: &RawValue| {
            let at = (raw.get().as_ptr() as usize).wrapping_sub(self.base);
            at..at + raw.get().len()
        };
        // The first keys live on the stack (a `Vec` here was one allocation per request).
        let mut few: [Cow<'de, str>; LINEAR_KEYS] = Default::default();
        let mut n = 0;
        let mut many: Option<HashSet<Cow<'de, str>>> = None;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let dup = match &mut many {
                Some(set) => !set.insert(key.clone()),
                None => {
                    let dup = few[..n].contains(&key);
                    if n < LINEAR_KEYS {
                        few[n] = key.clone();
                        n += 1;
                    } else {
                        let mut set: HashSet<Cow<'de, str>> =
                            few.iter_mut().map(std::mem::take).collect();
                        set.insert(key.clone());
                        many = Some(set);
                    }
                    dup
                }
            };
            if dup {
                return Err(de::Error::custom(format_args!(
                    "duplicate key {:?}",
                    crate::escape::untrusted(&key)
                )));
            }
            let walk = self.refs.then_some(&mut refs);
            match key.as_ref() {
                "model" => {
                    let raw: &'de RawValue = map.next_value()?;
                    facts.model = ModelValue
                        .deserialize(&mut serde_json::Deserializer::from_str(raw.get()))
                        .map_err(|e| de::Error::custom(format_args!("{e}")))?;
                    facts.model_at = Some(range_of(raw));
                }
                "stream" => {
                    facts.stream = matches!(
                        map.next_value_seed(ScalarOr { refs: walk })?,
                        Scalar::Bool(true)
                    )
                }
                "stream_options" => {
                    let raw: &'de RawValue = map.next_value()?;
                    facts.stream_options = Some(range_of(raw));
                }
                "input" | "messages" => {
                    let raw: &'de RawValue = map.next_value()?;
                    if let Some(refs) = walk {
                        walk_raw(raw, refs)?;
                    }
                    let at = Some(range_of(raw));
                    if key == "input" {
                        facts.input = at;
                    } else {
                        facts.messages = at;
                    }
                }
                "n" => {
                    facts.many_choices = !matches!(
                        map.next_value_seed(ScalarOr { refs: walk })?,
                        Scalar::Null | Scalar::Int(0 | 1)
                    )
                }
                "store" => {
                    if let Scalar::Bool(b) = map.next_value_seed(ScalarOr { refs: walk })? {
                        facts.store = Some(b);
                    }
                }
                "prompt_cache_key" | "user" => {
                    if let Scalar::Str(s) = map.next_value_seed(ScalarOr { refs: walk })? {
                        if !s.is_empty() {
                            let prefixed = if key == "user" { "user:" } else { "pck:" };
                            let k: Box<str> = format!("{prefixed}{s}").into();
                            if key == "user" {
                                user = Some(k);
                            } else {
                                cache_key = Some(k);
                            }
                        }
                    }
                }
                "continue_final_message" | "add_generation_prompt" => {
                    facts.names_prefill_keys = true;
                    map.next_value::<IgnoredAny>()?;
                }
                k if REF_KEYS.contains(&k) => {
                    if k == "previous_response_id" {
                        if let Scalar::Str(s) = map.next_value_seed(ScalarOr { refs: walk })? {
                            if !s.is_empty() && s.len() <= MAX_ID_BYTES {
                                facts.previous_response_id = Some(s.as_ref().into());
                            }
                            refs.push(&s);
                        }
                    } else {
                        map.next_value_seed(RefValue::new(&mut refs, k))?;
                    }
                }
                _ => match walk {
                    Some(refs) => map.next_value_seed(Walk::new(refs))?,
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                },
            }
        }
        facts.affinity = cache_key.or(user);
        facts.refs = refs.ids;
        facts.long_ref = refs.long;
        Ok(facts)
    }
}

#[cfg(test)]
mod tests;
