//! `append`: C connections append B-byte bodies to S streams.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Uri};

use crate::client::{Conn, Target};
use crate::report::Report;
use crate::workers::{drive, Limits, Op};
use crate::Error;

/// Options of the `append` scenario.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Connections, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Bytes in each append.
    #[arg(long, default_value_t = 256)]
    body_size: usize,
    /// Streams the appends are spread over.
    #[arg(long, default_value_t = 100)]
    streams: usize,
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
    /// The most appends of the run, warm-up included.
    #[arg(long, default_value_t = 20_000_000)]
    max_requests: u64,
    /// The content type of the streams.
    #[arg(long, default_value = "application/octet-stream")]
    content_type: String,
}

#[derive(Clone)]
struct Append {
    streams: Arc<[Uri]>,
    connections: usize,
    content_type: HeaderValue,
    body: Bytes,
}

impl Op for Append {
    async fn call(&self, conn: &mut Conn, worker: usize, n: u64) -> Result<u64, Error> {
        // Worker w's n-th append goes to stream (w + n * C) mod S, so every
        // stream sees appends from many connections.
        let index = (worker as u64 + n * self.connections as u64) % self.streams.len() as u64;
        let uri = self.streams[index as usize].clone();
        conn.append(uri, &self.content_type, self.body.clone())
            .await?;
        Ok(self.body.len() as u64)
    }
}

/// Runs the scenario.
pub async fn run(target: &Target, options: Options) -> Result<Report, Error> {
    if options.connections == 0 || options.streams == 0 || options.body_size == 0 {
        return Err("--connections, --streams and --body-size must be at least 1".into());
    }
    let content_type = HeaderValue::try_from(options.content_type.as_str())?;
    let mut setup = target.connect().await?;
    let mut streams = Vec::with_capacity(options.streams);
    for i in 0..options.streams {
        let path = target.stream_path(&format!("append-{i}"));
        setup.create(&path, &content_type).await?;
        streams.push(path.parse()?);
    }
    drop(setup);
    let op = Append {
        streams: streams.into(),
        connections: options.connections,
        content_type,
        body: Bytes::from(vec![b'x'; options.body_size]),
    };
    let limits = Limits {
        connections: options.connections,
        warmup: options.warmup,
        duration: options.duration,
        max_requests: options.max_requests,
        server_pid: options.server_pid,
    };
    let tally = drive(target, limits, op).await?;
    Ok(Report::new("append")
        .param("connections", options.connections)
        .param("body_size", options.body_size)
        .param("streams", options.streams)
        .param("duration_s", options.duration.as_secs_f64())
        .metric("ops_per_sec", tally.rate())
        .metric("mb_per_sec", tally.bytes_rate() / 1e6)
        .metric("appends", tally.ops)
        .metric("errors", tally.errors)
        .metric_opt("server_cpu_us_per_op", tally.server_cpu_us_per_op())
        .first_error(tally.first_error)
        .latencies(tally.latencies))
}
