//! `GET /plans` and `GET /plans/{filename}`: plan files from
//! [`crate::plans::PlanStore`]. Name checks happen on the decoded path
//! segment, so percent-encoded tricks (`%2e%2e%2f`, `%00`) are caught.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::ApiError;
use crate::app::AppState;
use crate::plans::{Plan, PlanStore};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/plans", get(list_plans))
        .route("/plans/{filename}", get(get_plan))
}

async fn list_plans(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let store = PlanStore::new(&state.config.paths);
    let plans = tokio::task::spawn_blocking(move || store.list()).await??;
    Ok(Json(json!({ "plans": plans })))
}

async fn get_plan(
    State(state): State<AppState>,
    filename: Result<Path<String>, PathRejection>,
) -> Result<Json<Plan>, ApiError> {
    let Path(filename) = filename
        .map_err(|e| ApiError::bad_request(format!("invalid plan name: {}", e.body_text())))?;
    let store = PlanStore::new(&state.config.paths);
    let plan = tokio::task::spawn_blocking(move || store.get(&filename)).await??;
    Ok(Json(plan))
}
