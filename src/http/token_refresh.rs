//! `GET /token-refresh/health`: per-manager credential refresh status; 503
//! when an enabled manager is failing (same body).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::app::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/token-refresh/health", get(get_token_refresh_health))
}

async fn get_token_refresh_health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let refresh = state.upstream.token_refresh();
    let healthy = refresh.healthy();
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({"healthy": healthy, "managers": refresh.statuses()})),
    )
}
