//! The HTTP client for the backend (`MONOLITH_URL`). Every call carries
//! `Authorization: Bearer <secret>` and `X-Workspace-Id`, has a connect and
//! a whole-request timeout, follows no redirects, and reads at most
//! [`MAX_RESPONSE_BYTES`] of the answer. Logs carry the path, status and
//! duration only — never headers, bodies or tokens.

use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};

use crate::config::Secret;

/// Largest response body read from the backend (credentials are small).
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Why a call failed. Messages never contain response bodies (which may
/// hold tokens) nor the URL (which may hold userinfo).
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("could not reach the backend: {0}")]
    Connect(String),
    #[error("backend answered HTTP {0}")]
    Status(u16),
    #[error("backend answered an unusable body: {0}")]
    BadBody(String),
}

impl CallError {
    /// Worth retrying later: the backend was unreachable, slow, overloaded
    /// (408/429/5xx). Any other 4xx (or a 3xx, we follow no redirects) means
    /// this request will never succeed as is.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout(_) | Self::Connect(_) | Self::BadBody(_) => true,
            Self::Status(s) => *s == 408 || *s == 429 || *s >= 500,
        }
    }
}

pub struct UpstreamClient {
    http: reqwest::Client,
    /// Base URL without a trailing slash.
    base: String,
    timeout: Duration,
}

impl UpstreamClient {
    pub fn new(
        base: &url::Url,
        secret: &Secret,
        workspace_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut headers = HeaderMap::new();
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {}", secret.expose())).map_err(|_| {
                anyhow::anyhow!("REPLICAS_ENGINE_SECRET cannot be sent in an HTTP header")
            })?;
        auth.set_sensitive(true);
        headers.insert(AUTHORIZATION, auth);
        headers.insert(
            "x-workspace-id",
            HeaderValue::from_str(workspace_id)
                .map_err(|_| anyhow::anyhow!("WORKSPACE_ID cannot be sent in an HTTP header"))?,
        );
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("replicas-engine/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base: base.as_str().trim_end_matches('/').to_owned(),
            timeout,
        })
    }

    /// POST a JSON body (already serialized) to `path` (e.g.
    /// `/v1/engine/webhook`); `Ok` with the response body on a 2xx.
    pub async fn post(&self, path: &str, body: String) -> Result<Vec<u8>, CallError> {
        let started = Instant::now();
        let result = self.send(path, body).await;
        let duration_ms = started.elapsed().as_millis() as u64;
        match &result {
            Ok(_) => tracing::debug!(path, status = "2xx", duration_ms, "upstream call"),
            Err(e) => tracing::debug!(path, error = %e, duration_ms, "upstream call failed"),
        }
        result
    }

    async fn send(&self, path: &str, body: String) -> Result<Vec<u8>, CallError> {
        let url = format!("{}{}", self.base, path);
        let mut res = self
            .http
            .post(url)
            .body(body)
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        let status = res.status();
        if !status.is_success() {
            return Err(CallError::Status(status.as_u16()));
        }
        let mut out = Vec::new();
        while let Some(chunk) = res.chunk().await.map_err(|e| self.classify(e))? {
            if out.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(CallError::BadBody(format!(
                    "response larger than {MAX_RESPONSE_BYTES} bytes"
                )));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    fn classify(&self, e: reqwest::Error) -> CallError {
        if e.is_timeout() {
            CallError::Timeout(self.timeout)
        } else if e.is_body() || e.is_decode() {
            CallError::BadBody("the response body was cut off".into())
        } else {
            // `without_url`: the URL could carry userinfo.
            let e = e.without_url();
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            CallError::Connect(msg)
        }
    }
}
