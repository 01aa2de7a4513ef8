//! Chats through the HTTP API with the fake CLIs ([`EngineSpec::fake_clis`]):
//! create, send, wait for a turn by its message id, poll a chat, read the
//! argv a fake recorded.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::{eventually, EngineSpec, SseEvent, SseStream, TestEngine};

/// How long a chat test waits for an event or a state.
pub const WAIT: Duration = Duration::from_secs(30);

/// [`EngineSpec::new`] with the fake CLIs.
pub fn spec() -> (EngineSpec, std::sync::Arc<tempfile::TempDir>) {
    let (spec, guard) = EngineSpec::new();
    (spec.fake_clis(), guard)
}

/// An engine with the fake CLIs.
pub async fn engine() -> TestEngine {
    TestEngine::start_with(spec().0).await
}

/// `POST /chats` with `provider`; returns the chat id.
pub async fn create_chat(e: &TestEngine, provider: &str) -> String {
    create_chat_with(e, json!({ "provider": provider })).await
}

/// `POST /chats` with `body`; returns the chat id.
pub async fn create_chat_with(e: &TestEngine, body: Value) -> String {
    let chat = e.post_json("/chats", body, 201).await;
    chat["id"].as_str().unwrap().to_owned()
}

/// `POST /chats/{chat}/messages`; returns the 202's body.
pub async fn send(e: &TestEngine, chat: &str, text: &str) -> Value {
    e.post_json(
        &format!("/chats/{chat}/messages"),
        json!({ "message": text }),
        202,
    )
    .await
}

/// [`create_chat`] and its [`chat_events`].
pub async fn new_chat(e: &TestEngine, provider: &str) -> (String, SseStream) {
    let chat = create_chat(e, provider).await;
    let events = chat_events(e, &chat).await;
    (chat, events)
}

/// Events of one chat from the start of the journal.
pub async fn chat_events(e: &TestEngine, chat: &str) -> SseStream {
    e.events(&format!("since=0&chatId={chat}")).await
}

pub fn payload(ev: &SseEvent) -> Value {
    ev.json()["payload"].clone()
}

/// Whether `ev` is of type `kind`.
pub fn is(ev: &SseEvent, kind: &str) -> bool {
    ev.event.as_deref() == Some(kind)
}

/// Wait (up to `timeout` each) for the turn of `message_id` to start and
/// to end (completed or interrupted); returns both events.
pub async fn turn_events(
    events: &mut SseStream,
    message_id: &str,
    timeout: Duration,
) -> (SseEvent, SseEvent) {
    let (started, _) = events
        .wait_for(timeout, |e| {
            is(e, "chat.turn.started") && payload(e)["messageId"] == message_id
        })
        .await;
    let turn_id = payload(&started)["turnId"].clone();
    let (end, _) = events
        .wait_for(timeout, |e| {
            (is(e, "chat.turn.completed") || is(e, "chat.interrupted"))
                && payload(e)["turnId"] == turn_id
        })
        .await;
    (started, end)
}

/// [`turn_events`] within [`WAIT`]; returns (started payload, end event
/// type, end payload).
pub async fn wait_turn(events: &mut SseStream, message_id: &str) -> (Value, String, Value) {
    let (started, end) = turn_events(events, message_id, WAIT).await;
    (payload(&started), end.event.clone().unwrap(), payload(&end))
}

/// [`send`] `text` and [`wait_turn`] for its turn.
pub async fn send_and_wait(
    e: &TestEngine,
    events: &mut SseStream,
    chat: &str,
    text: &str,
) -> (Value, String, Value) {
    let acc = send(e, chat, text).await;
    wait_turn(events, acc["messageId"].as_str().unwrap()).await
}

/// Poll `GET /chats/{chat}` until `pred` holds (within [`WAIT`]).
pub async fn wait_chat(e: &TestEngine, chat: &str, pred: impl Fn(&Value) -> bool) -> Value {
    eventually("the chat to match", WAIT, async || {
        let c = e.get_json(&format!("/chats/{chat}"), 200).await;
        match pred(&c) {
            true => Ok(c),
            false => Err(format!("{c:#}")),
        }
    })
    .await
}

/// `GET /chats/{chat}/history{query}` (query: empty or `?…`), asserting 200.
pub async fn history(e: &TestEngine, chat: &str, query: &str) -> Value {
    e.get_json(&format!("/chats/{chat}/history{query}"), 200)
        .await
}

/// The argv of the last CLI process a fake recorded in `<home>/args.jsonl`.
pub fn last_argv(home: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(home.join("args.jsonl")).unwrap_or_default();
    let line = text.lines().last().expect("a fake CLI recorded its argv");
    let v: Value = serde_json::from_str(line).unwrap();
    v["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}
