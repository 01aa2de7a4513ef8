//! `GET /health` (public) and `GET /status`.

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::app::AppState;

/// Public routes: no secret needed.
pub fn public_router() -> Router<AppState> {
    Router::new().route("/health", get(get_health))
}

pub fn router() -> Router<AppState> {
    Router::new().route("/status", get(get_status))
}

/// 200 once the readiness file exists, 503 before. Remembered once seen,
/// so a ready engine answers without touching the filesystem.
async fn get_health(State(state): State<AppState>) -> Response {
    let (code, status) = if state.readiness.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "initializing")
    };
    // Written by hand: this route is polled hard and a `Value` map per call
    // is most of its cost.
    let mut body = String::with_capacity(64);
    body.push_str(r#"{"status":""#);
    body.push_str(status);
    body.push_str(r#"","timestamp":""#);
    crate::util::push_now_ts(&mut body);
    body.push_str(r#""}"#);
    (code, [(CONTENT_TYPE, "application/json")], body).into_response()
}

/// Serialized from the borrowed view (no `Value` tree per call), reused
/// while unchanged ([`AppState::status_json`]).
async fn get_status(State(state): State<AppState>) -> Response {
    match state.status_json() {
        Ok(body) => ([(CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => super::error::ApiError::internal(e).into_response(),
    }
}
