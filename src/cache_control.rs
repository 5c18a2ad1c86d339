//! `Cache-Control` for stream responses, as PROTOCOL.md sections 5.5, 8 and
//! 10 describe.
//!
//! [`CacheControlLayer`] looks at each request and sets `Cache-Control` on
//! its response, unless the inner service already set one:
//!
//! | response | `Cache-Control` |
//! |---|---|
//! | `GET` catch-up or long-poll with data (`200`, `304`) | the read policy, by default `public, max-age=60, stale-while-revalidate=300` |
//! | `GET ?offset=now` | `no-store` (the tail moves) |
//! | `GET ?live=sse` | `no-cache` |
//! | `HEAD` | `no-store` |
//! | anything else: writes, `204` long-poll timeouts, errors | `no-store` |
//!
//! Streams holding user-specific data should use [`CacheControlLayer::private`].
//!
//! # Example
//!
//! ```
//! use http::{Request, Response};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_durable_streams::CacheControlLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let service = ServiceBuilder::new()
//!     .layer(CacheControlLayer::new().private())
//!     .service(service_fn(|_: Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(()))
//!     }));
//!
//! let read = Request::get("/s?offset=0000000000000000_0000000000000000").body(()).unwrap();
//! let response = service.clone().oneshot(read).await.unwrap();
//! assert_eq!(response.headers()["cache-control"], "private, max-age=60, stale-while-revalidate=300");
//!
//! let head = Request::head("/s").body(()).unwrap();
//! let response = service.oneshot(head).await.unwrap();
//! assert_eq!(response.headers()["cache-control"], "no-store");
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::header::{HeaderValue, CACHE_CONTROL};
use http::{Method, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::live::query_param;

const PUBLIC_READS: &str = "public, max-age=60, stale-while-revalidate=300";
const PRIVATE_READS: &str = "private, max-age=60, stale-while-revalidate=300";

/// Sets `Cache-Control` on stream responses. See the
/// [module docs](crate::cache_control).
#[derive(Debug, Clone)]
pub struct CacheControlLayer {
    reads: HeaderValue,
}

impl CacheControlLayer {
    /// A layer whose cacheable reads are `public, max-age=60,
    /// stale-while-revalidate=300`.
    pub fn new() -> Self {
        Self {
            reads: HeaderValue::from_static(PUBLIC_READS),
        }
    }

    /// Marks cacheable reads `private`, for streams with user-specific data.
    pub fn private(mut self) -> Self {
        self.reads = HeaderValue::from_static(PRIVATE_READS);
        self
    }

    /// Sets the `Cache-Control` of cacheable reads to `value`, such as
    /// `no-store` for streams that no cache may keep.
    pub fn reads(mut self, value: HeaderValue) -> Self {
        self.reads = value;
        self
    }
}

impl Default for CacheControlLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for CacheControlLayer {
    type Service = CacheControl<S>;

    fn layer(&self, inner: S) -> CacheControl<S> {
        CacheControl {
            inner,
            reads: self.reads.clone(),
        }
    }
}

/// Middleware that sets `Cache-Control` on stream responses. See the
/// [module docs](crate::cache_control).
#[derive(Debug, Clone)]
pub struct CacheControl<S> {
    inner: S,
    reads: HeaderValue,
}

impl<S> CacheControl<S> {
    /// A [`CacheControlLayer`] with the default read policy.
    pub fn layer() -> CacheControlLayer {
        CacheControlLayer::new()
    }
}

/// What kind of request a response answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Head,
    Sse,
    TailRead,
    Read,
    Other,
}

impl Kind {
    fn of<B>(request: &Request<B>) -> Self {
        match *request.method() {
            Method::HEAD => Kind::Head,
            Method::GET => {
                let uri = request.uri();
                if query_param(uri, "live").as_deref() == Some("sse") {
                    Kind::Sse
                } else if query_param(uri, "offset").as_deref() == Some("now") {
                    Kind::TailRead
                } else {
                    Kind::Read
                }
            }
            _ => Kind::Other,
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CacheControl<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        ResponseFuture {
            kind: Kind::of(&request),
            reads: self.reads.clone(),
            inner: self.inner.call(request),
        }
    }
}

pin_project! {
    /// The future of [`CacheControl`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        kind: Kind,
        reads: HeaderValue,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if !response.headers().contains_key(CACHE_CONTROL) {
            let cacheable = matches!(response.status(), StatusCode::OK | StatusCode::NOT_MODIFIED);
            let value = match *this.kind {
                Kind::Sse => HeaderValue::from_static("no-cache"),
                Kind::Read if cacheable => this.reads.clone(),
                _ => HeaderValue::from_static("no-store"),
            };
            response.headers_mut().insert(CACHE_CONTROL, value);
        }
        Poll::Ready(Ok(response))
    }
}
