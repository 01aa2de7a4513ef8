//! The engine-wide bound on live agent processes: an idle process (kept
//! between turns) is stopped after `idle_timeout`, and at most `cap`
//! processes live at once, the least recently used idle one stopped first
//! when a new one is needed. A session whose process was stopped resumes
//! its provider session in a new process on its next message, as after a
//! restart.
//!
//! A process running a turn is never stopped to make room: when every live
//! process is running a turn, one more starts (with a `warn`), and the
//! count falls back under the cap as those turns end.
//!
//! Locking: the pool's mutex is never held while a session's is taken
//! (victims are chosen under the pool lock, released, then asked).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::lock;
use super::session::BoxFuture;

/// A session the pool can take an idle process from.
pub(super) trait Reapable: Send + Sync {
    /// Take the session's idle process out (none when a turn runs): the
    /// returned future stops its group.
    fn take_idle(&self) -> Option<BoxFuture<'static, ()>>;
}

/// Shared by every session of the engine; cheap to clone.
#[derive(Clone)]
pub struct ProcessPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ProcessPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessPool")
            .field("cap", &self.inner.cap)
            .field("idle_timeout", &self.inner.idle_timeout)
            .field("live", &self.live())
            .finish()
    }
}

struct Inner {
    cap: usize,
    idle_timeout: Duration,
    entries: Mutex<HashMap<u64, Entry>>,
    next_key: AtomicU64,
    reaper_started: AtomicBool,
}

struct Entry {
    session: Weak<dyn Reapable>,
    /// `None` while a turn runs; else when the process went idle.
    idle_since: Option<Instant>,
}

impl ProcessPool {
    /// At most `cap` live processes (at least 1); idle ones stopped after
    /// `idle_timeout`.
    pub fn new(cap: usize, idle_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                cap: cap.max(1),
                idle_timeout,
                entries: Mutex::new(HashMap::new()),
                next_key: AtomicU64::new(1),
                reaper_started: AtomicBool::new(false),
            }),
        }
    }

    /// Live agent processes the pool knows of (running a turn or idle).
    pub fn live(&self) -> usize {
        lock(&self.inner.entries).len()
    }

    /// Idle agent processes (kept between turns).
    pub fn idle(&self) -> usize {
        lock(&self.inner.entries)
            .values()
            .filter(|e| e.idle_since.is_some())
            .count()
    }

    pub(super) fn slot(&self, session: Weak<dyn Reapable>) -> PoolSlot {
        self.start_reaper();
        PoolSlot {
            inner: self.inner.clone(),
            key: self.inner.next_key.fetch_add(1, Ordering::Relaxed),
            session,
        }
    }

    /// One task per pool stops processes idle for longer than the timeout;
    /// it ends when the pool is dropped.
    fn start_reaper(&self) {
        if self.inner.reaper_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.inner.reaper_started.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        let tick =
            (self.inner.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        rt.spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(inner) = weak.upgrade() else { break };
                let now = Instant::now();
                let victims: Vec<Weak<dyn Reapable>> = {
                    let mut entries = lock(&inner.entries);
                    let expired: Vec<u64> = entries
                        .iter()
                        .filter(|(_, e)| {
                            e.idle_since
                                .is_some_and(|t| now.duration_since(t) >= inner.idle_timeout)
                        })
                        .map(|(k, _)| *k)
                        .collect();
                    expired
                        .iter()
                        .filter_map(|k| entries.remove(k))
                        .map(|e| e.session)
                        .collect()
                };
                let idle_secs = inner.idle_timeout.as_secs();
                drop(inner);
                for v in victims {
                    if let Some(stop) = v.upgrade().and_then(|s| s.take_idle()) {
                        tracing::info!(idle_secs, "stopping an agent process idle for too long");
                        stop.await;
                    }
                }
            }
        });
    }
}

/// One session's place in the pool.
pub(super) struct PoolSlot {
    inner: Arc<Inner>,
    key: u64,
    session: Weak<dyn Reapable>,
}

impl PoolSlot {
    /// A turn starts; `new_process` when it will spawn one (no idle process
    /// to reuse). Makes room under the cap first.
    pub fn turn_starting(&self, new_process: bool) {
        let victims = {
            let mut entries = lock(&self.inner.entries);
            entries.insert(
                self.key,
                Entry {
                    session: self.session.clone(),
                    idle_since: None,
                },
            );
            if new_process {
                self.over_cap(&mut entries)
            } else {
                Vec::new()
            }
        };
        stop_all(victims);
    }

    /// The turn ended; `kept` when its process stays for the next turn.
    pub fn turn_ended(&self, kept: bool) {
        let victims = {
            let mut entries = lock(&self.inner.entries);
            if kept {
                entries.insert(
                    self.key,
                    Entry {
                        session: self.session.clone(),
                        idle_since: Some(Instant::now()),
                    },
                );
                self.over_cap(&mut entries)
            } else {
                entries.remove(&self.key);
                Vec::new()
            }
        };
        stop_all(victims);
    }

    /// The session has no process any more (shut down or dropped).
    pub fn released(&self) {
        lock(&self.inner.entries).remove(&self.key);
    }

    /// While over the cap, take out the least recently used idle entries
    /// (never this session's, never a running turn's).
    fn over_cap(&self, entries: &mut HashMap<u64, Entry>) -> Vec<Weak<dyn Reapable>> {
        let mut victims = Vec::new();
        while entries.len() > self.inner.cap {
            let lru = entries
                .iter()
                .filter(|(k, _)| **k != self.key)
                .filter_map(|(k, e)| e.idle_since.map(|t| (t, *k)))
                .min();
            match lru {
                Some((_, k)) => {
                    if let Some(e) = entries.remove(&k) {
                        victims.push(e.session);
                    }
                }
                None => {
                    tracing::warn!(
                        cap = self.inner.cap,
                        live = entries.len(),
                        "every live agent process is running a turn; one more starts beyond the cap"
                    );
                    break;
                }
            }
        }
        victims
    }
}

/// Stop the victims' idle processes in the background.
fn stop_all(victims: Vec<Weak<dyn Reapable>>) {
    for v in victims {
        if let Some(stop) = v.upgrade().and_then(|s| s.take_idle()) {
            tracing::info!(
                "agent process cap reached; stopping the least recently used idle process"
            );
            tokio::spawn(stop);
        }
    }
}
