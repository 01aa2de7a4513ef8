//! `GET /hooks/status`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use crate::app::AppState;
use crate::hooks::HooksStatus;

pub fn router() -> Router<AppState> {
    Router::new().route("/hooks/status", get(get_hooks_status))
}

async fn get_hooks_status(State(state): State<AppState>) -> Json<HooksStatus> {
    Json(state.hooks.status())
}
