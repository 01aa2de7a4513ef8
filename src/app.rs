//! Application wiring: [`AppState`] holds a cheap-to-clone handle to every
//! service; [`AppState::build`] loads persisted state and starts background
//! work. Nothing here knows HTTP (the module imports neither `http` nor
//! `server`): `http::router` builds the router from an `AppState`, and
//! `server::run` serves it.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::chats::{ChatDeps, ChatService};
use crate::config::Config;
use crate::events::{EventBus, EventKind, EventType};
use crate::hooks::HookService;
use crate::repos::RepoService;
use crate::status::{AgentProcesses, EngineStatus, EventsState, HooksState};
use crate::status::{ProvidersState, RepoCount, StatusCache};
use crate::upstream::Upstream;

/// Every service handle a route needs. One `Arc`: axum clones the state
/// for every request (twice), and cloning a dozen handles (one of them a
/// `CancellationToken`, whose clone and drop take a lock) was a tenth of
/// the engine's own CPU under `/status` load. Fields read through `Deref`.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl std::ops::Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.0
    }
}

/// What [`AppState`] shares.
pub struct Services {
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
    /// `/status`'s last body, reused while its figures are unchanged.
    status_cache: StatusCache,
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
        let state = Self(Arc::new(Services {
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
            status_cache: StatusCache::default(),
        }));
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

    /// `/status` as a typed view that borrows what it can: serialized
    /// straight to the response, with no `Value` tree per call (the route
    /// is polled hard). Every figure is a maintained counter, not a scan.
    pub fn status_view(&self) -> EngineStatus<'_> {
        let agents = self.chats.agent_processes();
        EngineStatus {
            version: env!("CARGO_PKG_VERSION"),
            started_at: Cow::Borrowed(&self.started_at_ts),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            workspace_id: self.config.workspace_id.as_deref().map(Cow::Borrowed),
            workspace_root: Cow::Borrowed(&self.config.workspaces_dir),
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

impl AppState {
    /// The `/status` body as bytes, through [`StatusCache`]: the route is
    /// polled hard and serializing was most of its cost.
    pub fn status_json(&self) -> serde_json::Result<Vec<u8>> {
        self.status_cache.body(self.status_view())
    }
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

/// Publish `engine.status.changed` whenever a summary field of `/status`
/// changes. Re-checked after the events that can change it and every few
/// seconds (token refresh recovering has no event of its own).
async fn watch_status(state: AppState) {
    use futures_util::StreamExt;
    const RECHECK: std::time::Duration = std::time::Duration::from_secs(5);
    let mut last = state.status_view().into_owned();
    let mut events = state.bus.subscribe_internal(None);
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            item = events.next() => match item {
                Some(crate::events::SubscriptionItem::Event(ev))
                    if EventType::from_name(&ev.kind).is_some_and(EventType::may_change_status) => {}
                Some(_) => continue,
                None => return,
            },
            _ = tokio::time::sleep(RECHECK) => {}
        }
        let status = state.status_view();
        if status.summary_differs(&last) {
            last = status.into_owned();
            state.bus.publish(
                None,
                EventKind::EngineStatusChanged {
                    status: Box::new(last.clone()),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reused `/status` body is the serialized view, whatever changed
    /// since the last one (here: a new event, which moves `lastEventId`).
    #[tokio::test]
    async fn status_json_is_the_serialized_view() {
        let home = tempfile::tempdir().unwrap();
        let config = crate::config::Config::for_home(home.path(), "s3cret");
        let state = AppState::build(config, Default::default()).await.unwrap();
        let same = |state: &AppState| {
            let mut cached: serde_json::Value =
                serde_json::from_slice(&state.status_json().unwrap()).unwrap();
            let mut fresh = serde_json::to_value(state.status_view()).unwrap();
            assert!(cached["uptimeMs"].as_u64().unwrap() <= fresh["uptimeMs"].as_u64().unwrap());
            cached["uptimeMs"] = 0.into();
            fresh["uptimeMs"] = 0.into();
            assert_eq!(cached, fresh);
            cached
        };
        let first = same(&state);
        let again = same(&state);
        assert_eq!(first, again);
        state.bus.publish(
            None,
            EventKind::EngineReady {
                version: "x".into(),
                pid: 1,
            },
        );
        let after = same(&state);
        assert_ne!(first["events"], after["events"]);
    }
}
