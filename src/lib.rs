//! Replicas Engine: the daemon inside every workspace VM. A tour, one line
//! per module:
//!
//! - [`chats`]: the chat registry, message queues and turns (per-chat runner), history files, restart recovery.
//! - [`config`]: environment → validated [`config::Config`]; every path from one home ([`config::Paths`]).
//! - [`app`]: [`app::AppState`] (service handles), `build()`, and `run(state, listener)`.
//! - [`http`]: the only module that knows HTTP: router, layers, auth, error shape, one file per resource.
//! - [`events`]: the typed `EngineEvent`, the gapless bus, the bounded JSONL journal.
//! - [`repos`]: repos under the workspace root: git status, diffs, PR URL, repo events; the replicas config.
//! - [`hooks`]: start hooks (once per workspace, in the background), `/hooks/status`, `warm`.
//! - [`process`]: every subprocess: own process group, parent-death signal, TERM→KILL of the group.
//! - [`providers`]: the agent CLIs (claude, codex) run headless per chat: command building, line parsers, turn supervision.
//! - [`readiness`]: `/health`'s answer, remembered once the readiness file exists.
//! - [`util`]: timestamps, ids, atomic file writes.
//! - [`plans`]: plan files from `~/.claude/plans` and `~/.replicas/plans`, with path-escape checks.
//! - [`upstream`]: the backend client, durable ordered webhooks, credential refresh managers.

pub mod app;
pub mod chats;
pub mod config;
pub mod events;
pub mod hooks;
pub mod http;
pub mod plans;
pub mod process;
pub mod providers;
pub mod readiness;
pub mod repos;
pub mod upstream;
pub mod util;
