//! Providers: the agent CLIs (`claude`, `codex`) run headless, one
//! [`ProviderSession`] per chat. A session turns a [`TurnInput`] into a
//! [`RunningTurn`] whose channel yields [`ProviderEvent`]s: the provider's
//! session id, normalized history items, streamed text, and exactly one
//! [`ProviderEvent::Finished`], always last.
//!
//! Layout: one folder per CLI, each with its arguments and environment,
//! its wire protocol and a tolerant line parser (unit-tested against the
//! recorded transcripts), plus the glue that implements [`session::Cli`]
//! and [`driver::Protocol`] for it: [`claude`], [`codex`]. Shared by both:
//! `session.rs` (the session state and the small `Backend` trait
//! [`ProviderSession`] drives), `driver.rs` (the one turn driver: deadline,
//! interrupt, line to event, exit handling, all processes through
//! [`crate::process::Group`]), `pool.rs` (idle timeout and the cap on live
//! agent processes), `lines.rs` (the capped line reader).
//!
//! Invariants:
//! - `Finished` is sent only after the turn really ended: for Codex after the
//!   `codex exec` process's exit was observed and its group is gone; for
//!   Claude after its `result` line (the long-lived process may stay) and
//!   after any tool process left in its group was ended, or after the whole
//!   group was stopped when Claude itself did not answer.
//! - Success is read from the CLI's own report (`result.subtype`/`is_error`,
//!   `turn.completed`/`turn.failed`), never from an exit code.
//! - Nothing the CLI prints can panic the engine: unknown types and fields
//!   are skipped, non-JSON lines are logged and skipped, over-long lines are
//!   skipped without being buffered.

pub mod claude;
pub mod codex;
mod driver;
pub mod lines;
mod pool;
mod session;

pub use codex::transport as codex_transport;
pub use pool::ProcessPool;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

pub use crate::events::RawJson;

/// Which agent CLI a chat drives.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Claude,
    Codex,
}

impl ProviderKind {
    /// The wire name (`"claude"` / `"codex"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Claude => "claude",
            ProviderKind::Codex => "codex",
        }
    }

    /// Parse the wire name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "claude" => Some(ProviderKind::Claude),
            "codex" => Some(ProviderKind::Codex),
            _ => None,
        }
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An image attached to a message (Anthropic base64 block content).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// e.g. `image/png`.
    pub media_type: String,
    /// Base64 of the image bytes, as the client sent it.
    pub data_base64: String,
}

/// What one turn asks of the agent.
#[derive(Clone, Debug, Default)]
pub struct TurnInput {
    pub prompt: String,
    /// Model override for this turn; `None` keeps the CLI's default.
    pub model: Option<String>,
    /// Plan mode: the agent plans and does not edit (Claude
    /// `--permission-mode plan`; Codex gets a read-only sandbox).
    pub plan_mode: bool,
    /// `low|medium|high|max` (Claude `--effort`, Codex `model_reasoning_effort`).
    pub thinking_level: Option<String>,
    pub images: Vec<Image>,
    /// Extra instructions appended to the agent's system prompt (the repo's
    /// `systemPrompt`).
    pub system_prompt: Option<String>,
}

/// How to run one chat's agent.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub kind: ProviderKind,
    /// The CLI binary (`CLAUDE_BIN` / `CODEX_BIN`, or a bare name for PATH).
    pub bin: PathBuf,
    /// Working directory of the agent.
    pub cwd: PathBuf,
    /// Provider session (Claude) / thread (Codex) id to resume, from the chat.
    pub resume_session_id: Option<String>,
    /// A turn running longer than this fails with code `timeout` and its
    /// process group is killed.
    pub turn_timeout: Duration,
    /// Extra environment on top of the engine's own (which passes through
    /// untouched), e.g. `ANTHROPIC_BASE_URL` in tests.
    pub env: Vec<(String, String)>,
    /// Claude: how long to wait for the `result` line after the interrupt
    /// request before stopping the whole process group. Default 3 s.
    pub interrupt_grace: Duration,
    /// Between TERM and KILL when ending a process group. Default 2 s.
    pub kill_grace: Duration,
    /// Codex: the thread's usage totals after its last turn, as
    /// [`ProviderSession::codex_thread_usage`] reported them before a
    /// restart. Codex reports usage cumulatively per thread; with this the
    /// first resumed turn still reports only its own tokens.
    pub codex_thread_usage: Option<Usage>,
    /// The engine-wide bound on live agent processes (idle timeout and
    /// cap); `None`: processes are kept until the session ends.
    pub pool: Option<ProcessPool>,
    /// Claude: `~/.claude/.bedrock-credentials.json`, read at each spawn
    /// ([`claude::bedrock`]); `None`: not consulted.
    pub bedrock_credentials: Option<PathBuf>,
    /// Codex: drive `codex app-server` (falling back to `exec --json` when
    /// it fails its handshake) instead of `codex exec --json`.
    pub codex_app_server: bool,
}

impl SessionConfig {
    pub fn new(kind: ProviderKind, bin: impl Into<PathBuf>, cwd: impl Into<PathBuf>) -> Self {
        Self {
            kind,
            bin: bin.into(),
            cwd: cwd.into(),
            resume_session_id: None,
            turn_timeout: Duration::from_secs(3600),
            env: Vec::new(),
            interrupt_grace: Duration::from_secs(3),
            kill_grace: Duration::from_secs(2),
            codex_thread_usage: None,
            pool: None,
            bedrock_credentials: None,
            codex_app_server: false,
        }
    }
}

/// What a turn produced, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum ProviderEvent {
    /// The provider's session/thread id; persist it to resume later. Sent
    /// whenever the CLI reports it (at least once per turn when it does).
    SessionId(String),
    /// One normalized history item (the chat service adds id, turnId, ts).
    Item(NormalizedItem),
    /// Streamed text of the assistant message whose final
    /// [`NormalizedItem::key`] will equal `item_key`.
    TextDelta { item_key: String, text: String },
    /// The CLI reported an authentication failure (expired/invalid
    /// credentials). The turn then finishes `Failed{code:"auth_expired"}`.
    AuthFailure { message: String },
    /// The turn ended; exactly once, last.
    Finished(TurnResult),
}

/// The normalized items among a turn's events, in order.
pub fn items(events: &[ProviderEvent]) -> Vec<&NormalizedItem> {
    events
        .iter()
        .filter_map(|e| match e {
            ProviderEvent::Item(i) => Some(i),
            _ => None,
        })
        .collect()
}

/// The kind of a history item (wire names in snake_case).
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    UserMessage,
    AssistantMessage,
    Reasoning,
    ToolCall,
    ToolResult,
    Command,
    FileChange,
    TodoList,
    Error,
    System,
}

/// A history item as the provider produced it, without the engine's id,
/// turn id and timestamp. Serializes to the contract's HistoryItem fields.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NormalizedItem {
    pub kind: ItemKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    pub tool: Option<ToolInfo>,
    /// The provider's own identity of this item within the turn (Claude
    /// `tool_use` id or `message-id:block`, Codex item id). A later item with
    /// the same key is an *update* of the earlier one (a Codex command that
    /// started, then completed; a tool result for a tool call has its own
    /// key `result:<tool id>`). Not part of the wire item.
    #[serde(skip)]
    pub key: Option<String>,
    /// The provider's raw line (served only with `?raw=true`), kept as
    /// text: it is stored, never inspected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawJson>,
}

impl NormalizedItem {
    pub fn new(kind: ItemKind) -> Self {
        Self {
            kind,
            text: None,
            tool: None,
            key: None,
            raw: None,
        }
    }
}

/// A tool call, command or file change.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ToolCall)]
pub struct ToolInfo {
    pub name: String,
    #[schema(value_type = Object)]
    pub input: Value,
    pub output: Option<String>,
    pub is_error: bool,
    /// Exit code of a command, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
    pub exit_code: Option<i32>,
}

/// How a turn ended and what it cost.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TurnResult {
    pub outcome: Outcome,
    pub usage: Usage,
}

/// How a turn ended.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Outcome {
    Completed,
    /// `code` is machine-readable: `timeout`, `auth_expired`, `spawn_failed`,
    /// `exited` (process ended without reporting the turn's end), `turn_failed`,
    /// or the CLI's own result subtype (e.g. `error_max_turns`).
    Failed {
        code: String,
        message: String,
    },
    Interrupted,
}

/// Tokens and cost: of one turn (what a CLI reports, `chat.turn.completed`)
/// or summed over a chat's turns (`Chat.usage`, see `add`).
/// `input_tokens` includes cached input (`cached_input_tokens` is the part
/// served from cache), as OpenAI counts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    /// USD, when the CLI reports it (Claude does; Codex does not); summed
    /// over the turns that reported a cost, `null` (unknown) until one did:
    /// a Codex chat's cost is unknown, not free.
    #[serde(default)]
    pub cost_usd: Option<f64>,
}

impl Usage {
    /// Accumulate one turn's usage (a CLI that reports no cost adds none).
    pub fn add(&mut self, turn: &Usage) {
        self.input_tokens += turn.input_tokens;
        self.output_tokens += turn.output_tokens;
        self.cached_input_tokens += turn.cached_input_tokens;
        if let Some(cost) = turn.cost_usd {
            self.cost_usd = Some(self.cost_usd.unwrap_or(0.0) + cost);
        }
    }
}

/// Why a turn could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The previous turn of this session has not finished yet.
    #[error("a turn is already running in this session")]
    Busy,
    /// The CLI binary could not be started (missing, not executable).
    #[error("could not start {bin}: {source}")]
    Spawn {
        bin: String,
        #[source]
        source: std::io::Error,
    },
    /// Preparing the turn failed (e.g. writing image files, writing to the
    /// CLI's stdin).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ProviderError {
    /// A short machine-readable code, for a failed turn's `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            ProviderError::Busy => "busy",
            ProviderError::Spawn { .. } => "spawn_failed",
            ProviderError::Io(_) => "io",
        }
    }
}

/// One chat's agent session. Claude keeps one long-lived process
/// (stream-json input) across turns and respawns it with `--resume` when it
/// died or when the turn needs other process flags (model, plan mode,
/// effort, system prompt); Codex spawns one `codex exec` (or `exec resume`)
/// per turn. One turn at a time.
///
/// A session id the CLI no longer knows (its files are gone) does not wedge
/// the chat: the turn is re-run once in a new session, a `system` item says
/// so, and the new id arrives as [`ProviderEvent::SessionId`]. The process
/// group then differs from [`RunningTurn::pgid`] for the rest of that turn.
pub struct ProviderSession {
    inner: Box<dyn session::Backend>,
}

/// A turn in progress: read `events` until [`ProviderEvent::Finished`].
pub struct RunningTurn {
    /// Unbounded: the driver never waits for the reader, so a reader may
    /// await [`Interrupter::interrupt`] without draining first.
    pub events: mpsc::UnboundedReceiver<ProviderEvent>,
    /// Process group of the process running this turn; record it (with
    /// `start_time`) so a later engine can end strays
    /// ([`crate::process::kill_recorded_group`]).
    pub pgid: u32,
    /// Start time of the group leader ([`crate::process::process_start_time`]).
    pub start_time: Option<u64>,
    interrupter: Interrupter,
}

impl RunningTurn {
    /// A handle that interrupts this turn; cheap to clone and `Send`.
    pub fn interrupter(&self) -> Interrupter {
        self.interrupter.clone()
    }
}

/// Interrupts one turn.
#[derive(Clone, Debug)]
pub struct Interrupter {
    tx: mpsc::Sender<oneshot::Sender<()>>,
}

impl Interrupter {
    /// Stop the turn and return once it has ended: its `Finished` has been
    /// sent (outcome `Interrupted`, unless it finished on its own first) and
    /// the tools' processes are gone. Idempotent; a no-op on a finished turn.
    pub async fn interrupt(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.send(done_tx).await.is_ok() {
            // The driver answers after cleanup; a dropped sender means the
            // turn ended by itself meanwhile, which is just as good.
            let _ = done_rx.await;
        }
    }
}

impl ProviderSession {
    pub fn new(cfg: SessionConfig) -> Self {
        let inner: Box<dyn session::Backend> = match cfg.kind {
            ProviderKind::Claude => Box::new(session::Session(
                session::Shared::<claude::Claude>::new(cfg),
            )),
            ProviderKind::Codex if cfg.codex_app_server => {
                Box::new(session::Session(session::Shared::<codex::Codex>::new(cfg)))
            }
            ProviderKind::Codex => Box::new(session::Session(
                session::Shared::<codex::CodexExec>::new(cfg),
            )),
        };
        Self { inner }
    }

    /// Start a turn. Errors only with [`ProviderError::Busy`]; every other
    /// failure, including a missing binary (`spawn_failed`), arrives as the
    /// turn's `Finished` event, so callers have one path for failed turns.
    pub async fn start_turn(&mut self, input: TurnInput) -> Result<RunningTurn, ProviderError> {
        self.inner.start_turn(input).await
    }

    /// The provider session/thread id, once known (from the config or
    /// reported by the CLI).
    pub fn session_id(&self) -> Option<String> {
        self.inner.session_id()
    }

    /// Whether a process is kept between turns right now (Claude's
    /// long-lived process, until it is reaped or the session ends).
    pub fn has_idle_process(&self) -> bool {
        self.inner.has_idle_process()
    }

    /// Whether a turn is running.
    pub fn is_busy(&self) -> bool {
        self.inner.is_busy()
    }

    /// End everything this session runs: interrupt a running turn (its
    /// `Finished` is sent) and stop the idle Claude process's group. Used
    /// when the chat is deleted or the engine stops.
    pub async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }

    /// Codex: the thread's usage totals so far (persist them with the
    /// session id; see [`SessionConfig::codex_thread_usage`]).
    pub fn codex_thread_usage(&self) -> Option<Usage> {
        self.inner.thread_usage()
    }

    /// The kind of provider.
    pub fn kind(&self) -> ProviderKind {
        self.inner.kind()
    }
}

/// Give each item of a line that line as `raw`: moved when there is one
/// item (the common case), cloned otherwise. Items that carry a narrower
/// raw (a permission denial) keep theirs. `line` must be valid JSON (the
/// caller parsed it).
pub(crate) fn attach_raw(out: &mut [ProviderEvent], line: &str) {
    let mut wanting = out
        .iter_mut()
        .filter_map(|e| match e {
            ProviderEvent::Item(i) if i.raw.is_none() => Some(i),
            _ => None,
        })
        .collect::<Vec<_>>();
    let Some(last) = wanting.pop() else {
        return;
    };
    let Some(raw) = RawJson::from_text(line) else {
        return;
    };
    for item in wanting {
        item.raw = Some(raw.clone());
    }
    last.raw = Some(raw);
}

/// A lock that survives a panicked holder: provider state must stay usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_cross_tasks() {
        assert_send_sync::<ProviderSession>();
        assert_send_sync::<Interrupter>();
        assert_send_sync::<ProviderEvent>();
        fn turn_is_send(t: RunningTurn) -> impl Send {
            t
        }
        let _ = turn_is_send;
        let mut s = ProviderSession::new(SessionConfig::new(ProviderKind::Codex, "codex", "/"));
        assert_send(&s.start_turn(TurnInput::default()));
        assert_send(&s.shutdown());
    }

    #[test]
    fn items_serialize_as_the_contract_says() {
        let mut item = NormalizedItem::new(ItemKind::ToolResult);
        item.tool = Some(ToolInfo {
            name: "Bash".into(),
            input: serde_json::json!({"command": "ls"}),
            output: Some("a".into()),
            is_error: false,
            exit_code: None,
        });
        item.key = Some("internal".into());
        let v = serde_json::to_value(&item).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"kind": "tool_result", "tool": {"name": "Bash", "input": {"command": "ls"}, "output": "a", "isError": false}})
        );
        let u = serde_json::to_value(Usage {
            input_tokens: 1,
            ..Usage::default()
        })
        .unwrap();
        assert_eq!(
            u,
            serde_json::json!({"inputTokens": 1, "outputTokens": 0, "cachedInputTokens": 0, "costUsd": null})
        );
        assert_eq!(
            serde_json::to_value(ProviderKind::Claude).unwrap(),
            "claude"
        );
        assert_eq!(ProviderKind::parse("codex"), Some(ProviderKind::Codex));
        assert_eq!(ProviderKind::parse("gpt"), None);
    }
}
