//! Features together, through the real server with the fake CLIs
//! (tests/fixtures/bin) and a mock backend: chats wait for start hooks (also
//! failing ones, and across a restart), a repo's `systemPrompt` reaches both
//! agents, a turn that edits a repo marks it dirty, an auth failure asks the
//! backend for fresh credentials, chat webhooks arrive in order, `/status`
//! sums everything up, and the body cap holds on a real route.

use std::path::{Path, PathBuf};

use crate::common::backend;
use crate::common::chat::{
    create_chat_with, is, last_argv, payload, send, spec, turn_events, WAIT,
};
use crate::common::{eventually, git_repo, SseStream, TestEngine};
use serde_json::{json, Value};

/// A committed repo `name` under the workspace root, with `replicas.yaml`
/// holding `config` (none when empty).
fn repo(ws: &Path, name: &str, config: &str) {
    let readme = format!("# {name}\n");
    let mut files = vec![("README.md", readme.as_str())];
    if !config.is_empty() {
        files.push(("replicas.yaml", config));
    }
    git_repo(ws, name, &files);
}

/// The value following `flag` in `argv`.
fn flag_value<'a>(argv: &'a [String], flag: &str) -> Option<&'a str> {
    let i = argv.iter().position(|a| a == flag)?;
    argv.get(i + 1).map(String::as_str)
}

// ---------------------------------------------------------------- hooks gate chats

/// An engine whose repo `api` has a start hook that waits for the file
/// `go`, then runs `then`; returns it, `go` and its events from the start,
/// read past `hooks.started`.
async fn gated_start_hook(then: &str) -> (TestEngine, PathBuf, SseStream) {
    let (spec, _) = spec();
    let go = spec.home.join("go");
    repo(
        &spec.workspaces(),
        "api",
        &format!(
            "startHook:\n  commands:\n    - 'while [ ! -f {} ]; do sleep 0.05; done{then}'\n",
            go.display()
        ),
    );
    let e = TestEngine::start_with(spec).await;
    let mut events = e.events("since=0").await;
    events.wait_type("hooks.started").await;
    (e, go, events)
}

/// A start hook that blocks until a file appears: a message posted meanwhile
/// is queued and the chat shows `waiting_for_hooks`; once the file exists the
/// hooks complete and only then does the turn start.
#[tokio::test]
async fn chats_wait_for_start_hooks_then_run() {
    let (e, go, mut events) = gated_start_hook("").await;

    let chat = create_chat_with(&e, json!({"provider": "claude", "cwd": "api"})).await;
    let accepted = send(&e, &chat, "hello while hooks run").await;
    assert_eq!(accepted["status"], "queued", "{accepted}");
    assert_eq!(accepted["position"], 1);
    let c = e.get_json(&format!("/chats/{chat}"), 200).await;
    assert_eq!(c["status"], "waiting_for_hooks", "{c}");
    assert_eq!(c["queue"].as_array().unwrap().len(), 1);
    let status = e.get_json("/status", 200).await;
    assert_eq!(status["hooks"]["status"], "running");
    assert_eq!(status["chats"]["queuedMessages"], 1);

    std::fs::write(&go, "").unwrap();
    let (done, seen) = events
        .wait_for(WAIT, |ev| {
            is(ev, "hooks.completed") || is(ev, "hooks.failed") || is(ev, "chat.turn.started")
        })
        .await;
    assert!(
        is(&done, "hooks.completed"),
        "the turn started before the hooks completed: {:?} after {:?}",
        done.event,
        seen.iter().map(|e| &e.event).collect::<Vec<_>>()
    );
    let (started, end) =
        turn_events(&mut events, accepted["messageId"].as_str().unwrap(), WAIT).await;
    assert!(started.id_num() > done.id_num());
    assert_eq!(payload(&end)["outcome"], "completed", "{}", end.data);
    let c = e.get_json(&format!("/chats/{chat}"), 200).await;
    assert_eq!(c["status"], "idle");
    assert_eq!(c["queue"], json!([]));
    e.shutdown().await;
}

/// A failing start hook still releases the chats.
#[tokio::test]
async fn a_failing_start_hook_still_releases_chats() {
    let (e, go, mut events) = gated_start_hook("; exit 7").await;
    let chat = create_chat_with(&e, json!({"provider": "codex", "cwd": "api"})).await;
    let accepted = send(&e, &chat, "hello").await;
    assert_eq!(accepted["status"], "queued");

    std::fs::write(&go, "").unwrap();
    let failed = events.wait_type("hooks.failed").await;
    assert_eq!(payload(&failed)["status"]["status"], "failed");
    let (started, end) =
        turn_events(&mut events, accepted["messageId"].as_str().unwrap(), WAIT).await;
    assert!(started.id_num() > failed.id_num());
    assert_eq!(payload(&end)["outcome"], "completed", "{}", end.data);
    // Hooks are done: the next message is sent at once.
    let next = send(&e, &chat, "again").await;
    assert_eq!(next["status"], "sent", "{next}");
    turn_events(&mut events, next["messageId"].as_str().unwrap(), WAIT).await;
    e.shutdown().await;
}

/// A message queued behind running start hooks survives a restart: the
/// interrupted hooks run again (they never finished) and the message runs
/// after them.
#[tokio::test]
async fn a_message_waiting_for_hooks_survives_a_restart() {
    let (e, go, events) = gated_start_hook("").await;
    let chat = create_chat_with(&e, json!({"provider": "codex", "cwd": "api"})).await;
    let accepted = send(&e, &chat, "after the hooks").await;
    assert_eq!(accepted["status"], "queued");
    drop(events);

    let e = e.restart().await;
    let c = e.get_json(&format!("/chats/{chat}"), 200).await;
    assert_eq!(c["status"], "waiting_for_hooks", "{c}");
    assert_eq!(c["queue"][0]["id"], accepted["messageId"]);
    let mut events = e.events("since=0").await;
    std::fs::write(&go, "").unwrap();
    let done = events.wait_type("hooks.completed").await;
    let (started, end) =
        turn_events(&mut events, accepted["messageId"].as_str().unwrap(), WAIT).await;
    assert!(started.id_num() > done.id_num());
    assert_eq!(payload(&end)["outcome"], "completed", "{}", end.data);
    e.shutdown().await;
}

// ---------------------------------------------------------------- systemPrompt

/// A repo's `systemPrompt` reaches claude (`--append-system-prompt`) and
/// codex (`-c developer_instructions=…`); a chat at the workspace root gets
/// every repo's prompt, labelled by repo name.
#[tokio::test]
async fn the_repo_system_prompt_reaches_both_agents() {
    let (spec, guard) = spec();
    let ws = spec.workspaces();
    repo(
        &ws,
        "api",
        "systemPrompt: API_PROMPT use the api conventions\n",
    );
    repo(&ws, "web", "systemPrompt: WEB_PROMPT run the linter\n");
    repo(&ws, "plain", "");
    let e = TestEngine::start_spec(spec, guard).await;
    let home = e.home().to_path_buf();
    let mut events = e.events("since=0").await;

    let run = async |events: &mut SseStream, body: Value| -> Vec<String> {
        let chat = create_chat_with(&e, body).await;
        let m = send(&e, &chat, "hello").await;
        let (_, end) = turn_events(events, m["messageId"].as_str().unwrap(), WAIT).await;
        assert_eq!(payload(&end)["outcome"], "completed", "{}", end.data);
        last_argv(&home)
    };

    let argv = run(&mut events, json!({"provider": "claude", "cwd": "api"})).await;
    let prompt = flag_value(&argv, "--append-system-prompt").expect("claude gets the prompt");
    assert!(
        prompt.contains("API_PROMPT use the api conventions"),
        "{argv:?}"
    );
    assert!(!prompt.contains("WEB_PROMPT"), "{argv:?}");

    let argv = run(&mut events, json!({"provider": "codex", "cwd": "web"})).await;
    assert_eq!(argv[0], "exec", "{argv:?}");
    let dev = argv
        .iter()
        .find(|a| a.starts_with("developer_instructions="))
        .unwrap_or_else(|| panic!("codex gets developer_instructions: {argv:?}"));
    assert!(dev.contains("WEB_PROMPT run the linter"), "{dev}");
    let i = argv.iter().position(|a| a == dev).unwrap();
    assert_eq!(argv[i - 1], "-c");

    // A repo without a prompt: nothing is added.
    let argv = run(&mut events, json!({"provider": "claude", "cwd": "plain"})).await;
    assert_eq!(
        flag_value(&argv, "--append-system-prompt"),
        None,
        "{argv:?}"
    );

    // The workspace root: every repo's prompt, labelled.
    let argv = run(&mut events, json!({"provider": "claude"})).await;
    let prompt = flag_value(&argv, "--append-system-prompt").expect("root chat gets prompts");
    let (api, web) = (
        prompt.find("API_PROMPT").expect("api prompt"),
        prompt.find("WEB_PROMPT").expect("web prompt"),
    );
    assert!(
        prompt.contains("`api`") && prompt.contains("`web`"),
        "{prompt}"
    );
    assert!(!prompt.contains("`plain`"), "{prompt}");
    assert!(prompt.find("`api`").unwrap() < api && api < prompt.find("`web`").unwrap());
    assert!(prompt.find("`web`").unwrap() < web);
    e.shutdown().await;
}

// ---------------------------------------------------------------- repo status after a turn

/// A codex turn that writes a file into its repo (`FAKE_PATCH`) is followed
/// by `repo.status.changed` with `isDirty: true`.
#[tokio::test]
async fn a_turn_that_edits_a_repo_marks_it_dirty() {
    let (spec, guard) = spec();
    repo(&spec.workspaces(), "api", "");
    let e = TestEngine::start_spec(spec, guard).await;
    let mut events = e.events("since=0").await;
    let (discovered, _) = events
        .wait_for(WAIT, |ev| {
            is(ev, "repo.discovered") && payload(ev)["repo"]["name"] == "api"
        })
        .await;
    assert_eq!(payload(&discovered)["repo"]["isDirty"], false);

    let chat = create_chat_with(&e, json!({"provider": "codex", "cwd": "api"})).await;
    let m = send(&e, &chat, "make a change FAKE_PATCH").await;
    let (_, end) = turn_events(&mut events, m["messageId"].as_str().unwrap(), WAIT).await;
    assert_eq!(payload(&end)["outcome"], "completed", "{}", end.data);
    assert!(e.spec.workspaces().join("api/fake_patch.txt").exists());
    let (changed, _) = events
        .wait_for(WAIT, |ev| {
            is(ev, "repo.status.changed") && payload(ev)["repo"]["name"] == "api"
        })
        .await;
    assert!(changed.id_num() > end.id_num());
    let r = &payload(&changed)["repo"];
    assert_eq!(r["isDirty"], true, "{r}");
    let files = r["gitDiff"]["files"].as_array().unwrap();
    assert!(
        files
            .iter()
            .any(|f| f["path"] == "fake_patch.txt" && f["status"] == "untracked"),
        "{r}"
    );
    let repos = e.get_json("/repos", 200).await;
    assert_eq!(repos["repos"][0]["isDirty"], true, "{repos}");
    e.shutdown().await;
}

// ---------------------------------------------------------------- upstream

/// An auth failure in a turn: an `error` event `auth_expired`, a credential
/// refresh at the backend (beyond the one at start), and the `error` event
/// as a webhook.
#[tokio::test]
async fn an_auth_failure_refreshes_credentials_and_reports_upstream() {
    let (spec, mock) = spec().0.with_backend().await;
    let e = TestEngine::start_with(spec.with("REPLICAS_UPSTREAM_RETRY_BASE_MS", "20")).await;
    // The refresh every manager makes at start has landed.
    eventually("claude refresh at start", WAIT, async || {
        let h = e.get_json("/token-refresh/health", 200).await;
        let claude = &h["managers"]["claude"];
        claude["status"] == "ok" && claude["lastSuccessAt"].is_string()
    })
    .await;
    assert_eq!(mock.requests(backend::CLAUDE).len(), 1);

    // Engine-level errors have no chatId: read them on their own stream.
    let mut errors = e.events("since=0&types=error").await;
    let mut events = e.events("since=0").await;
    let chat = create_chat_with(&e, json!({"provider": "claude"})).await;
    let m = send(&e, &chat, "hello FAKE_AUTH").await;
    let (_, end) = turn_events(&mut events, m["messageId"].as_str().unwrap(), WAIT).await;
    let err = errors.wait_type("error").await;
    assert_eq!(payload(&err)["code"], "auth_expired", "{}", err.data);
    assert_eq!(payload(&err)["source"], "claude");
    assert_eq!(payload(&end)["outcome"], "failed", "{}", end.data);

    eventually("a second claude refresh", WAIT, async || {
        mock.requests(backend::CLAUDE).len() >= 2
    })
    .await;
    assert!(
        mock.requests(backend::CODEX).len() == 1,
        "only claude refreshed"
    );
    let err_id = err.id.clone().unwrap();
    let hook = eventually("the error webhook", WAIT, async || {
        mock.delivered()
            .into_iter()
            .find(|ev| ev["id"] == err_id.as_str())
    })
    .await;
    assert_eq!(hook["type"], "error");
    assert_eq!(hook["payload"]["code"], "auth_expired");
    let body = &mock.requests(backend::WEBHOOK)[0].body;
    assert_eq!(body["workspaceId"], "ws_test");

    // Codex too: its own credential is refreshed.
    let chat = create_chat_with(&e, json!({"provider": "codex"})).await;
    let m = send(&e, &chat, "hello FAKE_AUTH").await;
    let (_, end) = turn_events(&mut events, m["messageId"].as_str().unwrap(), WAIT).await;
    assert_eq!(payload(&end)["outcome"], "failed", "{}", end.data);
    let err = errors.wait_type("error").await;
    assert_eq!(payload(&err)["code"], "auth_expired", "{}", err.data);
    assert_eq!(payload(&err)["source"], "codex");
    eventually("a second codex refresh", WAIT, async || {
        mock.requests(backend::CODEX).len() >= 2
    })
    .await;
    e.shutdown().await;
}

/// A real chat's lifecycle reaches the backend as webhooks, in id order and
/// exactly the webhook-typed events of the journal.
#[tokio::test]
async fn chat_webhooks_reach_the_backend_in_order() {
    let (spec, mock) = spec().0.with_backend().await;
    let e = TestEngine::start_with(spec).await;
    let mut events = e.events("since=0").await;
    let chat = create_chat_with(&e, json!({"provider": "codex"})).await;
    let a = send(&e, &chat, "one").await;
    turn_events(&mut events, a["messageId"].as_str().unwrap(), WAIT).await;
    let b = send(&e, &chat, "two FAKE_TOOL").await;
    turn_events(&mut events, b["messageId"].as_str().unwrap(), WAIT).await;
    let res = e.delete(&format!("/chats/{chat}")).send().await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    // The chat's events as the journal has them.
    let mut journal_events = e.events(&format!("since=0&chatId={chat}")).await;
    let (deleted, seen) = journal_events
        .wait_for(WAIT, |ev| is(ev, "chat.deleted"))
        .await;
    let journal: Vec<(String, String)> = seen
        .iter()
        .chain(std::iter::once(&deleted))
        .map(|ev| (ev.id.clone().unwrap(), ev.event.clone().unwrap()))
        .filter(|(_, t)| {
            matches!(t.as_str(), "chat.created" | "chat.deleted") || t.starts_with("chat.turn.")
        })
        .collect();
    let delivered = eventually("chat.deleted webhook", WAIT, async || {
        let evs = mock.delivered();
        evs.iter()
            .any(|ev| ev["type"] == "chat.deleted")
            .then_some(evs)
    })
    .await;
    let got: Vec<(String, String)> = delivered
        .iter()
        .filter(|ev| ev["chatId"] == chat.as_str())
        .map(|ev| {
            (
                ev["id"].as_str().unwrap().to_owned(),
                ev["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, journal, "{delivered:#?}");
    let types: Vec<&str> = got.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(types.first(), Some(&"chat.created"));
    assert_eq!(types.last(), Some(&"chat.deleted"));
    for t in [
        "chat.turn.accepted",
        "chat.turn.started",
        "chat.turn.completed",
    ] {
        assert_eq!(
            types.iter().filter(|x| **x == t).count(),
            2,
            "{t}: {types:?}"
        );
    }
    let ids: Vec<u64> = delivered
        .iter()
        .map(|ev| ev["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(
        !types.contains(&"chat.updated"),
        "chat.updated is not a webhook"
    );
    e.shutdown().await;
}

// ---------------------------------------------------------------- /status

/// `/status` sums up every feature at once.
#[tokio::test]
async fn status_reflects_every_feature() {
    let (spec, mock) = spec().0.with_backend().await;
    let ws = spec.workspaces();
    repo(&ws, "api", "startHook:\n  commands: ['true']\n");
    repo(&ws, "web", "");
    let e = TestEngine::start_with(spec).await;
    eventually(
        "hooks done and every credential refreshed once",
        WAIT,
        async || {
            let h = e.get_json("/token-refresh/health", 200).await;
            let refreshed = ["github", "claude", "codex"]
                .iter()
                .all(|m| h["managers"][m]["lastSuccessAt"].is_string());
            let s = e.get_json("/status", 200).await;
            refreshed && s["hooks"]["status"] == "completed"
        },
    )
    .await;
    let status = e.get_json("/status", 200).await;
    assert_eq!(
        status["tokenRefresh"],
        json!({"github":"ok","claude":"ok","codex":"ok"})
    );
    assert_eq!(status["repos"]["count"], 2);
    assert_eq!(
        status["chats"],
        json!({"total":0,"running":0,"queuedMessages":0})
    );
    assert!(!mock.requests(backend::GITHUB).is_empty());

    let mut events = e.events("since=0").await;
    let slow = create_chat_with(&e, json!({"provider": "claude", "cwd": "api"})).await;
    create_chat_with(&e, json!({"provider": "codex"})).await;
    let m = send(&e, &slow, "take your time FAKE_SLOW").await;
    send(&e, &slow, "then this").await;
    events
        .wait_for(WAIT, |ev| {
            is(ev, "chat.turn.started") && payload(ev)["messageId"] == m["messageId"]
        })
        .await;
    let s = e.get_json("/status", 200).await;
    assert_eq!(
        s["chats"],
        json!({"total":2,"running":1,"queuedMessages":1}),
        "{s}"
    );
    assert_eq!(s["repos"]["count"], 2);
    assert_eq!(s["hooks"]["status"], "completed");
    assert_eq!(s["events"]["subscribers"], 1, "{s}");
    let last: u64 = s["events"]["lastEventId"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (latest, _) = events.wait_for(WAIT, |ev| ev.id_num() >= Some(last)).await;
    assert_eq!(latest.id_num(), Some(last));
    let res = e
        .post(&format!("/chats/{slow}/interrupt"))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    e.shutdown().await;
}

// ---------------------------------------------------------------- body cap

/// A message body over `REPLICAS_MAX_BODY_BYTES` is 413 with the error
/// shape, and the chat is untouched.
#[tokio::test]
async fn an_oversized_message_is_413_and_changes_nothing() {
    let (spec, guard) = spec();
    let e = TestEngine::start_spec(spec.with("REPLICAS_MAX_BODY_BYTES", "2048"), guard).await;
    let chat = create_chat_with(&e, json!({"provider": "claude"})).await;
    let before = e.get_json(&format!("/chats/{chat}"), 200).await;
    let res = e
        .post(&format!("/chats/{chat}/messages"))
        .json(&json!({"message": "x".repeat(4096)}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "payload_too_large", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    let after = e.get_json(&format!("/chats/{chat}"), 200).await;
    assert_eq!(before, after);
    let history = e.get_json(&format!("/chats/{chat}/history"), 200).await;
    assert_eq!(history["items"], json!([]), "{history}");
    // A message under the cap still works.
    let ok = send(&e, &chat, "small").await;
    assert_eq!(ok["status"], "sent");
    e.shutdown().await;
}

// ---------------------------------------------------------------- child environment

/// Neither an agent nor a start hook sees the engine's secret, its backend
/// URL or any other `REPLICAS_*` setting; they do get the ambient variables
/// (PATH, HOME) and the agent CLIs' own (`ANTHROPIC_*`).
#[tokio::test]
async fn children_never_see_the_secret_or_engine_settings() {
    let (spec, mock) = spec().0.with_backend().await;
    let hook_env = spec.home.join("hook-env.txt");
    let agent_env = spec.home.join("agent-env.txt");
    repo(
        &spec.workspaces(),
        "api",
        &format!(
            "startHook:\n  commands:\n    - 'env > {}'\n",
            hook_env.display()
        ),
    );
    let spec = spec
        .with("REPLICAS_SSE_KEEPALIVE_SECS", "15")
        .with("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")
        .with("SOME_UNLISTED_VAR", "nope")
        .with("FAKE_ENV_FILE", agent_env.display().to_string());
    let e = TestEngine::start_with(spec).await;
    let chat = create_chat_with(&e, json!({"provider": "claude", "cwd": "api"})).await;
    let mut events = e.events("since=0").await;
    let accepted = send(&e, &chat, "hello").await;
    let message_id = accepted["messageId"].as_str().unwrap().to_owned();
    turn_events(&mut events, &message_id, WAIT).await;
    for file in [&hook_env, &agent_env] {
        let env = eventually("a child wrote its environment", WAIT, async || {
            std::fs::read_to_string(file).ok().filter(|s| !s.is_empty())
        })
        .await;
        let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
        assert!(
            !env.contains(crate::common::SECRET),
            "{file:?} has the secret"
        );
        for bad in [
            "REPLICAS_ENGINE_SECRET",
            "MONOLITH_URL",
            "REPLICAS_SSE_KEEPALIVE_SECS",
            "SOME_UNLISTED_VAR",
            "WORKSPACE_ID",
        ] {
            assert!(!names.contains(&bad), "{file:?} has {bad}: {env}");
        }
        for good in ["PATH", "HOME", "ANTHROPIC_BASE_URL"] {
            assert!(names.contains(&good), "{file:?} lacks {good}: {env}");
        }
    }
    drop(mock);
    let spec = e.shutdown().await;
    // Every state file the run left is private to the engine's user.
    assert_private(&spec.home.join(".replicas"));
}

/// Everything under `dir`: files 0600, directories 0700.
fn assert_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{dir:?} is {mode:o}");
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            assert_private(&path);
        } else {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{path:?} is {mode:o}");
        }
    }
}
