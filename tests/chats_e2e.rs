//! End to end through the engine's HTTP API with the REAL `claude` and
//! `codex` CLIs against the mock model servers (`tests/e2e/`), offline.
//! Every test is `#[ignore]`d, so a plain `cargo test` reports them as
//! ignored (not run); `scripts/test.sh` runs them with `-- --include-ignored`.
//!
//! For each CLI, in one chat: a plain turn (the mock's text lands in the
//! history), a tool turn (a tool call / command item), resume (the mock sees
//! the earlier conversation and the provider session id is unchanged), and
//! interrupt of a slow turn (`chat.interrupted`, back to idle, the next
//! message works), a 200 KB Codex message, and resume after an engine
//! restart. Codex runs both over `exec` and over `app-server`.

use std::time::Duration;

use crate::common::chat::{self, payload, turn_events};
use crate::common::e2e::{E2eEnv, MockServer};
use crate::common::{eventually, EngineSpec, SseStream, TestEngine};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(120);

async fn send(e: &TestEngine, chat: &str, text: &str) -> String {
    let m = chat::send(e, chat, text).await;
    assert_eq!(m["status"], "sent", "{m}");
    m["messageId"].as_str().unwrap().to_owned()
}

/// Wait for the turn of `message_id` to start and end; returns (turn id,
/// end event type, end payload).
async fn wait_turn(events: &mut SseStream, message_id: &str) -> (String, String, Value) {
    let (started, end) = turn_events(events, message_id, WAIT).await;
    let turn = payload(&started)["turnId"].as_str().unwrap().to_owned();
    (turn, end.event.clone().unwrap(), payload(&end))
}

/// History items of one turn.
async fn turn_items(e: &TestEngine, chat: &str, turn: &str) -> Vec<Value> {
    let h = chat::history(e, chat, "").await;
    h["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["turnId"] == turn)
        .cloned()
        .collect()
}

fn texts(items: &[Value], kind: &str) -> String {
    items
        .iter()
        .filter(|i| i["kind"] == kind)
        .filter_map(|i| i["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The largest conversation the mock saw in requests from index `from`.
fn conversation_size(mock: &MockServer, from: usize) -> u64 {
    mock.requests()[from..]
        .iter()
        .filter_map(|r| {
            r.get("n_messages")
                .or_else(|| r.get("n_input"))
                .and_then(Value::as_u64)
        })
        .max()
        .unwrap_or(0)
}

async fn whole_chat(provider: &str, app_server: bool) {
    let (spec, _) = EngineSpec::new();
    let env = E2eEnv::start_in(&spec.home).await;
    let mut spec = spec
        .with("CLAUDE_BIN", env.claude_bin.display().to_string())
        .with("CODEX_BIN", env.codex_bin.display().to_string());
    spec = spec.with(
        "REPLICAS_CODEX_TRANSPORT",
        if app_server { "app-server" } else { "exec" },
    );
    for (k, v) in env.env() {
        spec = spec.with(&k, v);
    }
    let (mock, tool_prompt) = match provider {
        "claude" => (&env.anthropic, "please USE_BASH"),
        _ => (&env.openai, "please USE_SHELL"),
    };
    let e = TestEngine::start_with(spec).await;
    let mut events = e.events("since=0&types=chat.*").await;
    let chat = chat::create_chat_with(&e, json!({"provider": provider, "cwd": "demo"})).await;

    // A plain turn: the mock's answer is in the history.
    let m = send(&e, &chat, "hello there").await;
    let (turn, end, p) = wait_turn(&mut events, &m).await;
    assert_eq!(
        (end.as_str(), &p["outcome"]),
        ("chat.turn.completed", &json!("completed")),
        "{provider}: {p}"
    );
    let items = turn_items(&e, &chat, &turn).await;
    assert!(
        texts(&items, "assistant_message").contains("Hello from mock"),
        "{provider}: {items:#?}"
    );
    let c = e.get_json(&format!("/chats/{chat}"), 200).await;
    let session = c["providerSessionId"].clone();
    assert!(session.is_string(), "{provider}: {c}");
    let first_size = conversation_size(mock, 0);
    if provider == "claude" || app_server {
        // Text streamed while the turn ran.
        let mut replay = e.events("since=0&types=chat.turn.delta").await;
        replay
            .wait_for(WAIT, |ev| {
                payload(ev)["turnId"] == turn.as_str() && payload(ev)["textDelta"].is_string()
            })
            .await;
    }
    if app_server {
        let status = e.get_json("/status", 200).await;
        assert_eq!(
            status["providers"]["codexTransport"], "app-server",
            "{status}"
        );
    }

    // A tool turn, resuming the session: the mock sees the earlier turn.
    let before = mock.requests().len();
    let m = send(&e, &chat, tool_prompt).await;
    let (turn, _, p) = wait_turn(&mut events, &m).await;
    assert_eq!(p["outcome"], "completed", "{provider}: {p}");
    let items = turn_items(&e, &chat, &turn).await;
    let tool_kind = if provider == "claude" {
        "tool_call"
    } else {
        "command"
    };
    assert!(
        items.iter().any(|i| i["kind"] == tool_kind),
        "{provider}: no {tool_kind} in {items:#?}"
    );
    assert!(
        conversation_size(mock, before) > first_size,
        "{provider}: the second turn did not carry the first"
    );
    let c = e.get_json(&format!("/chats/{chat}"), 200).await;
    assert_eq!(c["providerSessionId"], session, "{provider}: resumed");

    // Interrupt a slow turn once the model is producing.
    let before = mock.requests().len();
    let m = send(&e, &chat, "count slowly SLOW").await;
    events
        .wait_for(WAIT, |e| {
            e.event.as_deref() == Some("chat.turn.started") && payload(e)["messageId"] == m.as_str()
        })
        .await;
    eventually(&format!("{provider}: a model call"), WAIT, async || {
        mock.requests().len() != before
    })
    .await;
    let res = e
        .post(&format!("/chats/{chat}/interrupt"))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{provider}: {}", res.status());
    let (interrupted, _) = events
        .wait_for(WAIT, |e| e.event.as_deref() == Some("chat.interrupted"))
        .await;
    assert_eq!(interrupted.json()["chatId"], chat.as_str());
    let c = e.get_json(&format!("/chats/{chat}"), 200).await;
    assert_eq!(c["status"], "idle", "{provider}: {c}");
    assert_eq!(c["processing"], false);

    // The chat still works, in the same session.
    let m = send(&e, &chat, "hello again").await;
    let (turn, _, p) = wait_turn(&mut events, &m).await;
    assert_eq!(p["outcome"], "completed", "{provider}: {p}");
    let items = turn_items(&e, &chat, &turn).await;
    assert!(
        texts(&items, "assistant_message").contains("Hello from mock"),
        "{provider}: {items:#?}"
    );
    let c = e.get_json(&format!("/chats/{chat}"), 200).await;
    assert_eq!(c["providerSessionId"], session, "{provider}");

    if provider == "codex" {
        // A 200 KB message: not an argument (E2BIG), and it reaches the CLI.
        let big = format!("hello {}", "x".repeat(200 * 1024));
        let m = send(&e, &chat, &big).await;
        let (_, _, p) = wait_turn(&mut events, &m).await;
        assert_eq!(p["outcome"], "completed", "{provider}: {p}");
    }

    // After an engine restart the chat resumes its provider session.
    let e = e.restart().await;
    let mut events = e.events("since=0&types=chat.*").await;
    let before = mock.requests().len();
    let m = send(&e, &chat, "after restart").await;
    let (_, _, p) = wait_turn(&mut events, &m).await;
    assert_eq!(p["outcome"], "completed", "{provider}: {p}");
    assert!(
        conversation_size(mock, before) > first_size,
        "{provider}: the turn after the restart did not carry the conversation"
    );
    let c = e.get_json(&format!("/chats/{chat}"), 200).await;
    assert_eq!(
        c["providerSessionId"], session,
        "{provider}: resumed after restart"
    );
    e.shutdown().await;
}

#[tokio::test]
#[ignore = "end-to-end: drives the real claude/codex CLIs; scripts/test.sh runs it (cargo test -- --include-ignored)"]
async fn claude_chat_end_to_end() {
    whole_chat("claude", false).await;
}

#[tokio::test]
#[ignore = "end-to-end: drives the real claude/codex CLIs; scripts/test.sh runs it (cargo test -- --include-ignored)"]
async fn codex_chat_end_to_end() {
    whole_chat("codex", false).await;
}

#[tokio::test]
#[ignore = "end-to-end: drives the real claude/codex CLIs; scripts/test.sh runs it (cargo test -- --include-ignored)"]
async fn codex_app_server_chat_end_to_end() {
    whole_chat("codex", true).await;
}
