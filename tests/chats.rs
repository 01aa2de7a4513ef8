//! Chats through the real server, with fake `claude`/`codex` CLIs that
//! replay recorded transcripts (tests/fixtures/bin): the registry and its
//! error shapes, a turn's event sequence, the queue, interrupt and delete
//! ending the whole process tree, bad provider output, restart and `kill -9`
//! recovery, concurrent chats, history paging, a corrupt chats.json.

use std::path::Path;
use std::time::Duration;

use crate::common::chat::{
    chat_events, create_chat, engine, history, last_argv, new_chat, payload, send, send_and_wait,
    spec, wait_chat, wait_turn, WAIT,
};
use crate::common::{alive, eventually, wait_pid, TestEngine};
use serde_json::{json, Value};

/// Wait until `path` holds a pid; the fake writes it once its lingering
/// child is running.
async fn wait_dead(pid: i32) {
    eventually(&format!("process {pid} to end"), WAIT, async || !alive(pid)).await
}

/// `POST /chats/{chat}/interrupt` with `body`; returns the chat.
async fn interrupt(e: &TestEngine, chat: &str, body: Value) -> Value {
    e.post_json(&format!("/chats/{chat}/interrupt"), body, 200)
        .await
}

async fn error_of(res: reqwest::Response, status: u16) -> (String, String) {
    assert_eq!(res.status().as_u16(), status);
    let body: Value = res.json().await.unwrap();
    (
        body["error"]["code"].as_str().unwrap().to_owned(),
        body["error"]["message"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn create_list_get_delete_and_error_shapes() {
    let e = engine().await;
    let ws = std::fs::canonicalize(e.spec.workspaces()).unwrap();
    std::fs::create_dir_all(ws.join("api")).unwrap();
    std::fs::create_dir_all(e.home().join("outside")).unwrap();
    std::os::unix::fs::symlink(e.home().join("outside"), ws.join("escape")).unwrap();
    let mut events = e.events("since=0&types=chat.*").await;

    let a = e
        .post_json("/chats", json!({"provider": "claude"}), 201)
        .await;
    assert_eq!(a["title"], "Claude chat");
    assert_eq!(a["status"], "idle");
    assert_eq!(a["processing"], false);
    assert_eq!(a["cwd"], ws.display().to_string());
    assert_eq!(a["queue"], json!([]));
    assert_eq!(a["lastTurn"], Value::Null);
    assert_eq!(a["providerSessionId"], Value::Null);
    assert_eq!(a["usage"]["inputTokens"], 0);
    let b = e
        .post_json("/chats", json!({"provider": "codex", "title": "Fix it", "model": "gpt-x", "cwd": "api", "extra": 1}), 201)
        .await;
    assert_eq!(
        (b["title"].as_str(), b["model"].as_str()),
        (Some("Fix it"), Some("gpt-x"))
    );
    assert_eq!(b["cwd"], ws.join("api").display().to_string());
    let abs = e
        .post_json(
            "/chats",
            json!({"provider": "codex", "cwd": ws.join("api/../api")}),
            201,
        )
        .await;
    assert_eq!(abs["cwd"], b["cwd"]);

    let created = events.wait_type("chat.created").await;
    assert_eq!(created.json()["chatId"], a["id"]);
    assert_eq!(payload(&created)["chat"], a);

    // Newest first.
    let list = e.get_json("/chats", 200).await;
    let ids: Vec<&Value> = list["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["id"])
        .collect();
    assert_eq!(ids, [&abs["id"], &b["id"], &a["id"]]);
    assert_eq!(
        e.get_json(&format!("/chats/{}", a["id"].as_str().unwrap()), 200)
            .await,
        a
    );
    assert_eq!(
        e.get_json("/status", 200).await["chats"],
        json!({"total":3,"running":0,"queuedMessages":0})
    );

    // Bad input: 400 naming the field; nothing is created.
    let bad_chats = [
        (json!({}), "provider"),
        (json!({"provider": "gpt"}), "provider"),
        (json!({"provider": 7}), "provider"),
        (json!({"provider": "claude", "cwd": ".."}), "cwd"),
        (
            json!({"provider": "claude", "cwd": "api/../../outside"}),
            "cwd",
        ),
        (json!({"provider": "claude", "cwd": "escape"}), "cwd"),
        (json!({"provider": "claude", "cwd": "/etc"}), "cwd"),
        (json!({"provider": "claude", "cwd": "missing"}), "cwd"),
    ];
    for (body, field) in bad_chats {
        let (code, msg) = error_of(e.post("/chats").json(&body).send().await.unwrap(), 400).await;
        assert_eq!(code, "invalid_request", "{body}");
        assert!(msg.contains(field), "{body}: {msg}");
    }
    assert_eq!(
        e.get_json("/chats", 200).await["chats"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    let chat = a["id"].as_str().unwrap();
    let bad_messages = [
        (json!({}), "message"),
        (json!({"message": ""}), "message"),
        (json!({"message": "   "}), "message"),
        (json!({"message": "/plan"}), "message"),
        (json!({"message": 42}), "message"),
        (
            json!({"message": "hi", "thinkingLevel": "extreme"}),
            "thinkingLevel",
        ),
        (json!({"message": "hi", "planMode": "yes"}), "planMode"),
        (
            json!({"message": "hi", "images": [{"type": "image", "source": {"type": "url"}}]}),
            "images",
        ),
    ];
    for (body, field) in bad_messages {
        let res = e
            .post(&format!("/chats/{chat}/messages"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let (code, msg) = error_of(res, 400).await;
        assert_eq!(code, "invalid_request", "{body}");
        assert!(msg.contains(field), "{body}: {msg}");
    }
    let res = e
        .post(&format!("/chats/{chat}/messages"))
        .body("{not json")
        .header("content-type", "application/json");
    assert_eq!(
        error_of(res.send().await.unwrap(), 400).await.0,
        "invalid_request"
    );

    // Unknown chat: 404 on every route.
    for req in [
        e.get("/chats/c_nope"),
        e.delete("/chats/c_nope"),
        e.post("/chats/c_nope/messages")
            .json(&json!({"message": "hi"})),
        e.post("/chats/c_nope/interrupt"),
        e.get("/chats/c_nope/history"),
    ] {
        assert_eq!(
            error_of(req.send().await.unwrap(), 404).await.0,
            "not_found"
        );
    }
    let res = e
        .get(&format!("/chats/{chat}/history?limit=abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(res, 400).await.0, "invalid_request");

    // Interrupting an idle chat is a no-op.
    let same = interrupt(&e, chat, json!({})).await;
    assert_eq!(same["status"], "idle");

    let res = e.delete(&format!("/chats/{chat}")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"success": true}));
    let deleted = events.wait_type("chat.deleted").await;
    assert_eq!(deleted.json()["chatId"], a["id"]);
    assert_eq!(payload(&deleted), json!({}));
    e.get_json(&format!("/chats/{chat}"), 404).await;

    // The registry survives a restart.
    let e = e.restart().await;
    let ids: Vec<Value> = e.get_json("/chats", 200).await["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(ids, [abs["id"].clone(), b["id"].clone()]);
    e.shutdown().await;
}

#[tokio::test]
async fn a_turn_streams_accepted_started_deltas_completed_then_history() {
    let e = engine().await;
    for provider in ["claude", "codex"] {
        let (chat, mut events) = new_chat(&e, provider).await;
        let acc = send(&e, &chat, "/plan say hello FAKE_TOOL").await;
        assert_eq!(acc["status"], "sent");
        assert_eq!(acc["position"], 0);
        assert_eq!(acc["chatId"], chat.as_str());
        let mid = acc["messageId"].as_str().unwrap();

        let accepted = events.wait_type("chat.turn.accepted").await;
        let p = payload(&accepted);
        assert_eq!(
            (p["status"].as_str(), p["position"].as_u64()),
            (Some("sent"), Some(0))
        );
        assert_eq!(p["message"]["id"], mid);
        assert_eq!(
            p["message"]["text"], "say hello FAKE_TOOL",
            "/plan is stripped"
        );
        assert_eq!(p["message"]["planMode"], true);
        assert_eq!(p["message"]["images"], 0);

        let (started, _) = events
            .wait_for(WAIT, |e| e.event.as_deref() == Some("chat.turn.started"))
            .await;
        let turn = payload(&started)["turnId"].as_str().unwrap().to_owned();
        assert_eq!(payload(&started)["messageId"], mid);
        let (done, between) = events
            .wait_for(WAIT, |e| e.event.as_deref() == Some("chat.turn.completed"))
            .await;
        let done = payload(&done);
        assert_eq!(done["turnId"], turn.as_str());
        assert_eq!(done["outcome"], "completed", "{done}");
        assert!(
            done["usage"]["outputTokens"].as_u64().unwrap() > 0,
            "{done}"
        );
        assert!(done["durationMs"].is_u64());
        assert!(done.get("error").is_none());

        let items: Vec<Value> = between
            .iter()
            .filter(|e| e.event.as_deref() == Some("chat.turn.delta"))
            .map(payload)
            .filter(|p| p["turnId"] == turn.as_str() && p.get("item").is_some())
            .map(|p| p["item"].clone())
            .collect();
        let kinds: Vec<&str> = items.iter().map(|i| i["kind"].as_str().unwrap()).collect();
        assert!(
            kinds.contains(&"assistant_message"),
            "{provider}: {kinds:?}"
        );
        assert!(
            kinds.iter().any(|k| matches!(*k, "tool_call" | "command")),
            "{provider}: {kinds:?}"
        );
        assert!(items
            .iter()
            .all(|i| i["id"].as_str().unwrap().starts_with("i_") && i.get("raw").is_none()));

        let chat_now = wait_chat(&e, &chat, |c| c["status"] == "idle").await;
        assert_eq!(chat_now["processing"], false);
        assert_eq!(chat_now["lastTurn"]["turnId"], turn.as_str());
        assert_eq!(chat_now["lastTurn"]["outcome"], "completed");
        assert!(chat_now["providerSessionId"].is_string(), "{chat_now}");
        assert_eq!(
            chat_now["usage"]["outputTokens"],
            done["usage"]["outputTokens"]
        );

        let hist = history(&e, &chat, "").await;
        let hitems = hist["items"].as_array().unwrap();
        assert_eq!(hitems[0]["kind"], "user_message");
        assert_eq!(hitems[0]["text"], "say hello FAKE_TOOL");
        assert_eq!(hitems[0]["turnId"], turn.as_str());
        // Every streamed item is in the history, in order, by id (an item
        // re-sent as it progressed appears once, in its final form).
        let mut streamed: Vec<&Value> = Vec::new();
        for i in &items {
            match streamed.iter().position(|s| s["id"] == i["id"]) {
                Some(pos) => streamed[pos] = i,
                None => streamed.push(i),
            }
        }
        assert_eq!(
            hitems[1..].iter().collect::<Vec<_>>(),
            streamed,
            "{provider}"
        );
        assert_eq!(hist["total"], hitems.len());
        assert_eq!(hist["hasMore"], false);
        let text: String = hitems
            .iter()
            .filter(|i| i["kind"] == "assistant_message")
            .map(|i| i["text"].as_str().unwrap())
            .collect();
        assert!(text.contains("Hello from fake"), "{text}");

        // The second turn resumes the provider session and usage accumulates.
        let (_, end, p) = send_and_wait(&e, &mut events, &chat, "again").await;
        assert_eq!(
            (end.as_str(), p["outcome"].as_str()),
            ("chat.turn.completed", Some("completed"))
        );
        let c = wait_chat(&e, &chat, |c| c["status"] == "idle").await;
        assert_eq!(c["providerSessionId"], chat_now["providerSessionId"]);
        assert_eq!(
            c["usage"]["outputTokens"].as_u64().unwrap(),
            chat_now["usage"]["outputTokens"].as_u64().unwrap()
                + p["usage"]["outputTokens"].as_u64().unwrap()
        );
        let hist = history(&e, &chat, "?limit=1").await;
        assert!(
            hist["items"][0]["text"]
                .as_str()
                .unwrap()
                .contains("turn=2"),
            "{hist}"
        );
    }
    e.shutdown().await;
}

#[tokio::test]
async fn queued_messages_run_strictly_in_order() {
    let e = engine().await;
    let (chat, mut events) = new_chat(&e, "claude").await;
    let first = send(&e, &chat, "FAKE_SLOW").await;
    assert_eq!(first["status"], "sent");
    let mut ids = vec![first["messageId"].as_str().unwrap().to_owned()];
    for n in 1..=3 {
        let acc = send(&e, &chat, &format!("queued {n}")).await;
        assert_eq!(acc["status"], "queued");
        assert_eq!(acc["position"], n);
        ids.push(acc["messageId"].as_str().unwrap().to_owned());
    }
    let c = e.get_json(&format!("/chats/{chat}"), 200).await;
    assert_eq!(c["status"], "running");
    assert_eq!(c["processing"], true);
    let queued: Vec<&str> = c["queue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        queued,
        ids[1..].iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(c["queue"][0]["text"], "queued 1");
    assert_eq!(
        e.get_json("/status", 200).await["chats"]["queuedMessages"],
        3
    );

    // Interrupt the slow one to keep the test quick; the queue continues.
    interrupt(&e, &chat, json!({})).await;
    // Each turn starts only after the previous one ended, in send order.
    let mut order = Vec::new();
    let mut open: Option<String> = None;
    while order.len() < ids.len() || open.is_some() {
        let ev = events.next_event(WAIT).await.expect("events keep coming");
        let p = payload(&ev);
        match ev.event.as_deref() {
            Some("chat.turn.started") => {
                assert!(open.is_none(), "a turn started while another ran");
                open = Some(p["turnId"].as_str().unwrap().to_owned());
                order.push(p["messageId"].as_str().unwrap().to_owned());
            }
            Some("chat.turn.completed" | "chat.interrupted") => {
                assert_eq!(open.take().as_deref(), p["turnId"].as_str());
            }
            _ => {}
        }
    }
    assert_eq!(order, ids);
    let c = wait_chat(&e, &chat, |c| c["status"] == "idle").await;
    assert_eq!(c["queue"], json!([]));
    assert_eq!(c["lastTurn"]["outcome"], "completed");
    e.shutdown().await;
}

#[tokio::test]
async fn interrupt_ends_the_whole_tree_then_the_queue_continues_or_is_cleared() {
    let e = engine().await;
    let pid_file = e.home().join("linger.pid");
    for provider in ["claude", "codex"] {
        let _ = std::fs::remove_file(&pid_file);
        let (chat, mut events) = new_chat(&e, provider).await;
        let slow = send(&e, &chat, "FAKE_LINGER").await;
        let next = send(&e, &chat, "after").await;
        assert_eq!(next["position"], 1);
        let child = wait_pid(&pid_file).await;
        assert!(alive(child));

        let c = interrupt(&e, &chat, json!({"clearQueue": false})).await;
        assert_ne!(
            c["status"], "interrupting",
            "answered only after the turn ended: {c}"
        );
        // SIGKILL was sent to the group before the turn was reported
        // ended; the kernel may take a moment to tear the process down.
        wait_dead(child).await;
        let (_, end, p) = wait_turn(&mut events, slow["messageId"].as_str().unwrap()).await;
        assert_eq!(end, "chat.interrupted", "{p}");
        assert!(p["durationMs"].is_u64());
        let (_, end, p) = wait_turn(&mut events, next["messageId"].as_str().unwrap()).await;
        assert_eq!(
            (end.as_str(), p["outcome"].as_str()),
            ("chat.turn.completed", Some("completed")),
            "{provider}"
        );
        let c = wait_chat(&e, &chat, |c| c["status"] == "idle").await;
        assert_eq!(c["lastTurn"]["outcome"], "completed");

        // clearQueue drops what waits; nothing else starts.
        let slow = send(&e, &chat, "FAKE_HANG").await;
        send(&e, &chat, "dropped 1").await;
        send(&e, &chat, "dropped 2").await;
        events
            .wait_for(WAIT, |ev| {
                ev.event.as_deref() == Some("chat.turn.started")
                    && payload(ev)["messageId"] == slow["messageId"]
            })
            .await;
        let c = interrupt(&e, &chat, json!({"clearQueue": true})).await;
        assert_eq!(c["queue"], json!([]));
        assert_eq!(c["status"], "idle", "{c}");
        assert_eq!(c["lastTurn"]["outcome"], "interrupted");
        assert_eq!(c["lastTurn"]["reason"], "user");
        // Prove nothing started: a new message is the very next turn.
        let probe = send(&e, &chat, "probe").await;
        assert_eq!(probe["status"], "sent");
        let (started, seen) = events
            .wait_for(WAIT, |ev| {
                ev.event.as_deref() == Some("chat.turn.started")
                    && payload(ev)["messageId"] == probe["messageId"]
            })
            .await;
        assert!(
            !seen
                .iter()
                .any(|ev| ev.event.as_deref() == Some("chat.turn.started")),
            "a dropped message ran"
        );
        let turn = payload(&started)["turnId"].clone();
        events
            .wait_for(WAIT, |ev| {
                ev.event.as_deref() == Some("chat.turn.completed") && payload(ev)["turnId"] == turn
            })
            .await;
    }
    e.shutdown().await;
}

#[tokio::test]
async fn delete_while_running_ends_the_tree_and_forgets_the_chat() {
    let e = engine().await;
    let pid_file = e.home().join("linger.pid");
    let (chat, mut events) = new_chat(&e, "claude").await;
    send(&e, &chat, "FAKE_LINGER").await;
    send(&e, &chat, "never runs").await;
    let child = wait_pid(&pid_file).await;
    let history_file = e
        .home()
        .join(format!(".replicas/engine/history/{chat}.jsonl"));
    assert!(history_file.exists());

    let res = e.delete(&format!("/chats/{chat}")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    wait_dead(child).await;
    let (_, seen) = events
        .wait_for(WAIT, |ev| ev.event.as_deref() == Some("chat.deleted"))
        .await;
    assert_eq!(
        seen.iter()
            .filter(|ev| ev.event.as_deref() == Some("chat.turn.started"))
            .count(),
        1
    );
    e.get_json(&format!("/chats/{chat}"), 404).await;
    e.get_json(&format!("/chats/{chat}/history"), 404).await;
    assert!(!history_file.exists());
    assert_eq!(
        e.get_json("/status", 200).await["chats"],
        json!({"total":0,"running":0,"queuedMessages":0})
    );
    // Gone for good, also after a restart.
    let e = e.restart().await;
    assert_eq!(e.get_json("/chats", 200).await["chats"], json!([]));
    e.shutdown().await;
}

#[tokio::test]
async fn bad_provider_output_fails_the_turn_and_the_chat_stays_usable() {
    let e = engine().await;
    let mut auth = e.events("since=0&types=error").await;
    for provider in ["claude", "codex"] {
        let (chat, mut events) = new_chat(&e, provider).await;
        for (knob, code) in [
            ("FAKE_EXIT", None),
            ("FAKE_AUTH", Some("auth_expired")),
            ("FAKE_FAIL", None),
        ] {
            let (_, end, p) = send_and_wait(&e, &mut events, &chat, knob).await;
            assert_eq!(
                (end.as_str(), p["outcome"].as_str()),
                ("chat.turn.completed", Some("failed")),
                "{provider} {knob}: {p}"
            );
            assert!(!p["error"]["message"].as_str().unwrap().is_empty(), "{p}");
            if let Some(code) = code {
                assert_eq!(p["error"]["code"], code, "{provider} {knob}: {p}");
            }
            let c = wait_chat(&e, &chat, |c| c["status"] == "idle").await;
            assert_eq!(c["lastTurn"]["outcome"], "failed");
            assert_eq!(c["lastTurn"]["error"], p["error"]);
            // The failure is in the history too.
            let last = &history(&e, &chat, "?limit=1").await["items"][0];
            assert_eq!(last["kind"], "error");
        }
        // Non-JSON lines and a 10 MB line are skipped; the turn still ends
        // on the CLI's own report.
        for knob in ["FAKE_GARBAGE", "FAKE_HUGE"] {
            let (_, end, p) = send_and_wait(&e, &mut events, &chat, knob).await;
            assert_eq!(end, "chat.turn.completed", "{provider} {knob}");
            assert!(
                matches!(p["outcome"].as_str(), Some("completed" | "failed")),
                "{p}"
            );
        }
        let (_, _, p) = send_and_wait(&e, &mut events, &chat, "hello").await;
        assert_eq!(
            p["outcome"], "completed",
            "{provider}: the chat is usable after failures"
        );

        let (ev, _) = auth
            .wait_for(WAIT, |ev| {
                payload(ev)["code"] == "auth_expired" && payload(ev)["source"] == provider
            })
            .await;
        assert!(payload(&ev)["message"].as_str().unwrap().contains(provider));
        assert!(ev.json().get("chatId").is_none());
    }
    e.shutdown().await;

    // A CLI that cannot be started at all.
    let (spec, guard) = spec();
    let e = TestEngine::start_spec(spec.with("CLAUDE_BIN", "/nonexistent/claude"), guard).await;
    let (chat, mut events) = new_chat(&e, "claude").await;
    for _ in 0..2 {
        let (_, _, p) = send_and_wait(&e, &mut events, &chat, "hello").await;
        assert_eq!(p["outcome"], "failed");
        assert_eq!(p["error"]["code"], "spawn_failed", "{p}");
    }
    e.shutdown().await;
}

#[tokio::test]
async fn kill9_mid_turn_recovers_interrupted_ends_strays_and_resumes_the_queue() {
    let e = engine().await;
    let pid_file = e.home().join("linger.pid");
    let chat = create_chat(&e, "claude").await;
    let idle_chat = create_chat(&e, "codex").await;
    let mut events = chat_events(&e, &chat).await;
    let slow = send(&e, &chat, "FAKE_LINGER").await;
    let q1 = send(&e, &chat, "first after restart").await;
    let q2 = send(&e, &chat, "second after restart").await;
    let child = wait_pid(&pid_file).await;
    let (started, _) = events
        .wait_for(WAIT, |ev| ev.event.as_deref() == Some("chat.turn.started"))
        .await;
    assert_eq!(payload(&started)["messageId"], slow["messageId"]);
    let turn = payload(&started)["turnId"].clone();
    drop(events);

    let e = e.crash_and_restart().await;
    // The stray grandchild of the dead engine's turn is ended on start.
    wait_dead(child).await;
    let mut events = e.events(&format!("chatId={chat}&since=0")).await;
    let (ev, _) = events
        .wait_for(WAIT, |ev| {
            ev.event.as_deref() == Some("chat.interrupted") && payload(ev)["turnId"] == turn
        })
        .await;
    assert!(payload(&ev)["durationMs"].is_u64());
    // Both queued messages survived the kill -9 and run in order.
    let (_, _, p1) = wait_turn(&mut events, q1["messageId"].as_str().unwrap()).await;
    let (_, _, p2) = wait_turn(&mut events, q2["messageId"].as_str().unwrap()).await;
    assert_eq!(
        (p1["outcome"].as_str(), p2["outcome"].as_str()),
        (Some("completed"), Some("completed"))
    );
    let c = wait_chat(&e, &chat, |c| c["status"] == "idle").await;
    assert_eq!(c["queue"], json!([]));
    assert_eq!(c["lastTurn"]["outcome"], "completed");
    let hist = history(&e, &chat, "?limit=1000").await;
    let users: Vec<&str> = hist["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["kind"] == "user_message")
        .map(|i| i["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        users,
        ["FAKE_LINGER", "first after restart", "second after restart"]
    );
    assert_eq!(
        e.get_json(&format!("/chats/{idle_chat}"), 200).await["lastTurn"],
        Value::Null
    );
    e.shutdown().await;
}

#[tokio::test]
async fn restart_right_after_kill9_shows_the_turn_interrupted_by_engine_restart() {
    let e = engine().await;
    let (chat, mut events) = new_chat(&e, "codex").await;
    send(&e, &chat, "FAKE_HANG").await;
    events.wait_type("chat.turn.started").await;
    // pgid is recorded right after the spawn; wait until it is committed.
    let db = e.home().join(".replicas/engine/chats.db");
    eventually("the turn's pgid in chats.db", WAIT, async || {
        running_turn_rows(&db)
            .iter()
            .any(|t| t.contains("\"pgid\""))
    })
    .await;
    let e = e.crash_and_restart().await;
    let c = e.get_json(&format!("/chats/{chat}"), 200).await;
    assert_eq!(c["status"], "idle");
    assert_eq!(c["processing"], false);
    assert_eq!(c["lastTurn"]["outcome"], "interrupted");
    assert_eq!(c["lastTurn"]["reason"], "engine_restart");
    assert!(c.get("activeTurn").is_none());
    e.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_ends_running_turns() {
    let e = engine().await;
    let pid_file = e.home().join("linger.pid");
    let chat = create_chat(&e, "claude").await;
    send(&e, &chat, "FAKE_LINGER").await;
    let child = wait_pid(&pid_file).await;
    let spec = e.shutdown().await;
    // Killed by the engine on its way out, not by the next one.
    eventually(
        "a turn's process to end with the engine",
        Duration::from_secs(2),
        async || !alive(child),
    )
    .await;
    let e = TestEngine::start_with(spec).await;
    let c = e.get_json(&format!("/chats/{chat}"), 200).await;
    assert_eq!(c["status"], "idle");
    assert_eq!(c["lastTurn"]["outcome"], "interrupted");
    assert_eq!(c["lastTurn"]["reason"], "engine_shutdown");
    e.shutdown().await;
}

#[tokio::test]
async fn chats_run_turns_concurrently() {
    let e = engine().await;
    let (busy, mut busy_events) = new_chat(&e, "claude").await;
    send(&e, &busy, "FAKE_HANG").await;
    busy_events.wait_type("chat.turn.started").await;
    // While one chat's turn hangs, others (both providers) complete theirs.
    let mut others = Vec::new();
    for provider in ["claude", "codex", "claude", "codex"] {
        let chat = create_chat(&e, provider).await;
        let events = chat_events(&e, &chat).await;
        let acc = send(&e, &chat, "hello").await;
        others.push((chat, events, acc["messageId"].as_str().unwrap().to_owned()));
    }
    for (_, events, mid) in others.iter_mut() {
        let (_, _, p) = wait_turn(events, mid).await;
        assert_eq!(p["outcome"], "completed");
    }
    assert_eq!(
        e.get_json(&format!("/chats/{busy}"), 200).await["status"],
        "running"
    );
    assert_eq!(e.get_json("/status", 200).await["chats"]["running"], 1);
    let c = interrupt(&e, &busy, json!({})).await;
    assert_eq!(c["status"], "idle");
    e.shutdown().await;
}

#[tokio::test]
async fn history_pages_from_the_end_and_survives_restart() {
    let e = engine().await;
    let (chat, mut events) = new_chat(&e, "codex").await;
    let acc = send(&e, &chat, "FAKE_LINES=25").await;
    wait_turn(&mut events, acc["messageId"].as_str().unwrap()).await;
    let all = history(&e, &chat, "?limit=1000").await;
    let items = all["items"].as_array().unwrap().clone();
    let total = items.len();
    assert!(total >= 26, "{total}");
    assert_eq!(all["total"], total);
    assert_eq!(all["hasMore"], false);

    let page = history(&e, &chat, "?limit=10").await;
    assert_eq!(page["items"].as_array().unwrap()[..], items[total - 10..]);
    assert_eq!(
        (page["total"].as_u64(), page["hasMore"].as_bool()),
        (Some(total as u64), Some(true))
    );
    let page = history(&e, &chat, "?limit=10&offset=10").await;
    assert_eq!(
        page["items"].as_array().unwrap()[..],
        items[total - 20..total - 10]
    );
    let page = history(&e, &chat, &format!("?limit=10&offset={}", total - 3)).await;
    assert_eq!(page["items"].as_array().unwrap()[..], items[..3]);
    assert_eq!(page["hasMore"], false);
    let page = history(&e, &chat, &format!("?offset={}", total + 5)).await;
    assert_eq!(
        (
            page["items"].as_array().unwrap().len(),
            page["hasMore"].as_bool()
        ),
        (0, Some(false))
    );
    let page = history(&e, &chat, "?limit=0").await;
    assert_eq!(
        (
            page["items"].as_array().unwrap().len(),
            page["hasMore"].as_bool()
        ),
        (0, Some(true))
    );
    // `raw` only on request.
    assert!(items.iter().all(|i| i.get("raw").is_none()));
    let raw = history(&e, &chat, "?limit=1&raw=true").await;
    assert!(raw["items"][0]["raw"].is_object(), "{raw}");

    // A torn last line (power loss) is cut with a warning; the rest is kept.
    let e = e.restart().await;
    let file = e
        .home()
        .join(format!(".replicas/engine/history/{chat}.jsonl"));
    let e = e
        .restart_with(true, |_| {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(&file)
                .unwrap()
                .write_all(br#"{"id":"i_torn","tu"#)
                .unwrap();
        })
        .await;
    let again = history(&e, &chat, "?limit=1000").await;
    assert_eq!(again["items"].as_array().unwrap(), &items);
    assert!(e.logs().contains("torn last line"));
    e.shutdown().await;
}

/// The running-turn rows of `chats.db`, read as another process would.
fn running_turn_rows(db: &Path) -> Vec<String> {
    let Ok(conn) =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return Vec::new();
    };
    let Ok(mut stmt) = conn.prepare("SELECT turn FROM turns") else {
        return Vec::new();
    };
    stmt.query_map([], |r| r.get::<_, String>(0))
        .map(|rows| rows.flatten().collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_corrupt_legacy_chats_file_is_set_aside_and_the_engine_keeps_its_chats() {
    let e = engine().await;
    let kept = create_chat(&e, "claude").await;
    let engine_dir = e.home().join(".replicas/engine");
    let e = e
        .restart_with(false, |_| {
            std::fs::write(
                engine_dir.join("chats.json"),
                b"{\"version\":1,\"chats\":[{\"id\":",
            )
            .unwrap();
        })
        .await;
    let ids: Vec<Value> = e.get_json("/chats", 200).await["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(ids, [json!(kept)]);
    let aside: Vec<String> = std::fs::read_dir(&engine_dir)
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("chats.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let mut events = e.events("since=0&types=error").await;
    let ev = events.wait_type("error").await;
    assert_eq!(payload(&ev)["code"], "state_corrupt");
    // Still fully usable.
    let (chat, mut events) = new_chat(&e, "claude").await;
    let (_, _, p) = send_and_wait(&e, &mut events, &chat, "hello").await;
    assert_eq!(p["outcome"], "completed");
    e.shutdown().await;
}

/// Live processes whose parent is the engine (its agent CLIs).
fn engine_children(e: &TestEngine) -> usize {
    replicas_engine::process::live_processes()
        .unwrap_or_default()
        .iter()
        .filter(|p| p.ppid == e.pid())
        .count()
}

#[tokio::test]
async fn idle_agent_processes_are_capped_and_the_next_message_resumes() {
    // Cap 2: three Claude chats with one finished turn each leave two
    // processes; the chat whose process went resumes on its next message.
    let (spec, guard) = spec();
    let spec = spec.with("REPLICAS_MAX_AGENT_PROCESSES", "2");
    let e = TestEngine::start_spec(spec, guard).await;
    let mut chats = Vec::new();
    for _ in 0..3 {
        let (chat, mut events) = new_chat(&e, "claude").await;
        let (_, end, p) = send_and_wait(&e, &mut events, &chat, "hello").await;
        assert_eq!(end, "chat.turn.completed", "{p}");
        assert_eq!(p["outcome"], "completed", "{p}");
        chats.push(chat);
    }
    eventually(
        "two agent processes",
        WAIT,
        async || match engine_children(&e) {
            2 => Ok(()),
            n => Err(format!("{n} agent processes")),
        },
    )
    .await;
    let mut events = chat_events(&e, &chats[0]).await;
    let (_, end, p) = send_and_wait(&e, &mut events, &chats[0], "again").await;
    assert_eq!(
        (end.as_str(), &p["outcome"]),
        ("chat.turn.completed", &json!("completed")),
        "{p}"
    );
    let history = history(&e, &chats[0], "").await;
    assert!(history.to_string().contains("turn=2"), "{history}");
    assert_eq!(engine_children(&e), 2);
    e.shutdown().await;
}

#[tokio::test]
async fn codex_without_app_server_falls_back_to_exec_and_status_says_so() {
    // fake-codex told to know only `exec`: `codex app-server` fails its handshake
    // (as an older CLI would), the engine logs it once and uses exec.
    let (spec, guard) = spec();
    let spec = spec
        .with("REPLICAS_CODEX_TRANSPORT", "app-server")
        .with("FAKE_NO_APP_SERVER", "1");
    let e = TestEngine::start_spec(spec, guard).await;
    let status = e.get_json("/status", 200).await;
    assert_eq!(status["providers"]["codexTransport"], "pending", "{status}");
    let (chat, mut events) = new_chat(&e, "codex").await;
    for text in ["hello", "again"] {
        let (_, end, p) = send_and_wait(&e, &mut events, &chat, text).await;
        assert_eq!(
            (end.as_str(), &p["outcome"]),
            ("chat.turn.completed", &json!("completed")),
            "{p}"
        );
    }
    let status = e.get_json("/status", 200).await;
    assert_eq!(status["providers"]["codexTransport"], "exec", "{status}");
    let history = history(&e, &chat, "").await;
    assert!(history.to_string().contains("turn=2"), "{history}");
    let logs = e.shutdown_logs().await;
    assert_eq!(
        logs.matches("codex app-server unavailable").count(),
        1,
        "{logs}"
    );
}

#[tokio::test]
async fn codex_app_server_chat_streams_text_and_survives_an_interrupt() {
    let (spec, guard) = spec();
    let spec = spec.with("REPLICAS_CODEX_TRANSPORT", "app-server");
    let e = TestEngine::start_spec(spec, guard).await;
    let (chat, mut events) = new_chat(&e, "codex").await;
    let (started, end, p) = send_and_wait(&e, &mut events, &chat, "hello").await;
    assert_eq!(
        (end.as_str(), &p["outcome"]),
        ("chat.turn.completed", &json!("completed")),
        "{p}"
    );
    // Streamed text arrived as deltas of the turn, keyed by the final item.
    let turn_id = started["turnId"].clone();
    let mut replay = chat_events(&e, &chat).await;
    let mut text = String::new();
    let mut item_id = None;
    loop {
        let ev = replay.next_event(WAIT).await.expect("event");
        let pl = payload(&ev);
        if ev.event.as_deref() == Some("chat.turn.delta") && pl["turnId"] == turn_id {
            if let Some(d) = pl["textDelta"].as_str() {
                text.push_str(d);
                item_id = Some(pl["itemId"].clone());
            } else if pl["item"]["kind"] == "assistant_message" {
                assert_eq!(Some(pl["item"]["id"].clone()), item_id);
                assert_eq!(pl["item"]["text"].as_str(), Some(text.as_str()));
                break;
            }
        }
    }
    assert!(text.contains("turn=1"), "{text}");
    let status = e.get_json("/status", 200).await;
    assert_eq!(
        status["providers"]["codexTransport"], "app-server",
        "{status}"
    );
    assert_eq!(status["providers"]["agentProcesses"]["live"], 1, "{status}");

    // Interrupt a slow turn; the same process answers the next message.
    send(&e, &chat, "FAKE_SLOW").await;
    events
        .wait_for(WAIT, |ev| {
            ev.event.as_deref() == Some("chat.turn.delta")
                && payload(ev)["textDelta"].is_string()
                && payload(ev)["textDelta"]
                    .as_str()
                    .unwrap()
                    .starts_with("tick")
        })
        .await;
    interrupt(&e, &chat, json!({})).await;
    events.wait_type("chat.interrupted").await;
    let (_, end, p) = send_and_wait(&e, &mut events, &chat, "hello").await;
    assert_eq!(
        (end.as_str(), &p["outcome"]),
        ("chat.turn.completed", &json!("completed")),
        "{p}"
    );
    let history = history(&e, &chat, "").await;
    assert!(history.to_string().contains("turn=2"), "{history}");
    assert_eq!(
        engine_children(&e),
        1,
        "one app-server process for the chat"
    );
    e.shutdown().await;
}
/// `REPLICAS_MAX_MESSAGE_BYTES` (default 1 MiB): a text of exactly the limit
/// is accepted, one byte more is 413 in the error shape and nothing is
/// queued. A queued long message shows as a preview (280 characters plus
/// the full length) in the Chat, `chat.updated` and `chat.turn.accepted`;
/// the agent and the history get the whole text.
#[tokio::test]
async fn message_text_is_capped_and_queued_messages_show_as_previews() {
    const LIMIT: usize = 1024 * 1024;
    let e = engine().await;
    let (chat, mut events) = new_chat(&e, "claude").await;
    let hang = send(&e, &chat, "FAKE_HANG").await;
    assert_eq!(hang["status"], "sent");

    let over = "x".repeat(LIMIT + 1);
    let (code, msg) = error_of(
        e.post(&format!("/chats/{chat}/messages"))
            .json(&json!({ "message": over }))
            .send()
            .await
            .unwrap(),
        413,
    )
    .await;
    assert_eq!(code, "payload_too_large");
    assert!(msg.contains("1048576"), "{msg}");

    let at = "y".repeat(LIMIT);
    let acc = send(&e, &chat, &at).await;
    assert_eq!(
        (acc["status"].as_str(), acc["position"].as_u64()),
        (Some("queued"), Some(1))
    );
    let c = e.get_json(&format!("/chats/{chat}"), 200).await;
    assert_eq!(
        c["queue"].as_array().unwrap().len(),
        1,
        "the 413 queued nothing"
    );
    let q = &c["queue"][0];
    assert_eq!(q["id"], acc["messageId"]);
    assert_eq!(q["text"], "y".repeat(280));
    assert_eq!(q["textLength"], LIMIT);
    assert_eq!(q["truncated"], true);
    let (accepted, _) = events
        .wait_for(WAIT, |ev| {
            ev.event.as_deref() == Some("chat.turn.accepted")
                && payload(ev)["message"]["id"] == acc["messageId"]
        })
        .await;
    assert_eq!(payload(&accepted)["message"], *q);
    let updated = events.wait_type("chat.updated").await;
    assert_eq!(payload(&updated)["chat"]["queue"][0], *q);
    assert!(
        updated.data.len() < 4096,
        "chat.updated carries the preview only"
    );

    // The agent runs the whole text; the history keeps it.
    interrupt(&e, &chat, json!({})).await;
    let (_, end, _) = wait_turn(&mut events, acc["messageId"].as_str().unwrap()).await;
    assert_eq!(end, "chat.turn.completed");
    let hist = history(&e, &chat, "?limit=1000").await;
    let users: Vec<usize> = hist["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["kind"] == "user_message")
        .map(|i| i["text"].as_str().unwrap().len())
        .collect();
    assert_eq!(users, [9, LIMIT]);
    e.shutdown().await;
}

/// `REPLICAS_MAX_QUEUED_MESSAGES` (default 100): the 100th waiting message
/// is queued, the 101st is 429 `queue_full` and changes nothing; once the
/// queue is cleared the chat takes messages again.
#[tokio::test]
async fn a_full_queue_answers_429_queue_full() {
    let e = engine().await;
    let chat = create_chat(&e, "claude").await;
    assert_eq!(send(&e, &chat, "FAKE_HANG").await["status"], "sent");
    for n in 1..=100 {
        let acc = send(&e, &chat, &format!("queued {n}")).await;
        assert_eq!(acc["position"], n);
    }
    let (code, msg) = error_of(
        e.post(&format!("/chats/{chat}/messages"))
            .json(&json!({ "message": "one too many" }))
            .send()
            .await
            .unwrap(),
        429,
    )
    .await;
    assert_eq!(code, "queue_full");
    assert!(msg.contains("100"), "{msg}");
    let c = e.get_json(&format!("/chats/{chat}"), 200).await;
    assert_eq!(c["queue"].as_array().unwrap().len(), 100);
    assert_eq!(c["queue"][99]["text"], "queued 100");

    let c = interrupt(&e, &chat, json!({"clearQueue": true})).await;
    assert_eq!(c["queue"], json!([]));
    let acc = send(&e, &chat, "after the clear").await;
    assert!(acc["status"] == "sent" || acc["position"] == 1, "{acc}");
    e.shutdown().await;
}

/// Whether `argv` has `flag` directly followed by `value`.
fn has_pair(argv: &[String], flag: &str, value: &str) -> bool {
    argv.windows(2).any(|w| w[0] == flag && w[1] == value)
}

/// Per-message `model`, `thinkingLevel` and `planMode` reach both CLIs as
/// their own flags; Codex, which reports no cost, says `costUsd: null`.
#[tokio::test]
async fn per_message_model_thinking_level_and_plan_mode_reach_both_clis() {
    let e = engine().await;
    for provider in ["claude", "codex"] {
        let (chat, mut events) = new_chat(&e, provider).await;
        let acc = e
            .post_json(
                &format!("/chats/{chat}/messages"),
                json!({"message": "options", "model": "model-x", "thinkingLevel": "high", "planMode": true}),
                202,
            )
            .await;
        let (_, end, done) = wait_turn(&mut events, acc["messageId"].as_str().unwrap()).await;
        assert_eq!(
            (end.as_str(), done["outcome"].as_str()),
            ("chat.turn.completed", Some("completed")),
            "{done}"
        );
        let argv = last_argv(e.home());
        let joined = argv.join(" ");
        if provider == "claude" {
            assert!(has_pair(&argv, "--model", "model-x"), "{joined}");
            assert!(has_pair(&argv, "--effort", "high"), "{joined}");
            assert!(has_pair(&argv, "--permission-mode", "plan"), "{joined}");
        } else {
            assert!(has_pair(&argv, "-m", "model-x"), "{joined}");
            assert!(
                argv.iter().any(|a| a == "model_reasoning_effort=\"high\""),
                "{joined}"
            );
            assert!(
                argv.iter().any(|a| a == "sandbox_mode=\"read-only\""),
                "{joined}"
            );
            assert!(
                !argv
                    .iter()
                    .any(|a| a == "--dangerously-bypass-approvals-and-sandbox"),
                "{joined}"
            );
            // Codex gives no cost: unknown, not free.
            assert_eq!(done["usage"]["costUsd"], Value::Null, "{done}");
            let c = e.get_json(&format!("/chats/{chat}"), 200).await;
            assert_eq!(c["usage"]["costUsd"], Value::Null, "{c}");
            assert!(c["usage"]["outputTokens"].as_u64().unwrap() > 0, "{c}");
        }
        // The next message without options runs without them.
        let acc = send(&e, &chat, "plain").await;
        wait_turn(&mut events, acc["messageId"].as_str().unwrap()).await;
        let argv = last_argv(e.home());
        assert!(
            !argv.iter().any(|a| a == "model-x" || a == "plan"),
            "{provider}: {argv:?}"
        );
    }
    e.shutdown().await;
}

fn image_block(media_type: &str, data: &str) -> Value {
    json!({"type":"image","source":{"type":"base64","media_type":media_type,"data":data}})
}

/// Images end to end with Claude: a queued image message is stored as an
/// attachment, survives a restart, reaches the CLI as the same base64 in
/// the stream-json user message, and its attachment is removed once its
/// turn ended. Bad image blocks are 400 at the door, naming the field.
#[tokio::test]
async fn a_queued_image_survives_a_restart_reaches_claude_and_is_then_removed() {
    use base64::Engine as _;
    let png =
        base64::engine::general_purpose::STANDARD.encode(b"\x89PNG\r\n\x1a\nnot really a png");
    let (spec, guard) = spec();
    let stdin_log = spec.home.join("stdin.jsonl");
    let spec = spec.with("FAKE_STDIN_FILE", stdin_log.display().to_string());
    let e = TestEngine::start_spec(spec, guard).await;
    let chat = create_chat(&e, "claude").await;

    for (image, field) in [
        (image_block("image/png", "not base64!"), "source.data"),
        (image_block("image/svg+xml", &png), "source.media_type"),
        (image_block("text/plain", &png), "source.media_type"),
    ] {
        let (code, msg) = error_of(
            e.post(&format!("/chats/{chat}/messages"))
                .json(&json!({"message": "look", "images": [image]}))
                .send()
                .await
                .unwrap(),
            400,
        )
        .await;
        assert_eq!(code, "invalid_request");
        assert!(msg.contains("images[0]") && msg.contains(field), "{msg}");
    }

    assert_eq!(send(&e, &chat, "FAKE_HANG").await["status"], "sent");
    let acc = e
        .post_json(
            &format!("/chats/{chat}/messages"),
            json!({"message": "what is in the picture?", "images": [image_block("image/png", &png)]}),
            202,
        )
        .await;
    assert_eq!(acc["status"], "queued");
    let mid = acc["messageId"].as_str().unwrap().to_owned();
    let attachment = e
        .home()
        .join(format!(".replicas/engine/attachments/{mid}.json"));
    assert!(attachment.exists(), "stored while queued");
    let c = e.get_json(&format!("/chats/{chat}"), 200).await;
    assert_eq!(c["queue"][0]["images"], 1);

    // A graceful restart ends the hanging turn; the queued message with its
    // image is still there and runs on the new engine.
    let e = e.restart_with(false, |_| {}).await;
    assert!(attachment.exists(), "kept across the restart");
    let mut events = chat_events(&e, &chat).await;
    let (_, end, done) = wait_turn(&mut events, &mid).await;
    assert_eq!(end, "chat.turn.completed", "{done}");
    let hist = history(&e, &chat, "").await;
    let answer = hist["items"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|i| i["kind"] == "assistant_message")
        .unwrap()["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(answer.contains("images=1"), "{answer}");
    // The CLI got the very same base64 and media type on stdin.
    let sent: Vec<Value> = std::fs::read_to_string(&stdin_log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|m: &Value| m["type"] == "user")
        .collect();
    let blocks = sent.last().unwrap()["message"]["content"]
        .as_array()
        .unwrap()
        .clone();
    let img = blocks
        .iter()
        .find(|b| b["type"] == "image")
        .expect("an image block");
    assert_eq!(img["source"]["data"], png.as_str());
    assert_eq!(img["source"]["media_type"], "image/png");
    wait_chat(&e, &chat, |c| c["status"] == "idle").await;
    assert!(!attachment.exists(), "removed after its turn");
    e.shutdown().await;
}

/// Images with Codex: written to files handed over with `-i`, with the
/// decoded bytes; the attachment is gone after the turn.
#[tokio::test]
async fn an_image_reaches_codex_as_a_file_with_the_decoded_bytes() {
    use base64::Engine as _;
    let bytes = b"GIF89a-not-really-a-gif".to_vec();
    let gif = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let (spec, guard) = spec();
    let copies = spec.home.join("images");
    std::fs::create_dir_all(&copies).unwrap();
    let spec = spec.with("FAKE_IMAGES_DIR", copies.display().to_string());
    let e = TestEngine::start_spec(spec, guard).await;
    let (chat, mut events) = new_chat(&e, "codex").await;
    let acc = e
        .post_json(
            &format!("/chats/{chat}/messages"),
            json!({"message": "describe", "images": [image_block("image/gif", &gif)]}),
            202,
        )
        .await;
    let mid = acc["messageId"].as_str().unwrap().to_owned();
    let (_, end, done) = wait_turn(&mut events, &mid).await;
    assert_eq!(
        (end.as_str(), done["outcome"].as_str()),
        ("chat.turn.completed", Some("completed")),
        "{done}"
    );
    let got: Vec<Vec<u8>> = std::fs::read_dir(&copies)
        .unwrap()
        .map(|f| std::fs::read(f.unwrap().path()).unwrap())
        .collect();
    assert_eq!(got, [bytes]);
    wait_chat(&e, &chat, |c| c["status"] == "idle").await;
    assert!(!e
        .home()
        .join(format!(".replicas/engine/attachments/{mid}.json"))
        .exists());
    e.shutdown().await;
}

/// `REPLICAS_TURN_TIMEOUT_SECS`: a turn running longer ends `failed` with a
/// `timeout` error, its whole process group (a child that ignores TERM
/// included) is gone, and the chat takes the next message.
#[tokio::test]
async fn a_turn_past_the_timeout_fails_with_timeout_and_loses_its_group() {
    let (spec, guard) = spec();
    let e = TestEngine::start_spec(spec.with("REPLICAS_TURN_TIMEOUT_SECS", "3"), guard).await;
    let pid_file = e.home().join("linger.pid");
    for provider in ["claude", "codex"] {
        let _ = std::fs::remove_file(&pid_file);
        let (chat, mut events) = new_chat(&e, provider).await;
        let acc = send(&e, &chat, "FAKE_LINGER FAKE_HANG").await;
        let child = wait_pid(&pid_file).await;
        let (_, end, done) = wait_turn(&mut events, acc["messageId"].as_str().unwrap()).await;
        assert_eq!(end, "chat.turn.completed", "{provider}: {done}");
        assert_eq!(done["outcome"], "failed", "{provider}: {done}");
        assert_eq!(done["error"]["code"], "timeout", "{provider}: {done}");
        wait_dead(child).await;
        let c = wait_chat(&e, &chat, |c| c["status"] == "idle").await;
        assert_eq!(c["lastTurn"]["error"]["code"], "timeout");
        let (_, _, done) = send_and_wait(&e, &mut events, &chat, "hello again").await;
        assert_eq!(done["outcome"], "completed", "{provider}: {done}");
    }
    e.shutdown().await;
}

/// An internal failure (here: a chat's history file replaced by a folder)
/// answers 500 in the error shape with a generic message and the request
/// id, and the cause is logged once with that id.
#[tokio::test]
async fn an_internal_error_answers_500_in_the_error_shape_and_logs_the_request_id() {
    let e = engine().await;
    let chat = create_chat(&e, "claude").await;
    let acc = send(&e, &chat, "hello").await;
    let mut events = chat_events(&e, &chat).await;
    wait_turn(&mut events, acc["messageId"].as_str().unwrap()).await;
    let hist = e
        .home()
        .join(format!(".replicas/engine/history/{chat}.jsonl"));
    let _ = std::fs::remove_file(&hist);
    std::fs::create_dir_all(&hist).unwrap();
    let res = e
        .get(&format!("/chats/{chat}/history"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 500);
    let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error":{"code":"internal","message":"internal error; see the engine log"}})
    );
    // The engine keeps serving.
    e.get_json(&format!("/chats/{chat}"), 200).await;
    let logs = e.shutdown_logs().await;
    assert!(
        logs.lines()
            .any(|l| l.contains("internal error") && l.contains(&request_id)),
        "no log line with {request_id}:\n{logs}"
    );
    only_line(&logs, "could not read chat history");
}

/// The one log line containing `needle`: the failure was logged once.
fn only_line<'a>(logs: &'a str, needle: &str) -> &'a str {
    let lines: Vec<_> = logs.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(lines.len(), 1, "{needle:?} logged once:\n{logs}");
    lines[0]
}

/// `res` is the generic 500 in the error shape; returns its request id.
async fn internal_error(res: reqwest::Response) -> String {
    let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let (code, message) = error_of(res, 500).await;
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("internal", "internal error; see the engine log")
    );
    request_id
}

/// A chat write that fails (here: another process holds the database's
/// write lock past SQLite's 5 s busy timeout) answers 500 in the error
/// shape, and the failure is logged once, by the HTTP layer with the
/// request id, not again by the database writer.
#[tokio::test]
async fn a_failed_chat_write_answers_500_and_is_logged_once() {
    let e = engine().await;
    let lock = rusqlite::Connection::open(e.home().join(".replicas/engine/chats.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let res = e
        .post("/chats")
        .json(&json!({"provider": "claude"}))
        .send()
        .await
        .unwrap();
    let request_id = internal_error(res).await;
    drop(lock);
    let logs = e.shutdown_logs().await;
    let line = only_line(&logs, "database is locked");
    assert!(
        line.contains("internal error") && line.contains(&request_id),
        "{logs}"
    );
}

/// A message whose images cannot be stored (here: a file where the
/// attachments folder should be) is an internal error: 500 in the error
/// shape, nothing queued or started, the cause logged once.
#[tokio::test]
async fn an_attachment_that_cannot_be_stored_answers_500_and_queues_nothing() {
    let e = engine().await;
    let chat = create_chat(&e, "claude").await;
    let attachments = e.home().join(".replicas/engine/attachments");
    let _ = std::fs::remove_dir_all(&attachments);
    std::fs::write(&attachments, "not a folder").unwrap();
    let image = image_block("image/png", "iVBORw0KGgo=");
    let res = e
        .post(&format!("/chats/{chat}/messages"))
        .json(&json!({"message": "look", "images": [image]}))
        .send()
        .await
        .unwrap();
    internal_error(res).await;
    let c = e.get_json(&format!("/chats/{chat}"), 200).await;
    assert_eq!(c["status"], "idle", "{c}");
    assert_eq!(c["queue"], json!([]), "{c}");
    let logs = e.shutdown_logs().await;
    only_line(&logs, "could not persist chat state");
}

/// An engine from before the database: its `chats.json` (with a queued
/// message) is imported at the first start, renamed, and the message runs.
#[tokio::test]
async fn chats_json_of_an_older_engine_is_imported_at_first_start() {
    let (spec, guard) = spec();
    let engine_dir = spec.home.join(".replicas/engine");
    std::fs::create_dir_all(&engine_dir).unwrap();
    let cwd = spec.workspaces();
    let legacy = json!({"version": 1, "chats": [
        {"id": "c_old", "provider": "claude", "title": "Old chat", "model": null,
         "cwd": cwd, "providerSessionId": null,
         "createdAt": "2026-01-01T00:00:00.000Z", "updatedAt": "2026-01-01T00:00:00.000Z",
         "queue": [{"id": "m_old", "text": "left in the queue", "queuedAt": "2026-01-01T00:00:00.000Z",
                    "planMode": false, "model": null, "images": 0}],
         "lastTurn": null,
         "usage": {"inputTokens": 5, "outputTokens": 6, "cachedInputTokens": 0, "costUsd": 0.5}}
    ]});
    std::fs::write(engine_dir.join("chats.json"), legacy.to_string()).unwrap();
    let e = TestEngine::start_spec(spec, guard).await;
    assert!(!engine_dir.join("chats.json").exists());
    assert!(engine_dir.join("chats.json.migrated").exists());
    let c = wait_chat(&e, "c_old", |c| c["lastTurn"]["outcome"] == "completed").await;
    assert_eq!(c["title"], "Old chat");
    assert_eq!(
        c["usage"]["inputTokens"].as_u64().map(|n| n >= 5),
        Some(true)
    );
    let hist = e.get_json("/chats/c_old/history?limit=1000", 200).await;
    assert!(hist["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["kind"] == "user_message" && i["text"] == "left in the queue"));
    // A restart does not import again (the file is gone) and keeps the chat.
    let e = e.restart().await;
    assert_eq!(e.get_json("/chats/c_old", 200).await["title"], "Old chat");
    e.shutdown().await;
}

/// `kill -9` right after a 202: the acknowledged message is there after
/// the restart.
#[tokio::test]
async fn an_acknowledged_message_survives_kill9() {
    let e = engine().await;
    let (chat, mut events) = new_chat(&e, "claude").await;
    send(&e, &chat, "FAKE_HANG").await;
    // A delta means the process was spawned and its group recorded, so the
    // next write (the 202's) carries it and the restart ends that turn
    // instead of requeueing it: a turn whose group was not yet recorded
    // when the engine died is run again by design, and this one hangs.
    events.wait_type("chat.turn.delta").await;
    let acc = send(&e, &chat, "must survive").await;
    assert_eq!(acc["status"], "queued");
    let e = e.crash_and_restart().await;
    let mut events = chat_events(&e, &chat).await;
    let (_, _, p) = wait_turn(&mut events, acc["messageId"].as_str().unwrap()).await;
    assert_eq!(p["outcome"], "completed");
    e.shutdown().await;
}

/// A database that is not one: the engine refuses to start, with one line
/// naming the file and exit code 2, and leaves the file as it was.
#[tokio::test]
async fn a_corrupt_database_stops_the_engine_with_exit_code_2() {
    let (spec, _guard) = spec();
    let db = spec.home.join(".replicas/engine/chats.db");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    let garbage = vec![0x5a_u8; 16 * 1024];
    std::fs::write(&db, &garbage).unwrap();
    let out = spec
        .command(&[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("replicas-engine: ") && last.contains(&db.display().to_string()),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&db).unwrap(), garbage);
}

/// `GET /chats` pages newest first with an opaque cursor; chats created or
/// deleted between pages neither repeat nor hide the others; filters and
/// bad parameters.
#[tokio::test]
async fn chat_list_pages_with_a_cursor_and_filters() {
    let e = engine().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(create_chat(&e, if i % 3 == 0 { "codex" } else { "claude" }).await);
        // Distinct createdAt (millisecond precision) so the order is known.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    // Without limit: everything, newest first, and no next page.
    let all = e.get_json("/chats", 200).await;
    let listed: Vec<&str> = all["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(listed, newest_first);
    assert_eq!(all["nextCursor"], Value::Null);

    // Walk in pages of 3 while chats come and go.
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    let deleted = ids[1].clone();
    loop {
        let path = match &cursor {
            Some(c) => format!("/chats?limit=3&cursor={c}"),
            None => "/chats?limit=3".to_owned(),
        };
        let page = e.get_json(&path, 200).await;
        let chats = page["chats"].as_array().unwrap();
        assert!(chats.len() <= 3);
        seen.extend(chats.iter().map(|c| c["id"].as_str().unwrap().to_owned()));
        pages += 1;
        if pages == 1 {
            create_chat(&e, "claude").await;
            e.delete(&format!("/chats/{deleted}"))
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap();
        }
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(pages < 10, "cursor never ended");
    }
    let expected: Vec<String> = ids
        .iter()
        .rev()
        .filter(|id| **id != deleted)
        .cloned()
        .collect();
    assert_eq!(seen, expected, "each surviving chat exactly once, in order");

    // Filters.
    let codex = e.get_json("/chats?provider=codex", 200).await;
    assert!(codex["chats"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["provider"] == "codex"));
    assert_eq!(codex["chats"].as_array().unwrap().len(), 3);
    let idle = e.get_json("/chats?status=idle&limit=1000", 200).await;
    assert_eq!(idle["chats"].as_array().unwrap().len(), 7);
    assert_eq!(idle["nextCursor"], Value::Null);
    let running = e.get_json("/chats?status=running", 200).await;
    assert_eq!(running["chats"], json!([]));

    // Bad input: 400 in the error shape.
    for bad in [
        "limit=0",
        "limit=1001",
        "limit=abc",
        "limit=-1",
        "cursor=nope",
        "cursor=",
        "status=sleeping",
        "provider=gpt",
    ] {
        let v = e.get_json(&format!("/chats?{bad}"), 400).await;
        assert_eq!(v["error"]["code"], "invalid_request", "{bad}: {v}");
    }
    e.shutdown().await;
}
