//! A storage backend written outside the crate: [`RecordingStorage`]
//! forwards every [`StorageRequest`] to a [`MemoryStorage`] and records it,
//! with its outcome once known.
//!
//! A backend is any `tower::Service<StorageRequest, Response =
//! StorageResponse>` whose error converts into a `BoxError`; this one keeps
//! the store's [`StreamError`], so clients see the same statuses as with
//! `MemoryStorage` alone. The protocol rules (closure, content types,
//! producers, forks) stay in the store it forwards to, so a wrapper like
//! this one only has to pass requests on. `tests/storage_contract.rs` runs
//! the storage contract against it.
//!
//! The example serves it over HTTP, with the operations so far at
//! `/operations`:
//!
//! ```sh
//! cargo run --example recording_storage
//! curl -X PUT localhost:4440/v1/stream/chat -H 'content-type: text/plain' --data-binary 'hi'
//! curl 'localhost:4440/v1/stream/chat?offset=-1'
//! curl localhost:4440/operations
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_durable_streams::storage::{StorageRequest, StorageResponse, StreamError};
use tower_durable_streams::{
    CacheControlLayer, DurableStreamsService, LongPollLayer, MemoryStorage, SseLayer,
};

/// One request a [`RecordingStorage`] forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// `create`, `append`, `read`, `head` or `delete`.
    pub kind: &'static str,
    /// The stream's path.
    pub path: String,
    /// `ok`, or the kind of error, once the store has answered.
    pub outcome: Option<String>,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcome = self.outcome.as_deref().unwrap_or("pending");
        write!(f, "{} {} -> {}", self.kind, self.path, outcome)
    }
}

/// [`MemoryStorage`] that records every request made of it.
#[derive(Debug, Clone, Default)]
pub struct RecordingStorage {
    inner: MemoryStorage,
    log: Arc<Mutex<Vec<Operation>>>,
}

impl RecordingStorage {
    /// An empty store with an empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every request so far, oldest first. Clones share one record.
    pub fn operations(&self) -> Vec<Operation> {
        lock(&self.log).clone()
    }
}

/// The record, even if a thread panicked while holding it: each change to
/// it is a single push or assignment, so it is never left half-written.
fn lock(log: &Mutex<Vec<Operation>>) -> MutexGuard<'_, Vec<Operation>> {
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a request does, and to which stream.
fn describe(request: &StorageRequest) -> (&'static str, String) {
    match request {
        StorageRequest::Create(create) => ("create", create.path.clone()),
        StorageRequest::Append(append) => ("append", append.path.clone()),
        StorageRequest::Read(read) => ("read", read.path.clone()),
        StorageRequest::Head { path } => ("head", path.clone()),
        StorageRequest::Delete { path } => ("delete", path.clone()),
        _ => ("other", String::new()),
    }
}

impl Service<StorageRequest> for RecordingStorage {
    type Response = StorageResponse;
    type Error = StreamError;
    type Future = Pin<Box<dyn Future<Output = Result<StorageResponse, StreamError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: StorageRequest) -> Self::Future {
        let (kind, path) = describe(&request);
        let index = {
            let mut log = lock(&self.log);
            log.push(Operation {
                kind,
                path,
                outcome: None,
            });
            log.len() - 1
        };
        let log = self.log.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let result = answer.await;
            let outcome = match &result {
                Ok(_) => "ok".to_owned(),
                Err(e) => format!("{:?}", e.kind()),
            };
            lock(&log)[index].outcome = Some(outcome);
            result
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let storage = RecordingStorage::new();
    let streams = ServiceBuilder::new()
        .layer(CacheControlLayer::new())
        .layer(SseLayer::new())
        .layer(LongPollLayer::new().timeout(Duration::from_secs(30)))
        .service(DurableStreamsService::new(storage.clone()).prefix("/v1/stream"));
    // `/operations` lists the record; every other path is the streams'.
    let app = service_fn(move |request: Request<hyper::body::Incoming>| {
        if request.uri().path() == "/operations" {
            let text: String = storage
                .operations()
                .iter()
                .map(|op| format!("{op}\n"))
                .collect();
            let response = Response::new(Either::Right(Full::new(Bytes::from(text))));
            return futures_util::future::ok(response).left_future();
        }
        streams
            .clone()
            .oneshot(request)
            .map(|result| result.map(|response| response.map(Either::Left)))
            .right_future()
    });

    let listener = TcpListener::bind("127.0.0.1:4440").await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}/v1/stream/, the record at http://{addr}/operations");
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection error: {e}");
            }
        });
    }
}
