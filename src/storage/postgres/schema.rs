//! The tables, created or migrated at start-up.
//!
//! Each migration runs once, in order, in one transaction that holds an
//! advisory lock, so nodes starting together do not race; the version
//! reached is kept in `ds_schema_version`.

use tokio_postgres::Client;

/// The migrations, oldest first. Version `n` is `MIGRATIONS[n - 1]`.
const MIGRATIONS: &[&str] = &[r"
CREATE SEQUENCE ds_stream_ids;

-- One row per stream, soft-deleted ones kept for their forks included.
-- Offsets are two bigints each: records before, bytes before.
CREATE TABLE ds_streams (
    id bigint PRIMARY KEY,
    path text NOT NULL UNIQUE,
    content_type text NOT NULL,
    ttl_secs bigint,
    expires_secs bigint,
    expires_nanos integer,
    touched_us bigint NOT NULL,
    closed boolean NOT NULL,
    stream_seq text,
    fork_source text,
    fork_anchor_index bigint,
    fork_anchor_pos bigint,
    fork_sub bigint,
    source_id bigint,
    base_index bigint NOT NULL,
    base_pos bigint NOT NULL,
    tail_index bigint NOT NULL,
    tail_pos bigint NOT NULL,
    forks bigint NOT NULL DEFAULT 0,
    deleted boolean NOT NULL DEFAULT false,
    -- Bumped by every change; an append applies only if it is unchanged
    -- since the append read the row.
    version bigint NOT NULL DEFAULT 0,
    -- Rows appended since the compactor last looked at the stream. Not
    -- indexed, and pages keep room, so that an append's update of the
    -- row is a heap-only (HOT) update that touches no index.
    uncompacted integer NOT NULL DEFAULT 0
) WITH (fillfactor = 80);
CREATE INDEX ds_streams_expiring ON ds_streams (id)
    WHERE NOT deleted AND (ttl_secs IS NOT NULL OR expires_secs IS NOT NULL);

-- Records, several to a row: `data` is their bytes end to end and `lens`
-- each one's length. The row holds records start_index .. end_index.
CREATE TABLE ds_chunks (
    stream_id bigint NOT NULL,
    start_index bigint NOT NULL,
    start_pos bigint NOT NULL,
    end_index bigint NOT NULL,
    lens integer[] NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (stream_id, start_index)
);
-- Record bytes are mostly compressed already or small; skipping
-- compression keeps length() and slicing cheap.
ALTER TABLE ds_chunks ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE ds_producers (
    stream_id bigint NOT NULL,
    producer text NOT NULL,
    epoch bigint NOT NULL,
    last_seq bigint NOT NULL,
    PRIMARY KEY (stream_id, producer)
);

CREATE TABLE ds_meta (
    key text PRIMARY KEY,
    value bytea NOT NULL
);
"];

/// Creates the schema `schema` if need be and brings its tables to the
/// latest version. Returns the version found, which may be newer than this
/// code knows.
pub(super) async fn migrate(
    client: &mut Client,
    schema: &str,
) -> Result<usize, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // One key for every schema: migrations are rare and short.
    tx.execute("SELECT pg_advisory_xact_lock(7345812093)", &[])
        .await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         SET LOCAL search_path TO \"{schema}\";
         CREATE TABLE IF NOT EXISTS ds_schema_version (version integer NOT NULL);"
    ))
    .await?;
    let current: i32 = tx
        .query_opt("SELECT version FROM ds_schema_version", &[])
        .await?
        .map_or(0, |row| row.get(0));
    if current == 0 {
        tx.execute("INSERT INTO ds_schema_version VALUES (0)", &[])
            .await?;
    }
    let current = usize::try_from(current).unwrap_or(0);
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let version = i32::try_from(version + 1).expect("few migrations");
        tracing::info!(schema, version, "migrating the database schema");
        tx.batch_execute(sql).await?;
        tx.execute("UPDATE ds_schema_version SET version = $1", &[&version])
            .await?;
    }
    tx.commit().await?;
    Ok(current)
}

/// The version [`migrate`] brings a schema to.
pub(super) fn latest() -> usize {
    MIGRATIONS.len()
}
