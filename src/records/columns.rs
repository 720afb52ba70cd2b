//! Cutting record columns (`request_body`, `response`: see the observability guide, "Request
//! records") at `record_body_bytes`.

use std::borrow::Cow;

use crate::capture::TRUNCATED;

/// Cuts `body` for the `request_body` column: text kept up to `limit` bytes (0 = all) on a char
/// boundary with a marker; binary bodies become a short description.
pub fn request_body_text(body: &[u8], limit: usize) -> Option<Cow<'_, str>> {
    if body.is_empty() {
        return None;
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return Some(format!("[binary body, {} bytes]", body.len()).into());
    };
    if text.as_bytes().contains(&0) {
        return Some(format!("[binary body, {} bytes]", body.len()).into());
    }
    Some(cut(text, limit))
}

/// Cuts a text at `limit` bytes (0 = no limit) on a char boundary, adding the marker. Borrows
/// when nothing is cut: the writer binds it straight from the record.
pub fn cut(text: &str, limit: usize) -> Cow<'_, str> {
    if limit == 0 || text.len() <= limit {
        return Cow::Borrowed(text);
    }
    Cow::Owned(format!(
        "{}{TRUNCATED}",
        crate::escape::cut_bytes(text, limit)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_and_markers() {
        assert_eq!(cut("héllo", 2), format!("h{TRUNCATED}"));
        assert_eq!(
            request_body_text(&[0xff, 0xfe], 10).unwrap(),
            "[binary body, 2 bytes]"
        );
        assert_eq!(request_body_text(b"", 10), None);
    }
}
