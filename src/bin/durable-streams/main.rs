//! `durable-streams`: a standalone Durable Streams server, and a client
//! for one from the command line.

mod cli;
mod hangup;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use http::{Method, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tower::{ServiceBuilder, ServiceExt};

use crate::hangup::{poll_hangup, Hangup, Live, Socket};
use tower_durable_streams::storage::{
    FileStorage, PostgresStorage, StorageRequest, StorageResponse, StreamError, SyncMode,
};
use tower_durable_streams::{
    subscription::Subscriptions, CacheControlLayer, DurableStreamsService, LongPollLayer,
    MemoryStorage, SseLayer,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a client has to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(
    name = "durable-streams",
    version,
    about = "A Durable Streams server and client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the Durable Streams protocol over HTTP/1.1 and h2c.
    Serve(ServeArgs),
    /// Create a stream (or confirm it exists with the same settings).
    Create(cli::Create),
    /// Append to a stream: each argument, or each line of standard input.
    Append(cli::Append),
    /// Read a stream to standard output, and with --follow keep reading.
    Read(cli::Read),
    /// Show a stream's metadata.
    Head(cli::Target),
    /// Close a stream, with an optional final append.
    Close(cli::Close),
    /// Delete a stream.
    Delete(cli::Target),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:4437")]
    addr: SocketAddr,
    /// Where streams are kept.
    #[arg(long, value_enum, default_value_t = Storage::File)]
    storage: Storage,
    /// The directory of file storage.
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    /// The database of PostgreSQL storage, such as
    /// `postgres://user@host:5432/db`; nodes sharing it share streams.
    #[arg(long, required_if_eq("storage", "postgres"))]
    database_url: Option<String>,
    /// The schema of PostgreSQL storage, created if missing.
    #[arg(long, default_value = "public")]
    database_schema: String,
    /// The most database connections of PostgreSQL storage.
    #[arg(long, default_value_t = 16)]
    database_pool_size: usize,
    /// How long PostgreSQL storage waits to connect (or for a free
    /// connection) before a request gets 503.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    database_connect_timeout: Duration,
    /// The longest a reader at the tail waits on PostgreSQL storage before
    /// it looks again, in case a wake-up from another node was lost.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    database_recheck_interval: Duration,
    /// When a write to file storage is acknowledged: `fsync` (survives power
    /// loss) or `write` (survives a crash of the process only).
    #[arg(long, value_enum, default_value_t = SyncArg::Fsync)]
    sync: SyncArg,
    /// How long a long-poll waits for data, such as `500ms` or `30s`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    long_poll_timeout: Duration,
    /// How long an SSE connection lasts before the server ends it.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    sse_lifetime: Duration,
    /// The largest request body, in bytes.
    #[arg(long, default_value_t = tower_durable_streams::service::DEFAULT_MAX_BODY_SIZE)]
    max_body_size: usize,
    /// The path below which streams live.
    #[arg(long, default_value = "/v1/stream")]
    prefix: String,
    /// Let subscriptions send webhooks to http://localhost and
    /// http://127.0.0.x (for development).
    #[arg(long)]
    allow_localhost_webhooks: bool,
    /// The public URL of the stream root, such as
    /// `https://streams.example.com/v1/stream`, for webhook callback and JWKS
    /// URLs. Default is derived from each subscription's creating request.
    #[arg(long)]
    public_url: Option<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Storage {
    /// A write-ahead log in `--data-dir`: durable.
    File,
    /// In memory: fast, and gone when the process ends.
    Memory,
    /// In PostgreSQL at `--database-url`: durable, shared by every server
    /// node that uses the same database and schema.
    Postgres,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum SyncArg {
    /// Acknowledge after fdatasync.
    Fsync,
    /// Acknowledge after write(2).
    Write,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
        Command::Create(args) => cli::create(args).await,
        Command::Append(args) => cli::append(args).await,
        Command::Read(args) => cli::read(args).await,
        Command::Head(args) => cli::head(args).await,
        Command::Close(args) => cli::close(args).await,
        Command::Delete(args) => cli::delete(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("durable-streams: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match args.storage {
        Storage::Memory => run(args, MemoryStorage::new()).await,
        Storage::File => {
            let sync = match args.sync {
                SyncArg::Fsync => SyncMode::Fsync,
                SyncArg::Write => SyncMode::Write,
            };
            let storage = FileStorage::builder().sync(sync).open(&args.data_dir)?;
            run(args, storage).await
        }
        Storage::Postgres => {
            let url = args
                .database_url
                .clone()
                .ok_or("--storage postgres needs --database-url")?;
            let storage = PostgresStorage::builder(url)
                .schema(&args.database_schema)
                .pool_size(args.database_pool_size)
                .connect_timeout(args.database_connect_timeout)
                .recheck_interval(args.database_recheck_interval)
                .connect()
                .await?;
            run(args, storage).await
        }
    }
}

async fn run<S>(args: ServeArgs, storage: S) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: tower::Service<StorageRequest, Response = StorageResponse, Error = StreamError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    let mut subscriptions =
        Subscriptions::new().allow_localhost_webhooks(args.allow_localhost_webhooks);
    if let Some(url) = &args.public_url {
        subscriptions = subscriptions.public_url(url);
    }
    let streams = ServiceBuilder::new()
        .layer(CacheControlLayer::new())
        .layer(SseLayer::new().connection_lifetime(args.sse_lifetime))
        .layer(LongPollLayer::new().timeout(args.long_poll_timeout))
        .service(
            DurableStreamsService::new(storage)
                .prefix(args.prefix.clone())
                .max_body_size(args.max_body_size)
                .subscriptions(subscriptions),
        );
    let app = App {
        streams,
        socket: None,
    };

    let listener = TcpListener::bind(args.addr).await?;
    tracing::info!(addr = %listener.local_addr()?, storage = ?args.storage, prefix = %args.prefix, "listening");
    let mut http1 = http1::Builder::new();
    // A client gets 30 seconds to send its request head. Clients that
    // half-close after sending (`printf ... | nc -N`) still get their
    // response; those of live reads are watched for (see `hangup`).
    http1
        .half_close(true)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    // h2 connections are pinged so dead peers are noticed.
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30));
    let protocols = Arc::new(Protocols { http1, http2 });
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(
                    stream,
                    peer,
                    app.clone(),
                    protocols.clone(),
                    graceful.watcher(),
                ));
            }
            () = &mut shutdown => break,
        }
    }
    tracing::info!("shutting down");
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("closing connections that are still open");
    }
    Ok(())
}

/// The connection settings of the two protocols the server speaks.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

/// Serves one connection, in either protocol.
///
/// The task of a connection lives as long as the connection, which for an
/// SSE reader is long, so it is kept small: the settings are shared, and
/// each protocol's connection state is boxed, sized for that protocol
/// alone. One future holding both would be about 4 KB.
async fn connection<S, B>(
    stream: TcpStream,
    peer: SocketAddr,
    mut service: App<S>,
    protocols: Arc<Protocols>,
    watcher: Watcher,
) where
    App<S>: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    <App<S> as hyper::service::Service<Request<Incoming>>>::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let ended: Result<(), BoxError> = match speaks_h2(&stream).await {
        Ok(true) => {
            let conn = protocols
                .http2
                .serve_connection(TokioIo::new(stream), service);
            Box::pin(watcher.watch(conn)).await.map_err(Into::into)
        }
        Ok(false) => {
            let socket = Socket::new(stream);
            service.socket = Some(socket.clone());
            let conn = protocols
                .http1
                .serve_connection(TokioIo::new(socket), service);
            Box::pin(watcher.watch(conn)).await.map_err(Into::into)
        }
        Err(e) => Err(e.into()),
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Whether a new connection opens with the HTTP/2 connection preface (h2c
/// with prior knowledge); anything else is served as HTTP/1.
///
/// The bytes are peeked, not read, so each protocol's connection reads the
/// request from the socket itself, into buffers of its usual size.
async fn speaks_h2(stream: &TcpStream) -> std::io::Result<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let peek = async {
        let mut buf = [0u8; PREFACE.len()];
        loop {
            let n = stream.peek(&mut buf).await?;
            if n == 0 || buf[..n] != PREFACE[..n] {
                return Ok(false);
            }
            if n == PREFACE.len() {
                return Ok(true);
            }
            // Part of the preface so far: peeking again at once would find
            // the same bytes.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(HEADER_READ_TIMEOUT, peek)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// The server's routes: `/health`, and the streams everywhere else.
///
/// It is hyper's service, called with `&self` for each request on a
/// connection, rather than a tower service behind hyper-util's adapter: the
/// stack is ready at once, so a request costs one clone of it and no boxed
/// future on the way in.
#[derive(Clone)]
struct App<S> {
    streams: S,
    /// The socket of the HTTP/1 connection this copy serves, watched while
    /// a live read is under way.
    socket: Option<Socket>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for App<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Live<Either<Full<Bytes>, B>>>;
    type Error = BoxError;
    type Future = AppFuture<S>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        if request.uri().path() == "/health"
            && matches!(*request.method(), Method::GET | Method::HEAD)
        {
            let ok = Response::new(Full::new(Bytes::from_static(b"ok\n")));
            return AppFuture::new(AppKind::Health { response: Some(ok) }, None);
        }
        let hangup = match &self.socket {
            Some(socket) if is_live(request.uri()) => Some(Hangup::new(socket.clone())),
            _ => None,
        };
        let mut streams = self.streams.clone();
        // The layers and the service are always ready; a stack that is not
        // is waited for the usual way.
        let mut cx = Context::from_waker(Waker::noop());
        let kind = match streams.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => AppKind::Streams {
                future: streams.call(request),
            },
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => AppKind::Waiting {
                future: Box::pin(streams.oneshot(request)),
            },
        };
        AppFuture::new(kind, hangup)
    }
}

/// Whether `uri` asks for a live read (`live=long-poll`, `live=sse`).
fn is_live(uri: &http::Uri) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&')
            .any(|pair| pair.split('=').next() == Some("live"))
    })
}

pin_project_lite::pin_project! {
    /// The future of [`App`]: a live read ends early if its client hangs up.
    struct AppFuture<S>
    where
        S: tower::Service<Request<Incoming>>,
    {
        #[pin]
        kind: AppKind<S>,
        hangup: Option<Hangup>,
    }
}

impl<S: tower::Service<Request<Incoming>>> AppFuture<S> {
    fn new(kind: AppKind<S>, hangup: Option<Hangup>) -> Self {
        Self { kind, hangup }
    }
}

pin_project_lite::pin_project! {
    #[project = AppProj]
    enum AppKind<S>
    where
        S: tower::Service<Request<Incoming>>,
    {
        Health { response: Option<Response<Full<Bytes>>> },
        Streams { #[pin] future: S::Future },
        Waiting { future: Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>> },
    }
}

impl<S, B> Future for AppFuture<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
{
    type Output = Result<Response<Live<Either<Full<Bytes>, B>>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let polled = match this.kind.project() {
            AppProj::Health { response } => Poll::Ready(Ok(response
                .take()
                .expect("polled after completion")
                .map(Either::Left))),
            AppProj::Streams { future } => future.poll(cx).map_ok(|r| r.map(Either::Right)),
            AppProj::Waiting { future } => {
                future.as_mut().poll(cx).map_ok(|r| r.map(Either::Right))
            }
        };
        let response = match polled {
            Poll::Ready(Ok(response)) => response,
            Poll::Ready(Err(never)) => match never {},
            // A long poll waiting at the tail for a client that has gone.
            Poll::Pending => {
                return poll_hangup(this.hangup, cx).map(|hung_up| Err(hung_up.into()))
            }
        };
        let hangup = this.hangup.take();
        Poll::Ready(Ok(response.map(|body| Live::new(body, hangup))))
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
