//! Long-poll reads (PROTOCOL.md section 5.7) for any catch-up read service.
//!
//! [`LongPollLayer`] wraps a service that answers catch-up reads. For a `GET`
//! with `live=long-poll` it marks the request with
//! [`Subscribe`](crate::live::Subscribe) and forwards it. If the answer is
//! "nothing new" (it carries a [`TailWait`](crate::live::TailWait)), the layer
//! waits for the tail to move and reads again, from the offset the answer
//! named; when the timeout passes first it answers `204 No Content` with
//! `Stream-Next-Offset`, `Stream-Up-To-Date` and `Stream-Cursor`. Every
//! long-poll response carries a `Stream-Cursor` (PROTOCOL.md section 10.1)
//! unless the stream is closed. Other requests pass through untouched.
//!
//! There is no polling loop: one append or close wakes every waiter at once,
//! and a waiter that goes away (its client disconnected) frees its
//! subscription when its future is dropped.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_durable_streams::{DurableStreamsService, LongPollLayer, MemoryStorage};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let service = ServiceBuilder::new()
//!     .layer(LongPollLayer::new().timeout(Duration::from_millis(50)))
//!     .service(DurableStreamsService::new(MemoryStorage::new()));
//!
//! let put = Request::put("/events").header("content-type", "text/plain").body(String::new()).unwrap();
//! let tail = service.clone().oneshot(put).await.unwrap().headers()["stream-next-offset"].clone();
//!
//! // Nothing arrives within the timeout: 204, with the tail and a cursor.
//! let uri = format!("/events?offset={}&live=long-poll", tail.to_str().unwrap());
//! let poll = Request::get(uri).body(String::new()).unwrap();
//! let response = service.oneshot(poll).await.unwrap();
//! assert_eq!(response.status(), StatusCode::NO_CONTENT);
//! assert_eq!(response.headers()["stream-next-offset"], tail);
//! assert_eq!(response.headers()["stream-up-to-date"], "true");
//! assert!(response.headers().contains_key("stream-cursor"));
//! # }
//! ```

mod body;
mod layer;
mod service;

pub use self::body::ResponseBody;
pub use self::layer::LongPollLayer;
pub use self::service::{LongPoll, ResponseFuture};
