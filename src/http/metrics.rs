//! `GET /metrics`: the Prometheus exposition (see [`crate::metrics`]).

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::app::AppState;
use crate::metrics::{self, Sample};

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(get_metrics))
}

async fn get_metrics(State(state): State<AppState>) -> impl IntoResponse {
    let chats = state.chats.counts();
    let webhooks = state.upstream.webhooks();
    let sample = Sample {
        sse_subscribers: state.bus.subscriber_count(),
        events_last_id: state.bus.last_id(),
        events_journal_bytes: state.bus.journal_bytes(),
        webhook_outbox_events: webhooks.map_or(0, |w| w.pending()),
        webhook_oldest_pending: webhooks.map(|w| w.oldest_pending_age()).unwrap_or_default(),
        turns_running: chats.running,
        chat_queue_messages: chats.queued_messages,
        hooks_status: state.hooks.state(),
    };
    // Reads a few small /proc files: off the async threads.
    let body = tokio::task::spawn_blocking(move || metrics::render(&sample))
        .await
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body)
}
