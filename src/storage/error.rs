use std::fmt;

use crate::offset::Offset;
use crate::BoxError;

/// Why a storage request did not succeed: a protocol outcome such as "not
/// found", or a failure of the backend itself.
///
/// It knows nothing of HTTP; [`DurableStreamsService`](crate::DurableStreamsService)
/// maps it to a response in one place.
#[derive(Debug)]
pub struct StreamError {
    kind: StreamErrorKind,
    message: String,
    source: Option<BoxError>,
}

/// The kinds of [`StreamError`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamErrorKind {
    /// No such stream (or fork source).
    NotFound,
    /// The stream was deleted but is kept for its forks.
    Gone,
    /// The request is malformed for this stream: a bad offset, fork point or
    /// body.
    Invalid,
    /// The stream exists with another configuration, or the path is blocked.
    Conflict,
    /// The append's content type differs from the stream's.
    ContentTypeMismatch,
    /// `Stream-Seq` did not increase.
    SeqRegression,
    /// The stream is closed; its final tail is given.
    Closed {
        /// The offset after the final record.
        tail: Offset,
    },
    /// The producer's epoch is older than the stream's record of it.
    StaleEpoch {
        /// The current epoch.
        current: u64,
    },
    /// A producer skipped a sequence.
    SequenceGap {
        /// The sequence expected.
        expected: u64,
        /// The sequence received.
        received: u64,
    },
    /// The stream has grown as large as offsets can describe.
    Full,
    /// The backend could not answer now; the request may be retried.
    Unavailable,
    /// The backend failed.
    Internal,
}

impl StreamError {
    /// An error of `kind` with a short message for the client.
    pub fn new(kind: StreamErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A backend failure, with its cause.
    pub fn internal(source: impl Into<BoxError>) -> Self {
        Self {
            kind: StreamErrorKind::Internal,
            message: "storage failure".into(),
            source: Some(source.into()),
        }
    }

    /// An error of `kind` with a short message for the client and its cause.
    #[cfg(feature = "postgres")]
    pub(crate) fn with_source(
        kind: StreamErrorKind,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Self {
            kind,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// The kind of error.
    pub fn kind(&self) -> &StreamErrorKind {
        &self.kind
    }

    /// The short message meant for the client.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the stream (or fork source) does not exist.
    pub fn is_not_found(&self) -> bool {
        self.kind == StreamErrorKind::NotFound
    }

    /// Whether the stream is closed.
    pub fn is_closed(&self) -> bool {
        matches!(self.kind, StreamErrorKind::Closed { .. })
    }

    pub(crate) fn not_found() -> Self {
        Self::new(StreamErrorKind::NotFound, "stream not found")
    }

    pub(crate) fn gone() -> Self {
        Self::new(StreamErrorKind::Gone, "stream was deleted")
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StreamErrorKind::Invalid, message)
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Self::new(StreamErrorKind::Conflict, message)
    }
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}
