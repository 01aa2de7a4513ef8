//! Configuration: read once from the environment (and `.env`) at boot,
//! validated, then shared read-only. Every file path the engine touches is
//! derived from one home directory through [`Paths`], so tests run against a
//! temporary home without mutating the process environment.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A boot-time configuration problem. The message names the variable so the
/// operator reading journalctl knows exactly what to fix.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

fn invalid(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
    }
}

/// The shared secret. `Debug`/`Display` never print it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The raw value, for the auth comparison and upstream calls only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Every variable the engine reads, with its meaning; printed by `--help`.
pub const ENV_HELP: &str = "\
ENVIRONMENT (plus the file given with --env-file; the process environment wins):
  REPLICAS_ENGINE_SECRET    required. Shared secret clients send in X-Replicas-Engine-Secret.
  PORT                      listen port (alias REPLICAS_ENGINE_PORT). Default 3737; 0 = any free port.
  HOST                      listen address. Default 0.0.0.0.
  WORKSPACE_ID              workspace id sent upstream; required when MONOLITH_URL is set.
  MONOLITH_URL              backend base URL; https, or http only to a loopback host. Unset disables webhooks and token refresh.
  WORKSPACE_HOME            home of the workspace user. Default $HOME.
  REPLICAS_WORKSPACES_DIR   workspace root holding the repos. Default $WORKSPACE_HOME/workspaces.
  REPLICAS_READY_FILE       /health answers 200 once this file exists. Default /var/log/cloud-init-output.log.
  REPLICAS_DEFAULT_BRANCH   diff base branch. Default: the remote's HEAD, else main.
  CLAUDE_BIN, CODEX_BIN, GH_BIN, GIT_BIN
                            paths of the tools. Default: looked up on PATH.
  REPLICAS_MAX_BODY_BYTES   request body cap in bytes. Default 10485760 (10 MiB).
  REPLICAS_EVENTS_MAX_BYTES events.jsonl retention budget in bytes. Default 67108864 (64 MiB).
  REPLICAS_MAX_DIFF_BYTES   cap of fullDiff in GET /repos?includeDiffs=true. Default 2097152 (2 MiB).
  REPLICAS_MAX_MESSAGE_BYTES
                            cap of one chat message's text in bytes (413 above). Default 1048576 (1 MiB).
  REPLICAS_MAX_QUEUED_MESSAGES
                            messages waiting in one chat's queue (429 queue_full above). Default 100.
  REPLICAS_TURN_TIMEOUT_SECS
                            a provider turn that runs longer fails. Default 3600.
  REPLICAS_SSE_KEEPALIVE_SECS
                            keepalive comment interval on /events. Default 15.
  REPLICAS_SSE_COALESCE_MS
                            least time between two writes to one /events stream while events keep coming (what arrives meanwhile goes in the next write); 0 = a write per wakeup. Default 5.
  REPLICAS_PROVIDER_IDLE_SECS
                            an agent process kept between turns is stopped after this long idle (the next message resumes its session). Default 600.
  REPLICAS_CODEX_TRANSPORT  app-server (default): one long-lived `codex app-server` per chat (streamed
                            text, interrupt keeps the process), falling back to exec once if it is missing or
                            fails its handshake (an older CLI); exec: one `codex exec --json` per turn.
  REPLICAS_MAX_AGENT_PROCESSES
                            live agent CLI processes at most; the least recently used idle one is stopped first (running turns never are). Default 8.
  REPLICAS_HEADER_READ_TIMEOUT_MS
                            a connection that takes longer to send a request head (half-sent headers,
                            idle keep-alive) is closed. Default 10000.
  REPLICAS_MAX_CONNECTIONS  open HTTP connections at most; beyond, new ones are closed at once. Default 1024.
  REPLICAS_MAX_SUBSCRIBERS  open /events streams at most; beyond, 503 unavailable. Default 256.
  REPLICAS_UPSTREAM_TIMEOUT_MS
                            timeout of one call to MONOLITH_URL (connect timeout is the smaller of this and 5 s). Default 30000.
  REPLICAS_UPSTREAM_RETRY_BASE_MS
                            first retry delay of webhooks and token refresh; doubles up to 60 s, with jitter. Default 500.
  REPLICAS_WEBHOOK_OUTBOX_MAX_EVENTS
                            undelivered webhooks kept on disk; beyond it the oldest are dropped (with an error event). Default 50000.
  REPLICAS_WEBHOOK_OUTBOX_MAX_BYTES
                            byte budget of the undelivered webhooks. Default 67108864 (64 MiB).
  REPLICAS_WEBHOOK_COALESCE_MS
                            consecutive streamed text deltas of one item are merged into one webhook
                            within this window (and while a delivery is in flight). Default 250; 0 = off.
  REPLICAS_HTTP_METRICS     1: count every request in /metrics (method, route, status, latency); 0: leave
                            the replicas_http_* series out. Default 1.
  REPLICAS_CHILD_ENV        extra variables passed on to agents, hooks, git and gh, comma-separated
                            (NAME or PREFIX*). Default none: children get only the documented allow-list,
                            never REPLICAS_* or MONOLITH_URL.
  RUST_LOG                  log filter. Default info.

FILES (under $WORKSPACE_HOME):
  .replicas/engine/events.jsonl   event journal (SSE replay source)
  .replicas/engine/chats.db       chats, queues, running turns (SQLite, WAL;
                                  a chats.json of an older engine is imported)
  .replicas/engine-state.json     start-hook completion
  .replicas/startHooks.log        start-hook output
  .replicas/engine/webhook-outbox.jsonl, webhook-cursor.json
                                  undelivered webhooks and the last delivered id
  .claude/.bedrock-credentials.json
                                  read only: AWS credentials for Claude on Bedrock, read at each claude start";

/// Every path the engine reads or writes, derived from the workspace home
/// (the ready file and the workspace root are settings of their own). A
/// file's companions sit beside it and are named where it is opened:
/// `event-ids.json` and `events.1.jsonl` beside the journal, `-wal`/`-shm`
/// beside `chats.db`, `.migrated`/`.corrupt-*` beside `chats.json`, and the
/// temp files of atomic writes.
#[derive(Debug, Clone)]
pub struct Paths {
    pub home: PathBuf,
    /// `~/.replicas`
    pub replicas_dir: PathBuf,
    /// `~/.replicas/engine`
    pub engine_dir: PathBuf,
    pub events_file: PathBuf,
    /// `~/.replicas/engine/chats.json`: the registry of older engines,
    /// imported into [`Paths::chats_db`] at the first start.
    pub chats_file: PathBuf,
    /// `~/.replicas/engine/chats.db`: chats, queues, running turns (SQLite).
    pub chats_db: PathBuf,
    /// `~/.replicas/engine/history/`: one `<chatId>.jsonl` per chat.
    pub history_dir: PathBuf,
    /// `~/.replicas/engine/attachments/`: one `<messageId>.json` of images
    /// per message, until its turn ended.
    pub attachments_dir: PathBuf,
    pub engine_state_file: PathBuf,
    pub start_hooks_log: PathBuf,
    pub claude_plans_dir: PathBuf,
    pub replicas_plans_dir: PathBuf,
    pub git_credentials_file: PathBuf,
    pub claude_credentials_file: PathBuf,
    /// `~/.claude/.bedrock-credentials.json`: AWS credentials for Claude on
    /// Bedrock, written by the backend; read afresh at each Claude spawn.
    pub claude_bedrock_credentials_file: PathBuf,
    pub codex_auth_file: PathBuf,
    /// `~/.replicas/engine/webhook-outbox.jsonl`: undelivered webhook events.
    pub webhook_outbox_file: PathBuf,
    /// `~/.replicas/engine/webhook-cursor.json`: last delivered webhook id.
    pub webhook_cursor_file: PathBuf,
}

impl Paths {
    pub fn new(home: impl Into<PathBuf>) -> Self {
        let home = home.into();
        let replicas_dir = home.join(".replicas");
        let engine_dir = replicas_dir.join("engine");
        Self {
            events_file: engine_dir.join("events.jsonl"),
            chats_file: engine_dir.join("chats.json"),
            chats_db: engine_dir.join("chats.db"),
            history_dir: engine_dir.join("history"),
            attachments_dir: engine_dir.join("attachments"),
            engine_state_file: replicas_dir.join("engine-state.json"),
            start_hooks_log: replicas_dir.join("startHooks.log"),
            claude_plans_dir: home.join(".claude").join("plans"),
            replicas_plans_dir: replicas_dir.join("plans"),
            git_credentials_file: home.join(".git-credentials"),
            claude_credentials_file: home.join(".claude").join(".credentials.json"),
            claude_bedrock_credentials_file: home.join(".claude").join(".bedrock-credentials.json"),
            codex_auth_file: home.join(".codex").join("auth.json"),
            webhook_outbox_file: engine_dir.join("webhook-outbox.jsonl"),
            webhook_cursor_file: engine_dir.join("webhook-cursor.json"),
            replicas_dir,
            engine_dir,
            home,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub secret: Secret,
    pub host: IpAddr,
    pub port: u16,
    pub workspace_id: Option<String>,
    pub monolith_url: Option<url::Url>,
    pub paths: Paths,
    pub workspaces_dir: PathBuf,
    pub ready_file: PathBuf,
    pub default_branch: Option<String>,
    pub claude_bin: PathBuf,
    pub codex_bin: PathBuf,
    pub gh_bin: PathBuf,
    pub git_bin: PathBuf,
    pub max_body_bytes: usize,
    pub events_max_bytes: u64,
    pub turn_timeout: Duration,
    /// An agent process idle between turns this long is stopped.
    pub provider_idle: Duration,
    /// Live agent processes at most (least recently used idle one first).
    pub max_agent_processes: usize,
    /// Drive Codex through `codex app-server` (else `codex exec --json`).
    pub codex_app_server: bool,
    pub sse_keepalive: Duration,
    /// Least time between two writes to one `/events` stream while events
    /// keep coming (zero: one write per wakeup).
    pub sse_coalesce: Duration,
    /// Time a connection has to send a request head (also the keep-alive
    /// idle timeout).
    pub header_read_timeout: Duration,
    /// Open HTTP connections at most.
    pub max_connections: usize,
    /// Open `/events` streams at most.
    pub max_subscribers: usize,
    /// Upstream (MONOLITH_URL) call timeout and first retry delay.
    pub upstream_timeout: Duration,
    pub upstream_retry_base: Duration,
    /// Bounds of the webhook outbox (undelivered events).
    pub webhook_outbox_max_events: usize,
    pub webhook_outbox_max_bytes: u64,
    /// How long a run of streamed text deltas waits to be merged into one
    /// webhook; zero sends every event on its own.
    pub webhook_coalesce: Duration,
    /// Record the per-request HTTP series (`REPLICAS_HTTP_METRICS`).
    pub http_metrics: bool,
    pub max_diff_bytes: usize,
    /// Extra variable names (`NAME` or `PREFIX*`) children receive on top of
    /// the allow-list in `process`.
    pub child_env: Vec<String>,
    /// Cap of one message's text (bytes); longer is 413.
    pub max_message_bytes: usize,
    /// Messages one chat may have waiting; one more is 429 `queue_full`.
    pub max_queued_messages: usize,
}

impl Config {
    /// Load from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&std::env::vars().collect())
    }

    /// Load from an explicit variable map (tests use this).
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::load(vars, true)
    }

    /// Load everything but the secret (which may be absent): `doctor`
    /// checks the secret on its own.
    pub fn from_vars_without_secret(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::load(vars, false)
    }

    /// Load for `replicas-engine warm`, which never serves and runs before
    /// the server is configured (pre-warming): the secret may be absent.
    pub fn from_env_for_warm() -> Result<Self, ConfigError> {
        Self::from_vars_for_warm(&std::env::vars().collect())
    }

    /// [`from_env_for_warm`](Self::from_env_for_warm) from an explicit map.
    pub fn from_vars_for_warm(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::load(vars, false)
    }

    fn load(vars: &HashMap<String, String>, need_secret: bool) -> Result<Self, ConfigError> {
        // An empty value is treated like an unset one: systemd EnvironmentFile
        // lines such as `MONOLITH_URL=` are common.
        let get = |k: &str| vars.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());

        let secret = match get("REPLICAS_ENGINE_SECRET") {
            Some(s) => s,
            None if !need_secret => "",
            None => {
                return Err(invalid(
                    "REPLICAS_ENGINE_SECRET",
                    "is required and must not be empty",
                ))
            }
        };

        let port = match (get("PORT"), get("REPLICAS_ENGINE_PORT")) {
            (Some(v), _) => parse_port("PORT", v)?,
            (None, Some(v)) => parse_port("REPLICAS_ENGINE_PORT", v)?,
            (None, None) => 3737,
        };
        let host = match get("HOST") {
            Some(v) => v
                .parse::<IpAddr>()
                .map_err(|_| invalid("HOST", format!("{v:?} is not an IP address")))?,
            None => IpAddr::from([0, 0, 0, 0]),
        };

        let monolith_url = match get("MONOLITH_URL") {
            Some(v) => {
                let url = url::Url::parse(v)
                    .map_err(|e| invalid("MONOLITH_URL", format!("{v:?} is not a URL ({e})")))?;
                if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                    return Err(invalid(
                        "MONOLITH_URL",
                        format!("{v:?} must be an http(s) URL"),
                    ));
                }
                // The secret travels as a Bearer token: plain http only
                // where nobody can listen in.
                if url.scheme() == "http" && !is_loopback(&url) {
                    return Err(invalid(
                        "MONOLITH_URL",
                        "must use https (plain http is allowed only to a loopback host)",
                    ));
                }
                Some(url)
            }
            None => None,
        };
        let workspace_id = get("WORKSPACE_ID").map(str::to_owned);
        if monolith_url.is_some() && workspace_id.is_none() {
            return Err(invalid(
                "WORKSPACE_ID",
                "is required when MONOLITH_URL is set",
            ));
        }

        let home = match get("WORKSPACE_HOME").or_else(|| get("HOME")) {
            Some(v) => PathBuf::from(v),
            None => dirs::home_dir().ok_or_else(|| {
                invalid("WORKSPACE_HOME", "is unset and no home directory is known")
            })?,
        };
        if !home.is_absolute() {
            return Err(invalid("WORKSPACE_HOME", "must be an absolute path"));
        }
        let workspaces_dir = match get("REPLICAS_WORKSPACES_DIR") {
            Some(v) => absolute("REPLICAS_WORKSPACES_DIR", v)?,
            None => home.join("workspaces"),
        };
        let ready_file = match get("REPLICAS_READY_FILE") {
            Some(v) => absolute("REPLICAS_READY_FILE", v)?,
            None => PathBuf::from("/var/log/cloud-init-output.log"),
        };

        let tool = |var: &'static str, name: &str| {
            get(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(name))
        };

        Ok(Self {
            secret: Secret::new(secret),
            host,
            port,
            workspace_id,
            monolith_url,
            paths: Paths::new(&home),
            workspaces_dir,
            ready_file,
            default_branch: get("REPLICAS_DEFAULT_BRANCH").map(str::to_owned),
            claude_bin: tool("CLAUDE_BIN", "claude"),
            codex_bin: tool("CODEX_BIN", "codex"),
            gh_bin: tool("GH_BIN", "gh"),
            git_bin: tool("GIT_BIN", "git"),
            max_body_bytes: parse_num(
                "REPLICAS_MAX_BODY_BYTES",
                get("REPLICAS_MAX_BODY_BYTES"),
                10 * 1024 * 1024,
            )?,
            events_max_bytes: parse_num(
                "REPLICAS_EVENTS_MAX_BYTES",
                get("REPLICAS_EVENTS_MAX_BYTES"),
                64 * 1024 * 1024,
            )?,
            turn_timeout: Duration::from_secs(parse_num(
                "REPLICAS_TURN_TIMEOUT_SECS",
                get("REPLICAS_TURN_TIMEOUT_SECS"),
                3600,
            )?),
            provider_idle: Duration::from_secs(parse_num(
                "REPLICAS_PROVIDER_IDLE_SECS",
                get("REPLICAS_PROVIDER_IDLE_SECS"),
                600,
            )?),
            max_agent_processes: parse_num(
                "REPLICAS_MAX_AGENT_PROCESSES",
                get("REPLICAS_MAX_AGENT_PROCESSES"),
                8,
            )?,
            codex_app_server: match get("REPLICAS_CODEX_TRANSPORT") {
                Some("exec") => false,
                None | Some("app-server") => true,
                Some(v) => {
                    return Err(invalid(
                        "REPLICAS_CODEX_TRANSPORT",
                        format!("{v:?} is not exec or app-server"),
                    ))
                }
            },
            sse_keepalive: Duration::from_secs(parse_num(
                "REPLICAS_SSE_KEEPALIVE_SECS",
                get("REPLICAS_SSE_KEEPALIVE_SECS"),
                15,
            )?),
            sse_coalesce: Duration::from_millis(parse_num_or_zero(
                "REPLICAS_SSE_COALESCE_MS",
                get("REPLICAS_SSE_COALESCE_MS"),
                5,
            )?),
            header_read_timeout: Duration::from_millis(parse_num(
                "REPLICAS_HEADER_READ_TIMEOUT_MS",
                get("REPLICAS_HEADER_READ_TIMEOUT_MS"),
                10_000,
            )?),
            max_connections: parse_num(
                "REPLICAS_MAX_CONNECTIONS",
                get("REPLICAS_MAX_CONNECTIONS"),
                1024,
            )?,
            max_subscribers: parse_num(
                "REPLICAS_MAX_SUBSCRIBERS",
                get("REPLICAS_MAX_SUBSCRIBERS"),
                256,
            )?,
            upstream_timeout: Duration::from_millis(parse_num(
                "REPLICAS_UPSTREAM_TIMEOUT_MS",
                get("REPLICAS_UPSTREAM_TIMEOUT_MS"),
                30_000,
            )?),
            upstream_retry_base: Duration::from_millis(parse_num(
                "REPLICAS_UPSTREAM_RETRY_BASE_MS",
                get("REPLICAS_UPSTREAM_RETRY_BASE_MS"),
                500,
            )?),
            webhook_outbox_max_events: parse_num(
                "REPLICAS_WEBHOOK_OUTBOX_MAX_EVENTS",
                get("REPLICAS_WEBHOOK_OUTBOX_MAX_EVENTS"),
                50_000,
            )?,
            webhook_outbox_max_bytes: parse_num(
                "REPLICAS_WEBHOOK_OUTBOX_MAX_BYTES",
                get("REPLICAS_WEBHOOK_OUTBOX_MAX_BYTES"),
                64 * 1024 * 1024,
            )?,
            webhook_coalesce: Duration::from_millis(parse_num_or_zero(
                "REPLICAS_WEBHOOK_COALESCE_MS",
                get("REPLICAS_WEBHOOK_COALESCE_MS"),
                250,
            )?),
            http_metrics: match get("REPLICAS_HTTP_METRICS") {
                None | Some("1") => true,
                Some("0") => false,
                Some(v) => {
                    return Err(invalid(
                        "REPLICAS_HTTP_METRICS",
                        format!("{v:?} is not 0 or 1"),
                    ))
                }
            },
            max_diff_bytes: parse_num(
                "REPLICAS_MAX_DIFF_BYTES",
                get("REPLICAS_MAX_DIFF_BYTES"),
                2 * 1024 * 1024,
            )?,
            child_env: get("REPLICAS_CHILD_ENV")
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
            max_message_bytes: parse_num(
                "REPLICAS_MAX_MESSAGE_BYTES",
                get("REPLICAS_MAX_MESSAGE_BYTES"),
                1024 * 1024,
            )?,
            max_queued_messages: parse_num(
                "REPLICAS_MAX_QUEUED_MESSAGES",
                get("REPLICAS_MAX_QUEUED_MESSAGES"),
                100,
            )?,
        })
    }

    /// A config for tests: a temp home, workspaces under it, ready file absent.
    pub fn for_home(home: &Path, secret: &str) -> Self {
        let mut vars = HashMap::new();
        vars.insert("REPLICAS_ENGINE_SECRET".into(), secret.into());
        vars.insert("WORKSPACE_HOME".into(), home.display().to_string());
        vars.insert(
            "REPLICAS_READY_FILE".into(),
            home.join("ready").display().to_string(),
        );
        Self::from_vars(&vars).expect("test config is valid")
    }
}

/// `localhost`, `127.0.0.0/8` or `::1`.
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Read a `KEY=VALUE` env file (the `--env-file` flag) into a map without
/// touching the process environment, so its values never reach a child.
pub fn read_env_file(path: &Path) -> Result<HashMap<String, String>, String> {
    let iter = dotenvy::from_path_iter(path).map_err(|e| format!("{}: {e}", path.display()))?;
    iter.map(|item| item.map_err(|e| format!("{}: {e}", path.display())))
        .collect()
}

fn parse_port(var: &'static str, v: &str) -> Result<u16, ConfigError> {
    v.parse::<u16>()
        .map_err(|_| invalid(var, format!("{v:?} is not a port number (0-65535)")))
}

fn parse_num<T: std::str::FromStr + PartialOrd + Default>(
    var: &'static str,
    v: Option<&str>,
    default: T,
) -> Result<T, ConfigError> {
    match v {
        None => Ok(default),
        Some(v) => match v.parse::<T>() {
            Ok(n) if n > T::default() => Ok(n),
            _ => Err(invalid(var, format!("{v:?} is not a positive integer"))),
        },
    }
}

/// Like [`parse_num`], but 0 is allowed (it switches something off).
fn parse_num_or_zero(var: &'static str, v: Option<&str>, default: u64) -> Result<u64, ConfigError> {
    match v {
        None => Ok(default),
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| invalid(var, format!("{v:?} is not a non-negative integer"))),
    }
}

fn absolute(var: &'static str, v: &str) -> Result<PathBuf, ConfigError> {
    let p = PathBuf::from(v);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(invalid(var, format!("{v:?} must be an absolute path")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        let mut m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.entry("WORKSPACE_HOME".into())
            .or_insert_with(|| "/home/u".into());
        m
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        Config::from_vars(&vars(pairs)).unwrap_err().to_string()
    }

    #[test]
    fn secret_is_required() {
        assert!(err(&[]).starts_with("REPLICAS_ENGINE_SECRET:"));
        assert!(err(&[("REPLICAS_ENGINE_SECRET", "  ")]).starts_with("REPLICAS_ENGINE_SECRET:"));
    }

    #[test]
    fn defaults_derive_from_home() {
        let c = Config::from_vars(&vars(&[("REPLICAS_ENGINE_SECRET", "s")])).unwrap();
        assert_eq!(c.port, 3737);
        assert_eq!(c.host.to_string(), "0.0.0.0");
        assert_eq!(c.workspaces_dir, PathBuf::from("/home/u/workspaces"));
        assert_eq!(
            c.paths.events_file,
            PathBuf::from("/home/u/.replicas/engine/events.jsonl")
        );
        assert_eq!(c.max_body_bytes, 10 * 1024 * 1024);
        assert_eq!(c.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.max_subscribers, 256);
        assert_eq!(c.max_message_bytes, 1024 * 1024);
        assert_eq!(c.max_queued_messages, 100);
        assert!(c.monolith_url.is_none());
        assert_eq!(c.provider_idle, Duration::from_secs(600));
        assert_eq!(c.max_agent_processes, 8);
        assert_eq!(
            c.paths.claude_bedrock_credentials_file,
            PathBuf::from("/home/u/.claude/.bedrock-credentials.json")
        );
        assert_eq!(
            (&c.paths.history_dir, &c.paths.attachments_dir),
            (
                &PathBuf::from("/home/u/.replicas/engine/history"),
                &PathBuf::from("/home/u/.replicas/engine/attachments")
            )
        );
    }

    #[test]
    fn agent_process_bounds_are_positive() {
        let c = Config::from_vars(&vars(&[
            ("REPLICAS_ENGINE_SECRET", "s"),
            ("REPLICAS_PROVIDER_IDLE_SECS", "1"),
            ("REPLICAS_MAX_AGENT_PROCESSES", "1"),
        ]))
        .unwrap();
        assert_eq!(c.provider_idle, Duration::from_secs(1));
        assert_eq!(c.max_agent_processes, 1);
        assert!(c.codex_app_server, "app-server is the default");
        let c = Config::from_vars(&vars(&[
            ("REPLICAS_ENGINE_SECRET", "s"),
            ("REPLICAS_CODEX_TRANSPORT", "exec"),
        ]))
        .unwrap();
        assert!(!c.codex_app_server);
        assert!(err(&[
            ("REPLICAS_ENGINE_SECRET", "s"),
            ("REPLICAS_CODEX_TRANSPORT", "rpc")
        ])
        .starts_with("REPLICAS_CODEX_TRANSPORT"));
        for var in [
            "REPLICAS_PROVIDER_IDLE_SECS",
            "REPLICAS_MAX_AGENT_PROCESSES",
        ] {
            assert!(err(&[("REPLICAS_ENGINE_SECRET", "s"), (var, "0")]).starts_with(var));
            assert!(err(&[("REPLICAS_ENGINE_SECRET", "s"), (var, "many")]).starts_with(var));
        }
        assert_eq!(c.webhook_coalesce, Duration::from_millis(250));
        assert_eq!(c.sse_coalesce, Duration::from_millis(5));
    }

    #[test]
    fn coalescing_can_be_switched_off_but_not_garbled() {
        type Field = fn(&Config) -> Duration;
        let cases: [(&str, &str, Field); 2] = [
            ("REPLICAS_SSE_COALESCE_MS", "soon", |c| c.sse_coalesce),
            ("REPLICAS_WEBHOOK_COALESCE_MS", "-1", |c| c.webhook_coalesce),
        ];
        for (name, garbled, field) in cases {
            let c =
                Config::from_vars(&vars(&[("REPLICAS_ENGINE_SECRET", "s"), (name, "0")])).unwrap();
            assert_eq!(field(&c), Duration::ZERO, "{name}");
            assert!(
                err(&[("REPLICAS_ENGINE_SECRET", "s"), (name, garbled)])
                    .starts_with(&format!("{name}:")),
                "{name}"
            );
        }
    }

    #[test]
    fn port_alias_and_precedence() {
        let c = Config::from_vars(&vars(&[
            ("REPLICAS_ENGINE_SECRET", "s"),
            ("REPLICAS_ENGINE_PORT", "4000"),
        ]))
        .unwrap();
        assert_eq!(c.port, 4000);
        let c = Config::from_vars(&vars(&[
            ("REPLICAS_ENGINE_SECRET", "s"),
            ("PORT", "5000"),
            ("REPLICAS_ENGINE_PORT", "4000"),
        ]))
        .unwrap();
        assert_eq!(c.port, 5000);
    }

    #[test]
    fn invalid_values_name_the_variable() {
        assert!(err(&[("REPLICAS_ENGINE_SECRET", "s"), ("PORT", "abc")]).starts_with("PORT:"));
        assert!(err(&[("REPLICAS_ENGINE_SECRET", "s"), ("PORT", "70000")]).starts_with("PORT:"));
        assert!(err(&[("REPLICAS_ENGINE_SECRET", "s"), ("HOST", "nope")]).starts_with("HOST:"));
        assert!(err(&[
            ("REPLICAS_ENGINE_SECRET", "s"),
            ("MONOLITH_URL", "not a url"),
            ("WORKSPACE_ID", "w")
        ])
        .starts_with("MONOLITH_URL:"));
        assert!(err(&[
            ("REPLICAS_ENGINE_SECRET", "s"),
            ("MONOLITH_URL", "ftp://x"),
            ("WORKSPACE_ID", "w")
        ])
        .starts_with("MONOLITH_URL:"));
        assert!(err(&[
            ("REPLICAS_ENGINE_SECRET", "s"),
            ("MONOLITH_URL", "https://x")
        ])
        .starts_with("WORKSPACE_ID:"));
        assert!(err(&[
            ("REPLICAS_ENGINE_SECRET", "s"),
            ("REPLICAS_MAX_BODY_BYTES", "-1")
        ])
        .starts_with("REPLICAS_MAX_BODY_BYTES:"));
        assert!(err(&[
            ("REPLICAS_ENGINE_SECRET", "s"),
            ("REPLICAS_WORKSPACES_DIR", "rel/dir")
        ])
        .starts_with("REPLICAS_WORKSPACES_DIR:"));
    }

    #[test]
    fn plain_http_backend_only_on_loopback() {
        for bad in [
            "http://monolith.example.com",
            "http://10.0.0.5:8080/api",
            "http://[fe80::1]/",
        ] {
            let e = err(&[
                ("REPLICAS_ENGINE_SECRET", "s"),
                ("MONOLITH_URL", bad),
                ("WORKSPACE_ID", "w"),
            ]);
            assert!(
                e.starts_with("MONOLITH_URL:") && e.contains("https"),
                "{bad}: {e}"
            );
        }
        for good in [
            "https://monolith.example.com",
            "http://127.0.0.1:9000",
            "http://localhost/",
            "http://[::1]:80",
        ] {
            let c = Config::from_vars(&vars(&[
                ("REPLICAS_ENGINE_SECRET", "s"),
                ("MONOLITH_URL", good),
                ("WORKSPACE_ID", "w"),
            ]));
            assert!(c.is_ok(), "{good}: {:?}", c.err());
        }
    }

    #[test]
    fn child_env_patterns_are_split() {
        let c = Config::from_vars(&vars(&[
            ("REPLICAS_ENGINE_SECRET", "s"),
            ("REPLICAS_CHILD_ENV", " FAKE_* , MOCK_API_KEY,,"),
        ]))
        .unwrap();
        assert_eq!(c.child_env, vec!["FAKE_*", "MOCK_API_KEY"]);
    }

    #[test]
    fn env_file_is_read_without_touching_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("env");
        std::fs::write(
            &p,
            "# comment\nREPLICAS_TEST_ENV_FILE_ONLY=from-file\nPORT=4000\n",
        )
        .unwrap();
        let m = read_env_file(&p).unwrap();
        assert_eq!(m["REPLICAS_TEST_ENV_FILE_ONLY"], "from-file");
        assert_eq!(m["PORT"], "4000");
        assert!(std::env::var_os("REPLICAS_TEST_ENV_FILE_ONLY").is_none());
        assert!(read_env_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn warm_needs_no_secret() {
        let c = Config::load(&vars(&[]), false).unwrap();
        assert_eq!(c.max_diff_bytes, 2 * 1024 * 1024);
    }

    #[test]
    fn secret_never_debug_printed() {
        let c = Config::from_vars(&vars(&[("REPLICAS_ENGINE_SECRET", "hunter2")])).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
