//! A mock backend (the "monolith") for tests that cross features: an axum
//! server on 127.0.0.1:0 that records every request and answers each
//! upstream endpoint the way the real backend does (webhook `{"ok":true}`,
//! credentials that expire in an hour). `tests/upstream.rs` keeps its own,
//! richer mock with per-endpoint failure modes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

pub const WEBHOOK: &str = "/v1/engine/webhook";
pub const GITHUB: &str = "/v1/engine/github/refresh-token";
pub const CLAUDE: &str = "/v1/engine/claude/refresh-credentials";
pub const CODEX: &str = "/v1/engine/codex/refresh-credentials";

#[derive(Clone, Debug)]
pub struct Request {
    pub path: String,
    pub body: Value,
}

#[derive(Clone, Default)]
pub struct Backend {
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Backend {
    /// Start on a free port; returns the backend and its base URL.
    pub async fn start() -> (Self, String) {
        let backend = Self::default();
        let app = axum::Router::new().fallback({
            let backend = backend.clone();
            move |uri: Uri, body: Bytes| {
                let backend = backend.clone();
                async move { backend.handle(uri, body) }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (backend, url)
    }

    fn handle(&self, uri: Uri, body: Bytes) -> Response {
        let path = uri.path().to_owned();
        self.requests.lock().unwrap().push(Request {
            path: path.clone(),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
        let expires = chrono::Utc::now() + chrono::Duration::hours(1);
        let answer = match path.as_str() {
            GITHUB => json!({"token": "ghs_mock", "expiresAt": expires.to_rfc3339()}),
            CLAUDE => json!({"credentials": {"claudeAiOauth": {
                "accessToken": "sk-ant-oat-mock", "refreshToken": "sk-ant-ort-mock",
                "expiresAt": expires.timestamp_millis(), "scopes": ["user:inference"]}}}),
            CODEX => {
                json!({"auth": {"tokens": {"access_token": "at-mock", "refresh_token": "rt-mock"},
                "last_refresh": chrono::Utc::now().to_rfc3339()}})
            }
            _ => json!({"ok": true}),
        };
        axum::Json(answer).into_response()
    }

    /// Requests to `path`, in arrival order.
    pub fn requests(&self, path: &str) -> Vec<Request> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Events delivered through the webhook, in arrival order.
    pub fn webhook_events(&self) -> Vec<Value> {
        self.requests(WEBHOOK)
            .into_iter()
            .map(|r| r.body["event"].clone())
            .collect()
    }

    /// Poll until `f` gives a value (deadline `timeout`).
    pub async fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&Self) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "backend: timed out waiting for {what}; got {:#?}",
                self.requests.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
