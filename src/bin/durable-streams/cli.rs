//! The client subcommands: `create`, `append`, `read`, `head`, `close` and
//! `delete`, each on one stream URL.

use std::io::{BufRead, Write};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tower_durable_streams::client::{
    Client, CreateOptions, DurableStream, Error, Live, ProducerOptions, ReadOptions,
};

type Failure = Box<dyn std::error::Error + Send + Sync>;

#[derive(clap::Args, Debug)]
pub(crate) struct Create {
    /// The stream's URL, such as http://127.0.0.1:4437/v1/stream/chat.
    url: String,
    /// The stream's content type.
    #[arg(long, default_value = "application/octet-stream")]
    content_type: String,
    /// A sliding time to live, in seconds.
    #[arg(long, conflicts_with = "expires_at")]
    ttl: Option<u64>,
    /// An absolute expiry, such as 2027-01-01T00:00:00Z.
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    expires_at: Option<SystemTime>,
    /// Create the stream closed.
    #[arg(long)]
    closed: bool,
    /// The stream's first bytes.
    #[arg(long)]
    data: Option<String>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Append {
    /// The stream's URL.
    url: String,
    /// What to append, one append each (one JSON message each on a JSON
    /// stream). Without any, each line of standard input is one.
    data: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Read {
    /// The stream's URL.
    url: String,
    /// Where to start: an offset from an earlier read, -1 for the start, or
    /// now for the tail.
    #[arg(long, default_value = "-1", allow_hyphen_values = true)]
    from: String,
    /// Keep following the stream (SSE, else long-poll) until it is closed.
    #[arg(long)]
    follow: bool,
    /// Print a JSON stream's messages one per line.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Target {
    /// The stream's URL.
    url: String,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Close {
    /// The stream's URL.
    url: String,
    /// A final append, made with the close in one step.
    #[arg(long)]
    data: Option<String>,
}

fn stream(url: &str) -> Result<DurableStream, Error> {
    Ok(Client::new(url)?.stream(""))
}

pub(crate) async fn create(args: Create) -> Result<(), Failure> {
    let mut options = CreateOptions::new()
        .content_type(args.content_type)
        .closed(args.closed);
    if let Some(ttl) = args.ttl {
        options = options.ttl(ttl);
    }
    if let Some(at) = args.expires_at {
        options = options.expires_at(at);
    }
    if let Some(data) = args.data {
        options = options.body(data);
    }
    let created = stream(&args.url)?.create(options).await?;
    let what = if created.created { "created" } else { "exists" };
    println!("{what}, next offset {}", created.next_offset);
    Ok(())
}

pub(crate) async fn append(args: Append) -> Result<(), Failure> {
    let stream = stream(&args.url)?;
    let producer = stream.producer(ProducerOptions::new().linger(Duration::from_millis(10)));
    if args.data.is_empty() {
        // Text keeps its line breaks; a JSON stream takes a message a line.
        let json = is_json(&stream).await?;
        for line in std::io::stdin().lock().lines() {
            let mut line = line?;
            if !json {
                line.push('\n');
            }
            producer.append(line).await?;
        }
    } else {
        for data in args.data {
            producer.append(data).await?;
        }
    }
    producer.flush().await?;
    let tail = stream.head().await?.next_offset;
    println!("next offset {tail}");
    Ok(())
}

async fn is_json(stream: &DurableStream) -> Result<bool, Error> {
    let content_type = stream.head().await?.content_type.unwrap_or_default();
    Ok(content_type.starts_with("application/json"))
}

pub(crate) async fn read(args: Read) -> Result<(), Failure> {
    let live = if args.follow { Live::Auto } else { Live::Off };
    let mut reader = stream(&args.url)?.read(ReadOptions::new().offset(args.from).live(live));
    let mut out = std::io::stdout().lock();
    let mut last = None;
    while let Some(chunk) = reader.next_chunk().await {
        let chunk = chunk?;
        if args.json {
            for message in chunk.json::<serde_json::Value>()? {
                writeln!(out, "{message}")?;
            }
        } else {
            out.write_all(&chunk.data)?;
        }
        out.flush()?;
        last = Some(chunk.next_offset);
    }
    if let Some(offset) = last {
        eprintln!("next offset {offset}");
    }
    Ok(())
}

pub(crate) async fn head(args: Target) -> Result<(), Failure> {
    let meta = stream(&args.url)?.head().await?;
    println!("next offset: {}", meta.next_offset);
    if let Some(ct) = meta.content_type {
        println!("content type: {ct}");
    }
    println!("closed: {}", meta.closed);
    if let Some(ttl) = meta.ttl {
        println!("ttl: {ttl}");
    }
    if let Some(at) = meta.expires_at {
        println!("expires at: {at}");
    }
    Ok(())
}

pub(crate) async fn close(args: Close) -> Result<(), Failure> {
    let stream = stream(&args.url)?;
    let closed = match args.data {
        Some(data) => {
            let producer = stream.producer(ProducerOptions::new());
            producer.close(Some(Bytes::from(data))).await?
        }
        None => stream.close().await?,
    };
    println!("closed, next offset {}", closed.next_offset);
    Ok(())
}

pub(crate) async fn delete(args: Target) -> Result<(), Failure> {
    stream(&args.url)?.delete().await?;
    println!("deleted");
    Ok(())
}
