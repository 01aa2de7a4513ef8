//! The mock backend (the "monolith"): an axum server on 127.0.0.1:0 that
//! records every request and answers each upstream endpoint the way the
//! real backend does (webhook `{"ok":true}`, credentials that expire in an
//! hour, numbered so each refresh is told apart) — or, told per endpoint,
//! fails with a status, hangs or sends garbage, for the next N requests
//! ([`Backend::fail_next`]) or from now on ([`Backend::set`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::EngineSpec;

pub const WEBHOOK: &str = "/v1/engine/webhook";
pub const GITHUB: &str = "/v1/engine/github/refresh-token";
pub const CLAUDE: &str = "/v1/engine/claude/refresh-credentials";
pub const CODEX: &str = "/v1/engine/codex/refresh-credentials";

/// How the backend answers a request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Behavior {
    Normal,
    Status(u16),
    /// A status with `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    Hang,
    Garbage,
}

/// One request as the backend saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub path: String,
    pub authorization: Option<String>,
    pub workspace_id: Option<String>,
    pub body: Value,
    /// What the mock answered (0 = hung).
    pub answered: u16,
    /// When it arrived.
    pub at: std::time::Instant,
}

#[derive(Default)]
struct MockState {
    requests: Vec<Request>,
    /// Per path: behaviours for the next requests, then the default.
    next: HashMap<String, VecDeque<Behavior>>,
    default: HashMap<String, Behavior>,
    counter: u64,
}

#[derive(Clone, Default)]
pub struct Backend {
    state: Arc<Mutex<MockState>>,
}

impl Backend {
    /// Start on a free port; returns the backend and its base URL.
    pub async fn start() -> (Self, String) {
        let backend = Self::default();
        let app = axum::Router::new().fallback({
            let backend = backend.clone();
            move |uri: Uri, headers: HeaderMap, body: Bytes| {
                let backend = backend.clone();
                async move { backend.handle(uri, headers, body).await }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (backend, url)
    }

    /// From now on, `path` behaves like this.
    pub fn set(&self, path: &str, b: Behavior) {
        self.state.lock().unwrap().default.insert(path.into(), b);
    }

    /// The next `n` requests to `path` behave like this.
    pub fn fail_next(&self, path: &str, n: usize, b: Behavior) {
        self.state
            .lock()
            .unwrap()
            .next
            .entry(path.into())
            .or_default()
            .extend(std::iter::repeat_n(b, n));
    }

    /// Requests to `path`, in arrival order.
    pub fn requests(&self, path: &str) -> Vec<Request> {
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
    pub fn delivered(&self) -> Vec<Value> {
        self.requests(WEBHOOK)
            .into_iter()
            .filter(|r| r.answered == 200)
            .map(|r| r.body["event"].clone())
            .collect()
    }

    /// The ids of [`Self::delivered`].
    pub fn delivered_ids(&self) -> Vec<u64> {
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
            st.requests.push(Request {
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

impl EngineSpec {
    /// A [`Backend`] started for this engine (its `MONOLITH_URL`).
    pub async fn with_backend(self) -> (Self, Backend) {
        let (backend, url) = Backend::start().await;
        (self.with("MONOLITH_URL", url), backend)
    }
}
