//! What the built-in backends share: an [`Index`] behind one lock, and a
//! [`Log`] that makes each decided operation durable.
//!
//! Every write runs the same way: under the lock, expire what has expired,
//! decide, record the operation in the log and apply it to the index; then,
//! outside the lock, wait until the log says the operation is durable, and
//! only then publish it to readers and answer. Answers that change nothing
//! (a duplicate, an idempotent create) also wait, since the state they
//! confirm may still be on its way to disk, and then publish it, since the
//! request that changed it may have been abandoned before it could.

// The log handle and the expiry sweep serve only the file store.
#![cfg_attr(not(feature = "file"), allow(dead_code))]

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use bytes::Bytes;

use super::index::{Chunk, Decision, Index, Op};
use super::{
    AppendOutcome, Appended, Create, Read, ReadResult, StorageRequest, StorageResponse, StreamError,
};

/// Where a backend keeps operations and record bytes.
pub(crate) trait Log: Send + Sync + 'static {
    /// Whether every recorded operation is durable at once (memory), so that
    /// answers need not wait.
    const IMMEDIATE: bool;

    /// Records `op` and returns where each of its records' bytes now live.
    /// Called under the index lock, so the log's order is the index's.
    ///
    /// # Errors
    ///
    /// When the log cannot take more (it failed earlier, or is full).
    fn record(&self, op: &Op) -> Result<Vec<Chunk>, StreamError>;

    /// A ticket for everything recorded so far.
    fn ticket(&self) -> u64;

    /// Resolves once everything up to `ticket` is durable, and the hook
    /// given to [`Log::on_durable`] has run for it.
    fn durable(&self, ticket: u64) -> impl Future<Output = Result<(), StreamError>> + Send;

    /// Sets what the log calls, with its durable position, after each batch
    /// it makes durable and before it resolves the waits for that batch. A
    /// log that is immediate never calls it.
    fn on_durable(&self, hook: Box<dyn Fn(u64) + Send + Sync>);

    /// Fetches the bytes of `chunks`, in order.
    fn read(
        &self,
        chunks: Vec<Chunk>,
    ) -> impl Future<Output = Result<Vec<Bytes>, StreamError>> + Send;

    /// Fetches one chunk's bytes at once (for a fork that ends inside a
    /// record).
    fn read_now(&self, chunk: &Chunk) -> Option<Bytes>;
}

/// An index and its log.
#[derive(Debug)]
pub(crate) struct Engine<L> {
    index: Arc<Mutex<Index>>,
    log: L,
}

impl<L: Log> Engine<L> {
    pub(crate) fn new(index: Index, log: L) -> Self {
        let index = Arc::new(Mutex::new(index));
        if !L::IMMEDIATE {
            // Each batch is published as soon as it is durable: before the
            // requests that wait for it go on, and even when one of them was
            // abandoned on the way. The hook holds the index alone: were it
            // to hold the last reference to the log, a writer thread that
            // calls it would end up joining itself.
            let weak = Arc::downgrade(&index);
            log.on_durable(Box::new(move |lsn| {
                if let Some(index) = weak.upgrade() {
                    index
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .publish_durable(lsn);
                }
            }));
        }
        Self { index, log }
    }

    pub(crate) fn log(&self) -> &L {
        &self.log
    }

    /// Deletes every stream that has expired by `now`, so its space can be
    /// reclaimed even if nobody asks for it again.
    pub(crate) fn sweep(&self, now: SystemTime) {
        let mut index = self.lock();
        for path in index.expired_paths(now) {
            if let Err(e) = self.expire(&mut index, &path, now) {
                tracing::debug!(error = %e, "could not delete an expired stream");
                return;
            }
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) async fn handle(
        &self,
        request: StorageRequest,
    ) -> Result<StorageResponse, StreamError> {
        match request {
            StorageRequest::Create(create) => self.create(create).await,
            StorageRequest::Append(append) => self.append(append).await,
            StorageRequest::Read(read) => self.read(read).await.map(StorageResponse::Read),
            StorageRequest::Head { path } => {
                let mut index = self.lock();
                self.expire(&mut index, &path, SystemTime::now())?;
                index.head(&path).map(StorageResponse::Head)
            }
            StorageRequest::Delete { path } => self.delete(&path).await,
            StorageRequest::List { prefix } => {
                let index = self.lock();
                Ok(StorageResponse::Streams(
                    index.list(&prefix, SystemTime::now()),
                ))
            }
            StorageRequest::SetMeta { key, value } => self.set_meta(key, value).await,
            StorageRequest::ListMeta { prefix } => {
                Ok(StorageResponse::Meta(self.lock().meta(&prefix)))
            }
        }
    }

    /// Deletes the stream at `path` if it has expired.
    fn expire(&self, index: &mut Index, path: &str, now: SystemTime) -> Result<(), StreamError> {
        if let Some(id) = index.expired(path, now) {
            tracing::debug!(stream = %path, "stream expired");
            self.change(index, Op::Delete { id }, now)?;
        }
        Ok(())
    }

    /// Records and applies `op`; returns the stream it touched (zero for
    /// metadata).
    fn change(&self, index: &mut Index, op: Op, now: SystemTime) -> Result<u64, StreamError> {
        let id = op.stream();
        let chunks = self.log.record(&op)?;
        index.apply(op, chunks, now);
        let Some(id) = id else {
            return Ok(0);
        };
        if let Some((tail, closed)) = index.written(id) {
            if L::IMMEDIATE {
                index.publish(id, tail, closed);
            } else {
                // Published by whichever request or maintenance pass first
                // sees the log durable past this point, even if this request
                // is abandoned before it gets there.
                index.schedule(self.log.ticket(), id, tail, closed);
            }
        }
        Ok(id)
    }

    /// Waits until the state behind an answer is durable, and so shown to
    /// readers.
    async fn settle(&self, ticket: u64) -> Result<(), StreamError> {
        if !L::IMMEDIATE {
            self.log.durable(ticket).await?;
        }
        Ok(())
    }

    async fn create(&self, create: Create) -> Result<StorageResponse, StreamError> {
        let now = create.now;
        let (created, info, ticket) = {
            let mut index = self.lock();
            self.expire(&mut index, &create.path, now)?;
            if let Some(fork) = &create.config.fork {
                self.expire(&mut index, &fork.source, now)?;
            }
            let fetch = |chunk: &Chunk| self.log.read_now(chunk);
            let (created, id) = match index.decide_create(create, &fetch)? {
                Decision::Answer((id, _)) => (false, id),
                Decision::Change(op) => (true, self.change(&mut index, op, now)?),
            };
            let info = index.info(id).ok_or_else(StreamError::not_found)?;
            (created, info, self.log.ticket())
        };
        self.settle(ticket).await?;
        Ok(StorageResponse::Created { created, info })
    }

    async fn append(&self, append: super::Append) -> Result<StorageResponse, StreamError> {
        let now = append.now;
        let (outcome, appended, info, ticket) = {
            let mut index = self.lock();
            self.expire(&mut index, &append.path, now)?;
            let (outcome, appended, id) = match index.decide_append(append)? {
                Decision::Answer((id, outcome)) => (outcome, false, id),
                Decision::Change(op) => {
                    let (appended, producer) = match &op {
                        Op::Append {
                            records, producer, ..
                        } => (
                            !records.is_empty(),
                            producer.as_ref().map(|(_, state)| *state),
                        ),
                        _ => (false, None),
                    };
                    let id = self.change(&mut index, op, now)?;
                    (AppendOutcome::Written { producer }, appended, id)
                }
            };
            let info = index.info(id).ok_or_else(StreamError::not_found)?;
            (outcome, appended, info, self.log.ticket())
        };
        self.settle(ticket).await?;
        Ok(StorageResponse::Appended(Appended {
            info,
            appended,
            outcome,
        }))
    }

    async fn read(&self, read: Read) -> Result<ReadResult, StreamError> {
        let located = {
            let mut index = self.lock();
            self.expire(&mut index, &read.path, read.now)?;
            index.locate(
                &read.path,
                read.from,
                read.max_bytes,
                read.subscribe,
                read.now,
            )?
        };
        let records = self.log.read(located.chunks).await?;
        Ok(ReadResult {
            info: located.info,
            start: located.start,
            next: located.next,
            records,
            wait: located.wait,
        })
    }

    async fn set_meta(
        &self,
        key: String,
        value: Option<bytes::Bytes>,
    ) -> Result<StorageResponse, StreamError> {
        let ticket = {
            let mut index = self.lock();
            self.change(&mut index, Op::Meta { key, value }, SystemTime::now())?;
            self.log.ticket()
        };
        self.settle(ticket).await?;
        Ok(StorageResponse::MetaSet)
    }

    async fn delete(&self, path: &str) -> Result<StorageResponse, StreamError> {
        let now = SystemTime::now();
        let ticket = {
            let mut index = self.lock();
            self.expire(&mut index, path, now)?;
            let op = index.decide_delete(path)?;
            self.change(&mut index, op, now)?;
            self.log.ticket()
        };
        self.settle(ticket).await?;
        Ok(StorageResponse::Deleted)
    }
}
