//! `/chats`: create, list, get, delete chats; send messages; interrupt;
//! read history. Decoding lives here, every rule in [`crate::chats`], and
//! how a [`crate::chats::ChatError`] answers in [`super::error`].

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, AppJson, AppQuery};
use crate::app::AppState;
use crate::chats::{Accepted, Chat, ChatStatus, ListQuery, NewChat, NewMessage, MAX_LIST_LIMIT};
use crate::providers::ProviderKind;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/chats", post(create_chat).get(list_chats))
        .route("/chats/{chat_id}", get(get_chat).delete(delete_chat))
        .route("/chats/{chat_id}/messages", post(send_message))
        .route("/chats/{chat_id}/interrupt", post(interrupt_chat))
        .route("/chats/{chat_id}/history", get(get_history))
}

/// `POST /chats` body (also its OpenAPI schema).
#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct CreateChat {
    /// `claude` or `codex`.
    provider: String,
    title: Option<String>,
    model: Option<String>,
    /// Inside the workspace root; defaults to it.
    cwd: Option<String>,
}

async fn create_chat(
    State(state): State<AppState>,
    AppJson(body): AppJson<CreateChat>,
) -> Result<(StatusCode, Json<Chat>), ApiError> {
    let chat = state
        .chats
        .create(NewChat {
            provider: body.provider,
            title: body.title,
            model: body.model,
            cwd: body.cwd,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(chat)))
}

#[derive(Deserialize)]
struct ListChats {
    limit: Option<String>,
    cursor: Option<String>,
    status: Option<String>,
    provider: Option<String>,
}

async fn list_chats(
    State(state): State<AppState>,
    AppQuery(q): AppQuery<ListChats>,
) -> Result<Json<ChatList>, ApiError> {
    let limit = match q.limit.as_deref() {
        None => None,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_LIST_LIMIT).contains(&n) => Some(n),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "limit: must be an integer from 1 to {MAX_LIST_LIMIT}"
                )))
            }
        },
    };
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(
            serde_json::from_value::<ChatStatus>(Value::String(s.to_owned())).map_err(|_| {
                ApiError::bad_request(format!(
                    "status: unknown status {s:?}; expected idle, running, interrupting or waiting_for_hooks"
                ))
            })?,
        ),
    };
    let provider = match q.provider.as_deref() {
        None => None,
        Some(p) => Some(ProviderKind::parse(p).ok_or_else(|| {
            ApiError::bad_request(format!(
                "provider: unknown provider {p:?}; expected \"claude\" or \"codex\""
            ))
        })?),
    };
    let page = state.chats.page(&ListQuery {
        limit,
        cursor: q.cursor,
        status,
        provider,
    })?;
    Ok(Json(ChatList {
        chats: page.chats,
        next_cursor: page.next_cursor,
    }))
}

/// Serialized straight from the chats (no intermediate `Value`).
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ChatList {
    /// Newest first.
    chats: Vec<Chat>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

async fn get_chat(
    State(state): State<AppState>,
    Path(chat_id): Path<String>,
) -> Result<Json<Chat>, ApiError> {
    Ok(Json(state.chats.get(&chat_id)?))
}

async fn delete_chat(
    State(state): State<AppState>,
    Path(chat_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.chats.delete(&chat_id).await?;
    Ok(Json(json!({ "success": true })))
}

/// `POST /chats/{chat_id}/messages` body (also its OpenAPI schema).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SendMessage {
    /// A leading `/plan` turns plan mode on and is stripped.
    message: String,
    model: Option<String>,
    #[serde(default)]
    plan_mode: bool,
    /// `low`, `medium`, `high` or `max`.
    thinking_level: Option<String>,
    /// Anthropic image blocks:
    /// `{"type":"image","source":{"type":"base64","media_type":"image/png","data":"…"}}`.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    images: Vec<Value>,
}

async fn send_message(
    State(state): State<AppState>,
    Path(chat_id): Path<String>,
    AppJson(body): AppJson<SendMessage>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let accepted = state
        .chats
        .send(
            &chat_id,
            NewMessage {
                text: body.message,
                model: body.model,
                plan_mode: body.plan_mode,
                thinking_level: body.thinking_level,
                images: body.images,
            },
        )
        .await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

/// `POST /chats/{chat_id}/interrupt` body, optional (also its OpenAPI schema).
#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Interrupt {
    #[serde(default)]
    clear_queue: bool,
}

/// The body is optional (`{"clearQueue"?}`), so an empty POST is accepted.
async fn interrupt_chat(
    State(state): State<AppState>,
    Path(chat_id): Path<String>,
    body: Bytes,
) -> Result<Json<Chat>, ApiError> {
    let req: Interrupt = if body.iter().all(u8::is_ascii_whitespace) {
        Interrupt::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
    };
    Ok(Json(
        state.chats.interrupt(&chat_id, req.clear_queue).await?,
    ))
}

#[derive(Deserialize)]
struct HistoryQuery {
    limit: Option<usize>,
    offset: Option<usize>,
    raw: Option<bool>,
}

async fn get_history(
    State(state): State<AppState>,
    Path(chat_id): Path<String>,
    AppQuery(q): AppQuery<HistoryQuery>,
) -> Result<Json<Value>, ApiError> {
    let page = state
        .chats
        .history(
            &chat_id,
            q.limit.unwrap_or(100),
            q.offset.unwrap_or(0),
            q.raw.unwrap_or(false),
        )
        .await?;
    Ok(Json(
        json!({ "items": page.items, "total": page.total, "hasMore": page.has_more }),
    ))
}
