//! The server's Ed25519 key: webhook signatures, the JWKS that publishes
//! its public half, and the bearer tokens handed to workers.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The signing key and the `kid` derived from it.
pub(crate) struct Signer {
    key: SigningKey,
    kid: String,
}

impl Signer {
    /// A key from its 32-byte seed, as stored.
    pub(crate) fn from_seed(seed: &[u8]) -> Option<Self> {
        let seed: [u8; 32] = seed.try_into().ok()?;
        let key = SigningKey::from_bytes(&seed);
        let kid = kid(&key);
        Some(Self { key, kid })
    }

    /// A fresh key and its seed, to be stored.
    pub(crate) fn generate() -> Result<(Self, [u8; 32]), getrandom::Error> {
        let mut seed = [0; 32];
        getrandom::fill(&mut seed)?;
        let signer = Self::from_seed(&seed).expect("the seed is 32 bytes");
        Ok((signer, seed))
    }

    pub(crate) fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWK Set that publishes the public key.
    pub(crate) fn jwks(&self) -> serde_json::Value {
        serde_json::json!({
            "keys": [{
                "kty": "OKP",
                "crv": "Ed25519",
                "kid": self.kid,
                "use": "sig",
                "alg": "EdDSA",
                "x": B64.encode(self.key.verifying_key().as_bytes()),
            }]
        })
    }

    /// The `Webhook-Signature` value for `body` sent at `unix_secs`: a
    /// signature over `<timestamp>.<body>`.
    pub(crate) fn webhook_signature(&self, unix_secs: u64, body: &[u8]) -> String {
        let mut message = Vec::with_capacity(body.len() + 24);
        message.extend_from_slice(unix_secs.to_string().as_bytes());
        message.push(b'.');
        message.extend_from_slice(body);
        let signature = self.key.sign(&message);
        format!(
            "t={unix_secs},kid={},ed25519={}",
            self.kid,
            B64.encode(signature.to_bytes())
        )
    }

    /// A bearer token for one wake of one subscription.
    pub(crate) fn token(&self, claims: &Claims) -> String {
        let payload = B64.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let signature = self.key.sign(payload.as_bytes());
        format!("{payload}.{}", B64.encode(signature.to_bytes()))
    }

    /// The claims of a token this key signed, if its signature holds and it
    /// has not expired.
    pub(crate) fn verify(&self, token: &str, now_ms: u64) -> Option<Claims> {
        let (payload, signature) = token.split_once('.')?;
        let signature = B64.decode(signature).ok()?;
        let signature = Signature::from_slice(&signature).ok()?;
        self.key
            .verifying_key()
            .verify(payload.as_bytes(), &signature)
            .ok()?;
        let claims: Claims = serde_json::from_slice(&B64.decode(payload).ok()?).ok()?;
        (claims.exp > now_ms).then_some(claims)
    }
}

/// What a token grants: acting on wake `wake` (generation `gen`) of
/// subscription `sub` until `exp` (Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Claims {
    pub(crate) sub: String,
    pub(crate) gen: u64,
    pub(crate) wake: String,
    pub(crate) exp: u64,
}

/// `ds_` and the start of the key's RFC 7638 JWK thumbprint.
fn kid(key: &SigningKey) -> String {
    let x = B64.encode(key.verifying_key().as_bytes());
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    let thumbprint = Sha256::digest(canonical.as_bytes());
    format!("ds_{}", B64.encode(&thumbprint[..12]))
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A random identifier: `prefix` and 16 random bytes, base64url.
pub(crate) fn random_id(prefix: &str) -> String {
    let mut bytes = [0; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // Uniqueness, not secrecy, is what wake ids need; the clock and a
        // counter give it when the OS has no randomness to spare.
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        bytes[..8].copy_from_slice(&unix_ms(SystemTime::now()).to_le_bytes());
        bytes[8..].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    }
    format!("{prefix}{}", B64.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kid_is_stable_for_a_key_and_differs_between_keys() {
        let a = Signer::from_seed(&[1; 32]).unwrap();
        let again = Signer::from_seed(&[1; 32]).unwrap();
        let b = Signer::from_seed(&[2; 32]).unwrap();
        assert!(a.kid().starts_with("ds_"));
        assert_eq!(a.kid(), again.kid());
        assert_ne!(a.kid(), b.kid());
    }

    #[test]
    fn webhook_signature_verifies_with_the_published_key() {
        let signer = Signer::from_seed(&[7; 32]).unwrap();
        let header = signer.webhook_signature(1_700_000_000, b"{\"a\":1}");
        let jwks = signer.jwks();
        let x = B64.decode(jwks["keys"][0]["x"].as_str().unwrap()).unwrap();
        let public = ed25519_dalek::VerifyingKey::from_bytes(&x.try_into().unwrap()).unwrap();
        let sig = header.split("ed25519=").nth(1).unwrap();
        let sig = Signature::from_slice(&B64.decode(sig).unwrap()).unwrap();
        assert!(public.verify(b"1700000000.{\"a\":1}", &sig).is_ok());
        assert!(public.verify(b"1700000001.{\"a\":1}", &sig).is_err());
    }

    #[test]
    fn tokens_verify_only_unexpired_and_untampered() {
        let signer = Signer::from_seed(&[3; 32]).unwrap();
        let claims = Claims {
            sub: "s".into(),
            gen: 4,
            wake: "w_1".into(),
            exp: 2_000,
        };
        let token = signer.token(&claims);
        assert_eq!(signer.verify(&token, 1_000), Some(claims.clone()));
        assert_eq!(signer.verify(&token, 2_000), None);
        let other = Signer::from_seed(&[4; 32]).unwrap();
        assert_eq!(other.verify(&token, 1_000), None);
        let forged = format!(
            "{}.{}",
            B64.encode(br#"{"sub":"s","gen":5,"wake":"w_1","exp":2000}"#),
            token.split_once('.').unwrap().1
        );
        assert_eq!(signer.verify(&forged, 1_000), None);
        assert_eq!(signer.verify("garbage", 1_000), None);
    }
}
