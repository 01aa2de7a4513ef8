//! Shared-secret auth for every route but `/health`. The comparison is
//! constant-time over fixed-size SHA-256 digests, so neither the content nor
//! the length of the secret shows in the timing. It runs before method
//! routing: a wrong method on a protected route is 401 without the secret,
//! never a 405 whose `Allow` header maps the API. The reason for a rejection is logged at debug and the
//! client always gets the same 401, which never echoes what it sent.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::app::AppState;

pub const SECRET_HEADER: &str = "x-replicas-engine-secret";

pub async fn require_secret(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match req.headers().get(SECRET_HEADER) {
        Some(given) if secret_matches(given.as_bytes(), state.config.secret.expose()) => {
            next.run(req).await
        }
        Some(_) => {
            tracing::debug!("rejected: wrong secret");
            unauthorized()
        }
        None => {
            tracing::debug!("rejected: no secret header");
            unauthorized()
        }
    }
}

/// Constant-time equality of `given` and `expected`, whatever their lengths.
pub fn secret_matches(given: &[u8], expected: &str) -> bool {
    use ring::digest::{digest, SHA256};
    let given = digest(&SHA256, given);
    let expected = digest(&SHA256, expected.as_bytes());
    bool::from(given.as_ref().ct_eq(expected.as_ref()))
}

fn unauthorized() -> Response {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or invalid X-Replicas-Engine-Secret header",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::secret_matches;

    #[test]
    fn compares_whole_values_of_any_length() {
        assert!(secret_matches(b"s3cret", "s3cret"));
        for wrong in [
            &b""[..],
            b"s",
            b"s3cre",
            b"s3cret ",
            b"S3cret",
            &[0u8; 1024],
        ] {
            assert!(!secret_matches(wrong, "s3cret"), "{wrong:?}");
        }
    }
}
