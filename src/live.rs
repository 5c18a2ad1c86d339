//! The hand-off between a reader at the tail and whatever can tell it that
//! the tail moved.
//!
//! [`LongPollLayer`](crate::long_poll::LongPollLayer) and
//! [`SseLayer`](crate::sse::SseLayer) turn live reads into catch-up reads of
//! the service they wrap. They mark such requests with [`Subscribe`]; a
//! service that sees the mark and finds nothing new puts [`AtTail`] into the
//! response's extensions and, if the stream is open, a [`TailWait`]. The layer waits on it, then
//! reads again. Any service can take part, not only
//! [`DurableStreamsService`](crate::DurableStreamsService).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;

use crate::BoxFuture;

/// Request extension: the caller will wait at the tail if the response has
/// nothing new, so the service should attach a [`TailWait`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Subscribe;

/// Response extension: the read found no data, because it started at the
/// tail. A closed stream's response carries it alone; an open stream's also
/// carries a [`TailWait`] when the request was marked with [`Subscribe`].
#[derive(Clone, Copy, Debug, Default)]
pub struct AtTail;

/// Response extension: resolves once the stream's tail may have moved, the
/// stream was closed, or it was deleted.
///
/// It must be created before the tail is read, so that an append landing
/// between the read and the wait still wakes it. A spurious wake-up is
/// harmless: the reader reads again and waits again.
pub struct TailWait(Mutex<Pin<Box<dyn Future<Output = ()> + Send>>>);

impl TailWait {
    /// Wraps a future that completes when the tail may have moved.
    pub fn new<F>(future: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // The mutex only makes the wait `Sync`, as extensions require; it is
        // never locked, since polling has `&mut` access.
        Self(Mutex::new(Box::pin(future)))
    }
}

impl Future for TailWait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let future = self.0.get_mut().unwrap_or_else(PoisonError::into_inner);
        future.as_mut().poll(cx)
    }
}

impl fmt::Debug for TailWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TailWait").finish_non_exhaustive()
    }
}

// `http::Extensions` wants `Clone`. A wait is used once, by whoever takes it
// out of the response; a clone is an immediate wake-up, which the contract
// above allows.
impl Clone for TailWait {
    fn clone(&self) -> Self {
        Self::new(std::future::ready(()))
    }
}

/// What one read gave a live reader: the body as a catch-up read returns
/// it, and what the read's headers and extensions say.
pub(crate) struct LiveChunk {
    pub(crate) payload: Bytes,
    pub(crate) next_offset: String,
    pub(crate) up_to_date: bool,
    pub(crate) closed: bool,
    /// The read found nothing, because it started at the tail.
    pub(crate) at_tail: bool,
    pub(crate) wait: Option<TailWait>,
}

/// Response extension, between this crate's service and its SSE layer:
/// reads the same stream on from an offset without a new request.
///
/// An event stream reads again after every wake-up, for as long as its
/// client stays. Through the whole service each read parses a request and
/// formats a response that the layer then parses back; with this the layer
/// asks the storage directly. Other services do not attach it, and the
/// layer then reads through them as usual.
#[derive(Clone)]
pub(crate) struct ReadOn(Arc<ReadOnFn>);

type ReadOnFn = dyn Fn(&str) -> BoxFuture<Option<LiveChunk>> + Send + Sync;

impl ReadOn {
    pub(crate) fn new<F>(read: F) -> Self
    where
        F: Fn(&str) -> BoxFuture<Option<LiveChunk>> + Send + Sync + 'static,
    {
        Self(Arc::new(read))
    }

    /// Reads from `offset`; `None` when the stream cannot be read there
    /// any more (deleted, or the offset is not one of its positions).
    pub(crate) fn read(&self, offset: &str) -> BoxFuture<Option<LiveChunk>> {
        (self.0)(offset)
    }
}

impl fmt::Debug for ReadOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadOn").finish_non_exhaustive()
    }
}

pin_project_lite::pin_project! {
    /// The request body a live layer hands to the service it wraps: the
    /// client's body on the first read, nothing on each read after a wait.
    #[derive(Debug)]
    pub struct LiveRequestBody<B> {
        #[pin]
        inner: Option<B>,
    }
}

impl<B> LiveRequestBody<B> {
    pub(crate) fn new(body: B) -> Self {
        Self { inner: Some(body) }
    }

    pub(crate) fn empty() -> Self {
        Self { inner: None }
    }
}

impl<B: http_body::Body> http_body::Body for LiveRequestBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        match self.project().inner.as_pin_mut() {
            Some(body) => body.poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// The value of query parameter `name`, percent-decoded; the first if repeated.
pub(crate) fn query_param(uri: &http::Uri, name: &str) -> Option<String> {
    uri.query()?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| {
            percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .ok()
                .map(|v| v.into_owned())
        })
}

/// Whether `request` is a `GET` with `live=<mode>`.
pub(crate) fn is_live<B>(request: &http::Request<B>, mode: &str) -> bool {
    request.method() == http::Method::GET
        && query_param(request.uri(), "live").as_deref() == Some(mode)
}

/// `uri` with its `offset` parameter set to `offset`.
pub(crate) fn with_offset(uri: &http::Uri, offset: &str) -> http::Uri {
    let mut query: Vec<String> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some("offset"))
        .map(str::to_owned)
        .collect();
    query.push(format!("offset={offset}"));
    let path_and_query = format!("{}?{}", uri.path(), query.join("&"));
    let mut parts = uri.clone().into_parts();
    match path_and_query.parse() {
        Ok(pq) => parts.path_and_query = Some(pq),
        Err(_) => return uri.clone(),
    }
    http::Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

pin_project_lite::pin_project! {
    /// The response future of the live layers,
    /// [`long_poll::ResponseFuture`](crate::long_poll::ResponseFuture) and
    /// [`sse::ResponseFuture`](crate::sse::ResponseFuture): for a request that
    /// is not a live read, the inner service's future `F` with its body
    /// wrapped in `B`; for a live read, the boxed work of following the
    /// stream.
    pub struct LiveFuture<F, B, E> {
        #[pin]
        kind: LiveKind<F, B, E>,
    }
}

pin_project_lite::pin_project! {
    #[project = LiveKindProj]
    enum LiveKind<F, B, E> {
        Inner { #[pin] future: F },
        Live { future: crate::BoxFuture<Result<http::Response<B>, E>> },
    }
}

impl<F, B, E> LiveFuture<F, B, E> {
    /// Passes the inner service's future through.
    pub(crate) fn inner(future: F) -> Self {
        Self {
            kind: LiveKind::Inner { future },
        }
    }

    /// Runs a live read.
    pub(crate) fn live<L>(future: L) -> Self
    where
        L: Future<Output = Result<http::Response<B>, E>> + Send + 'static,
    {
        Self {
            kind: LiveKind::Live {
                future: Box::pin(future),
            },
        }
    }
}

impl<F, B, E, ResBody> Future for LiveFuture<F, B, E>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
    B: From<ResBody>,
{
    type Output = Result<http::Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            LiveKindProj::Inner { future } => future
                .poll(cx)
                .map(|result| result.map(|response| response.map(B::from))),
            LiveKindProj::Live { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, B, E> fmt::Debug for LiveFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveFuture").finish_non_exhaustive()
    }
}
