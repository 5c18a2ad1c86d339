//! A PostgreSQL schema of its own for each test, dropped when the test
//! ends, so concurrent runs never share tables.
//!
//! The database is `DS_TEST_DATABASE_URL`, by default the local one at
//! `postgres://postgres@127.0.0.1:5432/test`. When none is reachable the
//! tests that need one print why and return without checking anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tower_durable_streams::storage::{PostgresStorage, PostgresStorageBuilder, StreamErrorKind};

/// The database tests use when `DS_TEST_DATABASE_URL` is unset.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The database the tests use.
pub fn url() -> String {
    std::env::var("DS_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// A uniquely named schema, dropped with everything in it on drop.
#[derive(Debug)]
pub struct Schema {
    pub url: String,
    pub name: String,
}

impl Schema {
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Self {
            url: url(),
            name: format!(
                "ds_test_{}_{}_{nanos}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    /// A storage in this schema, or `None` (with a message) when no
    /// PostgreSQL is reachable.
    pub async fn storage(&self) -> Option<PostgresStorage> {
        self.connect(self.builder()).await
    }

    /// A builder for a storage in this schema.
    pub fn builder(&self) -> PostgresStorageBuilder {
        PostgresStorage::builder(&self.url).schema(&self.name)
    }

    /// Connects `builder`, or returns `None` (with a message) when no
    /// PostgreSQL is reachable.
    pub async fn connect(&self, builder: PostgresStorageBuilder) -> Option<PostgresStorage> {
        match builder.connect().await {
            Ok(storage) => Some(storage),
            Err(e) if e.kind() == &StreamErrorKind::Unavailable => {
                eprintln!(
                    "SKIPPED: no PostgreSQL reachable at {} (set DS_TEST_DATABASE_URL): {e}",
                    self.url
                );
                None
            }
            Err(e) => panic!("PostgreSQL storage failed to start: {e}"),
        }
    }

    /// The first column of the first row of `sql`, a bigint, run in this
    /// schema on a connection of its own.
    pub async fn query_i64(&self, sql: &str) -> i64 {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
        let driver = tokio::spawn(connection);
        client
            .batch_execute(&format!("SET search_path TO \"{}\"", self.name))
            .await
            .expect("set the schema");
        let value = client
            .query_one(sql, &[])
            .await
            .expect("the query runs")
            .get(0);
        drop(client);
        let _ = driver.await;
        value
    }

    /// Runs `sql` on a connection of its own.
    pub async fn execute(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(connection);
        let result = client.batch_execute(sql).await;
        drop(client);
        let _ = driver.await;
        result
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let url = self.url.clone();
        // A transaction the storage dropped may still hold locks, its
        // rollback queued on a runtime that is no longer polled: end the
        // storage's connections first.
        let sql = format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = 'durable-streams/{0}' AND pid <> pg_backend_pid();
             DROP SCHEMA IF EXISTS \"{0}\" CASCADE",
            self.name
        );
        // Drop may run inside the test's runtime, which cannot be blocked
        // on; a thread of its own can.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the clean-up");
            runtime.block_on(async {
                let Ok((client, connection)) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                else {
                    return;
                };
                let driver = tokio::spawn(connection);
                let _ = client.batch_execute(&sql).await;
                drop(client);
                let _ = driver.await;
            });
        });
        let _ = dropped.join();
    }
}
