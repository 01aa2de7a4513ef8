//! One chat's session state, the same for every CLI: the provider session
//! id, whether a turn runs, the process kept between turns, and the
//! [`Cli`] trait a CLI implements to begin a turn. [`Backend`] is the small
//! object-safe face [`super::ProviderSession`] (what the chat runner holds)
//! drives.
//!
//! Concurrency: the mutable state sits behind one short-held mutex. A
//! turn's driver *takes* what it needs (the idle process) out of the state
//! and puts it back when the turn is over, before it sends `Finished`; so
//! the next turn, started by whoever reacts to `Finished`, always finds the
//! session idle.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::driver::{Proc, Protocol};
use super::pool::{PoolSlot, Reapable};
use super::{
    lock, Interrupter, Outcome, ProviderError, ProviderEvent, ProviderKind, RunningTurn,
    SessionConfig, TurnInput, TurnResult, Usage,
};

pub(super) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A CLI: how a turn begins (reusing the idle process or spawning one) and
/// which [`Protocol`] drives it.
pub(super) trait Cli: Send + Sync + Sized + 'static {
    /// What the session keeps between turns (a live process and its parser
    /// state); `std::convert::Infallible` for a CLI that keeps nothing.
    type Idle: IdleProc;
    type Protocol: Protocol<Cli = Self>;

    /// Start the turn: spawn (or reuse `idle`) and hand the input over.
    fn begin(
        cfg: &SessionConfig,
        input: TurnInput,
        resume: Option<String>,
        idle: Option<Self::Idle>,
        thread_usage: Option<Usage>,
    ) -> impl Future<Output = Result<(Proc, Self::Protocol), ProviderError>> + Send;
}

/// A process kept between turns.
pub(super) trait IdleProc: Send + 'static {
    fn proc_mut(&mut self) -> &mut Proc;
}

impl IdleProc for std::convert::Infallible {
    fn proc_mut(&mut self) -> &mut Proc {
        match *self {}
    }
}

/// Stop a kept process's whole group.
async fn stop_idle<I: IdleProc>(mut idle: I, grace: Duration) {
    let p = idle.proc_mut();
    let pgid = p.group.pgid();
    p.group.stop(grace).await;
    tracing::info!(pgid, "idle provider process stopped");
}

pub(super) struct Shared<C: Cli> {
    pub(super) cfg: SessionConfig,
    state: Mutex<State<C::Idle>>,
    /// This session's place in the engine-wide process cap.
    slot: Option<PoolSlot>,
}

struct State<I> {
    session_id: Option<String>,
    busy: bool,
    /// The process kept between turns, when no turn holds it.
    idle: Option<I>,
    /// Usage totals of the thread (Codex), for per-turn deltas.
    thread_usage: Option<Usage>,
    /// Interrupts the running turn (for shutdown).
    current: Option<Interrupter>,
    /// Set by shutdown: no process is kept.
    closed: bool,
}

impl<C: Cli> Shared<C> {
    pub(super) fn new(cfg: SessionConfig) -> Arc<Self> {
        let state = State {
            session_id: cfg.resume_session_id.clone().filter(|s| !s.is_empty()),
            busy: false,
            idle: None,
            thread_usage: cfg.codex_thread_usage,
            current: None,
            closed: false,
        };
        Arc::new_cyclic(|weak: &std::sync::Weak<Self>| {
            let reapable: std::sync::Weak<dyn Reapable> = weak.clone();
            Self {
                slot: cfg.pool.as_ref().map(|p| p.slot(reapable)),
                cfg,
                state: Mutex::new(state),
            }
        })
    }

    pub(super) fn set_session_id(&self, id: &str) {
        let mut st = lock(&self.state);
        if st.session_id.as_deref() != Some(id) {
            st.session_id = Some(id.to_string());
        }
    }

    pub(super) fn take_session_id(&self) -> Option<String> {
        lock(&self.state).session_id.take()
    }

    pub(super) fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// The turn is over: give back what it borrowed and mark the session
    /// idle. Called before `Finished` is sent.
    pub(super) fn end_turn(&self, idle: Option<C::Idle>, thread_usage: Option<Usage>) {
        let kept = {
            let mut st = lock(&self.state);
            st.busy = false;
            st.current = None;
            if thread_usage.is_some() {
                st.thread_usage = thread_usage;
            }
            if st.closed {
                // Shutdown raced with the end of the turn: keep nothing.
                if let Some(p) = idle {
                    tokio::spawn(stop_idle(p, Duration::from_secs(1)));
                }
                false
            } else {
                st.idle = idle;
                st.idle.is_some()
            }
        };
        if let Some(slot) = &self.slot {
            slot.turn_ended(kept);
        }
    }
}

impl<C: Cli> Reapable for Shared<C> {
    fn take_idle(&self) -> Option<BoxFuture<'static, ()>> {
        let idle = {
            let mut st = lock(&self.state);
            if st.busy {
                return None;
            }
            st.idle.take()?
        };
        let grace = self.cfg.kill_grace;
        Some(Box::pin(stop_idle(idle, grace)))
    }
}

impl<C: Cli> Drop for Shared<C> {
    /// The session is gone (its chat dropped without `shutdown`): its idle
    /// process's `Group` KILLs the whole group when dropped with the state.
    fn drop(&mut self) {
        if let Some(slot) = &self.slot {
            slot.released();
        }
    }
}

/// What [`super::ProviderSession`] drives; one implementation, generic over
/// the CLI.
pub(super) trait Backend: Send + Sync {
    fn start_turn(&self, input: TurnInput) -> BoxFuture<'_, Result<RunningTurn, ProviderError>>;
    fn shutdown(&self) -> BoxFuture<'_, ()>;
    fn session_id(&self) -> Option<String>;
    fn is_busy(&self) -> bool;
    fn thread_usage(&self) -> Option<Usage>;
    fn kind(&self) -> ProviderKind;
    /// Whether a process is kept between turns right now.
    fn has_idle_process(&self) -> bool;
}

pub(super) struct Session<C: Cli>(pub(super) Arc<Shared<C>>);

impl<C: Cli> Backend for Session<C> {
    fn start_turn(&self, input: TurnInput) -> BoxFuture<'_, Result<RunningTurn, ProviderError>> {
        Box::pin(start_turn(&self.0, input))
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(shutdown(&self.0))
    }
    fn session_id(&self) -> Option<String> {
        lock(&self.0.state).session_id.clone()
    }
    fn is_busy(&self) -> bool {
        lock(&self.0.state).busy
    }
    fn thread_usage(&self) -> Option<Usage> {
        lock(&self.0.state).thread_usage
    }
    fn kind(&self) -> ProviderKind {
        self.0.cfg.kind
    }
    fn has_idle_process(&self) -> bool {
        lock(&self.0.state).idle.is_some()
    }
}

/// Start a turn. See [`super::ProviderSession::start_turn`].
async fn start_turn<C: Cli>(
    shared: &Arc<Shared<C>>,
    input: TurnInput,
) -> Result<RunningTurn, ProviderError> {
    let (resume, idle, thread_usage) = {
        let mut st = lock(&shared.state);
        if st.busy {
            return Err(ProviderError::Busy);
        }
        st.busy = true;
        (st.session_id.clone(), st.idle.take(), st.thread_usage)
    };
    // If this future is dropped before a driver owns the turn (a caller's
    // select!, a runtime shutting down), the session must not stay busy.
    let mut guard = BusyGuard {
        shared: &**shared,
        armed: true,
    };
    if let Some(slot) = &shared.slot {
        // A new process is about to start: make room under the cap first.
        slot.turn_starting(idle.is_none());
    }
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
        C::begin(&shared.cfg, input, resume, idle, thread_usage).await
    };
    // From here on the driver (or the error path below) ends the turn.
    guard.armed = false;
    match started {
        Ok((proc, proto)) => {
            let (pgid, start_time) = (proc.group.pgid(), proc.group.start_time());
            tokio::spawn(tracing::Instrument::in_current_span(super::driver::drive(
                shared.clone(),
                proc,
                proto,
                events_tx,
                int_rx,
            )));
            Ok(RunningTurn {
                events: events_rx,
                pgid,
                start_time,
                interrupter,
            })
        }
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
struct BusyGuard<'a, C: Cli> {
    shared: &'a Shared<C>,
    armed: bool,
}

impl<C: Cli> Drop for BusyGuard<'_, C> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.end_turn(None, None);
        }
    }
}

/// Interrupt the running turn, then stop the idle process.
async fn shutdown<C: Cli>(shared: &Arc<Shared<C>>) {
    let current = {
        let mut st = lock(&shared.state);
        st.closed = true;
        st.current.clone()
    };
    if let Some(i) = current {
        i.interrupt().await;
    }
    let idle = lock(&shared.state).idle.take();
    if let Some(p) = idle {
        stop_idle(p, shared.cfg.kill_grace).await;
    }
    if let Some(slot) = &shared.slot {
        slot.released();
    }
}
