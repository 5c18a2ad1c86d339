//! `create`: C connections create new, empty streams.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, StatusCode};

use crate::client::{drain, Conn, Target};
use crate::report::Report;
use crate::workers::{drive, Limits, Op};
use crate::Error;

/// Options of the `create` scenario.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Connections, each with one request in flight.
    #[arg(long, default_value_t = 16)]
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
    /// The most streams of the run, warm-up included.
    #[arg(long, default_value_t = 2_000_000)]
    max_creates: u64,
}

#[derive(Clone)]
struct Create {
    prefix: Arc<str>,
    content_type: HeaderValue,
}

impl Op for Create {
    async fn call(&self, conn: &mut Conn, worker: usize, n: u64) -> Result<u64, Error> {
        let uri = format!("{}-{worker}-{n}", self.prefix).parse()?;
        let headers = [(CONTENT_TYPE, &self.content_type)];
        let response = conn.send(Method::PUT, uri, &headers, Bytes::new()).await?;
        let status = response.status();
        drain(response.into_body(), conn.timeout()).await?;
        if status != StatusCode::CREATED {
            return Err(format!("PUT: {status}, expected 201").into());
        }
        Ok(0)
    }
}

/// Runs the scenario.
pub async fn run(target: &Target, options: Options) -> Result<Report, Error> {
    let op = Create {
        prefix: target.stream_path("create").into(),
        content_type: HeaderValue::from_static("application/octet-stream"),
    };
    let limits = Limits {
        connections: options.connections,
        warmup: options.warmup,
        duration: options.duration,
        max_requests: options.max_creates,
        server_pid: options.server_pid,
    };
    let tally = drive(target, limits, op).await?;
    Ok(Report::new("create")
        .param("connections", options.connections)
        .param("duration_s", options.duration.as_secs_f64())
        .metric("ops_per_sec", tally.rate())
        .metric("creates", tally.ops)
        .metric("errors", tally.errors)
        .metric_opt("server_cpu_us_per_op", tally.server_cpu_us_per_op())
        .first_error(tally.first_error)
        .latencies(tally.latencies))
}
