//! One task per chat with work: take the next message, run it as a turn
//! through the chat's [`ProviderSession`], stream what it produces, record
//! how it ended. It exits when the chat has no work left and the session
//! keeps no agent process (a later message starts a new runner, whose
//! session resumes the provider session as after a restart).
//!
//! The runner is the only writer of a chat's turn state after a message was
//! taken, so turn events of one chat are naturally ordered. Interrupt,
//! delete and engine shutdown reach it through [`Runtime`] (a `Notify` plus
//! the `stop` token); it then asks the provider to stop and keeps draining
//! the turn's events until `Finished`, which the provider sends only once
//! the processes are gone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::events::{ErrorBody, EventKind, RawJson, TurnDelta};
use crate::providers::{self, ProviderEvent, ProviderSession, SessionConfig, TurnInput};
use crate::util::{new_id, now_ts};

use super::model::{ActiveTurn, HistoryItem, ItemKind, LastTurn, Outcome};
use super::mutate::Persist;
use super::{ChatService, Runtime};

enum Next {
    /// Run this turn: one a `sent` answer put in place, or one just taken
    /// off the queue (persisted before [`ChatService::take_next`] returns).
    Start(ActiveTurn),
    Wait,
    /// Nothing to do and nothing to keep: the runner was detached from the
    /// chat (under the lock) and exits.
    Idle,
    Gone,
}

/// What the turn needs from the record, read once at its start.
struct TurnContext {
    provider: providers::ProviderKind,
    cwd: std::path::PathBuf,
    chat_model: Option<String>,
    session_id: Option<String>,
    codex_thread_usage: Option<providers::Usage>,
}

pub(super) async fn drive(svc: ChatService, id: String, rt: Arc<Runtime>) {
    let mut session: Option<ProviderSession> = None;
    let mut hooks = svc.inner.deps.hooks_done.clone();
    // If whoever owns the hooks went away without saying "done", waiting
    // forever would wedge every chat; treat it as done.
    let mut hooks_gone = false;
    // While the session keeps an agent process the runner stays (it owns
    // the session); it looks again after the pool's idle timeout, by which
    // the process has been stopped.
    let recheck = svc.inner.config.provider_idle + std::time::Duration::from_secs(1);
    loop {
        if rt.stop.is_cancelled() {
            break;
        }
        let hooks_done = hooks_gone || *hooks.borrow_and_update();
        let keep = session.as_ref().is_some_and(|s| s.has_idle_process());
        match svc.take_next(&id, &rt, hooks_done, keep).await {
            Next::Gone | Next::Idle => break,
            Next::Start(turn) => run_turn(&svc, &id, &rt, turn, &mut session).await,
            Next::Wait => {
                tokio::select! {
                    _ = rt.wake.notified() => {}
                    changed = hooks.changed(), if !hooks_done => {
                        if changed.is_err() {
                            tracing::warn!(chat.id = %id, "start hooks status went away; no longer waiting for hooks");
                            hooks_gone = true;
                        }
                    }
                    _ = rt.stop.cancelled() => break,
                    _ = tokio::time::sleep(recheck), if keep => {}
                }
            }
        }
    }
    if let Some(s) = session.as_mut() {
        s.shutdown().await;
    }
    tracing::debug!(chat.id = %id, "chat runner stopped");
}

impl ChatService {
    /// The turn to run next, if any: the one a `sent` answer put in place,
    /// else the head of the queue once hooks are done. With no work and
    /// nothing to `keep` (an agent process), the runner `rt` is detached
    /// from the chat here, under the lock `send` takes to decide whether to
    /// start a runner, so a message never finds a runner that is leaving.
    async fn take_next(&self, id: &str, rt: &Arc<Runtime>, hooks_done: bool, keep: bool) -> Next {
        let shutting_down = self.inner.shutdown.is_cancelled();
        self.mutate(id, Persist::AwaitLogged, |chat| {
            if chat.deleting {
                return Ok(Next::Gone);
            }
            if shutting_down {
                return Ok(Next::Wait);
            }
            if let Some(t) = &chat.rec.active_turn {
                return Ok(Next::Start(t.clone()));
            }
            if chat.rec.queue.is_empty() && !keep {
                if chat.rt.as_ref().is_some_and(|r| Arc::ptr_eq(r, rt)) {
                    chat.rt = None;
                }
                return Ok(Next::Idle);
            }
            if !hooks_done || chat.rec.queue.is_empty() {
                return Ok(Next::Wait);
            }
            let message = chat.rec.queue.remove(0);
            let turn = ActiveTurn {
                turn_id: new_id("t"),
                message,
                started_at: now_ts(),
                pgid: None,
                start_time: None,
            };
            chat.rec.active_turn = Some(turn.clone());
            chat.changed();
            Ok(Next::Start(turn))
        })
        .await
        // An error only says there is no such chat.
        .unwrap_or(Next::Gone)
    }

    fn turn_context(&self, id: &str) -> Option<TurnContext> {
        let st = self.state();
        let rec = &st.chats.get(id)?.rec;
        Some(TurnContext {
            provider: rec.provider,
            cwd: rec.cwd.clone(),
            chat_model: rec.model.clone(),
            session_id: rec.provider_session_id.clone(),
            codex_thread_usage: rec.codex_thread_usage,
        })
    }

    /// Why this chat's turn is being stopped, if anyone asked.
    fn interrupt_reason(&self, id: &str) -> Option<&'static str> {
        self.state().chats.get(id).and_then(|s| s.interrupting)
    }

    /// Mark the turn as stopping for `reason` unless someone already did.
    async fn mark_interrupting(&self, id: &str, reason: &'static str) {
        let _ = self
            .mutate(id, Persist::Background, |chat| {
                if chat.interrupting.is_none() {
                    chat.interrupting = Some(reason);
                    chat.shown();
                }
                Ok(())
            })
            .await;
    }

    /// Record the spawned process group so a later engine can end it.
    /// Written in the background: the first lines need not wait for the
    /// fsync; until it lands a crash leaves the turn looking unstarted (requeued), and its
    /// process dies with the engine (parent-death signal).
    async fn record_process(&self, id: &str, turn_id: &str, pgid: u32, start_time: Option<u64>) {
        let _ = self
            .mutate(id, Persist::Background, |chat| {
                if let Some(t) = chat
                    .rec
                    .active_turn
                    .as_mut()
                    .filter(|t| t.turn_id == turn_id)
                {
                    t.pgid = Some(pgid);
                    t.start_time = start_time;
                    chat.stored();
                }
                Ok(())
            })
            .await;
    }

    async fn record_session_id(&self, id: &str, session_id: &str) {
        let _ = self
            .mutate(id, Persist::AwaitLogged, |chat| {
                if chat.rec.provider_session_id.as_deref() != Some(session_id) {
                    chat.rec.provider_session_id = Some(session_id.to_owned());
                    chat.changed();
                }
                Ok(())
            })
            .await;
    }

    fn append_history(&self, id: &str, item: &HistoryItem) {
        if let Err(e) = self.inner.history.append(id, item) {
            tracing::error!(chat.id = %id, error = %e, "could not append to the chat history");
        }
    }

    /// Store an item and stream it. The item is serialized once: the
    /// `chat.turn.delta` carries that JSON as is, and the history line is
    /// the same text with `,"raw":…` spliced in before the closing brace
    /// (`raw` is the last field of [`HistoryItem`]; it is served by
    /// `?raw=true` history only, not streamed).
    ///
    /// `defer` lets the history line wait for [`HistoryStore::flush`] (more
    /// provider lines are already queued); the event is journaled at once.
    ///
    /// [`HistoryStore::flush`]: super::history::HistoryStore::flush
    fn publish_item(&self, id: &str, turn_id: &str, mut item: HistoryItem, defer: bool) {
        let raw = item.raw.take();
        let wire = RawJson::from_serialize(&item).expect("history item serializes");
        let json = wire.get().as_bytes();
        let raw_len = raw.as_ref().map_or(0, |r| r.get().len() + 7);
        let mut line = Vec::with_capacity(json.len() + raw_len + 1);
        line.extend_from_slice(json);
        if let Some(raw) = &raw {
            // `json` ends with the object's `}`.
            line.pop();
            line.extend_from_slice(b",\"raw\":");
            line.extend_from_slice(raw.get().as_bytes());
            line.push(b'}');
        }
        line.push(b'\n');
        if let Err(e) = self.inner.history.append_line(
            id,
            &item.id,
            item.kind == ItemKind::UserMessage,
            &line,
            defer,
        ) {
            tracing::error!(chat.id = %id, error = %e, "could not append to the chat history");
        }
        self.inner.bus.publish(
            Some(id),
            EventKind::TurnDelta(TurnDelta::Item {
                turn_id: turn_id.to_owned(),
                item: wire,
            }),
        );
    }

    /// Record how a turn ended: `lastTurn`, usage, events. The caller has
    /// observed the provider's `Finished` (processes gone). Written in the
    /// background so the next message starts without waiting for the
    /// fsync.
    async fn finish_turn(
        &self,
        id: &str,
        turn: &ActiveTurn,
        result: &providers::TurnResult,
        thread_usage: Option<providers::Usage>,
        duration_ms: u64,
    ) {
        let (outcome, error) = match &result.outcome {
            providers::Outcome::Completed => (Outcome::Completed, None),
            providers::Outcome::Failed { code, message } => (
                Outcome::Failed,
                Some(ErrorBody {
                    code: code.clone(),
                    message: message.clone(),
                }),
            ),
            providers::Outcome::Interrupted => (Outcome::Interrupted, None),
        };
        let kind = match outcome {
            Outcome::Interrupted => EventKind::ChatInterrupted {
                turn_id: turn.turn_id.clone(),
                duration_ms,
            },
            _ => EventKind::TurnCompleted {
                turn_id: turn.turn_id.clone(),
                outcome,
                usage: result.usage,
                duration_ms,
                error: error.clone(),
            },
        };
        let _ = self
            .mutate(id, Persist::Background, |chat| {
                let reason = match outcome {
                    Outcome::Interrupted => {
                        Some(chat.interrupting.unwrap_or("provider").to_owned())
                    }
                    _ => None,
                };
                let now = now_ts();
                chat.rec.active_turn = None;
                chat.interrupting = None;
                chat.rec.usage.add(&result.usage);
                if thread_usage.is_some() {
                    chat.rec.codex_thread_usage = thread_usage;
                }
                chat.changed_at(now.clone());
                chat.rec.last_turn = Some(LastTurn {
                    turn_id: turn.turn_id.clone(),
                    outcome,
                    finished_at: now,
                    reason,
                    error,
                });
                self.inner.bus.publish(Some(id), kind);
                crate::metrics::turn_finished(
                    chat.rec.provider.as_str(),
                    outcome.as_str(),
                    std::time::Duration::from_millis(duration_ms),
                );
                Ok(())
            })
            .await;
    }
}

#[tracing::instrument(skip_all, fields(chat.id = %id, turn.id = %turn.turn_id))]
async fn run_turn(
    svc: &ChatService,
    id: &str,
    rt: &Runtime,
    turn: ActiveTurn,
    session: &mut Option<ProviderSession>,
) {
    let started = Instant::now();
    let inner = &svc.inner;
    let Some(ctx) = svc.turn_context(id) else {
        return;
    };
    let msg = &turn.message;
    svc.append_history(
        id,
        &HistoryItem {
            id: new_id("i"),
            turn_id: turn.turn_id.clone(),
            ts: now_ts(),
            kind: ItemKind::UserMessage,
            text: msg.text.clone(),
            tool: None,
            raw: None,
        },
    );
    inner.bus.publish(
        Some(id),
        EventKind::TurnStarted {
            turn_id: turn.turn_id.clone(),
            message_id: msg.id.clone(),
        },
    );
    tracing::info!(message.id = %msg.id, "turn started");

    let result = if svc.interrupt_reason(id).is_some() || rt.stop.is_cancelled() {
        // Interrupted (or deleted) before its process was spawned.
        if svc.interrupt_reason(id).is_none() {
            svc.mark_interrupting(id, "engine_shutdown").await;
        }
        providers::TurnResult {
            outcome: providers::Outcome::Interrupted,
            usage: providers::Usage::default(),
        }
    } else {
        let sess = session.get_or_insert_with(|| {
            let bin = match ctx.provider {
                providers::ProviderKind::Claude => &inner.config.claude_bin,
                providers::ProviderKind::Codex => &inner.config.codex_bin,
            };
            let mut cfg = SessionConfig::new(ctx.provider, bin, &ctx.cwd);
            cfg.resume_session_id = ctx.session_id.clone();
            cfg.turn_timeout = inner.config.turn_timeout;
            cfg.codex_thread_usage = ctx.codex_thread_usage;
            cfg.pool = Some(inner.agent_processes.clone());
            cfg.codex_app_server = inner.config.codex_app_server;
            cfg.bedrock_credentials =
                Some(inner.config.paths.claude_bedrock_credentials_file.clone());
            ProviderSession::new(cfg)
        });
        let images = if msg.images > 0 {
            inner.attachments.get(&msg.id)
        } else {
            Vec::new()
        };
        let input = TurnInput {
            prompt: msg.text.clone(),
            model: msg.model.clone().or(ctx.chat_model.clone()),
            plan_mode: msg.plan_mode,
            thinking_level: msg.thinking_level.map(|l| l.as_str().to_owned()),
            images,
            system_prompt: system_prompt(&inner.deps.system_prompt, &ctx.cwd).await,
        };
        match sess.start_turn(input).await {
            Err(e) => {
                tracing::warn!(error = %e, "provider could not start the turn");
                providers::TurnResult {
                    outcome: providers::Outcome::Failed {
                        code: e.code().to_owned(),
                        message: e.to_string(),
                    },
                    usage: providers::Usage::default(),
                }
            }
            Ok(running) => {
                let result = stream_turn(svc, id, rt, &turn, &ctx, running).await;
                // Items deferred while lines were queued reach the file
                // before the turn is recorded as ended.
                if let Err(e) = inner.history.flush(id) {
                    tracing::error!(chat.id = %id, error = %e, "could not append to the chat history");
                }
                result
            }
        }
    };

    if let providers::Outcome::Failed { code, message } = &result.outcome {
        tracing::warn!(code = %code, error = %message, "turn failed");
        svc.publish_item(
            id,
            &turn.turn_id,
            HistoryItem {
                id: new_id("i"),
                turn_id: turn.turn_id.clone(),
                ts: now_ts(),
                kind: ItemKind::Error,
                text: message.clone(),
                tool: None,
                raw: None,
            },
            false,
        );
    }
    // The images are gone before the chat reads idle: a client that sees
    // the turn end finds no attachment left behind.
    if msg.images > 0 {
        inner.attachments.remove(&msg.id);
    }
    let duration_ms = started.elapsed().as_millis() as u64;
    let thread_usage = session.as_ref().and_then(|s| s.codex_thread_usage());
    svc.finish_turn(id, &turn, &result, thread_usage, duration_ms)
        .await;
    rt.turns_done.send_modify(|n| *n += 1);
    tracing::info!(outcome = ?result.outcome, duration_ms, "turn finished");
    (inner.deps.after_turn)(&ctx.cwd);
}

/// Drain a running turn's events until `Finished`, forwarding items and
/// text, and stopping it when asked.
async fn stream_turn(
    svc: &ChatService,
    id: &str,
    rt: &Runtime,
    turn: &ActiveTurn,
    ctx: &TurnContext,
    mut running: providers::RunningTurn,
) -> providers::TurnResult {
    let inner = &svc.inner;
    svc.record_process(id, &turn.turn_id, running.pgid, running.start_time)
        .await;
    let interrupter = running.interrupter();
    let mut stopping = false;
    // History lines are waiting for the queue to run dry.
    let mut deferred = false;
    // Provider item key → our item id, so an updated item and the text
    // streamed for it carry the id of the item they belong to.
    let mut item_ids: HashMap<String, String> = HashMap::new();
    let mut item_id = |key: Option<&str>| match key {
        Some(k) => item_ids
            .entry(k.to_owned())
            .or_insert_with(|| new_id("i"))
            .clone(),
        None => new_id("i"),
    };
    loop {
        tokio::select! {
            ev = running.events.recv() => match ev {
                None => {
                    // The provider's contract says Finished always comes;
                    // be safe if it does not.
                    return providers::TurnResult {
                        outcome: providers::Outcome::Failed {
                            code: "exited".into(),
                            message: "the provider ended the turn without a result".into(),
                        },
                        usage: providers::Usage::default(),
                    };
                }
                Some(ProviderEvent::Finished(result)) => return result,
                Some(ProviderEvent::Item(item)) => {
                    let hi = HistoryItem {
                        id: item_id(item.key.as_deref()),
                        turn_id: turn.turn_id.clone(),
                        ts: now_ts(),
                        kind: item.kind,
                        text: item.text.unwrap_or_default(),
                        tool: item.tool,
                        raw: item.raw,
                    };
                    // While more lines are already queued, the history
                    // write waits for them (one write per burst); the
                    // flush comes when the queue runs dry.
                    let more = !running.events.is_empty();
                    svc.publish_item(id, &turn.turn_id, hi, more);
                    deferred = more;
                }
                Some(ProviderEvent::TextDelta { item_key, text }) => {
                    inner.bus.publish(
                        Some(id),
                        EventKind::TurnDelta(TurnDelta::Text {
                            turn_id: turn.turn_id.clone(),
                            item_id: item_id(Some(&item_key)),
                            text_delta: text,
                        }),
                    );
                }
                Some(ProviderEvent::SessionId(sid)) => svc.record_session_id(id, &sid).await,
                Some(ProviderEvent::AuthFailure { message }) => {
                    tracing::warn!(provider = ctx.provider.as_str(), "provider reported an authentication failure");
                    inner.bus.publish(
                        None,
                        EventKind::Error {
                            code: "auth_expired".into(),
                            message: format!("{} authentication failed: {message}", ctx.provider.as_str()),
                            source: ctx.provider.as_str().to_owned(),
                        },
                    );
                    (inner.deps.on_auth_failure)(ctx.provider);
                }
            },
            _ = rt.interrupt.notified(), if !stopping => {
                // A stale wake-up from an earlier turn carries no reason.
                if svc.interrupt_reason(id).is_some() {
                    stopping = true;
                    let i = interrupter.clone();
                    tokio::spawn(async move { i.interrupt().await });
                }
            }
            _ = rt.stop.cancelled(), if !stopping => {
                svc.mark_interrupting(id, "engine_shutdown").await;
                stopping = true;
                let i = interrupter.clone();
                tokio::spawn(async move { i.interrupt().await });
            }
        }
        if deferred && running.events.is_empty() {
            deferred = false;
            if let Err(e) = inner.history.flush(id) {
                tracing::error!(chat.id = %id, error = %e, "could not append to the chat history");
            }
        }
    }
}

/// The repo `systemPrompt` for `cwd`, read on the blocking pool (it reads
/// repo files) and given up after a few seconds: a turn never waits long on
/// a file system.
async fn system_prompt(f: &super::SystemPromptFn, cwd: &std::path::Path) -> Option<String> {
    let (f, cwd) = (f.clone(), cwd.to_path_buf());
    let read = tokio::task::spawn_blocking(move || f(&cwd));
    match tokio::time::timeout(std::time::Duration::from_secs(10), read).await {
        Ok(Ok(prompt)) => prompt,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "reading the repo systemPrompt failed");
            None
        }
        Err(_) => {
            tracing::warn!("reading the repo systemPrompt timed out; the turn runs without it");
            None
        }
    }
}
