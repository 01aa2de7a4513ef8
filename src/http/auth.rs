//! Shared-secret auth for every route but `/health`. The comparison is
//! constant-time and its work depends only on the length of what the client
//! sent: the expected secret is kept zero-padded to [`PADDED`] bytes and the
//! client's value is compared against as many of those bytes as it has,
//! plus the two lengths, all without an early exit; so neither the content
//! nor the length of the secret shows in the timing (a secret longer than
//! `PADDED` is padded to its own length). It runs before method
//! routing: a wrong method on a protected route is 401 without the secret,
//! never a 405 whose `Allow` header maps the API. The check runs in the
//! request layer ([`super::request`]); the reason for a rejection is logged
//! at debug and the client always gets the same 401, which never echoes
//! what it sent.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::app::AppState;

pub const SECRET_HEADER: HeaderName = HeaderName::from_static("x-replicas-engine-secret");

/// What the expected secret is padded to. A header value longer than this
/// (or than the secret) is rejected without a compare; that depends only on
/// what the client sent.
pub const PADDED: usize = 4096;

/// Constant-time equality of `given` and `expected`, whatever their lengths.
pub fn secret_matches(given: &[u8], expected: &[u8]) -> bool {
    Padded::new(expected).matches(given)
}

/// The secret, zero-padded: comparing a value costs the same whatever the
/// secret's content and length (and hashing the client's value per request,
/// as before, cost a tenth of a `/status`).
#[derive(Clone)]
struct Padded {
    bytes: Arc<[u8]>,
    len: u64,
}

impl Padded {
    fn new(secret: &[u8]) -> Self {
        let mut bytes = vec![0u8; PADDED.max(secret.len())];
        bytes[..secret.len()].copy_from_slice(secret);
        Self {
            bytes: bytes.into(),
            len: secret.len() as u64,
        }
    }

    fn matches(&self, given: &[u8]) -> bool {
        let Some(expected) = self.bytes.get(..given.len()) else {
            return false;
        };
        // `&`, not `&&`: both compares always run.
        bool::from(given.ct_eq(expected) & (given.len() as u64).ct_eq(&self.len))
    }
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

/// The secret as the request layer ([`super::request`]) checks it.
#[derive(Clone)]
pub struct ExpectedSecret {
    secret: Padded,
}

impl ExpectedSecret {
    pub fn new(state: &AppState) -> Self {
        Self {
            secret: Padded::new(state.config.secret.expose().as_bytes()),
        }
    }

    /// Whether the request carries the secret. Constant-time compare; the
    /// reason for a rejection is logged at debug.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        match headers.get(SECRET_HEADER) {
            Some(given) if self.secret.matches(given.as_bytes()) => true,
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
            b"s3cret\0",
            &[0u8; 1024],
            &[b's'; super::PADDED + 1],
        ] {
            assert!(!secret_matches(wrong, b"s3cret"), "{wrong:?}");
        }
        // A secret longer than the padding.
        let long = vec![b'k'; super::PADDED + 10];
        assert!(secret_matches(&long, &long));
        assert!(!secret_matches(&long[1..], &long));
    }
}
