//! The [Durable Streams] protocol for the tower ecosystem.
//!
//! Durable Streams are append-only byte streams addressed by URL: clients
//! create them with `PUT`, append with `POST`, and read from any offset they
//! saved, catching up, long-polling, or following Server-Sent Events. This
//! crate provides:
//!
//! - [`DurableStreamsService`], a [`tower::Service`] that speaks the protocol
//!   over any storage backend;
//! - layers that are useful on their own: [`CacheControlLayer`],
//!   [`LongPollLayer`] and [`SseLayer`];
//! - the [storage contract](storage), itself a `Service`, and
//!   [`MemoryStorage`];
//! - with the `client` feature, a [client] with resumable readers
//!   and idempotent producers;
//! - with the `server` feature, the `durable-streams` binary.
//!
//! # Example
//!
//! The full protocol over memory storage, mounted at `/v1/stream`:
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_durable_streams::{
//!     CacheControlLayer, DurableStreamsService, LongPollLayer, SseLayer,
//!     storage::MemoryStorage,
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let streams = ServiceBuilder::new()
//!     .layer(CacheControlLayer::new())
//!     .layer(SseLayer::new())
//!     .layer(LongPollLayer::new().timeout(Duration::from_secs(30)))
//!     .service(DurableStreamsService::new(MemoryStorage::new()).prefix("/v1/stream"));
//!
//! let put = Request::put("/v1/stream/jobs/42")
//!     .header("content-type", "text/plain")
//!     .body(String::from("started\n"))
//!     .unwrap();
//! let response = streams.clone().oneshot(put).await.unwrap();
//! assert_eq!(response.status(), StatusCode::CREATED);
//!
//! let read = Request::get("/v1/stream/jobs/42?offset=-1").body(String::new()).unwrap();
//! let response = streams.oneshot(read).await.unwrap();
//! assert_eq!(response.headers()["stream-up-to-date"], "true");
//! # }
//! ```
//!
//! [Durable Streams]: https://github.com/durable-streams/durable-streams

#![warn(missing_docs, missing_debug_implementations)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod body;
pub mod cache_control;
#[cfg(feature = "client")]
pub mod client;
mod cursor;
pub mod headers;
mod json;
pub mod live;
pub mod long_poll;
pub mod offset;
pub mod producer;
pub mod service;
pub mod sse;
pub mod storage;
pub mod stream;
#[cfg(feature = "subscriptions")]
pub mod subscription;

pub use self::body::Body;
pub use self::cache_control::CacheControlLayer;
pub use self::long_poll::LongPollLayer;
pub use self::offset::Offset;
pub use self::service::DurableStreamsService;
pub use self::sse::SseLayer;
pub use self::storage::MemoryStorage;

/// A boxed future that can move between threads.
type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// The boxed error type used at service and body boundaries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
