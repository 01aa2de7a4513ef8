//! Upstream (engine → backend) against a mock backend written here: an axum
//! server on 127.0.0.1:0 that records every request and can be told, per
//! endpoint, to answer normally, fail with a status, hang, or send garbage
//! — for the next N requests or from now on.
//!
//! Through the real server: headers, credential files and modes, health and
//! status, error events, webhooks of those events with retries, replay after
//! `kill -9`, the outbox bound. Through the library (an `EventBus` we publish
//! to directly, since chat routes live elsewhere): webhook type filtering
//! and order under failures, refresh coalescing, no torn credential files.

#[allow(unused_imports)] // not every test file uses every harness export
mod common;

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::{EngineSpec, TestEngine, SECRET};
use serde_json::{json, Value};

const WEBHOOK: &str = "/v1/engine/webhook";
const GITHUB: &str = "/v1/engine/github/refresh-token";
const CLAUDE: &str = "/v1/engine/claude/refresh-credentials";
const CODEX: &str = "/v1/engine/codex/refresh-credentials";

// ---------------------------------------------------------------- mock backend

#[derive(Clone, Copy, Debug, PartialEq)]
enum Behavior {
    Normal,
    Status(u16),
    /// A status with `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    Hang,
    Garbage,
}

#[derive(Clone, Debug)]
struct Recorded {
    path: String,
    authorization: Option<String>,
    workspace_id: Option<String>,
    body: Value,
    /// What the mock answered (0 = hung).
    answered: u16,
    /// When it arrived.
    at: std::time::Instant,
}

#[derive(Default)]
struct MockState {
    requests: Vec<Recorded>,
    /// Per path: behaviours for the next requests, then the default.
    next: HashMap<String, VecDeque<Behavior>>,
    default: HashMap<String, Behavior>,
    counter: u64,
}

#[derive(Clone, Default)]
struct Mock {
    state: Arc<Mutex<MockState>>,
}

impl Mock {
    async fn start() -> (Self, String) {
        let mock = Self::default();
        let app = axum::Router::new().fallback({
            let mock = mock.clone();
            move |uri: Uri, headers: HeaderMap, body: Bytes| {
                let mock = mock.clone();
                async move { mock.handle(uri, headers, body).await }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (mock, url)
    }

    /// From now on, `path` behaves like this.
    fn set(&self, path: &str, b: Behavior) {
        self.state.lock().unwrap().default.insert(path.into(), b);
    }

    /// The next `n` requests to `path` behave like this.
    fn fail_next(&self, path: &str, n: usize, b: Behavior) {
        self.state
            .lock()
            .unwrap()
            .next
            .entry(path.into())
            .or_default()
            .extend(std::iter::repeat_n(b, n));
    }

    fn requests(&self, path: &str) -> Vec<Recorded> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Events the backend accepted (2xx) through the webhook, in order.
    fn delivered(&self) -> Vec<Value> {
        self.requests(WEBHOOK)
            .into_iter()
            .filter(|r| r.answered == 200)
            .map(|r| r.body["event"].clone())
            .collect()
    }

    fn delivered_ids(&self) -> Vec<u64> {
        self.delivered()
            .iter()
            .map(|e| e["id"].as_str().unwrap().parse().unwrap())
            .collect()
    }

    async fn handle(&self, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
        let path = uri.path().to_owned();
        let header = |k: &str| {
            headers
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (behavior, n) = {
            let mut st = self.state.lock().unwrap();
            let b = st
                .next
                .get_mut(&path)
                .and_then(VecDeque::pop_front)
                .unwrap_or_else(|| st.default.get(&path).copied().unwrap_or(Behavior::Normal));
            st.counter += 1;
            let answered = match b {
                Behavior::Normal | Behavior::Garbage => 200,
                Behavior::Status(s) | Behavior::RetryAfter(s, _) => s,
                Behavior::Hang => 0,
            };
            st.requests.push(Recorded {
                path: path.clone(),
                authorization: header("authorization"),
                workspace_id: header("x-workspace-id"),
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                answered,
                at: std::time::Instant::now(),
            });
            (b, st.counter)
        };
        match behavior {
            Behavior::Hang => std::future::pending().await,
            Behavior::Status(s) => (StatusCode::from_u16(s).unwrap(), "nope").into_response(),
            Behavior::RetryAfter(s, secs) => (
                StatusCode::from_u16(s).unwrap(),
                [("retry-after", secs.to_string())],
                "slow down",
            )
                .into_response(),
            Behavior::Garbage => (StatusCode::OK, "<html>surprise</html>").into_response(),
            Behavior::Normal => {
                let expires = chrono::Utc::now() + chrono::Duration::hours(1);
                let body = match path.as_str() {
                    GITHUB => {
                        json!({"token": format!("ghs_token{n}"), "expiresAt": expires.to_rfc3339()})
                    }
                    CLAUDE => json!({"credentials": {"claudeAiOauth": {
                        "accessToken": format!("sk-ant-oat-{n}"), "refreshToken": format!("sk-ant-ort-{n}"),
                        "expiresAt": expires.timestamp_millis(), "scopes": ["user:inference"],
                        // Padding so a torn write would be likely to show.
                        "padding": "p".repeat(64 * 1024)}}}),
                    CODEX => {
                        json!({"auth": {"tokens": {"access_token": format!("at-{n}"), "refresh_token": format!("rt-{n}")},
                        "last_refresh": chrono::Utc::now().to_rfc3339()}})
                    }
                    _ => json!({"ok": true}),
                };
                axum::Json(body).into_response()
            }
        }
    }
}

// ---------------------------------------------------------------- helpers

async fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A spec pointing at the mock, with fast retries and a short timeout.
fn spec_for(url: &str) -> (EngineSpec, Arc<tempfile::TempDir>) {
    let (spec, guard) = EngineSpec::new();
    let spec = spec
        .with("MONOLITH_URL", url)
        .with("REPLICAS_UPSTREAM_TIMEOUT_MS", "400")
        .with("REPLICAS_UPSTREAM_RETRY_BASE_MS", "20");
    (spec, guard)
}

async fn health(e: &TestEngine) -> (u16, Value) {
    let res = e.get("/token-refresh/health").send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

async fn wait_health(e: &TestEngine, what: &str, pred: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = health(e).await;
        if pred(code, &body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; last: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

// ---------------------------------------------------------------- through the real server

#[tokio::test]
async fn without_monolith_url_everything_is_disabled() {
    let e = TestEngine::start().await;
    let (code, body) = health(&e).await;
    assert_eq!(code, 200);
    assert_eq!(body["healthy"], true);
    for m in ["github", "claude", "codex"] {
        assert_eq!(body["managers"][m]["status"], "disabled", "{body}");
        assert_eq!(body["managers"][m]["consecutiveFailures"], 0);
        assert!(body["managers"][m]["lastAttemptAt"].is_null());
    }
    let status = e.get_json("/status", 200).await;
    assert_eq!(
        status["tokenRefresh"],
        json!({"github":"disabled","claude":"disabled","codex":"disabled"})
    );
    assert!(!e
        .home()
        .join(".replicas/engine/webhook-outbox.jsonl")
        .exists());
    e.shutdown().await;
}

#[tokio::test]
async fn refresh_writes_credential_files_merging_what_was_there() {
    let (mock, url) = Mock::start().await;
    let (spec, guard) = spec_for(&url);
    let home = spec.home.clone();
    // Files the user (or the CLIs) already had.
    std::fs::write(
        home.join(".git-credentials"),
        "https://bob:pw@gitlab.com\nhttps://x-access-token:old@github.com\n",
    )
    .unwrap();
    std::fs::create_dir_all(home.join(".claude")).unwrap();
    std::fs::write(
        home.join(".claude/.credentials.json"),
        r#"{"claudeAiOauth":{"accessToken":"old","subscriptionType":"max"},"mcpOAuth":{"x":1}}"#,
    )
    .unwrap();
    std::fs::create_dir_all(home.join(".codex")).unwrap();
    std::fs::write(
        home.join(".codex/auth.json"),
        r#"{"OPENAI_API_KEY":null,"tokens":{"account_id":"acc_1","access_token":"old"}}"#,
    )
    .unwrap();

    let e = TestEngine::start_spec(spec, guard).await;
    let body = wait_health(&e, "three successes", |code, b| {
        code == 200
            && ["github", "claude", "codex"]
                .iter()
                .all(|m| b["managers"][m]["lastSuccessAt"].is_string())
    })
    .await;
    for m in ["github", "claude", "codex"] {
        let s = &body["managers"][m];
        assert_eq!(s["status"], "ok");
        assert_eq!(s["consecutiveFailures"], 0);
        assert!(s["lastError"].is_null());
        assert!(
            s["lastAttemptAt"].is_string() && s["nextAttemptAt"].is_string(),
            "{s}"
        );
        // expiresAt is an hour away, so the next attempt is well in the future.
        assert!(s["nextAttemptAt"].as_str().unwrap() > s["lastSuccessAt"].as_str().unwrap());
    }
    // The contract's schedule: a 60-minute token is refreshed 5 minutes
    // before expiry, i.e. 55 minutes after it was fetched (codex gives no
    // expiry: every 45 minutes).
    let at = |m: &str, f: &str| {
        chrono::DateTime::parse_from_rfc3339(body["managers"][m][f].as_str().unwrap()).unwrap()
    };
    for (m, minutes) in [("github", 55), ("claude", 55), ("codex", 45)] {
        let gap = (at(m, "nextAttemptAt") - at(m, "lastSuccessAt")).num_seconds();
        assert!(
            (minutes * 60 - 30..=minutes * 60 + 5).contains(&gap),
            "{m}: next refresh {gap} s after the last one, expected ~{minutes} min"
        );
    }
    assert_eq!(
        e.get_json("/status", 200).await["tokenRefresh"],
        json!({"github":"ok","claude":"ok","codex":"ok"})
    );

    // Every call carries the secret and the workspace id.
    for path in [GITHUB, CLAUDE, CODEX] {
        let reqs = mock.requests(path);
        assert!(!reqs.is_empty(), "{path}");
        for r in reqs {
            assert_eq!(
                r.authorization.as_deref(),
                Some(format!("Bearer {SECRET}").as_str())
            );
            assert_eq!(r.workspace_id.as_deref(), Some("ws_test"));
        }
    }

    let git = std::fs::read_to_string(home.join(".git-credentials")).unwrap();
    let lines: Vec<_> = git.lines().collect();
    assert_eq!(lines.len(), 2, "{git}");
    assert_eq!(lines[0], "https://bob:pw@gitlab.com");
    assert!(
        lines[1].starts_with("https://x-access-token:ghs_token")
            && lines[1].ends_with("@github.com"),
        "{git}"
    );
    assert_eq!(mode(&home.join(".git-credentials")), 0o600);

    let claude = read_json(&home.join(".claude/.credentials.json"));
    assert!(claude["claudeAiOauth"]["accessToken"]
        .as_str()
        .unwrap()
        .starts_with("sk-ant-oat-"));
    assert_eq!(claude["claudeAiOauth"]["subscriptionType"], "max", "kept");
    assert_eq!(claude["mcpOAuth"], json!({"x": 1}), "kept");
    assert_eq!(mode(&home.join(".claude/.credentials.json")), 0o600);

    let codex = read_json(&home.join(".codex/auth.json"));
    assert!(codex["tokens"]["access_token"]
        .as_str()
        .unwrap()
        .starts_with("at-"));
    assert_eq!(codex["tokens"]["account_id"], "acc_1", "kept");
    assert!(codex.get("OPENAI_API_KEY").is_some(), "kept");
    assert_eq!(mode(&home.join(".codex/auth.json")), 0o600);

    // No token ever reaches the log.
    let logs = e.logs();
    assert!(
        !logs.contains("ghs_token") && !logs.contains("sk-ant-") && !logs.contains(SECRET),
        "{logs}"
    );
    e.shutdown().await;
}

#[tokio::test]
async fn failing_backend_makes_managers_failing_publishes_one_error_each_and_recovers() {
    let (mock, url) = Mock::start().await;
    mock.set(GITHUB, Behavior::Garbage);
    mock.set(CLAUDE, Behavior::Status(500));
    mock.set(CODEX, Behavior::Hang);
    let (spec, guard) = spec_for(&url);
    let e = TestEngine::start_spec(spec, guard).await;

    let body = wait_health(&e, "all failing twice", |code, b| {
        code == 503
            && ["github", "claude", "codex"]
                .iter()
                .all(|m| b["managers"][m]["consecutiveFailures"].as_u64() >= Some(2))
    })
    .await;
    assert_eq!(body["healthy"], false);
    assert!(
        body["managers"]["github"]["lastError"]
            .as_str()
            .unwrap()
            .contains("not JSON"),
        "{body}"
    );
    assert!(
        body["managers"]["claude"]["lastError"]
            .as_str()
            .unwrap()
            .contains("500"),
        "{body}"
    );
    assert!(
        body["managers"]["codex"]["lastError"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{body}"
    );
    assert!(body["managers"]["github"]["lastSuccessAt"].is_null());
    assert_eq!(
        e.get_json("/status", 200).await["tokenRefresh"]["claude"],
        "failing"
    );
    // Nothing was written from a bad answer.
    assert!(!e.home().join(".git-credentials").exists());

    // One `error` event per manager for the whole failing streak.
    let mut sse = e.events("since=0&types=error").await;
    let mut sources = Vec::new();
    while let Some(ev) = sse.next_event(Duration::from_millis(300)).await {
        let v = ev.json();
        assert_eq!(v["payload"]["code"], "token_refresh_failed");
        sources.push(v["payload"]["source"].as_str().unwrap().to_owned());
    }
    sources.sort();
    assert_eq!(sources, ["claude", "codex", "github"]);

    // Those events reached the backend as webhooks, with the headers.
    let delivered = eventually("3 error webhooks", Duration::from_secs(10), || {
        let d = mock.delivered();
        (d.len() >= 3).then_some(d)
    })
    .await;
    for r in mock.requests(WEBHOOK) {
        assert_eq!(
            r.authorization.as_deref(),
            Some(format!("Bearer {SECRET}").as_str())
        );
        assert_eq!(r.workspace_id.as_deref(), Some("ws_test"));
        assert_eq!(r.body["workspaceId"], "ws_test");
    }
    assert!(delivered
        .iter()
        .all(|ev| ev["type"] == "error" && ev["ts"].is_string()));

    // The backend comes back: healthy again. It has no Codex credential for
    // this workspace (404): that manager is `disabled`, not failing.
    mock.set(GITHUB, Behavior::Normal);
    mock.set(CLAUDE, Behavior::Normal);
    mock.set(CODEX, Behavior::Status(404));
    let body = wait_health(&e, "recovery", |code, b| {
        code == 200
            && b["managers"]["github"]["status"] == "ok"
            && b["managers"]["claude"]["status"] == "ok"
            && b["managers"]["codex"]["status"] == "disabled"
    })
    .await;
    assert_eq!(body["managers"]["codex"]["consecutiveFailures"], 0);
    assert!(
        body["managers"]["codex"]["lastError"]
            .as_str()
            .unwrap()
            .contains("404"),
        "{body}"
    );
    assert!(e.home().join(".git-credentials").exists());
    e.shutdown().await;
}

#[tokio::test]
async fn webhooks_retry_survive_kill9_and_arrive_in_order() {
    let (mock, url) = Mock::start().await;
    // Three error events (one per manager) while the webhook endpoint is down.
    for p in [GITHUB, CLAUDE, CODEX] {
        mock.set(p, Behavior::Status(500));
    }
    mock.set(WEBHOOK, Behavior::Status(503));
    let (spec, guard) = spec_for(&url);
    let e = TestEngine::start_spec(spec, guard).await;
    let outbox = e.home().join(".replicas/engine/webhook-outbox.jsonl");
    eventually("3 events in the outbox", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&outbox).ok()?;
        (text.lines().count() == 3).then_some(())
    })
    .await;
    // The sender keeps retrying the first one.
    eventually("retries", Duration::from_secs(10), || {
        (mock.requests(WEBHOOK).len() >= 3).then_some(())
    })
    .await;
    let first_ids: Vec<u64> = std::fs::read_to_string(&outbox)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let attempted: Vec<_> = mock
        .requests(WEBHOOK)
        .iter()
        .map(|r| r.body["event"]["id"].clone())
        .collect();
    assert!(
        attempted
            .iter()
            .all(|id| *id == json!(first_ids[0].to_string())),
        "in order: only the first is retried"
    );
    assert!(mock.delivered().is_empty());

    // kill -9, then the backend is back (after a few more failures, to see
    // retries in the new process too): the undelivered events arrive.
    for p in [GITHUB, CLAUDE, CODEX] {
        mock.set(p, Behavior::Normal);
    }
    // (Flip the mock only once the engine is dead, so the first process
    // cannot deliver anything.)
    let guard = e._home_guard.clone();
    let spec = e.kill9().await;
    mock.set(WEBHOOK, Behavior::Normal);
    mock.fail_next(WEBHOOK, 3, Behavior::Status(502));
    let e = TestEngine::start_spec(spec, guard.unwrap()).await;
    let ids = eventually("replayed webhooks", Duration::from_secs(15), || {
        let ids = mock.delivered_ids();
        (ids.len() >= 3).then_some(ids)
    })
    .await;
    assert_eq!(
        ids, first_ids,
        "exactly the undelivered events, in id order"
    );

    // A permanently rejected webhook (4xx) is skipped, not retried forever;
    // the next one still goes out. Restart to produce fresh error events.
    for p in [GITHUB, CLAUDE, CODEX] {
        mock.set(p, Behavior::Status(500));
    }
    mock.fail_next(WEBHOOK, 1, Behavior::Status(400));
    let e = e.restart().await;
    let ids = eventually(
        "events after a rejected one",
        Duration::from_secs(15),
        || {
            let ids = mock.delivered_ids();
            (ids.len() >= 5).then_some(ids)
        },
    )
    .await;
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing: {ids:?}"
    );
    let rejected: Vec<_> = mock
        .requests(WEBHOOK)
        .into_iter()
        .filter(|r| r.answered == 400)
        .collect();
    assert_eq!(rejected.len(), 1);
    assert!(!ids.contains(
        &rejected[0].body["event"]["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    ));
    e.shutdown().await;
}

#[tokio::test]
async fn outbox_bound_drops_the_oldest_and_says_so() {
    let (mock, url) = Mock::start().await;
    for p in [GITHUB, CLAUDE, CODEX] {
        mock.set(p, Behavior::Status(500));
    }
    mock.set(WEBHOOK, Behavior::Status(503));
    let (spec, guard) = spec_for(&url);
    let spec = spec.with("REPLICAS_WEBHOOK_OUTBOX_MAX_EVENTS", "2");
    let e = TestEngine::start_spec(spec, guard).await;
    let mut sse = e.events("since=0&types=error").await;
    let (overflow, before) = sse
        .wait_for(Duration::from_secs(15), |ev| {
            ev.json()["payload"]["code"] == "webhook_outbox_overflow"
        })
        .await;
    let v = overflow.json();
    assert_eq!(v["payload"]["source"], "webhooks");
    assert!(
        v["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("dropped the 1 oldest"),
        "{v}"
    );
    let refresh_errors: Vec<u64> = before.iter().filter_map(|ev| ev.id_num()).collect();
    assert_eq!(refresh_errors.len(), 3);

    // The backend comes back: only the newest two arrive, in order.
    mock.set(WEBHOOK, Behavior::Normal);
    let ids = eventually("the two retained", Duration::from_secs(10), || {
        let ids = mock.delivered_ids();
        (ids.len() >= 2).then_some(ids)
    })
    .await;
    assert_eq!(ids, vec![refresh_errors[2], overflow.id_num().unwrap()]);
    e.shutdown().await;
}

// ---------------------------------------------------------------- through the library

mod library {
    use super::*;
    use replicas_engine::chats::{Chat, ChatRecord};
    use replicas_engine::config::{Paths, Secret};
    use replicas_engine::events::{EventBus, EventKind};
    use replicas_engine::hooks::runner::CommandState;
    use replicas_engine::hooks::{HookProgress, HooksStatus};
    use replicas_engine::upstream::client::UpstreamClient;
    use replicas_engine::upstream::outbox::{Outbox, OutboxConfig};
    use replicas_engine::upstream::{TokenRefresh, Webhooks};
    use tokio_util::sync::CancellationToken;

    fn client(url: &str) -> Arc<UpstreamClient> {
        Arc::new(
            UpstreamClient::new(
                &url.parse().unwrap(),
                &Secret::new(SECRET),
                "ws_lib",
                Duration::from_secs(2),
            )
            .unwrap(),
        )
    }

    /// A real wire chat with id `c_{i}`.
    fn wire_chat(i: usize) -> Box<Chat> {
        let record: ChatRecord = serde_json::from_value(json!({
            "id": format!("c_{i}"), "provider": "claude", "title": "Claude chat", "model": null,
            "cwd": "/w", "providerSessionId": null, "createdAt": "t", "updatedAt": "t",
            "lastTurn": null,
        }))
        .unwrap();
        Box::new(record.view(false, true))
    }

    fn hooks_status() -> HooksStatus {
        HooksStatus {
            status: "completed".into(),
            started_at: None,
            finished_at: None,
            log_path: "/l".into(),
            repos: vec![],
        }
    }

    fn chat(kind: &str, i: usize) -> EventKind {
        match kind {
            "chat.created" => EventKind::ChatCreated { chat: wire_chat(i) },
            "chat.updated" => EventKind::ChatUpdated { chat: wire_chat(i) },
            "chat.deleted" => EventKind::ChatDeleted {},
            "chat.turn.started" => EventKind::TurnStarted {
                turn_id: format!("t_{i}"),
                message_id: "m".into(),
            },
            "chat.interrupted" => EventKind::ChatInterrupted {
                turn_id: "t".into(),
                duration_ms: 1,
            },
            "hooks.progress" => EventKind::HooksProgress(HookProgress {
                repo: "api".into(),
                index: i,
                command: "true".into(),
                status: CommandState::Running,
                exit_code: None,
                timed_out: false,
                duration_ms: None,
            }),
            "hooks.completed" => EventKind::HooksCompleted {
                status: hooks_status(),
            },
            "hooks.failed" => EventKind::HooksFailed {
                status: hooks_status(),
            },
            "engine.ready" => EventKind::EngineReady {
                version: "x".into(),
                pid: 1,
            },
            _ => EventKind::Error {
                code: "c".into(),
                message: format!("{i}"),
                source: "test".into(),
            },
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_listed_types_in_id_order_despite_failures() {
        let (mock, url) = Mock::start().await;
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open(&dir.path().join("events.jsonl"), 1 << 30).unwrap();
        let (outbox, _) = Outbox::open(OutboxConfig {
            file: dir.path().join("outbox.jsonl"),
            cursor_file: dir.path().join("cursor.json"),
            max_events: 100_000,
            max_bytes: 1 << 30,
        })
        .unwrap();
        let shutdown = CancellationToken::new();
        let hooks = Webhooks::start(
            client(&url),
            "ws_lib".into(),
            bus.clone(),
            Arc::new(outbox),
            Duration::from_millis(5),
            Duration::from_millis(250),
            shutdown.clone(),
        );

        let kinds = [
            "chat.created",
            "chat.updated",
            "chat.turn.started",
            "engine.ready",
            "hooks.progress",
            "chat.interrupted",
            "hooks.completed",
            "hooks.failed",
            "error",
            "chat.deleted",
        ];
        let mut expected = Vec::new();
        mock.fail_next(WEBHOOK, 2, Behavior::Status(503));
        for i in 0..300 {
            let kind = kinds[i % kinds.len()];
            let p = bus.publish(Some("c_1"), chat(kind, i));
            if !matches!(
                kind,
                "chat.updated" | "engine.ready" | "hooks.progress" | "chat.interrupted"
            ) {
                expected.push(p.id);
            }
            if i % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        // More failures mid-stream.
        for n in [60, 120] {
            eventually("progress", Duration::from_secs(10), || {
                (mock.delivered_ids().len() >= n).then_some(())
            })
            .await;
            mock.fail_next(WEBHOOK, 2, Behavior::Status(503));
            mock.fail_next(WEBHOOK, 1, Behavior::Hang);
        }
        let got = eventually("every webhook", Duration::from_secs(20), || {
            let ids = mock.delivered_ids();
            (ids.len() >= expected.len()).then_some(ids)
        })
        .await;
        assert_eq!(got, expected);
        assert!(
            mock.requests(WEBHOOK).iter().any(|r| r.answered == 503),
            "failures were injected"
        );
        let first = &mock.delivered()[0];
        assert_eq!(first["type"], "chat.created");
        assert_eq!(first["chatId"], "c_1");
        eventually("drained", Duration::from_secs(5), || {
            (hooks.pending() == 0).then_some(())
        })
        .await;
        assert_eq!(hooks.delivered_through(), *expected.last().unwrap());
        shutdown.cancel();
    }

    fn text_delta(item: &str, text: &str) -> EventKind {
        EventKind::TurnDelta(replicas_engine::events::TurnDelta::Text {
            turn_id: "t_1".into(),
            item_id: item.into(),
            text_delta: text.into(),
        })
    }

    /// Start the pipeline over a fresh bus and outbox in `dir`.
    fn pipeline(
        dir: &Path,
        url: &str,
        coalesce: Duration,
        shutdown: &CancellationToken,
    ) -> (EventBus, Webhooks) {
        let bus = EventBus::open(&dir.join("events.jsonl"), 1 << 30).unwrap();
        let (outbox, _) = Outbox::open(OutboxConfig {
            file: dir.join("outbox.jsonl"),
            cursor_file: dir.join("cursor.json"),
            max_events: 100_000,
            max_bytes: 1 << 30,
        })
        .unwrap();
        let hooks = Webhooks::start(
            client(url),
            "ws_lib".into(),
            bus.clone(),
            Arc::new(outbox),
            Duration::from_millis(5),
            coalesce,
            shutdown.clone(),
        );
        (bus, hooks)
    }

    /// Text deltas the backend got, concatenated per item, and the ids.
    fn delivered_text(mock: &Mock) -> (HashMap<String, String>, Vec<u64>) {
        let mut text: HashMap<String, String> = HashMap::new();
        let mut ids = Vec::new();
        for ev in mock.delivered() {
            ids.push(ev["id"].as_str().unwrap().parse().unwrap());
            if let Some(t) = ev["payload"]["textDelta"].as_str() {
                let item = ev["payload"]["itemId"].as_str().unwrap().to_owned();
                text.entry(item).or_default().push_str(t);
            }
        }
        (text, ids)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streamed_text_deltas_coalesce_into_few_posts_and_lose_nothing() {
        let (mock, url) = Mock::start().await;
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let (bus, hooks) = pipeline(dir.path(), &url, Duration::from_millis(200), &shutdown);
        // A streamed answer: 500 fragments of item a, an item delta, 100 of
        // item b, then the turn's end. A retried delivery mid-stream.
        mock.fail_next(WEBHOOK, 2, Behavior::Status(503));
        let mut want_a = String::new();
        for i in 0..500 {
            let t = format!("a{i} ");
            want_a.push_str(&t);
            bus.publish(Some("c_1"), text_delta("i_a", &t));
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let item = bus.publish(Some("c_1"), chat("chat.turn.started", 1)).id;
        let mut want_b = String::new();
        for i in 0..100 {
            let t = format!("b{i} ");
            want_b.push_str(&t);
            bus.publish(Some("c_1"), text_delta("i_b", &t));
        }
        let last = bus.publish(Some("c_1"), chat("error", 1)).id;

        eventually("the last event", Duration::from_secs(20), || {
            mock.delivered_ids().contains(&last).then_some(())
        })
        .await;
        let (text, ids) = delivered_text(&mock);
        assert_eq!(text["i_a"], want_a, "every fragment, in order");
        assert_eq!(text["i_b"], want_b);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert!(ids.contains(&item), "other events are their own POST");
        // 600 deltas, streamed over ~200 ms, in a handful of POSTs.
        assert!(ids.len() <= 20, "{} POSTs: {ids:?}", ids.len());
        // A merged event carries the last delta's id and says what it covers.
        let merged: Vec<Value> = mock
            .requests(WEBHOOK)
            .into_iter()
            .filter(|r| r.answered == 200 && r.body.get("coalesced").is_some())
            .map(|r| r.body)
            .collect();
        assert!(!merged.is_empty());
        for b in &merged {
            let first: u64 = b["coalesced"]["firstId"].as_str().unwrap().parse().unwrap();
            let id: u64 = b["event"]["id"].as_str().unwrap().parse().unwrap();
            assert_eq!(id - first + 1, b["coalesced"]["count"].as_u64().unwrap());
            assert_eq!(b["event"]["type"], "chat.turn.delta");
        }
        // The journal keeps every delta.
        let journal = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
        assert_eq!(journal.lines().count() as u64, last);
        eventually("drained", Duration::from_secs(5), || {
            (hooks.pending() == 0).then_some(())
        })
        .await;
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn coalescing_off_sends_every_delta_and_a_restart_resends_the_undelivered() {
        let (mock, url) = Mock::start().await;
        let dir = tempfile::tempdir().unwrap();
        // Backend down: the deltas wait in the outbox when the engine stops.
        mock.set(WEBHOOK, Behavior::Status(503));
        let shutdown = CancellationToken::new();
        let (bus, _hooks) = pipeline(dir.path(), &url, Duration::from_millis(250), &shutdown);
        let mut want = String::new();
        for i in 0..50 {
            let t = format!("x{i} ");
            want.push_str(&t);
            bus.publish(Some("c_1"), text_delta("i_x", &t));
        }
        eventually("a failed attempt", Duration::from_secs(10), || {
            (!mock.requests(WEBHOOK).is_empty()).then_some(())
        })
        .await;
        shutdown.cancel();
        drop(bus);
        tokio::time::sleep(Duration::from_millis(100)).await;

        // Restarted with coalescing off and the backend back: one POST per
        // delta, nothing lost.
        mock.set(WEBHOOK, Behavior::Normal);
        let shutdown = CancellationToken::new();
        let (_bus, hooks) = pipeline(dir.path(), &url, Duration::ZERO, &shutdown);
        eventually("all 50", Duration::from_secs(10), || {
            (mock.delivered().len() >= 50).then_some(())
        })
        .await;
        let (text, ids) = delivered_text(&mock);
        assert_eq!(ids, (1..=50).collect::<Vec<u64>>());
        assert_eq!(text["i_x"], want);
        eventually("drained", Duration::from_secs(5), || {
            (hooks.pending() == 0).then_some(())
        })
        .await;
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outbox_file_stays_bounded_while_the_backend_is_down() {
        let (mock, url) = Mock::start().await;
        mock.set(WEBHOOK, Behavior::Status(503));
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open(&dir.path().join("events.jsonl"), 1 << 30).unwrap();
        let file = dir.path().join("outbox.jsonl");
        let (outbox, _) = Outbox::open(OutboxConfig {
            file: file.clone(),
            cursor_file: dir.path().join("cursor.json"),
            max_events: 100,
            max_bytes: 1 << 30,
        })
        .unwrap();
        let shutdown = CancellationToken::new();
        // A long backoff: the sender sleeps through the whole outage, so only
        // the collector can keep the file in check.
        let hooks = Webhooks::start(
            client(&url),
            "ws_lib".into(),
            bus.clone(),
            Arc::new(outbox),
            Duration::from_secs(30),
            Duration::ZERO,
            shutdown.clone(),
        );
        let n = 20_000;
        let mut last = 0;
        for i in 0..n {
            last = bus.publish(None, chat("error", i)).id;
        }
        // The collector has seen everything once the cursor (advanced by
        // drops) passes the last id minus what the outbox keeps.
        eventually("collector caught up", Duration::from_secs(20), || {
            (hooks.delivered_through() + 100 >= last).then_some(())
        })
        .await;
        assert_eq!(hooks.pending(), 100);
        let len = std::fs::metadata(&file).unwrap().len();
        // ~150 bytes a line: 20,000 lines would be ~3 MB.
        assert!(
            len <= replicas_engine::upstream::outbox::COMPACT_MIN_BYTES + 64 * 1024,
            "outbox file is {len} bytes"
        );
        assert!(mock.delivered().is_empty());
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_refreshes_coalesce_and_never_tear_the_file() {
        let (mock, url) = Mock::start().await;
        let home = tempfile::tempdir().unwrap();
        let paths = Paths::new(home.path());
        let bus = EventBus::open(&paths.events_file, 1 << 30).unwrap();
        let shutdown = CancellationToken::new();
        let refresh = TokenRefresh::start(
            client(&url),
            "ws_lib".into(),
            &paths,
            bus,
            Duration::from_millis(1),
            shutdown.clone(),
        );
        let file = paths.claude_credentials_file.clone();
        eventually("first refresh", Duration::from_secs(10), || {
            file.exists().then_some(())
        })
        .await;

        // A reader checks every version it sees is whole and consistent.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (stop, file) = (stop.clone(), file.clone());
            std::thread::spawn(move || {
                let mut reads = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let v: Value =
                        serde_json::from_slice(&std::fs::read(&file).unwrap()).expect("whole JSON");
                    let o = &v["claudeAiOauth"];
                    let at = o["accessToken"]
                        .as_str()
                        .unwrap()
                        .trim_start_matches("sk-ant-oat-");
                    let rt = o["refreshToken"]
                        .as_str()
                        .unwrap()
                        .trim_start_matches("sk-ant-ort-");
                    assert_eq!(at, rt, "fields from one refresh");
                    assert_eq!(
                        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
                        0o600
                    );
                    reads += 1;
                }
                reads
            })
        };

        // Bursts of requests from many tasks: each burst coalesces.
        for _ in 0..20 {
            let before = mock.requests(CLAUDE).len();
            let tasks: Vec<_> = (0..16)
                .map(|_| {
                    let r = refresh.clone();
                    tokio::spawn(async move { assert!(r.request_refresh("claude")) })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            eventually("a requested refresh", Duration::from_secs(10), || {
                (mock.requests(CLAUDE).len() > before).then_some(())
            })
            .await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        let calls = mock.requests(CLAUDE).len();
        // 1 initial + at most 2 per burst of 16 (one running, one coalesced).
        assert!(calls <= 1 + 2 * 20, "{calls} calls for 20 bursts");
        assert!(!refresh.request_refresh("nope"));
        assert!(!TokenRefresh::disabled().request_refresh("claude"));
        shutdown.cancel();
    }
}

/// A webhook answered 408 is retried (backoff), one answered 429 with
/// `Retry-After: 2` is retried no sooner than 2 s later although the backoff
/// would be milliseconds; then it is delivered, once, in order.
#[tokio::test]
async fn webhooks_retry_408_and_429_honouring_retry_after() {
    let (mock, url) = Mock::start().await;
    for p in [GITHUB, CLAUDE, CODEX] {
        mock.set(p, Behavior::Status(404));
    }
    mock.fail_next(WEBHOOK, 1, Behavior::Status(408));
    mock.fail_next(WEBHOOK, 1, Behavior::RetryAfter(429, 2));
    let (spec, guard) = spec_for(&url);
    let e = TestEngine::start_spec(spec, guard).await;
    let chat = e
        .post_json("/chats", json!({"provider": "claude"}), 201)
        .await;
    eventually("chat.created delivered", Duration::from_secs(30), || {
        mock.delivered()
            .iter()
            .any(|ev| ev["type"] == "chat.created")
            .then_some(())
    })
    .await;
    let tries = mock.requests(WEBHOOK);
    let answered: Vec<u16> = tries.iter().take(3).map(|r| r.answered).collect();
    assert_eq!(answered, [408, 429, 200]);
    let ids: Vec<&Value> = tries
        .iter()
        .take(3)
        .map(|r| &r.body["event"]["id"])
        .collect();
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "the same event each time: {ids:?}"
    );
    assert_eq!(tries[0].body["event"]["chatId"], chat["id"]);
    let waited = tries[2].at.duration_since(tries[1].at);
    assert!(
        waited >= Duration::from_millis(1900),
        "Retry-After: 2 honoured, retried after {waited:?}"
    );
    assert_eq!(mock.delivered_ids().len(), 1, "delivered once");
    e.shutdown().await;
}
