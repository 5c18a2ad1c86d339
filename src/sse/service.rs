use std::fmt;
use std::marker::PhantomData;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_service::Service;

use super::body::{Next, ResponseBody, SseBody, Step};
use super::encode::{control_event, data_event, Control};
use crate::cursor::next_cursor;
use crate::headers as h;
use crate::live::{
    self, AtTail, LiveChunk, LiveFuture, LiveRequestBody, ReadOn, Subscribe, TailWait,
};
use crate::stream::ContentType;
use crate::BoxError;

/// Middleware that serves `live=sse` reads. See the [module docs](crate::sse).
#[derive(Debug, Clone)]
pub struct Sse<S> {
    inner: S,
    connection_lifetime: Duration,
}

impl<S> Sse<S> {
    /// Wraps `inner`, ending each connection after `connection_lifetime`.
    pub fn new(inner: S, connection_lifetime: Duration) -> Self {
        Self {
            inner,
            connection_lifetime,
        }
    }

    /// An [`SseLayer`](super::SseLayer) with the default connection lifetime.
    pub fn layer() -> super::SseLayer {
        super::SseLayer::new()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Sse<S>
where
    S: Service<Request<LiveRequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: fmt::Display + Send,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let inner_body = ResponseBody::inner;
        if !live::is_live(&request, "sse") {
            return LiveFuture::inner(self.inner.call(request.map(LiveRequestBody::new)));
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (mut parts, _) = request.into_parts();
        parts.extensions.insert(Subscribe);
        // An event stream is never `304 Not Modified`: the first read must
        // be a body the events can start from.
        parts.headers.remove(header::IF_NONE_MATCH);
        let deadline = Instant::now() + self.connection_lifetime;
        LiveFuture::live(async move {
            let request = Request::from_parts(parts.clone(), LiveRequestBody::empty());
            let first = inner.call(request).await?;
            if first.status() != StatusCode::OK {
                return Ok(first.map(inner_body));
            }
            Ok(start(inner, parts, first, deadline))
        })
    }
}

/// Turns the first successful read into the event-stream response.
fn start<S, ReqBody, ResBody>(
    inner: S,
    parts: Parts,
    first: Response<ResBody>,
    deadline: Instant,
) -> Response<ResponseBody<ResBody>>
where
    S: Service<Request<LiveRequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    S::Error: fmt::Display + Send,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let content_type = first
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(ContentType::parse)
        .unwrap_or_default();
    let echoed = live::query_param(&parts.uri, "cursor");
    let mut response = Response::new(());
    for (name, value) in first.headers() {
        let n = name.as_str();
        if !(n.starts_with("stream-") || n.starts_with("content-") || n == "etag") {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if !content_type.is_sse_text() {
        headers.insert(
            h::STREAM_SSE_DATA_ENCODING,
            HeaderValue::from_static("base64"),
        );
    }
    let events = Events {
        inner,
        _request: PhantomData,
        parts,
        offset: None,
        pending: Some(first),
        read_on: None,
        wait: None,
        lifetime: Box::pin(tokio::time::sleep_until(deadline)),
        cursor: next_cursor(SystemTime::now(), echoed.as_deref()),
        json: content_type.is_json(),
        base64: !content_type.is_sse_text(),
        sent_control: false,
    };
    response.map(|()| ResponseBody::events(SseBody::new(events.step())))
}

/// The state of one event stream between frames.
struct Events<S, ReqBody, ResBody> {
    inner: S,
    _request: PhantomData<fn() -> ReqBody>,
    parts: Parts,
    offset: Option<String>,
    pending: Option<Response<ResBody>>,
    /// The inner service's shortcut for reading on, when it offers one.
    read_on: Option<ReadOn>,
    wait: Option<TailWait>,
    /// Fires when the connection's lifetime is over. One timer for the
    /// connection's life, rather than a new one each time it waits at the
    /// tail.
    lifetime: std::pin::Pin<Box<tokio::time::Sleep>>,
    cursor: u64,
    json: bool,
    base64: bool,
    sent_control: bool,
}

impl<S, ReqBody, ResBody> Events<S, ReqBody, ResBody>
where
    S: Service<Request<LiveRequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    S::Error: fmt::Display + Send,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    /// Reads until there are events to send, waiting at the tail as needed.
    /// `None` ends the stream.
    fn step(self) -> Step {
        Box::pin(self.next())
    }

    async fn next(mut self) -> Option<(Bytes, Option<Next>)> {
        loop {
            if let Some(wait) = self.wait.take() {
                tokio::select! {
                    () = wait => {}
                    () = &mut self.lifetime => return None,
                }
            }
            if self.sent_control && Instant::now() >= self.lifetime.deadline() {
                return None;
            }
            // Following the stream through the inner service's shortcut is
            // the common step, and its future is already boxed; the other
            // reads are boxed here, so that the future of a stream waiting at
            // the tail, which every open connection holds, stays small.
            let shortcut = match (&self.pending, &self.read_on, &self.offset) {
                (None, Some(read_on), Some(offset)) => Some(read_on.read(offset)),
                _ => None,
            };
            let chunk = match shortcut {
                Some(read) => read.await,
                None => Box::pin(self.read()).await,
            }?;
            let has_data = !chunk.at_tail
                && if self.json {
                    chunk.payload.trim_ascii() != b"[]"
                } else {
                    !chunk.payload.is_empty()
                };

            let mut out = BytesMut::new();
            if has_data {
                data_event(&mut out, &chunk.payload, self.base64);
            }
            if has_data || chunk.closed || !self.sent_control {
                let cursor = self.cursor.max(next_cursor(SystemTime::now(), None));
                control_event(
                    &mut out,
                    &Control {
                        next_offset: &chunk.next_offset,
                        cursor: (!chunk.closed).then_some(cursor),
                        up_to_date: chunk.up_to_date,
                        closed: chunk.closed,
                    },
                );
                self.sent_control = true;
            }
            self.offset = Some(chunk.next_offset);
            if chunk.closed {
                return Some((out.freeze(), None));
            }
            if chunk.wait.is_none() && !has_data {
                // The inner service cannot wait and has nothing more: end
                // rather than spin; the client reconnects.
                return (!out.is_empty()).then(|| (out.freeze(), None));
            }
            self.wait = chunk.wait;
            if !out.is_empty() {
                return Some((out.freeze(), Some(Next(self.step()))));
            }
        }
    }

    /// The next read when there is no shortcut to take: the first
    /// response, else a new request through the inner service.
    async fn read(&mut self) -> Option<LiveChunk> {
        if let Some(response) = self.pending.take() {
            return self.unpack(response).await;
        }
        let mut parts = self.parts.clone();
        if let Some(offset) = &self.offset {
            parts.uri = live::with_offset(&parts.uri, offset);
        }
        let request = Request::from_parts(parts, LiveRequestBody::empty());
        match (&mut self.inner).oneshot(request).await {
            Ok(response) => self.unpack(response).await,
            Err(e) => {
                tracing::debug!(error = %e, "sse read failed");
                None
            }
        }
    }

    /// What a successful read response says; `None` for any other.
    async fn unpack(&mut self, response: Response<ResBody>) -> Option<LiveChunk> {
        if response.status() != StatusCode::OK {
            return None;
        }
        let (mut head, body) = response.into_parts();
        if let Some(read_on) = head.extensions.remove::<ReadOn>() {
            self.read_on = Some(read_on);
        }
        let next_offset = head
            .headers
            .get(h::STREAM_NEXT_OFFSET)?
            .to_str()
            .ok()?
            .to_owned();
        let payload = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                tracing::debug!(error = %e.into(), "sse read body failed");
                return None;
            }
        };
        Some(LiveChunk {
            payload,
            next_offset,
            up_to_date: head.headers.contains_key(h::STREAM_UP_TO_DATE),
            closed: head.headers.contains_key(h::STREAM_CLOSED),
            at_tail: head.extensions.get::<AtTail>().is_some(),
            wait: head.extensions.remove::<TailWait>(),
        })
    }
}

/// The future of [`Sse`].
pub type ResponseFuture<F, B, E> = LiveFuture<F, ResponseBody<B>, E>;
