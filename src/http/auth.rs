//! Shared-secret auth for every route but `/health`. The comparison is
//! constant-time; the reason for a rejection is logged at debug and the
//! client always gets the same 401, which never echoes what it sent.

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::app::AppState;

pub const SECRET_HEADER: &str = "x-replicas-engine-secret";

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
    expected: std::sync::Arc<[u8]>,
}

impl RequireSecretLayer {
    pub fn new(state: &AppState) -> Self {
        Self {
            expected: state.config.secret.expose().as_bytes().into(),
        }
    }
}

impl<S> tower::Layer<S> for RequireSecretLayer {
    type Service = RequireSecret<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequireSecret {
            inner,
            expected: self.expected.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequireSecret<S> {
    inner: S,
    expected: std::sync::Arc<[u8]>,
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
            Some(given) if bool::from(given.as_bytes().ct_eq(&self.expected)) => {
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
