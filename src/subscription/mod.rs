//! Subscriptions: the reserved `__ds` control APIs that wake workers when
//! any of many streams has new data (PROTOCOL.md sections 6 and 7).
//!
//! Enable them with [`DurableStreamsService::subscriptions`]. A
//! subscription selects streams by glob `pattern` and by explicit
//! `streams`, and is delivered either by **webhook** (a signed `POST` that
//! the worker answers with `{"done": true}` or acknowledges later through
//! its callback URL) or by **pull-wake** (wake events written to a wake
//! stream, which workers race to claim, then ack and release).
//!
//! Subscription state and the Ed25519 signing key live in the storage
//! backend's metadata ([`StorageRequest::SetMeta`]), so with
//! [`FileStorage`] they survive a restart: a webhook retry scheduled before
//! it is still honoured after it, and receivers keep verifying signatures
//! with the same key from `__ds/jwks.json`.
//!
//! Webhook URLs must be `https` to a public address; private, loopback,
//! link-local and metadata addresses are refused when the subscription is
//! created and again, after DNS resolution, at every delivery. Plain `http`
//! to `localhost` or `127.0.0.x` is allowed only with
//! [`Subscriptions::allow_localhost_webhooks`].
//!
//! # Example
//!
//! ```
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_durable_streams::subscription::Subscriptions;
//! use tower_durable_streams::{DurableStreamsService, MemoryStorage};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let service = DurableStreamsService::new(MemoryStorage::new())
//!     .prefix("/v1/stream")
//!     .subscriptions(Subscriptions::new());
//!
//! let create = Request::put("/v1/stream/__ds/subscriptions/jobs")
//!     .header("content-type", "application/json")
//!     .body(r#"{"type":"pull-wake","pattern":"jobs/*","wake_stream":"wake/jobs"}"#.to_owned())
//!     .unwrap();
//! let response = service.clone().oneshot(create).await.unwrap();
//! assert_eq!(response.status(), StatusCode::CREATED);
//!
//! let jwks = Request::get("/v1/stream/__ds/jwks.json").body(String::new()).unwrap();
//! let response = service.oneshot(jwks).await.unwrap();
//! assert_eq!(response.headers()["content-type"], "application/jwk-set+json");
//! # }
//! ```
//!
//! [`DurableStreamsService::subscriptions`]: crate::DurableStreamsService::subscriptions
//! [`StorageRequest::SetMeta`]: crate::storage::StorageRequest::SetMeta
//! [`FileStorage`]: crate::storage::FileStorage

mod config;
mod manager;
mod signing;
mod state;
mod webhook;

use std::sync::Arc;
use std::time::SystemTime;

use http::{header, HeaderMap, Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tower_service::Service;

use self::config::{stream_path, stream_paths, Spec};
use self::manager::{parse_acks, AckRequest, Manager};
use self::webhook::Policy;
use crate::body::Body;
use crate::offset::Offset;
use crate::service::{Control, ControlRequest};
use crate::storage::{StorageRequest, StorageResponse};
use crate::{BoxError, BoxFuture};

/// Settings for the subscription APIs; see the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct Subscriptions {
    allow_localhost: bool,
    public_url: Option<String>,
}

impl Subscriptions {
    /// Subscriptions with the production webhook policy.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether webhooks may target `http://localhost` and
    /// `http://127.0.0.x`, for development. Default is off.
    pub fn allow_localhost_webhooks(mut self, allow: bool) -> Self {
        self.allow_localhost = allow;
        self
    }

    /// The public URL of the stream root (the service's prefix), such as
    /// `https://streams.example.com/v1/stream`, used in `callback_url` and
    /// `jwks_url`. Default is derived from the request that creates each
    /// subscription (its `Host` and the service's prefix).
    pub fn public_url(mut self, url: impl Into<String>) -> Self {
        self.public_url = Some(url.into().trim_end_matches('/').to_owned());
        self
    }

    pub(crate) fn build<S>(self, storage: S) -> Arc<dyn Control>
    where
        S: Service<StorageRequest, Response = StorageResponse> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send,
    {
        let policy = Policy {
            allow_localhost: self.allow_localhost,
        };
        let manager = Manager::new(storage, policy, self.public_url);
        manager.start();
        Arc::new(Plane(manager))
    }
}

/// A refusal from the subscription APIs, sent as
/// `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    extra: Option<(String, u64)>,
}

impl Failure {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: None,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
    }

    pub(crate) fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "SUBSCRIPTION_NOT_FOUND",
            "no such subscription",
        )
    }

    pub(crate) fn fenced() -> Self {
        Self::new(StatusCode::CONFLICT, "FENCED", "stale wake generation")
    }

    pub(crate) fn already_claimed(holder: &str, generation: u64) -> Self {
        Self {
            extra: Some((holder.to_owned(), generation)),
            ..Self::new(
                StatusCode::CONFLICT,
                "ALREADY_CLAIMED",
                "another worker holds the lease",
            )
        }
    }

    pub(crate) fn webhook_url(why: String) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "WEBHOOK_URL_REJECTED",
            format!("webhook URL rejected: {why}"),
        )
    }

    pub(crate) fn storage(error: BoxError) -> Self {
        tracing::error!(%error, "subscription state could not be read or written");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "storage is unavailable",
        )
    }

    fn into_response(self) -> Response<Body> {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some((holder, generation)) = self.extra {
            error["current_holder"] = json!(holder);
            error["generation"] = json!(generation);
        }
        json_response(self.status, &json!({ "error": error }))
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Body::from(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    response
}

/// `2026-05-09T00:00:00.123Z`.
pub(crate) fn rfc3339(at: SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    at.format(&format).unwrap_or_default()
}

/// The control plane the service routes `__ds` requests to.
struct Plane<S>(Arc<Manager<S>>);

impl<S> Control for Plane<S>
where
    S: Service<StorageRequest, Response = StorageResponse> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    fn handle(&self, request: ControlRequest) -> BoxFuture<Response<Body>> {
        let manager = self.0.clone();
        Box::pin(async move {
            match route(&manager, request).await {
                Ok(response) => response,
                Err(failure) => failure.into_response(),
            }
        })
    }

    fn observe(&self, path: &str, tail: Offset) {
        self.0.observe(path, tail);
    }

    fn forget(&self, path: &str) {
        self.0.forget(path);
    }
}

#[derive(Deserialize)]
struct StreamsBody {
    streams: Vec<String>,
}

#[derive(Deserialize)]
struct ClaimBody {
    worker: String,
}

#[derive(Deserialize)]
struct AckBody {
    wake_id: String,
    generation: u64,
    #[serde(default)]
    acks: Vec<state::Ack>,
    #[serde(default)]
    done: bool,
}

#[derive(Deserialize)]
struct ReleaseBody {
    wake_id: String,
    generation: u64,
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| Failure::invalid(format!("invalid request body: {e}")))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Routes a request below `__ds/`.
async fn route<S>(
    manager: &Arc<Manager<S>>,
    request: ControlRequest,
) -> Result<Response<Body>, Failure>
where
    S: Service<StorageRequest, Response = StorageResponse> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    let not_found = || {
        Failure::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "no such control resource",
        )
    };
    let method_not_allowed = || {
        Failure::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "method not allowed",
        )
    };
    let ControlRequest {
        method,
        path,
        headers,
        body,
        root,
    } = request;
    if path == "jwks.json" {
        if method != Method::GET {
            return Err(method_not_allowed());
        }
        let jwks = manager.signer().await?.jwks();
        let mut response = json_response(StatusCode::OK, &jwks);
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/jwk-set+json"),
        );
        headers.insert(
            header::CACHE_CONTROL,
            http::HeaderValue::from_static("public, max-age=300"),
        );
        return Ok(response);
    }
    let rest = path.strip_prefix("subscriptions/").ok_or_else(not_found)?;
    let (id, action) = match rest.split_once('/') {
        Some((id, action)) => (id, Some(action)),
        None => (rest, None),
    };
    let id = subscription_id(id)?;
    let token = bearer(&headers);
    match (action, method) {
        (None, Method::PUT) => {
            let spec = Spec::parse(&body)?;
            let (created, body) = manager.create(&id, spec, root).await?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json_response(status, &body))
        }
        (None, Method::GET) => Ok(json_response(StatusCode::OK, &manager.get(&id).await?)),
        (None, Method::DELETE) => {
            manager.delete(&id).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (Some("streams"), Method::POST) => {
            let paths = stream_paths(parse::<StreamsBody>(&body)?.streams)?;
            manager.add_streams(&id, paths).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (Some(action), Method::DELETE) if action.starts_with("streams/") => {
            let encoded = &action["streams/".len()..];
            let decoded = percent_encoding::percent_decode_str(encoded)
                .decode_utf8()
                .map_err(|_| Failure::invalid("invalid stream path"))?;
            manager.remove_stream(&id, &stream_path(&decoded)?).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (Some("claim"), Method::POST) => {
            let worker = parse::<ClaimBody>(&body)?.worker;
            if worker.is_empty() || worker.len() > 256 {
                return Err(Failure::invalid("worker must be 1 to 256 bytes"));
            }
            Ok(json_response(
                StatusCode::OK,
                &manager.claim(&id, &worker).await?,
            ))
        }
        (Some("callback" | "ack"), Method::POST) => {
            let ack: AckBody = parse(&body)?;
            let request = AckRequest {
                wake_id: ack.wake_id,
                generation: ack.generation,
                acks: parse_acks(ack.acks)?,
                done: ack.done,
            };
            let next_wake = manager.ack(&id, token, request).await?;
            Ok(json_response(
                StatusCode::OK,
                &json!({ "ok": true, "next_wake": next_wake }),
            ))
        }
        (Some("release"), Method::POST) => {
            let release: ReleaseBody = parse(&body)?;
            manager
                .release(&id, token, release.generation, &release.wake_id)
                .await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (None | Some("streams" | "claim" | "callback" | "ack" | "release"), _) => {
            Err(method_not_allowed())
        }
        (Some(_), _) => Err(not_found()),
    }
}

/// A subscription id: 1 to 256 characters of letters, digits and `-_.:~@`.
fn subscription_id(id: &str) -> Result<String, Failure> {
    let valid = !id.is_empty()
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:~@".contains(&b));
    if valid {
        Ok(id.to_owned())
    } else {
        Err(Failure::invalid("invalid subscription id"))
    }
}
