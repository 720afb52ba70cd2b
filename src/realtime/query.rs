//! The `model` query parameter of a WebSocket request (see the observability guide, "Realtime API
//! (WebSocket)"): read for allow/deny and the record, rewritten per upstream by `model_map`.

/// The `model` query parameter (the request's model for allow/deny, `model_map` and the record).
/// More than one, one that is not valid percent-encoded UTF-8, or one holding a `;` (see the
/// security guide, "Headers") is refused: a filter must not be bypassed by a parameter the upstream
/// may read differently, and some servers still split a query at `;` as well as `&`
/// (`model=allowed;model=denied`, or `x=1;model=denied` beside no `model` at all).
pub fn query_model(query: &str) -> Result<Option<String>, &'static str> {
    let mut found = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let after_semicolon = pair.split(';').skip(1).any(|piece| {
            let k = piece.split_once('=').map_or(piece, |(k, _)| k);
            decode_component(k).as_deref() == Some("model")
        });
        if after_semicolon {
            return Err("a `model` query parameter after a `;`");
        }
        if decode_component(k).as_deref() != Some("model") {
            continue;
        }
        if found.is_some() {
            return Err("more than one `model` query parameter");
        }
        let value = decode_component(v).ok_or("the `model` query parameter is not valid")?;
        if value.contains(';') {
            return Err("the `model` query parameter holds a `;`");
        }
        found = Some(value);
    }
    Ok(found)
}

/// The query with every `model` parameter's value replaced by `model`; other parameters are kept
/// byte for byte.
pub fn rewrite_query_model(query: &str, model: &str) -> String {
    let mut out = String::with_capacity(query.len() + model.len());
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        let k = pair.split_once('=').map_or(pair, |(k, _)| k);
        if decode_component(k).as_deref() == Some("model") {
            out.push_str(k);
            out.push('=');
            encode_component(model, &mut out);
        } else {
            out.push_str(pair);
        }
    }
    out
}

/// `application/x-www-form-urlencoded` decoding of one name or value; None if malformed.
fn decode_component(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode_component(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_from_query() {
        assert_eq!(
            query_model("model=gpt-4o-realtime-preview"),
            Ok(Some("gpt-4o-realtime-preview".into()))
        );
        assert_eq!(
            query_model("a=1&model=gpt%2D4o+x&b"),
            Ok(Some("gpt-4o x".into()))
        );
        assert_eq!(query_model("modelx=1"), Ok(None));
        assert_eq!(query_model(""), Ok(None));
        assert!(query_model("model=a&model=b").is_err());
        assert!(query_model("model=a&%6dodel=b").is_err());
        assert!(query_model("model=%zz").is_err());
        assert!(query_model("model=%ff").is_err());
        assert!(query_model("model=a;model=b").is_err());
        assert!(query_model("model=a%3Bb").is_err());
        assert!(query_model("x=1;model=b").is_err());
        assert!(query_model("x=1;%6dodel=b").is_err());
        assert_eq!(query_model("x=a;b&model=m"), Ok(Some("m".into())));
    }

    #[test]
    fn model_rewritten_in_query() {
        assert_eq!(
            rewrite_query_model("x=%20&model=gpt-4o&y=2", "my deployment/1"),
            "x=%20&model=my%20deployment%2F1&y=2"
        );
        assert_eq!(rewrite_query_model("a=b", "m"), "a=b");
    }
}
