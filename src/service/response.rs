//! Building responses: one place maps each protocol outcome to a status,
//! headers and a short body.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use super::request::{format_timestamp, Refusal};
use crate::body::Body;
use crate::headers as h;
use crate::offset::Offset;
use crate::storage::{StreamError, StreamErrorKind, StreamInfo};
use crate::stream::Expiry;
use crate::BoxError;

/// The headers a browser may read from a cross-origin response.
const EXPOSED: &str = "stream-next-offset, stream-cursor, stream-up-to-date, stream-closed, \
stream-ttl, stream-expires-at, stream-sse-data-encoding, producer-epoch, producer-seq, \
producer-expected-seq, producer-received-seq, etag, location, content-type";
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS";
const ALLOWED_HEADERS: &str = "content-type, if-none-match, authorization, stream-ttl, \
stream-expires-at, stream-seq, stream-closed, stream-forked-from, stream-fork-offset, \
stream-fork-sub-offset, producer-id, producer-epoch, producer-seq";

pub(crate) fn insert(headers: &mut HeaderMap, name: HeaderName, value: impl ToString) {
    if let Ok(value) = HeaderValue::try_from(value.to_string()) {
        headers.insert(name, value);
    }
}

pub(crate) fn set_true(headers: &mut HeaderMap, name: HeaderName) {
    headers.insert(name, HeaderValue::from_static("true"));
}

pub(crate) fn with_status(status: StatusCode, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = with_status(status, Body::from(message.to_owned()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

pub(crate) fn refusal(refusal: Refusal) -> Response<Body> {
    let mut response = text(refusal.status, &refusal.message);
    if refusal.status == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
    }
    response
}

/// The stream's identity headers: content type, tail, closure.
pub(crate) fn describe(headers: &mut HeaderMap, info: &StreamInfo) {
    insert(headers, header::CONTENT_TYPE, info.content_type.as_str());
    next_offset(headers, info.tail, info.closed);
}

pub(crate) fn next_offset(headers: &mut HeaderMap, offset: Offset, closed: bool) {
    insert(headers, h::STREAM_NEXT_OFFSET, offset);
    if closed {
        set_true(headers, h::STREAM_CLOSED);
    }
}

pub(crate) fn expiry(headers: &mut HeaderMap, expiry: Expiry) {
    match expiry {
        Expiry::Never => {}
        Expiry::Ttl(secs) => insert(headers, h::STREAM_TTL, secs),
        Expiry::At(at) => insert(headers, h::STREAM_EXPIRES_AT, format_timestamp(at)),
    }
}

/// Maps a storage error to its response.
pub(crate) fn storage_error(error: BoxError) -> Response<Body> {
    let error = match error.downcast::<StreamError>() {
        Ok(error) => *error,
        Err(other) => {
            tracing::error!(error = %other, "storage backend failed");
            return text(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable");
        }
    };
    let status = match error.kind() {
        StreamErrorKind::NotFound => StatusCode::NOT_FOUND,
        StreamErrorKind::Gone => StatusCode::GONE,
        StreamErrorKind::Invalid => StatusCode::BAD_REQUEST,
        StreamErrorKind::Conflict
        | StreamErrorKind::ContentTypeMismatch
        | StreamErrorKind::SeqRegression
        | StreamErrorKind::Closed { .. }
        | StreamErrorKind::SequenceGap { .. } => StatusCode::CONFLICT,
        StreamErrorKind::StaleEpoch { .. } => StatusCode::FORBIDDEN,
        StreamErrorKind::Full => StatusCode::INSUFFICIENT_STORAGE,
        StreamErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        StreamErrorKind::Internal => {
            tracing::error!(error = %error, source = ?std::error::Error::source(&error), "storage failure");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    let mut response = text(status, error.message());
    let headers = response.headers_mut();
    match *error.kind() {
        StreamErrorKind::Closed { tail } => next_offset(headers, tail, true),
        StreamErrorKind::StaleEpoch { current } => insert(headers, h::PRODUCER_EPOCH, current),
        StreamErrorKind::SequenceGap { expected, received } => {
            insert(headers, h::PRODUCER_EXPECTED_SEQ, expected);
            insert(headers, h::PRODUCER_RECEIVED_SEQ, received);
        }
        _ => {}
    }
    response
}

/// Headers every response carries: browser hardening and, when enabled, CORS.
pub(crate) fn common(headers: &mut HeaderMap, cors: bool) {
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("cross-origin"),
    );
    if cors {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSED),
        );
    }
}

/// The answer to a CORS preflight.
pub(crate) fn preflight() -> Response<Body> {
    let mut response = with_status(StatusCode::NO_CONTENT, Body::empty());
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(ALLOWED_METHODS),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(ALLOWED_HEADERS),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    response
}
