//! Supervision of the provider processes: spawn (through
//! [`crate::process::command`]: own group, parent-death signal), feed, read
//! with the capped line reader, enforce the turn timeout, interrupt, and end
//! what must end before a turn is reported finished.
//!
//! Concurrency: a session's mutable state sits behind one short-held mutex
//! ([`Shared::state`]). A turn's driver task *takes* what it needs (the idle
//! Claude process, the Codex parser) out of the state and puts it back when
//! the turn is over, before it sends `Finished`; so the next turn, started
//! by whoever reacts to `Finished`, always finds the session idle.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument;

use super::claude::{self, ClaudeFlags, ClaudeParser};
use super::codex::{self, CodexParser};
use super::lines::{CappedLines, Line, DEFAULT_MAX_LINE};
use super::{
    lock, Interrupter, Outcome, ProviderError, ProviderEvent, ProviderKind, RunningTurn,
    SessionConfig, TurnInput, TurnResult, Usage,
};
use crate::process;

/// Upper bound for configured waits: `Instant + Duration` must not overflow.
const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);
/// How much of a CLI's stderr is kept for the error message of a turn.
const STDERR_TAIL_LINES: usize = 20;

pub(super) struct Shared {
    pub(super) cfg: SessionConfig,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    session_id: Option<String>,
    busy: bool,
    /// The idle long-lived Claude process, when no turn holds it.
    claude: Option<ClaudeProc>,
    /// Codex usage totals of the thread (for per-turn deltas).
    codex_usage: Option<Usage>,
    /// Interrupts the running turn (for shutdown).
    current: Option<Interrupter>,
    /// Set by shutdown: no new turn may start.
    closed: bool,
}

impl Shared {
    pub(super) fn new(cfg: SessionConfig) -> Self {
        let state = State {
            session_id: cfg.resume_session_id.clone().filter(|s| !s.is_empty()),
            codex_usage: cfg.codex_thread_usage,
            ..State::default()
        };
        Self {
            cfg,
            state: Mutex::new(state),
        }
    }

    pub(super) fn session_id(&self) -> Option<String> {
        lock(&self.state).session_id.clone()
    }

    pub(super) fn is_busy(&self) -> bool {
        lock(&self.state).busy
    }

    pub(super) fn codex_thread_usage(&self) -> Option<Usage> {
        lock(&self.state).codex_usage
    }

    fn set_session_id(&self, id: &str) {
        let mut st = lock(&self.state);
        if st.session_id.as_deref() != Some(id) {
            st.session_id = Some(id.to_string());
        }
    }

    /// The turn is over: give back what it borrowed and mark the session
    /// idle. Called before `Finished` is sent.
    fn end_turn(&self, claude: Option<ClaudeProc>, codex_usage: Option<Usage>) {
        let mut st = lock(&self.state);
        st.busy = false;
        st.current = None;
        if st.closed {
            // Shutdown raced with the end of the turn: do not keep a process.
            if let Some(p) = claude {
                tokio::spawn(async move { p.stop(Duration::from_secs(1)).await });
            }
        } else {
            st.claude = claude;
        }
        if codex_usage.is_some() {
            st.codex_usage = codex_usage;
        }
    }
}

impl Drop for Shared {
    /// The session is gone (its chat dropped without `shutdown`): do not
    /// leave its idle Claude process, or anything in its group, behind.
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = state.claude.take() {
            let _ = process::signal_group(p.pgid, Signal::SIGKILL);
        }
    }
}

/// Start a turn on `shared`. See [`super::ProviderSession::start_turn`].
pub(super) async fn start_turn(
    shared: &Arc<Shared>,
    input: TurnInput,
) -> Result<RunningTurn, ProviderError> {
    let (resume, idle_claude, codex_usage) = {
        let mut st = lock(&shared.state);
        if st.busy {
            return Err(ProviderError::Busy);
        }
        st.busy = true;
        (st.session_id.clone(), st.claude.take(), st.codex_usage)
    };
    // If this future is dropped before a driver owns the turn (a caller's
    // select!, a runtime shutting down), the session must not stay busy.
    let mut guard = BusyGuard {
        shared,
        armed: true,
    };
    // Unbounded on purpose: a driver must never block on a consumer that is
    // itself waiting for `interrupt()` to return, or the two would wait on
    // each other. What is queued is bounded by what the CLI printed in this
    // turn, and the consumer is in-process.
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (int_tx, int_rx) = mpsc::channel(4);
    let interrupter = Interrupter { tx: int_tx };
    {
        let mut st = lock(&shared.state);
        st.current = Some(interrupter.clone());
        // A session that was shut down may be used again (e.g. after an
        // interrupt with clearQueue); it simply starts fresh processes.
        st.closed = false;
    }

    // A missing cwd would surface as a confusing "could not start <bin>".
    let started = if !shared.cfg.cwd.is_dir() {
        Err(ProviderError::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "the chat's working directory {} does not exist",
                shared.cfg.cwd.display()
            ),
        )))
    } else {
        match shared.cfg.kind {
            ProviderKind::Claude => {
                start_claude(
                    shared,
                    input,
                    resume,
                    idle_claude,
                    events_tx.clone(),
                    int_rx,
                )
                .await
            }
            ProviderKind::Codex => start_codex(
                shared,
                input,
                resume,
                codex_usage,
                events_tx.clone(),
                int_rx,
            ),
        }
    };
    // From here on the driver (or the error path below) ends the turn.
    guard.armed = false;
    match started {
        Ok((pgid, start_time)) => Ok(RunningTurn {
            events: events_rx,
            pgid,
            start_time,
            interrupter,
        }),
        Err(e) => {
            // Nothing runs: report the failure as the turn's one event.
            tracing::warn!(provider = %shared.cfg.kind, bin = %shared.cfg.bin.display(), error = %e, "provider could not start");
            shared.end_turn(None, None);
            let outcome = Outcome::Failed {
                code: e.code().into(),
                message: e.to_string(),
            };
            let _ = events_tx.send(ProviderEvent::Finished(TurnResult {
                outcome,
                usage: Usage::default(),
            }));
            Ok(RunningTurn {
                events: events_rx,
                pgid: 0,
                start_time: None,
                interrupter,
            })
        }
    }
}

/// Marks the session idle again unless disarmed; see [`start_turn`].
struct BusyGuard<'a> {
    shared: &'a Shared,
    armed: bool,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.end_turn(None, None);
        }
    }
}

/// Interrupt the running turn, then stop the idle Claude process.
pub(super) async fn shutdown(shared: &Arc<Shared>) {
    let current = {
        let mut st = lock(&shared.state);
        st.closed = true;
        st.current.clone()
    };
    if let Some(i) = current {
        i.interrupt().await;
    }
    let idle = lock(&shared.state).claude.take();
    if let Some(p) = idle {
        p.stop(shared.cfg.kill_grace).await;
    }
}

// ---------------------------------------------------------------- common --

/// The last lines of a child's stderr, for error messages; drained by a
/// task so the child never blocks on a full pipe.
#[derive(Clone, Default)]
struct StderrTail(Arc<Mutex<VecDeque<String>>>);

impl StderrTail {
    fn drain(stderr: Option<ChildStderr>, provider: ProviderKind) -> Self {
        let tail = StderrTail::default();
        if let Some(stderr) = stderr {
            let t = tail.clone();
            tokio::spawn(async move {
                let mut lines = CappedLines::new(BufReader::new(stderr), 64 * 1024);
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Line::Text(s) = line {
                        tracing::debug!(provider = %provider, line = %s, "provider stderr");
                        let mut q = lock(&t.0);
                        if q.len() == STDERR_TAIL_LINES {
                            q.pop_front();
                        }
                        q.push_back(s.to_string());
                    }
                }
            });
        }
        tail
    }

    fn text(&self) -> String {
        let q = lock(&self.0);
        let joined = q.iter().map(String::as_str).collect::<Vec<_>>().join("\n");
        // Keep the message readable in an event.
        let max = 2000;
        if joined.len() > max {
            let mut start = joined.len() - max;
            while !joined.is_char_boundary(start) {
                start += 1;
            }
            joined[start..].to_string()
        } else {
            joined
        }
    }
}

fn exited_message(who: &str, status: Option<ExitStatus>, stderr: &str) -> String {
    let status = match status {
        Some(s) => s.to_string(),
        None => "an unknown status".into(),
    };
    if stderr.trim().is_empty() {
        format!("{who} exited ({status}) before finishing the turn")
    } else {
        format!(
            "{who} exited ({status}) before finishing the turn: {}",
            stderr.trim()
        )
    }
}

/// Forward an event; a consumer that went away does not stop the turn (it
/// must still be driven to its end so the session stays consistent).
async fn emit(tx: &mpsc::UnboundedSender<ProviderEvent>, ev: ProviderEvent) {
    let _ = tx.send(ev);
}

fn log_skipped(provider: ProviderKind, line: &Line<'_>) {
    match line {
        Line::TooLong { len, head } => {
            let head = String::from_utf8_lossy(&head[..head.len().min(80)]);
            tracing::warn!(provider = %provider, bytes = len, head = %head, "skipped an over-long provider line")
        }
        Line::NotUtf8 { len } => {
            tracing::warn!(provider = %provider, bytes = len, "skipped a non-UTF-8 provider line")
        }
        Line::Text(_) => {}
    }
}

/// Whether the start of a Claude line is a `result` event.
fn is_result_head(head: &[u8]) -> bool {
    let compact: Vec<u8> = head
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    compact.starts_with(br#"{"type":"result""#)
}

fn log_not_json(provider: ProviderKind, line: &str) {
    if !line.trim().is_empty() {
        let preview: String = line.chars().take(200).collect();
        tracing::warn!(provider = %provider, line = %preview, "skipped a non-JSON provider line");
    }
}

/// Wait for `child` to exit on its own for up to `grace`, then stop its
/// group. Returns the exit status when known.
async fn reap(child: &mut Child, grace: Duration, kill_grace: Duration) -> Option<ExitStatus> {
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(status)) => Some(status),
        _ => process::stop_group(child, kill_grace).await.ok(),
    }
}

// ---------------------------------------------------------------- claude --

/// A long-lived `claude -p --input-format stream-json` process.
struct ClaudeProc {
    child: Child,
    stdin: ChildStdin,
    lines: CappedLines<BufReader<ChildStdout>>,
    parser: ClaudeParser,
    flags: ClaudeFlags,
    stderr: StderrTail,
    pgid: u32,
    start_time: Option<u64>,
    /// Started with `--resume`.
    resumed: bool,
}

/// Spawn a provider CLI (args and stdin already set on `cmd`) in the
/// session's cwd with its extra env, stdout and stderr piped; stderr is
/// drained into a tail for error messages.
fn spawn_provider(
    mut cmd: tokio::process::Command,
    cfg: &SessionConfig,
    kind: ProviderKind,
) -> Result<(Child, u32, ChildStdout, StderrTail), ProviderError> {
    cmd.current_dir(&cfg.cwd)
        .envs(cfg.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| ProviderError::Spawn {
        bin: cfg.bin.display().to_string(),
        source,
    })?;
    let pgid = child.id().unwrap_or(0);
    let Some(stdout) = child.stdout.take() else {
        return Err(ProviderError::Io(std::io::Error::other(format!(
            "{kind} stdout not piped"
        ))));
    };
    let stderr = StderrTail::drain(child.stderr.take(), kind);
    Ok((child, pgid, stdout, stderr))
}

impl ClaudeProc {
    fn spawn(
        cfg: &SessionConfig,
        flags: ClaudeFlags,
        resume: Option<&str>,
    ) -> Result<Self, ProviderError> {
        let mut cmd = process::command(&cfg.bin);
        cmd.args(claude::build_args(&flags, resume))
            .envs(claude::ENV)
            .stdin(Stdio::piped());
        let (mut child, pgid, stdout, stderr) = spawn_provider(cmd, cfg, ProviderKind::Claude)?;
        let Some(stdin) = child.stdin.take() else {
            return Err(ProviderError::Io(std::io::Error::other(
                "claude stdin not piped",
            )));
        };
        tracing::info!(pgid, resume = resume.is_some(), "claude process started");
        Ok(Self {
            child,
            stdin,
            lines: CappedLines::new(
                BufReader::with_capacity(64 * 1024, stdout),
                DEFAULT_MAX_LINE,
            ),
            parser: ClaudeParser::new(),
            flags,
            stderr,
            pgid,
            start_time: process::process_start_time(pgid),
            resumed: resume.is_some(),
        })
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    async fn send(&mut self, line: &str) -> std::io::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await
    }

    async fn stop(mut self, grace: Duration) {
        stop_group_fully(&mut self.child, self.pgid, grace).await;
        tracing::info!(pgid = self.pgid, "claude process stopped");
    }
}

fn claude_flags(input: &TurnInput) -> ClaudeFlags {
    ClaudeFlags {
        model: input.model.clone().filter(|m| !m.is_empty()),
        plan_mode: input.plan_mode,
        effort: input.thinking_level.clone().filter(|m| !m.is_empty()),
        system_prompt: input.system_prompt.clone().filter(|m| !m.trim().is_empty()),
    }
}

async fn start_claude(
    shared: &Arc<Shared>,
    input: TurnInput,
    resume: Option<String>,
    idle: Option<ClaudeProc>,
    tx: mpsc::UnboundedSender<ProviderEvent>,
    int_rx: mpsc::Receiver<oneshot::Sender<()>>,
) -> Result<(u32, Option<u64>), ProviderError> {
    let cfg = &shared.cfg;
    let flags = claude_flags(&input);
    // Reuse the idle process only if it is alive and was started with the
    // flags this turn needs; otherwise resume the session in a new one.
    let mut proc = match idle {
        Some(mut p) => {
            if p.alive() && p.flags == flags {
                Some(p)
            } else {
                p.stop(cfg.kill_grace).await;
                None
            }
        }
        None => None,
    };
    let message = claude::user_message_line(&input.prompt, &input.images);
    // Two attempts: a process that died since the last turn fails the write
    // (broken pipe); then resume in a fresh one.
    for attempt in 0..2 {
        let mut p = match proc.take() {
            Some(p) => p,
            None => ClaudeProc::spawn(cfg, flags.clone(), resume.as_deref())?,
        };
        match p.send(&message).await {
            Ok(()) => {
                let ids = (p.pgid, p.start_time);
                let shared = shared.clone();
                tokio::spawn(drive_claude(shared, p, message, tx, int_rx).in_current_span());
                return Ok(ids);
            }
            Err(e) => {
                tracing::warn!(attempt, error = %e, "claude did not take the message; respawning");
                p.stop(cfg.kill_grace).await;
                if attempt == 1 {
                    return Err(ProviderError::Io(e));
                }
            }
        }
    }
    Err(ProviderError::Io(std::io::Error::other(
        "claude could not be started",
    )))
}

/// Drive one Claude turn to its `result` line (or the process's end).
async fn drive_claude(
    shared: Arc<Shared>,
    mut p: ClaudeProc,
    message: String,
    tx: mpsc::UnboundedSender<ProviderEvent>,
    mut int_rx: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let cfg = &shared.cfg;
    let timeout = tokio::time::sleep(cfg.turn_timeout.min(MAX_WAIT));
    tokio::pin!(timeout);
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut interrupt_deadline: Option<Instant> = None;
    let mut seq = 0u32;
    let mut retried = false;

    // `None` while the turn runs; then the result and whether the process
    // is still usable.
    let (result, keep) = loop {
        let int_sleep = tokio::time::sleep_until(interrupt_deadline.unwrap_or_else(Instant::now));
        tokio::select! {
            biased;
            Some(done) = int_rx.recv() => {
                waiters.push(done);
                if interrupt_deadline.is_none() {
                    seq += 1;
                    let line = claude::interrupt_line(&format!("req_int_{seq}"));
                    tracing::info!(pgid = p.pgid, "interrupting claude turn");
                    // A dead stdin means the process is going away; the
                    // deadline below then stops the group.
                    if let Err(e) = p.send(&line).await {
                        tracing::debug!(error = %e, "interrupt request not delivered");
                    }
                    interrupt_deadline = Some(Instant::now() + cfg.interrupt_grace.min(MAX_WAIT));
                }
            }
            _ = int_sleep, if interrupt_deadline.is_some() => {
                tracing::warn!(pgid = p.pgid, "claude did not answer the interrupt; stopping its group");
                stop_group_fully(&mut p.child, p.pgid, cfg.kill_grace).await;
                break (TurnResult { outcome: Outcome::Interrupted, usage: Usage::default() }, false);
            }
            _ = &mut timeout => {
                tracing::warn!(pgid = p.pgid, "claude turn timed out; stopping its group");
                stop_group_fully(&mut p.child, p.pgid, cfg.kill_grace).await;
                let outcome = Outcome::Failed {
                    code: "timeout".into(),
                    message: format!("the turn ran longer than {} s", cfg.turn_timeout.as_secs()),
                };
                break (TurnResult { outcome, usage: Usage::default() }, false);
            }
            line = p.lines.next_line() => {
                let events = match line {
                    Ok(Some(Line::Text(s))) => match claude::try_parse_line(&mut p.parser, s) {
                        Ok(events) => events,
                        Err(_) => {
                            log_not_json(ProviderKind::Claude, s);
                            continue;
                        }
                    },
                    Ok(Some(other)) => {
                        log_skipped(ProviderKind::Claude, &other);
                        // A result we cannot read still ends the turn; waiting
                        // for another would hang it until the timeout.
                        if let Line::TooLong { head, .. } = other {
                            if is_result_head(head) {
                                let outcome = Outcome::Failed {
                                    code: "output_too_large".into(),
                                    message: "claude's result line was too large to read".into(),
                                };
                                break (TurnResult { outcome, usage: Usage::default() }, true);
                            }
                        }
                        continue;
                    }
                    Ok(None) | Err(_) => {
                        // stdout closed: the process is ending without a result.
                        let status = reap(&mut p.child, cfg.kill_grace, cfg.kill_grace).await;
                        process::kill_group_stragglers(p.pgid, cfg.kill_grace).await;
                        process::settle_group(p.pgid).await;
                        let outcome = if interrupt_deadline.is_some() {
                            Outcome::Interrupted
                        } else {
                            Outcome::Failed {
                                code: "exited".into(),
                                message: exited_message("claude", status, &p.stderr.text()),
                            }
                        };
                        break (TurnResult { outcome, usage: Usage::default() }, false);
                    }
                };
                let mut finished = None;
                for ev in events {
                    match ev {
                        ProviderEvent::Finished(r) => finished = Some(r),
                        ProviderEvent::SessionId(id) => {
                            shared.set_session_id(&id);
                            emit(&tx, ProviderEvent::SessionId(id)).await;
                        }
                        other => emit(&tx, other).await,
                    }
                }
                if let Some(Outcome::Failed { message: why, .. }) = finished.as_ref().map(|r| &r.outcome) {
                    if p.resumed && !retried && interrupt_deadline.is_none() && claude::is_missing_session(why) {
                        // The session to resume no longer exists (~/.claude
                        // wiped, another machine): run the turn in a new
                        // session rather than fail every turn of the chat.
                        retried = true;
                        let old = lock(&shared.state).session_id.take();
                        tracing::warn!(session = ?old, "claude session not found; starting a new session");
                        let fresh = match ClaudeProc::spawn(cfg, p.flags.clone(), None) {
                            Ok(mut np) => np.send(&message).await.map(|()| np).map_err(ProviderError::Io),
                            Err(e) => Err(e),
                        };
                        match fresh {
                            Ok(np) => {
                                let mut gone = std::mem::replace(&mut p, np);
                                stop_group_fully(&mut gone.child, gone.pgid, cfg.kill_grace).await;
                                emit(&tx, ProviderEvent::Item(session_lost_item(old.as_deref()))).await;
                                continue;
                            }
                            Err(e) => {
                                let outcome = Outcome::Failed { code: e.code().into(), message: e.to_string() };
                                break (TurnResult { outcome, usage: Usage::default() }, false);
                            }
                        }
                    }
                }
                if let Some(mut r) = finished {
                    if interrupt_deadline.is_some() {
                        // The agent stopped; its tools may not have. End every
                        // other process of its group and its descendants.
                        end_tool_processes(p.pgid, p.child.id(), cfg.kill_grace).await;
                        if r.outcome != Outcome::Completed {
                            r.outcome = Outcome::Interrupted;
                        }
                    }
                    break (r, true);
                }
            }
        }
    };
    // A shutdown that interrupted this turn wants no process kept: stop it
    // here, before `Finished`, so "shut down" means the group is gone.
    let keep = keep && p.alive() && !lock(&shared.state).closed;
    let pgid = p.pgid;
    let proc = if keep {
        Some(p)
    } else {
        // Make sure nothing of a process we give up survives.
        stop_group_fully(&mut p.child, p.pgid, cfg.kill_grace).await;
        None
    };
    tracing::info!(pgid, outcome = ?result.outcome, "claude turn finished");
    shared.end_turn(proc, None);
    emit(&tx, ProviderEvent::Finished(result)).await;
    for w in waiters {
        let _ = w.send(());
    }
    // Late interrupt requests (sent while we were finishing) see a closed
    // channel once `int_rx` drops here and return at once.
}

/// End the tool processes of a Claude whose turn was interrupted: every
/// process in its group and every descendant of it, except Claude itself.
/// TERM, up to `grace` for them to leave, then KILL.
async fn end_tool_processes(pgid: u32, leader: Option<u32>, grace: Duration) {
    let leader = leader.unwrap_or(pgid);
    let targets = tool_processes(pgid, leader);
    if targets.is_empty() {
        return;
    }
    tracing::info!(
        pgid,
        count = targets.len(),
        "ending tool processes left by an interrupted turn"
    );
    for &pid in &targets {
        signal_pid(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && targets.iter().any(|&p| process::pid_alive(p)) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Anything they spawned meanwhile is in the same set by construction.
    let targets: Vec<u32> = targets
        .into_iter()
        .chain(tool_processes(pgid, leader))
        .collect();
    for &pid in &targets {
        signal_pid(pid, Signal::SIGKILL);
    }
    // KILL is delivered asynchronously: wait until it took effect, so
    // "interrupted" really means "nothing of the turn runs".
    let deadline = Instant::now() + process::KILL_SETTLE;
    while Instant::now() < deadline && targets.iter().any(|&p| process::pid_alive(p)) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Stop `child`'s whole group; returns once no member is left.
async fn stop_group_fully(child: &mut Child, pgid: u32, grace: Duration) {
    if let Err(e) = process::stop_group(child, grace).await {
        tracing::warn!(pgid, error = %e, "stopping a provider process group failed");
    }
}

/// Live processes in group `pgid` or descended from `leader`, except `leader`.
fn tool_processes(pgid: u32, leader: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    // (pid, ppid, pgrp) of every live process.
    let procs: Vec<(u32, u32, u32)> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let (state, ppid, pgrp) = process::proc_stat(pid)?;
            (state != 'Z' && state != 'X').then_some((pid, ppid, pgrp))
        })
        .collect();
    let mut out: Vec<u32> = procs
        .iter()
        .filter(|(pid, _, pgrp)| *pgrp == pgid && *pid != leader)
        .map(|(pid, _, _)| *pid)
        .collect();
    // Descendants that moved to their own group (setsid'd tools).
    let mut frontier = vec![leader];
    let mut seen = vec![leader];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid, _) in &procs {
            if ppid == parent && !seen.contains(&pid) {
                seen.push(pid);
                frontier.push(pid);
                out.push(pid);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// `(state, ppid, pgrp)` from `/proc/<pid>/stat`.
fn signal_pid(pid: u32, sig: Signal) {
    if pid > 1 {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

// ----------------------------------------------------------------- codex --

fn start_codex(
    shared: &Arc<Shared>,
    input: TurnInput,
    resume: Option<String>,
    thread_usage: Option<Usage>,
    tx: mpsc::UnboundedSender<ProviderEvent>,
    int_rx: mpsc::Receiver<oneshot::Sender<()>>,
) -> Result<(u32, Option<u64>), ProviderError> {
    let cfg = &shared.cfg;
    // Images go to files that live until the turn ends.
    let images_dir = if input.images.is_empty() {
        None
    } else {
        Some(
            tempfile::Builder::new()
                .prefix("replicas-images-")
                .tempdir()?,
        )
    };
    let mut image_files = Vec::with_capacity(input.images.len());
    if let Some(dir) = &images_dir {
        for (i, img) in input.images.iter().enumerate() {
            let bytes = decode_base64(&img.data_base64).ok_or_else(|| {
                ProviderError::Io(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("image {} is not valid base64", i + 1),
                ))
            })?;
            let ext = img.media_type.rsplit('/').next().unwrap_or("png");
            let ext: String = ext
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(8)
                .collect();
            let path = dir.path().join(format!("image-{}.{ext}", i + 1));
            std::fs::write(&path, bytes)?;
            image_files.push(path);
        }
    }
    let proc = CodexProc::spawn(cfg, &input, resume.as_deref(), &image_files)?;
    let ids = (proc.pgid, process::process_start_time(proc.pgid));
    let mut parser = CodexParser::new();
    parser.set_thread_usage(thread_usage);
    let run = CodexRun {
        proc,
        parser,
        input,
        image_files,
        resumed: resume.is_some(),
        _images: images_dir,
    };
    tokio::spawn(drive_codex(shared.clone(), run, tx, int_rx).in_current_span());
    Ok(ids)
}

/// One running `codex exec`.
struct CodexProc {
    child: Child,
    lines: CappedLines<BufReader<ChildStdout>>,
    stderr: StderrTail,
    pgid: u32,
}

impl CodexProc {
    fn spawn(
        cfg: &SessionConfig,
        input: &TurnInput,
        resume: Option<&str>,
        image_files: &[PathBuf],
    ) -> Result<Self, ProviderError> {
        let mut cmd = process::command(&cfg.bin);
        cmd.args(codex::build_args(input, resume, image_files))
            .stdin(Stdio::null());
        let (child, pgid, stdout, stderr) = spawn_provider(cmd, cfg, ProviderKind::Codex)?;
        tracing::info!(pgid, resume = resume.is_some(), "codex process started");
        Ok(Self {
            child,
            lines: CappedLines::new(
                BufReader::with_capacity(64 * 1024, stdout),
                DEFAULT_MAX_LINE,
            ),
            stderr,
            pgid,
        })
    }
}

struct CodexRun {
    proc: CodexProc,
    parser: CodexParser,
    /// Kept to start the turn again in a fresh thread when the thread to
    /// resume no longer exists.
    input: TurnInput,
    image_files: Vec<PathBuf>,
    resumed: bool,
    /// Deleted when the turn ends.
    _images: Option<tempfile::TempDir>,
}

/// Drive one `codex exec` to its exit.
async fn drive_codex(
    shared: Arc<Shared>,
    mut r: CodexRun,
    tx: mpsc::UnboundedSender<ProviderEvent>,
    mut int_rx: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let cfg = &shared.cfg;
    let timeout = tokio::time::sleep(cfg.turn_timeout.min(MAX_WAIT));
    tokio::pin!(timeout);
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut reported: Option<TurnResult> = None;
    let mut retried = false;

    let result = loop {
        tokio::select! {
            biased;
            Some(done) = int_rx.recv() => {
                waiters.push(done);
                tracing::info!(pgid = r.proc.pgid, "interrupting codex turn");
                stop_group_fully(&mut r.proc.child, r.proc.pgid, cfg.kill_grace).await;
                let outcome = match reported.take() {
                    // It had already reported the end: keep that.
                    Some(done) => break done,
                    None => Outcome::Interrupted,
                };
                break TurnResult { outcome, usage: Usage::default() };
            }
            _ = &mut timeout => {
                tracing::warn!(pgid = r.proc.pgid, "codex turn timed out; stopping its group");
                stop_group_fully(&mut r.proc.child, r.proc.pgid, cfg.kill_grace).await;
                let outcome = Outcome::Failed {
                    code: "timeout".into(),
                    message: format!("the turn ran longer than {} s", cfg.turn_timeout.as_secs()),
                };
                break TurnResult { outcome, usage: Usage::default() };
            }
            line = r.proc.lines.next_line() => {
                match line {
                    Ok(Some(Line::Text(s))) => {
                        let events = match serde_json::from_str(s) {
                            Ok(v) => codex::parse_value(&mut r.parser, v, s),
                            Err(_) => {
                                log_not_json(ProviderKind::Codex, s);
                                Vec::new()
                            }
                        };
                        for ev in events {
                            match ev {
                                // Held until the process has exited.
                                ProviderEvent::Finished(res) => reported = Some(res),
                                ProviderEvent::SessionId(id) => {
                                    shared.set_session_id(&id);
                                    emit(&tx, ProviderEvent::SessionId(id)).await;
                                }
                                other => emit(&tx, other).await,
                            }
                        }
                    }
                    Ok(Some(other)) => log_skipped(ProviderKind::Codex, &other),
                    Ok(None) | Err(_) => {
                        let status = reap(&mut r.proc.child, cfg.kill_grace, cfg.kill_grace).await;
                        if reported.is_none() && r.resumed && !retried && thread_is_gone(&r) {
                            // The thread to resume no longer exists (CODEX_HOME
                            // wiped, another machine): run the turn in a new
                            // thread rather than fail every turn of the chat.
                            retried = true;
                            let old = lock(&shared.state).session_id.take();
                            tracing::warn!(thread = ?old, "codex thread not found; starting a new thread");
                            process::kill_group_stragglers(r.proc.pgid, cfg.kill_grace).await;
                            match CodexProc::spawn(cfg, &r.input, None, &r.image_files) {
                                Ok(p) => {
                                    r.proc = p;
                                    r.resumed = false;
                                    r.parser = CodexParser::new();
                                    r.parser.begin_turn();
                                    emit(&tx, ProviderEvent::Item(session_lost_item(old.as_deref()))).await;
                                    continue;
                                }
                                Err(e) => {
                                    let outcome = Outcome::Failed { code: e.code().into(), message: e.to_string() };
                                    break TurnResult { outcome, usage: Usage::default() };
                                }
                            }
                        }
                        break match reported.take() {
                            Some(res) => res,
                            None => {
                                let outcome = if codex::saw_auth_failure(&r.parser) {
                                    Outcome::Failed {
                                        code: "auth_expired".into(),
                                        message: codex::last_error(&r.parser).unwrap_or("authentication failed").to_string(),
                                    }
                                } else {
                                    let mut stderr = r.proc.stderr.text();
                                    if let Some(e) = codex::last_error(&r.parser) {
                                        stderr = format!("{e}\n{stderr}");
                                    }
                                    Outcome::Failed {
                                        code: "exited".into(),
                                        message: exited_message("codex", status, &stderr),
                                    }
                                };
                                TurnResult { outcome, usage: Usage::default() }
                            }
                        };
                    }
                }
            }
        }
    };
    // The turn is over only when nothing of it runs any more.
    process::kill_group_stragglers(r.proc.pgid, cfg.kill_grace).await;
    process::settle_group(r.proc.pgid).await;
    tracing::info!(pgid = r.proc.pgid, outcome = ?result.outcome, "codex turn finished");
    shared.end_turn(None, r.parser.thread_usage());
    emit(&tx, ProviderEvent::Finished(result)).await;
    for w in waiters {
        let _ = w.send(());
    }
}

/// Whether a resumed codex failed because its thread does not exist.
fn thread_is_gone(r: &CodexRun) -> bool {
    codex::last_error(&r.parser).is_some_and(codex::is_missing_thread)
        || codex::is_missing_thread(&r.proc.stderr.text())
}

/// The history note for a session that could not be resumed.
fn session_lost_item(old: Option<&str>) -> super::NormalizedItem {
    let mut item = super::NormalizedItem::new(super::ItemKind::System);
    item.text = Some(format!(
        "The previous agent session ({}) could not be resumed; continuing in a new session.",
        old.unwrap_or("unknown")
    ));
    item
}

/// Base64 as clients send it (standard alphabet, padding optional);
/// `None` if invalid.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    use base64::engine::{DecodePaddingMode, Engine};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    LENIENT.decode(compact).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_standard_and_rejects_garbage() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVsbG8").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVs\nbG8h").unwrap(), b"hello!");
        assert!(decode_base64("a$b").is_none());
    }
}
