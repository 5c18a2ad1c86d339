//! JSON mode (PROTOCOL.md section 9.1): validation, one level of array
//! flattening, and the array a read returns.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::value::RawValue;

/// The deepest nesting accepted, so that readers that parse recursively
/// cannot be made to overflow their stack.
pub(crate) const MAX_DEPTH: usize = 128;
/// The most messages one body may hold. Each message is a record with its
/// own offset, so a body of many tiny messages costs far more than its size.
pub(crate) const MAX_MESSAGES: usize = 100_000;

/// Why a JSON body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JsonError {
    /// Not one well-formed JSON value.
    Invalid(String),
    /// An append of `[]`, which stores nothing.
    EmptyArray,
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// More than [`MAX_MESSAGES`] messages.
    TooMany,
}

/// Splits a body into the messages it stores: the elements of a top-level
/// array (exactly one level), or the body itself for any other value.
///
/// An empty array is an error for appends and zero messages for creates.
pub(crate) fn messages(body: &[u8], allow_empty_array: bool) -> Result<Vec<Bytes>, JsonError> {
    if depth(body) > MAX_DEPTH {
        return Err(JsonError::TooDeep);
    }
    let value: &RawValue =
        serde_json::from_slice(body).map_err(|e| JsonError::Invalid(e.to_string()))?;
    let text = value.get();
    if !text.starts_with('[') {
        return Ok(vec![Bytes::copy_from_slice(text.as_bytes())]);
    }
    let elements: Vec<&RawValue> =
        serde_json::from_str(text).map_err(|e| JsonError::Invalid(e.to_string()))?;
    if elements.is_empty() && !allow_empty_array {
        return Err(JsonError::EmptyArray);
    }
    if elements.len() > MAX_MESSAGES {
        return Err(JsonError::TooMany);
    }
    Ok(elements
        .into_iter()
        .map(|m| Bytes::copy_from_slice(m.get().as_bytes()))
        .collect())
}

/// How deeply arrays and objects nest in `body`, skipping strings. Meant to
/// run before parsing, so it does not check that the text is JSON.
fn depth(body: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in body {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Joins stored messages into the JSON array a read returns.
pub(crate) fn array<'a>(messages: impl IntoIterator<Item = &'a Bytes>) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(b'[');
    for (i, message) in messages.into_iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        out.put_slice(message);
    }
    out.put_u8(b']');
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(body: &str) -> Vec<String> {
        messages(body.as_bytes(), false)
            .unwrap()
            .iter()
            .map(|m| String::from_utf8(m.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn flattens_exactly_one_level() {
        assert_eq!(texts(r#"{"event":"created"}"#), [r#"{"event":"created"}"#]);
        assert_eq!(texts(r#"[{"a":1},{"b":2}]"#), [r#"{"a":1}"#, r#"{"b":2}"#]);
        assert_eq!(texts("[[1,2],[3,4]]"), ["[1,2]", "[3,4]"]);
        assert_eq!(texts("[[[1,2,3]]]"), ["[[1,2,3]]"]);
        assert_eq!(texts(r#""just a string""#), [r#""just a string""#]);
        assert_eq!(texts(" 42 "), ["42"]);
        assert_eq!(texts("null"), ["null"]);
    }

    #[test]
    fn refuses_what_is_not_one_json_value() {
        for bad in [
            r#"{"a":1}{"b":2}"#,
            "{ invalid json }",
            "",
            "[1,",
            "\u{feff}1",
        ] {
            assert!(
                matches!(messages(bad.as_bytes(), true), Err(JsonError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert_eq!(messages(b"[]", false), Err(JsonError::EmptyArray));
        assert_eq!(messages(b" [ ] ", true), Ok(vec![]));
    }

    #[test]
    fn refuses_deep_nesting_and_huge_batches() {
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(messages(deep.as_bytes(), false), Err(JsonError::TooDeep));
        let fine = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(messages(fine.as_bytes(), false).is_ok());
        // Brackets inside strings do not count.
        let quoted = format!("\"{}\"", "[".repeat(1000));
        assert!(messages(quoted.as_bytes(), false).is_ok());
        let many = format!("[{}0]", "0,".repeat(MAX_MESSAGES));
        assert_eq!(messages(many.as_bytes(), false), Err(JsonError::TooMany));
    }

    #[test]
    fn array_joins_messages() {
        let stored = messages(br#"[{"a":1}, [2], "x"]"#, false).unwrap();
        assert_eq!(&array(&stored)[..], br#"[{"a":1},[2],"x"]"#);
        assert_eq!(&array(&[])[..], b"[]");
    }
}
