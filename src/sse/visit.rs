//! The serde visitors of [`super::Payload`]: each reads its part of an event's JSON in one pass,
//! borrowing strings and summing choices up as they come, so that nothing is collected.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::payload::{ChoiceView, Choices, ErrorView, Payload, ResponseView, MAX_CHOICES};
use super::scan::{RawUsage, Usage};

/// A string borrowed from the payload unless it had escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A value that is a string, or anything else (None).
struct MaybeStr<'a>(Option<Cow<'a, str>>);

impl<'de> Deserialize<'de> for MaybeStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<MaybeStr<'de>, E> {
                Ok(MaybeStr(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MaybeStr<'de>, E> {
                Ok(MaybeStr(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<MaybeStr<'de>, E> {
                Ok(MaybeStr(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<MaybeStr<'de>, E> {
                Ok(MaybeStr(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<MaybeStr<'de>, E> {
                Ok(MaybeStr(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<MaybeStr<'de>, E> {
                Ok(MaybeStr(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<MaybeStr<'de>, E> {
                Ok(MaybeStr(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, s: A) -> Result<MaybeStr<'de>, A::Error> {
                IgnoredAny.visit_seq(s).map(|_| MaybeStr(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<MaybeStr<'de>, A::Error> {
                IgnoredAny.visit_map(m).map(|_| MaybeStr(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// `usage` when it is an object of numbers; null or anything else is no usage.
fn read_usage<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<Usage>, A::Error> {
    let v: Option<&'de RawValue> = map.next_value()?;
    Ok(
        v.and_then(|raw| serde_json::from_str::<RawUsage>(raw.get()).ok())
            .map(|u| u.to_usage()),
    )
}

impl<'a> Payload<'a> {
    /// Reads one whole payload. Anything that is not a JSON object (or `[DONE]`) gives the
    /// default: no observer finds anything in it, and it is relayed as it came.
    pub fn read(data: &'a [u8]) -> Payload<'a> {
        let trimmed = data.trim_ascii();
        if trimmed == b"[DONE]" {
            return Payload {
                done: true,
                ..Payload::default()
            };
        }
        if trimmed.first() != Some(&b'{') {
            return Payload::default();
        }
        let mut de = serde_json::Deserializer::from_slice(trimmed);
        de.deserialize_map(PayloadVisitor).unwrap_or_default()
    }
}

/// Reads an event's payload object.
struct PayloadVisitor;

impl<'de> Visitor<'de> for PayloadVisitor {
    type Value = Payload<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Payload<'de>, A::Error> {
        let mut p = Payload {
            object: true,
            ..Payload::default()
        };
        while let Some(key) = map.next_key::<Str<'de>>()? {
            match key.0.as_ref() {
                "type" => p.kind = map.next_value::<MaybeStr<'de>>()?.0,
                "id" => p.id = map.next_value::<MaybeStr<'de>>()?.0,
                "model" => p.model = map.next_value::<MaybeStr<'de>>()?.0,
                "delta" => p.delta = map.next_value::<MaybeStr<'de>>()?.0,
                "message" => p.message = map.next_value::<MaybeStr<'de>>()?.0,
                "usage" => p.usage = read_usage(&mut map)?,
                "error" => p.error = map.next_value::<Option<ErrorSeed<'de>>>()?.map(|e| e.0),
                "response" => {
                    p.response = map.next_value::<Option<ResponseSeed<'de>>>()?.map(|r| r.0)
                }
                "choices" => {
                    if let Some(c) = map.next_value::<Option<ChoicesSeed<'de>>>()? {
                        p.choices = c.0;
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(p)
    }
}

/// A top-level `error`: an object (its `message` read) or any other non-null value.
struct ErrorSeed<'a>(ErrorView<'a>);

impl<'de> Deserialize<'de> for ErrorSeed<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ErrorSeed<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an error")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<ErrorSeed<'de>, A::Error> {
                let mut e = ErrorView::default();
                while let Some(k) = m.next_key::<Str<'de>>()? {
                    if k.0 == "message" {
                        e.message = m.next_value::<MaybeStr<'de>>()?.0;
                    } else {
                        m.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ErrorSeed(e))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<ErrorSeed<'de>, E> {
                Ok(ErrorSeed(ErrorView {
                    message: Some(Cow::Borrowed(v)),
                }))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ErrorSeed<'de>, E> {
                Ok(ErrorSeed(ErrorView {
                    message: Some(Cow::Owned(v.to_string())),
                }))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<ErrorSeed<'de>, E> {
                Ok(ErrorSeed(ErrorView::default()))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<ErrorSeed<'de>, E> {
                Ok(ErrorSeed(ErrorView::default()))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<ErrorSeed<'de>, E> {
                Ok(ErrorSeed(ErrorView::default()))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<ErrorSeed<'de>, E> {
                Ok(ErrorSeed(ErrorView::default()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, s: A) -> Result<ErrorSeed<'de>, A::Error> {
                IgnoredAny
                    .visit_seq(s)
                    .map(|_| ErrorSeed(ErrorView::default()))
            }
        }
        d.deserialize_any(V)
    }
}

/// The `response` object of a Responses event.
struct ResponseSeed<'a>(ResponseView<'a>);

impl<'de> Deserialize<'de> for ResponseSeed<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ResponseSeed<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a response object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<ResponseSeed<'de>, A::Error> {
                let mut r = ResponseView::default();
                while let Some(k) = m.next_key::<Str<'de>>()? {
                    match k.0.as_ref() {
                        "id" => r.id = m.next_value::<MaybeStr<'de>>()?.0,
                        "model" => r.model = m.next_value::<MaybeStr<'de>>()?.0,
                        "usage" => r.usage = read_usage(&mut m)?,
                        "output" => r.output = Some(m.next_value::<&'de RawValue>()?),
                        "error" => {
                            r.error = m
                                .next_value::<Option<ErrorSeed<'de>>>()?
                                .and_then(|e| e.0.message)
                        }
                        _ => {
                            m.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(ResponseSeed(r))
            }
            fn visit_unit<E: de::Error>(self) -> Result<ResponseSeed<'de>, E> {
                Ok(ResponseSeed(ResponseView::default()))
            }
        }
        d.deserialize_any(V)
    }
}

/// The `choices` array, summed up while read (see [`Choices`]).
struct ChoicesSeed<'a>(Choices<'a>);

impl<'de> Deserialize<'de> for ChoicesSeed<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ChoicesSeed<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of choices")
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ChoicesSeed<'de>, A::Error> {
                let mut c = Choices {
                    present: true,
                    empty: true,
                    ..Choices::default()
                };
                let mut position = 0u32;
                while let Some(one) = seq.next_element::<OneChoice<'de>>()? {
                    let index = one.index.unwrap_or(position);
                    position = position.saturating_add(1);
                    c.count += 1;
                    c.empty &= one.finish_reason.is_none() && one.delta_empty && !one.has_text;
                    c.tools |= one.tools;
                    c.logprobs |= one.logprobs;
                    if index < MAX_CHOICES {
                        c.carried |= 1u128 << index;
                        if one.finish_reason.is_some() {
                            c.finished |= 1u128 << index;
                        }
                    } else {
                        c.untracked = true;
                    }
                    if let Some(f) = &one.finish_reason {
                        c.finish_reason = Some(f.clone());
                    }
                    if index == 0 && c.first.is_none() {
                        c.first = Some(ChoiceView {
                            text: one.text,
                            role: one.role,
                            finish_reason: one.finish_reason,
                        });
                    }
                }
                Ok(ChoicesSeed(c))
            }
        }
        d.deserialize_seq(V)
    }
}

/// One choice while it is read.
struct OneChoice<'a> {
    index: Option<u32>,
    /// A `text` member that is not null (completions).
    has_text: bool,
    text: Option<Cow<'a, str>>,
    role: bool,
    tools: bool,
    logprobs: bool,
    delta_empty: bool,
    finish_reason: Option<Cow<'a, str>>,
}

impl<'de> Deserialize<'de> for OneChoice<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneChoice<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a choice")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<OneChoice<'de>, A::Error> {
                let mut c = OneChoice {
                    index: None,
                    has_text: false,
                    text: None,
                    role: false,
                    tools: false,
                    logprobs: false,
                    delta_empty: true,
                    finish_reason: None,
                };
                while let Some(k) = m.next_key::<Str<'de>>()? {
                    match k.0.as_ref() {
                        "index" => c.index = m.next_value::<Index>()?.0,
                        "text" => {
                            let v = m.next_value::<Option<MaybeStr<'de>>>()?;
                            c.has_text = v.is_some();
                            c.text = v.and_then(|t| t.0);
                        }
                        "finish_reason" => c.finish_reason = m.next_value::<MaybeStr<'de>>()?.0,
                        "logprobs" => c.logprobs = m.next_value::<Option<IgnoredAny>>()?.is_some(),
                        "delta" => {
                            if let Some(delta) = m.next_value::<Option<DeltaSeed<'de>>>()? {
                                let delta = delta.0;
                                c.delta_empty = delta.empty;
                                c.role = delta.role;
                                c.tools = delta.tools;
                                if c.text.is_none() {
                                    c.text = delta.content;
                                }
                            }
                        }
                        _ => {
                            m.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(c)
            }
        }
        d.deserialize_map(V)
    }
}

/// A choice's `index` when a small whole number; any other value is read and set aside.
struct Index(Option<u32>);

impl<'de> Deserialize<'de> for Index {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = MaybeNumber::deserialize(d)?;
        Ok(Index(v.0.and_then(|n| u32::try_from(n).ok())))
    }
}

/// A value that is a non-negative integer, or anything else (None).
struct MaybeNumber(Option<u64>);

impl<'de> Deserialize<'de> for MaybeNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeNumber;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(Some(v)))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<MaybeNumber, E> {
                Ok(MaybeNumber(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, s: A) -> Result<MaybeNumber, A::Error> {
                IgnoredAny.visit_seq(s).map(|_| MaybeNumber(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<MaybeNumber, A::Error> {
                IgnoredAny.visit_map(m).map(|_| MaybeNumber(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// A choice's `delta`.
struct Delta<'a> {
    content: Option<Cow<'a, str>>,
    role: bool,
    tools: bool,
    /// No member, or only `null` ones.
    empty: bool,
}

struct DeltaSeed<'a>(Delta<'a>);

impl<'de> Deserialize<'de> for DeltaSeed<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DeltaSeed<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a delta object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<DeltaSeed<'de>, A::Error> {
                let mut d = Delta {
                    content: None,
                    role: false,
                    tools: false,
                    empty: true,
                };
                while let Some(k) = m.next_key::<Str<'de>>()? {
                    match k.0.as_ref() {
                        "content" => {
                            let v = m.next_value::<Option<MaybeStr<'de>>>()?;
                            if v.is_some() {
                                d.empty = false;
                            }
                            d.content = v.and_then(|s| s.0);
                        }
                        "role" => {
                            let v = m.next_value::<Option<IgnoredAny>>()?;
                            d.role = v.is_some();
                            d.empty &= v.is_none();
                        }
                        "tool_calls" | "function_call" => {
                            let v = m.next_value::<Option<IgnoredAny>>()?;
                            d.tools |= v.is_some();
                            d.empty &= v.is_none();
                        }
                        _ => {
                            let v = m.next_value::<Option<IgnoredAny>>()?;
                            d.empty &= v.is_none();
                        }
                    }
                }
                Ok(DeltaSeed(d))
            }
        }
        d.deserialize_map(V)
    }
}
