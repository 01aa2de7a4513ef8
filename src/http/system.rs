//! `GET /health` (public) and `GET /status`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::app::AppState;

/// Public routes: no secret needed.
pub fn public_router() -> Router<AppState> {
    Router::new().route("/health", get(get_health))
}

pub fn router() -> Router<AppState> {
    Router::new().route("/status", get(get_status))
}

/// 200 once the readiness file exists, 503 before; checked on every call so
/// the answer flips as soon as cloud-init finishes.
async fn get_health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let ready = tokio::fs::try_exists(&state.config.ready_file)
        .await
        .unwrap_or(false);
    let (code, status) = if ready {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "initializing")
    };
    (
        code,
        Json(json!({"status": status, "timestamp": crate::util::now_ts()})),
    )
}

async fn get_status(State(state): State<AppState>) -> Json<Value> {
    Json(state.status())
}
