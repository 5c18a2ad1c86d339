//! What a client operation can fail with.

use std::fmt;

use http::{HeaderMap, StatusCode};

use crate::BoxError;

/// A failed client operation: what went wrong, the HTTP status if the
/// server answered, and the stream it was about.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    status: Option<StatusCode>,
    url: String,
    message: String,
    source: Option<BoxError>,
}

/// The kind of an [`Error`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `404`: the stream does not exist.
    NotFound,
    /// `410`: the stream was deleted (its forks keep it), or the offset is
    /// no longer retained.
    Gone,
    /// `409` with `Stream-Closed: true`: the stream is closed.
    Closed,
    /// `403` to an idempotent producer: a newer epoch owns the producer id.
    StaleEpoch {
        /// The server's current epoch.
        current: u64,
    },
    /// `409` to an idempotent producer: a sequence number was skipped.
    SequenceGap {
        /// The sequence number the server expected.
        expected: u64,
        /// The one it got.
        received: u64,
    },
    /// `409` otherwise: a different configuration, content type or
    /// `Stream-Seq` regression.
    Conflict,
    /// `400`: the server refused the request as malformed.
    BadRequest,
    /// `413`: the body is larger than the server accepts.
    PayloadTooLarge,
    /// `429`: rate limited, and retries ran out.
    RateLimited,
    /// `5xx`, and retries ran out.
    Server,
    /// Another status the protocol does not name.
    Unexpected,
    /// No answer: the connection failed or timed out, and retries ran out.
    Transport,
    /// The server answered, but not as the protocol says (a missing
    /// `Stream-Next-Offset`, a malformed SSE event, invalid JSON).
    Protocol,
    /// The URL or a header value given to the client is invalid.
    InvalidInput,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, url: &str, message: impl Into<String>) -> Self {
        Self {
            kind,
            status: None,
            url: url.to_owned(),
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn transport(url: &str, source: impl Into<BoxError>) -> Self {
        let source = source.into();
        Self {
            message: source.to_string(),
            source: Some(source),
            ..Self::new(ErrorKind::Transport, url, "")
        }
    }

    pub(crate) fn protocol(url: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Protocol, url, message)
    }

    /// The error a response with a status that is not a success stands for.
    pub(crate) fn from_response(
        url: &str,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Self {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        let closed = headers
            .get("stream-closed")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let kind = match status.as_u16() {
            400 => ErrorKind::BadRequest,
            403 => match header("producer-epoch") {
                Some(current) => ErrorKind::StaleEpoch { current },
                None => ErrorKind::Unexpected,
            },
            404 => ErrorKind::NotFound,
            409 if closed => ErrorKind::Closed,
            409 => match (
                header("producer-expected-seq"),
                header("producer-received-seq"),
            ) {
                (Some(expected), Some(received)) => ErrorKind::SequenceGap { expected, received },
                _ => ErrorKind::Conflict,
            },
            410 => ErrorKind::Gone,
            413 => ErrorKind::PayloadTooLarge,
            429 => ErrorKind::RateLimited,
            500..=599 => ErrorKind::Server,
            _ => ErrorKind::Unexpected,
        };
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
        Self {
            status: Some(status),
            ..Self::new(kind, url, text.trim())
        }
    }

    /// The same error without its source, for each of several waiters.
    pub(crate) fn copy(&self) -> Self {
        Self {
            kind: self.kind.clone(),
            status: self.status,
            url: self.url.clone(),
            message: self.message.clone(),
            source: None,
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The server's status, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        self.status
    }

    /// The URL of the request that failed.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the stream does not exist.
    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }

    /// Whether the stream is closed to appends.
    pub fn is_closed(&self) -> bool {
        self.kind == ErrorKind::Closed
    }

    /// Whether trying again later may succeed: no answer, `5xx` or `429`.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Transport | ErrorKind::Server | ErrorKind::RateLimited
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.kind {
            ErrorKind::NotFound => "stream not found".to_owned(),
            ErrorKind::Gone => "stream gone".to_owned(),
            ErrorKind::Closed => "stream closed".to_owned(),
            ErrorKind::StaleEpoch { current } => {
                format!("stale producer epoch (the server is at epoch {current})")
            }
            ErrorKind::SequenceGap { expected, received } => {
                format!("producer sequence gap (expected {expected}, sent {received})")
            }
            ErrorKind::Conflict => "conflict".to_owned(),
            ErrorKind::BadRequest => "bad request".to_owned(),
            ErrorKind::PayloadTooLarge => "payload too large".to_owned(),
            ErrorKind::RateLimited => "rate limited".to_owned(),
            ErrorKind::Server => "server error".to_owned(),
            ErrorKind::Unexpected => "unexpected answer".to_owned(),
            ErrorKind::Transport => "no answer".to_owned(),
            ErrorKind::Protocol => "protocol violation".to_owned(),
            ErrorKind::InvalidInput => "invalid input".to_owned(),
        };
        write!(f, "{what}")?;
        if let Some(status) = self.status {
            write!(f, " ({status})")?;
        }
        write!(f, " at {}", self.url)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(status: u16, headers: &[(&str, &str)]) -> ErrorKind {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        let status = StatusCode::from_u16(status).unwrap();
        Error::from_response("u", status, &map, b"").kind
    }

    #[test]
    fn statuses_and_headers_name_the_kind() {
        assert_eq!(kind(404, &[]), ErrorKind::NotFound);
        assert_eq!(kind(410, &[]), ErrorKind::Gone);
        assert_eq!(kind(409, &[("stream-closed", "true")]), ErrorKind::Closed);
        assert_eq!(kind(409, &[]), ErrorKind::Conflict);
        assert_eq!(
            kind(
                409,
                &[
                    ("producer-expected-seq", "3"),
                    ("producer-received-seq", "5")
                ]
            ),
            ErrorKind::SequenceGap {
                expected: 3,
                received: 5
            }
        );
        assert_eq!(
            kind(403, &[("producer-epoch", "7")]),
            ErrorKind::StaleEpoch { current: 7 }
        );
        assert_eq!(kind(403, &[]), ErrorKind::Unexpected);
        assert_eq!(kind(429, &[]), ErrorKind::RateLimited);
        assert_eq!(kind(503, &[]), ErrorKind::Server);
        assert_eq!(kind(400, &[]), ErrorKind::BadRequest);
    }

    #[test]
    fn only_transport_server_and_rate_limits_are_retryable() {
        let status = |s: u16| StatusCode::from_u16(s).unwrap();
        let err = |s: u16| Error::from_response("u", status(s), &HeaderMap::new(), b"");
        assert!(err(503).is_retryable());
        assert!(err(429).is_retryable());
        assert!(!err(404).is_retryable());
        assert!(!err(409).is_retryable());
        assert!(Error::transport("u", "refused").is_retryable());
    }
}
