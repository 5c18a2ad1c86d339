use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Request, Response, StatusCode};
use tower::ServiceExt;
use tower_service::Service;

use super::ResponseBody;
use crate::cursor::next_cursor;
use crate::headers as h;
use crate::live::{self, AtTail, LiveFuture, LiveRequestBody, Subscribe, TailWait};
use crate::service::response::{insert, set_true};

/// Middleware that serves `live=long-poll` reads. See the
/// [module docs](crate::long_poll).
#[derive(Debug, Clone)]
pub struct LongPoll<S> {
    inner: S,
    timeout: Duration,
}

impl<S> LongPoll<S> {
    /// Wraps `inner`, waiting up to `timeout` for data.
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout }
    }

    /// A [`LongPollLayer`](super::LongPollLayer) with the default timeout.
    pub fn layer() -> super::LongPollLayer {
        super::LongPollLayer::new()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for LongPoll<S>
where
    S: Service<Request<LiveRequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Send,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if !live::is_live(&request, "long-poll") {
            return LiveFuture::inner(self.inner.call(request.map(LiveRequestBody::new)));
        }
        // Take the service that was driven to readiness; leave a clone.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let (parts, _) = request.into_parts();
        LiveFuture::live(long_poll(inner, parts, self.timeout))
    }
}

async fn long_poll<S, ReqBody, ResBody>(
    mut inner: S,
    mut parts: http::request::Parts,
    timeout: Duration,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<LiveRequestBody<ReqBody>>, Response = Response<ResBody>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let echoed = live::query_param(&parts.uri, "cursor");
    parts.extensions.insert(Subscribe);
    let mut ready = true;
    loop {
        let request = Request::from_parts(parts.clone(), LiveRequestBody::empty());
        let mut response = if ready {
            ready = false;
            inner.call(request).await?
        } else {
            (&mut inner).oneshot(request).await?
        };
        let at_tail = response.extensions().get::<AtTail>().is_some();
        let Some(wait) = response.extensions_mut().remove::<TailWait>() else {
            if at_tail {
                // Closed at the tail: end of stream, at once.
                return Ok(no_content(&response, echoed.as_deref()));
            }
            if matches!(response.status(), StatusCode::OK | StatusCode::NOT_MODIFIED) {
                add_cursor(response.headers_mut(), echoed.as_deref());
            }
            return Ok(response.map(ResponseBody::inner));
        };
        tokio::select! {
            () = wait => {
                let next = response.headers().get(h::STREAM_NEXT_OFFSET);
                if let Some(next) = next.and_then(|n| n.to_str().ok()) {
                    parts.uri = live::with_offset(&parts.uri, next);
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                return Ok(no_content(&response, echoed.as_deref()));
            }
        }
    }
}

/// `204 No Content` for a read that found nothing: the tail, up to date,
/// closure, the cursor, and the inner service's response-wide headers
/// (security, CORS).
fn no_content<A, B>(at_tail: &Response<A>, echoed: Option<&str>) -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    for (name, value) in at_tail.headers() {
        let n = name.as_str();
        // Headers about the read's body, or its cacheability, are not the
        // 204's.
        let body_header = n.starts_with("content-") || n == "etag" || n == "cache-control";
        if !body_header && n != h::STREAM_CURSOR.as_str() {
            headers.append(name.clone(), value.clone());
        }
    }
    set_true(headers, h::STREAM_UP_TO_DATE);
    add_cursor(headers, echoed);
    response
}

fn add_cursor(headers: &mut HeaderMap, echoed: Option<&str>) {
    if !headers.contains_key(h::STREAM_CLOSED) {
        insert(
            headers,
            h::STREAM_CURSOR,
            next_cursor(SystemTime::now(), echoed),
        );
    }
}

/// The future of [`LongPoll`].
pub type ResponseFuture<F, B, E> = LiveFuture<F, ResponseBody<B>, E>;
