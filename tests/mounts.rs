//! The examples' apps, served on a free port by their own framework: plain
//! hyper (`examples/hyper_server.rs`), axum (`examples/axum.rs`) and warp
//! (`examples/warp.rs`). Each test drives the protocol through the
//! framework's routing, under the app's prefix: create, append, catch-up,
//! fork by the public path, long-poll woken by an append, and SSE receiving
//! one. The apps are the examples' own `app()` functions, included here, so
//! what is tested is what the examples serve.

mod support;

#[allow(dead_code)]
#[path = "../examples/hyper_server.rs"]
mod hyper_example;

#[allow(dead_code)]
#[path = "../examples/axum.rs"]
mod axum_example;

#[allow(dead_code)]
#[path = "../examples/warp.rs"]
mod warp_example;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

use support::{parse_events, Event, Reply};

/// How long any exchange may take before the test gives up on it.
const LIMIT: Duration = Duration::from_secs(10);

/// The axum example's write token in these tests.
const TOKEN: &str = "test-token";

/// A client for one app: requests go to `prefix` + the path given.
struct Mount {
    addr: SocketAddr,
    prefix: &'static str,
    /// Sent as `Authorization` with every write.
    auth: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Mount {
    fn new(addr: SocketAddr, prefix: &'static str) -> Self {
        Self {
            addr,
            prefix,
            auth: None,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Sends a request to `path` (absolute: include the prefix).
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &'static str,
    ) -> http::Response<Incoming> {
        let is_write = matches!(method, Method::PUT | Method::POST | Method::DELETE);
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let (Some(auth), true) = (&self.auth, is_write) {
            request = request.header("authorization", auth);
        }
        let request = request.body(Full::new(Bytes::from_static(body.as_bytes())));
        let response = self.client.request(request.expect("a valid request"));
        tokio::time::timeout(LIMIT, response)
            .await
            .expect("the app answers in time")
            .expect("the app answers")
    }

    /// Sends a request to `path` (absolute) and reads the whole response.
    async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &'static str,
    ) -> Reply {
        let (parts, body) = self.send(method, path, headers, body).await.into_parts();
        let body = tokio::time::timeout(LIMIT, body.collect())
            .await
            .expect("the body ends in time")
            .expect("the body is readable")
            .to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// The absolute path of `name_and_query` below the prefix.
    fn path(&self, name_and_query: &str) -> String {
        format!("{}/{name_and_query}", self.prefix)
    }

    async fn put(&self, name: &str, headers: &[(&str, &str)], body: &'static str) -> Reply {
        let path = self.path(name);
        self.request(Method::PUT, &path, headers, body).await
    }

    async fn post(&self, name: &str, body: &'static str) -> Reply {
        let path = self.path(name);
        let text = [("content-type", "text/plain")];
        self.request(Method::POST, &path, &text, body).await
    }

    async fn get(&self, name_and_query: &str) -> Reply {
        let path = self.path(name_and_query);
        self.request(Method::GET, &path, &[], "").await
    }
}

/// Serves the hyper example's stack on a free port.
async fn hyper_app() -> Mount {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(hyper_example::serve(listener, hyper_example::app()));
    Mount::new(addr, hyper_example::PREFIX)
}

/// Serves the axum example's router on a free port; writes carry the token.
async fn axum_app() -> Mount {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("an address");
    let app = axum_example::app(TOKEN);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Mount {
        auth: Some(format!("Bearer {TOKEN}")),
        ..Mount::new(addr, axum_example::PREFIX)
    }
}

/// Serves the warp example's filter on a free port.
async fn warp_app() -> Mount {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(warp::serve(warp_example::app()).incoming(listener).run());
    Mount::new(addr, warp_example::PREFIX)
}

/// The protocol through `app`'s routing, under its prefix.
async fn exercise(app: &Mount) {
    let text = [("content-type", "text/plain")];
    let prefix = app.prefix;

    // Create: `Location` is the public path, prefix included.
    let created = app.put("a/b", &text, "hello ").await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let location = created.header("location").expect("a Location");
    assert_eq!(location, format!("http://{}{prefix}/a/b", app.addr));

    // Append, then catch up.
    let appended = app.post("a/b", "world").await;
    assert_eq!(appended.status, StatusCode::NO_CONTENT, "{appended:?}");
    let tail = appended.next_offset();
    let read = app.get("a/b?offset=-1").await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.text(), "hello world");
    assert!(read.is_true("stream-up-to-date"));
    assert_eq!(read.next_offset(), tail);

    // The stream is keyed by the path below the prefix: a fork names its
    // source by the public path, and reads what the source holds...
    let source = format!("{prefix}/a/b");
    let fork_headers = [
        ("content-type", "text/plain"),
        ("stream-forked-from", source.as_str()),
    ];
    let fork = app.put("a/fork", &fork_headers, "").await;
    assert_eq!(fork.status, StatusCode::CREATED, "{fork:?}");
    assert_eq!(app.get("a/fork?offset=-1").await.text(), "hello world");
    // ...while the bare key, without the prefix, names no stream.
    let bare = [
        ("content-type", "text/plain"),
        ("stream-forked-from", "/a/b"),
    ];
    let refused = app.put("a/bare", &bare, "").await;
    assert!(refused.status.is_client_error(), "{refused:?}");
    // Nor does the stream answer outside the prefix.
    let outside = app.request(Method::GET, "/a/b?offset=-1", &[], "").await;
    assert_eq!(outside.status, StatusCode::NOT_FOUND);

    // A long-poll at the tail waits, and an append wakes it.
    let path = app.path(&format!("a/b?offset={tail}&live=long-poll"));
    let mut poll = std::pin::pin!(app.request(Method::GET, &path, &[], ""));
    let early = tokio::time::timeout(Duration::from_millis(300), poll.as_mut()).await;
    assert!(early.is_err(), "the long-poll answered with nothing new");
    let (woken, appended) = tokio::join!(poll, async {
        // The long-poll is still waiting at the tail; wake it.
        app.post("a/b", "!").await
    });
    assert_eq!(appended.status, StatusCode::NO_CONTENT);
    assert_eq!(woken.status, StatusCode::OK, "{woken:?}");
    assert_eq!(woken.text(), "!");
    assert_eq!(woken.next_offset(), appended.next_offset());
    let tail = appended.next_offset();

    // SSE from the tail: a control event, then an append arrives as data.
    let path = app.path(&format!("a/b?offset={tail}&live=sse"));
    let response = app.send(Method::GET, &path, &[], "").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut events = Events::new(response.into_body());
    events
        .until(|e| e.iter().any(|e| e.kind == "control"))
        .await;
    assert_eq!(app.post("a/b", "live").await.status, StatusCode::NO_CONTENT);
    let received = events.until(|e| e.iter().any(|e| e.kind == "data")).await;
    let data: Vec<&Event> = received.iter().filter(|e| e.kind == "data").collect();
    assert_eq!(data.len(), 1, "{received:?}");
    assert_eq!(data[0].data, "live");
}

/// The events of an open SSE response.
struct Events {
    body: Incoming,
    raw: Vec<u8>,
}

impl Events {
    fn new(body: Incoming) -> Self {
        Self {
            body,
            raw: Vec::new(),
        }
    }

    /// Reads until `done` holds for the events so far; fails after [`LIMIT`].
    async fn until(&mut self, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        let read = async {
            while !done(&parse_events(&self.raw)) {
                let frame = self.body.frame().await.expect("the stream stays open");
                if let Ok(data) = frame.expect("the stream is readable").into_data() {
                    self.raw.extend_from_slice(&data);
                }
            }
        };
        tokio::time::timeout(LIMIT, read)
            .await
            .expect("the events arrive in time");
        parse_events(&self.raw)
    }
}

#[tokio::test]
async fn hyper_serves_the_protocol_under_its_prefix() {
    exercise(&hyper_app().await).await;
}

#[tokio::test]
async fn axum_nests_the_protocol_under_its_prefix() {
    let app = axum_app().await;
    exercise(&app).await;
    // The router's own route is still there beside the streams.
    let hello = app.request(Method::GET, "/", &[], "").await;
    assert_eq!(hello.status, StatusCode::OK);
    assert_eq!(hello.text(), "hello from axum\n");
}

#[tokio::test]
async fn warp_mounts_the_protocol_under_its_prefix() {
    let app = warp_app().await;
    exercise(&app).await;
    let hello = app.request(Method::GET, "/hello", &[], "").await;
    assert_eq!(hello.status, StatusCode::OK);
    assert_eq!(hello.text(), "hello from warp\n");
}

#[tokio::test]
async fn axum_lets_anyone_read_but_only_a_bearer_write() {
    let writer = axum_app().await;
    let anyone = Mount::new(writer.addr, writer.prefix);
    let wrong = Mount {
        auth: Some("Bearer not-the-token".into()),
        ..Mount::new(writer.addr, writer.prefix)
    };
    let text = [("content-type", "text/plain")];

    // Unauthenticated and wrongly authenticated writes are 401, and write
    // nothing.
    for client in [&anyone, &wrong] {
        let put = client.put("s", &text, "x").await;
        assert_eq!(put.status, StatusCode::UNAUTHORIZED, "{put:?}");
        assert_eq!(put.header("www-authenticate"), Some("Bearer"));
    }
    assert_eq!(
        anyone.get("s?offset=-1").await.status,
        StatusCode::NOT_FOUND
    );

    // The token writes.
    assert_eq!(
        writer.put("s", &text, "a").await.status,
        StatusCode::CREATED
    );
    assert_eq!(anyone.post("s", "b").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(writer.post("s", "b").await.status, StatusCode::NO_CONTENT);

    // Anyone reads: GET, HEAD and a CORS preflight.
    let read = anyone.get("s?offset=-1").await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.text(), "ab");
    let head = anyone.request(Method::HEAD, "/streams/s", &[], "").await;
    assert_eq!(head.status, StatusCode::OK);
    let preflight = [
        ("origin", "https://app.example"),
        ("access-control-request-method", "POST"),
    ];
    let options = anyone
        .request(Method::OPTIONS, "/streams/s", &preflight, "")
        .await;
    assert!(options.status.is_success(), "{options:?}");

    // Deleting needs the token too.
    let path = anyone.path("s");
    let delete = anyone.request(Method::DELETE, &path, &[], "").await;
    assert_eq!(delete.status, StatusCode::UNAUTHORIZED);
    assert_eq!(anyone.get("s?offset=-1").await.status, StatusCode::OK);
    let delete = writer.request(Method::DELETE, &path, &[], "").await;
    assert_eq!(delete.status, StatusCode::NO_CONTENT);
    assert_eq!(
        anyone.get("s?offset=-1").await.status,
        StatusCode::NOT_FOUND
    );
}
