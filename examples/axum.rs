//! Durable Streams nested in an axum app, beside its ordinary routes.
//!
//! - `GET /` is an ordinary axum handler.
//! - Everything below `/streams` is the protocol service, with its
//!   cache-control, SSE and long-poll layers. `nest_service` strips
//!   `/streams` before the service sees the request, so the service is built
//!   with [`DurableStreamsService::mounted_at`]: it keys streams by the path
//!   below the prefix, and still writes `/streams/...` into `Location` and
//!   reads it from `Stream-Forked-From`.
//! - Anyone may read (`GET`, `HEAD`, `OPTIONS`); writes (`PUT`, `POST`,
//!   `DELETE`) need `Authorization: Bearer <token>`, or get `401`. The check
//!   is tower-http's [`ValidateRequestHeaderLayer`] with a small closure, so
//!   it would guard the same service under hyper or any other tower server.
//!
//! ```sh
//! cargo run --example axum
//! curl localhost:4438/
//! curl -i -X PUT localhost:4438/streams/chat -H 'content-type: text/plain' --data-binary 'hi'  # 401
//! curl -i -X PUT localhost:4438/streams/chat -H 'authorization: Bearer let-me-write' \
//!      -H 'content-type: text/plain' --data-binary 'hi'                                        # 201
//! curl 'localhost:4438/streams/chat?offset=-1'
//! ```
//!
//! Set `STREAMS_TOKEN` to choose the token. `tests/mounts.rs` serves [`app`]
//! on a free port.

use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{Method, Request, StatusCode};
use tower::ServiceBuilder;
use tower_durable_streams::{
    CacheControlLayer, DurableStreamsService, LongPollLayer, MemoryStorage, SseLayer,
};
use tower_http::validate_request::ValidateRequestHeaderLayer;

/// Where the router nests the streams.
pub const PREFIX: &str = "/streams";

/// The app: `/` and the streams below [`PREFIX`], whose writes need `token`.
pub fn app(token: &str) -> Router {
    let streams = ServiceBuilder::new()
        .layer(ValidateRequestHeaderLayer::custom(writes_need_bearer(
            token,
        )))
        // The auth layer answers with axum's body; make the stream responses
        // the same type.
        .map_response(IntoResponse::into_response)
        .layer(CacheControlLayer::new())
        .layer(SseLayer::new())
        .layer(LongPollLayer::new().timeout(Duration::from_secs(30)))
        .service(DurableStreamsService::new(MemoryStorage::new()).mounted_at(PREFIX));
    Router::new()
        .route("/", get(|| async { "hello from axum\n" }))
        .nest_service(PREFIX, streams)
}

/// Lets reads through, and writes only with `Authorization: Bearer <token>`.
// tower-http's `ValidateRequest` makes the refusal a whole `Response`.
#[allow(clippy::result_large_err)]
fn writes_need_bearer<B>(
    token: &str,
) -> impl FnMut(&mut Request<B>) -> Result<(), Response> + Clone + Send + Sync + 'static {
    let expected = format!("Bearer {token}").into_bytes();
    move |request: &mut Request<B>| {
        if matches!(
            *request.method(),
            Method::GET | Method::HEAD | Method::OPTIONS
        ) {
            return Ok(());
        }
        let given = request.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
        if given.is_some_and(|given| same_secret(given, &expected)) {
            return Ok(());
        }
        Err(Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(WWW_AUTHENTICATE, "Bearer")
            .body(Body::from("writing needs a bearer token\n"))
            .expect("a static response is valid"))
    }
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let token = std::env::var("STREAMS_TOKEN").unwrap_or_else(|_| "let-me-write".into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:4438").await?;
    println!(
        "listening on http://{}{PREFIX}/ (writes need `Authorization: Bearer {token}`)",
        listener.local_addr()?
    );
    axum::serve(listener, app(&token)).await?;
    Ok(())
}
