//! `GET /repos` (`?includeDiffs=true` adds `gitDiff.fullDiff`).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::AppQuery;
use crate::app::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/repos", get(list_repos))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListRepos {
    #[serde(default)]
    include_diffs: bool,
}

async fn list_repos(
    State(state): State<AppState>,
    AppQuery(q): AppQuery<ListRepos>,
) -> Json<Value> {
    let repos = state.repos.list(q.include_diffs).await;
    Json(json!({ "repos": repos }))
}
