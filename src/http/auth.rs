//! Shared-secret auth for every route but `/health`. The comparison is
//! constant-time over fixed-size SHA-256 digests, so neither the content nor
//! the length of the secret shows in the timing. It runs before method
//! routing: a wrong method on a protected route is 401 without the secret,
//! never a 405 whose `Allow` header maps the API. The check runs in the
//! request layer ([`super::request`]); the reason for a rejection is logged
//! at debug and the client always gets the same 401, which never echoes
//! what it sent.

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::app::AppState;

pub const SECRET_HEADER: &str = "x-replicas-engine-secret";

/// Constant-time equality of `given` and `expected`, whatever their lengths:
/// both are hashed to fixed-size SHA-256 digests first.
pub fn secret_matches(given: &[u8], expected: &[u8]) -> bool {
    digest_matches(given, &sha256(expected))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn digest_matches(given: &[u8], expected: &[u8; 32]) -> bool {
    bool::from(sha256(given).ct_eq(expected))
}

/// The one 401 answer, whatever was wrong.
pub fn unauthorized() -> Response {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or invalid X-Replicas-Engine-Secret header",
    )
    .into_response()
}

/// The secret as the request layer ([`super::request`]) checks it: its
/// SHA-256, made once, so each request hashes only what the client sent and
/// the compare takes the same time whatever the length of either.
#[derive(Clone)]
pub struct ExpectedSecret {
    digest: [u8; 32],
}

impl ExpectedSecret {
    pub fn new(state: &AppState) -> Self {
        Self {
            digest: sha256(state.config.secret.expose().as_bytes()),
        }
    }

    /// Whether the request carries the secret. Constant-time compare; the
    /// reason for a rejection is logged at debug.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        match headers.get(SECRET_HEADER) {
            Some(given) if digest_matches(given.as_bytes(), &self.digest) => true,
            Some(_) => {
                tracing::debug!("rejected: wrong secret");
                false
            }
            None => {
                tracing::debug!("rejected: no secret header");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::secret_matches;

    #[test]
    fn compares_whole_values_of_any_length() {
        assert!(secret_matches(b"s3cret", b"s3cret"));
        for wrong in [
            &b""[..],
            b"s",
            b"s3cre",
            b"s3cret ",
            b"S3cret",
            &[0u8; 1024],
        ] {
            assert!(!secret_matches(wrong, b"s3cret"), "{wrong:?}");
        }
    }
}
