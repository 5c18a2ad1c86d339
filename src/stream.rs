//! A stream's configuration: content type, expiry, closure and fork source.

use std::time::{Duration, SystemTime};

use crate::offset::Offset;

/// A stream's content type, kept as the client first sent it and compared by
/// media type alone, case-insensitively (`TEXT/PLAIN` matches `text/plain;
/// charset=utf-8`).
#[derive(Clone, Debug)]
pub struct ContentType {
    /// Shared: every response and stream description carries a copy.
    value: std::sync::Arc<str>,
    /// The media type without parameters: `value[essence]`.
    essence: std::ops::Range<usize>,
    kind: Kind,
}

/// What the media type means to the protocol, worked out once at parse time
/// because appends and reads ask on every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `application/json`: message boundaries are kept.
    Json,
    /// `text/*`: SSE carries it as text.
    Text,
    Other,
}

impl ContentType {
    /// The type given to a stream created without a `Content-Type`.
    pub const DEFAULT: &'static str = "application/octet-stream";

    /// A content type from a header value.
    ///
    /// Returns `None` unless the value has the shape `type/subtype`.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let essence = value.split(';').next().unwrap_or_default().trim();
        let (ty, sub) = essence.split_once('/')?;
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
        };
        if !(token(ty) && token(sub)) {
            return None;
        }
        // `essence` is a trimmed prefix of `value`, which starts with it.
        let kind = if essence.eq_ignore_ascii_case("application/json") {
            Kind::Json
        } else if ty.eq_ignore_ascii_case("text") {
            Kind::Text
        } else {
            Kind::Other
        };
        Some(Self {
            value: value.into(),
            essence: 0..essence.len(),
            kind,
        })
    }

    /// The value as the stream's creator sent it.
    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// The media type without parameters, lowercased: `application/json`.
    pub fn essence(&self) -> String {
        self.essence_str().to_ascii_lowercase()
    }

    fn essence_str(&self) -> &str {
        &self.value[self.essence.clone()]
    }

    /// Whether this is `application/json`, whose streams keep message
    /// boundaries (PROTOCOL.md section 9.1).
    pub fn is_json(&self) -> bool {
        self.kind == Kind::Json
    }

    /// Whether SSE data events carry this type as text rather than base64:
    /// `text/*` and `application/json`.
    pub fn is_sse_text(&self) -> bool {
        self.kind != Kind::Other
    }

    /// Whether two content types name the same media type.
    pub fn matches(&self, other: &ContentType) -> bool {
        self.essence_str().eq_ignore_ascii_case(other.essence_str())
    }
}

impl Default for ContentType {
    fn default() -> Self {
        Self::parse(Self::DEFAULT).expect("the default content type parses")
    }
}

/// When a stream expires.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Expiry {
    /// Never.
    #[default]
    Never,
    /// After this many seconds without a read or a write (`Stream-TTL`).
    Ttl(u64),
    /// At this instant (`Stream-Expires-At`).
    At(SystemTime),
}

impl Expiry {
    /// Whether a stream last read or written at `touched` has expired at `now`.
    pub fn is_expired(&self, touched: SystemTime, now: SystemTime) -> bool {
        self.deadline(touched)
            .is_some_and(|deadline| now >= deadline)
    }

    /// When a stream last read or written at `touched` expires; `None` for
    /// never, or a TTL too large for the clock.
    pub(crate) fn deadline(&self, touched: SystemTime) -> Option<SystemTime> {
        match *self {
            Expiry::Never => None,
            Expiry::Ttl(secs) => touched.checked_add(Duration::from_secs(secs)),
            Expiry::At(at) => Some(at),
        }
    }
}

/// Where a fork diverges from its source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForkPoint {
    /// The source stream's path.
    pub source: String,
    /// The offset the fork was anchored at (`Stream-Fork-Offset`, or the
    /// source's tail when the header was omitted).
    pub anchor: Offset,
    /// Bytes, or JSON messages, inherited past the anchor.
    pub sub_offset: u64,
}

/// What a client asks for when it forks: the source and, optionally, where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForkRequest {
    /// The source stream's path.
    pub source: String,
    /// `Stream-Fork-Offset`; `None` means the source's tail.
    pub offset: Option<Offset>,
    /// `Stream-Fork-Sub-Offset`; 0 when absent.
    pub sub_offset: u64,
}

/// The configuration a `PUT` asks for.
#[derive(Clone, Debug, Default)]
pub struct StreamConfig {
    /// The stream's content type; `None` means the default, or for a fork,
    /// the source's.
    pub content_type: Option<ContentType>,
    /// When it expires; for a fork, `Never` inherits the source's expiry.
    pub expiry: Expiry,
    /// Whether it is created closed.
    pub closed: bool,
    /// The fork source, when the stream is a fork.
    pub fork: Option<ForkRequest>,
}

#[cfg(test)]
mod tests {
    use super::ContentType;

    #[test]
    fn content_types_compare_by_media_type_alone() {
        let json = ContentType::parse(" Application/JSON ; charset=utf-8").unwrap();
        assert!(json.is_json() && json.is_sse_text());
        assert_eq!(json.essence(), "application/json");
        assert_eq!(json.as_str(), "Application/JSON ; charset=utf-8");
        assert!(json.matches(&ContentType::parse("application/json").unwrap()));
        assert!(!json.matches(&ContentType::parse("application/jsonx").unwrap()));

        let text = ContentType::parse("TEXT/plain").unwrap();
        assert!(!text.is_json() && text.is_sse_text());
        assert!(text.matches(&ContentType::parse("text/PLAIN; charset=utf-8").unwrap()));

        let bytes = ContentType::default();
        assert_eq!(bytes.as_str(), ContentType::DEFAULT);
        assert!(!bytes.is_json() && !bytes.is_sse_text());
        assert!(ContentType::parse("application/json+x").is_some_and(|c| !c.is_json()));
        assert!(ContentType::parse("textplain").is_none());
        assert!(ContentType::parse("text/").is_none());
    }
}
