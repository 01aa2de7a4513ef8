//! Upstream (engine → backend) against the mock backend
//! (`common::backend`), told per endpoint to answer normally, fail with a
//! status, hang, or send garbage — for the next N requests or from now on.
//!
//! Through the real server: headers, credential files and modes, health and
//! status, error events, webhooks of those events with retries, replay after
//! `kill -9`, the outbox bound. Through the library (an `EventBus` we publish
//! to directly, since chat routes live elsewhere): webhook type filtering
//! and order under failures, refresh coalescing, no torn credential files.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::common::backend::{Backend, Behavior, Request, CLAUDE, CODEX, GITHUB, WEBHOOK};
use crate::common::{eventually, EngineSpec, TestEngine, SECRET};
use serde_json::{json, Value};

// ---------------------------------------------------------------- helpers

/// A spec pointing at the mock, with fast retries and a short timeout.
async fn spec_with_backend() -> (EngineSpec, Backend) {
    let (spec, mock) = EngineSpec::new().0.with_backend().await;
    let spec = spec
        .with("REPLICAS_UPSTREAM_TIMEOUT_MS", "400")
        .with("REPLICAS_UPSTREAM_RETRY_BASE_MS", "20");
    (spec, mock)
}

async fn health(e: &TestEngine) -> (u16, Value) {
    let res = e.get("/token-refresh/health").send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

async fn wait_health(e: &TestEngine, what: &str, pred: impl Fn(u16, &Value) -> bool) -> Value {
    eventually(what, Duration::from_secs(20), async || {
        let (code, body) = health(e).await;
        match pred(code, &body) {
            true => Ok(body),
            false => Err(format!("{code} {body}")),
        }
    })
    .await
}

/// The request carries the secret and the workspace id.
fn assert_signed(r: &Request) {
    assert_eq!(
        r.authorization.as_deref(),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert_eq!(r.workspace_id.as_deref(), Some("ws_test"));
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
    let (spec, mock) = spec_with_backend().await;
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

    let e = TestEngine::start_with(spec).await;
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
        reqs.iter().for_each(assert_signed);
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
    let (spec, mock) = spec_with_backend().await;
    mock.set(GITHUB, Behavior::Garbage);
    mock.set(CLAUDE, Behavior::Status(500));
    mock.set(CODEX, Behavior::Hang);
    let e = TestEngine::start_with(spec).await;

    let body = wait_health(&e, "all failing twice", |code, b| {
        code == 503
            && ["github", "claude", "codex"]
                .iter()
                .all(|m| b["managers"][m]["consecutiveFailures"].as_u64() >= Some(2))
    })
    .await;
    assert_eq!(body["healthy"], false);
    for (m, why) in [
        ("github", "not JSON"),
        ("claude", "500"),
        ("codex", "timed out"),
    ] {
        let error = body["managers"][m]["lastError"].as_str().unwrap();
        assert!(error.contains(why), "{body}");
    }
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
    let delivered = eventually("3 error webhooks", Duration::from_secs(10), async || {
        let d = mock.delivered();
        (d.len() >= 3).then_some(d)
    })
    .await;
    for r in mock.requests(WEBHOOK) {
        assert_signed(&r);
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
    let (spec, mock) = spec_with_backend().await;
    // Three error events (one per manager) while the webhook endpoint is down.
    for p in [GITHUB, CLAUDE, CODEX] {
        mock.set(p, Behavior::Status(500));
    }
    mock.set(WEBHOOK, Behavior::Status(503));
    let e = TestEngine::start_with(spec).await;
    let outbox = e.home().join(".replicas/engine/webhook-outbox.jsonl");
    eventually(
        "3 events in the outbox",
        Duration::from_secs(10),
        async || {
            let text = std::fs::read_to_string(&outbox).ok()?;
            (text.lines().count() == 3).then_some(())
        },
    )
    .await;
    // The sender keeps retrying the first one.
    eventually("retries", Duration::from_secs(10), async || {
        mock.requests(WEBHOOK).len() >= 3
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
    let e = e
        .restart_with(true, |_| {
            mock.set(WEBHOOK, Behavior::Normal);
            mock.fail_next(WEBHOOK, 3, Behavior::Status(502));
        })
        .await;
    let ids = eventually("replayed webhooks", Duration::from_secs(15), async || {
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
        async || {
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
    let (spec, mock) = spec_with_backend().await;
    for p in [GITHUB, CLAUDE, CODEX] {
        mock.set(p, Behavior::Status(500));
    }
    mock.set(WEBHOOK, Behavior::Status(503));
    let spec = spec.with("REPLICAS_WEBHOOK_OUTBOX_MAX_EVENTS", "2");
    let e = TestEngine::start_with(spec).await;
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
    let ids = eventually("the two retained", Duration::from_secs(10), async || {
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
        let (mock, url) = Backend::start().await;
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let (bus, hooks) = pipeline(dir.path(), &url, Duration::from_millis(250), &shutdown);

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
            eventually("progress", Duration::from_secs(10), async || {
                mock.delivered_ids().len() >= n
            })
            .await;
            mock.fail_next(WEBHOOK, 2, Behavior::Status(503));
            mock.fail_next(WEBHOOK, 1, Behavior::Hang);
        }
        let got = eventually("every webhook", Duration::from_secs(20), async || {
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
        eventually("drained", Duration::from_secs(5), async || {
            hooks.pending() == 0
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
    fn delivered_text(mock: &Backend) -> (HashMap<String, String>, Vec<u64>) {
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
        let (mock, url) = Backend::start().await;
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

        eventually("the last event", Duration::from_secs(20), async || {
            mock.delivered_ids().contains(&last)
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
        eventually("drained", Duration::from_secs(5), async || {
            hooks.pending() == 0
        })
        .await;
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn coalescing_off_sends_every_delta_and_a_restart_resends_the_undelivered() {
        let (mock, url) = Backend::start().await;
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
        eventually("a failed attempt", Duration::from_secs(10), async || {
            !mock.requests(WEBHOOK).is_empty()
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
        eventually("all 50", Duration::from_secs(10), async || {
            mock.delivered().len() >= 50
        })
        .await;
        let (text, ids) = delivered_text(&mock);
        assert_eq!(ids, (1..=50).collect::<Vec<u64>>());
        assert_eq!(text["i_x"], want);
        eventually("drained", Duration::from_secs(5), async || {
            hooks.pending() == 0
        })
        .await;
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outbox_file_stays_bounded_while_the_backend_is_down() {
        let (mock, url) = Backend::start().await;
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
        eventually("collector caught up", Duration::from_secs(20), async || {
            hooks.delivered_through() + 100 >= last
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
        let (mock, url) = Backend::start().await;
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
        eventually("first refresh", Duration::from_secs(10), async || {
            file.exists()
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
            eventually("a requested refresh", Duration::from_secs(10), async || {
                mock.requests(CLAUDE).len() > before
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
    let (spec, mock) = spec_with_backend().await;
    for p in [GITHUB, CLAUDE, CODEX] {
        mock.set(p, Behavior::Status(404));
    }
    mock.fail_next(WEBHOOK, 1, Behavior::Status(408));
    mock.fail_next(WEBHOOK, 1, Behavior::RetryAfter(429, 2));
    let e = TestEngine::start_with(spec).await;
    let chat = e
        .post_json("/chats", json!({"provider": "claude"}), 201)
        .await;
    eventually(
        "chat.created delivered",
        Duration::from_secs(30),
        async || {
            mock.delivered()
                .iter()
                .any(|ev| ev["type"] == "chat.created")
                .then_some(())
        },
    )
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
