//! The in-memory stream index that every built-in backend keeps: stream
//! metadata, writer state, fork links and where each record's bytes live.
//!
//! The index knows two tails per stream. `tail` includes appends that are
//! decided but not yet durable, and is what later decisions build on;
//! `durable_tail` is what readers see. A backend decides an operation
//! ([`Index::decide_append`] and friends), records it in its log, applies it
//! ([`Index::apply`]) and, once the log says it is durable, publishes it
//! ([`Index::publish`]), which wakes the stream's waiters. Replaying a log
//! after a restart is the same `apply` and `publish`, with no rules to run.

// Snapshots, replay and records on disk serve only the file store.
#![cfg_attr(not(feature = "file"), allow(dead_code))]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::watch;

use super::rules::{self, AppendPlan, Existing, SourceView, WriterState};
use super::{Append, AppendOutcome, Create, Listed, StreamError, StreamErrorKind, StreamInfo};
use crate::live::TailWait;
use crate::offset::{Offset, ReadFrom};
use crate::producer::ProducerState;
use crate::stream::{ContentType, Expiry, ForkPoint};

/// Where a record's bytes are.
#[derive(Debug, Clone)]
pub(crate) enum Chunk {
    /// In memory.
    Mem(Bytes),
    /// In a log segment.
    Disk(Location),
}

impl Chunk {
    pub(crate) fn len(&self) -> usize {
        match self {
            Chunk::Mem(bytes) => bytes.len(),
            Chunk::Disk(at) => at.len as usize,
        }
    }
}

/// A record's place in the file store's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Location {
    pub(crate) segment: u64,
    pub(crate) pos: u64,
    pub(crate) len: u32,
    /// CRC-32C of the record's bytes, checked on every read: a frame's own
    /// checksum is checked only when it is replayed, and frames before a
    /// snapshot are not.
    pub(crate) crc: u32,
}

/// A decided change to the index: what gets logged and replayed.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Create(NewStream),
    Append {
        id: u64,
        records: Vec<Bytes>,
        producer: Option<(String, ProducerState)>,
        stream_seq: Option<String>,
        close: bool,
    },
    /// Removes the stream, or soft-deletes it while forks read from it.
    Delete {
        id: u64,
    },
    /// Sets or removes a metadata entry.
    Meta {
        key: String,
        value: Option<Bytes>,
    },
}

impl Op {
    /// The records whose bytes the log stores.
    pub(crate) fn records(&self) -> &[Bytes] {
        match self {
            Op::Create(new) => &new.records,
            Op::Append { records, .. } => records,
            Op::Delete { .. } | Op::Meta { .. } => &[],
        }
    }

    /// The stream the operation changes, if any.
    pub(crate) fn stream(&self) -> Option<u64> {
        match self {
            Op::Create(new) => Some(new.id),
            Op::Append { id, .. } | Op::Delete { id } => Some(*id),
            Op::Meta { .. } => None,
        }
    }
}

/// A stream about to be created, fully resolved.
#[derive(Debug, Clone)]
pub(crate) struct NewStream {
    pub(crate) id: u64,
    pub(crate) path: String,
    pub(crate) content_type: ContentType,
    pub(crate) expiry: Expiry,
    pub(crate) closed: bool,
    /// The fork point and the source's id.
    pub(crate) fork: Option<(ForkPoint, u64)>,
    pub(crate) base: Offset,
    pub(crate) records: Vec<Bytes>,
}

/// What a write request turned into.
#[derive(Debug)]
pub(crate) enum Decision<T> {
    /// Nothing changes; answer with this.
    Answer(T),
    /// Log and apply this operation, then answer.
    Change(Op),
}

#[derive(Debug)]
struct Entry {
    path: String,
    content_type: ContentType,
    expiry: Expiry,
    touched: SystemTime,
    writer: WriterState,
    fork: Option<ForkPoint>,
    source: Option<u64>,
    /// Where this stream's own records begin: zero, or the fork point.
    base: Offset,
    chunks: Vec<Chunk>,
    starts: Vec<Offset>,
    tail: Offset,
    durable_tail: Offset,
    durable_closed: bool,
    /// Whether the create is durable; until then readers get 404.
    durable: bool,
    /// How many forks read from this stream.
    forks: u64,
    /// Deleted while forks still read from it.
    deleted: bool,
    wake: watch::Sender<()>,
}

impl Entry {
    fn info(&self, id: u64) -> StreamInfo {
        StreamInfo {
            id,
            content_type: self.content_type.clone(),
            tail: self.tail,
            closed: self.writer.closed,
            expiry: self.expiry,
        }
    }

    /// Whether the stream has expired at `now`. Live readers waiting at its
    /// tail keep a sliding TTL from running out: a live read renews it when
    /// it starts, and a stream with active live readers does not expire
    /// (PROTOCOL.md section 5.1, `Stream-TTL`). `Stream-Expires-At` is
    /// absolute.
    fn has_expired(&self, now: SystemTime) -> bool {
        let followed = self.wake.receiver_count() > 0;
        !(followed && matches!(self.expiry, Expiry::Ttl(_)))
            && self.expiry.is_expired(self.touched, now)
    }

    /// When the stream may next have expired, as of its last read or
    /// write: never earlier, since renewals only move it later.
    fn deadline(&self) -> Option<SystemTime> {
        self.expiry.deadline(self.touched)
    }

    fn durable_info(&self, id: u64) -> StreamInfo {
        StreamInfo {
            tail: self.durable_tail,
            closed: self.durable_closed,
            ..self.info(id)
        }
    }

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
    fn collect(&self, from: Offset, max_bytes: usize) -> (Vec<Chunk>, Offset) {
        let mut chunks = Vec::new();
        let mut bytes = 0usize;
        let mut at = from;
        for (entry, end) in self.segments.iter().copied() {
            if at >= end {
                continue;
            }
            let Some(mut i) = entry.index_of(at) else {
                break;
            };
            while i < entry.chunks.len() && entry.starts[i] < end {
                let len = entry.chunks[i].len();
                if !chunks.is_empty() && bytes + len > max_bytes {
                    return (chunks, at);
                }
                bytes += len;
                chunks.push(entry.chunks[i].clone());
                i += 1;
                at = entry.starts.get(i).copied().unwrap_or(entry.tail).min(end);
            }
        }
        (chunks, at)
    }
}

/// A fork source's view, with a way to fetch a record's bytes.
struct Source<'a> {
    view: View<'a>,
    fetch: &'a dyn Fn(&Chunk) -> Option<Bytes>,
}

impl Source<'_> {
    fn chunk_at(&self, at: Offset) -> Option<&Chunk> {
        let (entry, _) = self.view.segment_of(at)?;
        entry.index_of(at).map(|i| &entry.chunks[i])
    }
}

impl SourceView for Source<'_> {
    fn tail(&self) -> Offset {
        self.view
            .segments
            .last()
            .map(|(_, end)| *end)
            .unwrap_or_default()
    }

    fn record_len(&self, at: Offset) -> Option<usize> {
        self.chunk_at(at).map(Chunk::len)
    }

    fn record_at(&self, at: Offset) -> Option<Bytes> {
        self.chunk_at(at).and_then(|chunk| (self.fetch)(chunk))
    }

    fn is_boundary(&self, at: Offset) -> bool {
        at == self.tail() || self.chunk_at(at).is_some()
    }
}

/// A read, located: the chunks to fetch and what to tell the reader.
#[derive(Debug)]
pub(crate) struct Located {
    pub(crate) info: StreamInfo,
    pub(crate) start: Offset,
    pub(crate) next: Offset,
    pub(crate) chunks: Vec<Chunk>,
    pub(crate) wait: Option<TailWait>,
}

/// Every stream, by id and by path.
#[derive(Debug, Default)]
pub(crate) struct Index {
    streams: HashMap<u64, Entry>,
    paths: HashMap<String, u64>,
    next_id: u64,
    /// Changes to publish once the log is durable past their ticket, in
    /// ticket order: `(ticket, stream, tail, closed)`.
    publications: VecDeque<(u64, u64, Offset, bool)>,
    /// Metadata entries, by key.
    meta: BTreeMap<String, Bytes>,
    /// Streams that can expire, by when each is next worth a look: an
    /// entry may be early (a read or write renewed the TTL since), never
    /// late. The expiry sweep looks only at those due, not at every stream.
    expiries: BinaryHeap<Reverse<(SystemTime, u64)>>,
}

impl Index {
    fn id_of(&self, path: &str) -> Option<u64> {
        self.paths.get(path).copied()
    }

    /// The id of the stream at `path` if it expired at `now` and should be
    /// deleted (softly, if forks read from it).
    pub(crate) fn expired(&self, path: &str, now: SystemTime) -> Option<u64> {
        let id = self.id_of(path)?;
        let entry = &self.streams[&id];
        (!entry.deleted && entry.has_expired(now)).then_some(id)
    }

    /// The stream at `path` as readers may see it.
    fn visible(&self, path: &str) -> Result<(u64, &Entry), StreamError> {
        let id = self.id_of(path).ok_or_else(StreamError::not_found)?;
        let entry = &self.streams[&id];
        if !entry.durable {
            return Err(StreamError::not_found());
        }
        if entry.deleted {
            return Err(StreamError::gone());
        }
        Ok((id, entry))
    }

    /// The stream at `path` as writers see it, pending changes included.
    fn writable(&self, path: &str) -> Result<(u64, &Entry), StreamError> {
        let id = self.id_of(path).ok_or_else(StreamError::not_found)?;
        let entry = &self.streams[&id];
        if entry.deleted {
            return Err(StreamError::gone());
        }
        Ok((id, entry))
    }

    fn view(&self, id: u64, durable: bool) -> View<'_> {
        let mut segments = Vec::new();
        let mut current = self.streams.get(&id);
        let mut end = current
            .map(|e| if durable { e.durable_tail } else { e.tail })
            .unwrap_or_default();
        while let Some(entry) = current {
            segments.push((entry, end));
            // A fork may diverge below its source's own fork point, so the
            // range inherited further up ends at the lowest base seen so far.
            end = end.min(entry.base);
            current = entry.source.and_then(|s| self.streams.get(&s));
        }
        segments.reverse();
        View { segments }
    }

    /// Decides a create. `fetch` reads a record's bytes, for byte
    /// sub-offsets that end inside a record.
    pub(crate) fn decide_create(
        &mut self,
        create: Create,
        fetch: &dyn Fn(&Chunk) -> Option<Bytes>,
    ) -> Result<Decision<(u64, StreamInfo)>, StreamError> {
        let Create {
            path, config, body, ..
        } = create;
        if let Some(id) = self.id_of(&path) {
            let entry = &self.streams[&id];
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
                Ok(Decision::Answer((id, entry.info(id))))
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
                let (source_id, source) = match self.writable(&request.source) {
                    Ok(found) => found,
                    Err(e) if e.is_not_found() => {
                        return Err(StreamError::new(
                            StreamErrorKind::NotFound,
                            "fork source not found",
                        ))
                    }
                    Err(_) => return Err(StreamError::conflict("fork source was deleted")),
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
                let view = Source {
                    view: self.view(source_id, false),
                    fetch,
                };
                let resolved = rules::resolve_fork(&view, ct.is_json(), request)?;
                let prefix = resolved.prefix.into_iter().collect();
                (
                    ct,
                    expiry,
                    Some((resolved.point, source_id)),
                    resolved.base,
                    prefix,
                )
            }
        };
        records.extend(
            rules::records(&content_type, body, true).map_err(|b| StreamError::invalid(b.0))?,
        );
        records
            .iter()
            .try_fold(base, |at, r| at.after_record(r.len()))
            .ok_or_else(|| StreamError::new(StreamErrorKind::Full, "stream is full"))?;
        self.next_id += 1;
        Ok(Decision::Change(Op::Create(NewStream {
            id: self.next_id,
            path,
            content_type,
            expiry,
            closed: config.closed,
            fork,
            base,
            records,
        })))
    }

    /// Decides an append.
    pub(crate) fn decide_append(
        &self,
        append: Append,
    ) -> Result<Decision<(u64, AppendOutcome)>, StreamError> {
        let (id, entry) = self.writable(&append.path)?;
        let plan = rules::plan_append(&entry.content_type, entry.tail, &entry.writer, append)?;
        Ok(match plan {
            AppendPlan::Write {
                records,
                producer,
                stream_seq,
                close,
                ..
            } => Decision::Change(Op::Append {
                id,
                records,
                producer,
                stream_seq,
                close,
            }),
            AppendPlan::Duplicate(producer) => {
                Decision::Answer((id, AppendOutcome::Duplicate { producer }))
            }
            AppendPlan::AlreadyClosed => Decision::Answer((id, AppendOutcome::AlreadyClosed)),
        })
    }

    /// Decides a delete.
    pub(crate) fn decide_delete(&self, path: &str) -> Result<Op, StreamError> {
        let (id, _) = self.writable(path)?;
        Ok(Op::Delete { id })
    }

    /// The stream's current state, pending changes included: what a write's
    /// response reports.
    pub(crate) fn info(&self, id: u64) -> Option<StreamInfo> {
        self.streams.get(&id).map(|entry| entry.info(id))
    }

    /// The stream's tail and closure, pending changes included.
    pub(crate) fn written(&self, id: u64) -> Option<(Offset, bool)> {
        self.streams
            .get(&id)
            .map(|entry| (entry.tail, entry.writer.closed))
    }

    /// Applies a decided (or replayed) operation. `chunks` holds where each of
    /// the operation's records now lives, in order. An operation on a stream
    /// the index does not have changes nothing.
    pub(crate) fn apply(&mut self, op: Op, chunks: Vec<Chunk>, now: SystemTime) {
        match op {
            Op::Create(new) => {
                if let Some((_, source)) = &new.fork {
                    if let Some(source) = self.streams.get_mut(source) {
                        source.forks += 1;
                    }
                }
                let (fork, source) = new.fork.map_or((None, None), |(f, s)| (Some(f), Some(s)));
                let mut entry = Entry {
                    path: new.path.clone(),
                    content_type: new.content_type,
                    expiry: new.expiry,
                    touched: now,
                    writer: WriterState {
                        closed: new.closed,
                        ..WriterState::default()
                    },
                    fork,
                    source,
                    base: new.base,
                    chunks: Vec::new(),
                    starts: Vec::new(),
                    tail: new.base,
                    durable_tail: new.base,
                    durable_closed: false,
                    durable: false,
                    forks: 0,
                    deleted: false,
                    wake: watch::Sender::new(()),
                };
                push(&mut entry, chunks);
                if let Some(due) = entry.deadline() {
                    self.expiries.push(Reverse((due, new.id)));
                }
                self.next_id = self.next_id.max(new.id);
                if let Some(old) = self.paths.insert(new.path, new.id) {
                    // The path was freed by a delete that is not yet published.
                    self.streams.remove(&old);
                }
                self.streams.insert(new.id, entry);
            }
            Op::Append {
                id,
                producer,
                stream_seq,
                close,
                ..
            } => {
                let Some(entry) = self.streams.get_mut(&id) else {
                    tracing::warn!(id, "append to an unknown stream ignored");
                    return;
                };
                entry.writer.record(producer, stream_seq, close);
                push(entry, chunks);
                entry.touched = entry.touched.max(now);
            }
            Op::Meta { key, value } => match value {
                Some(value) => {
                    self.meta.insert(key, value);
                }
                None => {
                    self.meta.remove(&key);
                }
            },
            Op::Delete { id } => {
                let Some(entry) = self.streams.get_mut(&id) else {
                    return;
                };
                if entry.forks > 0 {
                    entry.deleted = true;
                    entry.wake.send_replace(());
                } else {
                    self.remove(id);
                }
            }
        }
    }

    /// Makes stream `id` visible to readers up to `tail` (and closed, if
    /// `closed`), and wakes its waiters. Call it once the operation that
    /// produced that state is durable; everything logged before it is too.
    pub(crate) fn publish(&mut self, id: u64, tail: Offset, closed: bool) {
        let Some(entry) = self.streams.get_mut(&id) else {
            return;
        };
        let tail = tail.min(entry.tail).max(entry.durable_tail);
        let closed = entry.durable_closed || closed;
        let changed =
            !entry.durable || tail != entry.durable_tail || closed != entry.durable_closed;
        entry.durable = true;
        entry.durable_tail = tail;
        entry.durable_closed = closed;
        // Readers subscribe under the same lock, so with none subscribed
        // now there is nobody to wake; skipping the send saves its locks.
        if changed && entry.wake.receiver_count() > 0 {
            entry.wake.send_replace(());
        }
    }

    /// Publishes stream `id` up to `tail` once the log is durable past
    /// `ticket`.
    pub(crate) fn schedule(&mut self, ticket: u64, id: u64, tail: Offset, closed: bool) {
        self.publications.push_back((ticket, id, tail, closed));
    }

    /// Publishes every scheduled change whose ticket the log is durable past.
    pub(crate) fn publish_durable(&mut self, durable: u64) {
        while let Some(&(ticket, id, tail, closed)) = self.publications.front() {
            if ticket > durable {
                break;
            }
            self.publications.pop_front();
            self.publish(id, tail, closed);
        }
    }

    /// Makes every stream's applied changes visible: the end of a replay.
    pub(crate) fn publish_all(&mut self) {
        let all: Vec<(u64, Offset, bool)> = self
            .streams
            .iter()
            .map(|(id, e)| (*id, e.tail, e.writer.closed))
            .collect();
        for (id, tail, closed) in all {
            self.publish(id, tail, closed);
        }
    }

    /// Removes a stream and releases its fork source, cascading up the chain
    /// through sources that were deleted and are no longer read.
    fn remove(&mut self, id: u64) {
        let mut next = Some(id);
        let mut first = true;
        while let Some(id) = next.take() {
            let Some(entry) = self.streams.get_mut(&id) else {
                break;
            };
            if !first {
                entry.forks = entry.forks.saturating_sub(1);
                if !(entry.deleted && entry.forks == 0) {
                    break;
                }
            }
            first = false;
            let entry = self.streams.remove(&id).expect("looked up above");
            if self.paths.get(&entry.path) == Some(&id) {
                self.paths.remove(&entry.path);
            }
            next = entry.source;
        }
    }

    /// The stream's metadata, as readers see it; HEAD does not renew TTLs.
    pub(crate) fn head(&self, path: &str) -> Result<StreamInfo, StreamError> {
        let (id, entry) = self.visible(path)?;
        Ok(entry.durable_info(id))
    }

    /// Locates a read: which chunks, from where to where. Renews the TTL.
    pub(crate) fn locate(
        &mut self,
        path: &str,
        from: ReadFrom,
        max_bytes: usize,
        subscribe: bool,
        now: SystemTime,
    ) -> Result<Located, StreamError> {
        let (id, entry) = self.visible(path)?;
        let info = entry.durable_info(id);
        let subscription = (subscribe && !info.closed).then(|| entry.wake.subscribe());
        let expires_at = match entry.expiry {
            Expiry::At(at) => Some(at),
            Expiry::Never | Expiry::Ttl(_) => None,
        };
        let view = self.view(id, true);
        let boundary = |at| {
            at == info.tail
                || view
                    .segment_of(at)
                    .is_some_and(|(e, _)| e.index_of(at).is_some())
        };
        let start = match from {
            ReadFrom::Start => Offset::ZERO,
            ReadFrom::Now => info.tail,
            ReadFrom::At(at) if at <= info.tail && boundary(at) => at,
            ReadFrom::At(_) => {
                return Err(StreamError::invalid(
                    "offset is not a position in this stream",
                ))
            }
        };
        let (chunks, next) = view.collect(start, max_bytes);
        let wait = subscription.filter(|_| chunks.is_empty()).map(|mut rx| {
            TailWait::new(async move {
                // An absolute expiry deletes the stream when it is next
                // touched: wake up then to touch it. An error means the
                // stream is gone: wake up and find out.
                let expiry = async {
                    match expires_at {
                        Some(at) => {
                            let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                            tokio::time::sleep(left).await;
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = rx.changed() => {}
                    () = expiry => {}
                }
            })
        });
        if let Some(entry) = self.streams.get_mut(&id) {
            entry.touched = entry.touched.max(now);
        }
        Ok(Located {
            info,
            start,
            next,
            chunks,
            wait,
        })
    }
}

/// A stream as a snapshot keeps it: everything but what can be derived.
#[derive(Debug, Clone)]
pub(crate) struct Saved {
    pub(crate) id: u64,
    pub(crate) path: String,
    pub(crate) content_type: ContentType,
    pub(crate) expiry: Expiry,
    pub(crate) writer: WriterState,
    pub(crate) fork: Option<(ForkPoint, u64)>,
    pub(crate) base: Offset,
    pub(crate) chunks: Vec<Location>,
    pub(crate) deleted: bool,
}

impl Index {
    /// How many streams the index holds, deleted ones kept for forks
    /// included.
    pub(crate) fn len(&self) -> usize {
        self.streams.len()
    }

    /// Every stream, for a snapshot, with the next id to hand out. Records
    /// held in memory cannot be saved and make this fail.
    pub(crate) fn export(&self) -> Option<(u64, Vec<Saved>)> {
        let mut saved = Vec::with_capacity(self.streams.len());
        for (&id, entry) in &self.streams {
            let chunks = entry
                .chunks
                .iter()
                .map(|chunk| match chunk {
                    Chunk::Disk(at) => Some(*at),
                    Chunk::Mem(_) => None,
                })
                .collect::<Option<Vec<_>>>()?;
            saved.push(Saved {
                id,
                path: entry.path.clone(),
                content_type: entry.content_type.clone(),
                expiry: entry.expiry,
                writer: entry.writer.clone(),
                fork: entry.fork.clone().zip(entry.source),
                base: entry.base,
                chunks,
                deleted: entry.deleted,
            });
        }
        saved.sort_unstable_by_key(|s| s.id);
        Some((self.next_id, saved))
    }

    /// Rebuilds an index from a snapshot. Everything in it is durable.
    pub(crate) fn import(next_id: u64, saved: Vec<Saved>, now: SystemTime) -> Self {
        let mut index = Index {
            next_id,
            ..Index::default()
        };
        for stream in saved {
            let (fork, source) = stream
                .fork
                .map_or((None, None), |(f, s)| (Some(f), Some(s)));
            let mut entry = Entry {
                path: stream.path.clone(),
                content_type: stream.content_type,
                expiry: stream.expiry,
                touched: now,
                writer: stream.writer,
                fork,
                source,
                base: stream.base,
                chunks: Vec::new(),
                starts: Vec::new(),
                tail: stream.base,
                durable_tail: stream.base,
                durable_closed: false,
                durable: false,
                forks: 0,
                deleted: stream.deleted,
                wake: watch::Sender::new(()),
            };
            push(
                &mut entry,
                stream.chunks.into_iter().map(Chunk::Disk).collect(),
            );
            if let Some(due) = entry.deadline() {
                index.expiries.push(Reverse((due, stream.id)));
            }
            index.paths.insert(stream.path, stream.id);
            index.streams.insert(stream.id, entry);
            index.next_id = index.next_id.max(stream.id);
        }
        let sources: Vec<u64> = index.streams.values().filter_map(|e| e.source).collect();
        for source in sources {
            if let Some(entry) = index.streams.get_mut(&source) {
                entry.forks += 1;
            }
        }
        index.publish_all();
        index
    }

    /// The log segments that hold bytes of some stream's records.
    pub(crate) fn segments_in_use(&self) -> std::collections::BTreeSet<u64> {
        self.streams
            .values()
            .flat_map(|e| e.chunks.iter())
            .filter_map(|chunk| match chunk {
                Chunk::Disk(at) => Some(at.segment),
                Chunk::Mem(_) => None,
            })
            .collect()
    }

    /// Every metadata entry whose key starts with `prefix`, in key order.
    pub(crate) fn meta(&self, prefix: &str) -> Vec<(String, Bytes)> {
        self.meta
            .range(prefix.to_owned()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect()
    }

    /// Restores metadata entries, from a snapshot.
    pub(crate) fn import_meta(&mut self, entries: Vec<(String, Bytes)>) {
        self.meta.extend(entries);
    }

    /// Every live, unexpired stream whose path starts with `prefix`, with
    /// its tail as readers see it, in path order.
    pub(crate) fn list(&self, prefix: &str, now: SystemTime) -> Vec<Listed> {
        let mut listed: Vec<Listed> = self
            .paths
            .iter()
            .filter(|(path, _)| path.starts_with(prefix))
            .filter_map(|(path, id)| {
                let entry = self.streams.get(id)?;
                let live = entry.durable && !entry.deleted && !entry.has_expired(now);
                live.then(|| Listed {
                    path: path.clone(),
                    tail: entry.durable_tail,
                })
            })
            .collect();
        listed.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        listed
    }

    /// The paths of streams that have expired by `now` and are not yet
    /// deleted.
    pub(crate) fn expired_paths(&mut self, now: SystemTime) -> Vec<String> {
        // A stream past its deadline that live readers keep alive, or whose
        // delete fails, is looked at again this much later.
        const RECHECK: Duration = Duration::from_secs(1);
        let mut expired = Vec::new();
        let mut again = Vec::new();
        while let Some(&Reverse((due, id))) = self.expiries.peek() {
            if due > now {
                break;
            }
            self.expiries.pop();
            // Ids are never reused: a stream that is gone stays gone.
            let Some(entry) = self.streams.get(&id).filter(|e| !e.deleted) else {
                continue;
            };
            if entry.has_expired(now) {
                expired.push(entry.path.clone());
                again.push(Reverse((now + RECHECK, id)));
            } else if let Some(next) = entry.deadline() {
                let next = if next > now { next } else { now + RECHECK };
                again.push(Reverse((next, id)));
            }
        }
        self.expiries.extend(again);
        // Deleted streams leave their entries behind until they come due;
        // once those outnumber the streams, start again from the streams.
        if self.expiries.len() > 2 * self.streams.len() + 1024 {
            self.expiries = self
                .streams
                .iter()
                .filter(|(_, e)| !e.deleted)
                .filter_map(|(id, e)| Some(Reverse((e.deadline()?, *id))))
                .collect();
        }
        expired
    }
}

fn push(entry: &mut Entry, chunks: Vec<Chunk>) {
    for chunk in chunks {
        entry.starts.push(entry.tail);
        entry.tail = entry
            .tail
            .after_record(chunk.len())
            .expect("decisions check that offsets do not overflow");
        entry.chunks.push(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(index: &mut Index, id: u64, expiry: Expiry, now: SystemTime) {
        let new = NewStream {
            id,
            path: format!("s{id}"),
            content_type: ContentType::default(),
            expiry,
            closed: false,
            fork: None,
            base: Offset::default(),
            records: Vec::new(),
        };
        index.apply(Op::Create(new), Vec::new(), now);
    }

    fn write(index: &mut Index, id: u64, now: SystemTime) {
        let op = Op::Append {
            id,
            records: Vec::new(),
            producer: None,
            stream_seq: None,
            close: false,
        };
        index.apply(op, Vec::new(), now);
    }

    #[test]
    fn the_sweep_finds_expired_streams_without_looking_at_the_others() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let secs = |s: f64| t + Duration::from_secs_f64(s);
        let mut index = Index::default();
        create(&mut index, 1, Expiry::Ttl(1), t);
        create(&mut index, 2, Expiry::Ttl(100), t);
        create(&mut index, 3, Expiry::Never, t);
        create(&mut index, 4, Expiry::At(secs(2.0)), t);
        for id in 5..1_000 {
            create(&mut index, id, Expiry::Never, t);
        }
        // Only the streams that can expire are queued.
        assert_eq!(index.expiries.len(), 3);

        assert!(index.expired_paths(secs(0.5)).is_empty());
        // A write renews the TTL: not expired at its first deadline.
        write(&mut index, 1, secs(0.8));
        assert!(index.expired_paths(secs(1.5)).is_empty());
        assert_eq!(index.expired_paths(secs(1.9)), ["s1"]);
        // Until it is deleted, an expired stream is looked at again.
        let mut due = index.expired_paths(secs(2.95));
        due.sort();
        assert_eq!(due, ["s1", "s4"]);
        index.apply(Op::Delete { id: 1 }, Vec::new(), secs(3.0));
        index.apply(Op::Delete { id: 4 }, Vec::new(), secs(3.0));
        assert!(index.expired_paths(secs(50.0)).is_empty());
        assert_eq!(index.expired_paths(secs(100.0)), ["s2"]);
        // What the queue still holds is bounded by the streams that can
        // expire, however often it is swept.
        assert!(index.expiries.len() <= 3, "{}", index.expiries.len());
    }

    #[test]
    fn deleted_streams_do_not_pile_up_in_the_expiry_queue() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let far = Expiry::At(t + Duration::from_secs(1_000_000));
        let mut index = Index::default();
        create(&mut index, 1, far, t);
        for id in 2..20_000 {
            create(&mut index, id, far, t);
            index.apply(Op::Delete { id }, Vec::new(), t);
            index.expired_paths(t);
        }
        assert!(index.expiries.len() <= 3 * 1024, "{}", index.expiries.len());
        // The stream that stays is still looked after.
        let due = index.expired_paths(t + Duration::from_secs(1_000_000));
        assert_eq!(due, ["s1"]);
    }
}
