//! How database failures become [`StreamError`]s.

use tokio_postgres::error::SqlState;

use crate::storage::{StreamError, StreamErrorKind};

/// A failure of the database or of the way to it, or a request the
/// database cannot store.
pub(super) fn db(error: tokio_postgres::Error) -> StreamError {
    let code = error.code();
    if code == Some(&SqlState::CHARACTER_NOT_IN_REPERTOIRE)
        || code == Some(&SqlState::UNTRANSLATABLE_CHARACTER)
    {
        return StreamError::with_source(
            StreamErrorKind::Invalid,
            "text with a NUL character cannot be stored",
            error,
        );
    }
    if code == Some(&SqlState::PROGRAM_LIMIT_EXCEEDED) {
        return StreamError::with_source(
            StreamErrorKind::Invalid,
            "path or producer id too long to store (keep it under 2,000 bytes)",
            error,
        );
    }
    if unreachable(&error) {
        tracing::warn!(error = %error, "database unavailable");
        return StreamError::with_source(
            StreamErrorKind::Unavailable,
            "database unavailable, retry later",
            error,
        );
    }
    tracing::error!(error = %error, "database error");
    StreamError::internal(error)
}

/// A failure to get a connection from the pool.
pub(super) fn pool(error: deadpool_postgres::PoolError) -> StreamError {
    use deadpool_postgres::PoolError;
    match error {
        PoolError::Backend(e) => db(e),
        other => {
            tracing::warn!(error = %other, "no database connection");
            StreamError::with_source(
                StreamErrorKind::Unavailable,
                "database unavailable, retry later",
                other,
            )
        }
    }
}

/// Whether `error` means the database could not be reached or went away,
/// so that retrying later may succeed.
pub(super) fn unreachable(error: &tokio_postgres::Error) -> bool {
    match error.code() {
        None => true,
        Some(code) => {
            code.code().starts_with("08")
                || [
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                    SqlState::TOO_MANY_CONNECTIONS,
                    SqlState::T_R_SERIALIZATION_FAILURE,
                    SqlState::T_R_DEADLOCK_DETECTED,
                ]
                .contains(code)
        }
    }
}

/// Whether `error` is a unique-key violation: a concurrent create won.
pub(super) fn is_unique_violation(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::UNIQUE_VIOLATION)
}
