//! The storage contract: a [`tower::Service`](tower_service::Service) from
//! [`StorageRequest`] to [`StorageResponse`].
//!
//! A backend stores and fetches; it does not decide protocol questions. The
//! rules that must run inside a backend's critical section, because they read
//! and change a stream's writer state atomically with its data, are written
//! once in [`rules`] and called by every backend: producer validation,
//! `Stream-Seq`, closure, content-type matching, fork resolution and
//! idempotent re-creation.
//!
//! Because the contract is a `Service`, a backend can be wrapped in any tower
//! middleware (timeouts, concurrency limits, metrics) before it is handed to
//! [`DurableStreamsService`](crate::DurableStreamsService).
//!
//! Requests carry owned data and no borrowed state, so a backend may answer
//! from memory, a file or a remote database.

mod engine;
mod error;
#[cfg(feature = "file")]
pub mod file;
mod index;
mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod rules;

use std::time::SystemTime;

use bytes::Bytes;

pub use self::error::{StreamError, StreamErrorKind};
#[cfg(feature = "file")]
pub use self::file::{FileStorage, FileStorageBuilder, SyncMode};
pub use self::memory::MemoryStorage;
#[cfg(feature = "postgres")]
pub use self::postgres::{PostgresStorage, PostgresStorageBuilder};
use crate::live::TailWait;
use crate::offset::{Offset, ReadFrom};
use crate::producer::ProducerClaim;
use crate::stream::{ContentType, Expiry, StreamConfig};

/// An operation on the stream store.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StorageRequest {
    /// Create a stream, or confirm that it exists with the same configuration.
    Create(Create),
    /// Append to a stream, close it, or both.
    Append(Append),
    /// Read from an offset.
    Read(Read),
    /// A stream's metadata, without touching its TTL.
    Head {
        /// The stream's path.
        path: String,
    },
    /// Delete a stream (softly, while forks still read from it).
    Delete {
        /// The stream's path.
        path: String,
    },
    /// Every live stream whose path starts with `prefix`, with its tail.
    List {
        /// The path prefix; empty for every stream.
        prefix: String,
    },
    /// Store (or, with `None`, remove) one entry of the backend's metadata:
    /// small values the service keeps beside the streams, such as
    /// subscription state. Durable like an append once answered.
    SetMeta {
        /// The entry's key.
        key: String,
        /// Its new value, or `None` to remove it.
        value: Option<Bytes>,
    },
    /// Every metadata entry whose key starts with `prefix`, in key order.
    ListMeta {
        /// The key prefix; empty for every entry.
        prefix: String,
    },
}

/// A backend's answer to a [`StorageRequest`], one variant per request kind.
#[derive(Debug)]
#[non_exhaustive]
pub enum StorageResponse {
    /// The stream was created (`created: true`) or already existed as asked.
    Created {
        /// Whether this request created it.
        created: bool,
        /// The stream as it is now.
        info: StreamInfo,
    },
    /// The append was applied, or recognised as already applied.
    Appended(Appended),
    /// Data read.
    Read(ReadResult),
    /// Metadata.
    Head(StreamInfo),
    /// The stream was deleted.
    Deleted,
    /// The streams a [`StorageRequest::List`] asked for, in path order.
    Streams(Vec<Listed>),
    /// A metadata entry was stored or removed.
    MetaSet,
    /// The metadata entries a [`StorageRequest::ListMeta`] asked for, as
    /// `(key, value)` pairs in key order.
    Meta(Vec<(String, Bytes)>),
}

/// One stream in a [`StorageResponse::Streams`] listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The stream's path.
    pub path: String,
    /// The offset after its last record.
    pub tail: Offset,
}

/// Create a stream.
#[derive(Debug, Clone)]
pub struct Create {
    /// The stream's path.
    pub path: String,
    /// The requested configuration.
    pub config: StreamConfig,
    /// The initial body, possibly empty. The backend splits it into records
    /// with [`rules::records`] once the content type is settled (a fork
    /// without `Content-Type` takes its source's).
    pub body: Bytes,
    /// When the request was made, for TTLs.
    pub now: SystemTime,
}

/// Append to a stream.
#[derive(Debug, Clone)]
pub struct Append {
    /// The stream's path.
    pub path: String,
    /// The request's content type; `None` when there is no body.
    pub content_type: Option<ContentType>,
    /// The records to append: one record of bytes, or the JSON messages of the
    /// body; empty for a close-only request. A JSON body that failed to parse
    /// is reported only after closure and content type are checked.
    pub records: Result<Vec<Bytes>, BadBody>,
    /// Whether to close the stream after this append (`Stream-Closed: true`).
    pub close: bool,
    /// `Stream-Seq`, compared byte-wise with the stream's last one.
    pub stream_seq: Option<String>,
    /// The idempotent producer's headers, if any.
    pub producer: Option<ProducerClaim>,
    /// When the request was made, for TTLs.
    pub now: SystemTime,
}

/// A body that cannot be appended, with the reason for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadBody(pub String);

/// Read from a stream.
#[derive(Debug, Clone)]
pub struct Read {
    /// The stream's path.
    pub path: String,
    /// Where to start.
    pub from: ReadFrom,
    /// Stop adding records once this many bytes are gathered. At least one
    /// record is returned when any is available, however large.
    pub max_bytes: usize,
    /// Attach a [`TailWait`] when the read returns nothing and the stream is
    /// open.
    pub subscribe: bool,
    /// When the request was made, for TTLs.
    pub now: SystemTime,
}

/// What every response about a stream tells.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    /// An identifier unique to this incarnation of the stream, for ETags.
    pub id: u64,
    /// The stream's content type.
    pub content_type: ContentType,
    /// The offset after the last record.
    pub tail: Offset,
    /// Whether the stream is closed.
    pub closed: bool,
    /// When it expires.
    pub expiry: Expiry,
}

/// The result of an append.
#[derive(Debug, Clone)]
pub struct Appended {
    /// The stream after the append.
    pub info: StreamInfo,
    /// Whether records were added (a close-only request adds none).
    pub appended: bool,
    /// What happened.
    pub outcome: AppendOutcome,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Records were appended, or the stream was closed, by this request.
    Written {
        /// The producer's state after the append, when producer headers were
        /// sent.
        producer: Option<crate::producer::ProducerState>,
    },
    /// A producer's retry of an append that was already applied.
    Duplicate {
        /// The producer's current state.
        producer: crate::producer::ProducerState,
    },
    /// A close-only request on a stream that was already closed.
    AlreadyClosed,
}

/// The result of a read.
#[derive(Debug)]
pub struct ReadResult {
    /// The stream at the time of the read.
    pub info: StreamInfo,
    /// Where the read started, with sentinels resolved.
    pub start: Offset,
    /// Where the next read starts.
    pub next: Offset,
    /// The records, in order.
    pub records: Vec<Bytes>,
    /// Present when the read returned nothing, the stream is open, and the
    /// request asked for it.
    pub wait: Option<TailWait>,
}

impl ReadResult {
    /// Whether the read reached the tail.
    pub fn up_to_date(&self) -> bool {
        self.next == self.info.tail
    }
}
