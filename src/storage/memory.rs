use std::fmt;
use std::future::{ready, Future, Ready};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tower_service::Service;

use super::engine::{Engine, Log};
use super::index::{Chunk, Index, Op};
use super::{StorageRequest, StorageResponse, StreamError};

/// A storage backend that keeps every stream in memory.
///
/// Cloning is cheap and clones share the same streams. Nothing survives the
/// process; use it for tests, caches of regenerable data, and development.
///
/// Operations take one lock, held only while a decision is made and records
/// are linked in; record data is reference-counted, so reads copy no bytes.
#[derive(Clone)]
pub struct MemoryStorage {
    engine: Arc<Engine<MemoryLog>>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            engine: Arc::new(Engine::new(Index::default(), MemoryLog)),
        }
    }
}

impl Default for MemoryStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStorage").finish_non_exhaustive()
    }
}

impl Service<StorageRequest> for MemoryStorage {
    type Response = StorageResponse;
    type Error = StreamError;
    type Future = Ready<Result<StorageResponse, StreamError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), StreamError>> {
        Poll::Ready(Ok(()))
    }

    /// Answers at once: in memory, every operation is durable when it is
    /// decided, so the engine never waits.
    fn call(&mut self, request: StorageRequest) -> Self::Future {
        let mut future = pin!(self.engine.handle(request));
        match future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(result) => ready(result),
            Poll::Pending => unreachable!("the memory log never makes the engine wait"),
        }
    }
}

/// Keeps record bytes where they are: in memory, durable at once.
#[derive(Debug)]
pub(crate) struct MemoryLog;

impl Log for MemoryLog {
    const IMMEDIATE: bool = true;

    fn record(&self, op: &Op) -> Result<Vec<Chunk>, StreamError> {
        Ok(op.records().iter().cloned().map(Chunk::Mem).collect())
    }

    fn ticket(&self) -> u64 {
        0
    }

    fn durable(&self, _ticket: u64) -> impl Future<Output = Result<(), StreamError>> + Send {
        ready(Ok(()))
    }

    fn on_durable(&self, _hook: Box<dyn Fn(u64) + Send + Sync>) {}

    fn read(
        &self,
        chunks: Vec<Chunk>,
    ) -> impl Future<Output = Result<Vec<Bytes>, StreamError>> + Send {
        ready(Ok(chunks
            .into_iter()
            .filter_map(|c| self.read_now(&c))
            .collect()))
    }

    fn read_now(&self, chunk: &Chunk) -> Option<Bytes> {
        match chunk {
            Chunk::Mem(bytes) => Some(bytes.clone()),
            Chunk::Disk(_) => None,
        }
    }
}
