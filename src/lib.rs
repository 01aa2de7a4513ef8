//! Replicas Engine: the daemon inside every workspace VM. A tour, one line
//! per module:
//!
//! - [`chats`]: the chat registry, message queues and turns (per-chat runner), history files, restart recovery.
//! - [`config`]: environment → validated [`config::Config`]; every path from one home ([`config::Paths`]).
//! - [`app`]: [`app::AppState`] (service handles), `build()`, and `run(state, listener)`.
//! - [`http`]: the only module that knows HTTP: router, layers, auth, error shape, one file per resource.
//! - [`events`]: the typed `EngineEvent`, the gapless bus, the bounded JSONL journal.
//! - [`process`]: every subprocess: own process group, parent-death signal, TERM→KILL of the group.
//! - [`providers`]: the agent CLIs (claude, codex) run headless per chat: command building, line parsers, turn supervision.
//! - [`util`]: timestamps, ids, atomic file writes.

pub mod app;
pub mod chats;
pub mod config;
pub mod events;
pub mod http;
pub mod process;
pub mod providers;
pub mod util;
