//! Upstream: everything the engine sends to the backend (`MONOLITH_URL`).
//!
//! - [`client`]: the authenticated HTTP client (Bearer secret,
//!   `X-Workspace-Id`, timeouts, no secrets in logs);
//! - [`outbox`] + [`webhooks`]: durable, ordered, at-least-once webhook
//!   delivery of chat, hooks and error events;
//! - [`credentials`] + [`refresh`]: the `github`/`claude`/`codex` token
//!   refresh managers and the credential files they write.
//!
//! Without `MONOLITH_URL` nothing runs: [`Upstream::disabled`] reports every
//! manager `disabled` and no webhook is collected.

pub mod client;
pub mod credentials;
pub mod outbox;
pub mod refresh;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::events::EventBus;
use client::UpstreamClient;
use outbox::{Outbox, OutboxConfig};
pub use refresh::TokenRefresh;
pub use webhooks::Webhooks;

/// Longest retry delay of webhooks and token refresh.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Retry delay after `failures` consecutive failures: `base · 2^(failures-1)`
/// capped at [`MAX_BACKOFF`], with jitter (a uniformly random value in the
/// upper half) so many workspaces do not retry in lockstep.
pub fn backoff(base: Duration, failures: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let capped = exp.min(MAX_BACKOFF);
    let r = (uuid::Uuid::new_v4().as_u128() % 1001) as u32;
    capped / 2 + (capped / 2) * r / 1000
}

/// Cheap-clone handle on the upstream services.
#[derive(Clone)]
pub struct Upstream {
    refresh: TokenRefresh,
    webhooks: Option<Webhooks>,
}

impl Upstream {
    /// Nothing upstream: managers `disabled`, no webhooks.
    pub fn disabled() -> Self {
        Self {
            refresh: TokenRefresh::disabled(),
            webhooks: None,
        }
    }

    /// Start webhooks and token refresh when `MONOLITH_URL` is set. Must be
    /// called inside the runtime.
    pub fn start(
        config: &Config,
        bus: &EventBus,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let (Some(url), Some(workspace_id)) = (&config.monolith_url, &config.workspace_id) else {
            tracing::info!("MONOLITH_URL is not set; webhooks and token refresh are disabled");
            return Ok(Self::disabled());
        };
        let client = Arc::new(UpstreamClient::new(
            url,
            &config.secret,
            workspace_id,
            config.upstream_timeout,
        )?);
        let paths = &config.paths;
        let (outbox, report) = Outbox::open(OutboxConfig {
            file: paths.webhook_outbox_file.clone(),
            cursor_file: paths.webhook_cursor_file.clone(),
            max_events: config.webhook_outbox_max_events,
            max_bytes: config.webhook_outbox_max_bytes,
        })
        .with_context(|| format!("opening {}", paths.webhook_outbox_file.display()))?;
        if report.bad_lines > 0 {
            tracing::warn!(
                bad_lines = report.bad_lines,
                "skipped unreadable webhook outbox lines"
            );
        }
        if report.cursor_unreadable {
            tracing::warn!("webhook cursor file unreadable; resending everything in the outbox");
        }
        if report.dropped > 0 {
            tracing::warn!(
                dropped = report.dropped,
                "webhook outbox over its bound at start; dropped the oldest"
            );
        }
        tracing::info!(pending = report.pending, "webhook outbox loaded");
        let webhooks = Webhooks::start(
            client.clone(),
            workspace_id.clone(),
            bus.clone(),
            Arc::new(outbox),
            config.upstream_retry_base,
            config.webhook_coalesce,
            shutdown.clone(),
        );
        let refresh = TokenRefresh::start(
            client,
            workspace_id.clone(),
            paths,
            bus.clone(),
            config.upstream_retry_base,
            shutdown,
        );
        Ok(Self {
            refresh,
            webhooks: Some(webhooks),
        })
    }

    /// Refresh a credential now (`"claude"`, `"codex"`, `"github"`), e.g.
    /// when a provider reported an authentication failure. Coalesces; a
    /// no-op when disabled or for an unknown name.
    pub fn request_refresh(&self, manager: &str) {
        self.refresh.request_refresh(manager);
    }

    pub fn token_refresh(&self) -> &TokenRefresh {
        &self.refresh
    }

    pub fn webhooks(&self) -> Option<&Webhooks> {
        self.webhooks.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let base = Duration::from_millis(100);
        for f in 1..40 {
            let d = backoff(base, f);
            let full = base.saturating_mul(1 << (f - 1).min(20)).min(MAX_BACKOFF);
            assert!(d >= full / 2 && d <= full, "{f}: {d:?}");
        }
    }
}
