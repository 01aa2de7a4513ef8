//! Application wiring: [`AppState`] holds a cheap-to-clone handle to every
//! service; [`AppState::build`] loads persisted state and starts background
//! work; [`run`] serves HTTP on a bound listener until `shutdown` fires,
//! then ends streams and returns. `main` and the tests both call `run`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use chrono::{DateTime, Utc};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::chats::{ChatDeps, ChatService};
use crate::config::Config;
use crate::events::{EventBus, EventKind};
use crate::hooks::HookService;
use crate::repos::RepoService;
use crate::upstream::Upstream;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub bus: EventBus,
    /// Webhooks and credential refresh (inert without `MONOLITH_URL`).
    pub upstream: Upstream,
    pub chats: ChatService,
    pub started_at: DateTime<Utc>,
    pub started: Instant,
    /// Cancelled when the engine begins shutting down; long-lived work (SSE
    /// streams, turn runners, hooks) watches it.
    pub shutdown: CancellationToken,
    pub repos: RepoService,
    pub hooks: HookService,
}

impl AppState {
    /// Load persisted state and start the services. Publishes
    /// `engine.ready` once everything is loaded.
    pub async fn build(config: Config, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        let paths = &config.paths;
        std::fs::create_dir_all(&paths.engine_dir)
            .with_context(|| format!("creating {}", paths.engine_dir.display()))?;
        let bus = EventBus::open(&paths.events_file, config.events_max_bytes)
            .with_context(|| format!("opening {}", paths.events_file.display()))?;
        let upstream = Upstream::start(&config, &bus, shutdown.clone())?;
        let hooks = HookService::new(config.clone(), bus.clone());
        let repos = RepoService::new(&config, bus.clone(), {
            let hooks = hooks.clone();
            Arc::new(move |repo: &str| hooks.repo_completed(repo))
        });
        let chats = ChatService::new(
            config.clone(),
            bus.clone(),
            chat_deps(&config, &hooks, &repos, &upstream),
        );
        let state = Self {
            repos,
            hooks,
            config,
            bus,
            upstream,
            chats,
            started_at: Utc::now(),
            started: Instant::now(),
            shutdown,
        };
        state.bus.publish(
            None,
            EventKind::EngineReady {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
            },
        );
        // Background work: discover repos (publishes `repo.discovered`) and
        // run start hooks; the engine serves meanwhile.
        tokio::spawn({
            let repos = state.repos.clone();
            async move { repos.refresh().await }
        });
        state
            .hooks
            .start(state.repos.clone(), state.shutdown.clone());
        Ok(state)
    }
}

/// Serve until `state.shutdown` is cancelled: stop accepting, end SSE
/// streams (they watch the same token), let in-flight requests finish.
pub async fn run(state: AppState, listener: TcpListener) -> anyhow::Result<()> {
    let shutdown = state.shutdown.clone();
    // Running turns start stopping at once, while HTTP drains.
    let chats = {
        let (chats, shutdown) = (state.chats.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            chats.shutdown().await;
        })
    };
    let app = crate::http::router(state.clone());
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("HTTP server failed");
    tracing::info!("HTTP server stopped");
    state.shutdown.cancel();
    let _ = chats.await;
    served
}

/// How chats reach the other services: turns wait for start hooks, agents
/// get the repo's `systemPrompt`, repos are re-checked after every turn (a
/// turn may have switched branch or edited files), and an auth failure
/// triggers a credential refresh.
fn chat_deps(
    config: &Config,
    hooks: &HookService,
    repos: &RepoService,
    upstream: &Upstream,
) -> ChatDeps {
    let root = config.workspaces_dir.clone();
    let repos = repos.clone();
    let upstream = upstream.clone();
    ChatDeps {
        hooks_done: hooks.hooks_done(),
        system_prompt: Arc::new(move |cwd| crate::repos::system_prompt_for(&root, cwd)),
        after_turn: Arc::new(move |_cwd| {
            let repos = repos.clone();
            tokio::spawn(async move { repos.refresh().await });
        }),
        on_auth_failure: Arc::new(move |kind| upstream.request_refresh(kind.as_str())),
    }
}
