//! A subscription's configuration as clients send it: parsing, validation,
//! normalization and the hash that decides idempotent re-creation; and the
//! glob patterns that select streams.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Failure;
use crate::service::stream_key;

/// Shortest lease a subscription may ask for, in milliseconds.
const MIN_LEASE_MS: u64 = 1_000;
/// Longest lease, in milliseconds.
const MAX_LEASE_MS: u64 = 600_000;
/// The lease when none is asked for.
const DEFAULT_LEASE_MS: u64 = 30_000;
/// Most explicit streams in one request.
const MAX_STREAMS: usize = 1_000;
/// Longest description, in bytes.
const MAX_DESCRIPTION: usize = 1_024;

/// How wakes are delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Kind {
    #[serde(rename = "webhook")]
    Webhook,
    #[serde(rename = "pull-wake")]
    PullWake,
}

/// A validated, normalized subscription configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Spec {
    #[serde(rename = "type")]
    pub(crate) kind: Kind,
    pub(crate) pattern: Option<String>,
    /// Explicit streams, canonical, sorted and without duplicates.
    pub(crate) streams: Vec<String>,
    pub(crate) webhook_url: Option<String>,
    pub(crate) wake_stream: Option<String>,
    pub(crate) lease_ttl_ms: u64,
    pub(crate) description: Option<String>,
}

#[derive(Deserialize)]
struct Body {
    #[serde(rename = "type")]
    kind: Option<String>,
    pattern: Option<String>,
    streams: Option<Vec<String>>,
    webhook: Option<WebhookBody>,
    wake_stream: Option<String>,
    lease_ttl_ms: Option<u64>,
    description: Option<String>,
}

#[derive(Deserialize)]
struct WebhookBody {
    url: String,
}

impl Spec {
    /// Parses and validates a `PUT` body. The webhook URL is checked
    /// separately, since that needs the server's policy.
    pub(crate) fn parse(body: &[u8]) -> Result<Self, Failure> {
        let body: Body = serde_json::from_slice(body)
            .map_err(|e| Failure::invalid(format!("invalid subscription body: {e}")))?;
        let kind = match body.kind.as_deref() {
            Some("webhook") => Kind::Webhook,
            Some("pull-wake") => Kind::PullWake,
            Some(_) => return Err(Failure::invalid("type must be webhook or pull-wake")),
            None => return Err(Failure::invalid("type is required")),
        };
        if body.pattern.is_none() && body.streams.is_none() {
            return Err(Failure::invalid("pattern or streams is required"));
        }
        let pattern = body.pattern.map(|p| Pattern::parse(&p).map(|_| p));
        let streams = stream_paths(body.streams.unwrap_or_default())?;
        let (webhook_url, wake_stream) = match kind {
            Kind::Webhook => {
                let url = body
                    .webhook
                    .ok_or_else(|| Failure::invalid("webhook.url is required"))?
                    .url;
                (Some(url), None)
            }
            Kind::PullWake => {
                let wake = body
                    .wake_stream
                    .ok_or_else(|| Failure::invalid("wake_stream is required"))?;
                (None, Some(stream_path(&wake)?))
            }
        };
        let lease_ttl_ms = body.lease_ttl_ms.unwrap_or(DEFAULT_LEASE_MS);
        if !(MIN_LEASE_MS..=MAX_LEASE_MS).contains(&lease_ttl_ms) {
            return Err(Failure::invalid("lease_ttl_ms must be from 1000 to 600000"));
        }
        if body
            .description
            .as_ref()
            .is_some_and(|d| d.len() > MAX_DESCRIPTION)
        {
            return Err(Failure::invalid("description is too long"));
        }
        Ok(Self {
            kind,
            pattern: pattern.transpose()?,
            streams,
            webhook_url,
            wake_stream,
            lease_ttl_ms,
            description: body.description,
        })
    }

    /// The hash that decides whether a re-created subscription is the same.
    pub(crate) fn hash(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("a spec serializes");
        let digest = Sha256::digest(&canonical);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub(crate) fn matcher(&self) -> Option<Pattern> {
        self.pattern.as_deref().and_then(|p| Pattern::parse(p).ok())
    }
}

/// Canonical stream paths, sorted and deduplicated.
pub(crate) fn stream_paths(paths: Vec<String>) -> Result<Vec<String>, Failure> {
    if paths.len() > MAX_STREAMS {
        return Err(Failure::invalid("too many streams"));
    }
    let mut paths = paths
        .iter()
        .map(|p| stream_path(p))
        .collect::<Result<Vec<_>, _>>()?;
    paths.sort_unstable();
    paths.dedup();
    Ok(paths)
}

/// A stream-root-relative path in the canonical form the service uses.
pub(crate) fn stream_path(path: &str) -> Result<String, Failure> {
    let path = path.strip_prefix('/').unwrap_or(path);
    let key = stream_key(&format!("/{path}"), "")
        .map_err(|_| Failure::invalid(format!("invalid stream path {path:?}")))?;
    if is_reserved(&key) {
        return Err(Failure::invalid("stream paths under __ds are reserved"));
    }
    Ok(key)
}

/// Whether `path` lies under the reserved control prefix.
pub(crate) fn is_reserved(path: &str) -> bool {
    path == "__ds" || path.starts_with("__ds/")
}

/// A glob over stream paths: `*` is one segment, `**` any number of them,
/// anything else a literal segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pattern {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    One,
    Any,
    Literal(String),
}

impl Pattern {
    pub(crate) fn parse(pattern: &str) -> Result<Self, Failure> {
        let bad = |why: &str| Failure::invalid(format!("invalid pattern: {why}"));
        if pattern.is_empty() || pattern.len() > 1024 {
            return Err(bad("empty or too long"));
        }
        let segments = pattern
            .split('/')
            .map(|segment| match segment {
                "*" => Ok(Segment::One),
                "**" => Ok(Segment::Any),
                "" => Err(bad("empty segment")),
                s if s.contains('*') => Err(bad("`*` must be a whole segment")),
                s => stream_key(&format!("/{s}"), "")
                    .map(Segment::Literal)
                    .map_err(|_| bad("invalid segment")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if matches!(segments.first(), Some(Segment::Literal(s)) if s == "__ds") {
            return Err(bad("__ds is reserved"));
        }
        Ok(Self { segments })
    }

    /// Whether the canonical stream path `path` matches.
    pub(crate) fn matches(&self, path: &str) -> bool {
        if is_reserved(path) {
            return false;
        }
        let parts: Vec<&str> = path.split('/').collect();
        matches_from(&self.segments, &parts)
    }
}

/// Matches `path` against `pattern` in one pass over the path, keeping the
/// set of pattern positions reached so far: time grows with the product of
/// their lengths, however many `**` the pattern has (trying each split of
/// each `**` in turn grows exponentially with them).
fn matches_from(pattern: &[Segment], path: &[&str]) -> bool {
    // reached[i]: the first i segments of the pattern match the path so far.
    let mut reached = vec![false; pattern.len() + 1];
    reached[0] = true;
    skip_empty_any(pattern, &mut reached);
    for part in path {
        let mut next = vec![false; pattern.len() + 1];
        for (i, segment) in pattern.iter().enumerate().filter(|(i, _)| reached[*i]) {
            match segment {
                // `**` takes this segment and may take more.
                Segment::Any => next[i] = true,
                Segment::One => next[i + 1] = true,
                Segment::Literal(literal) => next[i + 1] |= literal == part,
            }
        }
        skip_empty_any(pattern, &mut next);
        if !next.contains(&true) {
            return false;
        }
        reached = next;
    }
    reached[pattern.len()]
}

/// Lets each reached `**` match no segment at all.
fn skip_empty_any(pattern: &[Segment], reached: &mut [bool]) {
    for (i, segment) in pattern.iter().enumerate() {
        if reached[i] && matches!(segment, Segment::Any) {
            reached[i + 1] = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, path: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(path)
    }

    #[test]
    fn many_double_stars_take_linear_time() {
        let pattern = format!("{}x", "**/".repeat(200));
        let path = vec!["a"; 40].join("/");
        assert!(!matches(&pattern, &path));
        assert!(matches(&pattern, &format!("{path}/x")));
        assert!(matches("**/b/**/d", "a/b/c/d"));
        assert!(!matches("**/b/**/d", "a/b/c/e"));
    }

    #[test]
    fn single_star_is_one_segment() {
        assert!(matches("events/*", "events/a"));
        assert!(!matches("events/*", "events/a/b"));
        assert!(!matches("events/*", "events"));
        assert!(!matches("events/*", "other/a"));
    }

    #[test]
    fn double_star_is_any_number_of_segments() {
        assert!(matches("events/**", "events"));
        assert!(matches("events/**", "events/a/b/c"));
        assert!(matches("**/log", "a/b/log"));
        assert!(matches("**", "anything/at/all"));
        assert!(!matches("**/log", "a/b/logs"));
        assert!(!matches("**", "__ds/subscriptions/x"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", "a//b", "ev*nts/a", "__ds/**", "a/%zz"] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn streams_are_normalized_so_order_and_duplicates_do_not_change_the_hash() {
        let a = Spec::parse(br#"{"type":"webhook","streams":["b","a","b"],"webhook":{"url":"https://x.example/h"}}"#).unwrap();
        let b = Spec::parse(br#"{"type":"webhook","streams":["a","/b"],"webhook":{"url":"https://x.example/h"},"lease_ttl_ms":30000}"#).unwrap();
        assert_eq!(a.streams, ["a", "b"]);
        assert_eq!(a.hash(), b.hash());
        let c = Spec::parse(
            br#"{"type":"webhook","streams":["a"],"webhook":{"url":"https://x.example/h"}}"#,
        )
        .unwrap();
        assert_ne!(a.hash(), c.hash());
    }

    #[test]
    fn invalid_bodies_are_refused() {
        for bad in [
            &b"not json"[..],
            br#"{"pattern":"a/*"}"#,
            br#"{"type":"webhook","webhook":{"url":"https://x.example"}}"#,
            br#"{"type":"webhook","pattern":"a/*"}"#,
            br#"{"type":"pull-wake","pattern":"a/*"}"#,
            br#"{"type":"pull-wake","pattern":"a/*","wake_stream":"w","lease_ttl_ms":999}"#,
            br#"{"type":"pull-wake","pattern":"a/*","wake_stream":"w","lease_ttl_ms":600001}"#,
            br#"{"type":"pull-wake","streams":["__ds/x"],"wake_stream":"w"}"#,
            br#"{"type":"other","pattern":"a/*"}"#,
        ] {
            assert!(
                Spec::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
