//! Upstream benchmarks (issue: plans/upstream), against a local mock
//! backend that counts webhooks:
//!
//! 1. **live webhook throughput**: the webhook pipeline (bus → outbox →
//!    sender, the engine's own code) with events published as fast as
//!    possible; sustained events/s delivered, in order, one POST each.
//! 2. **outbox recovery after restart**: the release engine binary starts
//!    with 10,000 undelivered webhooks in its outbox (as a backend outage
//!    would leave them) and the backend up; time from spawn until the
//!    backend has all of them.
//! 3. **coalesced deltas**: one 1,000-delta turn streamed at 400 deltas/s
//!    through the pipeline with `REPLICAS_WEBHOOK_COALESCE_MS` 250 and 0:
//!    POSTs per turn; then a burst of 1,000 deltas published at once with a
//!    `chat.turn.completed` behind it: how long that event waits.
//! 4. **backend down, then up**: same backlog, the backend answers 503
//!    until it "comes back"; time from then to the first delivery (the
//!    sender's backoff wait) and until the backlog is drained.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use replicas_engine::chats::{Outcome, Usage};
use replicas_engine::config::{Paths, Secret};
use replicas_engine::events::{EngineEvent, EventBus, EventKind, EventType, TurnDelta};
use replicas_engine::upstream::client::UpstreamClient;
use replicas_engine::upstream::outbox::{Outbox, OutboxConfig};
use replicas_engine::upstream::Webhooks;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;

const BACKLOG: u64 = 10_000;
const LIVE_EVENTS: u64 = 20_000;

#[derive(Default)]
struct Counter {
    delivered: AtomicU64,
    /// When the last non-delta event arrived.
    other_at: std::sync::Mutex<Option<Instant>>,
    max_id: AtomicU64,
    out_of_order: AtomicU64,
    down: AtomicBool,
}

async fn mock_backend() -> anyhow::Result<(Arc<Counter>, String)> {
    let counter = Arc::new(Counter::default());
    let c = counter.clone();
    let app = axum::Router::new().fallback(move |uri: Uri, body: Bytes| {
        let c = c.clone();
        async move { handle(&c, uri, body) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((counter, url))
}

fn handle(c: &Counter, uri: Uri, body: Bytes) -> Response {
    if uri.path() != "/v1/engine/webhook" {
        // Token refresh endpoints: valid answers, so no extra error events.
        return axum::Json(json!({"token": "ghs_bench", "credentials": {}, "auth": {}}))
            .into_response();
    }
    if c.down.load(Ordering::Relaxed) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let v = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
    let id = v["event"]["id"]
        .as_str()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    if v["event"]["type"] != EventType::TurnDelta.name() {
        *c.other_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
    let prev = c.max_id.fetch_max(id, Ordering::Relaxed);
    if id <= prev {
        c.out_of_order.fetch_add(1, Ordering::Relaxed);
    }
    c.delivered.fetch_add(1, Ordering::Relaxed);
    StatusCode::OK.into_response()
}

async fn wait_delivered(c: &Counter, n: u64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while c.delivered.load(Ordering::Relaxed) < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {n} delivered within {timeout:?}",
            c.delivered.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

fn turn_completed(i: u64) -> EventKind {
    EventKind::TurnCompleted {
        turn_id: format!("t_{i:08}"),
        outcome: Outcome::Completed,
        usage: Usage {
            input_tokens: 1200,
            output_tokens: 340,
            cached_input_tokens: 800,
            cost_usd: Some(0.0123),
        },
        duration_ms: 4200,
        error: None,
    }
}

pub async fn run() -> anyhow::Result<()> {
    live_throughput().await?;
    for coalesce_ms in [250, 0] {
        coalescing(coalesce_ms).await?;
    }
    recovery(false).await?;
    recovery(true).await?;
    Ok(())
}

/// The engine's webhook pipeline over a fresh bus and outbox in `dir`.
fn pipeline(
    dir: &Path,
    url: &str,
    coalesce: Duration,
    shutdown: &CancellationToken,
) -> anyhow::Result<EventBus> {
    let bus = EventBus::open(&dir.join("events.jsonl"), 1 << 30)?;
    let (outbox, _) = Outbox::open(OutboxConfig {
        file: dir.join("outbox.jsonl"),
        cursor_file: dir.join("cursor.json"),
        max_events: 1_000_000,
        max_bytes: 1 << 30,
    })?;
    let client = UpstreamClient::new(
        &url.parse()?,
        &Secret::new("bench"),
        "ws_bench",
        Duration::from_secs(10),
    )?;
    Webhooks::start(
        Arc::new(client),
        "ws_bench".into(),
        bus.clone(),
        Arc::new(outbox),
        Duration::from_millis(100),
        coalesce,
        shutdown.clone(),
    );
    Ok(bus)
}

fn text_delta(i: u64) -> EventKind {
    EventKind::TurnDelta(TurnDelta::Text {
        turn_id: "t_bench".into(),
        item_id: "i_bench".into(),
        text_delta: format!("token{i} "),
    })
}

async fn coalescing(coalesce_ms: u64) -> anyhow::Result<()> {
    const DELTAS: u64 = 1_000;
    const RATE: u64 = 400; // deltas/s, a fast model's token stream
    let coalesce = Duration::from_millis(coalesce_ms);

    // A streamed turn: POSTs per turn.
    let (counter, url) = mock_backend().await?;
    let dir = tempfile::tempdir()?;
    let shutdown = CancellationToken::new();
    let bus = pipeline(dir.path(), &url, coalesce, &shutdown)?;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 * 10 / RATE));
    for i in 0..DELTAS {
        if i % 10 == 0 {
            tick.tick().await;
        }
        bus.publish(Some("c_bench"), text_delta(i));
    }
    let streamed = started.elapsed();
    bus.publish(Some("c_bench"), turn_completed(0));
    wait_until(&counter, Duration::from_secs(60)).await?;
    let posts = counter.delivered.load(Ordering::Relaxed) - 1;
    shutdown.cancel();
    println!(
        "upstream: coalesce {coalesce_ms} ms: a {DELTAS}-delta turn streamed over {:.2} s took {posts} delta POSTs ({:.0} ms of streaming per POST), out of order: {}",
        streamed.as_secs_f64(),
        streamed.as_secs_f64() * 1000.0 / posts.max(1) as f64,
        counter.out_of_order.load(Ordering::Relaxed),
    );

    // A burst with a non-delta event behind it.
    let (counter, url) = mock_backend().await?;
    let dir = tempfile::tempdir()?;
    let shutdown = CancellationToken::new();
    let bus = pipeline(dir.path(), &url, coalesce, &shutdown)?;
    for i in 0..DELTAS {
        bus.publish(Some("c_bench"), text_delta(i));
    }
    let published = Instant::now();
    bus.publish(Some("c_bench"), turn_completed(0));
    let at = wait_until(&counter, Duration::from_secs(60)).await?;
    let posts = counter.delivered.load(Ordering::Relaxed) - 1;
    shutdown.cancel();
    println!(
        "upstream: coalesce {coalesce_ms} ms: chat.turn.completed behind a burst of {DELTAS} deltas reached the backend {:.1} ms after publish ({posts} delta POSTs before it)",
        (at - published).as_secs_f64() * 1000.0,
    );
    Ok(())
}

/// Wait until a non-delta event arrived; when.
async fn wait_until(c: &Counter, timeout: Duration) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(at) = *c.other_at.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(at);
        }
        anyhow::ensure!(Instant::now() < deadline, "no event within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn live_throughput() -> anyhow::Result<()> {
    let (counter, url) = mock_backend().await?;
    let dir = tempfile::tempdir()?;
    let shutdown = CancellationToken::new();
    let bus = pipeline(dir.path(), &url, Duration::from_millis(250), &shutdown)?;
    let started = Instant::now();
    for i in 0..LIVE_EVENTS {
        bus.publish(Some("c_bench"), turn_completed(i));
        if i % 256 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let published = started.elapsed();
    wait_delivered(&counter, LIVE_EVENTS, Duration::from_secs(300)).await?;
    let took = started.elapsed();
    shutdown.cancel();
    println!(
        "upstream: live webhooks: {LIVE_EVENTS} events published in {:.0} ms (bus never waited), delivered in {:.2} s = {:.0} events/s sustained, out of order: {}",
        published.as_secs_f64() * 1000.0,
        took.as_secs_f64(),
        LIVE_EVENTS as f64 / took.as_secs_f64(),
        counter.out_of_order.load(Ordering::Relaxed),
    );
    Ok(())
}

/// Seed a home as an engine that published `BACKLOG` webhook events while
/// the backend was unreachable leaves it: journal + outbox, no cursor.
fn seed_backlog(home: &Path) -> anyhow::Result<()> {
    let paths = Paths::new(home);
    std::fs::create_dir_all(&paths.engine_dir)?;
    let mut lines = String::new();
    for id in 1..=BACKLOG {
        let ev = EngineEvent {
            id: id.to_string(),
            ts: replicas_engine::util::now_ts(),
            chat_id: Some("c_bench".into()),
            kind: turn_completed(id),
        };
        lines.push_str(&serde_json::to_string(&ev)?);
        lines.push('\n');
    }
    std::fs::write(&paths.events_file, &lines)?;
    std::fs::write(&paths.webhook_outbox_file, &lines)?;
    Ok(())
}

async fn recovery(backend_down_first: bool) -> anyhow::Result<()> {
    let (counter, url) = mock_backend().await?;
    counter.down.store(backend_down_first, Ordering::Relaxed);
    let home = tempfile::tempdir()?;
    seed_backlog(home.path())?;
    let started = Instant::now();
    let engine = Engine::start(
        home.path(),
        &[
            ("WORKSPACE_ID", OsStr::new("ws_bench")),
            ("MONOLITH_URL", OsStr::new(&url)),
        ],
    )
    .await?;
    if backend_down_first {
        // Let it fail a few times (backoff 0.5 s, 1 s, …), then come back.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let up = Instant::now();
        counter.down.store(false, Ordering::Relaxed);
        wait_delivered(&counter, 1, Duration::from_secs(120)).await?;
        let first = up.elapsed();
        wait_delivered(&counter, BACKLOG, Duration::from_secs(300)).await?;
        let all = up.elapsed();
        println!(
            "upstream: backend down 3 s then up: first delivery {:.0} ms after it came back (backoff wait), {BACKLOG} delivered after {:.2} s (drain {:.0} events/s), out of order: {}",
            first.as_secs_f64() * 1000.0,
            all.as_secs_f64(),
            BACKLOG as f64 / (all - first).as_secs_f64(),
            counter.out_of_order.load(Ordering::Relaxed),
        );
    } else {
        wait_delivered(&counter, BACKLOG, Duration::from_secs(300)).await?;
        let all = started.elapsed();
        println!(
            "upstream: outbox recovery: engine started with {BACKLOG} undelivered webhooks; all delivered {:.2} s after spawn ({:.0} events/s incl. startup), out of order: {}",
            all.as_secs_f64(),
            BACKLOG as f64 / all.as_secs_f64(),
            counter.out_of_order.load(Ordering::Relaxed),
        );
    }
    engine.stop().await;
    Ok(())
}
