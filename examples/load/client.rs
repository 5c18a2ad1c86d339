//! One HTTP/1.1 connection per worker, and the target every request goes to.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use tokio::net::TcpStream;

use crate::Error;

/// The server under test: a loopback address and the path that stream names
/// are appended to.
#[derive(Debug, Clone)]
pub struct Target {
    addr: SocketAddr,
    host: HeaderValue,
    base_path: String,
    run: String,
    timeout: Duration,
}

impl Target {
    /// Parses `http://127.0.0.1:PORT/PATH`, refusing every other host.
    pub fn parse(url: &str, timeout: Duration) -> Result<Self, Error> {
        let uri: Uri = url.parse().map_err(|e| format!("--url {url}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("--url {url}: only http:// is supported").into());
        }
        if uri.host() != Some("127.0.0.1") {
            return Err(format!("--url {url}: the host must be 127.0.0.1").into());
        }
        let port = uri.port_u16().unwrap_or(80);
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Ok(Target {
            addr,
            host: HeaderValue::try_from(format!("127.0.0.1:{port}"))?,
            base_path: uri.path().trim_end_matches('/').to_owned(),
            run: format!("load-{}-{nanos:09}", std::process::id()),
            timeout,
        })
    }

    /// The same run on the server at `url`: the same stream paths, sent
    /// to another node.
    pub fn on(&self, url: &str) -> Result<Self, Error> {
        let mut other = Target::parse(url, self.timeout)?;
        other.run = self.run.clone();
        Ok(other)
    }

    /// The path of the stream `name`, made unique to this run.
    pub fn stream_path(&self, name: &str) -> String {
        format!("{}/{}-{name}", self.base_path, self.run)
    }

    /// Opens a new connection.
    pub async fn connect(&self) -> Result<Conn, Error> {
        let tcp = tokio::time::timeout(self.timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| format!("connecting to {}: timed out", self.addr))?
            .map_err(|e| format!("connecting to {}: {e}", self.addr))?;
        tcp.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            // The connection ends when its sender is dropped or the server
            // closes it; either way the worker notices through the sender.
            let _ = connection.await;
        });
        Ok(Conn {
            sender,
            host: self.host.clone(),
            timeout: self.timeout,
        })
    }
}

/// An open HTTP/1.1 connection.
#[derive(Debug)]
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: HeaderValue,
    timeout: Duration,
}

impl Conn {
    /// How long one request may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends a request and waits for the response head.
    pub async fn send(
        &mut self,
        method: Method,
        uri: Uri,
        headers: &[(http::HeaderName, &HeaderValue)],
        body: Bytes,
    ) -> Result<Response<Incoming>, Error> {
        self.send_within(method, uri, headers, body, self.timeout)
            .await
    }

    /// Like [`Conn::send`], with its own time limit (for live reads).
    pub async fn send_within(
        &mut self,
        method: Method,
        uri: Uri,
        headers: &[(http::HeaderName, &HeaderValue)],
        body: Bytes,
        limit: Duration,
    ) -> Result<Response<Incoming>, Error> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        let map = request.headers_mut();
        map.insert(HOST, self.host.clone());
        for (name, value) in headers {
            map.insert(name.clone(), (*value).clone());
        }
        let exchange = async {
            self.sender.ready().await?;
            self.sender.send_request(request).await
        };
        match tokio::time::timeout(limit, exchange).await {
            Ok(result) => Ok(result?),
            Err(_) => Err("request timed out".into()),
        }
    }

    /// Creates a stream and returns its tail offset.
    pub async fn create(
        &mut self,
        path: &str,
        content_type: &HeaderValue,
    ) -> Result<String, Error> {
        let response = self
            .send(
                Method::PUT,
                path.parse()?,
                &[(CONTENT_TYPE, content_type)],
                Bytes::new(),
            )
            .await?;
        let status = response.status();
        let offset = next_offset(response.headers());
        drain(response.into_body(), self.timeout).await?;
        if status != StatusCode::CREATED && status != StatusCode::OK {
            return Err(format!("PUT {path}: {status}").into());
        }
        offset.ok_or_else(|| format!("PUT {path}: no Stream-Next-Offset").into())
    }

    /// Appends `body` to a stream and returns the new tail offset.
    pub async fn append(
        &mut self,
        uri: Uri,
        content_type: &HeaderValue,
        body: Bytes,
    ) -> Result<Option<String>, Error> {
        let response = self
            .send(
                Method::POST,
                uri.clone(),
                &[(CONTENT_TYPE, content_type)],
                body,
            )
            .await?;
        let status = response.status();
        let offset = next_offset(response.headers());
        drain(response.into_body(), self.timeout).await?;
        if !status.is_success() {
            return Err(format!("POST {uri}: {status}").into());
        }
        Ok(offset)
    }
}

/// Reads a body to its end and returns its length, without keeping it.
pub async fn drain(mut body: Incoming, limit: Duration) -> Result<u64, Error> {
    let count = async {
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame?.data_ref() {
                n += data.len() as u64;
            }
        }
        Ok::<_, hyper::Error>(n)
    };
    match tokio::time::timeout(limit, count).await {
        Ok(result) => Ok(result?),
        Err(_) => Err("reading the body timed out".into()),
    }
}

/// Reads a body to its end and keeps it.
pub async fn collect(body: Incoming, limit: Duration) -> Result<Bytes, Error> {
    match tokio::time::timeout(limit, body.collect()).await {
        Ok(result) => Ok(result?.to_bytes()),
        Err(_) => Err("reading the body timed out".into()),
    }
}

/// The `Stream-Next-Offset` of a response.
pub fn next_offset(headers: &HeaderMap) -> Option<String> {
    header_str(headers, "stream-next-offset").map(str::to_owned)
}

/// A header as text, if present and visible ASCII.
pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `path?offset=..` with the offset percent-encoded, plus any extra query.
pub fn read_uri(path: &str, offset: &str, extra: &str) -> Result<Uri, Error> {
    let offset = utf8_percent_encode(offset, NON_ALPHANUMERIC);
    Ok(format!("{path}?offset={offset}{extra}").parse()?)
}

/// Opens `count` connections, at most 64 at a time so the server's accept
/// backlog never overflows.
pub async fn connect_many(target: &Target, count: usize) -> Result<Vec<Conn>, Error> {
    let mut conns = Vec::with_capacity(count);
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0;
    while conns.len() < count {
        while next < count && pending.len() < 64 {
            let target = target.clone();
            pending.spawn(async move { target.connect().await });
            next += 1;
        }
        if let Some(joined) = pending.join_next().await {
            conns.push(joined??);
        }
    }
    Ok(conns)
}
