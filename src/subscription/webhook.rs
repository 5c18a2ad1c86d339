//! Webhook URLs and their delivery: the SSRF policy, checked when a
//! subscription is created and again, after DNS resolution, at every
//! delivery; and the HTTP(S) client that sends signed notifications.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_service::Service;

use crate::BoxError;

/// How long one delivery may take, connection included.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of a webhook's answer that is read.
const MAX_ANSWER: usize = 64 * 1024;

/// Which webhook targets are allowed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// `http://localhost` and `http://127.0.0.x`, for development.
    pub(crate) allow_localhost: bool,
}

impl Policy {
    /// Checks a webhook URL as written: `https` to a public host, or, when
    /// allowed, `http` or `https` to localhost.
    pub(crate) fn check(&self, url: &str) -> Result<Uri, String> {
        let uri: Uri = url.parse().map_err(|_| "not a valid URL".to_owned())?;
        let authority = uri.authority().ok_or("the URL has no host")?;
        if authority.as_str().contains('@') {
            return Err("credentials in webhook URLs are not allowed".into());
        }
        let host = authority.host();
        let local = is_localhost_name(host) || host_ip(host).is_some_and(is_local_loopback);
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if local && self.allow_localhost => {}
            Some("http") => return Err("webhook URLs must use https".into()),
            _ => return Err("webhook URLs must use https".into()),
        }
        if local {
            return if self.allow_localhost {
                Ok(uri)
            } else {
                Err("localhost webhooks are not allowed".into())
            };
        }
        if let Some(ip) = host_ip(host) {
            if !is_public(ip) {
                return Err(format!("{ip} is not a public address"));
            }
        } else if is_internal_name(host) {
            return Err(format!("{host} is an internal name"));
        }
        Ok(uri)
    }
}

/// The address in a URL host, with IPv6 brackets removed.
fn host_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

fn is_localhost_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost")
}

/// `127.0.0.x` and `::1`: the development exception.
fn is_local_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[..3] == [127, 0, 0],
        IpAddr::V6(v6) => v6 == Ipv6Addr::LOCALHOST,
    }
}

fn is_internal_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    !host.contains('.')
        || [".internal", ".local", ".localdomain", ".home.arpa"]
            .iter()
            .any(|suffix| host.ends_with(suffix))
}

/// Whether `ip` is a globally routable unicast address: not private,
/// loopback, link-local (cloud metadata lives there), shared, reserved,
/// documentation or multicast.
pub(crate) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x0064 && s[1] == 0xff9b) // NAT64
                || s[..6] == [0; 6]) // IPv4-compatible and other reserved
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b)) // shared address space
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b))) // benchmarking
}

/// Resolves webhook hosts and keeps only addresses the policy allows, so a
/// name cannot point a delivery at an internal service (also not by
/// changing its DNS answer after the subscription was created).
#[derive(Debug, Clone)]
struct Resolver {
    policy: Policy,
}

impl Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let local = is_localhost_name(&host);
            if local && !policy.allow_localhost {
                return Err("localhost webhooks are not allowed".into());
            }
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|addr| {
                    if local {
                        addr.ip().is_loopback()
                    } else {
                        is_public(addr.ip())
                    }
                })
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves to no allowed address").into());
            }
            Ok(addrs.into_iter())
        })
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector<Resolver>>;

/// What a webhook answered.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// A 2xx with `{"done": true}`.
    Done,
    /// A 2xx otherwise: the worker calls back.
    Accepted,
}

/// Sends webhook notifications.
#[derive(Clone)]
pub(crate) struct Sender {
    policy: Policy,
    client: Client<Connector, Full<Bytes>>,
}

impl Sender {
    pub(crate) fn new(policy: Policy) -> Self {
        let mut http = HttpConnector::new_with_resolver(Resolver { policy });
        http.enforce_http(false);
        http.set_connect_timeout(Some(DELIVERY_TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).build(https);
        Self { policy, client }
    }

    /// POSTs `body` to `url` with its signature.
    ///
    /// # Errors
    ///
    /// When the URL is refused, the request fails or times out, or the
    /// answer is not a 2xx.
    pub(crate) async fn deliver(
        &self,
        url: &str,
        body: Bytes,
        signature: String,
    ) -> Result<Answer, String> {
        let uri = self.policy.check(url)?;
        let request = Request::post(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header("webhook-signature", signature)
            .header(header::USER_AGENT, "tower-durable-streams")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("webhook answered {status}"));
            }
            let answer = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map(|body| body.to_bytes())
                .unwrap_or_default();
            let done = serde_json::from_slice::<serde_json::Value>(&answer)
                .ok()
                .and_then(|v| v.get("done").and_then(serde_json::Value::as_bool))
                .unwrap_or(false);
            Ok(if done { Answer::Done } else { Answer::Accepted })
        };
        tokio::time::timeout(DELIVERY_TIMEOUT, exchange)
            .await
            .map_err(|_| "webhook timed out".to_owned())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: Policy = Policy {
        allow_localhost: true,
    };
    const PROD: Policy = Policy {
        allow_localhost: false,
    };

    #[test]
    fn https_to_public_hosts_is_allowed() {
        for url in [
            "https://hooks.example.com/x",
            "https://8.8.8.8/hook",
            "https://[2606:4700::1111]/hook",
        ] {
            assert!(PROD.check(url).is_ok(), "{url}");
        }
    }

    #[test]
    fn plain_http_is_only_for_localhost_in_development() {
        assert!(PROD.check("http://hooks.example.com/x").is_err());
        assert!(DEV.check("http://hooks.example.com/x").is_err());
        assert!(DEV.check("http://localhost:8080/x").is_ok());
        assert!(DEV.check("http://127.0.0.1:9/x").is_ok());
        assert!(DEV.check("http://[::1]:9/x").is_ok());
        assert!(PROD.check("http://localhost:8080/x").is_err());
        assert!(PROD.check("https://localhost/x").is_err());
    }

    #[test]
    fn private_link_local_and_metadata_targets_are_refused() {
        for url in [
            "http://10.0.0.1/hook",
            "https://10.0.0.1/hook",
            "https://172.16.5.4/hook",
            "https://192.168.1.1/hook",
            "https://169.254.169.254/latest/meta-data",
            "https://127.0.1.1/hook",
            "https://0.0.0.0/hook",
            "https://100.64.0.1/hook",
            "https://[fd00::1]/hook",
            "https://[fe80::1]/hook",
            "https://[::ffff:10.0.0.1]/hook",
            "https://metadata.google.internal/computeMetadata",
            "https://printer.local/hook",
            "https://intranet/hook",
            "https://user:pw@hooks.example.com/x",
            "ftp://hooks.example.com/x",
            "not a url",
        ] {
            assert!(DEV.check(url).is_err(), "{url}");
        }
    }

    #[tokio::test]
    async fn names_resolving_to_refused_addresses_are_refused() {
        let mut resolver = Resolver { policy: DEV };
        // `localhost` resolves to loopback, which only the development
        // exception allows, and only under that name.
        let addrs: Vec<_> = resolver
            .call("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()));
        let mut prod = Resolver { policy: PROD };
        assert!(prod.call("localhost".parse().unwrap()).await.is_err());
    }
}
