//! A Durable Streams server on plain hyper: the protocol service with its
//! cache-control, SSE and long-poll layers, mounted at `/v1/stream`.
//!
//! ```sh
//! cargo run --example hyper_server
//! curl -X PUT localhost:4437/v1/stream/hello -H 'content-type: text/plain' --data-binary 'hi'
//! curl 'localhost:4437/v1/stream/hello?offset=-1'
//! ```

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_durable_streams::{
    CacheControlLayer, DurableStreamsService, LongPollLayer, MemoryStorage, SseLayer,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let streams = ServiceBuilder::new()
        .layer(CacheControlLayer::new())
        .layer(SseLayer::new())
        .layer(LongPollLayer::new().timeout(Duration::from_secs(30)))
        .service(DurableStreamsService::new(MemoryStorage::new()).prefix("/v1/stream"));

    let listener = TcpListener::bind("127.0.0.1:4437").await?;
    println!("listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(streams.clone());
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
