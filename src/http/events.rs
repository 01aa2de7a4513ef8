//! `GET /events`: the bus as Server-Sent Events. Resume with `Last-Event-ID`
//! or `?since=`; filter with `?chatId=` and `?types=`; `retry: 3000` once;
//! a keepalive comment every 15 s; the stream ends when the engine shuts
//! down.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use serde::Deserialize;

use super::error::{ApiError, AppQuery};
use crate::app::AppState;
use crate::events::{Published, SubscriptionItem};

pub const KEEPALIVE: Duration = Duration::from_secs(15);

pub fn router() -> Router<AppState> {
    Router::new().route("/events", get(stream_events))
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    since: Option<String>,
    #[serde(rename = "chatId")]
    chat_id: Option<String>,
    types: Option<String>,
}

/// Which events a client asked for.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    chat_id: Option<String>,
    /// Exact names and `prefix.` (from `prefix.*`).
    types: Vec<TypePattern>,
}

#[derive(Debug, Clone)]
enum TypePattern {
    Exact(String),
    Prefix(String),
}

impl Filter {
    pub fn new(chat_id: Option<String>, types: Option<&str>) -> Self {
        let types = types
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| match t.strip_suffix('*') {
                Some(prefix) => TypePattern::Prefix(prefix.to_owned()),
                None => TypePattern::Exact(t.to_owned()),
            })
            .collect();
        Self { chat_id, types }
    }

    /// A chat filter keeps that chat's events plus engine-level ones.
    pub fn matches(&self, ev: &Published) -> bool {
        if let (Some(want), Some(got)) = (&self.chat_id, &ev.chat_id) {
            if want != got {
                return false;
            }
        }
        self.types.is_empty()
            || self.types.iter().any(|p| match p {
                TypePattern::Exact(t) => *t == ev.kind,
                TypePattern::Prefix(p) => ev.kind.starts_with(p.as_str()),
            })
    }
}

async fn stream_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    AppQuery(q): AppQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    let header = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("\u{0}").to_owned());
    let since = match header.or(q.since) {
        Some(raw) => Some(raw.trim().parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "Last-Event-ID / since must be a non-negative integer, got {raw:?}"
            ))
        })?),
        None => None,
    };
    let filter = Filter::new(q.chat_id, q.types.as_deref());
    let sub = state.bus.subscribe(since);
    let events = sub.filter_map(move |item| {
        let out = match item {
            SubscriptionItem::Event(ev) if filter.matches(&ev) => Some(to_sse(&ev)),
            SubscriptionItem::Event(_) => None,
            SubscriptionItem::Reset {
                oldest_available_id,
            } => Some(reset_event(oldest_available_id)),
        };
        std::future::ready(out.map(Ok::<_, Infallible>))
    });
    let retry = futures_util::stream::once(std::future::ready(Ok(
        Event::default().retry(Duration::from_millis(3000))
    )));
    let stream = retry
        .chain(events)
        .take_until(state.shutdown.clone().cancelled_owned());
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEPALIVE).text(" keepalive"))
        .into_response())
}

fn to_sse(ev: &Published) -> Event {
    Event::default()
        .id(ev.id.to_string())
        .event(&ev.kind)
        .data(&ev.json)
}

/// `stream.reset` is stream-only: no id (the client's position stays where
/// it was), never persisted.
fn reset_event(oldest: u64) -> Event {
    let data = serde_json::json!({
        "type": "stream.reset",
        "ts": crate::util::now_ts(),
        "payload": {"oldestAvailableId": oldest.to_string()},
    });
    Event::default()
        .event("stream.reset")
        .data(data.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, chat: Option<&str>) -> Published {
        Published {
            id: 1,
            kind: kind.into(),
            chat_id: chat.map(Into::into),
            json: String::new(),
        }
    }

    #[test]
    fn filters() {
        let f = Filter::new(Some("c_1".into()), Some("chat.turn.*, engine.ready"));
        assert!(f.matches(&ev("chat.turn.delta", Some("c_1"))));
        assert!(!f.matches(&ev("chat.turn.delta", Some("c_2"))));
        assert!(!f.matches(&ev("chat.updated", Some("c_1"))));
        assert!(f.matches(&ev("engine.ready", None)));
        let all = Filter::new(None, None);
        assert!(all.matches(&ev("anything", Some("c_9"))));
    }
}
