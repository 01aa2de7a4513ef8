//! Shared-secret auth for every route but `/health`. The comparison is
//! constant-time over fixed-size SHA-256 digests, so neither the content nor
//! the length of the secret shows in the timing. It runs before method
//! routing: a wrong method on a protected route is 401 without the secret,
//! never a 405 whose `Allow` header maps the API. The reason for a rejection is logged at debug and the
//! client always gets the same 401, which never echoes what it sent.

use axum::extract::Request;
use axum::http::StatusCode;
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

fn unauthorized() -> Response {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or invalid X-Replicas-Engine-Secret header",
    )
    .into_response()
}

/// The secret check as a plain tower layer (not `middleware::from_fn`: no
/// per-request state clone, service clone or boxed future; it runs on every
/// protected request). Constant-time compare; the same 401 for every
/// failure, the reason at debug.
#[derive(Clone)]
pub struct RequireSecretLayer {
    /// SHA-256 of the secret: the compare takes the same time whatever
    /// the length of what the client sent.
    expected: [u8; 32],
}

impl RequireSecretLayer {
    pub fn new(state: &AppState) -> Self {
        Self {
            expected: sha256(state.config.secret.expose().as_bytes()),
        }
    }
}

impl<S> tower::Layer<S> for RequireSecretLayer {
    type Service = RequireSecret<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequireSecret {
            inner,
            expected: self.expected,
        }
    }
}

#[derive(Clone)]
pub struct RequireSecret<S> {
    inner: S,
    expected: [u8; 32],
}

impl<S> tower::Service<Request> for RequireSecret<S>
where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::Either<
        S::Future,
        std::future::Ready<Result<Response, std::convert::Infallible>>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        use futures_util::future::Either;
        match req.headers().get(SECRET_HEADER) {
            Some(given) if digest_matches(given.as_bytes(), &self.expected) => {
                Either::Left(self.inner.call(req))
            }
            Some(_) => {
                tracing::debug!("rejected: wrong secret");
                Either::Right(std::future::ready(Ok(unauthorized())))
            }
            None => {
                tracing::debug!("rejected: no secret header");
                Either::Right(std::future::ready(Ok(unauthorized())))
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
