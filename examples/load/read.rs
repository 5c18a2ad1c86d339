//! `read`: catch-up reads of one whole stream, or of its last bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};

use crate::client::{drain, header_str, next_offset, read_uri, Conn, Target};
use crate::report::Report;
use crate::workers::{drive, Limits, Op};
use crate::Error;

/// The most requests one catch-up read may take before it counts as an error.
const MAX_REQUESTS_PER_READ: u32 = 10_000;

/// Options of the `read` scenario.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Bytes in the stream.
    #[arg(long, default_value_t = 1 << 20)]
    size: usize,
    /// Bytes in each append that fills the stream.
    #[arg(long, default_value_t = 64 << 10)]
    chunk_size: usize,
    /// Read only the last this many bytes (written as the stream's last
    /// append) instead of the whole stream.
    #[arg(long)]
    tail: Option<usize>,
    /// Connections, each with one read in flight.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// The measured time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The server's process id: its CPU time over the measured window is
    /// reported per request.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Time before measuring starts.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// The most reads of the run, warm-up included.
    #[arg(long, default_value_t = 10_000_000)]
    max_reads: u64,
}

#[derive(Clone)]
struct CatchUp {
    path: Arc<str>,
    from: Arc<str>,
    expected: u64,
    /// Requests and whole reads of the run, warm-up included.
    counts: Arc<[AtomicU64; 2]>,
}

impl Op for CatchUp {
    async fn call(&self, conn: &mut Conn, _: usize, _: u64) -> Result<u64, Error> {
        let mut offset = self.from.to_string();
        let mut total = 0;
        for _ in 0..MAX_REQUESTS_PER_READ {
            let uri = read_uri(&self.path, &offset, "")?;
            let response = conn.send(Method::GET, uri, &[], Bytes::new()).await?;
            self.counts[0].fetch_add(1, Ordering::Relaxed);
            let status = response.status();
            let up_to_date = header_str(response.headers(), "stream-up-to-date") == Some("true");
            let next = next_offset(response.headers());
            total += drain(response.into_body(), conn.timeout()).await?;
            if status != StatusCode::OK {
                return Err(format!("GET {}: {status}", self.path).into());
            }
            if up_to_date {
                if total != self.expected {
                    return Err(format!("read {total} bytes, expected {}", self.expected).into());
                }
                self.counts[1].fetch_add(1, Ordering::Relaxed);
                return Ok(total);
            }
            offset = next.ok_or("a read without Stream-Next-Offset")?;
        }
        Err("the read never reached the tail".into())
    }
}

/// Runs the scenario.
pub async fn run(target: &Target, options: Options) -> Result<Report, Error> {
    let tail = options.tail.unwrap_or(0);
    if options.size == 0 || options.chunk_size == 0 || tail > options.size {
        return Err("--size and --chunk-size must be at least 1, --tail at most --size".into());
    }
    let content_type = HeaderValue::from_static("application/octet-stream");
    let path = target.stream_path("read");
    let mut setup = target.connect().await?;
    let mut offset = setup.create(&path, &content_type).await?;
    let uri: http::Uri = path.parse()?;
    let mut left = options.size - tail;
    while left > 0 {
        let n = left.min(options.chunk_size);
        let body = Bytes::from(vec![b'r'; n]);
        offset = setup
            .append(uri.clone(), &content_type, body)
            .await?
            .ok_or("an append without Stream-Next-Offset")?;
        left -= n;
    }
    let from = match options.tail {
        Some(tail) => {
            setup
                .append(uri.clone(), &content_type, Bytes::from(vec![b't'; tail]))
                .await?;
            offset
        }
        None => "-1".to_owned(),
    };
    drop(setup);

    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let op = CatchUp {
        path: path.into(),
        from: from.into(),
        expected: if options.tail.is_some() {
            tail as u64
        } else {
            options.size as u64
        },
        counts: counts.clone(),
    };
    let limits = Limits {
        connections: options.connections,
        warmup: options.warmup,
        duration: options.duration,
        max_requests: options.max_reads,
        server_pid: options.server_pid,
    };
    let tally = drive(target, limits, op).await?;
    let [requests, reads] = &*counts;
    let requests_per_read =
        requests.load(Ordering::Relaxed) as f64 / reads.load(Ordering::Relaxed).max(1) as f64;
    Ok(Report::new("read")
        .param("size", options.size)
        .param("tail", tail)
        .param("connections", options.connections)
        .param("duration_s", options.duration.as_secs_f64())
        .metric("ops_per_sec", tally.rate())
        .metric("gb_per_sec", tally.bytes_rate() / 1e9)
        .metric("reads", tally.ops)
        .metric("requests_per_read", requests_per_read)
        .metric("errors", tally.errors)
        .metric_opt("server_cpu_us_per_op", tally.server_cpu_us_per_op())
        .first_error(tally.first_error)
        .latencies(tally.latencies))
}
