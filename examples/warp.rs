//! Durable Streams mounted at `/streams` inside a warp app.
//!
//! warp composes filters, not tower services, and has no filter that hands
//! the request to a service. So this example writes the glue a warp user
//! would: [`tower_service`] is a filter that takes the parts of the request
//! (method, path, query, headers and the body as a stream), rebuilds the
//! `http::Request`, calls the service, and turns its response, streaming
//! body included, into a warp reply. The result is an ordinary filter: it
//! sits after `warp::path("streams")`, beside other routes with `or`, and
//! under warp's own filters (logging, CORS, ...) like any route.
//!
//! warp does not strip the matched path, so the service sees the full path
//! and is told its prefix with [`DurableStreamsService::prefix`] (under
//! axum's `nest_service`, which strips it, the method to use is
//! `mounted_at`).
//!
//! The other way, serving `warp::service(routes)` and the stream service
//! side by side in one hyper server that dispatches on the path, also works,
//! but puts the streams outside everything the warp app wraps its routes in.
//!
//! ```sh
//! cargo run --example warp
//! curl localhost:4439/hello
//! curl -X PUT localhost:4439/streams/chat -H 'content-type: text/plain' --data-binary 'hi'
//! curl 'localhost:4439/streams/chat?offset=-1'
//! curl -N 'localhost:4439/streams/chat?offset=now&live=sse'
//! ```
//!
//! `tests/mounts.rs` serves [`app`] on a free port.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_core::Stream;
use futures_util::future::{self, Either};
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_durable_streams::{
    BoxError, CacheControlLayer, DurableStreamsService, LongPollLayer, MemoryStorage, SseLayer,
};
use warp::filters::path::FullPath;
use warp::{Filter, Rejection, Reply};

/// Where the app mounts the streams.
pub const PREFIX: &str = "/streams";

/// The app: `GET /hello` and the streams below [`PREFIX`].
pub fn app(
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone + Send + Sync + 'static {
    let streams = ServiceBuilder::new()
        .layer(CacheControlLayer::new())
        .layer(SseLayer::new())
        .layer(LongPollLayer::new().timeout(Duration::from_secs(30)))
        .service(DurableStreamsService::new(MemoryStorage::new()).prefix(PREFIX));
    let hello = warp::path!("hello").map(|| "hello from warp\n");
    hello.or(warp::path("streams").and(tower_service(streams)))
}

/// A filter that answers every request it sees with `service`.
///
/// The request body reaches the service as it arrives, and the response
/// body reaches the client frame by frame, so long-polls and SSE work.
pub fn tower_service<S, B>(
    service: S,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone + Send + Sync + 'static
where
    S: Service<Request<WarpBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // `query::raw` rejects a request without a query; treat that as empty.
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    warp::method()
        .and(warp::path::full())
        .and(query)
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and_then(
            move |method: Method, path: FullPath, query: String, headers: HeaderMap, body| {
                let uri = match query.as_str() {
                    "" => path.as_str().to_owned(),
                    query => format!("{}?{query}", path.as_str()),
                };
                let head = method == Method::HEAD;
                let mut request = Request::new(request_body(body));
                *request.method_mut() = method;
                *request.headers_mut() = headers;
                // Both halves come from a URI that parsed, so this never
                // fails; answer 400 rather than panic if it does.
                let Ok(uri) = uri.parse() else {
                    let reply = StatusCode::BAD_REQUEST.into_response();
                    return Either::Left(future::ok(reply));
                };
                *request.uri_mut() = uri;
                // A plain future rather than an `async` block: the compiler
                // cannot yet prove an `async` block holding `S::Future` is
                // `Send` for a generic `S`.
                Either::Right(service.clone().oneshot(request).map(move |result| {
                    let Ok(response) = result;
                    Ok::<_, Rejection>(into_reply(response, head))
                }))
            },
        )
}

/// The request body [`tower_service`] hands to the service.
pub type WarpBody = StreamBody<Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, BoxError>> + Send>>>;

/// The body stream warp extracted, as an `http_body::Body`.
fn request_body<D: Buf>(
    body: impl Stream<Item = Result<D, warp::Error>> + Send + 'static,
) -> WarpBody {
    let frames = body
        .map_ok(|mut data| Frame::data(data.copy_to_bytes(data.remaining())))
        .map_err(BoxError::from);
    StreamBody::new(frames.boxed())
}

/// A warp reply with the status, headers and streaming body of `response`
/// (to a `HEAD` request if `head`).
fn into_reply<B>(response: Response<B>, head: bool) -> warp::reply::Response
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = response.into_parts();
    // warp's streaming reply forgets the body's length; keep it, so bodies of
    // known size go out with `Content-Length` rather than chunked.
    if let (Some(len), false) = (body.size_hint().exact(), head) {
        parts.headers.entry(CONTENT_LENGTH).or_insert(len.into());
    }
    let data = body.into_data_stream().map_err(Into::<BoxError>::into);
    let data = SyncStream(Mutex::new(Box::pin(data)));
    let mut reply = warp::reply::stream(data).into_response();
    *reply.status_mut() = parts.status;
    *reply.headers_mut() = parts.headers;
    reply
}

/// A stream that is `Sync`, as warp's streaming reply asks, because it is
/// only ever used through `&mut`.
struct SyncStream<S>(Mutex<Pin<Box<S>>>);

impl<S: Stream> Stream for SyncStream<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        // `get_mut` takes no lock; the mutex only makes the type `Sync`.
        match self.get_mut().0.get_mut() {
            Ok(stream) => stream.as_mut().poll_next(cx),
            Err(poisoned) => poisoned.into_inner().as_mut().poll_next(cx),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:4439").await?;
    println!("listening on http://{}{PREFIX}/", listener.local_addr()?);
    warp::serve(app()).incoming(listener).run().await;
    Ok(())
}
