//! Provider sessions driving the fake CLIs (`tests/fixtures/bin/fake-*`):
//! real subprocesses in their own process groups, real pipes, the failure
//! modes a real CLI has (early exit, garbage, a 10 MB line, auth failure,
//! a tool child that ignores TERM, a hang).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::provider::{answer, drain, prompt, read_until, run};
use crate::common::{alive, eventually, wait_pid};
use replicas_engine::process;
use replicas_engine::providers::{
    items, Image, ItemKind, Outcome, ProcessPool, ProviderError, ProviderEvent, ProviderKind,
    ProviderSession, RunningTurn, SessionConfig, TurnInput, TurnResult,
};

/// How long a turn of the fake CLIs may take.
const TURN: Duration = Duration::from_secs(30);
/// How long a process may take to start or stop, or a session to settle.
const SOON: Duration = Duration::from_secs(10);

const KINDS: [ProviderKind; 2] = [ProviderKind::Claude, ProviderKind::Codex];

fn fake_bin(kind: ProviderKind) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bin")
        .join(format!("fake-{kind}"))
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self, kind: ProviderKind) -> SessionConfig {
        let mut cfg = SessionConfig::new(kind, fake_bin(kind), self.dir.path());
        cfg.turn_timeout = Duration::from_secs(30);
        cfg.interrupt_grace = Duration::from_secs(3);
        cfg.kill_grace = Duration::from_millis(500);
        cfg.env = vec![
            ("HOME".into(), self.dir.path().display().to_string()),
            ("CODEX_HOME".into(), self.dir.path().display().to_string()),
            (
                "FAKE_PID_FILE".into(),
                self.path("child.pid").display().to_string(),
            ),
            (
                "FAKE_ARGS_FILE".into(),
                self.path("args.jsonl").display().to_string(),
            ),
        ];
        cfg
    }

    fn args_log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path("args.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The pid the fake CLI's lingering child wrote, once it exists.
    async fn child_pid(&self) -> i32 {
        wait_pid(&self.path("child.pid")).await
    }
}

/// Wait for the first item of a turn (it is running and producing).
async fn first_item(turn: &mut RunningTurn) -> Vec<ProviderEvent> {
    read_until(turn, SOON, |ev| {
        matches!(ev, ProviderEvent::Item(_) | ProviderEvent::TextDelta { .. })
    })
    .await
}

/// A fresh home and a session of `kind` in it.
fn session(kind: ProviderKind) -> (Env, ProviderSession) {
    let env = Env::new();
    let s = ProviderSession::new(env.config(kind));
    (env, s)
}

fn failed_code(r: &TurnResult) -> &str {
    match &r.outcome {
        Outcome::Failed { code, .. } => code,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn plain_turn_reports_session_text_and_usage() {
    for kind in KINDS {
        let (env, mut s) = session(kind);
        let mut turn = s.start_turn(prompt("hello")).await.unwrap();
        assert!(turn.pgid > 0 && turn.start_time.is_some());
        let (events, result) = drain(&mut turn, TURN).await;
        assert_eq!(result.outcome, Outcome::Completed, "{kind}");
        assert!(answer(&events).contains("turn=1"), "{kind}: {events:?}");
        let id = s.session_id().expect("session id known");
        assert!(events.contains(&ProviderEvent::SessionId(id.clone())));
        assert!(
            result.usage.input_tokens > 0 && result.usage.output_tokens > 0,
            "{kind}"
        );
        assert!(!s.is_busy());
        if kind == ProviderKind::Claude {
            assert_eq!(result.usage.cost_usd, Some(0.000235));
            let deltas: String = events
                .iter()
                .filter_map(|e| match e {
                    ProviderEvent::TextDelta { text, .. } => Some(text.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(deltas, answer(&events), "deltas add up to the final text");
            // The process lives on for the next turn, with the flags we need.
            let args = &env.args_log()[0];
            assert_eq!(args["env"]["IS_SANDBOX"], "1");
            assert_eq!(args["env"]["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"], "1");
            assert!(args["argv"].to_string().contains("bypassPermissions"));
            assert!(process::group_alive(turn.pgid));
        } else {
            assert!(!process::group_alive(turn.pgid), "codex exec has exited");
        }
        s.shutdown().await;
        assert!(
            !process::group_alive(turn.pgid),
            "{kind}: shutdown ends the process group"
        );
    }
}

#[tokio::test]
async fn later_turns_resume_the_session() {
    for kind in KINDS {
        let (env, mut s) = session(kind);
        let (t1, _, r1) = run(&mut s, prompt("one"), TURN).await;
        assert_eq!(r1.outcome, Outcome::Completed);
        let id = s.session_id().unwrap();

        let (t2, ev2, r2) = run(&mut s, prompt("two"), TURN).await;
        assert!(answer(&ev2).contains("turn=2"), "{kind}: {ev2:?}");
        assert_eq!(s.session_id().as_deref(), Some(id.as_str()));
        if kind == ProviderKind::Claude {
            assert_eq!(t1.pgid, t2.pgid, "one long-lived claude process");
            assert_eq!(env.args_log().len(), 1);
        } else {
            // Usage is per turn although codex counts per thread.
            assert_eq!(r2.usage.input_tokens, r1.usage.input_tokens);
            let argv = env.args_log()[1]["argv"].to_string();
            assert!(argv.contains("\"resume\"") && argv.contains(&id), "{argv}");
        }
        s.shutdown().await;

        // A new engine resumes from the persisted id (and codex totals).
        let mut cfg = env.config(kind);
        cfg.resume_session_id = Some(id.clone());
        cfg.codex_thread_usage = s.codex_thread_usage();
        let mut s2 = ProviderSession::new(cfg);
        let (_t3, ev3, r3) = run(&mut s2, prompt("three"), TURN).await;
        assert!(answer(&ev3).contains("turn=3"), "{kind}: {ev3:?}");
        assert!(answer(&ev3).contains(&id));
        assert_eq!(r3.usage.input_tokens, r1.usage.input_tokens, "{kind}");
        assert!(env.args_log().last().unwrap()["argv"]
            .to_string()
            .contains(&id));
        s2.shutdown().await;
    }
}

#[tokio::test]
async fn claude_respawns_with_resume_when_its_process_died_or_flags_change() {
    let (env, mut s) = session(ProviderKind::Claude);
    let mut t1 = s.start_turn(prompt("one")).await.unwrap();
    drain(&mut t1, TURN).await;
    let id = s.session_id().unwrap();
    // The process dies between turns (OOM killer, crash).
    process::signal_group(t1.pgid, nix::sys::signal::Signal::SIGKILL).unwrap();
    eventually("the process group to end", SOON, async || {
        !process::group_alive(t1.pgid)
    })
    .await;
    let (t2, ev2, r2) = run(&mut s, prompt("two"), TURN).await;
    assert_eq!(r2.outcome, Outcome::Completed);
    assert!(answer(&ev2).contains("turn=2"), "{ev2:?}");
    assert_ne!(t1.pgid, t2.pgid);
    let log = env.args_log();
    assert!(log[1]["argv"]
        .to_string()
        .contains(&format!("\"--resume\",\"{id}\"")));

    // Plan mode and another model need other process flags: a new process.
    let input = TurnInput {
        prompt: "three".into(),
        plan_mode: true,
        model: Some("opus".into()),
        ..TurnInput::default()
    };
    let (_t3, ev3, _) = run(&mut s, input, TURN).await;
    assert!(
        answer(&ev3).contains("turn=3 ")
            && answer(&ev3).contains("mode=plan")
            && answer(&ev3).contains("model=opus")
    );
    assert!(
        !process::group_alive(t2.pgid),
        "the old process was stopped"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn tool_turns_are_normalized() {
    let (env, mut s) = session(ProviderKind::Claude);
    let (_t, ev, r) = run(&mut s, prompt("FAKE_TOOL"), TURN).await;
    assert_eq!(r.outcome, Outcome::Completed);
    let it = items(&ev);
    assert_eq!(it[0].kind, ItemKind::ToolCall);
    assert_eq!(it[0].tool.as_ref().unwrap().input["command"], "echo hi");
    assert_eq!(it[1].kind, ItemKind::ToolResult);
    assert_eq!(it[1].tool.as_ref().unwrap().output.as_deref(), Some("hi"));
    s.shutdown().await;

    let mut s = ProviderSession::new(env.config(ProviderKind::Codex));
    let (_t, ev, _) = run(&mut s, prompt("FAKE_TOOL FAKE_PATCH"), TURN).await;
    let it = items(&ev);
    let cmd = it
        .iter()
        .rev()
        .find(|i| i.kind == ItemKind::Command)
        .unwrap();
    assert_eq!(cmd.tool.as_ref().unwrap().exit_code, Some(0));
    assert!(it.iter().any(|i| i.kind == ItemKind::FileChange));
    assert!(
        env.path("fake_patch.txt").exists(),
        "the agent ran in the session's cwd"
    );
}

#[tokio::test]
async fn interrupt_ends_the_turn_and_every_tool_process() {
    for kind in KINDS {
        let (env, mut s) = session(kind);
        let mut t = s.start_turn(prompt("FAKE_LINGER")).await.unwrap();
        first_item(&mut t).await;
        let child = env.child_pid().await;
        assert!(alive(child));
        t.interrupter().interrupt().await;
        // interrupt() returns after the end: the tool child is gone already.
        assert!(
            !alive(child),
            "{kind}: the TERM-ignoring tool child was killed"
        );
        let (_, r) = drain(&mut t, TURN).await;
        assert_eq!(r.outcome, Outcome::Interrupted, "{kind}");
        assert!(!s.is_busy());
        if kind == ProviderKind::Claude {
            // Claude answered the interrupt: its process stays for the next turn.
            assert!(process::group_alive(t.pgid));
        } else {
            assert!(!process::group_alive(t.pgid));
        }
        // The session is usable and remembers the conversation.
        let (t2, ev2, r2) = run(&mut s, prompt("after"), TURN).await;
        assert_eq!(r2.outcome, Outcome::Completed, "{kind}");
        assert!(answer(&ev2).contains("turn=2"), "{kind}: {ev2:?}");
        if kind == ProviderKind::Claude {
            assert_eq!(t.pgid, t2.pgid);
        }
        // Interrupting a finished turn is a no-op.
        t2.interrupter().interrupt().await;
        s.shutdown().await;
    }
}

#[tokio::test]
async fn claude_that_ignores_the_interrupt_is_stopped_and_resumed_next_turn() {
    let env = Env::new();
    let mut cfg = env.config(ProviderKind::Claude);
    cfg.interrupt_grace = Duration::from_millis(300);
    let mut s = ProviderSession::new(cfg);
    let mut t = s
        .start_turn(prompt("FAKE_HANG FAKE_IGNORE_INTERRUPT"))
        .await
        .unwrap();
    first_item(&mut t).await;
    let i = t.interrupter();
    // Two concurrent interrupts both return once the turn is over.
    tokio::join!(i.interrupt(), i.interrupt());
    assert!(!process::group_alive(t.pgid));
    let (_, r) = drain(&mut t, TURN).await;
    assert_eq!(r.outcome, Outcome::Interrupted);
    let (t2, ev2, _) = run(&mut s, prompt("next"), TURN).await;
    assert!(answer(&ev2).contains("turn=2"), "{ev2:?}");
    assert_ne!(t.pgid, t2.pgid);
    s.shutdown().await;
}

#[tokio::test]
async fn a_turn_past_its_timeout_fails_and_its_group_is_killed() {
    for kind in KINDS {
        let env = Env::new();
        let mut cfg = env.config(kind);
        cfg.turn_timeout = Duration::from_millis(800);
        let mut s = ProviderSession::new(cfg);
        let (t, _, r) = run(&mut s, prompt("FAKE_HANG"), TURN).await;
        assert_eq!(failed_code(&r), "timeout", "{kind}");
        assert!(!process::group_alive(t.pgid), "{kind}");
        s.shutdown().await;
    }
}

#[tokio::test]
async fn missing_binary_fails_the_turn_not_the_caller() {
    for kind in KINDS {
        let env = Env::new();
        let mut cfg = env.config(kind);
        cfg.bin = env.path("no-such-cli");
        let mut s = ProviderSession::new(cfg);
        let mut t = s.start_turn(prompt("hi")).await.unwrap();
        assert_eq!(t.pgid, 0);
        let (_, r) = drain(&mut t, TURN).await;
        assert_eq!(failed_code(&r), "spawn_failed", "{kind}");
        assert!(!s.is_busy());

        // A working directory that vanished is named as such.
        let mut cfg = env.config(kind);
        cfg.cwd = env.path("gone");
        let mut s = ProviderSession::new(cfg);
        let (_t, _, r) = run(&mut s, prompt("hi"), TURN).await;
        match &r.outcome {
            Outcome::Failed { message, .. } => {
                assert!(message.contains("working directory"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn early_exit_fails_with_the_cli_error_and_the_session_recovers() {
    for kind in KINDS {
        let (_env, mut s) = session(kind);
        let (t, _, r) = run(&mut s, prompt("FAKE_EXIT"), TURN).await;
        assert_eq!(failed_code(&r), "exited", "{kind}");
        if let Outcome::Failed { message, .. } = &r.outcome {
            assert!(message.contains("exit status"), "{kind}: {message}");
        }
        assert!(!process::group_alive(t.pgid));
        let (_t2, ev2, r2) = run(&mut s, prompt("again"), TURN).await;
        assert_eq!(r2.outcome, Outcome::Completed, "{kind}: {ev2:?}");
        assert!(
            answer(&ev2).contains("turn=2"),
            "{kind}: resumed the session: {ev2:?}"
        );
        s.shutdown().await;
    }
}

#[tokio::test]
async fn garbage_and_a_10mb_line_are_skipped() {
    for kind in KINDS {
        let (_env, mut s) = session(kind);
        let (_t, ev, r) = run(&mut s, prompt("FAKE_GARBAGE FAKE_HUGE"), TURN).await;
        assert_eq!(r.outcome, Outcome::Completed, "{kind}");
        assert!(answer(&ev).contains("turn=1"), "{kind}");
        assert!(
            answer(&ev).len() < 10_000,
            "the huge line was not delivered"
        );
        s.shutdown().await;
    }
}

#[tokio::test]
async fn auth_failure_is_reported_then_fails_the_turn() {
    for kind in KINDS {
        let (_env, mut s) = session(kind);
        let (_t, ev, r) = run(&mut s, prompt("FAKE_AUTH"), TURN).await;
        let auth = ev
            .iter()
            .filter(|e| matches!(e, ProviderEvent::AuthFailure { .. }))
            .count();
        assert_eq!(auth, 1, "{kind}: {ev:?}");
        assert_eq!(failed_code(&r), "auth_expired", "{kind}");
        s.shutdown().await;
    }
}

#[tokio::test]
async fn cli_reported_failures_keep_the_cli_reason() {
    let (env, mut s) = session(ProviderKind::Claude);
    let (_t, _, r) = run(&mut s, prompt("FAKE_FAIL"), TURN).await;
    assert_eq!(failed_code(&r), "error_max_turns");
    s.shutdown().await;
    let mut s = ProviderSession::new(env.config(ProviderKind::Codex));
    let (_t, _, r) = run(&mut s, prompt("FAKE_FAIL"), TURN).await;
    assert_eq!(failed_code(&r), "turn_failed");
}

#[tokio::test]
async fn one_turn_at_a_time_and_shutdown_ends_a_running_turn() {
    for kind in KINDS {
        let (env, mut s) = session(kind);
        let mut t = s.start_turn(prompt("FAKE_LINGER")).await.unwrap();
        first_item(&mut t).await;
        let child = env.child_pid().await;
        assert!(matches!(
            s.start_turn(prompt("x")).await,
            Err(ProviderError::Busy)
        ));
        s.shutdown().await;
        let (_, r) = drain(&mut t, TURN).await;
        assert_eq!(r.outcome, Outcome::Interrupted, "{kind}");
        assert!(!process::group_alive(t.pgid), "{kind}");
        assert!(!alive(child), "{kind}");
    }
}

#[tokio::test]
async fn images_reach_the_cli() {
    // A 1x1 PNG.
    let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
    for kind in KINDS {
        let (_env, mut s) = session(kind);
        let input = TurnInput {
            prompt: "look".into(),
            images: vec![Image {
                media_type: "image/png".into(),
                data_base64: png.into(),
            }],
            ..TurnInput::default()
        };
        let (_t, ev, _) = run(&mut s, input, TURN).await;
        assert!(answer(&ev).contains("images=1"), "{kind}: {ev:?}");
        s.shutdown().await;
    }
    // Bad base64 for codex (which needs a file) fails that turn clearly.
    let (_env, mut s) = session(ProviderKind::Codex);
    let input = TurnInput {
        prompt: "look".into(),
        images: vec![Image {
            media_type: "image/png".into(),
            data_base64: "not base64!".into(),
        }],
        ..TurnInput::default()
    };
    let (_t, _, r) = run(&mut s, input, TURN).await;
    assert_eq!(failed_code(&r), "io");
}

#[tokio::test]
async fn a_dropped_consumer_does_not_wedge_the_session() {
    let (_env, mut s) = session(ProviderKind::Codex);
    let t = s.start_turn(prompt("FAKE_LINES=2000")).await.unwrap();
    drop(t);
    eventually("the session to be idle", SOON, async || !s.is_busy()).await;
    let (_t2, _, r) = run(&mut s, prompt("again"), TURN).await;
    assert_eq!(r.outcome, Outcome::Completed);
}

#[tokio::test]
async fn a_session_that_cannot_be_resumed_continues_in_a_new_one() {
    for kind in KINDS {
        let env = Env::new();
        let mut cfg = env.config(kind);
        cfg.resume_session_id = Some("0000-gone".into());
        let mut s = ProviderSession::new(cfg);
        let (_t, ev, r) = run(&mut s, prompt("hello"), TURN).await;
        assert_eq!(r.outcome, Outcome::Completed, "{kind}: {ev:?}");
        assert!(answer(&ev).contains("turn=1"), "{kind}: {ev:?}");
        let note = items(&ev)
            .into_iter()
            .find(|i| i.kind == ItemKind::System)
            .expect("a note");
        assert!(note.text.as_deref().unwrap().contains("0000-gone"));
        let fresh = s.session_id().unwrap();
        assert_ne!(fresh, "0000-gone");
        assert_eq!(
            ev.iter().rev().find_map(|e| match e {
                ProviderEvent::SessionId(id) => Some(id.clone()),
                _ => None,
            }),
            Some(fresh),
            "{kind}: the new id is the last one reported, so it gets persisted"
        );
        s.shutdown().await;
    }
}

#[tokio::test]
async fn a_reader_may_await_interrupt_without_draining() {
    // Thousands of events are queued and nobody reads them while the
    // interrupt is awaited: the driver must not wait on the reader.
    for kind in KINDS {
        let env = Env::new();
        let mut cfg = env.config(kind);
        cfg.interrupt_grace = Duration::from_millis(300);
        let mut s = ProviderSession::new(cfg);
        let mut t = s
            .start_turn(prompt("FAKE_LINES=5000 FAKE_HANG"))
            .await
            .unwrap();
        first_item(&mut t).await;
        tokio::time::timeout(Duration::from_secs(20), t.interrupter().interrupt())
            .await
            .expect("interrupt returned");
        let (_, r) = drain(&mut t, TURN).await;
        assert_eq!(r.outcome, Outcome::Interrupted, "{kind}");
        s.shutdown().await;
    }
}

#[tokio::test]
async fn an_unreadable_claude_result_still_ends_the_turn() {
    let (_env, mut s) = session(ProviderKind::Claude);
    let (t, _, r) = run(&mut s, prompt("FAKE_HUGE_RESULT"), TURN).await;
    assert_eq!(failed_code(&r), "output_too_large");
    // The process is fine and serves the next turn.
    let (t2, ev2, r2) = run(&mut s, prompt("next"), TURN).await;
    assert_eq!(r2.outcome, Outcome::Completed);
    assert!(answer(&ev2).contains("turn=2"));
    assert_eq!(t.pgid, t2.pgid);
    s.shutdown().await;
}

#[tokio::test]
async fn codex_takes_a_200kb_prompt_on_stdin_not_in_its_arguments() {
    // 200 KB in one argument exceeds the kernel's per-argument limit
    // (`Argument list too long`), and argv is visible to everyone in `ps`.
    let env = Env::new();
    let mut cfg = env.config(ProviderKind::Codex);
    cfg.env.push((
        "FAKE_PROMPT_FILE".into(),
        env.path("prompt.jsonl").display().to_string(),
    ));
    let mut s = ProviderSession::new(cfg);
    let big = format!("SECRET-PROMPT {}", "x".repeat(200 * 1024));
    for turn in 1..=2 {
        // The second turn resumes the thread: the prompt goes on stdin too.
        let (_t, ev, r) = run(&mut s, prompt(&big), TURN).await;
        assert_eq!(r.outcome, Outcome::Completed, "{ev:?}");
        assert!(answer(&ev).contains(&format!("turn={turn}")), "{ev:?}");
    }
    let log = env.args_log();
    assert_eq!(log.len(), 2);
    for entry in &log {
        let argv = entry["argv"].to_string();
        assert!(!argv.contains("SECRET-PROMPT"), "{argv}");
        assert!(
            argv.ends_with(r#""--","-"]"#) || argv.contains(r#""--",""#),
            "{argv}"
        );
    }
    let got = std::fs::read_to_string(env.path("prompt.jsonl")).unwrap();
    for line in got.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["len"], big.len());
        assert!(v["head"].as_str().unwrap().starts_with("SECRET-PROMPT"));
    }
    assert_eq!(got.lines().count(), 2);
    s.shutdown().await;
}

/// Whether the args log shows a process started with `--resume <id>`.
fn resumed_with(log: &[serde_json::Value], id: &str) -> bool {
    log.iter().any(|e| {
        e["argv"]
            .to_string()
            .contains(&format!("\"--resume\",\"{id}\""))
    })
}

#[tokio::test]
async fn at_the_process_cap_the_least_recently_used_idle_process_goes_first() {
    // Cap 2, idle timeout far away: three chats with one finished turn each
    // leave two processes; the first one's chat resumes its session later.
    let pool = ProcessPool::new(2, Duration::from_secs(600));
    let envs: Vec<Env> = (0..3).map(|_| Env::new()).collect();
    let mut sessions: Vec<ProviderSession> = envs
        .iter()
        .map(|e| {
            let mut cfg = e.config(ProviderKind::Claude);
            cfg.pool = Some(pool.clone());
            ProviderSession::new(cfg)
        })
        .collect();
    let mut pgids = Vec::new();
    for s in sessions.iter_mut() {
        let (t, _, r) = run(s, prompt("hi"), TURN).await;
        assert_eq!(r.outcome, Outcome::Completed);
        pgids.push(t.pgid);
    }
    // The third process pushed out the first (least recently used).
    eventually(
        "the least recently used process to stop",
        SOON,
        async || !process::group_alive(pgids[0]),
    )
    .await;
    assert!(process::group_alive(pgids[1]) && process::group_alive(pgids[2]));
    assert!(!sessions[0].has_idle_process());
    assert_eq!(pool.live(), 2);
    assert_eq!(pool.idle(), 2);

    // The first chat's next message resumes its session in a new process,
    // which now pushes out the second chat's (the least recently used).
    let id0 = sessions[0].session_id().unwrap();
    let mut t = sessions[0].start_turn(prompt("again")).await.unwrap();
    let (ev, r) = drain(&mut t, TURN).await;
    assert_eq!(r.outcome, Outcome::Completed);
    assert!(answer(&ev).contains("turn=2"), "{ev:?}");
    assert!(resumed_with(&envs[0].args_log(), &id0));
    eventually("the next process to stop", SOON, async || {
        !process::group_alive(pgids[1])
    })
    .await;
    assert!(process::group_alive(pgids[2]) && process::group_alive(t.pgid));
    assert_eq!(pool.live(), 2);
    for s in sessions.iter_mut() {
        s.shutdown().await;
    }
    assert_eq!(pool.live(), 0);
    assert!(!process::group_alive(pgids[2]) && !process::group_alive(t.pgid));
}

#[tokio::test]
async fn a_running_turn_is_never_stopped_to_make_room() {
    let pool = ProcessPool::new(1, Duration::from_secs(600));
    let (e1, e2) = (Env::new(), Env::new());
    let mk = |e: &Env| {
        let mut cfg = e.config(ProviderKind::Claude);
        cfg.pool = Some(pool.clone());
        ProviderSession::new(cfg)
    };
    let (mut s1, mut s2) = (mk(&e1), mk(&e2));
    let mut hang = s1.start_turn(prompt("FAKE_HANG")).await.unwrap();
    first_item(&mut hang).await;
    // Over the cap while s1 runs: s2 still starts (with a warn).
    let (_t2, _, r2) = run(&mut s2, prompt("hi"), TURN).await;
    assert_eq!(r2.outcome, Outcome::Completed);
    assert!(
        process::group_alive(hang.pgid),
        "the running turn was left alone"
    );
    // Once s2 is idle over the cap, and s1 still runs: s2 is the one idle.
    assert_eq!(pool.live(), 2);
    hang.interrupter().interrupt().await;
    s1.shutdown().await;
    s2.shutdown().await;
    assert_eq!(pool.live(), 0);
}

#[tokio::test]
async fn an_idle_process_is_stopped_after_the_idle_timeout_and_the_session_resumes() {
    let pool = ProcessPool::new(8, Duration::from_secs(1));
    let env = Env::new();
    let mut cfg = env.config(ProviderKind::Claude);
    cfg.pool = Some(pool.clone());
    let mut s = ProviderSession::new(cfg);
    let mut t1 = s.start_turn(prompt("one")).await.unwrap();
    drain(&mut t1, TURN).await;
    assert!(s.has_idle_process());
    let id = s.session_id().unwrap();
    eventually("the process group to end", SOON, async || {
        !process::group_alive(t1.pgid)
    })
    .await;
    eventually("no idle process", SOON, async || !s.has_idle_process()).await;
    assert_eq!(pool.live(), 0);
    let (_t2, ev, r) = run(&mut s, prompt("two"), TURN).await;
    assert_eq!(r.outcome, Outcome::Completed);
    assert!(answer(&ev).contains("turn=2"), "{ev:?}");
    assert!(resumed_with(&env.args_log(), &id));
    s.shutdown().await;
}

#[tokio::test]
async fn claude_gets_bedrock_credentials_from_the_file_read_at_each_spawn() {
    let env = Env::new();
    let file = env.path("bedrock.json");
    std::fs::write(
        &file,
        r#"{"accessKeyId":"AK1","secretAccessKey":"SK1","region":"us-east-1"}"#,
    )
    .unwrap();
    let mut cfg = env.config(ProviderKind::Claude);
    cfg.bedrock_credentials = Some(file.clone());
    // The engine's own values lose to the file; a session token of other
    // credentials must not mix with the file's keys.
    cfg.env.push(("AWS_ACCESS_KEY_ID".into(), "ENGINE".into()));
    cfg.env.push(("AWS_SESSION_TOKEN".into(), "STALE".into()));
    let mut s = ProviderSession::new(cfg);
    let with_model = |m: &str| TurnInput {
        prompt: "hi".into(),
        model: Some(m.into()),
        ..TurnInput::default()
    };
    let mut t = s.start_turn(with_model("a")).await.unwrap();
    assert_eq!(drain(&mut t, TURN).await.1.outcome, Outcome::Completed);
    let got = &env.args_log()[0]["env"];
    assert_eq!(got["CLAUDE_CODE_USE_BEDROCK"], "1");
    assert_eq!(got["AWS_ACCESS_KEY_ID"], "AK1");
    assert_eq!(got["AWS_SECRET_ACCESS_KEY"], "SK1");
    assert_eq!(got["AWS_REGION"], "us-east-1");
    assert!(got.get("AWS_SESSION_TOKEN").is_none(), "{got}");

    // Rewritten in place by the backend (the other shape): the next process
    // (another model needs one) sees the new values.
    std::fs::write(
        &file,
        r#"{"AWS_ACCESS_KEY_ID":"AK2","AWS_SECRET_ACCESS_KEY":"SK2","AWS_SESSION_TOKEN":"ST2","AWS_REGION":"eu-west-1"}"#,
    )
    .unwrap();
    let mut t = s.start_turn(with_model("b")).await.unwrap();
    assert_eq!(drain(&mut t, TURN).await.1.outcome, Outcome::Completed);
    let got = &env.args_log()[1]["env"];
    assert_eq!(got["AWS_ACCESS_KEY_ID"], "AK2");
    assert_eq!(got["AWS_SESSION_TOKEN"], "ST2");
    assert_eq!(got["AWS_REGION"], "eu-west-1");

    // Malformed: Claude starts without it (the engine's environment only).
    std::fs::write(&file, r#"{"accessKeyId":"AK3""#).unwrap();
    let mut t = s.start_turn(with_model("c")).await.unwrap();
    assert_eq!(drain(&mut t, TURN).await.1.outcome, Outcome::Completed);
    let got = &env.args_log()[2]["env"];
    assert!(got.get("CLAUDE_CODE_USE_BEDROCK").is_none(), "{got}");
    assert_eq!(got["AWS_ACCESS_KEY_ID"], "ENGINE");
    s.shutdown().await;
}

fn app_server_config(env: &Env) -> SessionConfig {
    let mut cfg = env.config(ProviderKind::Codex);
    cfg.codex_app_server = true;
    cfg
}

#[tokio::test]
async fn app_server_answers_every_request_by_the_chat_mode() {
    let env = Env::new();
    let mut s = ProviderSession::new(app_server_config(&env));
    let plan = |text: &str| TurnInput {
        prompt: text.into(),
        plan_mode: true,
        ..TurnInput::default()
    };
    for (input, want) in [
        (prompt("FAKE_APPROVAL"), "decision=accept"),
        (plan("FAKE_APPROVAL"), "decision=decline"),
        (prompt("FAKE_UNKNOWN_REQUEST"), "error=-32601"),
    ] {
        let (_t, ev, r) = run(&mut s, input, TURN).await;
        assert_eq!(r.outcome, Outcome::Completed, "{ev:?}");
        assert!(answer(&ev).contains(want), "{want}: {ev:?}");
        // Streamed: the deltas add up to the answer.
        let streamed: String = ev
            .iter()
            .filter_map(|e| match e {
                ProviderEvent::TextDelta { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(streamed, answer(&ev));
    }
    // One process for all three turns.
    assert_eq!(env.args_log().len(), 1);
    s.shutdown().await;
}

#[tokio::test]
async fn app_server_resume_of_a_lost_thread_continues_in_a_new_one() {
    let env = Env::new();
    let mut cfg = app_server_config(&env);
    cfg.resume_session_id = Some("gone-thread".into());
    let mut s = ProviderSession::new(cfg);
    let (_t, ev, r) = run(&mut s, prompt("hi"), TURN).await;
    assert_eq!(r.outcome, Outcome::Completed, "{ev:?}");
    assert!(items(&ev).iter().any(|i| i.kind == ItemKind::System));
    let id = s.session_id().unwrap();
    assert_ne!(id, "gone-thread");
    assert!(answer(&ev).contains(&format!("turn=1 thread={id}")));
    s.shutdown().await;
}

#[tokio::test]
async fn app_server_ignoring_an_interrupt_is_stopped_and_the_thread_resumes() {
    let env = Env::new();
    let mut s = ProviderSession::new(app_server_config(&env));
    let mut t = s
        .start_turn(prompt("FAKE_SLOW FAKE_IGNORE_INTERRUPT"))
        .await
        .unwrap();
    first_item(&mut t).await;
    let started = tokio::time::Instant::now();
    t.interrupter().interrupt().await;
    let (_, r) = drain(&mut t, TURN).await;
    assert_eq!(r.outcome, Outcome::Interrupted);
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "waited for the grace"
    );
    assert!(!process::group_alive(t.pgid), "its group was stopped");
    let id = s.session_id().unwrap();
    let (t2, ev, r) = run(&mut s, prompt("hi"), TURN).await;
    assert_eq!(r.outcome, Outcome::Completed, "{ev:?}");
    assert_ne!(t2.pgid, t.pgid);
    assert_eq!(s.session_id().as_deref(), Some(id.as_str()));
    s.shutdown().await;
    assert!(!process::group_alive(t2.pgid));
}
