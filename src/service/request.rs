//! Turning an HTTP request into a storage request, refusing bad input with a
//! 4xx before anything is touched.

use std::time::SystemTime;

use http::{HeaderMap, StatusCode};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::headers::{self as h, BadHeader, MAX_SAFE_INTEGER};
use crate::offset::{Offset, ReadFrom};
use crate::producer::ProducerClaim;
use crate::stream::{ContentType, Expiry, ForkRequest, StreamConfig};

/// Stream paths longer than this are refused.
const MAX_PATH_LEN: usize = 1024;

/// A request refused before it reaches storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<BadHeader> for Refusal {
    fn from(bad: BadHeader) -> Self {
        Self::bad_request(bad.0)
    }
}

/// The stream a request path names, below the mount `prefix`.
///
/// The key is the path's segments with percent-encoding made canonical:
/// unreserved characters decoded, every other escape upper-cased and kept,
/// and raw bytes outside ASCII encoded. So `%61` names the same stream as `a`,
/// `é` the same as `%C3%A9`, while `a%2Fb` stays distinct from `a/b`. `.` and `..` segments (however encoded), empty segments and
/// malformed escapes are refused, and a key never contains a byte that could
/// step outside a directory.
pub(crate) fn stream_key(path: &str, prefix: &str) -> Result<String, Refusal> {
    let not_found = || Refusal::new(StatusCode::NOT_FOUND, "not found");
    let rest = path.strip_prefix(prefix).ok_or_else(not_found)?;
    let rest = rest.strip_prefix('/').ok_or_else(not_found)?;
    if rest.is_empty() {
        return Err(not_found());
    }
    if rest.len() > MAX_PATH_LEN {
        return Err(Refusal::bad_request("stream path too long"));
    }
    let mut key = String::with_capacity(rest.len());
    for (i, segment) in rest.split('/').enumerate() {
        if i > 0 {
            key.push('/');
        }
        let start = key.len();
        push_canonical(&mut key, segment)?;
        let canonical = &key[start..];
        if canonical.is_empty() || canonical == "." || canonical == ".." {
            return Err(Refusal::bad_request("invalid stream path"));
        }
    }
    Ok(key)
}

/// Appends the canonical form of one path segment to `out`.
fn push_canonical(out: &mut String, segment: &str) -> Result<(), Refusal> {
    let bad = || Refusal::bad_request("invalid percent-encoding in stream path");
    let bytes = segment.as_bytes();
    if bytes.iter().all(|b| b.is_ascii() && *b != b'%') {
        out.push_str(segment);
        return Ok(());
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
                .ok_or_else(bad)?;
            // Two ASCII hex digits: no sign, which `from_str_radix` allows.
            let text = std::str::from_utf8(hex).map_err(|_| bad())?;
            let value = u8::from_str_radix(text, 16).map_err(|_| bad())?;
            if value.is_ascii_alphanumeric() || b"-._~".contains(&value) {
                out.push(char::from(value));
            } else {
                out.push('%');
                out.push_str(&text.to_ascii_uppercase());
            }
            i += 3;
        } else if b.is_ascii() {
            out.push(char::from(b));
            i += 1;
        } else {
            use std::fmt::Write;
            let _ = write!(out, "%{b:02X}");
            i += 1;
        }
    }
    Ok(())
}

/// The query parameters a read understands; others are ignored.
#[derive(Debug, Default)]
pub(crate) struct ReadQuery {
    pub(crate) offset: Option<String>,
    pub(crate) live: Option<String>,
    pub(crate) cursor: Option<String>,
}

impl ReadQuery {
    pub(crate) fn parse(query: Option<&str>) -> Result<Self, Refusal> {
        let mut parsed = Self::default();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match key {
                "offset" => &mut parsed.offset,
                "live" => &mut parsed.live,
                "cursor" => &mut parsed.cursor,
                _ => continue,
            };
            if slot.is_some() {
                return Err(Refusal::bad_request(format!(
                    "more than one {key} parameter"
                )));
            }
            let value = percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| Refusal::bad_request(format!("invalid {key} parameter")))?;
            *slot = Some(value.into_owned());
        }
        Ok(parsed)
    }

    /// Where the read starts; an absent offset means the start.
    pub(crate) fn from(&self) -> Result<ReadFrom, Refusal> {
        match self.offset.as_deref() {
            None => Ok(ReadFrom::Start),
            Some("") => Err(Refusal::bad_request("empty offset")),
            Some(text) => text
                .parse()
                .map_err(|_| Refusal::bad_request("malformed offset")),
        }
    }
}

/// The configuration a `PUT` asks for.
pub(crate) fn create_config(headers: &HeaderMap, prefix: &str) -> Result<StreamConfig, Refusal> {
    let content_type = content_type(headers)?;
    let ttl = h::single(headers, &h::STREAM_TTL)?;
    let expires_at = h::single(headers, &h::STREAM_EXPIRES_AT)?;
    let expiry = match (ttl, expires_at) {
        (Some(_), Some(_)) => {
            return Err(Refusal::bad_request(
                "Stream-TTL and Stream-Expires-At are mutually exclusive",
            ))
        }
        (Some(ttl), None) => match h::strict_uint_saturating(ttl) {
            None => return Err(BadHeader::new(&h::STREAM_TTL, "not a non-negative integer").into()),
            // A stream that expires as it is created would acknowledge data
            // that is gone at once.
            Some(0) => return Err(BadHeader::new(&h::STREAM_TTL, "must be at least 1").into()),
            Some(secs) => Expiry::Ttl(secs),
        },
        (None, Some(at)) => {
            let at = OffsetDateTime::parse(at, &Rfc3339)
                .map(SystemTime::from)
                .map_err(|_| BadHeader::new(&h::STREAM_EXPIRES_AT, "not an RFC 3339 timestamp"))?;
            if at <= SystemTime::now() {
                return Err(BadHeader::new(&h::STREAM_EXPIRES_AT, "in the past").into());
            }
            Expiry::At(at)
        }
        (None, None) => Expiry::Never,
    };
    let forked_from = h::single(headers, &h::STREAM_FORKED_FROM)?;
    let fork_offset = h::single(headers, &h::STREAM_FORK_OFFSET)?;
    let sub_offset = h::single(headers, &h::STREAM_FORK_SUB_OFFSET)?;
    let fork = match forked_from {
        None if fork_offset.is_some() || sub_offset.is_some() => {
            return Err(Refusal::bad_request(
                "Stream-Fork-Offset and Stream-Fork-Sub-Offset need Stream-Forked-From",
            ))
        }
        None => None,
        Some("") => return Err(BadHeader::new(&h::STREAM_FORKED_FROM, "empty").into()),
        Some(source) => {
            let source = stream_key(source, prefix).map_err(|r| match r.status {
                StatusCode::NOT_FOUND => {
                    Refusal::new(StatusCode::NOT_FOUND, "fork source not found")
                }
                _ => Refusal::bad_request("invalid Stream-Forked-From path"),
            })?;
            let offset = fork_offset
                .map(|o| o.parse::<Offset>())
                .transpose()
                .map_err(|_| BadHeader::new(&h::STREAM_FORK_OFFSET, "malformed offset"))?;
            let sub_offset = sub_offset
                .map(|s| h::strict_uint(s, MAX_SAFE_INTEGER))
                .map(|s| {
                    s.ok_or_else(|| {
                        BadHeader::new(&h::STREAM_FORK_SUB_OFFSET, "not a non-negative integer")
                    })
                })
                .transpose()?
                .unwrap_or(0);
            Some(ForkRequest {
                source,
                offset,
                sub_offset,
            })
        }
    };
    Ok(StreamConfig {
        content_type,
        expiry,
        closed: h::closed_flag(headers),
        fork,
    })
}

/// The longest `Content-Type` accepted.
const MAX_CONTENT_TYPE_LEN: usize = 256;
/// The longest `Producer-Id` or `Stream-Seq` accepted: both are kept with the
/// stream for its whole life.
const MAX_WRITER_ID_LEN: usize = 1024;

/// `Content-Type`, when present.
pub(crate) fn content_type(headers: &HeaderMap) -> Result<Option<ContentType>, Refusal> {
    h::single(headers, &http::header::CONTENT_TYPE)?
        .map(|v| {
            if v.len() > MAX_CONTENT_TYPE_LEN {
                return Err(BadHeader::new(&http::header::CONTENT_TYPE, "too long").into());
            }
            ContentType::parse(v).ok_or_else(|| {
                BadHeader::new(&http::header::CONTENT_TYPE, "not a media type").into()
            })
        })
        .transpose()
}

/// The producer headers: all three or none.
pub(crate) fn producer(headers: &HeaderMap) -> Result<Option<ProducerClaim>, Refusal> {
    let id = h::single(headers, &h::PRODUCER_ID)?;
    let epoch = h::single(headers, &h::PRODUCER_EPOCH)?;
    let seq = h::single(headers, &h::PRODUCER_SEQ)?;
    let (id, epoch, seq) = match (id, epoch, seq) {
        (None, None, None) => return Ok(None),
        (Some(id), Some(epoch), Some(seq)) => (id, epoch, seq),
        _ => {
            return Err(Refusal::bad_request(
                "Producer-Id, Producer-Epoch and Producer-Seq go together",
            ))
        }
    };
    if id.is_empty() {
        return Err(BadHeader::new(&h::PRODUCER_ID, "empty").into());
    }
    if id.len() > MAX_WRITER_ID_LEN {
        return Err(BadHeader::new(&h::PRODUCER_ID, "too long").into());
    }
    let number = |name, text| {
        h::strict_uint(text, MAX_SAFE_INTEGER)
            .ok_or_else(|| BadHeader::new(name, "not an integer from 0 to 2^53-1"))
    };
    Ok(Some(ProducerClaim {
        id: id.to_owned(),
        epoch: number(&h::PRODUCER_EPOCH, epoch)?,
        seq: number(&h::PRODUCER_SEQ, seq)?,
    }))
}

/// `Stream-Seq`, when present; it may not be empty.
pub(crate) fn stream_seq(headers: &HeaderMap) -> Result<Option<String>, Refusal> {
    match h::single(headers, &h::STREAM_SEQ)? {
        Some("") => Err(BadHeader::new(&h::STREAM_SEQ, "empty").into()),
        Some(seq) if seq.len() > MAX_WRITER_ID_LEN => {
            Err(BadHeader::new(&h::STREAM_SEQ, "too long").into())
        }
        other => Ok(other.map(str::to_owned)),
    }
}

/// RFC 3339 text for an expiry instant, in UTC.
pub(crate) fn format_timestamp(at: SystemTime) -> String {
    OffsetDateTime::from(at)
        .format(&Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_canonical_and_safe() {
        let key = |p| stream_key(p, "/v1/stream");
        assert_eq!(key("/v1/stream/a/b").unwrap(), "a/b");
        assert_eq!(key("/v1/stream/%61").unwrap(), "a");
        assert_eq!(key("/v1/stream/a%2fb").unwrap(), "a%2Fb");
        assert_ne!(
            key("/v1/stream/a%2Fb").unwrap(),
            key("/v1/stream/a/b").unwrap()
        );
        assert_eq!(key("/v1/stream/%FF%FE").unwrap(), "%FF%FE");
        for bad in [
            "/v1/stream/../etc",
            "/v1/stream/a/./b",
            "/v1/stream/%2e%2E/x",
            "/v1/stream/a//b",
            "/v1/stream/a/",
            "/v1/stream/%zz",
            "/v1/stream/%4",
            "/v1/stream/%+1",
            "/v1/stream/a%-f",
        ] {
            assert_eq!(
                key(bad).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
        for missing in ["/v1/stream", "/v1/stream/", "/v1/streamx", "/other/a"] {
            assert_eq!(
                key(missing).unwrap_err().status,
                StatusCode::NOT_FOUND,
                "{missing}"
            );
        }
        assert_eq!(stream_key("/x", "").unwrap(), "x");
        assert_eq!(
            key("/v1/stream/é").unwrap(),
            key("/v1/stream/%c3%a9").unwrap()
        );
    }

    #[test]
    fn query_refuses_repeats_and_empties() {
        assert!(ReadQuery::parse(Some("offset=1&offset=2")).is_err());
        assert!(ReadQuery::parse(Some("offset=")).unwrap().from().is_err());
        assert!(ReadQuery::parse(Some("offset=a%20b"))
            .unwrap()
            .from()
            .is_err());
        assert!(ReadQuery::parse(Some("offset=0,1"))
            .unwrap()
            .from()
            .is_err());
        let q = ReadQuery::parse(Some("x=1&offset=-1&live=sse&cursor=5")).unwrap();
        assert_eq!(q.from().unwrap(), ReadFrom::Start);
        assert_eq!(q.live.as_deref(), Some("sse"));
        assert_eq!(q.cursor.as_deref(), Some("5"));
    }
}
