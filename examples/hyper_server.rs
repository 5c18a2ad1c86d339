//! A Durable Streams server on plain hyper: the protocol service with its
//! cache-control, SSE and long-poll layers, mounted at `/v1/stream`.
//!
//! hyper has no router, so the service sees the whole request path and is
//! told its prefix with [`DurableStreamsService::prefix`]; any other path is
//! its `404`.
//!
//! ```sh
//! cargo run --example hyper_server
//! curl -X PUT localhost:4437/v1/stream/hello -H 'content-type: text/plain' --data-binary 'hi'
//! curl 'localhost:4437/v1/stream/hello?offset=-1'
//! ```
//!
//! `tests/mounts.rs` serves [`app`] with [`serve`] on a free port.

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_durable_streams::cache_control::CacheControl;
use tower_durable_streams::long_poll::LongPoll;
use tower_durable_streams::sse::Sse;
use tower_durable_streams::{
    CacheControlLayer, DurableStreamsService, LongPollLayer, MemoryStorage, SseLayer,
};

/// Where the streams live.
pub const PREFIX: &str = "/v1/stream";

/// The full stack, as `app` builds it.
pub type App = CacheControl<Sse<LongPoll<DurableStreamsService<MemoryStorage>>>>;

/// The protocol over memory storage, with its layers, below [`PREFIX`].
pub fn app() -> App {
    ServiceBuilder::new()
        .layer(CacheControlLayer::new())
        .layer(SseLayer::new())
        .layer(LongPollLayer::new().timeout(Duration::from_secs(30)))
        .service(DurableStreamsService::new(MemoryStorage::new()).prefix(PREFIX))
}

/// Serves `app` on every connection `listener` accepts, HTTP/1.1 or h2c.
pub async fn serve(listener: TcpListener, app: App) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection error: {e}");
            }
        });
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let listener = TcpListener::bind("127.0.0.1:4437").await?;
    println!("listening on http://{}{PREFIX}/", listener.local_addr()?);
    serve(listener, app()).await?;
    Ok(())
}
