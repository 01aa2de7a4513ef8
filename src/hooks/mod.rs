//! Start hooks: every repo's `startHook`, run once per workspace when the
//! engine starts, in the background (the engine serves at once), repos in
//! name order; the `hooks.*` events; `GET /hooks/status`; the
//! [`HookService::hooks_done`] signal chats wait on. [`warm`] runs the
//! `warmHook`s for `replicas-engine warm`; [`runner`] runs commands for both.
//!
//! Invariants: completion is recorded in `engine-state.json` only after
//! every command finished (a shutdown mid-run means they run again next
//! start); `hooks_done` turns true exactly once per engine run, whatever the
//! outcome, and also when the task running the hooks dies; an invalid config
//! fails that repo and never the engine.

pub mod runner;
pub mod warm;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::events::{EventBus, EventKind};
use crate::repos::config::{self as repo_config, Hook};
use crate::repos::RepoService;
use runner::{CommandState, Step};

/// The contract's HooksStatus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HooksStatus {
    /// `no_hooks|pending|running|completed|failed`
    pub status: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub log_path: String,
    pub repos: Vec<RepoHooks>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepoHooks {
    pub repo: String,
    pub config_file: Option<String>,
    /// `pending|running|completed|failed`
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
    pub error: Option<String>,
    pub commands: Vec<CommandStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = HookCommand)]
pub struct CommandStatus {
    pub command: String,
    pub status: CommandState,
    pub exit_code: Option<i32>,
    pub duration_ms: Option<u64>,
}

/// The `hooks.progress` payload: one command's new state (as in
/// `HooksStatus`), with its place.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HookProgress {
    pub repo: String,
    /// Index of the command in the repo's `commands`.
    pub index: usize,
    pub command: String,
    pub status: CommandState,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub duration_ms: Option<u64>,
}

/// What `engine-state.json` records about start hooks.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartHooksRecord {
    completed_at: String,
    status: HooksStatus,
}

/// One repo's part of the run, decided at engine start.
struct Planned {
    name: String,
    dir: PathBuf,
    hook: Hook,
    steps: Vec<Step>,
}

#[derive(Clone)]
pub struct HookService {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    bus: EventBus,
    status: watch::Sender<HooksStatus>,
    done: watch::Sender<bool>,
    /// Taken by `start`; `None` when there is nothing to run.
    plan: Mutex<Option<Vec<Planned>>>,
}

impl HookService {
    /// Read the recorded state and the repos' configs; run nothing yet.
    pub fn new(config: Arc<Config>, bus: EventBus) -> Self {
        let log_path = config.paths.start_hooks_log.display().to_string();
        let (status, plan) = match read_record(&config) {
            Some(record) => (record.status, None),
            None => plan(&config, log_path),
        };
        let done = plan.is_none();
        Self {
            inner: Arc::new(Inner {
                config,
                bus,
                status: watch::channel(status).0,
                done: watch::channel(done).0,
                plan: Mutex::new(plan),
            }),
        }
    }

    /// The current HooksStatus (`GET /hooks/status`).
    pub fn status(&self) -> HooksStatus {
        self.inner.status.borrow().clone()
    }

    /// Just the overall state (`/status`, metrics): no copy of the repos.
    pub fn state(&self) -> String {
        self.inner.status.borrow().status.clone()
    }

    /// True once start hooks finished with any outcome, or at once when
    /// there are none or an earlier engine run completed them.
    pub fn hooks_done(&self) -> watch::Receiver<bool> {
        self.inner.done.subscribe()
    }

    /// Whether this repo's start hook has finished (any outcome); true for
    /// a repo without one.
    pub fn repo_completed(&self, repo: &str) -> bool {
        let status = self.inner.status.borrow();
        match status.repos.iter().find(|r| r.repo == repo) {
            Some(r) => matches!(r.status.as_str(), "completed" | "failed"),
            None => true,
        }
    }

    /// Run the planned start hooks in the background; afterwards refresh the
    /// repos (hooks change working trees). `shutdown` kills running groups.
    pub fn start(&self, repos: RepoService, shutdown: CancellationToken) {
        let plan = self.inner.plan.lock().ok().and_then(|mut p| p.take());
        let Some(plan) = plan else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let run = tokio::spawn({
                let this = this.clone();
                let shutdown = shutdown.clone();
                async move { this.run(plan, &shutdown).await }
            });
            match run.await {
                Ok(true) => repos.refresh().await,
                Ok(false) => {}
                Err(e) => {
                    // Never leave chats waiting on hooks that can no longer finish.
                    tracing::error!(error = %e, "start hooks task died");
                    this.inner
                        .status
                        .send_modify(|s| s.status = "failed".into());
                    let _ = this.inner.done.send(true);
                }
            }
        });
    }

    /// Returns whether the run finished (false when shutdown interrupted it).
    async fn run(&self, plan: Vec<Planned>, shutdown: &CancellationToken) -> bool {
        let inner = &self.inner;
        inner.status.send_modify(|s| {
            s.status = "running".into();
            s.started_at = Some(crate::util::now_ts());
        });
        inner.bus.publish(
            None,
            EventKind::HooksStarted {
                status: self.status(),
            },
        );
        tracing::info!(repos = plan.len(), "start hooks running");
        let log = open_log(&inner.config.paths.start_hooks_log);

        for p in &plan {
            let Some(repo_idx) = self.status().repos.iter().position(|r| r.repo == p.name) else {
                continue;
            };
            self.set_repo(repo_idx, "running");
            let mut ok = true;
            for (i, step) in p.steps.iter().enumerate() {
                if shutdown.is_cancelled() {
                    return false;
                }
                self.set_command(repo_idx, i, CommandState::Running, None, None);
                let outcome = match &log {
                    Ok(log) => {
                        runner::run_step(&p.name, &p.dir, step, p.hook.timeout(), log, shutdown)
                            .await
                    }
                    Err(_) => runner::Outcome {
                        state: CommandState::Failed,
                        exit_code: None,
                        duration: std::time::Duration::ZERO,
                    },
                };
                if shutdown.is_cancelled() {
                    tracing::info!(repo = %p.name, "start hooks interrupted by shutdown");
                    return false;
                }
                ok &= outcome.state == CommandState::Succeeded;
                tracing::info!(
                    repo = %p.name,
                    index = i,
                    status = runner::state_name(outcome.state),
                    exit_code = ?outcome.exit_code,
                    duration_ms = outcome.duration.as_millis() as u64,
                    "start hook command finished"
                );
                self.set_command(
                    repo_idx,
                    i,
                    outcome.state,
                    outcome.exit_code,
                    Some(outcome.duration.as_millis() as u64),
                );
            }
            self.set_repo(repo_idx, if ok { "completed" } else { "failed" });
        }

        // Record first, then show: whoever sees `completed` can rely on a
        // restarted engine not running the hooks again.
        let mut status = self.status();
        let failed = status.repos.iter().any(|r| r.status == "failed");
        status.status = if failed { "failed" } else { "completed" }.into();
        status.finished_at = Some(crate::util::now_ts());
        if let Err(e) = write_record(&inner.config, &status) {
            tracing::error!(error = %e, file = %inner.config.paths.engine_state_file.display(), "cannot record start hook completion");
        }
        inner.status.send_replace(status.clone());
        tracing::info!(status = %status.status, "start hooks finished");
        let kind = if failed {
            EventKind::HooksFailed { status }
        } else {
            EventKind::HooksCompleted { status }
        };
        inner.bus.publish(None, kind);
        let _ = inner.done.send(true);
        true
    }

    fn set_repo(&self, idx: usize, state: &str) {
        self.inner
            .status
            .send_modify(|s| s.repos[idx].status = state.into());
    }

    fn set_command(
        &self,
        idx: usize,
        i: usize,
        state: CommandState,
        exit_code: Option<i32>,
        duration_ms: Option<u64>,
    ) {
        let mut event = None;
        self.inner.status.send_modify(|s| {
            let repo = &mut s.repos[idx];
            let Some(c) = repo.commands.get_mut(i) else {
                return;
            };
            c.status = state;
            c.exit_code = exit_code;
            c.duration_ms = duration_ms;
            event = Some(HookProgress {
                repo: repo.repo.clone(),
                index: i,
                command: c.command.clone(),
                status: state,
                exit_code,
                timed_out: state == CommandState::TimedOut,
                duration_ms,
            });
        });
        if let Some(payload) = event {
            self.inner
                .bus
                .publish(None, EventKind::HooksProgress(payload));
        }
    }
}

/// Build the initial status and the run plan from the repos' configs.
fn plan(config: &Config, log_path: String) -> (HooksStatus, Option<Vec<Planned>>) {
    let mut repos = Vec::new();
    let mut planned = Vec::new();
    for (name, dir) in repo_config::repo_dirs(&config.workspaces_dir) {
        match repo_config::load(&dir) {
            Ok(Some(loaded)) => {
                let Some(hook) = loaded.config.start_hook else {
                    continue;
                };
                let steps = runner::steps(&hook);
                repos.push(RepoHooks {
                    repo: name.clone(),
                    config_file: Some(loaded.file.to_owned()),
                    status: "pending".into(),
                    error: None,
                    commands: steps
                        .iter()
                        .map(|s| CommandStatus {
                            command: s.label.clone(),
                            status: CommandState::Pending,
                            exit_code: None,
                            duration_ms: None,
                        })
                        .collect(),
                });
                planned.push(Planned {
                    name,
                    dir,
                    hook,
                    steps,
                });
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(repo = %name, error = %e, "invalid replicas config");
                repos.push(RepoHooks {
                    repo: name,
                    config_file: Some(e.file.clone()),
                    status: "failed".into(),
                    error: Some(e.message),
                    commands: Vec::new(),
                });
            }
        }
    }
    let status = HooksStatus {
        status: if repos.is_empty() {
            "no_hooks"
        } else {
            "pending"
        }
        .into(),
        started_at: None,
        finished_at: None,
        log_path,
        repos,
    };
    // An invalid config alone still gets a (short) run, so its failure is
    // announced and recorded like any other.
    let plan = (!status.repos.is_empty()).then_some(planned);
    (status, plan)
}

fn read_record(config: &Config) -> Option<StartHooksRecord> {
    let path = &config.paths.engine_state_file;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(error = %e, file = %path.display(), "cannot read engine state; start hooks will run");
            return None;
        }
    };
    let mut v: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, file = %path.display(), "engine state is not JSON; start hooks will run");
            return None;
        }
    };
    let record = v.get_mut("startHooks").map(serde_json::Value::take)?;
    match serde_json::from_value(record) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "engine state has an unreadable startHooks record; start hooks will run");
            None
        }
    }
}

/// Record completion, keeping any other keys of the state file.
fn write_record(config: &Config, status: &HooksStatus) -> anyhow::Result<()> {
    let path = &config.paths.engine_state_file;
    let mut state = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| json!({}));
    let record = StartHooksRecord {
        completed_at: crate::util::now_ts(),
        status: status.clone(),
    };
    state["startHooks"] = serde_json::to_value(record)?;
    crate::util::write_atomic(path, serde_json::to_string_pretty(&state)?.as_bytes(), None)?;
    Ok(())
}

/// The log, opened for append; `/dev/null` if it cannot be (logged).
fn open_log(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        let _ = crate::util::create_private_dir(dir);
    }
    crate::util::open_private_append(path).or_else(|e| {
            tracing::error!(error = %e, file = %path.display(), "cannot open the start hooks log; output is discarded");
            std::fs::OpenOptions::new().write(true).open("/dev/null")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn setup(configs: &[(&str, &str, &str)]) -> (tempfile::TempDir, Arc<Config>, EventBus) {
        let home = tempfile::tempdir().unwrap();
        let config = Config::for_home(home.path(), "s");
        for (repo, file, text) in configs {
            let d = config.workspaces_dir.join(repo);
            std::fs::create_dir_all(d.join(".git")).unwrap();
            std::fs::write(d.join(file), text).unwrap();
        }
        let bus = EventBus::open(&config.paths.events_file, 1 << 20).unwrap();
        (home, Arc::new(config), bus)
    }

    #[tokio::test]
    async fn hooks_done_is_immediate_without_hooks() {
        let (_h, config, bus) = setup(&[("a", "replicas.json", r#"{"systemPrompt":"x"}"#)]);
        let hooks = HookService::new(config.clone(), bus.clone());
        assert!(*hooks.hooks_done().borrow());
        assert_eq!(hooks.status().status, "no_hooks");
        assert!(hooks.repo_completed("a"));
    }

    #[tokio::test]
    async fn hooks_done_flips_after_the_run_and_is_recorded() {
        let (_h, config, bus) =
            setup(&[("a", "replicas.yml", "startHook:\n  commands: ['echo hi']\n")]);
        let hooks = HookService::new(config.clone(), bus.clone());
        let mut done = hooks.hooks_done();
        assert!(!*done.borrow());
        assert!(!hooks.repo_completed("a"));
        let repos = RepoService::new(&config, bus.clone(), Arc::new(|_: &str| true));
        hooks.start(repos, CancellationToken::new());
        tokio::time::timeout(Duration::from_secs(20), done.wait_for(|d| *d))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(hooks.status().status, "completed");
        assert!(hooks.repo_completed("a"));
        // A second service (a restarted engine) sees the record: done at once.
        let again = HookService::new(config, bus);
        assert!(*again.hooks_done().borrow());
        assert_eq!(again.status().status, "completed");
    }
}
