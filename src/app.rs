//! Application wiring: [`AppState`] holds a cheap-to-clone handle to every
//! service; [`AppState::build`] loads persisted state and starts background
//! work; [`run`] serves HTTP on a bound listener until `shutdown` fires,
//! then ends streams and returns. `main` and the tests both call `run`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
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
    /// `started_at` as the contract writes timestamps, made once.
    pub started_at_ts: Arc<str>,
    pub started: Instant,
    /// Cancelled when the engine begins shutting down; long-lived work (SSE
    /// streams, turn runners, hooks) watches it.
    pub shutdown: CancellationToken,
    pub repos: RepoService,
    pub hooks: HookService,
    /// `/health`: ready once the readiness file was seen.
    pub readiness: Arc<crate::readiness::Readiness>,
}

impl AppState {
    /// Load persisted state and start the services. Publishes
    /// `engine.ready` once everything is loaded.
    pub async fn build(config: Config, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        let paths = &config.paths;
        // Private: history, events and logs hold prompts and tool output.
        for dir in [&paths.replicas_dir, &paths.engine_dir] {
            crate::util::create_private_dir(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        // The chat database is read beside the journal: start-up's two
        // largest reads share nothing.
        let chats_db = tokio::task::spawn_blocking({
            let config = config.clone();
            move || ChatService::open_db(&config)
        });
        let bus = EventBus::open(&paths.events_file, config.events_max_bytes)
            .with_context(|| format!("opening {}", paths.events_file.display()))?;
        let upstream = Upstream::start(&config, &bus, shutdown.clone())?;
        // Reads every repo's config file (repo content): off the async
        // threads.
        let hooks = tokio::task::spawn_blocking({
            let (config, bus) = (config.clone(), bus.clone());
            move || HookService::new(config, bus)
        })
        .await
        .context("reading the repos' start hooks")?;
        let repos = RepoService::new(&config, bus.clone(), {
            let hooks = hooks.clone();
            Arc::new(move |repo: &str| hooks.repo_completed(repo))
        });
        let chats_db = chats_db.await.context("reading the chat database")??;
        let chats = ChatService::with_db(
            config.clone(),
            bus.clone(),
            chat_deps(&config, &hooks, &repos, &upstream),
            chats_db,
        );
        let started_at = Utc::now();
        let state = Self {
            readiness: Arc::new(crate::readiness::Readiness::new(config.ready_file.clone())),
            repos,
            hooks,
            config,
            bus,
            upstream,
            chats,
            started_at,
            started_at_ts: crate::util::ts(started_at).into(),
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
        state.repos.watch(state.shutdown.clone());
        // Give memory back once SSE subscribers leave (fan-out buffers).
        tokio::spawn({
            let bus = state.bus.clone();
            crate::util::trim_heap_after_load(
                std::time::Duration::from_secs(2),
                move || bus.subscriber_count(),
                state.shutdown.clone(),
            )
        });
        state
            .hooks
            .start(state.repos.clone(), state.shutdown.clone());
        tokio::spawn(watch_status(state.clone()));
        Ok(state)
    }

    /// The `/status` body; also the payload of `engine.status.changed`.
    pub fn status(&self) -> Value {
        serde_json::to_value(self.status_view()).unwrap_or(Value::Null)
    }

    /// `/status` as a typed view that borrows what it can: serialized
    /// straight to the response, with no `Value` tree per call (the route
    /// is polled hard). Every figure is a maintained counter, not a scan.
    pub fn status_view(&self) -> EngineStatus<'_> {
        let agents = self.chats.agent_processes();
        EngineStatus {
            version: env!("CARGO_PKG_VERSION"),
            started_at: &self.started_at_ts,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            workspace_id: self.config.workspace_id.as_deref(),
            workspace_root: &self.config.workspaces_dir,
            chats: self.chats.counts(),
            repos: RepoCount {
                count: self.repos.count(),
            },
            hooks: HooksState {
                status: self.hooks.state(),
            },
            events: EventsState {
                last_event_id: self.bus.last_id().to_string(),
                subscribers: self.bus.subscriber_count(),
            },
            token_refresh: self.upstream.token_refresh().summary(),
            providers: ProvidersState {
                codex_transport: if self.config.codex_app_server {
                    match crate::providers::codex_transport() {
                        "unknown" => "pending",
                        t => t,
                    }
                } else {
                    "exec"
                },
                agent_processes: AgentProcesses {
                    live: agents.live(),
                    idle: agents.idle(),
                },
            },
        }
    }
}

/// The `/status` body (`docs/API.md`); also the payload of
/// `engine.status.changed`.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineStatus<'a> {
    pub version: &'static str,
    pub started_at: &'a str,
    pub uptime_ms: u64,
    pub workspace_id: Option<&'a str>,
    pub workspace_root: &'a std::path::Path,
    pub chats: crate::chats::ChatCounts,
    pub repos: RepoCount,
    pub hooks: HooksState,
    pub events: EventsState,
    pub token_refresh: crate::upstream::refresh::Summary,
    pub providers: ProvidersState,
}

#[derive(serde::Serialize)]
pub struct RepoCount {
    pub count: usize,
}

#[derive(serde::Serialize)]
pub struct HooksState {
    pub status: String,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventsState {
    pub last_event_id: String,
    pub subscribers: usize,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProvidersState {
    pub codex_transport: &'static str,
    pub agent_processes: AgentProcesses,
}

#[derive(serde::Serialize)]
pub struct AgentProcesses {
    pub live: usize,
    pub idle: usize,
}

/// Serve until `state.shutdown` is cancelled: stop accepting, end SSE
/// streams (they watch the same token), let in-flight requests finish.
///
/// Bounded: at most `config.max_connections` connections are open at once
/// (one more is accepted and closed at once, so the listen backlog does not
/// hold it either), and a connection that takes longer than
/// `config.header_read_timeout` to send a request head is closed, which
/// covers half-sent headers and idle keep-alive connections alike (hyper
/// arms the timer whenever it waits for a request head). An SSE stream is a
/// response in progress, never idle.
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
    let served = serve(
        listener,
        app,
        Limits {
            max_connections: state.config.max_connections,
            header_read_timeout: state.config.header_read_timeout,
        },
        shutdown.clone(),
    )
    .await;
    tracing::info!("HTTP server stopped");
    state.shutdown.cancel();
    let _ = chats.await;
    // The last events of the turns just stopped are in; make them durable.
    state.bus.sync();
    served
}

/// Connection bounds of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: std::time::Duration,
}

/// The accept loop: HTTP/1.1 through hyper with a header-read timeout, a
/// cap on open connections, graceful shutdown when `shutdown` fires (stop
/// accepting; each connection finishes its in-flight response, then closes).
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt as _;

    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let connections = tokio_util::task::TaskTracker::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    let mut refused_logged = None::<Instant>;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Over the cap: close at once (dropping the stream). Logged at
            // most once a second, a flood must not flood the log.
            if refused_logged.is_none_or(|t| t.elapsed().as_secs() >= 1) {
                refused_logged = Some(Instant::now());
                tracing::warn!(%peer, max_connections = limits.max_connections, "connection limit reached; closing new connections");
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    app.clone().oneshot(req.map(axum::body::Body::new))
                });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                // Header timeouts, resets, malformed requests: routine.
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
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

/// The `/status` fields whose change is worth an event: everything but the
/// ones that move all the time (uptime, event counters).
fn status_summary(status: &Value) -> Value {
    json!({
        "chats": status["chats"],
        "repos": status["repos"],
        "hooks": status["hooks"],
        "tokenRefresh": status["tokenRefresh"],
    })
}

/// Publish `engine.status.changed` whenever a summary field of `/status`
/// changes. Re-checked after the events that can change it and every few
/// seconds (token refresh recovering has no event of its own).
async fn watch_status(state: AppState) {
    use futures_util::StreamExt;
    const RECHECK: std::time::Duration = std::time::Duration::from_secs(5);
    let mut last = status_summary(&state.status());
    let mut events = state.bus.subscribe_internal(None);
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            item = events.next() => match item {
                Some(crate::events::SubscriptionItem::Event(ev))
                    if matches!(ev.kind.as_str(), "chat.created" | "chat.updated" | "chat.deleted"
                        | "repo.discovered" | "error") || ev.kind.starts_with("hooks.") => {}
                Some(_) => continue,
                None => return,
            },
            _ = tokio::time::sleep(RECHECK) => {}
        }
        let status = state.status();
        let summary = status_summary(&status);
        if summary != last {
            last = summary;
            state
                .bus
                .publish(None, EventKind::EngineStatusChanged { status });
        }
    }
}
