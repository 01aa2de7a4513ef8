//! `GET /events` and the journal behind it, through a real HTTP server:
//! replay + live with concurrent publishers (exact id sequence), filters,
//! restart continuity, torn last line, a stalled subscriber, retention with
//! `stream.reset`, and graceful shutdown with open streams.

use std::time::Duration;

use crate::common::inproc::InProc;
use crate::common::{eventually, EngineSpec, SseEvent, SseStream, TestEngine, SECRET};
use replicas_engine::events::EventKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn err_event(i: usize) -> EventKind {
    EventKind::Error {
        code: "test".into(),
        message: format!("event {i}"),
        source: "test".into(),
    }
}

/// Read events until `n` have been collected; returns their numeric ids.
async fn collect_ids(s: &mut SseStream, n: usize) -> Vec<u64> {
    let mut ids = Vec::with_capacity(n);
    while ids.len() < n {
        let ev = s
            .next_event(Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("stream stalled after {} of {n} events", ids.len()));
        if let Some(id) = ev.id_num() {
            ids.push(id);
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_an_id_while_publishers_run_has_no_gap_and_no_duplicate() {
    let home = tempfile::tempdir().unwrap();
    let e = InProc::start(home.path(), |_| {}).await;
    // engine.ready is id 1; add 999 more.
    for i in 0..999 {
        e.state.bus.publish(None, err_event(i));
    }
    // Two publishers keep going while three clients replay from different
    // points via the header, the query and from the start.
    let publishers: Vec<_> = (0..2)
        .map(|p| {
            let bus = e.state.bus.clone();
            tokio::spawn(async move {
                for i in 0..1500 {
                    bus.publish(Some(&format!("c_{p}")), err_event(i));
                    if i % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    let mut by_header = e.events_with("", Some("500")).await;
    let mut by_query = e.events("since=10").await;
    let mut from_zero = e.events("since=0").await;
    let total = 1000 + 3000;
    let a = collect_ids(&mut by_header, total - 500).await;
    let b = collect_ids(&mut by_query, total - 10).await;
    let c = collect_ids(&mut from_zero, total).await;
    for p in publishers {
        p.await.unwrap();
    }
    assert_eq!(a, (501..=total as u64).collect::<Vec<_>>());
    assert_eq!(b, (11..=total as u64).collect::<Vec<_>>());
    assert_eq!(c, (1..=total as u64).collect::<Vec<_>>());
    e.stop().await;
}

#[tokio::test]
async fn stream_starts_with_retry_and_carries_envelopes() {
    let home = tempfile::tempdir().unwrap();
    let e = InProc::start(home.path(), |_| {}).await;
    let mut s = e.events("since=0").await;
    let first = s.next_frame(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.retry, Some(3000));
    let ready = s.next_event(Duration::from_secs(5)).await.unwrap();
    assert_eq!(ready.event.as_deref(), Some("engine.ready"));
    assert_eq!(ready.id.as_deref(), Some("1"));
    let v = ready.json();
    assert_eq!(v["id"], "1");
    assert_eq!(v["type"], "engine.ready");
    assert_eq!(v["payload"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(v.get("chatId").is_none());
    assert!(v["ts"].as_str().unwrap().ends_with('Z'));
    e.stop().await;
}

#[tokio::test]
async fn without_a_position_only_live_events_arrive() {
    let home = tempfile::tempdir().unwrap();
    let e = InProc::start(home.path(), |_| {}).await;
    e.state.bus.publish(None, err_event(0));
    let mut s = e.events("").await;
    // The subscription is registered once the response headers arrived.
    e.state.bus.publish(None, err_event(1));
    let ev = s.next_event(Duration::from_secs(5)).await.unwrap();
    assert_eq!(ev.id_num(), Some(3));
    e.stop().await;
}

#[tokio::test]
async fn chat_and_type_filters() {
    let home = tempfile::tempdir().unwrap();
    let e = InProc::start(home.path(), |_| {}).await;
    let bus = &e.state.bus;
    bus.publish(Some("c_a"), EventKind::ChatDeleted {});
    bus.publish(Some("c_b"), EventKind::ChatDeleted {});
    bus.publish(
        Some("c_a"),
        EventKind::TurnStarted {
            turn_id: "t".into(),
            message_id: "m".into(),
        },
    );
    bus.publish(None, err_event(0));

    let mut s = e.events("since=0&chatId=c_a").await;
    let ids = collect_ids(&mut s, 4).await;
    // engine.ready (1), c_a deleted (2), c_a turn (4), engine-level error (5).
    assert_eq!(ids, vec![1, 2, 4, 5]);

    let mut s = e.events("since=0&types=chat.turn.*,error").await;
    let ids = collect_ids(&mut s, 2).await;
    assert_eq!(ids, vec![4, 5]);

    let mut s = e.events("since=0&chatId=c_b&types=chat.*").await;
    assert_eq!(collect_ids(&mut s, 1).await, vec![3]);
    e.stop().await;
}

#[tokio::test]
async fn bad_positions_are_rejected_with_the_error_shape() {
    let home = tempfile::tempdir().unwrap();
    let e = InProc::start(home.path(), |_| {}).await;
    for (header, query) in [(Some("abc"), ""), (None, "since=-1"), (None, "since=1x")] {
        let mut req = e.get(&format!("/events?{query}"));
        if let Some(h) = header {
            req = req.header("Last-Event-ID", h);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 400);
        let v: serde_json::Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_request");
    }
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_blocks_nobody_and_is_caught_up_from_the_journal() {
    let home = tempfile::tempdir().unwrap();
    let e = InProc::start(home.path(), |_| {}).await;
    let addr = e.addr().to_owned();

    // A raw TCP client that subscribes and then reads nothing for a while:
    // its socket buffers fill and its broadcast receiver lags.
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(
            format!(
                "GET /events?since=1 HTTP/1.1\r\nHost: {addr}\r\nX-Replicas-Engine-Secret: {}\r\n\r\n",
                SECRET
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut healthy = e.events("since=1").await;

    // Far more than the broadcast buffer (4096), with big payloads so the
    // stalled socket fills.
    let n = 12_000usize;
    let big = "x".repeat(512);
    let bus = e.state.bus.clone();
    let publisher = tokio::spawn(async move {
        for i in 0..n {
            bus.publish(
                None,
                EventKind::Error {
                    code: "load".into(),
                    message: format!("{i} {big}"),
                    source: "test".into(),
                },
            );
            if i % 500 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });
    // The healthy subscriber gets everything while the other is stalled, and
    // publishing finishes (it never waits for subscribers).
    let got = collect_ids(&mut healthy, n).await;
    assert_eq!(got, (2..=n as u64 + 1).collect::<Vec<_>>());
    tokio::time::timeout(Duration::from_secs(20), publisher)
        .await
        .unwrap()
        .unwrap();

    // Now the stalled client reads: it must see every id in order.
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let last = format!("id: {}\n", n + 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&raw).contains(&last) {
        let k = tokio::time::timeout_at(deadline, stalled.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(k > 0, "stalled stream closed");
        raw.extend_from_slice(&buf[..k]);
    }
    let text = String::from_utf8_lossy(&raw);
    let ids: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|v| v.trim().parse().unwrap())
        .collect();
    assert_eq!(ids, (2..=n as u64 + 1).collect::<Vec<_>>());
    e.stop().await;
}

#[tokio::test]
async fn retention_drops_the_oldest_and_old_positions_get_stream_reset() {
    let home = tempfile::tempdir().unwrap();
    let e = InProc::start(home.path(), |c| c.events_max_bytes = 64 * 1024).await;
    for i in 0..3000 {
        e.state.bus.publish(None, err_event(i));
    }
    let journal = home.path().join(".replicas/engine");
    let size: u64 = std::fs::read_dir(&journal)
        .unwrap()
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().starts_with("events"))
        .map(|f| f.metadata().unwrap().len())
        .sum();
    assert!(size <= 64 * 1024 + 1024, "journal is {size} bytes");
    let oldest = e.state.bus.oldest_id().unwrap();
    assert!(oldest > 1);

    let mut s = e.events("since=5").await;
    let reset = s.next_event(Duration::from_secs(5)).await.unwrap();
    assert_eq!(reset.event.as_deref(), Some("stream.reset"));
    assert!(
        reset.id.is_none(),
        "stream.reset must not move the client's position"
    );
    assert_eq!(
        reset.json()["payload"]["oldestAvailableId"],
        oldest.to_string()
    );
    let ids = collect_ids(&mut s, 3001 - oldest as usize + 1).await;
    assert_eq!(ids, (oldest..=3001).collect::<Vec<_>>());

    // A position still retained replays without a reset.
    let mut s = e.events(&format!("since={}", 2990)).await;
    let first = s.next_event(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.id_num(), Some(2991));
    // stream.reset is never written to the journal.
    let all = std::fs::read_to_string(journal.join("events.jsonl")).unwrap();
    assert!(!all.contains("stream.reset"));
    e.stop().await;
}

#[tokio::test]
async fn ids_continue_across_restarts_and_old_events_replay() {
    let e = TestEngine::start().await;
    let mut s = e.events("since=0").await;
    let (first, _) = s
        .wait_for(Duration::from_secs(10), |ev| {
            ev.event.as_deref() == Some("engine.ready")
        })
        .await;
    assert_eq!(first.id_num(), Some(1));
    drop(s);
    let e = e.restart().await;
    let e = e.crash_and_restart().await;
    let mut s = e.events("since=0").await;
    let ids = collect_ids(&mut s, 3).await;
    assert_eq!(
        ids,
        vec![1, 2, 3],
        "one engine.ready per start, numbered on"
    );
    let status = e.get_json("/status", 200).await;
    assert_eq!(status["events"]["lastEventId"], "3");
    e.shutdown().await;
}

#[tokio::test]
async fn torn_last_line_is_skipped_with_a_warning() {
    let e = TestEngine::start().await;
    let journal = e.home().join(".replicas/engine/events.jsonl");
    let e = e
        .restart_with(true, |_| {
            let mut data = std::fs::read(&journal).unwrap();
            data.extend_from_slice(br#"{"id":"2","ts":"2026-11-21T2"#);
            std::fs::write(&journal, data).unwrap();
        })
        .await;
    assert!(e.logs().contains("torn last line"), "{}", e.logs());
    let mut s = e.events("since=0").await;
    let ids = collect_ids(&mut s, 2).await;
    assert_eq!(ids, vec![1, 2]);
    let text = std::fs::read_to_string(&journal).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(text
        .lines()
        .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    e.shutdown().await;
}

#[tokio::test]
async fn garbage_journal_does_not_stop_the_engine() {
    let (spec, guard) = EngineSpec::new();
    let dir = spec.home.join(".replicas/engine");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("events.jsonl"),
        b"\x00\xffnot json\n{\"id\":\"7\"\n\n",
    )
    .unwrap();
    let e = TestEngine::start_spec(spec, guard).await;
    assert_eq!(e.get("/health").send().await.unwrap().status(), 200);
    let mut s = e.events("since=0").await;
    let ready = s.wait_type("engine.ready").await;
    assert_eq!(ready.id_num(), Some(1));
    e.shutdown().await;
}

#[tokio::test]
async fn sigterm_ends_open_streams_and_exits_zero() {
    let e = TestEngine::start().await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(e.events("since=0").await);
    }
    for s in &mut streams {
        s.wait_type("engine.ready").await;
    }
    let status = e.get_json("/status", 200).await;
    assert_eq!(status["events"]["subscribers"], 3);
    let logs_before = e.logs();
    assert!(!logs_before.contains(SECRET));
    let started = std::time::Instant::now();
    e.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(10));
    for s in &mut streams {
        // The server closed the stream: reading ends instead of hanging.
        let mut rest: Vec<SseEvent> = Vec::new();
        while let Some(ev) = s.next_frame(Duration::from_secs(5)).await {
            rest.push(ev);
        }
        assert!(s.ended, "stream still open after shutdown");
    }
}

#[tokio::test]
async fn idle_streams_get_keepalive_comments() {
    let (spec, guard) = EngineSpec::new();
    let e = TestEngine::start_spec(spec.with("REPLICAS_SSE_KEEPALIVE_SECS", "1"), guard).await;
    let res = e.get("/events").send().await.unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut s = SseStream::new(res);
    let retry = s.next_frame(Duration::from_secs(5)).await.unwrap();
    assert_eq!(retry.retry, Some(3000));
    let ka = s.next_frame(Duration::from_secs(5)).await.unwrap();
    assert_eq!(ka.comments, vec!["keepalive".to_owned()]);
    e.shutdown().await;
}

/// At `REPLICAS_MAX_SUBSCRIBERS` open streams the next `GET /events` is 503
/// in the error shape (and `/status` still answers); once a stream closes a
/// new one is accepted.
#[tokio::test]
async fn event_streams_beyond_the_cap_are_503() {
    let home = tempfile::tempdir().unwrap();
    let e = InProc::start(home.path(), |c| {
        c.max_subscribers = 2;
        c.sse_keepalive = Duration::from_millis(100);
    })
    .await;
    let first = e.events("since=0").await;
    let mut second = e.events("").await;
    let res = e.get("/events").send().await.unwrap();
    assert_eq!(res.status(), 503);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unavailable", "{v}");
    let status: serde_json::Value = e.get("/status").send().await.unwrap().json().await.unwrap();
    assert_eq!(status["events"]["subscribers"], 2, "{status}");
    // The open ones keep streaming.
    e.state.bus.publish(None, err_event(1));
    second.wait_type("error").await;
    // A slot frees once a client goes (noticed at the next keepalive write).
    drop(first);
    eventually("a slot to free", Duration::from_secs(20), async || {
        e.get("/events").send().await.unwrap().status() == 200
    })
    .await;
    drop(second);
    e.stop().await;
}
