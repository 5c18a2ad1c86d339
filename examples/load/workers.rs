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
    /// The server's process, whose CPU time over the window is measured.
    pub server_pid: Option<u32>,
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
    /// CPU time (user and system) the server spent over the window.
    pub server_cpu: Option<Duration>,
}

impl Tally {
    /// Counted requests per second.
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The server's CPU time per counted request, in microseconds.
    pub fn server_cpu_us_per_op(&self) -> Option<f64> {
        let cpu = self.server_cpu?;
        (self.ops > 0).then(|| cpu.as_secs_f64() * 1e6 / self.ops as f64)
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
    // The server's CPU time at the window's two ends.
    let sampler = limits.server_pid.map(|pid| {
        tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let before = cpu_time(pid)?;
            tokio::time::sleep_until(end.into()).await;
            Some(cpu_time(pid)?.saturating_sub(before))
        })
    });
    let mut total = Tally::default();
    while let Some(tally) = workers.join_next().await {
        total.absorb(tally?);
    }
    if let Some(sampler) = sampler {
        total.server_cpu = sampler.await?;
    }
    Ok(total)
}

/// The CPU time, user and system, that process `pid` has used so far, from
/// /proc/<pid>/stat (Linux's clock ticks are 1/100 s).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it do not.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15, the 12th and 13th after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
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
