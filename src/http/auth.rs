//! Shared-secret auth for every route but `/health`. The comparison is
//! constant-time; the reason for a rejection is logged at debug and the
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
    let expected = state.config.secret.expose().as_bytes();
    match req.headers().get(SECRET_HEADER) {
        Some(given) if bool::from(given.as_bytes().ct_eq(expected)) => next.run(req).await,
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

fn unauthorized() -> Response {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or invalid X-Replicas-Engine-Secret header",
    )
    .into_response()
}
