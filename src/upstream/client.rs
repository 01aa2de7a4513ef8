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
    /// A retryable status (408, 429, 503…) with a `Retry-After` header: the
    /// backend said when to come back.
    #[error("backend answered HTTP {status} (Retry-After {} s)", retry_after.as_secs())]
    RetryAfter { status: u16, retry_after: Duration },
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
            Self::Status(s) | Self::RetryAfter { status: s, .. } => {
                *s == 408 || *s == 429 || *s >= 500
            }
        }
    }

    /// How long the backend asked us to wait (`Retry-After`), if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RetryAfter { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// The longest `Retry-After` honoured; a larger one waits this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// A `Retry-After` value: delay-seconds or an HTTP date, capped at
/// [`MAX_RETRY_AFTER`]; `None` when it is neither.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or_default()
    };
    Some(wait.min(MAX_RETRY_AFTER))
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
            let retry_after = res
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
            let status = status.as_u16();
            return Err(match retry_after {
                Some(retry_after) if CallError::Status(status).is_retryable() => {
                    CallError::RetryAfter {
                        status,
                        retry_after,
                    }
                }
                _ => CallError::Status(status),
            });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_or_date_capped() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 2026 00:00:07 GMT", now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after("Wed, 31 Dec 2025 23:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("99999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }
}
