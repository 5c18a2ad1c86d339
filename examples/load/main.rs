//! `load`: drives any Durable Streams server over loopback HTTP/1.1 and
//! reports throughput and latency.
//!
//! ```sh
//! cargo run --release --example load -- append --url http://127.0.0.1:4437/v1/stream
//! cargo run --release --example load -- read --size 1048576 --tail 1024 --json
//! cargo run --release --example load -- sse --subscribers 1000 --server-pid 1234
//! ```
//!
//! `--url` is the URL that stream names are appended to: `/v1/stream` for
//! this crate's server, the root for servers that mount streams there. Every
//! stream a run creates is named after the run, so runs never collide. Only
//! `127.0.0.1` is accepted as a target: the tool is for measuring a server on
//! the same machine, not for loading someone else's.
//!
//! Each run prints one line for people and, with `--json`, one JSON object
//! on standard output (the line then goes to standard error). Every request
//! loop stops by itself, at the end of `--duration` or after its count.

mod append;
mod client;
mod create;
mod live;
mod read;
mod report;
mod workers;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::client::Target;

/// The error type of the tool: anything, with a message.
type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser, Debug)]
#[command(
    name = "load",
    about = "Load a Durable Streams server over loopback HTTP"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

/// Options every scenario takes.
#[derive(Args, Debug, Clone)]
struct Common {
    /// The URL that stream names are appended to; the host must be 127.0.0.1.
    #[arg(long, global = true, default_value = "http://127.0.0.1:4437/v1/stream")]
    url: String,
    /// Print one JSON object per run on standard output.
    #[arg(long, global = true)]
    json: bool,
    /// A name for the server under test, copied into the output.
    #[arg(long, global = true, default_value = "server")]
    label: String,
    /// Worker threads of the client's runtime.
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    /// How long one request may take before it counts as an error.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Appends from C connections to S streams: appends/s, MB/s, latency.
    Append(append::Options),
    /// Catch-up reads of a whole stream, or of its tail: reads/s, GB/s.
    Read(read::Options),
    /// Stream creation: creations/s, latency.
    Create(create::Options),
    /// W long-poll waiters on one stream; wake latency of each append.
    LongPoll(live::LongPollOptions),
    /// W SSE subscribers on one stream; delivery latency and server RSS.
    Sse(live::SseOptions),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.common.threads.max(1))
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    let target = Target::parse(&cli.common.url, cli.common.request_timeout)?;
    let report = match cli.scenario {
        Scenario::Append(options) => append::run(&target, options).await?,
        Scenario::Read(options) => read::run(&target, options).await?,
        Scenario::Create(options) => create::run(&target, options).await?,
        Scenario::LongPoll(options) => live::long_poll(&target, options).await?,
        Scenario::Sse(options) => live::sse(&target, options).await?,
    };
    report.print(&cli.common.label, cli.common.json);
    Ok(())
}
