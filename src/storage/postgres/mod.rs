//! [`PostgresStorage`]: streams kept in PostgreSQL, shared by any number of
//! server nodes.
//!
//! Nodes keep no state of their own beyond a connection pool, so they can be
//! added, removed and restarted freely. What they share:
//!
//! - **Tables**, created or migrated at start-up in a schema of their own
//!   (default `public`), versioned in `ds_schema_version`. Connections
//!   name themselves `durable-streams/<schema>` in `pg_stat_activity`.
//! - **Atomic appends.** An append reads its stream's row and the claiming
//!   producer's state, lets [`rules::plan_append`](super::rules::plan_append)
//!   decide, then writes the records, the new tail, `Stream-Seq`, closure
//!   and the producer's state in one statement that applies only if the row
//!   is unchanged since it was read; if another writer came first, the
//!   append decides again. A node remembers the row its last append to a
//!   stream left and decides the next on it, so while a stream's writers
//!   are on one node an append is one round trip. Offsets are the same as
//!   every other backend's.
//! - **Wake-ups across nodes.** A node wakes its own readers at once, and
//!   tells the others with `pg_notify`, batched and outside any append's
//!   transaction; each node `LISTEN`s on a dedicated connection that
//!   reconnects after a database restart. A reader waiting at the tail also
//!   wakes after a re-check interval (default 1 second), so a lost hint
//!   delays it by at most that.
//! - **Forks without copies**: a fork stores its own records only and reads
//!   below its fork point from its source, which a delete keeps (as gone to
//!   clients) while forks read from it.
//! - **Compact storage.** Records are stored several to a row; a background
//!   task merges runs of small rows into rows of about 64 KiB, so a million
//!   small appends do not stay a million rows.
//! - **Expiry.** Sliding TTLs renewed by reads are written in batches once a
//!   second; writes renew them directly. Expired streams are deleted when
//!   next touched, or by a periodic sweep.
//!
//! When the database cannot be reached, requests fail with
//! [`StreamErrorKind::Unavailable`]
//! (`503 Service Unavailable`) and nothing is half written, since every
//! change commits as one transaction; the pool reconnects when the database
//! is back.
//!
//! # Example
//!
//! ```no_run
//! use tower_durable_streams::storage::PostgresStorage;
//! use tower_durable_streams::DurableStreamsService;
//!
//! # async fn run() -> Result<(), tower_durable_streams::storage::StreamError> {
//! let storage = PostgresStorage::builder("postgres://postgres@127.0.0.1:5432/streams")
//!     .schema("durable_streams")
//!     .pool_size(32)
//!     .connect()
//!     .await?;
//! let service = DurableStreamsService::new(storage).prefix("/v1/stream");
//! # drop(service);
//! # Ok(())
//! # }
//! ```

mod error;
mod lifecycle;
mod maintenance;
mod read;
mod row;
mod schema;
mod store;
mod wake;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tower_service::Service;

use self::store::Store;
use self::wake::{PgWake, Waiters};
use super::{StorageRequest, StorageResponse, StreamError, StreamErrorKind};
use crate::BoxFuture;

/// A storage backend in a PostgreSQL database, which any number of nodes
/// may share.
///
/// Cloning is cheap and clones share one connection pool. Build one with
/// [`PostgresStorage::connect`] or [`PostgresStorage::builder`]; both must
/// be called inside a Tokio runtime, where the background tasks run until
/// the last clone is dropped.
#[derive(Clone)]
pub struct PostgresStorage {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Store>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl PostgresStorage {
    /// Connects to the database at `url` (such as
    /// `postgres://user@host:5432/db`) with the default settings, creating
    /// or migrating the tables.
    ///
    /// # Errors
    ///
    /// When the URL is malformed (`Invalid`), or the database cannot be
    /// reached or migrated (`Unavailable`).
    pub async fn connect(url: &str) -> Result<Self, StreamError> {
        Self::builder(url).connect().await
    }

    /// A builder for a storage at `url`, to change its settings.
    pub fn builder(url: impl Into<String>) -> PostgresStorageBuilder {
        PostgresStorageBuilder {
            url: url.into(),
            schema: "public".into(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            recheck: Duration::from_secs(1),
        }
    }
}

impl fmt::Debug for PostgresStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStorage").finish_non_exhaustive()
    }
}

/// Settings of a [`PostgresStorage`]; see [`PostgresStorage::builder`].
#[derive(Debug, Clone)]
pub struct PostgresStorageBuilder {
    url: String,
    schema: String,
    pool_size: usize,
    connect_timeout: Duration,
    recheck: Duration,
}

impl PostgresStorageBuilder {
    /// The schema the tables live in, created if missing: lowercase ASCII
    /// letters, digits and `_`, at most 46 characters. Nodes that share
    /// streams use the same schema. Default is `public`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The most connections this node opens for requests (one more listens
    /// for wake-ups). Default is 16.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// How long connecting may take before a request fails with
    /// `Unavailable`. Default is 5 seconds.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The longest a reader waiting at the tail sleeps before it looks
    /// again, in case a wake-up from another node was lost. Default is 1
    /// second.
    pub fn recheck_interval(mut self, interval: Duration) -> Self {
        self.recheck = interval;
        self
    }

    /// Connects, creates or migrates the tables, and starts the background
    /// tasks.
    ///
    /// # Errors
    ///
    /// When the URL or schema is malformed (`Invalid`), or the database
    /// cannot be reached or migrated, or has a newer schema than this code
    /// knows (`Unavailable`).
    pub async fn connect(self) -> Result<PostgresStorage, StreamError> {
        let valid_schema = !self.schema.is_empty()
            && self.schema.len() <= 46
            && !self.schema.starts_with(|c: char| c.is_ascii_digit())
            && self
                .schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid_schema {
            return Err(StreamError::invalid(format!(
                "schema name {:?}: use lowercase letters, digits and _",
                self.schema
            )));
        }
        let mut config = tokio_postgres::Config::from_str(&self.url).map_err(|e| {
            StreamError::with_source(StreamErrorKind::Invalid, "malformed database URL", e)
        })?;
        config
            .connect_timeout(self.connect_timeout)
            .application_name(format!("durable-streams/{}", self.schema));

        let unavailable = |what: &str, e: tokio_postgres::Error| {
            let cause =
                std::error::Error::source(&e).map_or_else(String::new, |c| format!(": {c}"));
            StreamError::with_source(
                StreamErrorKind::Unavailable,
                format!("database unavailable: {what}: {e}{cause}"),
                e,
            )
        };
        let (mut client, connection) = config
            .connect(NoTls)
            .await
            .map_err(|e| unavailable("cannot connect", e))?;
        let driver = tokio::spawn(connection);
        let found = schema::migrate(&mut client, &self.schema)
            .await
            .map_err(|e| unavailable("cannot migrate the schema", e))?;
        drop(client);
        let _ = driver.await;
        if found > schema::latest() {
            return Err(StreamError::new(
                StreamErrorKind::Unavailable,
                format!(
                    "the database schema is at version {found}, newer than this server's {}",
                    schema::latest()
                ),
            ));
        }

        let mut pooled = config.clone();
        pooled.options(format!("-c search_path={}", self.schema));
        let manager = Manager::from_config(
            pooled,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(self.connect_timeout))
            .create_timeout(Some(self.connect_timeout))
            .recycle_timeout(Some(self.connect_timeout))
            .build()
            .map_err(|e| StreamError::internal(e.to_string()))?;

        let waiters = Arc::new(Waiters::default());
        let node = node_id();
        let (channel, [sender, listener], mut listening) = PgWake::start(
            pool.clone(),
            config,
            format!("ds_wake_{}", self.schema),
            node,
            waiters.clone(),
        );
        // Ready once hints from other nodes arrive: a reader that waited
        // before would be woken for nothing when the listener starts.
        let listened = tokio::time::timeout(self.connect_timeout, listening.wait_for(|on| *on));
        if !matches!(listened.await, Ok(Ok(_))) {
            tracing::warn!(
                "not yet listening for wake hints; live readers recheck every {:?} until then",
                self.recheck
            );
        }
        let store = Arc::new(Store {
            pool,
            waiters,
            channel: Box::new(channel),
            touches: Arc::new(Mutex::new(HashMap::new())),
            recheck: self.recheck,
            appending: Mutex::new(HashMap::new()),
            to_compact: Mutex::new(HashSet::new()),
        });
        let maintenance = tokio::spawn(maintenance::run(Arc::downgrade(&store)));
        tracing::debug!(schema = %self.schema, node, "PostgreSQL storage ready");
        Ok(PostgresStorage {
            inner: Arc::new(Inner {
                store,
                tasks: vec![sender, listener, maintenance],
            }),
        })
    }
}

/// An identifier for this node's notifications, so it can skip its own:
/// the process and the time it started this storage.
fn node_id() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (u64::from(std::process::id()) << 32) | u64::from(nanos)
}

impl Service<StorageRequest> for PostgresStorage {
    type Response = StorageResponse;
    type Error = StreamError;
    type Future = BoxFuture<Result<StorageResponse, StreamError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), StreamError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: StorageRequest) -> Self::Future {
        let store = self.inner.store.clone();
        Box::pin(async move { handle(&store, request).await })
    }
}

async fn handle(store: &Store, request: StorageRequest) -> Result<StorageResponse, StreamError> {
    Ok(match request {
        StorageRequest::Create(create) => {
            let (created, info) = store.create(create).await?;
            StorageResponse::Created { created, info }
        }
        StorageRequest::Append(append) => StorageResponse::Appended(store.append(append).await?),
        StorageRequest::Read(read) => StorageResponse::Read(store.read(read).await?),
        StorageRequest::Head { path } => StorageResponse::Head(store.head(&path).await?),
        StorageRequest::Delete { path } => {
            store.delete(&path).await?;
            StorageResponse::Deleted
        }
        StorageRequest::List { prefix } => StorageResponse::Streams(store.list(&prefix).await?),
        StorageRequest::SetMeta { key, value } => {
            store.set_meta(&key, value).await?;
            StorageResponse::MetaSet
        }
        StorageRequest::ListMeta { prefix } => {
            StorageResponse::Meta(store.list_meta(&prefix).await?)
        }
    })
}
