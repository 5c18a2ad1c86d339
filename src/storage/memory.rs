use std::collections::HashMap;
use std::future::{ready, Ready};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::sync::watch;
use tower_service::Service;

use super::rules::{self, AppendPlan, Existing, SourceView, WriterState};
use super::{
    Append, AppendOutcome, Appended, Create, Read, ReadResult, StorageRequest, StorageResponse,
    StreamError, StreamErrorKind, StreamInfo,
};
use crate::live::TailWait;
use crate::offset::{Offset, ReadFrom};
use crate::stream::{ContentType, Expiry, ForkPoint};

/// A storage backend that keeps every stream in memory.
///
/// Cloning is cheap and clones share the same streams. Nothing survives the
/// process; use it for tests, caches of regenerable data, and development.
///
/// Appends are serialised per backend by one lock held only while records
/// are linked in; record data is reference-counted, so reads copy no bytes.
#[derive(Clone, Debug, Default)]
pub struct MemoryStorage {
    streams: Arc<Mutex<Streams>>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn handle(&self, request: StorageRequest) -> Result<StorageResponse, StreamError> {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        match request {
            StorageRequest::Create(create) => streams.create(create),
            StorageRequest::Append(append) => streams.append(append).map(StorageResponse::Appended),
            StorageRequest::Read(read) => streams.read(read).map(StorageResponse::Read),
            StorageRequest::Head { path } => {
                let entry = streams.live(&path, SystemTime::now())?;
                Ok(StorageResponse::Head(entry.info()))
            }
            StorageRequest::Delete { path } => {
                streams.delete(&path).map(|()| StorageResponse::Deleted)
            }
        }
    }
}

impl Service<StorageRequest> for MemoryStorage {
    type Response = StorageResponse;
    type Error = StreamError;
    type Future = Ready<Result<StorageResponse, StreamError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), StreamError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: StorageRequest) -> Self::Future {
        ready(self.handle(request))
    }
}

#[derive(Debug, Default)]
struct Streams {
    map: HashMap<String, Entry>,
    next_id: u64,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    content_type: ContentType,
    expiry: Expiry,
    touched: SystemTime,
    writer: WriterState,
    fork: Option<ForkPoint>,
    /// Where this stream's own records begin: zero, or the fork point.
    base: Offset,
    records: Vec<Bytes>,
    starts: Vec<Offset>,
    tail: Offset,
    /// How many forks read from this stream.
    forks: u64,
    /// Deleted while forks still read from it.
    deleted: bool,
    wake: watch::Sender<()>,
}

impl Entry {
    fn info(&self) -> StreamInfo {
        StreamInfo {
            id: self.id,
            content_type: self.content_type.clone(),
            tail: self.tail,
            closed: self.writer.closed,
            expiry: self.expiry,
        }
    }

    fn push(&mut self, records: Vec<Bytes>) {
        for record in records {
            self.starts.push(self.tail);
            self.tail = self
                .tail
                .after_record(record.len())
                .expect("plans check that offsets do not overflow");
            self.records.push(record);
        }
    }

    /// The index of the own record starting at `at`.
    fn index_of(&self, at: Offset) -> Option<usize> {
        self.starts.binary_search(&at).ok()
    }
}

/// A stream as its readers see it: the inherited ranges of its fork chain,
/// root first, each `(stream, end)`, then its own records.
struct View<'a> {
    segments: Vec<(&'a Entry, Offset)>,
}

impl View<'_> {
    fn segment_of(&self, at: Offset) -> Option<(&Entry, Offset)> {
        self.segments
            .iter()
            .copied()
            .find(|(entry, end)| entry.base <= at && at < *end)
    }

    /// Records from `from`, a boundary, until `max_bytes` are gathered.
    fn collect(&self, from: Offset, max_bytes: usize) -> (Vec<Bytes>, Offset) {
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let mut at = from;
        for (entry, end) in self.segments.iter().copied() {
            if at >= end {
                continue;
            }
            let Some(mut i) = entry.index_of(at) else {
                break;
            };
            while i < entry.records.len() && entry.starts[i] < end {
                if !records.is_empty() && bytes + entry.records[i].len() > max_bytes {
                    return (records, at);
                }
                bytes += entry.records[i].len();
                records.push(entry.records[i].clone());
                i += 1;
                at = entry.starts.get(i).copied().unwrap_or(entry.tail).min(end);
            }
        }
        (records, at)
    }
}

impl SourceView for View<'_> {
    fn tail(&self) -> Offset {
        self.segments
            .last()
            .map(|(_, end)| *end)
            .unwrap_or_default()
    }

    fn record_at(&self, at: Offset) -> Option<Bytes> {
        let (entry, _) = self.segment_of(at)?;
        entry.index_of(at).map(|i| entry.records[i].clone())
    }

    fn is_boundary(&self, at: Offset) -> bool {
        at == self.tail()
            || self
                .segment_of(at)
                .is_some_and(|(e, _)| e.index_of(at).is_some())
    }
}

impl Streams {
    /// The stream at `path` if it exists, is not deleted and has not expired.
    fn live(&mut self, path: &str, now: SystemTime) -> Result<&mut Entry, StreamError> {
        self.reap_if_expired(path, now);
        match self.map.get_mut(path) {
            None => Err(StreamError::not_found()),
            Some(entry) if entry.deleted => Err(StreamError::gone()),
            Some(entry) => Ok(entry),
        }
    }

    fn reap_if_expired(&mut self, path: &str, now: SystemTime) {
        let Some(entry) = self.map.get_mut(path) else {
            return;
        };
        if entry.deleted || !entry.expiry.is_expired(entry.touched, now) {
            return;
        }
        tracing::debug!(stream = %path, "stream expired");
        if entry.forks > 0 {
            entry.deleted = true;
            entry.wake.send_replace(());
        } else {
            self.remove(path);
        }
    }

    /// Removes a stream and releases its fork source, cascading up the chain
    /// through sources that were deleted and are no longer read.
    fn remove(&mut self, path: &str) {
        let mut next = self
            .map
            .remove(path)
            .and_then(|entry| entry.fork)
            .map(|f| f.source);
        while let Some(source) = next.take() {
            let Some(entry) = self.map.get_mut(&source) else {
                break;
            };
            entry.forks = entry.forks.saturating_sub(1);
            if entry.deleted && entry.forks == 0 {
                next = self
                    .map
                    .remove(&source)
                    .and_then(|e| e.fork)
                    .map(|f| f.source);
            }
        }
    }

    fn view(&self, path: &str) -> View<'_> {
        let mut segments = Vec::new();
        let mut current = self.map.get(path);
        let mut end = current.map(|e| e.tail).unwrap_or_default();
        while let Some(entry) = current {
            segments.push((entry, end));
            // A fork may diverge below its source's own fork point, so the
            // range inherited further up ends at the lowest base seen so far.
            end = end.min(entry.base);
            current = entry.fork.as_ref().and_then(|f| self.map.get(&f.source));
        }
        segments.reverse();
        View { segments }
    }

    fn create(&mut self, create: Create) -> Result<StorageResponse, StreamError> {
        let Create {
            path,
            config,
            body,
            now,
        } = create;
        self.reap_if_expired(&path, now);
        if let Some(entry) = self.map.get(&path) {
            if entry.deleted {
                return Err(StreamError::conflict(
                    "stream was deleted and is kept for its forks",
                ));
            }
            let existing = Existing {
                content_type: &entry.content_type,
                expiry: entry.expiry,
                closed: entry.writer.closed,
                fork: entry.fork.as_ref(),
            };
            return if rules::same_config(&existing, &config) {
                Ok(StorageResponse::Created {
                    created: false,
                    info: entry.info(),
                })
            } else {
                Err(StreamError::conflict(
                    "stream exists with a different configuration",
                ))
            };
        }

        let (content_type, expiry, fork, base, mut records) = match &config.fork {
            None => {
                let ct = config.content_type.clone().unwrap_or_default();
                (ct, config.expiry, None, Offset::ZERO, Vec::new())
            }
            Some(request) => {
                self.reap_if_expired(&request.source, now);
                let source = match self.map.get(&request.source) {
                    None => {
                        return Err(StreamError::new(
                            StreamErrorKind::NotFound,
                            "fork source not found",
                        ))
                    }
                    Some(s) if s.deleted => {
                        return Err(StreamError::conflict("fork source was deleted"))
                    }
                    Some(s) => s,
                };
                let ct = match &config.content_type {
                    Some(ct) if !ct.matches(&source.content_type) => {
                        return Err(StreamError::new(
                            StreamErrorKind::ContentTypeMismatch,
                            "content type does not match the fork source's",
                        ))
                    }
                    _ => source.content_type.clone(),
                };
                let expiry = rules::fork_expiry(source.expiry, config.expiry);
                let resolved =
                    rules::resolve_fork(&self.view(&request.source), ct.is_json(), request)?;
                let prefix = resolved.prefix.into_iter().collect();
                (ct, expiry, Some(resolved.point), resolved.base, prefix)
            }
        };
        records.extend(
            rules::records(&content_type, body, true).map_err(|b| StreamError::invalid(b.0))?,
        );
        records
            .iter()
            .try_fold(base, |at, r| at.after_record(r.len()))
            .ok_or_else(|| StreamError::new(StreamErrorKind::Full, "stream is full"))?;

        if let Some(fork) = &fork {
            if let Some(source) = self.map.get_mut(&fork.source) {
                source.forks += 1;
            }
        }
        self.next_id += 1;
        let mut entry = Entry {
            id: self.next_id,
            content_type,
            expiry,
            touched: now,
            writer: WriterState {
                closed: config.closed,
                ..WriterState::default()
            },
            fork,
            base,
            records: Vec::new(),
            starts: Vec::new(),
            tail: base,
            forks: 0,
            deleted: false,
            wake: watch::Sender::new(()),
        };
        entry.push(records);
        let info = entry.info();
        self.map.insert(path, entry);
        Ok(StorageResponse::Created {
            created: true,
            info,
        })
    }

    fn append(&mut self, append: Append) -> Result<Appended, StreamError> {
        let now = append.now;
        let entry = self.live(&append.path, now)?;
        let plan = rules::plan_append(&entry.content_type, entry.tail, &entry.writer, append)?;
        let outcome = match &plan {
            AppendPlan::Write { producer, .. } => AppendOutcome::Written {
                producer: producer.as_ref().map(|(_, state)| *state),
            },
            AppendPlan::Duplicate(producer) => AppendOutcome::Duplicate {
                producer: *producer,
            },
            AppendPlan::AlreadyClosed => AppendOutcome::AlreadyClosed,
        };
        entry.writer.apply(&plan);
        let mut appended = false;
        if let AppendPlan::Write { records, .. } = plan {
            appended = !records.is_empty();
            entry.push(records);
            entry.touched = now;
            entry.wake.send_replace(());
        }
        Ok(Appended {
            info: entry.info(),
            appended,
            outcome,
        })
    }

    fn read(&mut self, read: Read) -> Result<ReadResult, StreamError> {
        let entry = self.live(&read.path, read.now)?;
        entry.touched = read.now;
        let info = entry.info();
        let subscription = (read.subscribe && !info.closed).then(|| entry.wake.subscribe());
        let view = self.view(&read.path);
        let start = match read.from {
            ReadFrom::Start => Offset::ZERO,
            ReadFrom::Now => info.tail,
            ReadFrom::At(at) if at <= info.tail && view.is_boundary(at) => at,
            ReadFrom::At(_) => {
                return Err(StreamError::invalid(
                    "offset is not a position in this stream",
                ))
            }
        };
        let (records, next) = view.collect(start, read.max_bytes);
        let wait = subscription.filter(|_| records.is_empty()).map(|mut rx| {
            TailWait::new(async move {
                // An error means the stream is gone: wake up and find out.
                let _ = rx.changed().await;
            })
        });
        Ok(ReadResult {
            info,
            start,
            next,
            records,
            wait,
        })
    }

    fn delete(&mut self, path: &str) -> Result<(), StreamError> {
        let entry = self.live(path, SystemTime::now())?;
        if entry.forks > 0 {
            entry.deleted = true;
            entry.wake.send_replace(());
        } else {
            self.remove(path);
        }
        Ok(())
    }
}
