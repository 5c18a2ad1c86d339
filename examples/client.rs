//! The client from a program: follow a stream like `tail -f`, or produce
//! lines from standard input with an idempotent producer.
//!
//! ```sh
//! cargo run --release --features server -- serve --storage memory &
//! cargo run --example client --features client -- produce http://127.0.0.1:4437/v1/stream/log
//! cargo run --example client --features client -- tail http://127.0.0.1:4437/v1/stream/log
//! ```
//!
//! `tail` resumes after the server restarts, from the last offset it
//! printed; `produce` resends what got no answer, and the server keeps each
//! line once.

use std::io::{BufRead, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use tower_durable_streams::client::{
    Client, CreateOptions, Error, Live, ProducerOptions, ReadOptions,
};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let (Some(mode), Some(url)) = (args.next(), args.next()) else {
        eprintln!("usage: client tail|produce STREAM_URL");
        std::process::exit(2);
    };
    let stream = Client::new(url)?.stream("");
    match mode.as_str() {
        "tail" => {
            let mut reader = stream.read(ReadOptions::new().live(Live::Auto));
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = reader.next_chunk().await {
                let chunk = chunk?;
                let _ = out.write_all(&chunk.data);
                let _ = out.flush();
                if chunk.closed {
                    eprintln!("(the stream was closed)");
                }
            }
        }
        "produce" => {
            stream
                .create(CreateOptions::new().content_type("text/plain"))
                .await?;
            // A fresh epoch per run, so this run's sequence numbers are
            // never taken for an earlier run's: milliseconds, since two
            // runs can start within one second.
            let epoch = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let producer = stream.idempotent_producer(
                "example-producer",
                epoch,
                ProducerOptions::new().auto_claim(true),
            );
            for line in std::io::stdin().lock().lines() {
                let Ok(mut line) = line else { break };
                line.push('\n');
                producer.append(line).await?;
            }
            producer.flush().await?;
        }
        _ => {
            eprintln!("usage: client tail|produce STREAM_URL");
            std::process::exit(2);
        }
    }
    Ok(())
}
