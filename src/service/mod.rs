//! [`DurableStreamsService`]: the protocol's stream operations as a tower
//! [`Service`].
//!
//! It answers `PUT` (create), `POST` (append and close), `GET` (catch-up
//! reads), `HEAD`, `DELETE` and CORS preflights for every stream below its
//! mount prefix. Live reads are added by wrapping it in
//! [`LongPollLayer`](crate::long_poll::LongPollLayer) and
//! [`SseLayer`](crate::sse::SseLayer), and caching headers by
//! [`CacheControlLayer`](crate::cache_control::CacheControlLayer); without
//! them a `live=` read is refused with `400`.
//!
//! Every failure becomes a response: the service's error type is
//! [`Infallible`].

mod request;
pub(crate) mod response;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_service::Service;

#[cfg(feature = "subscriptions")]
pub(crate) use self::request::stream_key;
use self::request::ReadQuery;
pub(crate) use self::request::Refusal;
use self::response as resp;
use crate::body::Body;
use crate::headers as h;
use crate::json;
use crate::live::{AtTail, LiveChunk, ReadOn, Subscribe};
use crate::offset::{Offset, ReadFrom};
use crate::storage::{
    rules, Append, AppendOutcome, Create, Read, ReadResult, StorageRequest, StorageResponse,
};
use crate::{BoxError, BoxFuture};

/// The default largest request body: 16 MiB.
pub const DEFAULT_MAX_BODY_SIZE: usize = 16 * 1024 * 1024;
/// The default longest wait for the next part of a request body: 30 seconds.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// The default most bytes one catch-up read returns: 1 MiB.
pub const DEFAULT_MAX_READ_BYTES: usize = 1024 * 1024;
/// The largest body of a `__ds` control request.
const MAX_CONTROL_BODY: usize = 1024 * 1024;
/// The slowest average rate, in bytes a second, at which a request body may
/// arrive once it has taken longer than the body timeout.
const MIN_BODY_RATE: f64 = 1024.0;
/// The most of a refused body read and dropped so the client sees the `413`.
const MAX_DISCARD: usize = 64 * 1024 * 1024;
/// The longest time spent dropping a refused body.
const DISCARD_TIME: Duration = Duration::from_secs(5);

/// The Durable Streams protocol over a storage backend `S`.
///
/// `S` is any [`Service`] from [`StorageRequest`] to [`StorageResponse`],
/// such as [`MemoryStorage`](crate::storage::MemoryStorage), possibly wrapped
/// in tower middleware. It is cloned for each request.
///
/// # Example
///
/// ```
/// use http::{Request, StatusCode};
/// use tower::ServiceExt;
/// use tower_durable_streams::{DurableStreamsService, storage::MemoryStorage};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let service = DurableStreamsService::new(MemoryStorage::new()).prefix("/v1/stream");
///
/// let create = Request::put("/v1/stream/chat")
///     .header("content-type", "text/plain")
///     .body(String::from("hello"))
///     .unwrap();
/// let response = service.clone().oneshot(create).await.unwrap();
/// assert_eq!(response.status(), StatusCode::CREATED);
/// assert!(response.headers().contains_key("stream-next-offset"));
/// # }
/// ```
#[derive(Clone)]
pub struct DurableStreamsService<S> {
    storage: S,
    config: Arc<Config>,
    control: Option<Arc<dyn Control>>,
}

/// The reserved `__ds` control plane, as the service sees it: it answers
/// requests below `__ds/` and hears of every stream change.
pub(crate) trait Control: Send + Sync + 'static {
    /// Answers a request below `__ds/`.
    fn handle(&self, request: ControlRequest) -> BoxFuture<Response<Body>>;
    /// A stream was created or appended to; `tail` is its new tail.
    fn observe(&self, path: &str, tail: Offset);
    /// A stream was deleted.
    fn forget(&self, path: &str);
}

/// A request below `__ds/`, its body already read.
#[cfg_attr(not(feature = "subscriptions"), allow(dead_code))]
pub(crate) struct ControlRequest {
    pub(crate) method: Method,
    /// The path below `__ds/`, canonical.
    pub(crate) path: String,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// The absolute URL of the stream root, as this request reached it.
    pub(crate) root: String,
}

#[derive(Debug, Clone)]
struct Config {
    /// Stripped from request paths.
    prefix: String,
    /// Where streams are as clients address them: in `Stream-Forked-From`
    /// and `Location`.
    public_prefix: String,
    max_body_size: usize,
    max_read_bytes: usize,
    body_timeout: Duration,
    cors: bool,
}

impl<S> DurableStreamsService<S> {
    /// Serves the streams of `storage`, each at the request path (no prefix).
    pub fn new(storage: S) -> Self {
        Self {
            storage,
            config: Arc::new(Config {
                prefix: String::new(),
                public_prefix: String::new(),
                max_body_size: DEFAULT_MAX_BODY_SIZE,
                max_read_bytes: DEFAULT_MAX_READ_BYTES,
                body_timeout: DEFAULT_BODY_TIMEOUT,
                cors: true,
            }),
            control: None,
        }
    }

    /// The path below which streams live, such as `/v1/stream` (a missing
    /// leading slash is added). A stream's name is the rest of the request
    /// path; other paths get `404`. `Stream-Forked-From` names sources by
    /// the same full path. Default is no prefix.
    ///
    /// For a router that strips its prefix before calling the service
    /// (axum's `nest_service`), use [`mounted_at`](Self::mounted_at) instead.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix = normalize_prefix(&prefix.into());
        let config = Arc::make_mut(&mut self.config);
        config.prefix = prefix.clone();
        config.public_prefix = prefix;
        self
    }

    /// The path a router has mounted the service at, when the router strips
    /// it before the service sees the request (axum's `nest_service`). The
    /// request path is then the stream's name as is, while
    /// `Stream-Forked-From` and `Location` use the full public path:
    ///
    /// ```
    /// # use tower_durable_streams::{DurableStreamsService, MemoryStorage};
    /// // axum::Router::new().nest_service("/streams", service)
    /// let service = DurableStreamsService::new(MemoryStorage::new()).mounted_at("/streams");
    /// ```
    pub fn mounted_at(mut self, path: impl Into<String>) -> Self {
        let config = Arc::make_mut(&mut self.config);
        config.prefix = String::new();
        config.public_prefix = normalize_prefix(&path.into());
        self
    }

    /// The largest request body accepted; larger ones get `413`. Default is
    /// 16 MiB.
    pub fn max_body_size(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.config).max_body_size = bytes;
        self
    }

    /// How many bytes one catch-up read gathers before it stops at a record
    /// boundary. A single larger record is still returned whole. Default is
    /// 1 MiB.
    pub fn max_read_bytes(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.config).max_read_bytes = bytes.max(1);
        self
    }

    /// How long to wait for the next part of a request body before giving up
    /// with `408 Request Timeout`, so a client that stalls mid-upload cannot
    /// hold its buffer forever. A body still arriving after this long must
    /// have come at 1 KiB a second on average, or it gets the same `408`.
    /// Default is 30 seconds.
    pub fn body_timeout(mut self, timeout: Duration) -> Self {
        Arc::make_mut(&mut self.config).body_timeout = timeout;
        self
    }

    /// Whether to answer CORS preflights and add `Access-Control-*` headers
    /// that let any origin read. Turn it off when tower-http's `CorsLayer`
    /// (or a proxy) handles CORS. Default is on.
    pub fn cors(mut self, enabled: bool) -> Self {
        Arc::make_mut(&mut self.config).cors = enabled;
        self
    }
}

#[cfg(feature = "subscriptions")]
impl<S> DurableStreamsService<S>
where
    S: Service<StorageRequest, Response = StorageResponse> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    /// Serves the reserved `__ds` subscription APIs, keeping their state in
    /// this service's storage. Without it, `__ds` paths get `404`. See
    /// [`subscription`](crate::subscription).
    ///
    /// Call it after [`prefix`](Self::prefix) or
    /// [`mounted_at`](Self::mounted_at) and inside a Tokio runtime, so that
    /// scheduled work (webhook retries, lease expiry) resumes at once after
    /// a restart; otherwise it starts with the first request.
    pub fn subscriptions(mut self, subscriptions: crate::subscription::Subscriptions) -> Self {
        self.control = Some(subscriptions.build(self.storage.clone()));
        self
    }
}

impl<S: fmt::Debug> fmt::Debug for DurableStreamsService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableStreamsService")
            .field("storage", &self.storage)
            .field("prefix", &self.config.prefix)
            .finish_non_exhaustive()
    }
}

impl<S, B> Service<Request<B>> for DurableStreamsService<S>
where
    S: Service<StorageRequest, Response = StorageResponse> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: HttpBody + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Storage readiness is awaited per request, inside the future.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> ResponseFuture {
        let handler = Handler {
            storage: self.storage.clone(),
            config: self.config.clone(),
            control: self.control.clone(),
        };
        let (parts, body) = request.into_parts();
        let is_head = parts.method == Method::HEAD;
        // Requests answered without storage are answered here; the others
        // box only their own method's future, which holds only what that
        // method needs.
        let state = if parts.method == Method::OPTIONS && self.config.cors {
            State::Ready(Some(Ok(resp::preflight())))
        } else {
            match handler.route(parts, body) {
                Ok(future) => State::Waiting(future),
                Err(refusal) => State::Ready(Some(Err(refusal))),
            }
        };
        ResponseFuture {
            state,
            cors: self.config.cors,
            is_head,
        }
    }
}

/// The future of [`DurableStreamsService`].
pub struct ResponseFuture {
    state: State,
    cors: bool,
    is_head: bool,
}

enum State {
    Ready(Option<Outcome>),
    Waiting(BoxFuture<Outcome>),
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let outcome = match &mut self.state {
            State::Ready(outcome) => outcome.take().expect("polled after completion"),
            State::Waiting(future) => std::task::ready!(future.as_mut().poll(cx)),
        };
        let mut response = outcome.unwrap_or_else(resp::refusal);
        if self.is_head {
            *response.body_mut() = Body::empty();
        }
        resp::common(response.headers_mut(), self.cors);
        Poll::Ready(Ok(response))
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

struct Handler<S> {
    storage: S,
    config: Arc<Config>,
    control: Option<Arc<dyn Control>>,
}

type Outcome = Result<Response<Body>, Refusal>;

impl<S> Handler<S>
where
    S: Service<StorageRequest, Response = StorageResponse> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    /// The future that answers a request, or its refusal when the request
    /// is refused before any storage is asked.
    fn route<B>(self, parts: Parts, body: B) -> Result<BoxFuture<Outcome>, Refusal>
    where
        B: HttpBody + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let path = request::stream_key(parts.uri.path(), &self.config.prefix)?;
        if path == "__ds" || path.starts_with("__ds/") {
            return Ok(Box::pin(self.control(path, parts, body)));
        }
        match parts.method {
            Method::PUT => Ok(Box::pin(self.create(path, parts, body))),
            Method::POST => self.append(path, &parts.headers, body),
            Method::GET => self.read(path, &parts),
            Method::HEAD => Ok(Box::pin(self.head(path))),
            Method::DELETE => Ok(Box::pin(self.delete(path))),
            _ => Err(Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed",
            )),
        }
    }

    /// Hands a `__ds` request to the control plane.
    async fn control<B>(self, path: String, parts: Parts, body: B) -> Outcome
    where
        B: HttpBody + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let Some(control) = &self.control else {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "reserved for subscriptions, which this server does not offer",
            ));
        };
        let config = Config {
            max_body_size: self.config.max_body_size.min(MAX_CONTROL_BODY),
            ..(*self.config).clone()
        };
        let body = read_body(body, &parts.headers, &config).await?;
        let root = location(&parts, &self.config.public_prefix);
        let path = path.strip_prefix("__ds").unwrap_or_default();
        let request = ControlRequest {
            path: path.strip_prefix('/').unwrap_or(path).to_owned(),
            method: parts.method,
            headers: parts.headers,
            body,
            root,
        };
        Ok(control.handle(request).await)
    }

    async fn call(mut self, request: StorageRequest) -> Result<StorageResponse, Response<Body>> {
        let storage_error = |e: S::Error| resp::storage_error(e.into());
        std::future::poll_fn(|cx| self.storage.poll_ready(cx))
            .await
            .map_err(storage_error)?;
        self.storage.call(request).await.map_err(storage_error)
    }

    async fn create<B>(self, path: String, parts: Parts, body: B) -> Outcome
    where
        B: HttpBody + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let config = request::create_config(&parts.headers, &self.config.public_prefix)?;
        let body = read_body(body, &parts.headers, &self.config).await?;
        let location_path = format!("{}/{}", self.config.public_prefix, path);
        let hook = self.control.clone().map(|control| (control, path.clone()));
        let create = Create {
            path,
            config,
            body,
            now: SystemTime::now(),
        };
        let (created, info) = match self.call(StorageRequest::Create(create)).await {
            Ok(StorageResponse::Created { created, info }) => (created, info),
            Ok(other) => return Ok(unexpected(&other)),
            Err(response) => return Ok(response),
        };
        if let Some((control, path)) = hook.filter(|_| created) {
            control.observe(&path, info.tail);
        }
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        let mut response = resp::with_status(status, Body::empty());
        let headers = response.headers_mut();
        resp::describe(headers, &info);
        if created {
            resp::insert(headers, header::LOCATION, location(&parts, &location_path));
        }
        Ok(response)
    }

    /// An append or close. The headers are checked before the body is
    /// read, and the future keeps only what it needs of them.
    fn append<B>(
        self,
        path: String,
        headers: &HeaderMap,
        body: B,
    ) -> Result<BoxFuture<Outcome>, Refusal>
    where
        B: HttpBody + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let close = h::closed_flag(headers);
        let producer = request::producer(headers)?;
        let stream_seq = request::stream_seq(headers)?;
        // With no body the request can only be a close, and its Content-Type
        // (often a client library's default) is ignored; so a bad one only
        // counts once there is a body.
        let content_type = request::content_type(headers);
        let body_read = BodyRead::new(headers, &self.config)?;
        Ok(Box::pin(async move {
            let body = body_read.collect(body).await?;
            let content_type = if body.is_empty() {
                if !close {
                    return Err(Refusal::bad_request("empty body"));
                }
                None
            } else {
                Some(content_type?.ok_or_else(|| Refusal::bad_request("missing Content-Type"))?)
            };
            let records = match &content_type {
                Some(ct) => rules::records(ct, body, false),
                None => Ok(Vec::new()),
            };
            let hook = self.control.clone().map(|control| (control, path.clone()));
            let append = Append {
                path,
                content_type,
                records,
                close,
                stream_seq,
                producer,
                now: SystemTime::now(),
            };
            let appended = match self.call(StorageRequest::Append(append)).await {
                Ok(StorageResponse::Appended(appended)) => appended,
                Ok(other) => return Ok(unexpected(&other)),
                Err(response) => return Ok(response),
            };
            if let Some((control, path)) = hook.filter(|_| appended.appended) {
                control.observe(&path, appended.info.tail);
            }
            let (status, producer) = match appended.outcome {
                AppendOutcome::Written { producer: None } | AppendOutcome::AlreadyClosed => {
                    (StatusCode::NO_CONTENT, None)
                }
                // New data from a producer is 200; a producer's close-only is 204.
                AppendOutcome::Written { producer } if appended.appended => {
                    (StatusCode::OK, producer)
                }
                AppendOutcome::Written { producer } => (StatusCode::NO_CONTENT, producer),
                AppendOutcome::Duplicate { producer } => (StatusCode::NO_CONTENT, Some(producer)),
            };
            let mut response = resp::with_status(status, Body::empty());
            let headers = response.headers_mut();
            resp::next_offset(headers, appended.info.tail, appended.info.closed);
            if let Some(producer) = producer {
                resp::insert(headers, h::PRODUCER_EPOCH, producer.epoch);
                resp::insert(headers, h::PRODUCER_SEQ, producer.last_seq);
            }
            Ok(response)
        }))
    }

    /// A catch-up read, or one step of a live read for the layers. The
    /// query is checked before anything is boxed, and the future keeps only
    /// the `If-None-Match` values of the request.
    fn read(self, path: String, parts: &Parts) -> Result<BoxFuture<Outcome>, Refusal> {
        let query = ReadQuery::parse(parts.uri.query())?;
        let from = query.from()?;
        let subscribe = parts.extensions.get::<Subscribe>().is_some();
        match query.live.as_deref() {
            None => {}
            Some(mode @ ("long-poll" | "sse")) => {
                if query.offset.is_none() {
                    return Err(Refusal::bad_request("live reads need an offset"));
                }
                if !subscribe {
                    return Err(Refusal::bad_request(format!("live={mode} is not enabled")));
                }
            }
            Some(_) => return Err(Refusal::bad_request("unknown live mode")),
        }
        let read_on =
            (subscribe && query.live.as_deref() == Some("sse")).then(|| self.read_on(path.clone()));
        let if_none_match: Vec<HeaderValue> = parts
            .headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .cloned()
            .collect();
        let read = Read {
            path,
            from,
            max_bytes: self.config.max_read_bytes,
            subscribe,
            now: SystemTime::now(),
        };
        Ok(Box::pin(async move {
            let result = match self.call(StorageRequest::Read(read)).await {
                Ok(StorageResponse::Read(result)) => result,
                Ok(other) => return Ok(unexpected(&other)),
                Err(response) => return Ok(response),
            };
            Ok(read_response(
                result,
                from,
                subscribe,
                &if_none_match,
                read_on,
            ))
        }))
    }

    /// Reads of `path` from later offsets, for the SSE layer to follow the
    /// stream with.
    fn read_on(&self, path: String) -> ReadOn {
        let storage = std::sync::Mutex::new(self.storage.clone());
        let max_bytes = self.config.max_read_bytes;
        ReadOn::new(move |offset| {
            let storage = storage
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let read = offset.parse().ok().map(|at| Read {
                path: path.clone(),
                from: ReadFrom::At(at),
                max_bytes,
                subscribe: true,
                now: SystemTime::now(),
            });
            Box::pin(async move {
                match storage.oneshot(StorageRequest::Read(read?)).await {
                    Ok(StorageResponse::Read(result)) => Some(live_chunk(result)),
                    Ok(_) => None,
                    Err(e) => {
                        tracing::debug!(error = %e.into(), "live read failed");
                        None
                    }
                }
            })
        })
    }

    async fn head(self, path: String) -> Outcome {
        let info = match self.call(StorageRequest::Head { path }).await {
            Ok(StorageResponse::Head(info)) => info,
            Ok(other) => return Ok(unexpected(&other)),
            Err(response) => return Ok(response),
        };
        let mut response = resp::with_status(StatusCode::OK, Body::empty());
        let headers = response.headers_mut();
        resp::describe(headers, &info);
        resp::expiry(headers, info.expiry);
        Ok(response)
    }

    async fn delete(self, path: String) -> Outcome {
        let hook = self.control.clone().map(|control| (control, path.clone()));
        match self.call(StorageRequest::Delete { path }).await {
            Ok(StorageResponse::Deleted) => {
                if let Some((control, path)) = hook {
                    control.forget(&path);
                }
                Ok(resp::with_status(StatusCode::NO_CONTENT, Body::empty()))
            }
            Ok(other) => Ok(unexpected(&other)),
            Err(response) => Ok(response),
        }
    }
}

/// The response to a read: its records, where it ended, and for the live
/// layers whether it waits at the tail.
fn read_response(
    result: ReadResult,
    from: ReadFrom,
    subscribe: bool,
    if_none_match: &[HeaderValue],
    read_on: Option<ReadOn>,
) -> Response<Body> {
    let up_to_date = result.up_to_date();
    let closed = result.info.closed && up_to_date;
    let body = if result.info.content_type.is_json() {
        Body::new(json::array(&result.records))
    } else {
        Body::from_chunks(result.records.iter().cloned())
    };
    let mut response = resp::with_status(StatusCode::OK, body);
    let headers = response.headers_mut();
    // Room for these and the common headers, so the map never regrows.
    headers.reserve(12);
    resp::insert(
        headers,
        header::CONTENT_TYPE,
        result.info.content_type.as_str(),
    );
    resp::next_offset(headers, result.next, closed);
    if up_to_date {
        resp::set_true(headers, h::STREAM_UP_TO_DATE);
    }
    if from != ReadFrom::Now {
        let etag = etag(&result, closed);
        if if_none_match_hits(if_none_match, &etag) {
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            *response.body_mut() = Body::empty();
            response.headers_mut().remove(header::CONTENT_TYPE);
        }
        resp::insert(response.headers_mut(), header::ETAG, etag);
    }
    if subscribe && result.records.is_empty() && result.next == result.start {
        response.extensions_mut().insert(AtTail);
    }
    if let Some(wait) = result.wait {
        response.extensions_mut().insert(wait);
    }
    if let Some(read_on) = read_on {
        response.extensions_mut().insert(read_on);
    }
    response
}

/// The entity tag of a read: the stream's incarnation and the range read.
fn etag(result: &ReadResult, closed: bool) -> String {
    use std::fmt::Write;
    let mut etag = String::with_capacity(96);
    let _ = write!(
        etag,
        "\"{}:{}:{}{}\"",
        result.info.id,
        result.start,
        result.next,
        if closed { ":c" } else { "" }
    );
    etag
}

/// A backend answered with the wrong kind of response.
/// A read's result as the SSE layer takes it.
fn live_chunk(result: ReadResult) -> LiveChunk {
    let up_to_date = result.up_to_date();
    let payload = if result.info.content_type.is_json() {
        json::array(&result.records)
    } else if let [record] = &result.records[..] {
        record.clone()
    } else {
        result.records.concat().into()
    };
    LiveChunk {
        payload,
        next_offset: result.next.to_string(),
        up_to_date,
        closed: result.info.closed && up_to_date,
        at_tail: result.records.is_empty() && result.next == result.start,
        wait: result.wait,
    }
}

fn unexpected(response: &StorageResponse) -> Response<Body> {
    tracing::error!(
        ?response,
        "storage backend answered with the wrong response kind"
    );
    resp::with_status(
        StatusCode::INTERNAL_SERVER_ERROR,
        Body::from("storage failure"),
    )
}

/// The absolute URL of the stream a request created.
fn location(parts: &Parts, path: &str) -> String {
    // Only a well-formed authority goes into the URL: a Host header such as
    // `evil.example/phish?` must not shape it.
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .filter(|h| h.parse::<http::uri::Authority>().is_ok());
    let Some(host) = host else {
        return path.to_owned();
    };
    let scheme = parts
        .uri
        .scheme_str()
        .or_else(|| {
            parts
                .headers
                .get("x-forwarded-proto")
                .and_then(|p| p.to_str().ok())
                .filter(|p| *p == "https" || *p == "http")
        })
        .unwrap_or("http");
    format!("{scheme}://{host}{path}")
}

/// `/a/b` for `a/b/`, `/a/b` or `a/b`; empty for `/` or nothing.
fn normalize_prefix(prefix: &str) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        String::new()
    } else {
        format!("/{prefix}")
    }
}

fn if_none_match_hits(values: &[HeaderValue], etag: &str) -> bool {
    values
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == etag || tag == "*")
}

/// Collects a request body, refusing more than `limit` bytes with `413`.
async fn read_body<B>(body: B, headers: &HeaderMap, config: &Config) -> Result<Bytes, Refusal>
where
    B: HttpBody,
    B::Error: Into<BoxError>,
{
    BodyRead::new(headers, config)?.collect(body).await
}

/// How a request body is to be read, from its headers and the service's
/// limits.
struct BodyRead {
    limit: usize,
    declared: Option<u64>,
    timeout: Duration,
    expects_continue: bool,
}

impl BodyRead {
    /// Refuses bodies the service cannot store as sent: compressed ones
    /// with `415` (offsets count decoded bytes, and the server does not
    /// decode), other transfer codings with `501`.
    fn new(headers: &HeaderMap, config: &Config) -> Result<Self, Refusal> {
        let encoded = headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"));
        if encoded {
            return Err(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Content-Encoding is not supported",
            ));
        }
        // The connection undoes `chunked` only; the body under any other
        // transfer coding would be stored still coded (RFC 9112 section 6.1).
        let transfer_coded = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .any(|coding| {
                !coding.eq_ignore_ascii_case(b"chunked")
                    && !coding.eq_ignore_ascii_case(b"identity")
            });
        if transfer_coded {
            return Err(Refusal::new(
                StatusCode::NOT_IMPLEMENTED,
                "only the chunked Transfer-Encoding is supported",
            ));
        }
        Ok(Self {
            limit: config.max_body_size,
            declared: headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok()),
            timeout: config.body_timeout,
            expects_continue: expects_continue(headers),
        })
    }

    async fn collect<B>(self, body: B) -> Result<Bytes, Refusal>
    where
        B: HttpBody,
        B::Error: Into<BoxError>,
    {
        let mut body = std::pin::pin!(body);
        match self.collect_within(body.as_mut()).await {
            Err(refusal) if refusal.status == StatusCode::PAYLOAD_TOO_LARGE => {
                // A client that is still sending cannot read the answer once
                // the connection is reset under it, so take (a bounded
                // amount of) the rest first. One waiting for `100 Continue`
                // has sent nothing, and polling would ask it to.
                if !self.expects_continue {
                    discard(body, self.timeout).await;
                }
                Err(refusal)
            }
            other => other,
        }
    }

    /// The body's bytes, or a refusal once it passes the limit.
    async fn collect_within<B>(&self, mut body: Pin<&mut B>) -> Result<Bytes, Refusal>
    where
        B: HttpBody,
        B::Error: Into<BoxError>,
    {
        use bytes::Buf;

        let too_large = || Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
        if self.declared.is_some_and(|len| len > self.limit as u64) {
            return Err(too_large());
        }
        // Room for what the client declared, but not more than a little on
        // its word alone.
        let capacity = self.declared.unwrap_or(0).min(64 * 1024) as usize;
        let mut collected = BytesMut::with_capacity(capacity);
        let started = tokio::time::Instant::now();
        // One timer for the whole body, moved on after each part.
        let mut timer = std::pin::pin!(tokio::time::sleep_until(started + self.timeout));
        let mut parts = 0u32;
        while !body.is_end_stream() {
            // Each part within the timeout, and past that much time, the
            // whole at MIN_BODY_RATE on average: a client that trickles a
            // byte just inside every timeout cannot hold a request open
            // forever.
            let elapsed = if parts > 0 {
                started.elapsed()
            } else {
                Duration::ZERO
            };
            parts += 1;
            if elapsed > self.timeout
                && (collected.len() as f64) < elapsed.as_secs_f64() * MIN_BODY_RATE
            {
                return Err(Refusal::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request body arrives too slowly",
                ));
            }
            // A body sent with its head is usually handed over by the
            // connection right after this task first asks for it, so the
            // first miss only yields; the timer is armed if the next poll
            // still finds nothing, sparing most requests a timer.
            let mut yielded = parts > 1;
            let next = std::future::poll_fn(|cx| match body.as_mut().poll_frame(cx) {
                Poll::Ready(frame) => Poll::Ready(Some(frame)),
                Poll::Pending if !yielded => {
                    yielded = true;
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Poll::Pending => timer.as_mut().poll(cx).map(|()| None),
            })
            .await
            .ok_or_else(|| Refusal::new(StatusCode::REQUEST_TIMEOUT, "request body timed out"))?;
            let Some(frame) = next else {
                break;
            };
            let frame = frame.map_err(|e| {
                let e: BoxError = e.into();
                // A length limit outside the service (tower-http's
                // `RequestBodyLimitLayer`) ends the body with this error.
                if caused_by::<http_body_util::LengthLimitError>(&*e) {
                    return too_large();
                }
                tracing::debug!(error = %e, "request body failed");
                Refusal::bad_request("could not read the request body")
            })?;
            if let Ok(mut data) = frame.into_data() {
                if collected.len() + data.remaining() > self.limit {
                    return Err(too_large());
                }
                // Copied, not kept: a part may share its allocation with
                // the connection's read buffer, which a stored record must
                // not pin.
                while data.has_remaining() {
                    let chunk = data.chunk();
                    collected.extend_from_slice(chunk);
                    let n = chunk.len();
                    data.advance(n);
                }
            }
            if !body.is_end_stream() {
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + self.timeout);
            }
        }
        Ok(collected.freeze())
    }
}

/// Reads and drops what is left of a refused body: at most
/// [`MAX_DISCARD`] bytes, for at most [`DISCARD_TIME`].
async fn discard<B>(mut body: Pin<&mut B>, timeout: Duration)
where
    B: HttpBody,
{
    let drain = async {
        let mut left = MAX_DISCARD;
        while let Ok(Some(Ok(frame))) = tokio::time::timeout(timeout, body.frame()).await {
            let n = frame.data_ref().map_or(0, bytes::Buf::remaining);
            match left.checked_sub(n) {
                Some(rest) => left = rest,
                None => break,
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIME, drain).await;
}

/// Whether the client waits for `100 Continue` before it sends the body.
fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Whether `error`, or any error that caused it, is an `E`.
fn caused_by<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| e.is::<E>())
}
