//! Server-Sent Events reads (PROTOCOL.md section 5.8) for any catch-up read
//! service.
//!
//! [`SseLayer`] wraps a service that answers catch-up reads. For a `GET` with
//! `live=sse` it reads from the requested offset; when that read fails the
//! client gets its status as is (`404`, `400`, ...). Otherwise the response
//! is a `text/event-stream` that carries each chunk the inner service returns
//! as an `event: data`, followed by an `event: control` with
//! `streamNextOffset`, `streamCursor`, `upToDate` and `streamClosed`. At the
//! tail it waits on the inner service's [`TailWait`](crate::live::TailWait)
//! and reads again.
//!
//! Over [`DurableStreamsService`](crate::DurableStreamsService), only the
//! first read is a request: the service hands the layer a way to read on
//! from its storage, so a wake-up costs each subscriber one storage read,
//! not a request parsed and a response formatted. Middleware between the
//! layer and the service therefore sees the first read alone. Over any
//! other service, every read is a request through it.
//!
//! - Text (`text/*`) and JSON streams send their data as text. Every CR, LF
//!   and CRLF in a payload starts a new `data:` line, so no payload can end
//!   an event or inject one.
//! - Other content types are sent as base64, with
//!   `Stream-SSE-Data-Encoding: base64`.
//! - The connection ends after the control event that reports closure, and
//!   otherwise about every 60 seconds (configurable) so that clients
//!   reconnect from their last offset and CDNs can collapse them.
//! - A client that goes away drops the body, and with it the subscription.
//!
//! # Example
//!
//! ```
//! use http::{Request, StatusCode};
//! use http_body_util::BodyExt;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_durable_streams::{DurableStreamsService, MemoryStorage, SseLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let service = ServiceBuilder::new()
//!     .layer(SseLayer::new())
//!     .service(DurableStreamsService::new(MemoryStorage::new()));
//!
//! let put = Request::put("/log")
//!     .header("content-type", "text/plain")
//!     .header("stream-closed", "true")
//!     .body(String::from("one\ntwo"))
//!     .unwrap();
//! service.clone().oneshot(put).await.unwrap();
//!
//! let read = Request::get("/log?offset=-1&live=sse").body(String::new()).unwrap();
//! let response = service.oneshot(read).await.unwrap();
//! assert_eq!(response.status(), StatusCode::OK);
//! assert_eq!(response.headers()["content-type"], "text/event-stream");
//!
//! // The stream is closed, so the body ends after the final control event.
//! let text = response.into_body().collect().await.unwrap().to_bytes();
//! let text = String::from_utf8(text.to_vec()).unwrap();
//! assert!(text.starts_with("event: data\ndata:one\ndata:two\n\nevent: control\n"));
//! assert!(text.contains(r#""streamClosed":true"#));
//! # }
//! ```

mod body;
mod encode;
mod layer;
mod service;

pub use self::body::{ResponseBody, SseBody};
pub use self::layer::SseLayer;
pub use self::service::{ResponseFuture, Sse};
