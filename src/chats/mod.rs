//! Chats: the registry, the per-chat message queue and the turns that drive
//! an agent CLI through [`crate::providers`].
//!
//! [`ChatService`] is a cheap-to-clone handle. Its state is one map of chat
//! records under one lock; every change goes through one method
//! ([`mutate`]), which marks the chat dirty, bumps a version and publishes
//! `chat.updated`, and the changed chats are committed to `chats.db`
//! ([`store`]) before the caller is answered, so nothing a client got a 2xx
//! for is lost by a `kill -9`. Events describing a change
//! are published while the lock is held, so their order is the order of the
//! changes. History lives in per-chat JSONL files ([`history`]).
//!
//! A chat with work has one runner task ([`runner`]) that takes the next
//! message (the one a `sent` answer put in place, or the head of the queue
//! once start hooks are done), runs it as a turn and records how it ended.
//! One turn at a time per chat; chats run concurrently. Runners are started
//! on demand, so start-up and an idle chat cost no task: at boot only for
//! chats with queued messages, later by [`ChatService::send`] when the chat
//! has none; a runner exits once its chat has no work left and no agent
//! process is kept for it.
//!
//! Invariants:
//! - A chat's `activeTurn` is set from the moment a message is taken until
//!   the provider reported the turn finished, which it does only after the
//!   process exit was observed (or its tools' processes were ended); so a
//!   chat is `idle` only when nothing of its turn still runs.
//! - A chat with an `activeTurn` or queued messages has a runner
//!   (`Slot::rt` is `Some`); `rt` is set and cleared under the state lock,
//!   where a runner also decides to exit, so a message is never left
//!   without one.
//! - `activeTurn.pgid`/`startTime` are persisted as soon as the process is
//!   spawned, so the next engine can end the group a crashed one left
//!   behind ([`ChatService::new`] does that on start).

pub mod history;
pub mod model;
mod mutate;
mod runner;
pub mod store;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::events::{EventBus, EventKind};
use crate::providers::{Image, ProviderKind};
use crate::util::{new_id, now_ts};
use mutate::Persist;

pub use history::Page;
pub use model::{
    ActiveTurn, Chat, ChatRecord, ChatStatus, Delivery, HistoryItem, LastTurn, Message,
    MessagePreview, Outcome, ThinkingLevel, Usage,
};

/// How long an interrupt or delete waits for the turn's processes to end
/// before answering anyway (the turn still ends; the answer then shows
/// `interrupting`).
const STOP_WAIT: Duration = Duration::from_secs(15);
/// Upper bound of `GET /history?limit`.
pub const MAX_HISTORY_LIMIT: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("no chat with id {0:?}")]
    NotFound(String),
    /// Bad input; `field` names the request field.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The message text is over `REPLICAS_MAX_MESSAGE_BYTES`.
    #[error("message: the text is {len} bytes; the limit is {max} bytes")]
    MessageTooLarge { len: usize, max: usize },
    /// The chat already holds `REPLICAS_MAX_QUEUED_MESSAGES` waiting messages.
    #[error("the chat already has {max} queued messages; wait for them to run or interrupt with clearQueue")]
    QueueFull { max: usize },
    /// `chats.json` or an attachment could not be written; the change may
    /// not survive a restart.
    #[error("could not persist chat state: {0}")]
    Persist(#[source] std::io::Error),
    /// A history file could not be read.
    #[error("could not read chat history: {0}")]
    History(#[source] std::io::Error),
}

fn invalid(field: &'static str, message: impl Into<String>) -> ChatError {
    ChatError::Invalid {
        field,
        message: message.into(),
    }
}

/// Looks up the repo `systemPrompt` for a chat's cwd.
pub type SystemPromptFn = Arc<dyn Fn(&Path) -> Option<String> + Send + Sync>;

/// What the chat service needs from other modules (hooks, repos, token
/// refresh). Wired in `app.rs`; [`ChatDeps::standalone`] needs nothing.
#[derive(Clone)]
pub struct ChatDeps {
    /// `true` once start hooks finished (any outcome). Until then turns
    /// wait and chats with messages show `waiting_for_hooks`.
    pub hooks_done: watch::Receiver<bool>,
    /// The repo `systemPrompt` for a chat's cwd.
    pub system_prompt: SystemPromptFn,
    /// A turn ended in this cwd: repos re-check their status.
    pub after_turn: Arc<dyn Fn(&Path) + Send + Sync>,
    /// A provider reported an authentication failure: refresh credentials.
    pub on_auth_failure: Arc<dyn Fn(ProviderKind) + Send + Sync>,
}

impl ChatDeps {
    /// Hooks done, no system prompt, no-op callbacks.
    pub fn standalone() -> Self {
        let (_tx, rx) = watch::channel(true);
        Self {
            hooks_done: rx,
            system_prompt: Arc::new(|_| None),
            after_turn: Arc::new(|_| {}),
            on_auth_failure: Arc::new(|_| {}),
        }
    }
}

/// `POST /chats` input, already decoded (validated here).
#[derive(Debug, Default)]
pub struct NewChat {
    pub provider: String,
    pub title: Option<String>,
    pub model: Option<String>,
    pub cwd: Option<String>,
}

/// `POST /chats/:id/messages` input, already decoded (validated here).
#[derive(Debug, Default)]
pub struct NewMessage {
    pub text: String,
    pub model: Option<String>,
    pub plan_mode: bool,
    pub thinking_level: Option<String>,
    /// Anthropic image blocks as sent.
    pub images: Vec<Value>,
}

/// The answer to an accepted message.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    pub status: Delivery,
    pub message_id: String,
    /// 0 when sent, else the 1-based queue position.
    pub position: usize,
    pub chat_id: String,
}

/// `GET /chats` filters and paging, already decoded (the cursor is checked
/// here).
#[derive(Debug, Default)]
pub struct ListQuery {
    /// At most this many chats; `None`: all.
    pub limit: Option<usize>,
    /// `nextCursor` of the previous page.
    pub cursor: Option<String>,
    pub status: Option<ChatStatus>,
    pub provider: Option<ProviderKind>,
}

/// Upper bound of `GET /chats?limit`.
pub const MAX_LIST_LIMIT: usize = 1000;

#[derive(Debug)]
pub struct ChatPage {
    pub chats: Vec<Chat>,
    /// Where the next page starts; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// The cursor is the `(createdAt, id)` of the last chat returned, base64url
/// so clients treat it as opaque.
fn encode_cursor(created_at: &str, id: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{created_at}\n{id}"))
}

fn decode_cursor(cursor: &str) -> Result<(String, String), ChatError> {
    use base64::Engine;
    let bad = || invalid("cursor", "not a cursor from a previous page's nextCursor");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (created_at, id) = text.split_once('\n').ok_or_else(bad)?;
    if id.is_empty() || chrono::DateTime::parse_from_rfc3339(created_at).is_err() {
        return Err(bad());
    }
    Ok((created_at.to_owned(), id.to_owned()))
}

/// The `/status` summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatCounts {
    pub total: usize,
    pub running: usize,
    pub queued_messages: usize,
}

/// `chats.db` as [`ChatService::open_db`] found it.
pub struct OpenedDb {
    db: store::ChatDb,
    opened: store::Opened,
}

#[derive(Clone)]
pub struct ChatService {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    bus: EventBus,
    deps: ChatDeps,
    state: Mutex<State>,
    /// Highest state version committed to `chats.db`. Held while writing,
    /// so writes are ordered and a caller whose change is already committed
    /// (group commit) skips its own write.
    persisted: tokio::sync::Mutex<u64>,
    db: store::ChatDb,
    history: history::HistoryStore,
    attachments: store::Attachments,
    /// Cancelled by [`ChatService::shutdown`]; every runner watches a child.
    shutdown: CancellationToken,
    runners: TaskTracker,
    /// Idle timeout and cap of the agent processes of all chats.
    agent_processes: crate::providers::ProcessPool,
}

struct State {
    chats: HashMap<String, Slot>,
    version: u64,
    /// Chats changed since the last write (present: put; gone: delete).
    dirty: HashSet<String>,
    /// `/status` counts, kept up to date by [`State::touch`] instead of a
    /// walk over every chat.
    counts: ChatCounts,
    /// Every chat by `(createdAt, id)`: `GET /chats` pages walk it newest
    /// first from a cursor instead of sorting the registry per call.
    order: BTreeSet<(String, String)>,
}

impl State {
    /// Record that chat `id` changed: it is written by the next persist and
    /// its share of the counts is brought up to date.
    fn touch(&mut self, id: &str) {
        self.version += 1;
        if !self.dirty.contains(id) {
            self.dirty.insert(id.to_owned());
        }
        self.recount(id);
    }

    /// Bring chat `id`'s share of [`State::counts`] up to date.
    fn recount(&mut self, id: &str) {
        let Some(slot) = self.chats.get_mut(id) else {
            return;
        };
        let now = Counted::of(slot);
        let was = std::mem::replace(&mut slot.counted, now);
        let c = &mut self.counts;
        c.total = c.total + usize::from(now.live) - usize::from(was.live);
        c.running = c.running + usize::from(now.running) - usize::from(was.running);
        c.queued_messages = c.queued_messages + now.queued - was.queued;
    }
}

/// One chat's share of [`ChatCounts`].
#[derive(Clone, Copy, Default)]
struct Counted {
    live: bool,
    running: bool,
    queued: usize,
}

impl Counted {
    fn of(slot: &Slot) -> Self {
        if slot.deleting {
            return Self::default();
        }
        Self {
            live: true,
            running: slot.rec.active_turn.is_some(),
            queued: slot.rec.queue.len(),
        }
    }
}

struct Slot {
    rec: ChatRecord,
    /// The chat's runner, while one runs (see the module invariants).
    rt: Option<Arc<Runtime>>,
    /// Why the running turn is being stopped (`user`, `deleted`,
    /// `engine_shutdown`); `None` when nobody asked.
    interrupting: Option<&'static str>,
    /// Delete in progress: the chat takes no more messages.
    deleting: bool,
    /// What this chat adds to [`State::counts`].
    counted: Counted,
}

/// Live, unpersisted parts of a chat, shared with its runner; one per
/// runner (a later runner of the same chat gets a fresh one).
struct Runtime {
    /// A message was put in place or queued.
    wake: Notify,
    /// Someone set `interrupting`.
    interrupt: Notify,
    /// Cancelled on delete; a child of the service's shutdown token.
    stop: CancellationToken,
    /// Bumped after every finished turn; interrupt/delete wait on it.
    turns_done: watch::Sender<u64>,
    /// Cancelled when the runner task has exited (session shut down).
    exited: CancellationToken,
}

impl ChatService {
    /// Open `chats.db` (importing a `chats.json` left by an older engine),
    /// recover what a dead engine left running, and start one runner per
    /// chat. A database that cannot be used is an error: the engine must not
    /// start empty over it.
    pub fn new(config: Arc<Config>, bus: EventBus, deps: ChatDeps) -> Result<Self, store::DbError> {
        let db = Self::open_db(&config)?;
        Ok(Self::with_db(config, bus, deps, db))
    }

    /// Open and read `chats.db` (blocking): the first half of
    /// [`new`](Self::new), which start-up runs beside the journal load.
    pub fn open_db(config: &Config) -> Result<OpenedDb, store::DbError> {
        let (db, opened) = store::ChatDb::open(&config.paths.chats_db, &config.paths.chats_file)?;
        Ok(OpenedDb { db, opened })
    }

    /// The second half of [`new`](Self::new), on a database [`open_db`]
    /// read.
    ///
    /// [`open_db`]: Self::open_db
    pub fn with_db(config: Arc<Config>, bus: EventBus, deps: ChatDeps, db: OpenedDb) -> Self {
        let OpenedDb { db, opened } = db;
        let inner = Arc::new(Inner {
            history: history::HistoryStore::new(config.paths.history_dir.clone()),
            attachments: store::Attachments::new(config.paths.attachments_dir.clone()),
            config: config.clone(),
            bus,
            deps,
            state: Mutex::new(State {
                chats: HashMap::new(),
                version: 0,
                dirty: HashSet::new(),
                counts: ChatCounts::default(),
                order: BTreeSet::new(),
            }),
            persisted: tokio::sync::Mutex::new(0),
            db,
            shutdown: CancellationToken::new(),
            runners: TaskTracker::new(),
            agent_processes: crate::providers::ProcessPool::new(
                config.max_agent_processes,
                config.provider_idle,
            ),
        });
        let svc = Self { inner };
        let records = svc.loaded(opened);
        let recovered = {
            let mut st = svc.state();
            let mut recovered = false;
            st.chats.reserve(records.len());
            // Built in one go below (sorted bulk load, not one insert each).
            let mut order = Vec::with_capacity(records.len());
            for mut rec in records {
                let changed = svc.recover(&mut rec);
                recovered |= changed;
                let id = rec.id.clone();
                order.push((rec.created_at.clone(), id.clone()));
                st.chats.insert(
                    id.clone(),
                    Slot {
                        rec,
                        rt: None,
                        interrupting: None,
                        deleting: false,
                        counted: Counted::default(),
                    },
                );
                if changed {
                    st.touch(&id);
                } else {
                    st.recount(&id);
                }
            }
            st.order = order.into_iter().collect();
            recovered
        };
        if recovered {
            svc.persist_now_blocking();
        }
        // Only chats with queued messages need a runner now (recovery left
        // no `activeTurn`); the rest get one when a message arrives.
        let busy: Vec<(String, Arc<Runtime>)> = {
            let mut st = svc.state();
            st.chats
                .iter_mut()
                .filter(|(_, s)| !s.rec.queue.is_empty())
                .map(|(id, s)| {
                    let rt = svc.new_runtime();
                    s.rt = Some(rt.clone());
                    (id.clone(), rt)
                })
                .collect()
        };
        for (id, rt) in busy {
            svc.spawn_runner(id, rt);
        }
        svc
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Log what opening the database found; a `chats.json` that could not
    /// be imported is reported as a `state_corrupt` error event.
    fn loaded(&self, opened: store::Opened) -> Vec<ChatRecord> {
        let path = &self.inner.config.paths.chats_file;
        if let Some(n) = opened.migrated {
            tracing::info!(chats = n, from = %path.display(), "chats imported into the chat database");
        }
        if let Some((error, moved_to)) = opened.legacy_corrupt {
            let moved = moved_to.as_ref().map(|p| p.display().to_string());
            tracing::error!(path = %path.display(), error, moved_to = moved.as_deref(), "chats file is corrupt; its chats were not imported");
            self.inner.bus.publish(
                None,
                EventKind::Error {
                    code: "state_corrupt".into(),
                    message: match &moved {
                        Some(to) => format!("chats.json could not be read ({error}); it was moved to {to} and its chats were not imported"),
                        None => format!("chats.json could not be read ({error}); its chats were not imported"),
                    },
                    source: "chats".into(),
                },
            );
        }
        tracing::info!(chats = opened.chats.len(), "chats loaded");
        opened.chats
    }

    /// A turn the previous engine left behind: if its process was spawned,
    /// end any stray member of its group and record the turn interrupted
    /// (`engine_restart`); if it never got that far, its message goes back
    /// to the front of the queue. Returns whether anything changed.
    fn recover(&self, rec: &mut ChatRecord) -> bool {
        let Some(turn) = rec.active_turn.take() else {
            return false;
        };
        let Some(pgid) = turn.pgid else {
            tracing::info!(chat.id = %rec.id, message.id = %turn.message.id, "requeueing a message whose turn never started before the engine stopped");
            rec.queue.insert(0, turn.message);
            return true;
        };
        let killed = crate::process::kill_recorded_group(pgid, turn.start_time);
        tracing::warn!(chat.id = %rec.id, turn.id = %turn.turn_id, pgid, stray_group_killed = killed, "turn was running when the previous engine stopped; marking it interrupted");
        let now = now_ts();
        rec.last_turn = Some(LastTurn {
            turn_id: turn.turn_id.clone(),
            outcome: Outcome::Interrupted,
            finished_at: now.clone(),
            reason: Some("engine_restart".into()),
            error: None,
        });
        rec.updated_at = now;
        self.inner.attachments.remove(&turn.message.id);
        self.inner.bus.publish(
            Some(&rec.id),
            EventKind::ChatInterrupted {
                turn_id: turn.turn_id,
                duration_ms: millis_since(&turn.started_at),
            },
        );
        true
    }

    fn new_runtime(&self) -> Arc<Runtime> {
        Arc::new(Runtime {
            wake: Notify::new(),
            interrupt: Notify::new(),
            stop: self.inner.shutdown.child_token(),
            turns_done: watch::channel(0).0,
            exited: CancellationToken::new(),
        })
    }

    /// Start a runner for chat `id`; `rt` was put in its slot under the
    /// state lock.
    fn spawn_runner(&self, id: String, rt: Arc<Runtime>) {
        let svc = self.clone();
        self.inner.runners.spawn(async move {
            runner::drive(svc, id, rt.clone()).await;
            rt.exited.cancel();
        });
    }

    fn hooks_done(&self) -> bool {
        *self.inner.deps.hooks_done.borrow()
    }

    /// The wire view of a slot.
    fn view(&self, slot: &Slot) -> Chat {
        slot.rec
            .view(slot.interrupting.is_some(), self.hooks_done())
    }

    fn publish_updated(&self, slot: &Slot) {
        let chat = Box::new(self.view(slot));
        self.inner
            .bus
            .publish(Some(&slot.rec.id), EventKind::ChatUpdated { chat });
    }

    /// Commit the chats changed since the last write, if the current
    /// version is not committed yet.
    async fn persist(&self) -> Result<(), ChatError> {
        let wanted = self.state().version;
        let mut persisted = self.inner.persisted.lock().await;
        if *persisted >= wanted {
            return Ok(());
        }
        let (version, changes) = self.take_changes();
        let ids: Vec<String> = changes.iter().map(|c| c.chat_id().to_owned()).collect();
        match self.inner.db.write(changes).await {
            Ok(()) => {
                *persisted = version;
                Ok(())
            }
            Err(e) => {
                // Still to be written: the next persist tries again.
                self.state().dirty.extend(ids);
                Err(ChatError::Persist(e))
            }
        }
    }

    /// Persist from a place that cannot report the error (the runner,
    /// shutdown): the failure is logged here, once.
    async fn persist_logged(&self) {
        if let Err(e) = self.persist().await {
            tracing::error!(error = %e, "could not write the chat database");
        }
    }

    fn persist_in_background(&self) {
        let svc = self.clone();
        tokio::spawn(async move { svc.persist_logged().await });
    }

    /// Startup path (not async): write the recovered state.
    fn persist_now_blocking(&self) {
        let (version, changes) = self.take_changes();
        match self.inner.db.write_blocking(changes) {
            Ok(()) => {
                if let Ok(mut p) = self.inner.persisted.try_lock() {
                    *p = version;
                }
            }
            Err(e) => tracing::error!(error = %e, "could not write the chat database"),
        }
    }

    /// The changed chats as they are now (copies; the lock is held only
    /// for the copy), and the version they make up. A failed write puts
    /// nothing back: the chats stay changed in memory and the next change
    /// of each writes all its rows again (the writer's view is unchanged).
    fn take_changes(&self) -> (u64, Vec<store::Change>) {
        let mut st = self.state();
        let dirty = std::mem::take(&mut st.dirty);
        let changes = dirty
            .into_iter()
            .map(|id| match st.chats.get(&id) {
                Some(slot) => store::Change::Put(Box::new(slot.rec.clone())),
                None => store::Change::Delete(id),
            })
            .collect();
        (st.version, changes)
    }

    // ----- public API -------------------------------------------------------

    /// Create a chat. `cwd` must resolve (after following symlinks) inside
    /// the workspace root; relative paths are taken from the root.
    #[tracing::instrument(skip_all, fields(chat.id))]
    pub async fn create(&self, req: NewChat) -> Result<Chat, ChatError> {
        let provider = ProviderKind::parse(&req.provider).ok_or_else(|| {
            invalid(
                "provider",
                format!(
                    "unknown provider {:?}; expected \"claude\" or \"codex\"",
                    req.provider
                ),
            )
        })?;
        let cwd = self.resolve_cwd(req.cwd.as_deref())?;
        let title = match req.title.map(|t| t.trim().to_owned()) {
            Some(t) if !t.is_empty() => t,
            _ => model::default_title(provider).to_owned(),
        };
        let now = now_ts();
        let rec = ChatRecord {
            id: new_id("c"),
            provider,
            title,
            model: req.model.filter(|m| !m.trim().is_empty()),
            cwd,
            provider_session_id: None,
            created_at: now.clone(),
            updated_at: now,
            queue: Vec::new(),
            last_turn: None,
            usage: Usage::default(),
            active_turn: None,
            codex_thread_usage: None,
        };
        let id = rec.id.clone();
        tracing::Span::current().record("chat.id", id.as_str());
        let chat = {
            let mut st = self.state();
            let slot = Slot {
                rec,
                rt: None,
                interrupting: None,
                deleting: false,
                counted: Counted::default(),
            };
            let chat = self.view(&slot);
            st.order.insert((slot.rec.created_at.clone(), id.clone()));
            st.chats.insert(id.clone(), slot);
            st.touch(&id);
            self.inner.bus.publish(
                Some(&id),
                EventKind::ChatCreated {
                    chat: Box::new(chat.clone()),
                },
            );
            chat
        };
        self.persist().await?;
        tracing::info!(provider = provider.as_str(), cwd = %chat.cwd.display(), "chat created");
        Ok(chat)
    }

    /// Every chat, newest first.
    pub fn list(&self) -> Vec<Chat> {
        self.page(&ListQuery::default())
            .expect("an unlimited page without cursor is valid")
            .chats
    }

    /// A page of chats, newest first (`createdAt`, then id), after
    /// `q.cursor`. Keyset paging: a chat created meanwhile sorts before any
    /// cursor (it is newer) and a deleted one leaves no gap, so a walk
    /// returns no chat twice and skips none that lived throughout.
    pub fn page(&self, q: &ListQuery) -> Result<ChatPage, ChatError> {
        let after = q.cursor.as_deref().map(decode_cursor).transpose()?;
        let limit = q.limit.unwrap_or(usize::MAX);
        let st = self.state();
        let hooks_done = self.hooks_done();
        let mut chats = Vec::new();
        let mut next = None;
        let range = match &after {
            Some(key) => st.order.range(..key.clone()),
            None => st.order.range::<(String, String), _>(..),
        };
        for key in range.rev() {
            let Some(slot) = st.chats.get(&key.1).filter(|s| !s.deleting) else {
                continue;
            };
            if q.provider.is_some_and(|p| p != slot.rec.provider) {
                continue;
            }
            let chat = slot.rec.view(slot.interrupting.is_some(), hooks_done);
            if q.status.is_some_and(|s| s != chat.status) {
                continue;
            }
            if chats.len() == limit {
                // One more exists: the page is full and not the last.
                next = chats
                    .last()
                    .map(|c: &Chat| encode_cursor(&c.created_at, &c.id));
                break;
            }
            chats.push(chat);
        }
        Ok(ChatPage {
            chats,
            next_cursor: next,
        })
    }

    pub fn get(&self, id: &str) -> Result<Chat, ChatError> {
        let st = self.state();
        match st.chats.get(id) {
            Some(s) if !s.deleting => Ok(self.view(s)),
            _ => Err(ChatError::NotFound(id.to_owned())),
        }
    }

    /// The `/status` counts (maintained on every change, not counted here).
    pub fn counts(&self) -> ChatCounts {
        self.state().counts
    }

    /// Accept a message: start it now when the chat is idle and start hooks
    /// are done (`sent`), else queue it. Persisted (with its images) before
    /// this returns.
    #[tracing::instrument(skip_all, fields(chat.id = %id))]
    pub async fn send(&self, id: &str, req: NewMessage) -> Result<Accepted, ChatError> {
        let max = self.inner.config.max_message_bytes;
        if req.text.len() > max {
            return Err(ChatError::MessageTooLarge {
                len: req.text.len(),
                max,
            });
        }
        let (text, plan_prefix) = strip_plan(&req.text);
        let images = parse_images(&req.images)?;
        if text.trim().is_empty() && images.is_empty() {
            let what = if plan_prefix {
                "message is empty after /plan"
            } else {
                "message must not be empty"
            };
            return Err(invalid("message", what));
        }
        let thinking_level = match req.thinking_level.as_deref() {
            None => None,
            Some(s) => Some(ThinkingLevel::parse(s).ok_or_else(|| {
                invalid(
                    "thinkingLevel",
                    format!("unknown level {s:?}; expected low, medium, high or max"),
                )
            })?),
        };
        let max_queued = self.inner.config.max_queued_messages;
        {
            // Checked again under the lock below; this spares writing the
            // images of a message that cannot be queued.
            let st = self.state();
            match st.chats.get(id) {
                Some(s) if !s.deleting => {
                    if s.rec.queue.len() >= max_queued {
                        return Err(ChatError::QueueFull { max: max_queued });
                    }
                }
                _ => return Err(ChatError::NotFound(id.to_owned())),
            }
        }
        let msg = Message {
            id: new_id("m"),
            text: text.to_owned(),
            queued_at: now_ts(),
            plan_mode: req.plan_mode || plan_prefix,
            model: req.model.filter(|m| !m.trim().is_empty()),
            images: images.len(),
            thinking_level,
        };
        if !images.is_empty() {
            let (attachments, mid) = (self.inner.attachments.clone(), msg.id.clone());
            tokio::task::spawn_blocking(move || attachments.put(&mid, &images))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(ChatError::Persist)?;
        }
        let hooks_done = self.hooks_done();
        let accept = self.mutate(id, Persist::Await, |chat| {
            if chat.deleting {
                return Err(ChatError::NotFound(id.to_owned()));
            }
            let idle = chat.rec.active_turn.is_none() && chat.rec.queue.is_empty() && hooks_done;
            if !idle && chat.rec.queue.len() >= max_queued {
                return Err(ChatError::QueueFull { max: max_queued });
            }
            let (status, position) = if idle {
                chat.rec.active_turn = Some(ActiveTurn {
                    turn_id: new_id("t"),
                    message: msg.clone(),
                    started_at: now_ts(),
                    pgid: None,
                    start_time: None,
                });
                (Delivery::Sent, 0)
            } else {
                chat.rec.queue.push(msg.clone());
                (Delivery::Queued, chat.rec.queue.len())
            };
            chat.changed();
            self.inner.bus.publish(
                Some(id),
                EventKind::TurnAccepted {
                    message: msg.preview(),
                    status,
                    position,
                },
            );
            // The chat has work now: wake its runner, or start one. A `sent`
            // turn may start while this request writes chats.db: the runner
            // does not persist it again, and a crash before the write
            // finished leaves nothing acknowledged.
            match &chat.rt {
                Some(rt) => rt.wake.notify_one(),
                None => {
                    let rt = self.new_runtime();
                    chat.rt = Some(rt.clone());
                    self.spawn_runner(id.to_owned(), rt);
                }
            }
            Ok(Accepted {
                status,
                message_id: msg.id.clone(),
                position,
                chat_id: id.to_owned(),
            })
        });
        let accepted = match accept.await {
            Err(e @ (ChatError::NotFound(_) | ChatError::QueueFull { .. })) => {
                // Not accepted: its images go.
                self.inner.attachments.remove(&msg.id);
                return Err(e);
            }
            other => other?,
        };
        tracing::info!(message.id = %accepted.message_id, status = accepted.status.as_str(), position = accepted.position, "message accepted");
        Ok(accepted)
    }

    /// Stop the running turn (its whole process group ends) and, with
    /// `clear_queue`, drop the waiting messages. Returns once the turn
    /// ended (bounded by [`STOP_WAIT`]). A no-op on an idle chat.
    #[tracing::instrument(skip_all, fields(chat.id = %id))]
    pub async fn interrupt(&self, id: &str, clear_queue: bool) -> Result<Chat, ChatError> {
        let (rt, running, dropped, done) = self
            .mutate(id, Persist::Await, |chat| {
                if chat.deleting {
                    return Err(ChatError::NotFound(id.to_owned()));
                }
                let dropped = if clear_queue {
                    std::mem::take(&mut chat.rec.queue)
                } else {
                    Vec::new()
                };
                // Subscribed under the lock: the runner records the end of
                // this turn under the same lock and signals after, so it
                // cannot slip by. A running turn has a runner (module
                // invariants).
                let done = chat.rt.as_ref().map(|rt| rt.turns_done.subscribe());
                let running = chat.rec.active_turn.as_ref().map(|t| t.turn_id.clone());
                if running.is_some() && chat.interrupting.is_none() {
                    chat.interrupting = Some("user");
                }
                if running.is_some() || !dropped.is_empty() {
                    chat.changed();
                }
                Ok((chat.rt.clone(), running, dropped, done))
            })
            .await?;
        // File work after the state lock is released.
        for m in &dropped {
            self.inner.attachments.remove(&m.id);
        }
        let dropped = dropped.len();
        if let (Some(turn_id), Some(rt), Some(mut done)) = (running, rt, done) {
            tracing::info!(turn.id = %turn_id, clear_queue, dropped, "interrupting the running turn");
            rt.interrupt.notify_one();
            let ended = async {
                while done.changed().await.is_ok() {
                    let still = self
                        .state()
                        .chats
                        .get(id)
                        .and_then(|s| s.rec.active_turn.as_ref().map(|t| t.turn_id == turn_id));
                    if still != Some(true) {
                        break;
                    }
                }
            };
            if tokio::time::timeout(STOP_WAIT, ended).await.is_err() {
                tracing::warn!("turn still stopping after {STOP_WAIT:?}; answering anyway");
            }
        }
        self.get(id)
    }

    /// Delete a chat: stop its turn, drop its queue, end its provider
    /// session, remove its history, emit `chat.deleted`.
    #[tracing::instrument(skip_all, fields(chat.id = %id))]
    pub async fn delete(&self, id: &str) -> Result<(), ChatError> {
        let (rt, dropped) = self
            .mutate(id, Persist::Await, |chat| {
                if chat.deleting {
                    return Err(ChatError::NotFound(id.to_owned()));
                }
                // Nothing is stored yet: the chat's row is deleted below,
                // once its runner stopped.
                chat.deleting = true;
                if chat.rec.active_turn.is_some() {
                    chat.interrupting = Some("deleted");
                }
                Ok((chat.rt.clone(), std::mem::take(&mut chat.rec.queue)))
            })
            .await?;
        for m in &dropped {
            self.inner.attachments.remove(&m.id);
        }
        // Without a runner nothing of the chat runs: no turn, no process.
        if let Some(rt) = rt {
            rt.stop.cancel();
            rt.interrupt.notify_one();
            if tokio::time::timeout(STOP_WAIT, rt.exited.cancelled())
                .await
                .is_err()
            {
                tracing::warn!("chat runner still stopping after {STOP_WAIT:?}; deleting anyway");
            }
        }
        {
            let mut st = self.state();
            if let Some(slot) = st.chats.remove(id) {
                st.order
                    .remove(&(slot.rec.created_at.clone(), id.to_owned()));
                if let Some(turn) = &slot.rec.active_turn {
                    self.inner.attachments.remove(&turn.message.id);
                }
            }
            st.touch(id);
            self.inner.bus.publish(Some(id), EventKind::ChatDeleted {});
        }
        self.inner.history.remove(id);
        self.persist().await?;
        tracing::info!("chat deleted");
        Ok(())
    }

    /// A page of a chat's history (see [`history::HistoryStore::page`]).
    pub async fn history(
        &self,
        id: &str,
        limit: usize,
        offset: usize,
        raw: bool,
    ) -> Result<Page, ChatError> {
        self.get(id)?;
        let svc = self.clone();
        let id = id.to_owned();
        let limit = limit.min(MAX_HISTORY_LIMIT);
        tokio::task::spawn_blocking(move || svc.inner.history.page(&id, limit, offset, raw))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(ChatError::History)
    }

    /// The bound on agent processes (live and idle counts for `/status`).
    pub fn agent_processes(&self) -> &crate::providers::ProcessPool {
        &self.inner.agent_processes
    }

    /// Engine shutdown: interrupt running turns (their process groups end),
    /// end every provider session, write the final state. Bounded.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.runners.close();
        if tokio::time::timeout(Duration::from_secs(4), self.inner.runners.wait())
            .await
            .is_err()
        {
            tracing::warn!("chat runners still stopping at shutdown");
        }
        self.persist_logged().await;
        tracing::info!("chats stopped");
    }

    /// Whether chat `id` has a runner right now.
    #[cfg(test)]
    fn has_runner(&self, id: &str) -> bool {
        self.state().chats.get(id).is_some_and(|s| s.rt.is_some())
    }

    fn resolve_cwd(&self, cwd: Option<&str>) -> Result<PathBuf, ChatError> {
        let root_cfg = &self.inner.config.workspaces_dir;
        let root = std::fs::canonicalize(root_cfg).unwrap_or_else(|_| root_cfg.clone());
        resolve_cwd(&root, cwd)
    }
}

/// Resolve a requested `cwd` against the (canonical) workspace root:
/// relative paths start at the root; the result is canonical (symlinks and
/// `..` resolved) and must be a directory inside the root.
fn resolve_cwd(root: &Path, cwd: Option<&str>) -> Result<PathBuf, ChatError> {
    let Some(cwd) = cwd else {
        return Ok(root.to_path_buf());
    };
    if cwd.trim().is_empty() {
        return Err(invalid("cwd", "must not be empty"));
    }
    if cwd.contains('\0') {
        return Err(invalid("cwd", "must not contain NUL"));
    }
    // One answer for every failure: a different message for "missing" and
    // "outside" would tell a client which paths exist beyond the root.
    let unusable = || {
        invalid(
            "cwd",
            format!("{cwd:?} is not a directory inside the workspace root"),
        )
    };
    let canon = std::fs::canonicalize(root.join(cwd)).map_err(|_| unusable())?;
    if !canon.starts_with(root) || !canon.is_dir() {
        return Err(unusable());
    }
    Ok(canon)
}

/// A leading `/plan` (alone or followed by whitespace) turns plan mode on
/// and is stripped.
fn strip_plan(text: &str) -> (&str, bool) {
    let t = text.trim_start();
    match t.strip_prefix("/plan") {
        Some(rest) if rest.is_empty() || rest.starts_with(char::is_whitespace) => {
            (rest.trim_start(), true)
        }
        _ => (text, false),
    }
}

/// The image types both CLIs accept.
pub const IMAGE_MEDIA_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/gif", "image/webp"];

/// Anthropic base64 image blocks → provider images; anything else is 400.
fn parse_images(images: &[Value]) -> Result<Vec<Image>, ChatError> {
    images
        .iter()
        .enumerate()
        .map(|(i, block)| {
            let bad = |what: &str| invalid("images", format!("images[{i}]: {what}"));
            if block.get("type").and_then(Value::as_str) != Some("image") {
                return Err(bad("type must be \"image\""));
            }
            let source = block.get("source").ok_or_else(|| bad("missing source"))?;
            if source.get("type").and_then(Value::as_str) != Some("base64") {
                return Err(bad("source.type must be \"base64\""));
            }
            let media_type = source
                .get("media_type")
                .and_then(Value::as_str)
                .filter(|m| IMAGE_MEDIA_TYPES.contains(m))
                .ok_or_else(|| {
                    bad(&format!(
                        "source.media_type must be one of {}",
                        IMAGE_MEDIA_TYPES.join(", ")
                    ))
                })?;
            let data = source
                .get("data")
                .and_then(Value::as_str)
                .filter(|d| !d.is_empty())
                .ok_or_else(|| bad("source.data must be a non-empty base64 string"))?;
            // Checked at the door: a CLI handed bad base64 fails the turn
            // long after the client got its 202.
            if let Err(e) = base64::engine::general_purpose::STANDARD.decode(data) {
                return Err(bad(&format!("source.data is not valid base64 ({e})")));
            }
            Ok(Image {
                media_type: media_type.to_owned(),
                data_base64: data.to_owned(),
            })
        })
        .collect()
}

/// Milliseconds from an RFC 3339 timestamp until now (0 if unparsable).
fn millis_since(ts: &str) -> u64 {
    chrono::DateTime::parse_from_rfc3339(ts)
        .map(|t| {
            (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
                .num_milliseconds()
                .max(0) as u64
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain text message.
    fn text(t: &str) -> NewMessage {
        NewMessage {
            text: t.into(),
            ..NewMessage::default()
        }
    }

    #[test]
    fn plan_prefix() {
        assert_eq!(strip_plan("/plan fix it"), ("fix it", true));
        assert_eq!(strip_plan("  /plan\n\nfix"), ("fix", true));
        assert_eq!(strip_plan("/plan"), ("", true));
        assert_eq!(strip_plan("/planet x"), ("/planet x", false));
        assert_eq!(strip_plan("do /plan"), ("do /plan", false));
    }

    #[test]
    fn cwd_must_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ws");
        std::fs::create_dir_all(root.join("api/src")).unwrap();
        std::fs::create_dir_all(dir.path().join("outside")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside"), root.join("escape")).unwrap();
        std::fs::write(root.join("file"), "").unwrap();
        let root = std::fs::canonicalize(&root).unwrap();

        assert_eq!(resolve_cwd(&root, None).unwrap(), root);
        assert_eq!(resolve_cwd(&root, Some("api")).unwrap(), root.join("api"));
        assert_eq!(
            resolve_cwd(&root, Some(root.join("api/src/..").to_str().unwrap())).unwrap(),
            root.join("api")
        );
        for bad in [
            "..",
            "api/../../outside",
            "escape",
            "/etc",
            "file",
            "missing",
            "",
            "/",
        ] {
            assert!(
                matches!(
                    resolve_cwd(&root, Some(bad)),
                    Err(ChatError::Invalid { field: "cwd", .. })
                ),
                "{bad}"
            );
        }
        // An existing and a missing path outside the root get the same
        // message (apart from the echoed input): no existence oracle.
        let message = |p: &str| match resolve_cwd(&root, Some(p)) {
            Err(e) => e.to_string().replace(p, "<cwd>"),
            Ok(_) => panic!("{p} accepted"),
        };
        assert_eq!(message("/etc"), message("/no/such/dir"));
        assert_eq!(message("../../../etc"), message("../../../nonexistent"));
    }

    /// Start hooks gate turns: messages queue with `waiting_for_hooks`
    /// until the watch flips, then run in order; the seams are called.
    #[tokio::test]
    async fn turns_wait_for_start_hooks() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join("workspaces")).unwrap();
        let mut config = Config::for_home(home.path(), "s");
        config.claude_bin = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/bin/fake-claude"
        )
        .into();
        let config = Arc::new(config);
        let bus = EventBus::open(&config.paths.events_file, 1 << 20).unwrap();
        let (hooks_tx, hooks_rx) = watch::channel(false);
        let turns_ended = Arc::new(AtomicUsize::new(0));
        let prompts_asked = Arc::new(AtomicUsize::new(0));
        let deps = ChatDeps {
            hooks_done: hooks_rx,
            system_prompt: {
                let n = prompts_asked.clone();
                Arc::new(move |_| {
                    n.fetch_add(1, Ordering::SeqCst);
                    Some("be brief".into())
                })
            },
            after_turn: {
                let n = turns_ended.clone();
                Arc::new(move |_| {
                    n.fetch_add(1, Ordering::SeqCst);
                })
            },
            on_auth_failure: Arc::new(|_| {}),
        };
        let svc = ChatService::new(config, bus, deps).unwrap();
        let chat = svc
            .create(NewChat {
                provider: "claude".into(),
                ..NewChat::default()
            })
            .await
            .unwrap();
        let a = svc.send(&chat.id, text("one")).await.unwrap();
        let b = svc.send(&chat.id, text("two")).await.unwrap();
        assert_eq!((a.status, a.position, b.position), (Delivery::Queued, 1, 2));
        let c = svc.get(&chat.id).unwrap();
        assert_eq!(c.status, ChatStatus::WaitingForHooks);
        assert!(c.processing);
        assert_eq!(svc.counts().queued_messages, 2);

        hooks_tx.send(true).unwrap();
        wait_until("turns never ran", || {
            turns_ended.load(Ordering::SeqCst) >= 2
        })
        .await;
        let c = svc.get(&chat.id).unwrap();
        assert_eq!(c.status, ChatStatus::Idle);
        assert_eq!(c.last_turn.unwrap().outcome, Outcome::Completed);
        assert_eq!(prompts_asked.load(Ordering::SeqCst), 2);
        assert_eq!(user_messages(&svc, &chat.id).await, ["one", "two"]);
        svc.shutdown().await;
    }

    /// A config on a temp home whose codex is the fake `codex exec` (one
    /// process per turn, none kept between turns).
    fn codex_exec_config(home: &Path) -> Arc<Config> {
        std::fs::create_dir_all(home.join("workspaces")).unwrap();
        let mut config = Config::for_home(home, "s");
        config.codex_bin =
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bin/fake-codex").into();
        config.codex_app_server = false;
        Arc::new(config)
    }

    fn codex_chat() -> NewChat {
        NewChat {
            provider: "codex".into(),
            ..NewChat::default()
        }
    }

    /// The texts of the chat's `user_message` history items, in order.
    async fn user_messages(svc: &ChatService, id: &str) -> Vec<String> {
        let page = svc.history(id, 100, 0, false).await.unwrap();
        page.items
            .into_iter()
            .filter(|i| i.kind == model::ItemKind::UserMessage)
            .map(|i| i.text)
            .collect()
    }

    async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A chat without work has no runner; interrupting and deleting it
    /// answer at once. A message starts a runner, which leaves once the
    /// turn is over (no agent process is kept by `codex exec`).
    #[tokio::test]
    async fn runners_start_with_work_and_leave_when_idle() {
        let home = tempfile::tempdir().unwrap();
        let config = codex_exec_config(home.path());
        let bus = EventBus::open(&config.paths.events_file, 1 << 20).unwrap();
        let svc = ChatService::new(config, bus, ChatDeps::standalone()).unwrap();
        let a = svc.create(codex_chat()).await.unwrap();
        let b = svc.create(codex_chat()).await.unwrap();
        assert!(!svc.has_runner(&a.id) && !svc.has_runner(&b.id));

        let started = std::time::Instant::now();
        let chat = svc.interrupt(&a.id, true).await.unwrap();
        assert_eq!(chat.status, ChatStatus::Idle);
        svc.delete(&a.id).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(svc.get(&a.id), Err(ChatError::NotFound(_))));

        let sent = svc.send(&b.id, text("hi")).await.unwrap();
        assert_eq!(sent.status, Delivery::Sent);
        wait_until("the turn never ended and its runner never left", || {
            svc.get(&b.id).unwrap().last_turn.is_some() && !svc.has_runner(&b.id)
        })
        .await;
        assert_eq!(
            svc.get(&b.id).unwrap().last_turn.unwrap().outcome,
            Outcome::Completed
        );
        // A second message starts a new runner; the turn resumes the thread.
        svc.send(&b.id, text("again")).await.unwrap();
        wait_until("the second turn never ended", || {
            let c = svc.get(&b.id).unwrap();
            c.status == ChatStatus::Idle && c.last_turn.unwrap().turn_id != sent.message_id
        })
        .await;
        let page = svc.history(&b.id, 100, 0, false).await.unwrap();
        let texts: Vec<&str> = page.items.iter().map(|i| i.text.as_str()).collect();
        assert!(
            texts.iter().any(|t| t.contains("turn=2")),
            "the second turn did not resume the thread: {texts:?}"
        );
        svc.delete(&b.id).await.unwrap();
        svc.shutdown().await;
    }

    /// Messages queued when the engine stopped (here: waiting for start
    /// hooks) run after a restart: only such chats get a runner at boot.
    #[tokio::test]
    async fn queued_messages_run_after_a_restart() {
        let home = tempfile::tempdir().unwrap();
        let config = codex_exec_config(home.path());
        let (busy, idle) = {
            let bus = EventBus::open(&config.paths.events_file, 1 << 20).unwrap();
            let (_hooks_tx, hooks_rx) = watch::channel(false);
            let deps = ChatDeps {
                hooks_done: hooks_rx,
                ..ChatDeps::standalone()
            };
            let svc = ChatService::new(config.clone(), bus, deps).unwrap();
            let busy = svc.create(codex_chat()).await.unwrap();
            let idle = svc.create(codex_chat()).await.unwrap();
            for t in ["one", "two"] {
                let a = svc.send(&busy.id, text(t)).await.unwrap();
                assert_eq!(a.status, Delivery::Queued);
            }
            svc.shutdown().await;
            (busy.id, idle.id)
        };
        let bus = EventBus::open(&config.paths.events_file, 1 << 20).unwrap();
        let svc = ChatService::new(config, bus, ChatDeps::standalone()).unwrap();
        assert!(!svc.has_runner(&idle));
        wait_until("the queued messages never ran", || {
            let c = svc.get(&busy).unwrap();
            c.queue.is_empty() && c.status == ChatStatus::Idle && !svc.has_runner(&busy)
        })
        .await;
        assert_eq!(user_messages(&svc, &busy).await, ["one", "two"]);
        svc.shutdown().await;
    }

    #[test]
    fn images_are_validated() {
        let ok: Value = serde_json::json!({"type":"image","source":{"type":"base64","media_type":"image/png","data":"aGk="}});
        assert_eq!(parse_images(std::slice::from_ref(&ok)).unwrap().len(), 1);
        let source = |media: &str, data: &str| serde_json::json!({"type":"image","source":{"type":"base64","media_type":media,"data":data}});
        for (bad, says) in [
            (
                serde_json::json!({"type":"image","source":{"type":"url","url":"x"}}),
                "source.type",
            ),
            (source("image/svg+xml", "aGk="), "source.media_type"),
            (source("text/plain", "aGk="), "source.media_type"),
            (source("image/png", "not base64!"), "source.data"),
            (source("image/png", "aGk"), "source.data"),
            (source("image/png", ""), "source.data"),
        ] {
            match parse_images(&[ok.clone(), bad.clone()]) {
                Err(ChatError::Invalid {
                    field: "images",
                    message,
                }) => {
                    assert!(
                        message.starts_with("images[1]: ") && message.contains(says),
                        "{bad}: {message}"
                    )
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        for media in IMAGE_MEDIA_TYPES {
            assert!(parse_images(&[source(media, "aGk=")]).is_ok());
        }
    }
}
