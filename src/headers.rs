//! The protocol's header names, and strict parsers for their values.

use http::header::HeaderName;
use http::HeaderMap;

macro_rules! names {
    ($($(#[$doc:meta])* $name:ident = $value:literal;)*) => {
        $(
            $(#[$doc])*
            pub const $name: HeaderName = HeaderName::from_static($value);
        )*
    };
}

names! {
    /// `Stream-Next-Offset`: the offset to read from next.
    STREAM_NEXT_OFFSET = "stream-next-offset";
    /// `Stream-Up-To-Date`: the response reached the tail.
    STREAM_UP_TO_DATE = "stream-up-to-date";
    /// `Stream-Closed`: the stream is closed (and, on reads, this is EOF).
    STREAM_CLOSED = "stream-closed";
    /// `Stream-Cursor`: the cursor to echo on the next live read.
    STREAM_CURSOR = "stream-cursor";
    /// `Stream-TTL`: the sliding time-to-live, in seconds.
    STREAM_TTL = "stream-ttl";
    /// `Stream-Expires-At`: the absolute expiry, as an RFC 3339 timestamp.
    STREAM_EXPIRES_AT = "stream-expires-at";
    /// `Stream-Seq`: a writer's lexicographic sequence.
    STREAM_SEQ = "stream-seq";
    /// `Stream-Forked-From`: the path of a fork's source stream.
    STREAM_FORKED_FROM = "stream-forked-from";
    /// `Stream-Fork-Offset`: the offset at which a fork diverges.
    STREAM_FORK_OFFSET = "stream-fork-offset";
    /// `Stream-Fork-Sub-Offset`: bytes or messages inherited past the fork offset.
    STREAM_FORK_SUB_OFFSET = "stream-fork-sub-offset";
    /// `Stream-SSE-Data-Encoding`: `base64` when SSE data events are encoded.
    STREAM_SSE_DATA_ENCODING = "stream-sse-data-encoding";
    /// `Producer-Id`: an idempotent producer's identity.
    PRODUCER_ID = "producer-id";
    /// `Producer-Epoch`: an idempotent producer's epoch.
    PRODUCER_EPOCH = "producer-epoch";
    /// `Producer-Seq`: an idempotent producer's sequence within its epoch.
    PRODUCER_SEQ = "producer-seq";
    /// `Producer-Expected-Seq`: on a sequence gap, the sequence the server expected.
    PRODUCER_EXPECTED_SEQ = "producer-expected-seq";
    /// `Producer-Received-Seq`: on a sequence gap, the sequence it received.
    PRODUCER_RECEIVED_SEQ = "producer-received-seq";
}

/// The largest integer JavaScript represents exactly: 2^53 - 1.
pub(crate) const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Why a header value was refused; the text goes into a 400 response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadHeader(pub(crate) String);

impl BadHeader {
    pub(crate) fn new(name: &HeaderName, why: &str) -> Self {
        Self(format!("invalid {name}: {why}"))
    }
}

/// The header's value as text, `None` when absent. More than one value, or a
/// value that is not visible ASCII, is an error.
pub(crate) fn single<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'a str>, BadHeader> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(BadHeader::new(name, "more than one value"));
    }
    value
        .to_str()
        .map(|v| Some(v.trim()))
        .map_err(|_| BadHeader::new(name, "not visible ASCII"))
}

/// A non-negative decimal integer: digits only, no sign, no leading zero
/// (except `0` itself), at most `max`.
pub(crate) fn strict_uint(text: &str, max: u64) -> Option<u64> {
    let bytes = text.as_bytes();
    let digits_only = !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit);
    if !digits_only || (bytes.len() > 1 && bytes[0] == b'0') {
        return None;
    }
    text.parse::<u64>().ok().filter(|v| *v <= max)
}

/// Like [`strict_uint`], but a syntactically valid value too large for `u64`
/// saturates instead of failing: `Stream-TTL` allows any decimal integer.
pub(crate) fn strict_uint_saturating(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    let digits_only = !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit);
    if !digits_only || (bytes.len() > 1 && bytes[0] == b'0') {
        return None;
    }
    Some(text.parse::<u64>().unwrap_or(u64::MAX))
}

/// `Stream-Closed` counts only when its value is `true`, in any case.
pub(crate) fn closed_flag(headers: &HeaderMap) -> bool {
    headers
        .get_all(STREAM_CLOSED)
        .iter()
        .any(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"true"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_uint_refuses_what_parse_accepts() {
        for bad in [
            "+1", "01", "00", "1.0", "1e3", "-1", "0x10", " 1", "", "1_000",
        ] {
            assert_eq!(strict_uint(bad, u64::MAX), None, "{bad:?}");
        }
        assert_eq!(strict_uint("0", 10), Some(0));
        assert_eq!(strict_uint("3600", u64::MAX), Some(3600));
        assert_eq!(
            strict_uint("9007199254740991", MAX_SAFE_INTEGER),
            Some(MAX_SAFE_INTEGER)
        );
        assert_eq!(strict_uint("9007199254740992", MAX_SAFE_INTEGER), None);
        assert_eq!(strict_uint("18446744073709551616", u64::MAX), None);
    }

    #[test]
    fn saturating_accepts_huge_but_not_malformed() {
        assert_eq!(
            strict_uint_saturating("18446744073709551616"),
            Some(u64::MAX)
        );
        assert_eq!(strict_uint_saturating("03600"), None);
    }

    #[test]
    fn closed_flag_is_exactly_true() {
        for (value, want) in [
            ("true", true),
            ("TRUE", true),
            ("True", true),
            ("false", false),
            ("1", false),
            ("", false),
            ("yes", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(STREAM_CLOSED, value.parse().unwrap());
            assert_eq!(closed_flag(&h), want, "{value:?}");
        }
        assert!(!closed_flag(&HeaderMap::new()));
    }
}
