//! A closed loop of requests over C connections, for a set time.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::client::{connect_many, Conn, Target};
use crate::report::Latencies;
use crate::Error;

/// One kind of request, made again and again.
pub trait Op: Clone + Send + Sync + 'static {
    /// Makes request `n` of `worker` and returns the bytes it moved.
    fn call(
        &self,
        conn: &mut Conn,
        worker: usize,
        n: u64,
    ) -> impl Future<Output = Result<u64, Error>> + Send;
}

/// How long and how much to run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections, one worker each.
    pub connections: usize,
    /// Time before measuring starts, to fill caches and pools.
    pub warmup: Duration,
    /// The measured time.
    pub duration: Duration,
    /// The most requests of the whole run, warm-up included.
    pub max_requests: u64,
}

/// What the workers measured.
#[derive(Debug, Default)]
pub struct Tally {
    /// Requests that succeeded inside the measured time.
    pub ops: u64,
    /// Bytes those requests moved.
    pub bytes: u64,
    /// Requests that failed, at any time.
    pub errors: u64,
    /// The first failure, to say what went wrong.
    pub first_error: Option<String>,
    /// Latency of each counted request.
    pub latencies: Latencies,
    /// The measured time: the window, or less if the workers ran out of
    /// requests first.
    pub elapsed: Duration,
}

impl Tally {
    /// Counted requests per second.
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Counted bytes per second.
    pub fn bytes_rate(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn absorb(&mut self, other: Tally) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies.merge(other.latencies);
        self.elapsed = self.elapsed.max(other.elapsed);
    }
}

/// Runs `op` on `limits.connections` connections until the window closes or
/// the requests run out.
pub async fn drive<O: Op>(target: &Target, limits: Limits, op: O) -> Result<Tally, Error> {
    if limits.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    let conns = connect_many(target, limits.connections).await?;
    let start = Instant::now() + limits.warmup;
    let end = start + limits.duration;
    let per_worker = limits.max_requests.div_ceil(limits.connections as u64);
    let mut workers = tokio::task::JoinSet::new();
    for (worker, conn) in conns.into_iter().enumerate() {
        let (op, target) = (op.clone(), target.clone());
        workers
            .spawn(async move { work(&target, conn, worker, &op, (start, end), per_worker).await });
    }
    let mut total = Tally::default();
    while let Some(tally) = workers.join_next().await {
        total.absorb(tally?);
    }
    Ok(total)
}

async fn work<O: Op>(
    target: &Target,
    mut conn: Conn,
    worker: usize,
    op: &O,
    (start, end): (Instant, Instant),
    requests: u64,
) -> Tally {
    let mut tally = Tally::default();
    let mut last = start;
    for n in 0..requests {
        let sent = Instant::now();
        if sent >= end {
            last = end;
            break;
        }
        let result = op.call(&mut conn, worker, n).await;
        let done = Instant::now();
        match result {
            Ok(bytes) if sent >= start && done <= end => {
                tally.ops += 1;
                tally.bytes += bytes;
                tally.latencies.record(done - sent);
                last = done;
            }
            Ok(_) => {}
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert_with(|| e.to_string());
                // A request that failed half way leaves the connection in an
                // unknown state: start over on a fresh one.
                match target.connect().await {
                    Ok(fresh) => conn = fresh,
                    Err(_) => break,
                }
            }
        }
    }
    tally.elapsed = last.saturating_duration_since(start);
    tally
}
