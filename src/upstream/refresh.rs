//! Token refresh managers: `github`, `claude`, `codex`. Each is one task
//! that asks the backend for a fresh credential at start, again before it
//! expires (from the `expiresAt` the backend returns, else every
//! [`DEFAULT_PERIOD`]), retries with backoff while failing, and at once when
//! someone calls [`TokenRefresh::request_refresh`] (a provider reported an
//! auth failure). Requests arriving while one is pending coalesce into one
//! attempt, and requested attempts are spaced by at least the retry base.
//!
//! Status per manager is kept for `GET /token-refresh/health`. A 404 from
//! the backend means the workspace has no such credential: the manager is
//! `disabled` (not failing) and asks again every [`DEFAULT_PERIOD`]. A manager
//! that starts failing publishes one `error` event (`token_refresh_failed`,
//! source = the manager); further failures of the same streak do not.
//! Error messages are ours (status codes, "not JSON"…), never response
//! bodies, so no token reaches a log, an event or the health endpoint.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::client::{CallError, UpstreamClient};
use super::credentials::{self, CredentialFile};
use crate::config::Paths;
use crate::events::{EventBus, EventKind};

/// Refresh period when the backend gives no expiry.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(45 * 60);
/// Refresh at the latest this long before expiry.
const EXPIRY_MARGIN: Duration = Duration::from_secs(5 * 60);
const MIN_DELAY: Duration = Duration::from_secs(10);
const MAX_DELAY: Duration = Duration::from_secs(12 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Manager {
    Github,
    Claude,
    Codex,
}

impl Manager {
    pub const ALL: [Manager; 3] = [Manager::Github, Manager::Claude, Manager::Codex];

    pub fn name(self) -> &'static str {
        match self {
            Self::Github => "github",
            Self::Claude => "claude",
            Self::Codex => "codex",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    fn endpoint(self) -> &'static str {
        match self {
            Self::Github => "/v1/engine/github/refresh-token",
            Self::Claude => "/v1/engine/claude/refresh-credentials",
            Self::Codex => "/v1/engine/codex/refresh-credentials",
        }
    }

    fn file(self, paths: &Paths) -> std::path::PathBuf {
        match self {
            Self::Github => paths.git_credentials_file.clone(),
            Self::Claude => paths.claude_credentials_file.clone(),
            Self::Codex => paths.codex_auth_file.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = ManagerHealth)]
pub enum Health {
    Ok,
    Failing,
    Disabled,
}

/// `/status`'s `tokenRefresh`: each manager's health, as a JSON object
/// (`{"github":"ok",…}`) in the managers' order.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary(pub Vec<(&'static str, Health)>);

impl Serialize for Summary {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// One manager's entry in `GET /token-refresh/health`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagerStatus {
    pub status: Health,
    pub last_success_at: Option<String>,
    pub last_attempt_at: Option<String>,
    pub next_attempt_at: Option<String>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

impl ManagerStatus {
    fn new(status: Health) -> Self {
        Self {
            status,
            last_success_at: None,
            last_attempt_at: None,
            next_attempt_at: None,
            consecutive_failures: 0,
            last_error: None,
        }
    }
}

struct Slot {
    manager: Manager,
    status: Mutex<ManagerStatus>,
    wake: Notify,
}

/// Cheap-clone handle on the three managers.
#[derive(Clone)]
pub struct TokenRefresh {
    slots: Arc<Vec<Arc<Slot>>>,
    enabled: bool,
}

/// What a manager needs to run.
struct Ctx {
    client: Arc<UpstreamClient>,
    workspace_id: String,
    bus: EventBus,
    retry_base: Duration,
    shutdown: CancellationToken,
}

impl TokenRefresh {
    /// All managers `disabled` (no `MONOLITH_URL`): nothing runs.
    pub fn disabled() -> Self {
        Self::with_status(Health::Disabled)
    }

    fn with_status(h: Health) -> Self {
        let slots = Manager::ALL
            .into_iter()
            .map(|manager| {
                Arc::new(Slot {
                    manager,
                    status: Mutex::new(ManagerStatus::new(h)),
                    wake: Notify::new(),
                })
            })
            .collect();
        Self {
            slots: Arc::new(slots),
            enabled: h != Health::Disabled,
        }
    }

    /// Start one task per manager; the first attempt happens at once.
    pub fn start(
        client: Arc<UpstreamClient>,
        workspace_id: String,
        paths: &Paths,
        bus: EventBus,
        retry_base: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let this = Self::with_status(Health::Ok);
        let ctx = Arc::new(Ctx {
            client,
            workspace_id,
            bus,
            retry_base,
            shutdown,
        });
        for slot in this.slots.iter() {
            let file = CredentialFile::new(slot.manager.file(paths));
            tokio::spawn(run_manager(ctx.clone(), slot.clone(), file));
        }
        this
    }

    /// Refresh `manager` (`"github"`, `"claude"`, `"codex"`) now, e.g. after
    /// a provider reported an authentication failure. Concurrent requests
    /// coalesce. Returns false for an unknown name or when disabled.
    pub fn request_refresh(&self, manager: &str) -> bool {
        let Some(slot) = self.slots.iter().find(|s| s.manager.name() == manager) else {
            return false;
        };
        if !self.enabled {
            return false;
        }
        tracing::info!(manager, "credential refresh requested");
        slot.wake.notify_one();
        true
    }

    /// Per-manager status, keyed by name.
    pub fn statuses(&self) -> BTreeMap<&'static str, ManagerStatus> {
        self.slots
            .iter()
            .map(|s| (s.manager.name(), lock(&s.status).clone()))
            .collect()
    }

    /// No enabled manager is failing.
    pub fn healthy(&self) -> bool {
        self.slots
            .iter()
            .all(|s| lock(&s.status).status != Health::Failing)
    }

    /// `{"github":"ok",…}` for `/status`.
    pub fn summary(&self) -> Summary {
        Summary(
            self.slots
                .iter()
                .map(|s| (s.manager.name(), lock(&s.status).status))
                .collect(),
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn run_manager(ctx: Arc<Ctx>, slot: Arc<Slot>, file: CredentialFile) {
    let name = slot.manager.name();
    loop {
        let attempt_started = Instant::now();
        lock(&slot.status).last_attempt_at = Some(crate::util::now_ts());
        let result = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            r = refresh_once(&ctx, slot.manager, &file) => r,
        };
        let now = Utc::now();
        let delay = {
            let mut st = lock(&slot.status);
            match &result {
                Ok(Outcome::NotConfigured) => {
                    // Not an outage: this workspace simply has no such
                    // credential (e.g. Claude only). Ask again later.
                    if st.status != Health::Disabled {
                        tracing::info!(
                            manager = name,
                            "backend has no credential of this kind for the workspace (404)"
                        );
                    }
                    st.status = Health::Disabled;
                    st.consecutive_failures = 0;
                    st.last_error = Some(format!(
                        "the backend has no {name} credential for this workspace (HTTP 404)"
                    ));
                    DEFAULT_PERIOD
                }
                Ok(Outcome::Refreshed(expires)) => {
                    let delay = delay_until_refresh(now, *expires);
                    if st.consecutive_failures > 0 {
                        tracing::info!(
                            manager = name,
                            failures = st.consecutive_failures,
                            "credential refresh recovered"
                        );
                    }
                    st.status = Health::Ok;
                    st.last_success_at = Some(crate::util::ts(now));
                    st.consecutive_failures = 0;
                    st.last_error = None;
                    tracing::info!(
                        manager = name,
                        duration_ms = attempt_started.elapsed().as_millis() as u64,
                        next_in_secs = delay.as_secs(),
                        "credential refreshed"
                    );
                    delay
                }
                Err(e) => {
                    crate::metrics::token_refresh_failed(name);
                    st.consecutive_failures += 1;
                    st.status = Health::Failing;
                    st.last_error = Some(e.clone());
                    let delay = super::backoff(ctx.retry_base, st.consecutive_failures);
                    tracing::warn!(
                        manager = name,
                        error = %e,
                        failures = st.consecutive_failures,
                        retry_in_ms = delay.as_millis() as u64,
                        "credential refresh failed"
                    );
                    if st.consecutive_failures == 1 {
                        ctx.bus.publish(
                            None,
                            EventKind::Error {
                                code: "token_refresh_failed".into(),
                                message: format!("refreshing the {name} credential failed: {e}"),
                                source: name.into(),
                            },
                        );
                    }
                    delay
                }
            }
        };
        lock(&slot.status).next_attempt_at = Some(crate::util::ts(
            now + chrono::Duration::from_std(delay).unwrap_or_default(),
        ));
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
            _ = slot.wake.notified() => {
                // Space requested attempts so a burst of auth failures
                // cannot hammer the backend.
                let since = attempt_started.elapsed();
                if since < ctx.retry_base {
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(ctx.retry_base - since) => {}
                    }
                }
            }
        }
    }
}

/// What a successful call to the backend meant.
enum Outcome {
    /// Written; the credential expires then (when known).
    Refreshed(Option<DateTime<Utc>>),
    /// The backend answered 404: no such credential for this workspace.
    NotConfigured,
}

/// Computes a credential file's new content from its current one.
type FileUpdate = Box<dyn FnOnce(Option<&[u8]>) -> Vec<u8> + Send>;

/// One refresh: call the backend, validate, write the file. Returns the
/// credential's expiry when known.
async fn refresh_once(
    ctx: &Ctx,
    manager: Manager,
    file: &CredentialFile,
) -> Result<Outcome, String> {
    let body = json!({ "workspaceId": ctx.workspace_id }).to_string();
    let bytes = match ctx.client.post(manager.endpoint(), body).await {
        Ok(b) => b,
        Err(CallError::Status(404)) => return Ok(Outcome::NotConfigured),
        Err(e) => return Err(e.to_string()),
    };
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|_| "the backend answered something that is not JSON".to_owned())?;
    let top_expiry = v.get("expiresAt").and_then(parse_expiry);
    let (expires, write): (Option<DateTime<Utc>>, FileUpdate) = match manager {
        Manager::Github => {
            let token = v
                .get("token")
                .and_then(Value::as_str)
                .ok_or("the backend answer has no `token` string")?
                .to_owned();
            if !credentials::valid_git_token(&token) {
                return Err("the backend sent a token with characters not allowed in a URL".into());
            }
            (
                top_expiry,
                Box::new(move |old| {
                    credentials::git_credentials_with(
                        &String::from_utf8_lossy(old.unwrap_or_default()),
                        &token,
                    )
                    .into_bytes()
                }),
            )
        }
        Manager::Claude => {
            let creds = v
                .get("credentials")
                .filter(|c| c.is_object())
                .ok_or("the backend answer has no `credentials` object")?
                .clone();
            let expiry = top_expiry.or_else(|| {
                creds
                    .pointer("/claudeAiOauth/expiresAt")
                    .and_then(parse_expiry)
            });
            (
                expiry,
                Box::new(move |old| credentials::merged_json(old, &creds)),
            )
        }
        Manager::Codex => {
            let auth = v
                .get("auth")
                .filter(|c| c.is_object())
                .ok_or("the backend answer has no `auth` object")?
                .clone();
            let expiry = top_expiry.or_else(|| auth.get("expiresAt").and_then(parse_expiry));
            (
                expiry,
                Box::new(move |old| credentials::merged_json(old, &auth)),
            )
        }
    };
    let path = file.path.clone();
    let file = file.clone();
    tokio::task::spawn_blocking(move || file.update(write))
        .await
        .map_err(|e| format!("writing {} failed: {e}", path.display()))?
        .map_err(|e| format!("writing {} failed: {e}", path.display()))?;
    Ok(Outcome::Refreshed(expires))
}

/// `expiresAt` as RFC 3339, or epoch seconds / milliseconds.
pub fn parse_expiry(v: &Value) -> Option<DateTime<Utc>> {
    match v {
        Value::String(s) => DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.with_timezone(&Utc)),
        Value::Number(n) => {
            let n = n.as_f64()?;
            // Anything past year 33658 in seconds is really milliseconds.
            let ms = if n > 1e12 { n } else { n * 1000.0 };
            DateTime::from_timestamp_millis(ms as i64)
        }
        _ => None,
    }
}

/// When to refresh a credential expiring at `expires` (the contract in
/// `docs/API.md`): 5 minutes before expiry; for a short-lived token, where
/// 5 minutes is more than a fifth of what is left (under 25 minutes), at
/// 80% of the remaining lifetime instead, so it is not refreshed almost at
/// once. Always within [10 s, 12 h].
pub fn delay_until_refresh(now: DateTime<Utc>, expires: Option<DateTime<Utc>>) -> Duration {
    let Some(expires) = expires else {
        return DEFAULT_PERIOD;
    };
    let left = (expires - now).to_std().unwrap_or_default();
    let margin = left.saturating_sub(EXPIRY_MARGIN);
    let eighty = left.mul_f64(0.8);
    margin.max(eighty).clamp(MIN_DELAY, MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_formats() {
        let t = parse_expiry(&json!("2030-01-01T00:00:00Z")).unwrap();
        assert_eq!(parse_expiry(&json!(t.timestamp())), Some(t));
        assert_eq!(parse_expiry(&json!(t.timestamp_millis())), Some(t));
        assert_eq!(parse_expiry(&json!("soon")), None);
        assert_eq!(parse_expiry(&json!(null)), None);
    }

    #[test]
    fn schedule() {
        let now = Utc::now();
        let m = |mins: i64| delay_until_refresh(now, Some(now + chrono::Duration::minutes(mins)));
        // Long-lived: 5 minutes before expiry.
        assert_eq!(m(60), Duration::from_secs(55 * 60));
        assert_eq!(m(6 * 60), Duration::from_secs((6 * 60 - 5) * 60));
        // At 25 minutes both rules agree; below, 80% of what is left.
        assert_eq!(m(25), Duration::from_secs(20 * 60));
        assert_eq!(m(10), Duration::from_secs(8 * 60));
        assert_eq!(m(4), Duration::from_secs(192));
        assert_eq!(m(-5), MIN_DELAY);
        assert_eq!(m(100_000), MAX_DELAY);
        assert_eq!(delay_until_refresh(now, None), DEFAULT_PERIOD);
    }
}
