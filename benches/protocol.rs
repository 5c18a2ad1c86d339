//! Micro-benchmarks of the protocol's hot paths, through the public API:
//! offsets, appends (bytes and JSON flattening), catch-up reads and SSE
//! encoding, on memory storage with no network in between.
//!
//! ```sh
//! cargo bench --bench protocol
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::runtime::Runtime;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_durable_streams::{DurableStreamsService, MemoryStorage, Offset, SseLayer};

/// Sends one request and returns the response with its whole body.
async fn send<S, B>(service: &mut S, request: Request<Full<Bytes>>) -> (StatusCode, Bytes)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let response = service
        .ready()
        .await
        .expect("the service is always ready")
        .call(request)
        .await
        .expect("the service answers every request");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("memory bodies do not fail")
        .to_bytes();
    (status, body)
}

/// A PUT that creates `path` with `content_type` and `body`.
fn put(path: &str, content_type: &str, closed: bool, body: Bytes) -> Request<Full<Bytes>> {
    let mut request = Request::put(path).header("content-type", content_type);
    if closed {
        request = request.header("stream-closed", "true");
    }
    request.body(Full::new(body)).expect("a valid request")
}

fn offsets(c: &mut Criterion) {
    let offset = Offset::new(123_456, 987_654_321).expect("a valid offset");
    let text = offset.to_string();
    let mut group = c.benchmark_group("offset");
    group.bench_function("format", |b| b.iter(|| black_box(offset).to_string()));
    group.bench_function("parse", |b| {
        b.iter(|| black_box(text.as_str()).parse::<Offset>())
    });
    group.finish();
}

/// Appends to a fresh stream of `content_type`: `iters` POSTs of `body`,
/// timed together, so memory stays bounded by one sample.
fn time_appends(rt: &Runtime, iters: u64, content_type: &str, body: &Bytes) -> Duration {
    rt.block_on(async {
        let mut service = ServiceBuilder::new()
            .layer(SseLayer::new())
            .service(DurableStreamsService::new(MemoryStorage::new()));
        let (status, _) = send(&mut service, put("/s", content_type, false, Bytes::new())).await;
        assert_eq!(status, StatusCode::CREATED);
        let start = Instant::now();
        for _ in 0..iters {
            let post = Request::post("/s")
                .header("content-type", content_type)
                .body(Full::new(body.clone()))
                .expect("a valid request");
            let (status, _) = send(&mut service, post).await;
            debug_assert_eq!(status, StatusCode::NO_CONTENT);
        }
        start.elapsed()
    })
}

fn appends(c: &mut Criterion) {
    let rt = Runtime::new().expect("a tokio runtime");
    let bytes = Bytes::from(vec![b'x'; 256]);
    let messages: Vec<String> = (0..100)
        .map(|i| format!(r#"{{"id":{i},"name":"message {i}","tags":["a","b"]}}"#))
        .collect();
    let json = Bytes::from(format!("[{}]", messages.join(",")));

    let mut group = c.benchmark_group("append");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("bytes_256", |b| {
        b.iter_custom(|iters| time_appends(&rt, iters, "application/octet-stream", &bytes))
    });
    group.throughput(Throughput::Elements(messages.len() as u64));
    group.bench_function("json_array_100", |b| {
        b.iter_custom(|iters| time_appends(&rt, iters, "application/json", &json))
    });
    group.finish();
}

fn reads(c: &mut Criterion) {
    let rt = Runtime::new().expect("a tokio runtime");
    let size = 64 << 10;
    // Lines of 64 bytes, so SSE text splits every payload into many lines.
    let line = format!("{}\n", "t".repeat(63));
    let text = Bytes::from(line.repeat(size / 64));
    let binary = Bytes::from((0..size).map(|i| i as u8).collect::<Vec<_>>());
    let mut service = ServiceBuilder::new()
        .layer(SseLayer::new())
        .service(DurableStreamsService::new(MemoryStorage::new()));
    rt.block_on(async {
        // Closed streams, so an SSE read ends after its one control event.
        send(&mut service, put("/text", "text/plain", true, text)).await;
        send(
            &mut service,
            put("/bin", "application/octet-stream", true, binary),
        )
        .await;
    });

    let mut group = c.benchmark_group("read");
    group.throughput(Throughput::Bytes(size as u64));
    let cases = [
        ("catch_up_64k", "/bin?offset=-1"),
        ("sse_text_64k", "/text?offset=-1&live=sse"),
        ("sse_base64_64k", "/bin?offset=-1&live=sse"),
    ];
    for (name, uri) in cases {
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let get = Request::get(uri)
                        .body(Full::new(Bytes::new()))
                        .expect("a valid request");
                    let (status, body) = send(&mut service.clone(), get).await;
                    assert_eq!(status, StatusCode::OK);
                    body.len()
                })
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = offsets, appends, reads
}
criterion_main!(benches);
