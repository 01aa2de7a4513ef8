//! The HTTP surface. Each resource owns its router; this file merges them
//! and applies the layers in one place.
//!
//! Layer order, outermost first:
//! 1. `SetRequestId` — every request gets an `X-Request-Id` (kept if the
//!    client sent one);
//! 2. `Trace` — one span per request with method, matched route and request
//!    id (never headers: they carry the secret);
//! 3. `PropagateRequestId` — copies the id onto the response;
//! 4. `json_error_bodies` — any error response without a JSON body gets the
//!    error shape;
//! 5. `DefaultBodyLimit` — body cap for every extractor (413);
//! 6. auth — on the protected sub-router only.

pub mod auth;
pub mod chats;
pub mod error;
pub mod events;
pub mod system;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::HeaderName;
use axum::middleware;
use axum::Router;
use tower::ServiceBuilder;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::app::AppState;
use error::ApiError;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .merge(system::router())
        .merge(events::router())
        .merge(chats::router())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_secret,
        ));

    let body_limit = state.config.max_body_bytes;
    Router::new()
        .merge(system::public_router())
        .merge(protected)
        .fallback(not_found)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(request_span))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .layer(middleware::from_fn(error::json_error_bodies))
                .layer(DefaultBodyLimit::max(body_limit)),
        )
        .with_state(state)
}

/// Unknown routes: 404 in the error shape. Reached before auth, and says
/// nothing about which routes exist.
async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

fn request_span(req: &Request) -> tracing::Span {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "<unmatched>".to_owned());
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or("-")
        .to_owned();
    tracing::info_span!("request", method = %req.method(), route, request_id)
}
