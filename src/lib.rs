//! Replicas Engine: the daemon inside every workspace VM. A tour, one line
//! per module:
//!
//! - [`chats`]: the chat registry (every change through one `mutate`: bump, stamp, `chat.updated`, write), message queues and turns (a runner per chat with work), history files, restart recovery.
//! - [`config`]: environment → validated [`config::Config`]; every path from one home ([`config::Paths`]).
//! - [`app`]: [`app::AppState`] (service handles) and `build()`; knows no HTTP.
//! - [`http`]: builds the router from an `AppState`: layers, auth, one file per resource; `http/error.rs` turns every domain error into a status and the error shape, in one place.
//! - [`server`]: `run(state, listener)` wires `app` and `http` over a bounded accept loop (header timeout, connection cap); `server → http → app`, never back.
//! - [`events`]: the typed `EngineEvent` (each type's name and payload declared once, in `EventKind`; `EventType` says which are webhooks), the gapless bus, the bounded JSONL journal.
//! - [`repos`]: repos under the workspace root: git status, diffs, PR URL, repo events; the replicas config.
//! - [`hooks`]: start hooks (once per workspace, in the background), `/hooks/status`, `warm`.
//! - [`process`]: every subprocess: allow-listed environment, own process group ([`process::Group`]), parent-death signal, TERM→KILL of the group, the `/proc` reader.
//! - [`providers`]: the agent CLIs (claude, codex exec/app-server) run headless per chat: one folder per CLI, one turn driver, the agent-process bound.
//! - [`doctor`]: `replicas-engine doctor`: checks a machine can run the engine.
//! - [`metrics`]: Prometheus series: recorded counters/histograms and gauges sampled at scrape time.
//! - [`readiness`]: `/health`'s answer, remembered once the readiness file exists.
//! - [`status`]: the `/status` body, borrowed for the route and owned in `engine.status.changed`.
//! - [`util`]: timestamps, ids, atomic file writes, private (0600/0700) state files.
//! - [`plans`]: plan files from `~/.claude/plans` and `~/.replicas/plans`, with path-escape checks.
//! - [`upstream`]: the backend client, durable ordered webhooks, credential refresh managers.

pub mod app;
pub mod chats;
pub mod config;
pub mod doctor;
pub mod events;
pub mod hooks;
pub mod http;
pub mod metrics;
pub mod plans;
pub mod process;
pub mod providers;
pub mod readiness;
pub mod repos;
pub mod server;
pub mod status;
pub mod upstream;
pub mod util;

#[cfg(test)]
pub(crate) mod testing;
