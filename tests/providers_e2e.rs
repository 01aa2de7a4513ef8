//! End to end: [`ProviderSession`] driving the REAL `claude` and `codex`
//! CLIs against the mock model servers (`tests/e2e/`), offline. Every test is
//! `#[ignore]`d, so a plain `cargo test` reports them as ignored (not run);
//! `scripts/test.sh` runs them with `-- --include-ignored`.
//!
//! Covered for both CLIs: a plain turn, a tool turn, resume (the second
//! turn's request carries the first turn's conversation, in the same process
//! and after a respawn), interrupt of a slow turn, and a session id the CLI
//! does not know (the turn continues in a new session), and the turn options
//! (plan mode, effort, model, system prompt) accepted by the real CLIs.

use std::time::Duration;

use crate::common::e2e::E2eEnv;
use crate::common::eventually;
use crate::common::provider::{answer, drain, prompt, read_until, run};
use replicas_engine::process;
use replicas_engine::providers::{
    items, ItemKind, Outcome, ProviderEvent, ProviderKind, ProviderSession, SessionConfig,
    TurnInput,
};

/// How long a turn of a real CLI may take.
const TURN: Duration = Duration::from_secs(150);

fn config(e: &E2eEnv, kind: ProviderKind) -> SessionConfig {
    let bin = match kind {
        ProviderKind::Claude => e.claude_bin.clone(),
        ProviderKind::Codex => e.codex_bin.clone(),
    };
    let mut cfg = SessionConfig::new(kind, bin, &e.workspace);
    cfg.turn_timeout = Duration::from_secs(120);
    cfg.env = e.env();
    cfg
}

/// The largest conversation size the mock saw in requests from index `from`.
fn conversation_size(requests: &[serde_json::Value], from: usize) -> u64 {
    requests[from..]
        .iter()
        .filter_map(|r| {
            r.get("n_messages")
                .or_else(|| r.get("n_input"))
                .and_then(|n| n.as_u64())
        })
        .max()
        .unwrap_or(0)
}

async fn plain_tool_and_resume(kind: ProviderKind) {
    let e = E2eEnv::start().await;
    let mock = match kind {
        ProviderKind::Claude => &e.anthropic,
        ProviderKind::Codex => &e.openai,
    };
    let mut s = ProviderSession::new(config(&e, kind));

    // Plain turn.
    let (t1, ev1, r1) = run(&mut s, prompt("hello there"), TURN).await;
    assert_eq!(r1.outcome, Outcome::Completed, "{kind}: {ev1:?}");
    assert!(answer(&ev1).contains("Hello from mock"), "{kind}: {ev1:?}");
    assert!(
        r1.usage.input_tokens > 0 && r1.usage.output_tokens > 0,
        "{kind}: {r1:?}"
    );
    let session = s.session_id().expect("the CLI reported its session");
    let first_size = conversation_size(&mock.requests(), 0);

    // Tool turn, resuming the same session.
    let before = mock.requests().len();
    let tool_prompt = match kind {
        ProviderKind::Claude => "please USE_BASH",
        ProviderKind::Codex => "please USE_SHELL",
    };
    let (t2, ev2, r2) = run(&mut s, prompt(tool_prompt), TURN).await;
    assert_eq!(r2.outcome, Outcome::Completed, "{kind}: {ev2:?}");
    let it = items(&ev2);
    match kind {
        ProviderKind::Claude => {
            let call = it
                .iter()
                .find(|i| i.kind == ItemKind::ToolCall)
                .expect("tool call");
            assert_eq!(call.tool.as_ref().unwrap().name, "Bash");
            let res = it
                .iter()
                .find(|i| i.kind == ItemKind::ToolResult)
                .expect("tool result");
            assert_eq!(res.tool.as_ref().unwrap().output.as_deref(), Some("hi"));
            assert_eq!(t1.pgid, t2.pgid, "one long-lived claude process");
        }
        ProviderKind::Codex => {
            let cmd = it
                .iter()
                .rev()
                .find(|i| i.kind == ItemKind::Command)
                .expect("command");
            let tool = cmd.tool.as_ref().unwrap();
            assert_eq!(tool.exit_code, Some(0));
            assert_eq!(tool.output.as_deref(), Some("hi\n"));
            // Codex counts usage per thread; we report this turn's share.
            assert!(
                r2.usage.input_tokens < r1.usage.input_tokens * 3,
                "{r1:?} {r2:?}"
            );
        }
    }
    assert!(answer(&ev2).contains("hi"), "{kind}: {ev2:?}");
    assert_eq!(
        s.session_id().as_deref(),
        Some(session.as_str()),
        "{kind}: same session"
    );
    assert!(
        conversation_size(&mock.requests(), before) > first_size,
        "{kind}: the second turn carried the first turn's conversation"
    );
    s.shutdown().await;
    assert!(!process::group_alive(t2.pgid));

    // A new session object (as after an engine restart) resumes by id.
    let before = mock.requests().len();
    let mut cfg = config(&e, kind);
    cfg.resume_session_id = Some(session.clone());
    cfg.codex_thread_usage = s.codex_thread_usage();
    let mut s2 = ProviderSession::new(cfg);
    let (_t3, ev3, r3) = run(&mut s2, prompt("and again"), TURN).await;
    assert_eq!(r3.outcome, Outcome::Completed, "{kind}: {ev3:?}");
    assert_eq!(
        s2.session_id().as_deref(),
        Some(session.as_str()),
        "{kind}: resumed"
    );
    assert!(
        conversation_size(&mock.requests(), before) > first_size,
        "{kind}: the resumed turn carried the earlier conversation"
    );
    s2.shutdown().await;
}

async fn interrupt_slow_turn(kind: ProviderKind) {
    let e = E2eEnv::start().await;
    let mut s = ProviderSession::new(config(&e, kind));
    let mut t = s.start_turn(prompt("count slowly SLOW")).await.unwrap();
    // Wait until the agent is producing (claude streams deltas; codex shows
    // nothing before the message completes, so give its request time to
    // reach the mock).
    match kind {
        ProviderKind::Claude => {
            read_until(&mut t, Duration::from_secs(60), |ev| {
                matches!(ev, ProviderEvent::TextDelta { .. })
            })
            .await;
        }
        ProviderKind::Codex => {
            eventually(
                "codex to call the model",
                Duration::from_secs(60),
                async || !e.openai.requests().is_empty(),
            )
            .await;
        }
    }
    t.interrupter().interrupt().await;
    let (ev, r) = drain(&mut t, TURN).await;
    assert_eq!(r.outcome, Outcome::Interrupted, "{kind}: {ev:?}");
    if kind == ProviderKind::Codex {
        assert!(!process::group_alive(t.pgid), "codex's group is gone");
    }
    // The chat stays usable, in the same session.
    let session = s.session_id();
    let (_t2, ev2, r2) = run(&mut s, prompt("hello"), TURN).await;
    assert_eq!(r2.outcome, Outcome::Completed, "{kind}: {ev2:?}");
    assert!(answer(&ev2).contains("Hello from mock"));
    assert_eq!(s.session_id(), session);
    s.shutdown().await;
}

#[tokio::test]
#[ignore = "end-to-end: drives the real claude/codex CLIs; scripts/test.sh runs it (cargo test -- --include-ignored)"]
async fn claude_plain_tool_and_resume() {
    plain_tool_and_resume(ProviderKind::Claude).await;
}

#[tokio::test]
#[ignore = "end-to-end: drives the real claude/codex CLIs; scripts/test.sh runs it (cargo test -- --include-ignored)"]
async fn codex_plain_tool_and_resume() {
    plain_tool_and_resume(ProviderKind::Codex).await;
}

#[tokio::test]
#[ignore = "end-to-end: drives the real claude/codex CLIs; scripts/test.sh runs it (cargo test -- --include-ignored)"]
async fn claude_interrupt() {
    interrupt_slow_turn(ProviderKind::Claude).await;
}

#[tokio::test]
#[ignore = "end-to-end: drives the real claude/codex CLIs; scripts/test.sh runs it (cargo test -- --include-ignored)"]
async fn codex_interrupt() {
    interrupt_slow_turn(ProviderKind::Codex).await;
}

async fn unknown_session_starts_fresh(kind: ProviderKind) {
    let e = E2eEnv::start().await;
    let mut cfg = config(&e, kind);
    // A well-formed id that no session on this machine has.
    cfg.resume_session_id = Some("01a20078-a686-7092-9ef4-b1cd29baafc8".into());
    let mut s = ProviderSession::new(cfg);
    let (_t, ev, r) = run(&mut s, prompt("hello"), TURN).await;
    assert_eq!(r.outcome, Outcome::Completed, "{kind}: {ev:?}");
    assert!(answer(&ev).contains("Hello from mock"));
    assert!(items(&ev).iter().any(|i| i.kind == ItemKind::System));
    let id = s.session_id().unwrap();
    assert_ne!(id, "01a20078-a686-7092-9ef4-b1cd29baafc8", "{kind}");
    s.shutdown().await;
}

#[tokio::test]
#[ignore = "end-to-end: drives the real claude/codex CLIs; scripts/test.sh runs it (cargo test -- --include-ignored)"]
async fn claude_unknown_session_starts_fresh() {
    unknown_session_starts_fresh(ProviderKind::Claude).await;
}

#[tokio::test]
#[ignore = "end-to-end: drives the real claude/codex CLIs; scripts/test.sh runs it (cargo test -- --include-ignored)"]
async fn codex_unknown_session_starts_fresh() {
    unknown_session_starts_fresh(ProviderKind::Codex).await;
}

/// Plan mode, an effort level, a model and a system prompt: the real CLI
/// accepts the flags we build, and the system prompt reaches the model.
async fn turn_options(kind: ProviderKind) {
    let e = E2eEnv::start().await;
    let mut s = ProviderSession::new(config(&e, kind));
    let input = TurnInput {
        prompt: "hello with options".into(),
        plan_mode: true,
        thinking_level: Some("high".into()),
        system_prompt: Some("Always mention REPLICAS_SYS_MARKER.".into()),
        model: Some(match kind {
            ProviderKind::Claude => "claude-sonnet-4-5".into(),
            ProviderKind::Codex => "gpt-5.5".into(),
        }),
        ..TurnInput::default()
    };
    let (_t, ev, r) = run(&mut s, input, TURN).await;
    assert_eq!(r.outcome, Outcome::Completed, "{kind}: {ev:?}");
    let requests = match kind {
        ProviderKind::Claude => e.anthropic.requests(),
        ProviderKind::Codex => e.openai.requests(),
    };
    let last = requests.last().expect("a model request");
    assert_eq!(
        last["model"],
        match kind {
            ProviderKind::Claude => "claude-sonnet-4-5",
            ProviderKind::Codex => "gpt-5.5",
        }
    );
    if kind == ProviderKind::Claude {
        // The mock logs the end of the system prompt, where ours is appended.
        assert!(last.to_string().contains("REPLICAS_SYS_MARKER"), "{last}");
    }
    s.shutdown().await;
}

#[tokio::test]
#[ignore = "end-to-end: drives the real claude/codex CLIs; scripts/test.sh runs it (cargo test -- --include-ignored)"]
async fn claude_turn_options() {
    turn_options(ProviderKind::Claude).await;
}

#[tokio::test]
#[ignore = "end-to-end: drives the real claude/codex CLIs; scripts/test.sh runs it (cargo test -- --include-ignored)"]
async fn codex_turn_options() {
    turn_options(ProviderKind::Codex).await;
}

/// Codex over `codex app-server`, the real CLI against the mock: one
/// long-lived process streams text, runs a tool, is interrupted after three
/// text deltas and answers the next message, refuses a write in plan mode,
/// and a new session object (as after an engine restart) resumes the thread.
#[tokio::test]
#[ignore = "end-to-end: drives the real claude/codex CLIs; scripts/test.sh runs it (cargo test -- --include-ignored)"]
async fn codex_app_server_turns() {
    let e = E2eEnv::start().await;
    let as_config = || {
        let mut cfg = config(&e, ProviderKind::Codex);
        cfg.codex_app_server = true;
        cfg
    };
    let mut s = ProviderSession::new(as_config());
    let deltas = |ev: &[ProviderEvent]| -> Vec<(String, String)> {
        ev.iter()
            .filter_map(|e| match e {
                ProviderEvent::TextDelta { item_key, text } => {
                    Some((item_key.clone(), text.clone()))
                }
                _ => None,
            })
            .collect()
    };

    // Plain turn: streamed text, keyed like the final message.
    let (t1, ev1, r1) = run(&mut s, prompt("hello there"), TURN).await;
    assert_eq!(r1.outcome, Outcome::Completed, "{ev1:?}");
    assert_eq!(replicas_engine::providers::codex_transport(), "app-server");
    let d = deltas(&ev1);
    assert!(d.len() >= 2, "{ev1:?}");
    let msg = items(&ev1)
        .into_iter()
        .find(|i| i.kind == ItemKind::AssistantMessage)
        .expect("answer");
    assert_eq!(msg.key.as_deref(), Some(d[0].0.as_str()));
    assert_eq!(
        msg.text.as_deref(),
        Some(d.iter().map(|x| x.1.as_str()).collect::<String>().as_str())
    );
    assert!(
        r1.usage.input_tokens > 0 && r1.usage.output_tokens > 0,
        "{r1:?}"
    );
    let thread = s.session_id().expect("thread id");

    // Tool turn in the same process.
    let (t2, ev2, r2) = run(&mut s, prompt("please USE_SHELL"), TURN).await;
    assert_eq!(r2.outcome, Outcome::Completed, "{ev2:?}");
    assert_eq!(t1.pgid, t2.pgid, "one long-lived app-server");
    let cmd = items(&ev2)
        .into_iter()
        .rev()
        .find(|i| i.kind == ItemKind::Command)
        .expect("command");
    assert_eq!(cmd.tool.as_ref().unwrap().exit_code, Some(0));
    assert!(
        r2.usage.input_tokens < r1.usage.input_tokens * 4,
        "{r1:?} {r2:?}"
    );

    // Interrupt mid-stream after three deltas; the same process answers next.
    let mut t3 = s.start_turn(prompt("tell a SLOW story")).await.unwrap();
    let mut seen = 0;
    read_until(&mut t3, Duration::from_secs(60), |ev| {
        seen += matches!(ev, ProviderEvent::TextDelta { .. }) as usize;
        seen == 3
    })
    .await;
    t3.interrupter().interrupt().await;
    let (ev3, r3) = drain(&mut t3, TURN).await;
    assert_eq!(r3.outcome, Outcome::Interrupted, "{ev3:?}");
    assert!(process::group_alive(t3.pgid), "the app-server stays");
    let (t4, ev4, r4) = run(&mut s, prompt("hello"), TURN).await;
    assert_eq!(r4.outcome, Outcome::Completed, "{ev4:?}");
    assert!(answer(&ev4).contains("Hello from mock"), "{ev4:?}");
    assert_eq!(t4.pgid, t1.pgid);

    // Plan mode refuses a write.
    let plan = TurnInput {
        prompt: "please USE_PATCH".into(),
        plan_mode: true,
        ..TurnInput::default()
    };
    let (_t5, ev5, r5) = run(&mut s, plan, TURN).await;
    assert_eq!(r5.outcome, Outcome::Completed, "{ev5:?}");
    assert!(!e.workspace.join("mock_patch.txt").exists(), "{ev5:?}");
    s.shutdown().await;
    assert!(!process::group_alive(t1.pgid));

    // As after an engine restart: a new process resumes the thread.
    let mut cfg = as_config();
    cfg.resume_session_id = Some(thread.clone());
    cfg.codex_thread_usage = s.codex_thread_usage();
    let mut s2 = ProviderSession::new(cfg);
    let (_t6, ev6, r6) = run(&mut s2, prompt("and again"), TURN).await;
    assert_eq!(r6.outcome, Outcome::Completed, "{ev6:?}");
    assert_eq!(s2.session_id().as_deref(), Some(thread.as_str()));
    assert!(
        !ev6.iter()
            .any(|e| matches!(e, ProviderEvent::Item(i) if i.kind == ItemKind::System)),
        "{ev6:?}"
    );
    assert!(r6.usage.input_tokens < r1.usage.input_tokens * 8, "{r6:?}");
    s2.shutdown().await;
}
