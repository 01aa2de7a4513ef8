//! The one turn driver every CLI shares: deadline, interrupt, line → event,
//! exit handling. What differs between CLIs is a [`Protocol`] (how lines
//! parse, how an interrupt is asked for, what an early exit means); the
//! process itself is a [`Proc`] (a [`Group`] with its pipes).
//!
//! Invariant: `Finished` is sent only after the turn really ended (the CLI
//! reported its end and, for a CLI whose process ends with the turn, the
//! process exited and its group is gone; after an interrupt, the tools the
//! agent started are gone too), and after the session is idle again.

use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::process::{ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::lines::{CappedLines, Line, DEFAULT_MAX_LINE};
use super::session::{Cli, Shared};
use super::{
    lock, ItemKind, NormalizedItem, Outcome, ProviderError, ProviderEvent, ProviderKind,
    SessionConfig, TurnResult, Usage,
};
use crate::process::Group;

/// Upper bound for configured waits: `Instant + Duration` must not overflow.
pub(super) const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);
/// How much of a CLI's stderr is kept for the error message of a turn.
const STDERR_TAIL_LINES: usize = 20;

/// A running CLI process: its group, stdin (when the protocol writes to
/// it), its stdout as capped lines, and the tail of its stderr.
pub(super) struct Proc {
    pub group: Group,
    pub stdin: Option<ChildStdin>,
    pub lines: CappedLines<BufReader<ChildStdout>>,
    pub stderr: StderrTail,
    /// Started to resume an earlier session/thread.
    pub resumed: bool,
}

impl Proc {
    /// The session's CLI as a [`crate::process::command`] in its cwd with
    /// its extra env; the CLI adds its arguments and its own environment
    /// (which wins).
    pub fn command(cfg: &SessionConfig) -> Command {
        let mut cmd = crate::process::command(&cfg.bin);
        cmd.current_dir(&cfg.cwd)
            .envs(cfg.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    /// Spawn `cmd` (from [`Proc::command`]) with stdout and stderr piped,
    /// stdin piped when `stdin` is set.
    pub fn spawn(
        mut cmd: Command,
        cfg: &SessionConfig,
        stdin: bool,
        resumed: bool,
    ) -> Result<Self, ProviderError> {
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut group = Group::spawn(&mut cmd).map_err(|source| ProviderError::Spawn {
            bin: cfg.bin.display().to_string(),
            source,
        })?;
        let child = group.child_mut();
        let stdin = child.stdin.take();
        let Some(stdout) = child.stdout.take() else {
            return Err(ProviderError::Io(std::io::Error::other(format!(
                "{} stdout not piped",
                cfg.kind
            ))));
        };
        let stderr = StderrTail::drain(child.stderr.take(), cfg.kind);
        tracing::info!(provider = %cfg.kind, pgid = group.pgid(), resume = resumed, "provider process started");
        Ok(Self {
            group,
            stdin,
            lines: CappedLines::new(
                BufReader::with_capacity(64 * 1024, stdout),
                DEFAULT_MAX_LINE,
            ),
            stderr,
            resumed,
        })
    }

    /// Write `data` to stdin and flush.
    pub async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "stdin is closed",
            ));
        };
        stdin.write_all(data).await?;
        stdin.flush().await
    }

    /// Write `data` to stdin, then close it (the CLI reads to EOF).
    pub async fn send_and_close(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.send(data).await?;
        if let Some(mut stdin) = self.stdin.take() {
            stdin.shutdown().await?;
        }
        Ok(())
    }
}

/// What differs between CLIs in a turn. The driver calls these; they never
/// block on anything but the process's own pipes.
pub(super) trait Protocol: Send + 'static {
    /// The session-level state this CLI keeps between turns.
    type Cli: Cli;

    /// `true`: the CLI's report ends the turn and the process may stay
    /// (Claude, `codex app-server`). `false`: the turn ends when the process
    /// exits (`codex exec`).
    fn ends_on_report(&self) -> bool;

    /// After an interrupt the CLI reported on, end the other processes of
    /// its group (the tools it started). `false` for a CLI whose own
    /// workers live in its group and which ends its tools itself.
    fn ends_tools_after_interrupt(&self) -> bool {
        true
    }

    /// Events produced before the driver took over (while the turn was
    /// being started), emitted first.
    fn take_pending(&mut self) -> Vec<ProviderEvent> {
        Vec::new()
    }

    /// Lines to write to the CLI's stdin after a parsed line (answers to
    /// the CLI's own requests).
    fn take_outgoing(&mut self) -> Vec<String> {
        Vec::new()
    }

    /// One stdout line into events; `None` when it is not JSON. A
    /// [`ProviderEvent::Finished`] among them is the CLI's report of the end.
    fn parse(&mut self, line: &str) -> Option<Vec<ProviderEvent>>;

    /// An over-long line that cannot be read: `Some` when it ends the turn.
    fn too_long(&mut self, _head: &[u8]) -> Option<TurnResult> {
        None
    }

    /// Ask the CLI to stop the turn. `Some(grace)`: a request was written,
    /// wait that long for the report; `None`: stop the group now.
    fn interrupt(
        &mut self,
        proc: &mut Proc,
    ) -> impl std::future::Future<Output = Option<Duration>> + Send;

    /// Whether the turn failed because the session/thread to resume no
    /// longer exists (from the CLI's report, or after an exit without one).
    fn session_gone(&self, proc: &Proc, reported: Option<&TurnResult>) -> bool;

    /// Start the same turn again in a fresh session.
    fn restart_fresh(
        &mut self,
        cfg: &SessionConfig,
    ) -> impl std::future::Future<Output = Result<Proc, ProviderError>> + Send;

    /// The process ended without reporting the turn's end.
    fn exited(&self, status: Option<ExitStatus>, stderr: &str, interrupting: bool) -> TurnResult;

    /// Usage totals of the thread (Codex counts per thread).
    fn thread_usage(&self) -> Option<Usage> {
        None
    }

    /// The turn ended with the process alive and reusable: what the session
    /// keeps until the next turn (`None`: nothing, the process is stopped).
    fn into_idle(self, proc: Proc) -> Option<<Self::Cli as Cli>::Idle>;
}

/// Drive one turn to its end. See the module invariant.
pub(super) async fn drive<P: Protocol>(
    shared: Arc<Shared<P::Cli>>,
    mut proc: Proc,
    mut proto: P,
    tx: mpsc::UnboundedSender<ProviderEvent>,
    mut int_rx: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let cfg = &shared.cfg;
    let kind = cfg.kind;
    let timeout = tokio::time::sleep(cfg.turn_timeout.min(MAX_WAIT));
    tokio::pin!(timeout);
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut interrupting = false;
    let mut interrupt_deadline: Option<Instant> = None;
    // A report held until the process exits (`!ENDS_ON_REPORT`).
    let mut reported: Option<TurnResult> = None;
    let mut retried = false;
    for ev in proto.take_pending() {
        if let ProviderEvent::SessionId(id) = &ev {
            shared.set_session_id(id);
        }
        emit(&tx, ev);
    }

    // The result and whether the process is still usable.
    let (result, keep) = loop {
        let int_sleep = tokio::time::sleep_until(interrupt_deadline.unwrap_or_else(Instant::now));
        tokio::select! {
            biased;
            Some(done) = int_rx.recv() => {
                waiters.push(done);
                if !interrupting {
                    interrupting = true;
                    tracing::info!(provider = %kind, pgid = proc.group.pgid(), "interrupting turn");
                    match proto.interrupt(&mut proc).await {
                        Some(grace) => interrupt_deadline = Some(Instant::now() + grace.min(MAX_WAIT)),
                        None => {
                            proc.group.stop(cfg.kill_grace).await;
                            // It had already reported the end: keep that.
                            let r = reported.take().unwrap_or(TurnResult { outcome: Outcome::Interrupted, usage: Usage::default() });
                            break (r, false);
                        }
                    }
                }
            }
            _ = int_sleep, if interrupt_deadline.is_some() => {
                tracing::warn!(provider = %kind, pgid = proc.group.pgid(), "the CLI did not answer the interrupt; stopping its group");
                proc.group.stop(cfg.kill_grace).await;
                break (TurnResult { outcome: Outcome::Interrupted, usage: Usage::default() }, false);
            }
            _ = &mut timeout => {
                tracing::warn!(provider = %kind, pgid = proc.group.pgid(), "turn timed out; stopping its group");
                proc.group.stop(cfg.kill_grace).await;
                let outcome = Outcome::Failed {
                    code: "timeout".into(),
                    message: format!("the turn ran longer than {} s", cfg.turn_timeout.as_secs()),
                };
                break (TurnResult { outcome, usage: Usage::default() }, false);
            }
            line = proc.lines.next_line() => {
                match line {
                    Ok(Some(Line::Text(s))) => {
                        let Some(events) = proto.parse(s) else {
                            log_not_json(kind, s);
                            continue;
                        };
                        for out in proto.take_outgoing() {
                            if let Err(e) = proc.send(out.as_bytes()).await {
                                tracing::debug!(provider = %kind, error = %e, "answer to the CLI not delivered");
                            }
                        }
                        let mut finished = None;
                        for ev in events {
                            match ev {
                                ProviderEvent::Finished(r) => finished = Some(r),
                                ProviderEvent::SessionId(id) => {
                                    shared.set_session_id(&id);
                                    emit(&tx, ProviderEvent::SessionId(id));
                                }
                                other => emit(&tx, other),
                            }
                        }
                        let Some(mut r) = finished else { continue };
                        if !proto.ends_on_report() {
                            // Held until the process has exited.
                            reported = Some(r);
                            continue;
                        }
                        if !interrupting && !retried && proc.resumed && proto.session_gone(&proc, Some(&r)) {
                            retried = true;
                            match restart(&shared, &mut proc, &mut proto, &tx).await {
                                Ok(()) => continue,
                                Err(r) => break (r, false),
                            }
                        }
                        if interrupting {
                            // The agent stopped; its tools may not have. End
                            // every other process of its group and its
                            // descendants.
                            if proto.ends_tools_after_interrupt() {
                                proc.group.end_members(cfg.kill_grace).await;
                            }
                            if r.outcome != Outcome::Completed {
                                r.outcome = Outcome::Interrupted;
                            }
                        }
                        break (r, true);
                    }
                    Ok(Some(other)) => {
                        log_skipped(kind, &other);
                        // A report we cannot read still ends the turn;
                        // waiting for another would hang it until the timeout.
                        if let Line::TooLong { head, .. } = other {
                            if let Some(r) = proto.too_long(head) {
                                break (r, true);
                            }
                        }
                    }
                    Ok(None) | Err(_) => {
                        // stdout closed: the process is ending.
                        let status = proc.group.wait_or_stop(cfg.kill_grace, cfg.kill_grace).await;
                        proc.group.reap_stragglers(cfg.kill_grace).await;
                        if reported.is_none() && !interrupting && !retried && proc.resumed && proto.session_gone(&proc, None) {
                            retried = true;
                            match restart(&shared, &mut proc, &mut proto, &tx).await {
                                Ok(()) => continue,
                                Err(r) => break (r, false),
                            }
                        }
                        let r = match reported.take() {
                            Some(r) => r,
                            None => proto.exited(status, &proc.stderr.text(), interrupting),
                        };
                        break (r, false);
                    }
                }
            }
        }
    };
    // A shutdown that interrupted this turn wants no process kept: stop it
    // here, before `Finished`, so "shut down" means the group is gone.
    let keep = keep && proc.group.is_running() && !shared.is_closed();
    let pgid = proc.group.pgid();
    let usage = proto.thread_usage();
    let idle = if keep {
        proto.into_idle(proc)
    } else {
        // Make sure nothing of a process we give up survives.
        proc.group.stop(cfg.kill_grace).await;
        None
    };
    tracing::info!(provider = %kind, pgid, outcome = ?result.outcome, "turn finished");
    shared.end_turn(idle, usage);
    emit(&tx, ProviderEvent::Finished(result));
    for w in waiters {
        let _ = w.send(());
    }
    // Late interrupt requests (sent while we were finishing) see a closed
    // channel once `int_rx` drops here and return at once.
}

/// The session to resume no longer exists (its files wiped, another
/// machine): run the turn in a new session rather than fail every turn of
/// the chat. A `system` item says so.
async fn restart<P: Protocol>(
    shared: &Shared<P::Cli>,
    proc: &mut Proc,
    proto: &mut P,
    tx: &mpsc::UnboundedSender<ProviderEvent>,
) -> Result<(), TurnResult> {
    let cfg = &shared.cfg;
    let old = shared.take_session_id();
    tracing::warn!(provider = %cfg.kind, session = ?old, "session not found; starting a new session");
    match proto.restart_fresh(cfg).await {
        Ok(fresh) => {
            let mut gone = std::mem::replace(proc, fresh);
            gone.group.stop(cfg.kill_grace).await;
            emit(tx, ProviderEvent::Item(session_lost_item(old.as_deref())));
            Ok(())
        }
        Err(e) => Err(TurnResult {
            outcome: Outcome::Failed {
                code: e.code().into(),
                message: e.to_string(),
            },
            usage: Usage::default(),
        }),
    }
}

/// The history note for a session that could not be resumed.
fn session_lost_item(old: Option<&str>) -> NormalizedItem {
    let mut item = NormalizedItem::new(ItemKind::System);
    item.text = Some(format!(
        "The previous agent session ({}) could not be resumed; continuing in a new session.",
        old.unwrap_or("unknown")
    ));
    item
}

/// The last lines of a child's stderr, for error messages; drained by a
/// task so the child never blocks on a full pipe.
#[derive(Clone, Default)]
pub(super) struct StderrTail(Arc<Mutex<VecDeque<String>>>);

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

    pub fn text(&self) -> String {
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

/// "`who` exited (status) before finishing the turn[: stderr]".
pub(super) fn exited_message(who: &str, status: Option<ExitStatus>, stderr: &str) -> String {
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
fn emit(tx: &mpsc::UnboundedSender<ProviderEvent>, ev: ProviderEvent) {
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

fn log_not_json(provider: ProviderKind, line: &str) {
    if !line.trim().is_empty() {
        let preview: String = line.chars().take(200).collect();
        tracing::warn!(provider = %provider, line = %preview, "skipped a non-JSON provider line");
    }
}
