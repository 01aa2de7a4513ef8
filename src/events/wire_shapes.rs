//! The wire JSON of every event type, pinned: one event of each variant
//! with a realistic payload (built from the real domain types), published
//! through a real bus, compared with the shapes of `docs/API.md` written
//! out literally. Changing how a payload is built or typed must leave this
//! file's expectations alone.
//!
//! Two checks: equal as JSON (this held before the payloads were typed,
//! when `chat`, `repo`, `status`, `usage`… were `serde_json::Value`s and
//! their keys came out in alphabetical order), and equal byte for byte
//! (keys in the order of the domain types, the order the REST endpoints
//! answer with).

use serde_json::Value;

use super::*;
use crate::chats::model::{ChatRecord, LastTurn, Message, ThinkingLevel};
use crate::hooks::runner::CommandState;
use crate::hooks::{CommandStatus, RepoHooks};
use crate::providers::ProviderKind;
use crate::repos::git::FileChange;
use crate::repos::GitDiff;

const TS: &str = "2026-11-21T23:00:00.123Z";

fn message() -> Message {
    Message {
        id: "m_2".into(),
        text: "Fix the failing test in src/lib.rs".into(),
        queued_at: TS.into(),
        plan_mode: true,
        model: Some("opus".into()),
        images: 1,
        thinking_level: Some(ThinkingLevel::High),
    }
}

fn chat_record() -> ChatRecord {
    ChatRecord {
        id: "c_1".into(),
        provider: ProviderKind::Claude,
        title: "Claude chat".into(),
        model: None,
        cwd: "/home/ubuntu/workspaces/api".into(),
        provider_session_id: Some("s_1".into()),
        created_at: TS.into(),
        updated_at: TS.into(),
        queue: vec![message()],
        last_turn: Some(LastTurn {
            turn_id: "t_0".into(),
            outcome: Outcome::Failed,
            finished_at: TS.into(),
            reason: None,
            error: Some(ErrorBody {
                code: "timeout".into(),
                message: "the turn ran past its deadline".into(),
            }),
        }),
        usage: Usage {
            input_tokens: 1200,
            output_tokens: 340,
            cached_input_tokens: 800,
            cost_usd: Some(0.0123),
        },
        active_turn: None,
        codex_thread_usage: None,
    }
}

const CHAT: &str = r#"{"id":"c_1","provider":"claude","title":"Claude chat","model":null,
 "cwd":"/home/ubuntu/workspaces/api","status":"waiting_for_hooks","processing":true,
 "providerSessionId":"s_1","createdAt":"2026-11-21T23:00:00.123Z","updatedAt":"2026-11-21T23:00:00.123Z",
 "queue":[{"id":"m_2","text":"Fix the failing test in src/lib.rs","textLength":34,"truncated":false,
   "queuedAt":"2026-11-21T23:00:00.123Z","planMode":true,"model":"opus","images":1,"thinkingLevel":"high"}],
 "lastTurn":{"turnId":"t_0","outcome":"failed","finishedAt":"2026-11-21T23:00:00.123Z",
   "error":{"code":"timeout","message":"the turn ran past its deadline"}},
 "usage":{"inputTokens":1200,"outputTokens":340,"cachedInputTokens":800,"costUsd":0.0123}}"#;

fn repo() -> Repo {
    Repo {
        name: "api".into(),
        path: "/home/ubuntu/workspaces/api".into(),
        branch: Some("feat/x".into()),
        default_branch: "main".into(),
        head_sha: Some("3f2a9c0d".into()),
        remote_url: Some("https://github.com/acme/api.git".into()),
        is_dirty: true,
        ahead: 1,
        behind: 0,
        pr_url: None,
        start_hooks_completed: true,
        git_diff: GitDiff {
            files_changed: 2,
            added: 10,
            removed: 3,
            files: vec![
                FileChange {
                    path: "src/a.rs".into(),
                    status: "modified",
                    additions: 9,
                    deletions: 3,
                },
                FileChange {
                    path: "notes.md".into(),
                    status: "untracked",
                    additions: 1,
                    deletions: 0,
                },
            ],
            full_diff: None,
            truncated: None,
        },
        error: None,
    }
}

const REPO: &str = r#"{"name":"api","path":"/home/ubuntu/workspaces/api","branch":"feat/x",
 "defaultBranch":"main","headSha":"3f2a9c0d","remoteUrl":"https://github.com/acme/api.git",
 "isDirty":true,"ahead":1,"behind":0,"prUrl":null,"startHooksCompleted":true,
 "gitDiff":{"filesChanged":2,"added":10,"removed":3,"files":[
   {"path":"src/a.rs","status":"modified","additions":9,"deletions":3},
   {"path":"notes.md","status":"untracked","additions":1,"deletions":0}]}}"#;

fn hooks_status() -> HooksStatus {
    HooksStatus {
        status: "failed".into(),
        started_at: Some(TS.into()),
        finished_at: Some(TS.into()),
        log_path: "/home/ubuntu/.replicas/startHooks.log".into(),
        repos: vec![
            RepoHooks {
                repo: "api".into(),
                config_file: Some("replicas.yaml".into()),
                status: "failed".into(),
                error: None,
                commands: vec![
                    CommandStatus {
                        command: "npm ci".into(),
                        status: CommandState::Succeeded,
                        exit_code: Some(0),
                        duration_ms: Some(1200),
                    },
                    CommandStatus {
                        command: "npm run build".into(),
                        status: CommandState::TimedOut,
                        exit_code: None,
                        duration_ms: Some(300000),
                    },
                ],
            },
            RepoHooks {
                repo: "web".into(),
                config_file: Some("replicas.json".into()),
                status: "failed".into(),
                error: Some("replicas.json: expected a map at line 1 column 1".into()),
                commands: vec![],
            },
        ],
    }
}

const HOOKS_STATUS: &str = r#"{"status":"failed","startedAt":"2026-11-21T23:00:00.123Z",
 "finishedAt":"2026-11-21T23:00:00.123Z","logPath":"/home/ubuntu/.replicas/startHooks.log",
 "repos":[{"repo":"api","configFile":"replicas.yaml","status":"failed","commands":[
   {"command":"npm ci","status":"succeeded","exitCode":0,"durationMs":1200},
   {"command":"npm run build","status":"timed_out","exitCode":null,"durationMs":300000}]},
  {"repo":"web","configFile":"replicas.json","status":"failed",
   "error":"replicas.json: expected a map at line 1 column 1","commands":[]}]}"#;

fn engine_status() -> EngineStatus<'static> {
    use crate::status::{AgentProcesses, EventsState, HooksState, ProvidersState, RepoCount};
    use crate::upstream::refresh::{Health, Summary};
    EngineStatus {
        version: "0.1.0",
        started_at: TS.into(),
        uptime_ms: 123,
        workspace_id: Some("ws_1".into()),
        workspace_root: std::path::Path::new("/home/ubuntu/workspaces").into(),
        chats: crate::chats::ChatCounts {
            total: 3,
            running: 1,
            queued_messages: 2,
        },
        repos: RepoCount { count: 2 },
        hooks: HooksState {
            status: "completed".into(),
        },
        events: EventsState {
            last_event_id: "1042".into(),
            subscribers: 2,
        },
        token_refresh: Summary(vec![
            ("github", Health::Ok),
            ("claude", Health::Disabled),
            ("codex", Health::Failing),
        ]),
        providers: ProvidersState {
            codex_transport: "app-server",
            agent_processes: AgentProcesses { live: 2, idle: 1 },
        },
    }
}

const ENGINE_STATUS: &str = r#"{"version":"0.1.0","startedAt":"2026-11-21T23:00:00.123Z",
 "uptimeMs":123,"workspaceId":"ws_1","workspaceRoot":"/home/ubuntu/workspaces",
 "chats":{"total":3,"running":1,"queuedMessages":2},"repos":{"count":2},
 "hooks":{"status":"completed"},"events":{"lastEventId":"1042","subscribers":2},
 "tokenRefresh":{"github":"ok","claude":"disabled","codex":"failing"},
 "providers":{"codexTransport":"app-server","agentProcesses":{"live":2,"idle":1}}}"#;

/// Every variant (and the optional parts of some), with the chat it is
/// published for and the envelope it must become (`ts` aside).
fn cases() -> Vec<(Option<&'static str>, EventKind, String)> {
    let provider_usage = Usage {
        input_tokens: 1200,
        output_tokens: 340,
        cached_input_tokens: 800,
        cost_usd: Some(0.0123),
    };
    let item = r#"{"id":"i_1","turnId":"t_1","ts":"2026-11-21T23:00:00.123Z","kind":"tool_call","text":"","tool":{"name":"Bash","input":{"command":"cargo test"},"output":null,"isError":false}}"#;
    vec![
        (
            None,
            EventKind::EngineReady {
                version: "0.1.0".into(),
                pid: 4242,
            },
            r#"{"type":"engine.ready","payload":{"version":"0.1.0","pid":4242}}"#.into(),
        ),
        (
            None,
            EventKind::EngineStatusChanged {
                status: Box::new(engine_status()),
            },
            format!(r#"{{"type":"engine.status.changed","payload":{{"status":{ENGINE_STATUS}}}}}"#),
        ),
        (
            None,
            EventKind::RepoDiscovered {
                repo: Box::new(repo()),
            },
            format!(r#"{{"type":"repo.discovered","payload":{{"repo":{REPO}}}}}"#),
        ),
        (
            None,
            EventKind::RepoStatusChanged {
                repo: Box::new(repo()),
            },
            format!(r#"{{"type":"repo.status.changed","payload":{{"repo":{REPO}}}}}"#),
        ),
        (
            Some("c_1"),
            EventKind::ChatCreated {
                chat: Box::new(chat_record().view(false, false)),
            },
            format!(r#"{{"chatId":"c_1","type":"chat.created","payload":{{"chat":{CHAT}}}}}"#),
        ),
        (
            Some("c_1"),
            EventKind::ChatUpdated {
                chat: Box::new(chat_record().view(false, false)),
            },
            format!(r#"{{"chatId":"c_1","type":"chat.updated","payload":{{"chat":{CHAT}}}}}"#),
        ),
        (
            Some("c_1"),
            EventKind::ChatDeleted {},
            r#"{"chatId":"c_1","type":"chat.deleted","payload":{}}"#.into(),
        ),
        (
            Some("c_1"),
            EventKind::TurnAccepted {
                message: message().preview(),
                status: Delivery::Queued,
                position: 2,
            },
            r#"{"chatId":"c_1","type":"chat.turn.accepted","payload":{
              "message":{"id":"m_2","text":"Fix the failing test in src/lib.rs","textLength":34,
                "truncated":false,"queuedAt":"2026-11-21T23:00:00.123Z","planMode":true,
                "model":"opus","images":1,"thinkingLevel":"high"},
              "status":"queued","position":2}}"#
                .into(),
        ),
        (
            Some("c_1"),
            EventKind::TurnAccepted {
                message: Message {
                    text: "é".repeat(300),
                    plan_mode: false,
                    model: None,
                    images: 0,
                    thinking_level: None,
                    ..message()
                }
                .preview(),
                status: Delivery::Sent,
                position: 0,
            },
            format!(
                r#"{{"chatId":"c_1","type":"chat.turn.accepted","payload":{{
                  "message":{{"id":"m_2","text":"{}","textLength":300,"truncated":true,
                    "queuedAt":"2026-11-21T23:00:00.123Z","planMode":false,"model":null,"images":0}},
                  "status":"sent","position":0}}}}"#,
                "é".repeat(280)
            ),
        ),
        (
            Some("c_1"),
            EventKind::TurnStarted {
                turn_id: "t_1".into(),
                message_id: "m_2".into(),
            },
            r#"{"chatId":"c_1","type":"chat.turn.started","payload":{"turnId":"t_1","messageId":"m_2"}}"#
                .into(),
        ),
        (
            Some("c_1"),
            EventKind::TurnDelta(TurnDelta::Item {
                turn_id: "t_1".into(),
                item: RawJson::from_text(item).unwrap(),
            }),
            format!(r#"{{"chatId":"c_1","type":"chat.turn.delta","payload":{{"turnId":"t_1","item":{item}}}}}"#),
        ),
        (
            Some("c_1"),
            EventKind::TurnDelta(TurnDelta::Text {
                turn_id: "t_1".into(),
                item_id: "i_2".into(),
                text_delta: "Hello \"world\"\n".into(),
            }),
            r#"{"chatId":"c_1","type":"chat.turn.delta","payload":{"turnId":"t_1","itemId":"i_2","textDelta":"Hello \"world\"\n"}}"#
                .into(),
        ),
        (
            Some("c_1"),
            EventKind::TurnCompleted {
                turn_id: "t_1".into(),
                outcome: Outcome::Completed,
                usage: provider_usage,
                duration_ms: 4200,
                error: None,
            },
            r#"{"chatId":"c_1","type":"chat.turn.completed","payload":{"turnId":"t_1","outcome":"completed",
              "usage":{"inputTokens":1200,"outputTokens":340,"cachedInputTokens":800,"costUsd":0.0123},
              "durationMs":4200}}"#
                .into(),
        ),
        (
            Some("c_1"),
            EventKind::TurnCompleted {
                turn_id: "t_1".into(),
                outcome: Outcome::Failed,
                usage: Usage::default(),
                duration_ms: 300001,
                error: Some(ErrorBody {
                    code: "timeout".into(),
                    message: "the turn ran past its deadline".into(),
                }),
            },
            r#"{"chatId":"c_1","type":"chat.turn.completed","payload":{"turnId":"t_1","outcome":"failed",
              "usage":{"inputTokens":0,"outputTokens":0,"cachedInputTokens":0,"costUsd":null},
              "durationMs":300001,"error":{"code":"timeout","message":"the turn ran past its deadline"}}}"#
                .into(),
        ),
        (
            Some("c_1"),
            EventKind::ChatInterrupted {
                turn_id: "t_1".into(),
                duration_ms: 950,
            },
            r#"{"chatId":"c_1","type":"chat.interrupted","payload":{"turnId":"t_1","durationMs":950}}"#
                .into(),
        ),
        (
            None,
            EventKind::HooksStarted {
                status: hooks_status(),
            },
            format!(r#"{{"type":"hooks.started","payload":{{"status":{HOOKS_STATUS}}}}}"#),
        ),
        (
            None,
            EventKind::HooksProgress(HookProgress {
                repo: "api".into(),
                index: 1,
                command: "npm run build".into(),
                status: CommandState::TimedOut,
                exit_code: None,
                timed_out: true,
                duration_ms: Some(300000),
            }),
            r#"{"type":"hooks.progress","payload":{"repo":"api","index":1,"command":"npm run build",
              "status":"timed_out","exitCode":null,"timedOut":true,"durationMs":300000}}"#
                .into(),
        ),
        (
            None,
            EventKind::HooksProgress(HookProgress {
                repo: "api".into(),
                index: 0,
                command: "npm ci".into(),
                status: CommandState::Running,
                exit_code: None,
                timed_out: false,
                duration_ms: None,
            }),
            r#"{"type":"hooks.progress","payload":{"repo":"api","index":0,"command":"npm ci",
              "status":"running","exitCode":null,"timedOut":false,"durationMs":null}}"#
                .into(),
        ),
        (
            None,
            EventKind::HooksCompleted {
                status: hooks_status(),
            },
            format!(r#"{{"type":"hooks.completed","payload":{{"status":{HOOKS_STATUS}}}}}"#),
        ),
        (
            None,
            EventKind::HooksFailed {
                status: hooks_status(),
            },
            format!(r#"{{"type":"hooks.failed","payload":{{"status":{HOOKS_STATUS}}}}}"#),
        ),
        (
            None,
            EventKind::HooksStatus {
                status: hooks_status(),
            },
            format!(r#"{{"type":"hooks.status","payload":{{"status":{HOOKS_STATUS}}}}}"#),
        ),
        (
            None,
            EventKind::Error {
                code: "auth_expired".into(),
                message: "claude authentication failed: Invalid API key".into(),
                source: "claude".into(),
            },
            r#"{"type":"error","payload":{"code":"auth_expired","message":"claude authentication failed: Invalid API key","source":"claude"}}"#
                .into(),
        ),
    ]
}

#[test]
fn every_event_type_serializes_to_the_contract_shape() {
    let dir = tempfile::tempdir().unwrap();
    let bus = EventBus::open(&dir.path().join("events.jsonl"), 1 << 30).unwrap();
    let cases = cases();
    let mut types = std::collections::BTreeSet::new();
    for (i, (chat_id, kind, expected)) in cases.into_iter().enumerate() {
        let name = kind.type_name();
        types.insert(name);
        let published = bus.publish(chat_id, kind);
        let id = i + 1;
        // The envelope: `id` first, then `ts`, `chatId`, `type`, `payload`,
        // byte for byte (the journal index reads it without a parse).
        let line = published.json();
        let (head, rest) = line.split_at(line.find(r#","ts":""#).unwrap());
        assert_eq!(head, format!(r#"{{"id":"{id}""#));
        let ts_end = rest[7..].find('"').unwrap() + 8;
        let after_ts = &rest[ts_end..];
        let expected_after_ts = match chat_id {
            Some(c) => format!(r#","chatId":"{c}","type":"{name}","payload":"#),
            None => format!(r#","type":"{name}","payload":"#),
        };
        assert!(after_ts.starts_with(&expected_after_ts), "{line}");
        // The payload, as JSON.
        let got: Value = serde_json::from_str(line).unwrap();
        let want: Value = serde_json::from_str(&expected).unwrap();
        assert_eq!(got["type"], want["type"]);
        assert_eq!(got.get("chatId"), want.get("chatId"));
        assert_eq!(got["payload"], want["payload"], "{name}: {line}");
        assert_eq!(
            got.as_object().unwrap().len(),
            5 - usize::from(chat_id.is_none())
        );
        // Byte for byte.
        let ts = &rest[7..ts_end - 1];
        assert_eq!(
            line,
            format!(r#"{{"id":"{id}","ts":"{ts}",{}"#, &minified(&expected)[1..]),
            "{name}"
        );
        // The SSE frame names the type.
        assert!(published
            .frame
            .starts_with(format!("id: {id}\nevent: {name}\ndata: {{").as_bytes()));
    }
    assert_eq!(types.len(), 18, "one case per event type: {types:?}");
}

/// `json` without the whitespace outside its strings.
fn minified(json: &str) -> String {
    let (mut out, mut in_string, mut escaped) = (String::new(), false, false);
    for c in json.chars() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c.is_whitespace() {
            continue;
        } else {
            in_string = c == '"';
        }
        out.push(c);
    }
    out
}
