//! Webhook delivery: every event of a [webhook type](EventType::is_webhook) is
//! POSTed to `{MONOLITH_URL}/v1/engine/webhook` as
//! `{"workspaceId": …, "event": EngineEvent}`, at least once and in id order.
//!
//! Two tasks share the [`Outbox`]:
//! - the **collector** subscribes to the bus from the outbox's resume point
//!   (so events published while the engine was down, or between publish and
//!   append at a `kill -9`, are re-read from the journal) and appends webhook
//!   events to the outbox. It never waits on the network, and the bus never
//!   waits on it (a lagging subscriber is caught up from the journal);
//! - the **sender** delivers the oldest pending event, one at a time (order
//!   is the contract), retrying retryable failures with exponential backoff
//!   and jitter forever, skipping (with a warning) one the backend rejects
//!   permanently (4xx other than 408/429).
//!
//! **Coalescing.** A streamed answer is hundreds of `chat.turn.delta` text
//! fragments; one POST each would cost the backend a request per token. So
//! when the oldest pending event is a text delta, the sender merges the
//! consecutive text deltas of the same chat, turn and item queued behind it
//! into one event (the last delta's envelope, `textDelta` concatenated),
//! waiting up to the coalesce window (`REPLICAS_WEBHOOK_COALESCE_MS`) for
//! more while nothing else is queued, and keeps merging what arrives while a
//! delivery is retried. Any other event ends the run at once, so it is never
//! held back by the window. The outbox and the journal keep every delta; the
//! run is acknowledged (and the cursor written) only after delivery, so a
//! restart re-sends it rather than losing it.
//!
//! When the outbox bound drops undelivered events, an `error` event
//! (`webhook_outbox_overflow`) says how many — at most once per
//! [`OVERFLOW_REPORT_INTERVAL`], because that event is itself a webhook and
//! would otherwise feed the overflow it reports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::client::UpstreamClient;
use super::outbox::Outbox;
use crate::events::{
    EngineEvent, EventBus, EventKind, EventType, Published, SubscriptionItem, TurnDelta,
};

pub const WEBHOOK_PATH: &str = "/v1/engine/webhook";

/// How often at most an overflow is reported.
pub const OVERFLOW_REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Persist the delivered cursor at least this often while busy (and always
/// when the queue drains). A crash loses at most this much progress, which
/// only means duplicates.
const CURSOR_PERSIST_INTERVAL: Duration = Duration::from_millis(250);

/// Whether the backend receives events of this wire type.
fn is_webhook_type(kind: &str) -> bool {
    EventType::from_name(kind).is_some_and(EventType::is_webhook)
}

/// The webhook body, built from the stored envelope without re-parsing it.
pub fn webhook_body(workspace_id: &str, ev: &Published) -> String {
    let ws = serde_json::to_string(workspace_id).unwrap_or_else(|_| "\"\"".into());
    format!("{{\"workspaceId\":{ws},\"event\":{}}}", ev.json())
}

/// Handle on the running webhook pipeline.
#[derive(Clone)]
pub struct Webhooks {
    outbox: Arc<Outbox>,
}

impl Webhooks {
    /// Start the collector and the sender. `retry_base` is the first retry
    /// delay (doubling up to [`super::MAX_BACKOFF`]); `coalesce` is how long
    /// a run of text deltas waits for more before it is sent (zero: one POST
    /// per event).
    pub fn start(
        client: Arc<UpstreamClient>,
        workspace_id: String,
        bus: EventBus,
        outbox: Arc<Outbox>,
        retry_base: Duration,
        coalesce: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let wake = Arc::new(Notify::new());
        // The journal restarted numbering below our position (events.jsonl
        // was removed): old ids mean nothing any more.
        let last = bus.last_id();
        if outbox.resume_after() > last {
            tracing::warn!(
                resume_after = outbox.resume_after(),
                last_event_id = last,
                "webhook outbox is ahead of the event journal (journal reset?); discarding it"
            );
            outbox.reset_to(last);
        }
        tokio::spawn(collect(bus, outbox.clone(), wake.clone(), shutdown.clone()));
        tokio::spawn(send(
            client,
            workspace_id,
            outbox.clone(),
            wake,
            retry_base,
            coalesce,
            shutdown,
        ));
        Self { outbox }
    }

    /// Undelivered webhooks right now.
    pub fn pending(&self) -> usize {
        self.outbox.len()
    }

    /// How long the oldest undelivered event has waited (from its `ts`);
    /// zero when none is pending.
    pub fn oldest_pending_age(&self) -> Duration {
        #[derive(Deserialize)]
        struct Ts {
            ts: String,
        }
        self.outbox
            .front()
            .and_then(|ev| serde_json::from_str::<Ts>(ev.json()).ok())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t.ts).ok())
            .and_then(|t| (chrono::Utc::now() - t.to_utc()).to_std().ok())
            .unwrap_or_default()
    }

    /// Every event with id ≤ this is finished.
    pub fn delivered_through(&self) -> u64 {
        self.outbox.cursor()
    }
}

async fn collect(
    bus: EventBus,
    outbox: Arc<Outbox>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut sub = bus.subscribe_internal(Some(outbox.resume_after()));
    let mut last_report: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            item = sub.next() => match item {
                Some(SubscriptionItem::Event(ev)) => {
                    if is_webhook_type(&ev.kind) {
                        let id = ev.id;
                        let (dropped, written) = outbox.push(ev);
                        if let Err(e) = written {
                            tracing::error!(error = %e, id, "could not append to the webhook outbox; kept in memory only");
                        }
                        wake.notify_one();
                        // While the backend is down the sender never gets to
                        // housekeeping; drops alone must keep the file bounded.
                        if dropped > 0 && outbox.needs_compaction() {
                            housekeeping(&outbox).await;
                        }
                    }
                }
                Some(SubscriptionItem::Reset { oldest_available_id }) => {
                    tracing::warn!(
                        oldest_available_id,
                        resume_after = outbox.resume_after(),
                        "events aged out of the journal before reaching the webhook outbox"
                    );
                }
                None => return,
            },
        }
        if last_report.is_none_or(|t| t.elapsed() >= OVERFLOW_REPORT_INTERVAL) {
            let dropped = outbox.take_dropped_unreported();
            if dropped > 0 {
                last_report = Some(Instant::now());
                tracing::warn!(
                    dropped,
                    "webhook outbox full; dropped the oldest undelivered events"
                );
                bus.publish(
                    None,
                    EventKind::Error {
                        code: "webhook_outbox_overflow".into(),
                        message: format!(
                            "the backend has been unreachable too long: dropped the {dropped} oldest undelivered webhook events"
                        ),
                        source: "webhooks".into(),
                    },
                );
            }
        }
    }
}

async fn send(
    client: Arc<UpstreamClient>,
    workspace_id: String,
    outbox: Arc<Outbox>,
    wake: Arc<Notify>,
    retry_base: Duration,
    coalesce: Duration,
    shutdown: CancellationToken,
) {
    let mut last_persist = Instant::now();
    loop {
        let Some(ev) = outbox.front() else {
            housekeeping(&outbox).await;
            last_persist = Instant::now();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => continue,
            }
        };
        let mut merge = if coalesce.is_zero() {
            None
        } else {
            Merge::start(&ev)
        };
        if let Some(m) = merge.as_mut() {
            // Wait for more of the run only while nothing else is queued
            // behind it: a non-delta event never waits for the window.
            let deadline = tokio::time::Instant::now() + coalesce;
            while m.extend(&outbox) {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        persist(&outbox).await;
                        return;
                    }
                    _ = tokio::time::sleep_until(deadline) => {
                        m.extend(&outbox);
                        break;
                    }
                    _ = wake.notified() => {}
                }
            }
        }
        let last_id = merge.as_ref().map_or(ev.id, |m| m.last_id);
        if !outbox.is_pending(last_id) {
            continue; // the bound dropped all of it meanwhile
        }
        let mut failures: u32 = 0;
        loop {
            let body = match &merge {
                Some(m) => m.body(&workspace_id),
                None => webhook_body(&workspace_id, &ev),
            };
            let last_id = merge.as_ref().map_or(ev.id, |m| m.last_id);
            let result = tokio::select! {
                _ = shutdown.cancelled() => {
                    persist(&outbox).await;
                    return;
                }
                r = client.post(WEBHOOK_PATH, body) => r,
            };
            match result {
                Ok(_) => {
                    crate::metrics::webhook_delivered();
                    if failures > 0 {
                        tracing::info!(id = last_id, failures, "webhook delivered after retries");
                    }
                    break;
                }
                Err(e) if e.is_retryable() => {
                    crate::metrics::webhook_failed();
                    failures += 1;
                    // The backend's own `Retry-After` wins over our backoff.
                    let delay = e
                        .retry_after()
                        .unwrap_or_else(|| super::backoff(retry_base, failures));
                    // Loud on the first failure and then sparsely: a backend
                    // down for days must not flood the journal.
                    if failures.is_power_of_two() {
                        tracing::warn!(id = last_id, r#type = %ev.kind, error = %e, failures, retry_in_ms = delay.as_millis() as u64, "webhook delivery failed; will retry");
                    } else {
                        tracing::debug!(id = last_id, error = %e, failures, "webhook delivery failed; will retry");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            persist(&outbox).await;
                            return;
                        }
                        _ = tokio::time::sleep(delay) => {}
                    }
                    // Deltas that streamed in meanwhile ride along.
                    if let Some(m) = merge.as_mut() {
                        m.extend(&outbox);
                    }
                    // The bound may have dropped it while we waited.
                    if !outbox.is_pending(merge.as_ref().map_or(ev.id, |m| m.last_id)) {
                        break;
                    }
                }
                Err(e) => {
                    crate::metrics::webhook_failed();
                    tracing::warn!(id = last_id, r#type = %ev.kind, error = %e, "backend rejected a webhook permanently; skipping it");
                    break;
                }
            }
        }
        let merged = merge.as_ref().map_or(1, |m| m.count);
        outbox.ack(merge.as_ref().map_or(ev.id, |m| m.last_id));
        // After a merged delivery the cursor is written at once: a restart
        // then resumes after the whole run instead of re-sending part of
        // its text under a different grouping.
        if merged > 1 || last_persist.elapsed() >= CURSOR_PERSIST_INTERVAL {
            housekeeping(&outbox).await;
            last_persist = Instant::now();
        }
    }
    persist(&outbox).await;
}

/// Most text one merged delta carries; a longer run is split into several.
pub const MAX_COALESCED_TEXT_BYTES: usize = 256 * 1024;

/// The fields of a `chat.turn.delta` text fragment the coalescer needs.
#[derive(Deserialize)]
struct TextDeltaEnvelope {
    ts: String,
    #[serde(rename = "chatId", default)]
    chat_id: Option<String>,
    payload: TextDeltaPayload,
}

#[derive(Deserialize)]
struct TextDeltaPayload {
    #[serde(rename = "turnId")]
    turn_id: String,
    #[serde(rename = "itemId", default)]
    item_id: Option<String>,
    #[serde(rename = "textDelta", default)]
    text_delta: Option<String>,
}

/// A text delta's envelope, or `None` for any other event (item deltas
/// included).
fn text_delta(ev: &Published) -> Option<(TextDeltaEnvelope, String, String)> {
    if ev.kind != EventType::TurnDelta.name() {
        return None;
    }
    let mut env: TextDeltaEnvelope = serde_json::from_str(ev.json()).ok()?;
    let item = env.payload.item_id.take()?;
    let text = env.payload.text_delta.take()?;
    Some((env, item, text))
}

/// A run of consecutive text deltas of one item, merged into one webhook.
struct Merge {
    first: Arc<Published>,
    chat_id: Option<String>,
    turn_id: String,
    item_id: String,
    last_id: u64,
    last_ts: String,
    text: String,
    count: usize,
}

impl Merge {
    /// Start a run at `ev` if it is a text delta.
    fn start(ev: &Arc<Published>) -> Option<Self> {
        let (env, item_id, text) = text_delta(ev)?;
        Some(Self {
            first: ev.clone(),
            chat_id: env.chat_id,
            turn_id: env.payload.turn_id,
            item_id,
            last_id: ev.id,
            last_ts: env.ts,
            text,
            count: 1,
        })
    }

    /// Take in the deltas of this item queued after the last one merged.
    /// Returns whether the run is still open: nothing else is queued behind
    /// it and it has room for more text.
    fn extend(&mut self, outbox: &Outbox) -> bool {
        loop {
            if self.text.len() >= MAX_COALESCED_TEXT_BYTES {
                return false;
            }
            let Some(next) = outbox.next_after(self.last_id) else {
                return true;
            };
            match text_delta(&next) {
                Some((env, item_id, text))
                    if env.chat_id == self.chat_id
                        && env.payload.turn_id == self.turn_id
                        && item_id == self.item_id
                        && self.text.len() + text.len() <= MAX_COALESCED_TEXT_BYTES =>
                {
                    self.text.push_str(&text);
                    self.last_id = next.id;
                    self.last_ts = env.ts;
                    self.count += 1;
                }
                _ => return false,
            }
        }
    }

    /// The webhook body: the first event verbatim when nothing was merged,
    /// else the last delta's envelope with the concatenated text, plus
    /// `coalesced` naming the first id and how many events it covers.
    fn body(&self, workspace_id: &str) -> String {
        if self.count == 1 {
            return webhook_body(workspace_id, &self.first);
        }
        let event = EngineEvent {
            id: self.last_id.to_string(),
            ts: self.last_ts.clone(),
            chat_id: self.chat_id.clone(),
            kind: EventKind::TurnDelta(TurnDelta::Text {
                turn_id: self.turn_id.clone(),
                item_id: self.item_id.clone(),
                text_delta: self.text.clone(),
            }),
        };
        serde_json::json!({
            "workspaceId": workspace_id,
            "event": event,
            "coalesced": {"firstId": self.first.id.to_string(), "count": self.count},
        })
        .to_string()
    }
}

/// Persist the cursor and compact when worthwhile, off the async threads.
async fn housekeeping(outbox: &Arc<Outbox>) {
    let o = outbox.clone();
    let res = tokio::task::spawn_blocking(move || {
        if o.needs_compaction() {
            o.compact()
        } else {
            o.persist_cursor()
        }
    })
    .await;
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "could not update the webhook outbox files"),
        Err(e) => tracing::error!(error = %e, "webhook outbox housekeeping panicked"),
    }
}

async fn persist(outbox: &Arc<Outbox>) {
    let o = outbox.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || o.persist_cursor()).await {
        tracing::error!(error = %e, "could not persist the webhook cursor");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_types() {
        for t in [
            "chat.created",
            "chat.deleted",
            "chat.turn.accepted",
            "chat.turn.delta",
            "chat.turn.completed",
            "hooks.completed",
            "hooks.failed",
            "error",
        ] {
            assert!(is_webhook_type(t), "{t}");
        }
        for t in [
            "engine.ready",
            "chat.updated",
            "chat.interrupted",
            "hooks.progress",
            "hooks.started",
            "repo.discovered",
            "stream.reset",
        ] {
            assert!(!is_webhook_type(t), "{t}");
        }
    }

    #[test]
    fn body_embeds_the_envelope() {
        let line = br#"{"id":"4","ts":"t","type":"error","payload":{"code":"c","message":"m","source":"s"}}"#;
        let ev = Published::from_line(line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&webhook_body("ws_\"1", &ev)).unwrap();
        assert_eq!(v["workspaceId"], "ws_\"1");
        assert_eq!(v["event"]["id"], "4");
        assert_eq!(v["event"]["payload"]["code"], "c");
    }
}
