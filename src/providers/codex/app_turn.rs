//! Codex over `codex app-server`: one long-lived process per chat (like
//! Claude's), with `exec --json` as the fallback where the app-server is
//! missing or fails its handshake (an older CLI). Which transport is in use
//! is decided by the first Codex turn, logged once, and reported by
//! [`transport`] (`GET /status` can show it).

use std::process::ExitStatus;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::app_server::{self, AppServerParser};
use super::{CodexExec, CodexExecTurn};
use crate::providers::driver::{exited_message, Proc, Protocol};
use crate::providers::session::{Cli, IdleProc};
use crate::providers::{
    ItemKind, NormalizedItem, Outcome, ProviderError, ProviderEvent, SessionConfig, TurnInput,
    TurnResult, Usage,
};

/// How long the app-server may take to answer a request while a turn is
/// being started (node start-up on a loaded machine included).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// After `turn/interrupt`, how long the turn may take to end before the
/// process group is stopped.
const INTERRUPT_GRACE: Duration = Duration::from_secs(5);

const UNKNOWN: u8 = 0;
const APP_SERVER: u8 = 1;
const EXEC_FALLBACK: u8 = 2;
static TRANSPORT: AtomicU8 = AtomicU8::new(UNKNOWN);

/// The Codex transport in use: `"app-server"`, `"exec"` (the app-server
/// failed its handshake), or `"unknown"` before the first app-server turn.
pub fn transport() -> &'static str {
    match TRANSPORT.load(Ordering::Acquire) {
        APP_SERVER => "app-server",
        EXEC_FALLBACK => "exec",
        _ => "unknown",
    }
}

fn settle_transport(to: u8, why: Option<&str>) {
    if TRANSPORT
        .compare_exchange(UNKNOWN, to, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        match why {
            None => tracing::info!(transport = "app-server", "codex transport chosen"),
            Some(why) => {
                tracing::warn!(transport = "exec", reason = %why, "codex app-server unavailable; using codex exec --json")
            }
        }
    }
}

/// Codex: app-server when it works, else `exec --json`.
pub(in crate::providers) struct Codex;

/// The app-server process kept between turns, with its thread.
pub(in crate::providers) struct AppIdle {
    proc: Proc,
    parser: AppServerParser,
    thread: String,
    next_id: u64,
}

impl IdleProc for AppIdle {
    fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// A Codex turn on either transport.
pub(in crate::providers) enum CodexTurn {
    Exec(CodexExecTurn),
    App(AppTurn),
}

/// One app-server turn's protocol state.
pub(in crate::providers) struct AppTurn {
    parser: AppServerParser,
    thread: String,
    next_id: u64,
    plan_mode: bool,
    pending: Vec<ProviderEvent>,
    outgoing: Vec<String>,
}

enum BeginError {
    /// The app-server did not answer as one (missing, older CLI): fall back.
    Handshake(String),
    Provider(ProviderError),
}

impl From<ProviderError> for BeginError {
    fn from(e: ProviderError) -> Self {
        BeginError::Provider(e)
    }
}

impl AppTurn {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// One line from the app-server: a response (returned as `(id,
    /// result-or-error)`), a server request (answered into `outgoing`), or a
    /// notification (its events appended to `into`).
    fn handle(
        &mut self,
        line: &str,
        into: &mut Vec<ProviderEvent>,
    ) -> Option<(u64, Result<Value, Value>)> {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            let preview: String = line.chars().take(200).collect();
            tracing::warn!(line = %preview, "skipped a non-JSON codex app-server line");
            return None;
        };
        let method = v.get("method").and_then(Value::as_str);
        let id = v.get("id").filter(|i| !i.is_null());
        match (method, id) {
            (Some(method), Some(id)) => {
                let reply = match app_server::answer_server_request(method, self.plan_mode) {
                    Ok(result) => serde_json::json!({"id": id, "result": result}),
                    Err((code, message)) => {
                        tracing::warn!(method, "codex app-server asked something the engine does not handle; answered with an error");
                        serde_json::json!({"id": id, "error": {"code": code, "message": message}})
                    }
                };
                self.outgoing.push(format!("{reply}\n"));
                None
            }
            (Some(method), None) => {
                let params = v.get("params").cloned().unwrap_or(Value::Null);
                into.extend(self.parser.notification(method, &params, line));
                None
            }
            (None, Some(id)) => {
                let id = id.as_u64()?;
                Some(match v.get("error") {
                    Some(e) => (id, Err(e.clone())),
                    None => (id, Ok(v.get("result").cloned().unwrap_or(Value::Null))),
                })
            }
            (None, None) => None,
        }
    }

    /// Send a request and read until its response, handling everything
    /// else that arrives meanwhile.
    async fn call(
        &mut self,
        proc: &mut Proc,
        method: &str,
        params: Value,
    ) -> Result<Result<Value, Value>, BeginError> {
        let id = self.id();
        proc.send(app_server::request(id, method, params).as_bytes())
            .await
            .map_err(|e| BeginError::Handshake(format!("{method}: {e}")))?;
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        loop {
            let line = tokio::time::timeout_at(deadline, proc.lines.next_line())
                .await
                .map_err(|_| BeginError::Handshake(format!("no answer to {method}")))?;
            let text = match line {
                Ok(Some(crate::providers::lines::Line::Text(s))) => s.to_string(),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => {
                    let stderr = proc.stderr.text();
                    let last = stderr.lines().last().unwrap_or("").trim();
                    return Err(BeginError::Handshake(format!(
                        "the app-server ended before answering {method}: {last}"
                    )));
                }
            };
            let mut events = std::mem::take(&mut self.pending);
            let response = self.handle(&text, &mut events);
            self.pending = events;
            for out in std::mem::take(&mut self.outgoing) {
                let _ = proc.send(out.as_bytes()).await;
            }
            if let Some((got, result)) = response {
                if got == id {
                    return Ok(result);
                }
            }
        }
    }
}

fn rpc_message(e: &Value) -> String {
    e.get("message")
        .and_then(Value::as_str)
        .unwrap_or("error")
        .to_string()
}

async fn begin_app(
    cfg: &SessionConfig,
    input: &TurnInput,
    resume: Option<String>,
    idle: Option<AppIdle>,
    thread_usage: Option<Usage>,
) -> Result<(Proc, AppTurn), BeginError> {
    let reuse = match idle {
        Some(mut i) => {
            if i.proc.group.is_running() {
                Some(i)
            } else {
                i.proc.group.stop(cfg.kill_grace).await;
                None
            }
        }
        None => None,
    };
    let (mut proc, mut turn) = match reuse {
        Some(i) => {
            let turn = AppTurn {
                parser: i.parser,
                thread: i.thread,
                next_id: i.next_id,
                plan_mode: input.plan_mode,
                pending: Vec::new(),
                outgoing: Vec::new(),
            };
            (i.proc, turn)
        }
        None => {
            let mut cmd = Proc::command(cfg);
            cmd.arg("app-server");
            let mut proc = Proc::spawn(cmd, cfg, true, resume.is_some())?;
            let mut turn = AppTurn {
                parser: AppServerParser::with_thread_usage(thread_usage),
                thread: String::new(),
                next_id: 0,
                plan_mode: input.plan_mode,
                pending: Vec::new(),
                outgoing: Vec::new(),
            };
            let init = match turn
                .call(&mut proc, "initialize", app_server::initialize_params())
                .await
            {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(BeginError::Handshake(rpc_message(&e))),
                Err(e) => Err(e),
            };
            if let Err(e) = init {
                proc.group.stop(cfg.kill_grace).await;
                return Err(e);
            }
            proc.send(app_server::notification("initialized").as_bytes())
                .await
                .map_err(ProviderError::Io)?;
            let cwd = cfg.cwd.display().to_string();
            let mut thread = None;
            if let Some(old) = resume.as_deref() {
                match turn
                    .call(
                        &mut proc,
                        "thread/resume",
                        app_server::thread_params(input, &cwd, Some(old)),
                    )
                    .await?
                {
                    Ok(v) => {
                        thread = v
                            .pointer("/thread/id")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    }
                    Err(e) => {
                        // The thread is gone (CODEX_HOME wiped, another
                        // machine): continue in a new one rather than fail
                        // every turn of the chat.
                        tracing::warn!(thread = old, error = %rpc_message(&e), "codex thread could not be resumed; starting a new thread");
                        let mut item = NormalizedItem::new(ItemKind::System);
                        item.text = Some(format!(
                            "The previous agent session ({old}) could not be resumed; continuing in a new session."
                        ));
                        turn.pending.push(ProviderEvent::Item(item));
                        turn.parser = AppServerParser::default();
                    }
                }
            }
            let thread = match thread {
                Some(t) => t,
                None => {
                    let v = turn
                        .call(
                            &mut proc,
                            "thread/start",
                            app_server::thread_params(input, &cwd, None),
                        )
                        .await?
                        .map_err(|e| ProviderError::Io(std::io::Error::other(rpc_message(&e))))?;
                    v.pointer("/thread/id")
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            ProviderError::Io(std::io::Error::other(
                                "thread/start answered without a thread id",
                            ))
                        })?
                        .to_string()
                }
            };
            turn.pending.push(ProviderEvent::SessionId(thread.clone()));
            turn.thread = thread;
            (proc, turn)
        }
    };
    turn.parser.begin_turn(None);
    let params = app_server::turn_params(&turn.thread, input);
    let started = turn
        .call(&mut proc, "turn/start", params)
        .await?
        .map_err(|e| {
            ProviderError::Io(std::io::Error::other(format!(
                "codex refused the turn: {}",
                rpc_message(&e)
            )))
        })?;
    let turn_id = started
        .pointer("/turn/id")
        .and_then(Value::as_str)
        .map(str::to_string);
    turn.parser.turn_id = turn_id;
    Ok((proc, turn))
}

impl Cli for Codex {
    type Idle = AppIdle;
    type Protocol = CodexTurn;

    async fn begin(
        cfg: &SessionConfig,
        input: TurnInput,
        resume: Option<String>,
        idle: Option<AppIdle>,
        thread_usage: Option<Usage>,
    ) -> Result<(Proc, CodexTurn), ProviderError> {
        // Images go to `exec -i` files; the app-server path sends text only.
        if TRANSPORT.load(Ordering::Acquire) != EXEC_FALLBACK && input.images.is_empty() {
            match begin_app(cfg, &input, resume.clone(), idle, thread_usage).await {
                Ok((proc, turn)) => {
                    settle_transport(APP_SERVER, None);
                    return Ok((proc, CodexTurn::App(turn)));
                }
                Err(BeginError::Provider(e)) => return Err(e),
                Err(BeginError::Handshake(why)) => {
                    if TRANSPORT.load(Ordering::Acquire) == APP_SERVER {
                        // It worked before: this is a failure, not an old CLI.
                        return Err(ProviderError::Io(std::io::Error::other(why)));
                    }
                    settle_transport(EXEC_FALLBACK, Some(&why));
                }
            }
        }
        let (proc, turn) = CodexExec::begin(cfg, input, resume, None, thread_usage).await?;
        Ok((proc, CodexTurn::Exec(turn)))
    }
}

impl Protocol for CodexTurn {
    type Cli = Codex;

    fn ends_on_report(&self) -> bool {
        matches!(self, CodexTurn::App(_))
    }

    fn ends_tools_after_interrupt(&self) -> bool {
        // `codex` is a node launcher whose child is the app-server itself;
        // the app-server ends the tools of an interrupted turn.
        matches!(self, CodexTurn::Exec(_))
    }

    fn take_pending(&mut self) -> Vec<ProviderEvent> {
        match self {
            CodexTurn::App(t) => std::mem::take(&mut t.pending),
            CodexTurn::Exec(t) => t.take_pending(),
        }
    }

    fn take_outgoing(&mut self) -> Vec<String> {
        match self {
            CodexTurn::App(t) => std::mem::take(&mut t.outgoing),
            CodexTurn::Exec(t) => t.take_outgoing(),
        }
    }

    fn parse(&mut self, line: &str) -> Option<Vec<ProviderEvent>> {
        match self {
            CodexTurn::Exec(t) => t.parse(line),
            CodexTurn::App(t) => {
                let mut out = Vec::new();
                // Responses (the interrupt's acknowledgement) carry nothing.
                let _ = t.handle(line, &mut out);
                Some(out)
            }
        }
    }

    async fn interrupt(&mut self, proc: &mut Proc) -> Option<Duration> {
        match self {
            CodexTurn::Exec(t) => t.interrupt(proc).await,
            CodexTurn::App(t) => {
                let turn_id = t.parser.turn_id.clone()?;
                let id = t.id();
                let params = serde_json::json!({"threadId": t.thread, "turnId": turn_id});
                if let Err(e) = proc
                    .send(app_server::request(id, "turn/interrupt", params).as_bytes())
                    .await
                {
                    tracing::debug!(error = %e, "interrupt request not delivered");
                }
                Some(INTERRUPT_GRACE)
            }
        }
    }

    fn session_gone(&self, proc: &Proc, reported: Option<&TurnResult>) -> bool {
        match self {
            CodexTurn::Exec(t) => t.session_gone(proc, reported),
            // Handled when the thread is resumed.
            CodexTurn::App(_) => false,
        }
    }

    async fn restart_fresh(&mut self, cfg: &SessionConfig) -> Result<Proc, ProviderError> {
        match self {
            CodexTurn::Exec(t) => t.restart_fresh(cfg).await,
            CodexTurn::App(_) => Err(ProviderError::Io(std::io::Error::other(
                "an app-server turn is not restarted",
            ))),
        }
    }

    fn exited(&self, status: Option<ExitStatus>, stderr: &str, interrupting: bool) -> TurnResult {
        match self {
            CodexTurn::Exec(t) => t.exited(status, stderr, interrupting),
            CodexTurn::App(_) => TurnResult {
                outcome: if interrupting {
                    Outcome::Interrupted
                } else {
                    Outcome::Failed {
                        code: "exited".into(),
                        message: exited_message("codex app-server", status, stderr),
                    }
                },
                usage: Usage::default(),
            },
        }
    }

    fn thread_usage(&self) -> Option<Usage> {
        match self {
            CodexTurn::Exec(t) => t.thread_usage(),
            CodexTurn::App(t) => t.parser.thread_usage(),
        }
    }

    fn into_idle(self, proc: Proc) -> Option<AppIdle> {
        match self {
            CodexTurn::Exec(_) => None,
            CodexTurn::App(t) => Some(AppIdle {
                proc,
                parser: t.parser,
                thread: t.thread,
                next_id: t.next_id,
            }),
        }
    }
}
