//! What the readers find in JSON text by key rather than by parsing it: `usage` and a
//! `finish_reason` at the end of a payload too long to keep whole, and the token counts both APIs
//! report. A leaf of the SSE reader that the reply capture reads too.

use serde::Deserialize;

/// Token counts from `usage`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Prompt / input tokens.
    pub prompt: Option<i64>,
    /// Completion / output tokens.
    pub completion: Option<i64>,
    /// Total tokens.
    pub total: Option<i64>,
}

impl Usage {
    /// Both counts added (a side without a count adds nothing).
    pub fn plus(self, other: Usage) -> Usage {
        let add = |a: Option<i64>, b: Option<i64>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        Usage {
            prompt: add(self.prompt, other.prompt),
            completion: add(self.completion, other.completion),
            total: add(self.total, other.total),
        }
    }
}

/// `usage` in either API's words (`prompt_tokens` or `input_tokens`, …).
#[derive(Deserialize)]
pub struct RawUsage {
    /// Chat and completions.
    pub prompt_tokens: Option<i64>,
    /// Chat and completions.
    pub completion_tokens: Option<i64>,
    /// Responses.
    pub input_tokens: Option<i64>,
    /// Responses.
    pub output_tokens: Option<i64>,
    /// Both APIs.
    pub total_tokens: Option<i64>,
}

impl RawUsage {
    /// The counts, the total made up when only the parts were given.
    pub fn to_usage(&self) -> Usage {
        let prompt = self.prompt_tokens.or(self.input_tokens);
        let completion = self.completion_tokens.or(self.output_tokens);
        let total = self.total_tokens.or(match (prompt, completion) {
            (Some(p), Some(c)) => Some(p + c),
            _ => None,
        });
        Usage {
            prompt,
            completion,
            total,
        }
    }
}

/// The JSON text after each `"usage":` key (whitespace skipped).
#[cfg(test)]
pub(crate) fn usage_values(json: &[u8]) -> impl Iterator<Item = &[u8]> {
    key_values(json, b"\"usage\"")
}

/// Where `key` (a JSON string, quotes included) first occurs in `hay`. Jumps from quote to quote:
/// `windows(..).position(w == key)` compared the key through a slice comparison at every offset
/// (~10 instructions per byte of every reply, a tenth of a stream's).
pub(crate) fn find_key(hay: &[u8], key: &[u8]) -> Option<usize> {
    let mut from = 0;
    loop {
        let at = from + hay.get(from..)?.iter().position(|&b| b == b'"')?;
        if hay[at..].starts_with(key) {
            return Some(at);
        }
        from = at + 1;
    }
}

/// The JSON text after each occurrence of the quoted `key` followed by a colon (whitespace
/// skipped). Inside a JSON string a quote is always escaped, so a quoted key followed by a colon
/// can only be a key.
pub(crate) fn key_values<'a>(json: &'a [u8], key: &'static [u8]) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = json;
    std::iter::from_fn(move || loop {
        let at = find_key(rest, key)?;
        rest = &rest[at + key.len()..];
        if let Some(value) = rest.trim_ascii_start().strip_prefix(b":") {
            return Some(value.trim_ascii_start());
        }
    })
}

/// The last non-null `"finish_reason": "…"` in a JSON text (the tail of a reply cut at the
/// record limit, where the whole could not be parsed).
pub(crate) fn tail_finish_reason(tail: &[u8]) -> Option<String> {
    key_values(tail, b"\"finish_reason\"")
        .filter(|v| v.starts_with(b"\""))
        .filter_map(|v| String::deserialize(&mut serde_json::Deserializer::from_slice(v)).ok())
        .last()
}

/// The values after each `"usage":` key like [`usage_values`], last first: `usage` ends a reply,
/// so searching from the end reads its last hundred bytes, not the whole reply.
fn usage_values_rev(json: &[u8]) -> impl Iterator<Item = &[u8]> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = json.len();
    std::iter::from_fn(move || loop {
        let at = json[..end].iter().rposition(|&b| b == b'"')?;
        end = at;
        if json[at..].starts_with(KEY) {
            if let Some(value) = json[at + KEY.len()..].trim_ascii_start().strip_prefix(b":") {
                return Some(value.trim_ascii_start());
            }
        }
    })
}

/// The last `"usage": {…}` object in a JSON text.
pub(crate) fn tail_usage(tail: &[u8]) -> Option<Usage> {
    usage_values_rev(tail)
        .filter(|v| !v.starts_with(b"null"))
        .find_map(|v| RawUsage::deserialize(&mut serde_json::Deserializer::from_slice(v)).ok())
        .map(|u| u.to_usage())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_found_from_the_end_is_the_last_parsable_one() {
        let t = br#"{"a":"usage","usage":{"prompt_tokens":1},"x":{"usage":null},"usage" : {"prompt_tokens":2,"completion_tokens":3}}"#;
        let u = tail_usage(t).unwrap();
        assert_eq!((u.prompt, u.completion), (Some(2), Some(3)));
        let forward: Vec<&[u8]> = usage_values(t).collect();
        let mut backward: Vec<&[u8]> = usage_values_rev(t).collect();
        backward.reverse();
        assert_eq!(forward, backward);
        // A cut last object: the one before it counts.
        let cut = br#"{"usage":{"prompt_tokens":4},"more":1,"usage":{"prompt_tok"#;
        assert_eq!(tail_usage(cut).unwrap().prompt, Some(4));
        assert!(tail_usage(br#"{"usage":null}"#).is_none());
        assert!(tail_usage(b"").is_none());
    }
}
