//! A Durable Streams client: stream operations, resumable readers and
//! producers, over hyper-util's HTTP client (HTTP and HTTPS).
//!
//! [`Client`] holds the base URL, the connection pool, headers for every
//! request and the retry policy; [`Client::stream`] names one stream, a
//! [`DurableStream`], whose methods create, append, close, delete and read
//! it.
//!
//! - A [`Reader`] is a [`futures_core::Stream`] of [`Chunk`]s from any
//!   offset, catching up, long-polling, following SSE, or catching up and
//!   then following ([`Live::Auto`]). It echoes cursors, ends at closure, and
//!   resumes after lost connections, `5xx` and `429` from the last offset it
//!   delivered, so nothing is lost or repeated.
//! - A [`Producer`] batches appends (linger time, batch size) and sends them
//!   in order, one batch in flight. An [`IdempotentProducer`] adds producer
//!   id, epoch and sequence, so its retries are deduplicated by the server:
//!   exactly once, even across a server restart.
//!
//! # Example
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use tower_durable_streams::client::{Client, CreateOptions, Live, ReadOptions};
//!
//! # async fn run() -> Result<(), tower_durable_streams::client::Error> {
//! let client = Client::new("http://127.0.0.1:4437/v1/stream")?;
//! let chat = client.stream("chat/1");
//! chat.create(CreateOptions::new().content_type("text/plain")).await?;
//! chat.append("hello").await?;
//!
//! let mut reader = chat.read(ReadOptions::new().live(Live::Auto));
//! while let Some(chunk) = reader.next().await {
//!     let chunk = chunk?;
//!     print!("{}", String::from_utf8_lossy(&chunk.data));
//!     if chunk.closed {
//!         break;
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod error;
mod producer;
mod read;
mod retry;
mod sse;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub use self::error::{Error, ErrorKind};
pub use self::producer::{IdempotentProducer, Producer, ProducerOptions};
pub use self::read::{Chunk, Live, ReadOptions, Reader};
pub use self::retry::Backoff;

type Http =
    hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

type HeaderProvider = Arc<dyn Fn() -> HeaderMap + Send + Sync>;

/// How long one request may wait for its response head. Live reads wait
/// longer: a long-poll for its server's timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a long-poll may wait.
const LONG_POLL_TIMEOUT: Duration = Duration::from_secs(90);

/// A client for the streams below one base URL; see the
/// [module docs](self). Clones share the connection pool.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    base: String,
    http: Http,
    headers: HeaderMap,
    provider: Option<HeaderProvider>,
    backoff: Backoff,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.inner.base)
            .field("backoff", &self.inner.backoff)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Client`].
#[derive(Clone)]
pub struct ClientBuilder {
    base: String,
    headers: HeaderMap,
    provider: Option<HeaderProvider>,
    backoff: Backoff,
    error: Option<String>,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// A header sent with every request, such as `Authorization`.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) => {
                self.headers.insert(name, value);
            }
            _ => self.error = Some(format!("invalid header {name}")),
        }
        self
    }

    /// Headers computed for each request (a rotating token, say); they
    /// override the static ones.
    pub fn header_provider(mut self, f: impl Fn() -> HeaderMap + Send + Sync + 'static) -> Self {
        self.provider = Some(Arc::new(f));
        self
    }

    /// How requests are retried. Default is [`Backoff::default`].
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The client.
    ///
    /// # Errors
    ///
    /// When the base URL is not an `http` or `https` URL, or a header was
    /// invalid.
    pub fn build(self) -> Result<Client, Error> {
        if let Some(error) = self.error {
            return Err(Error::new(ErrorKind::InvalidInput, &self.base, error));
        }
        let uri: http::Uri = self
            .base
            .parse()
            .map_err(|_| Error::new(ErrorKind::InvalidInput, &self.base, "not a URL"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                &self.base,
                "expected an http:// or https:// URL",
            ));
        }
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        Ok(Client {
            inner: Arc::new(Inner {
                base: self.base.trim_end_matches('/').to_owned(),
                http,
                headers: self.headers,
                provider: self.provider,
                backoff: self.backoff,
            }),
        })
    }
}

impl Client {
    /// A client for the streams below `base`, such as
    /// `http://127.0.0.1:4437/v1/stream`, with the default settings.
    ///
    /// # Errors
    ///
    /// When `base` is not an `http` or `https` URL.
    pub fn new(base: impl Into<String>) -> Result<Self, Error> {
        Self::builder(base).build()
    }

    /// A builder for a client below `base`.
    pub fn builder(base: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            base: base.into(),
            headers: HeaderMap::new(),
            provider: None,
            backoff: Backoff::default(),
            error: None,
        }
    }

    /// The stream at `path` below the base URL; an empty path is the base
    /// URL itself.
    pub fn stream(&self, path: &str) -> DurableStream {
        let path = path.trim_start_matches('/');
        let url = if path.is_empty() {
            self.inner.base.clone()
        } else {
            format!("{}/{path}", self.inner.base)
        };
        DurableStream {
            client: self.clone(),
            url: Arc::from(url),
            content_type: Arc::default(),
        }
    }

    /// One exchange, without retries; the body left open.
    async fn exchange(
        &self,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        body: &Bytes,
        timeout: Duration,
    ) -> Result<Response<Incoming>, Error> {
        let mut request = Request::builder()
            .method(method.clone())
            .uri(url)
            .body(Full::new(body.clone()))
            .map_err(|e| Error::new(ErrorKind::InvalidInput, url, e.to_string()))?;
        let all = request.headers_mut();
        all.extend(self.inner.headers.clone());
        if let Some(provider) = &self.inner.provider {
            all.extend(provider());
        }
        all.extend(headers.clone());
        match tokio::time::timeout(timeout, self.inner.http.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(Error::transport(url, e)),
            Err(_) => Err(Error::transport(url, "timed out waiting for a response")),
        }
    }

    /// A whole exchange, retried per the backoff policy: after no answer,
    /// `5xx` or `429` when `retry` (the request is idempotent), and only
    /// after an answer of `5xx` or `429` otherwise, since a request that got
    /// no answer may have been carried out. Non-success statuses become
    /// errors.
    async fn call(
        &self,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: Bytes,
        retry: bool,
    ) -> Result<Answer, Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = match self
                .exchange(&method, url, &headers, &body, REQUEST_TIMEOUT)
                .await
            {
                Ok(response) => Answer::read(url, response).await,
                Err(e) => Err((e, None)),
            };
            let (error, headers) = match outcome {
                Ok(answer) if answer.status.is_success() => return Ok(answer),
                Ok(answer) => {
                    let error =
                        Error::from_response(url, answer.status, &answer.headers, &answer.body);
                    (error, Some(answer.headers))
                }
                Err(failed) => failed,
            };
            let may = if retry {
                error.is_retryable()
            } else {
                matches!(error.kind(), ErrorKind::RateLimited | ErrorKind::Server)
            };
            if !may || !self.inner.backoff.allows(attempt) {
                return Err(error);
            }
            let delay = self.inner.backoff.delay(attempt, headers.as_ref());
            tracing::debug!(%url, attempt, ?delay, %error, "retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

/// A whole response.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    async fn read(
        url: &str,
        response: Response<Incoming>,
    ) -> Result<Self, (Error, Option<HeaderMap>)> {
        let (parts, body) = response.into_parts();
        match tokio::time::timeout(REQUEST_TIMEOUT, body.collect()).await {
            Ok(Ok(body)) => Ok(Self {
                status: parts.status,
                headers: parts.headers,
                body: body.to_bytes(),
            }),
            Ok(Err(e)) => Err((Error::transport(url, e), None)),
            Err(_) => Err((Error::transport(url, "timed out reading a body"), None)),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    fn flag(&self, name: &str) -> bool {
        flag(&self.headers, name)
    }

    fn next_offset(&self, url: &str) -> Result<String, Error> {
        self.header("stream-next-offset")
            .map(str::to_owned)
            .ok_or_else(|| Error::protocol(url, "no Stream-Next-Offset"))
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn flag(headers: &HeaderMap, name: &str) -> bool {
    header(headers, name).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

fn insert(
    headers: &mut HeaderMap,
    url: &str,
    name: &'static str,
    value: &str,
) -> Result<(), Error> {
    let value = HeaderValue::from_str(value)
        .map_err(|_| Error::new(ErrorKind::InvalidInput, url, format!("invalid {name}")))?;
    headers.insert(HeaderName::from_static(name), value);
    Ok(())
}

/// How to create a stream; see [`DurableStream::create`].
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    content_type: Option<String>,
    ttl: Option<u64>,
    expires_at: Option<String>,
    closed: bool,
    body: Bytes,
    fork: Option<(String, Option<String>, u64)>,
}

impl CreateOptions {
    /// Defaults: no content type (the server picks
    /// `application/octet-stream`), no expiry, open, empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// The stream's content type.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// A sliding time to live, in seconds.
    pub fn ttl(mut self, seconds: u64) -> Self {
        self.ttl = Some(seconds);
        self
    }

    /// An absolute expiry.
    pub fn expires_at(mut self, at: SystemTime) -> Self {
        let at = time::OffsetDateTime::from(at);
        self.expires_at = at
            .format(&time::format_description::well_known::Rfc3339)
            .ok();
        self
    }

    /// Create the stream closed, its initial body its whole content.
    pub fn closed(mut self, closed: bool) -> Self {
        self.closed = closed;
        self
    }

    /// The stream's first bytes.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Fork the stream at `source` (its path on the same server, such as
    /// `/v1/stream/chat/1`), at `offset` (its tail when `None`) and
    /// `sub_offset` (bytes, or messages for JSON streams, past `offset`).
    pub fn fork(
        mut self,
        source: impl Into<String>,
        offset: Option<String>,
        sub_offset: u64,
    ) -> Self {
        self.fork = Some((source.into(), offset, sub_offset));
        self
    }
}

/// What creating a stream told.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Created {
    /// Whether this request created it (`201`), rather than finding it
    /// there with the same configuration (`200`).
    pub created: bool,
    /// Its tail.
    pub next_offset: String,
    /// Its content type.
    pub content_type: Option<String>,
    /// Whether it is closed.
    pub closed: bool,
}

/// A stream's metadata, from `HEAD`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metadata {
    /// Its tail.
    pub next_offset: String,
    /// Its content type.
    pub content_type: Option<String>,
    /// Whether it is closed.
    pub closed: bool,
    /// Its sliding time to live, in seconds.
    pub ttl: Option<u64>,
    /// Its absolute expiry, as the server wrote it (RFC 3339).
    pub expires_at: Option<String>,
}

/// What an append told.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Appended {
    /// The stream's tail after the append.
    pub next_offset: String,
    /// Whether the stream is closed now.
    pub closed: bool,
}

/// One stream on the server; see the [module docs](self). Cheap to clone.
#[derive(Debug, Clone)]
pub struct DurableStream {
    client: Client,
    url: Arc<str>,
    /// The content type, once known from `PUT` or `HEAD`.
    content_type: Arc<std::sync::OnceLock<String>>,
}

impl DurableStream {
    /// The stream's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Creates the stream, or confirms it exists with the same
    /// configuration. Retried, since `PUT` is idempotent.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Conflict`] when it exists with another configuration;
    /// [`ErrorKind::NotFound`] when a fork's source does not exist.
    pub async fn create(&self, options: CreateOptions) -> Result<Created, Error> {
        let url = &*self.url;
        let mut headers = HeaderMap::new();
        if let Some(ct) = &options.content_type {
            insert(&mut headers, url, "content-type", ct)?;
        }
        if let Some(ttl) = options.ttl {
            insert(&mut headers, url, "stream-ttl", &ttl.to_string())?;
        }
        if let Some(at) = &options.expires_at {
            insert(&mut headers, url, "stream-expires-at", at)?;
        }
        if options.closed {
            insert(&mut headers, url, "stream-closed", "true")?;
        }
        if let Some((source, offset, sub_offset)) = &options.fork {
            insert(&mut headers, url, "stream-forked-from", source)?;
            if let Some(offset) = offset {
                insert(&mut headers, url, "stream-fork-offset", offset)?;
            }
            if *sub_offset > 0 {
                insert(
                    &mut headers,
                    url,
                    "stream-fork-sub-offset",
                    &sub_offset.to_string(),
                )?;
            }
        }
        let answer = self
            .client
            .call(Method::PUT, url, headers, options.body, true)
            .await?;
        self.learn(answer.header("content-type"));
        Ok(Created {
            created: answer.status == StatusCode::CREATED,
            next_offset: answer.next_offset(url)?,
            content_type: answer.header("content-type").map(str::to_owned),
            closed: answer.flag("stream-closed"),
        })
    }

    /// The stream's metadata. Retried.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::NotFound`] or [`ErrorKind::Gone`].
    pub async fn head(&self) -> Result<Metadata, Error> {
        let url = &*self.url;
        let answer = self
            .client
            .call(Method::HEAD, url, HeaderMap::new(), Bytes::new(), true)
            .await?;
        self.learn(answer.header("content-type"));
        Ok(Metadata {
            next_offset: answer.next_offset(url)?,
            content_type: answer.header("content-type").map(str::to_owned),
            closed: answer.flag("stream-closed"),
            ttl: answer.header("stream-ttl").and_then(|v| v.parse().ok()),
            expires_at: answer.header("stream-expires-at").map(str::to_owned),
        })
    }

    /// Appends `body`, with the stream's content type (learned from
    /// [`create`](Self::create) or [`head`](Self::head), or with one `HEAD`
    /// the first time). Retried when the server answers `5xx` or `429`,
    /// which say it was not stored, but not after a lost connection, since
    /// a plain append is not idempotent: an [`IdempotentProducer`]'s are.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Closed`], [`ErrorKind::Conflict`] (content type or
    /// `Stream-Seq`), [`ErrorKind::NotFound`], ...
    pub async fn append(&self, body: impl Into<Bytes>) -> Result<Appended, Error> {
        let content_type = self.content_type().await?;
        self.append_with(&content_type, body).await
    }

    /// The stream's content type, with a `HEAD` if it is not known yet.
    pub(crate) async fn content_type(&self) -> Result<String, Error> {
        if let Some(known) = self.content_type.get() {
            return Ok(known.clone());
        }
        let found = self.head().await?.content_type;
        Ok(found.unwrap_or_else(|| "application/octet-stream".to_owned()))
    }

    fn learn(&self, content_type: Option<&str>) {
        if let Some(content_type) = content_type {
            let _ = self.content_type.set(content_type.to_owned());
        }
    }

    /// Appends `body` as `content_type`.
    ///
    /// # Errors
    ///
    /// As [`append`](Self::append).
    pub async fn append_with(
        &self,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> Result<Appended, Error> {
        let mut headers = HeaderMap::new();
        insert(&mut headers, &self.url, "content-type", content_type)?;
        self.post(headers, body.into()).await
    }

    /// Appends `body` as `content_type` with the writer sequence `seq`
    /// (`Stream-Seq`), which must be greater, byte-wise, than the last one
    /// the stream accepted.
    ///
    /// # Errors
    ///
    /// As [`append`](Self::append); a sequence that does not move forward is
    /// [`ErrorKind::Conflict`].
    pub async fn append_seq(
        &self,
        content_type: &str,
        seq: &str,
        body: impl Into<Bytes>,
    ) -> Result<Appended, Error> {
        let mut headers = HeaderMap::new();
        insert(&mut headers, &self.url, "content-type", content_type)?;
        insert(&mut headers, &self.url, "stream-seq", seq)?;
        self.post(headers, body.into()).await
    }

    /// Closes the stream, with no final append. Idempotent, so retried.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::NotFound`] or [`ErrorKind::Gone`].
    pub async fn close(&self) -> Result<Appended, Error> {
        let mut headers = HeaderMap::new();
        insert(&mut headers, &self.url, "stream-closed", "true")?;
        let url = &*self.url;
        let answer = self
            .client
            .call(Method::POST, url, headers, Bytes::new(), true)
            .await?;
        Ok(Appended {
            next_offset: answer.next_offset(url)?,
            closed: true,
        })
    }

    /// Appends `body` as `content_type` and closes the stream, atomically.
    ///
    /// # Errors
    ///
    /// As [`append`](Self::append).
    pub async fn close_with(
        &self,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> Result<Appended, Error> {
        let mut headers = HeaderMap::new();
        insert(&mut headers, &self.url, "content-type", content_type)?;
        insert(&mut headers, &self.url, "stream-closed", "true")?;
        self.post(headers, body.into()).await
    }

    async fn post(&self, headers: HeaderMap, body: Bytes) -> Result<Appended, Error> {
        let url = &*self.url;
        let answer = self
            .client
            .call(Method::POST, url, headers, body, false)
            .await?;
        Ok(Appended {
            next_offset: answer.next_offset(url)?,
            closed: answer.flag("stream-closed"),
        })
    }

    /// Deletes the stream.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::NotFound`] or [`ErrorKind::Gone`].
    pub async fn delete(&self) -> Result<(), Error> {
        self.client
            .call(
                Method::DELETE,
                &self.url,
                HeaderMap::new(),
                Bytes::new(),
                false,
            )
            .await
            .map(|_| ())
    }

    /// Reads the stream; see [`Reader`].
    pub fn read(&self, options: ReadOptions) -> Reader {
        Reader::start(self.clone(), options)
    }

    /// A batching producer; see [`Producer`].
    pub fn producer(&self, options: ProducerOptions) -> Producer {
        Producer::start(self.clone(), options)
    }

    /// An idempotent producer with id `producer_id`, starting at `epoch`;
    /// see [`IdempotentProducer`].
    pub fn idempotent_producer(
        &self,
        producer_id: impl Into<String>,
        epoch: u64,
        options: ProducerOptions,
    ) -> IdempotentProducer {
        IdempotentProducer::start(self.clone(), producer_id.into(), epoch, options)
    }
}
