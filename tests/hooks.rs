//! Start hooks, `GET /hooks/status` and `replicas-engine warm`, through the
//! real binary with real repos and real shell commands.

use std::path::Path;
use std::time::Duration;

use crate::common::{
    alive, eventually, find, git_repo, sh, wait_pid, EngineSpec, SseEvent, TestEngine,
};
use serde_json::{json, Value};

/// A committed repo `name` under the workspace root with config `file`.
fn repo_with(ws: &Path, name: &str, file: &str, text: &str) {
    git_repo(ws, name, &[(file, text)]);
}

/// An engine over committed repos: (name, config file, its text).
async fn engine_with(repos: &[(&str, &str, &str)]) -> TestEngine {
    let (spec, _) = EngineSpec::new();
    for (name, file, text) in repos {
        repo_with(&spec.workspaces(), name, file, text);
    }
    TestEngine::start_with(spec).await
}

/// Poll `/hooks/status` until the start hooks finished (deadline 30 s).
async fn finished(e: &TestEngine) -> Value {
    eventually("the hooks to finish", Duration::from_secs(30), async || {
        let s = e.get_json("/hooks/status", 200).await;
        match s["status"] == "completed" || s["status"] == "failed" {
            true => Ok(s),
            false => Err(s.to_string()),
        }
    })
    .await
}

fn repo_status<'a>(s: &'a Value, name: &str) -> &'a Value {
    find(&s["repos"], "repo", name)
}

fn statuses(r: &Value) -> Vec<String> {
    r["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["status"].as_str().unwrap().to_owned())
        .collect()
}

/// Wait until `pid` is gone (a KILLed process needs to be scheduled once
/// to die).
async fn wait_gone(pid: i32, what: &str) {
    eventually(what, Duration::from_secs(5), async || !alive(pid)).await
}

#[tokio::test]
async fn start_hooks_run_in_order_log_and_continue_after_a_failure() {
    let e = engine_with(&[
        ("a", "replicas.yaml", "startHook:\n  commands:\n    - echo one > one.txt\n    - echo boom >&2; exit 3\n    - echo three > three.txt\n"),
        ("b", "replicas.json", r#"{"startHook":{"commands":["pwd > where.txt"]},"unknown":true}"#),
        ("c", "replicas.json", r#"{"systemPrompt":"no hooks here"}"#),
    ])
    .await;
    let ws = e.spec.workspaces();

    let s = finished(&e).await;
    assert_eq!(s["status"], "failed");
    assert!(s["startedAt"].is_string() && s["finishedAt"].is_string());
    assert_eq!(
        s["repos"].as_array().unwrap().len(),
        2,
        "c has no start hook: {s}"
    );
    let a = repo_status(&s, "a");
    assert_eq!(
        (a["status"].as_str(), a["configFile"].as_str()),
        (Some("failed"), Some("replicas.yaml"))
    );
    assert_eq!(
        statuses(a),
        ["succeeded", "failed", "succeeded"],
        "a failure does not stop the rest"
    );
    assert_eq!(a["commands"][1]["exitCode"], 3);
    assert!(a["commands"][1]["durationMs"].is_u64());
    assert_eq!(
        std::fs::read_to_string(ws.join("a/three.txt")).unwrap(),
        "three\n"
    );
    let b = repo_status(&s, "b");
    assert_eq!(b["status"], "completed");
    let where_ = std::fs::read_to_string(ws.join("b/where.txt")).unwrap();
    assert_eq!(
        Path::new(where_.trim()).canonicalize().unwrap(),
        ws.join("b").canonicalize().unwrap()
    );

    let log = std::fs::read_to_string(e.home().join(".replicas/startHooks.log")).unwrap();
    assert!(
        log.contains("repo=a command=\"echo boom >&2; exit 3\""),
        "{log}"
    );
    assert!(
        log.contains("boom\n") && log.contains("status=failed exit=3 duration="),
        "{log}"
    );
    assert!(
        log.find("repo=a").unwrap() < log.find("repo=b").unwrap(),
        "name order"
    );
    assert_eq!(
        s["logPath"],
        e.home()
            .join(".replicas/startHooks.log")
            .display()
            .to_string()
    );

    let mut events = e.events("since=0&types=hooks.*").await;
    let (last, before) = events
        .wait_for(Duration::from_secs(10), |ev: &SseEvent| {
            ev.event.as_deref() == Some("hooks.failed")
        })
        .await;
    assert_eq!(last.json()["payload"]["status"]["status"], "failed");
    assert_eq!(before[0].event.as_deref(), Some("hooks.started"));
    let progress: Vec<Value> = before[1..]
        .iter()
        .map(|ev| ev.json()["payload"].clone())
        .collect();
    assert_eq!(
        progress.len(),
        8,
        "running + finished for each of 4 commands"
    );
    assert_eq!(
        progress[3],
        json!({"repo":"a","index":1,"command":"echo boom >&2; exit 3","status":"failed","exitCode":3,"timedOut":false,
               "durationMs":progress[3]["durationMs"]})
    );
    assert_eq!(
        e.get_json("/status", 200).await["hooks"]["status"],
        "failed"
    );
    e.shutdown().await;
}

#[tokio::test]
async fn a_timed_out_command_loses_its_backgrounded_grandchild_and_later_ones_run() {
    let cfg = json!({"startHook": {"commands": ["sleep 60 & echo $! > gc.pid; wait", "echo after > after.txt"], "timeout": 500}});
    let e = engine_with(&[("a", "replicas.json", &cfg.to_string())]).await;
    let ws = e.spec.workspaces();

    let s = finished(&e).await;
    let a = repo_status(&s, "a");
    assert_eq!(statuses(a), ["timed_out", "succeeded"]);
    assert_eq!(a["commands"][0]["exitCode"], Value::Null);
    assert_eq!(s["status"], "failed");
    let pid: i32 = std::fs::read_to_string(ws.join("a/gc.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_gone(pid, "the backgrounded sleep killed with its group").await;
    assert!(ws.join("a/after.txt").exists());
    e.shutdown().await;
}

#[tokio::test]
async fn separate_false_runs_one_shell_so_export_and_cd_persist() {
    let e = engine_with(&[(
        "a",
        "replicas.yml",
        "startHook:\n  separate: false\n  commands:\n    - export GREETING=hello\n    - mkdir -p sub && cd sub\n    - echo \"$GREETING\" > greeting.txt\n",
    )])
    .await;
    let s = finished(&e).await;
    assert_eq!(s["status"], "completed");
    let a = repo_status(&s, "a");
    assert_eq!(statuses(a), ["succeeded"], "one script, one entry");
    assert_eq!(
        a["commands"][0]["command"],
        "export GREETING=hello\nmkdir -p sub && cd sub\necho \"$GREETING\" > greeting.txt"
    );
    let text = std::fs::read_to_string(e.spec.workspaces().join("a/sub/greeting.txt")).unwrap();
    assert_eq!(text, "hello\n");
    e.shutdown().await;
}

#[tokio::test]
async fn invalid_configs_fail_their_repo_only() {
    let e = engine_with(&[
        (
            "bad-json",
            "replicas.json",
            r#"{"startHook": {"commands": [}"#,
        ),
        (
            "bad-type",
            "replicas.yml",
            "startHook:\n  commands: npm ci\n",
        ),
        ("bad-yaml", "replicas.yaml", "startHook: [unclosed\n"),
        (
            "good",
            "replicas.json",
            r#"{"startHook":{"commands":["true"]}}"#,
        ),
    ])
    .await;

    let s = finished(&e).await;
    assert_eq!(s["status"], "failed");
    for (name, file) in [
        ("bad-json", "replicas.json"),
        ("bad-type", "replicas.yml"),
        ("bad-yaml", "replicas.yaml"),
    ] {
        let r = repo_status(&s, name);
        assert_eq!(
            (r["status"].as_str(), r["configFile"].as_str()),
            (Some("failed"), Some(file)),
            "{r}"
        );
        assert!(r["error"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
    }
    assert!(repo_status(&s, "bad-type")["error"]
        .as_str()
        .unwrap()
        .contains("commands"));
    assert_eq!(repo_status(&s, "good")["status"], "completed");
    // The engine keeps serving everything else.
    assert_eq!(
        e.get_json("/repos", 200).await["repos"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    e.shutdown().await;
}

#[tokio::test]
async fn completed_hooks_are_not_rerun_after_a_restart() {
    let e = engine_with(&[(
        "a",
        "replicas.json",
        r#"{"startHook":{"commands":["echo run >> runs.txt"]}}"#,
    )])
    .await;
    let first = finished(&e).await;
    assert_eq!(first["status"], "completed");
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(e.home().join(".replicas/engine-state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["startHooks"]["status"]["status"], "completed");

    let e = e.restart().await;
    // Read at build time from the record: completed at once, not pending.
    assert_eq!(e.get_json("/hooks/status", 200).await, first);
    let e = e.crash_and_restart().await;
    assert_eq!(e.get_json("/hooks/status", 200).await, first);
    assert_eq!(
        std::fs::read_to_string(e.spec.workspaces().join("a/runs.txt")).unwrap(),
        "run\n"
    );
    e.shutdown().await;
}

#[tokio::test]
async fn engine_shutdown_kills_a_running_hook_and_does_not_record_it() {
    let cfg =
        json!({"startHook": {"commands": ["sleep 60 & echo $! > gc.pid; wait"], "timeout": 60000}});
    let e = engine_with(&[("a", "replicas.json", &cfg.to_string())]).await;
    let pid_file = e.spec.workspaces().join("a/gc.pid");
    let pid = wait_pid(&pid_file).await;
    assert_eq!(e.get_json("/hooks/status", 200).await["status"], "running");
    let spec = e.shutdown().await;
    wait_gone(pid, "shutdown to end the hook's process group").await;
    assert!(
        !spec.home.join(".replicas/engine-state.json").exists(),
        "an interrupted run is not recorded"
    );
}

/// A `kill -9` of the engine takes the processes it started along at once,
/// before any restart: the parent-death signal, set by the spawn shim
/// before it execs the program (the program runs, not the shim). A
/// sleeper, unlike an agent CLI, does not notice its pipes closing.
#[tokio::test]
async fn a_hook_dies_with_a_killed_engine() {
    let cfg = json!({"startHook": {"commands": ["echo $$ > leader.pid; exec sleep 60"], "timeout": 60000}});
    let e = engine_with(&[("a", "replicas.json", &cfg.to_string())]).await;
    let pid_file = e.spec.workspaces().join("a/leader.pid");
    let pid = wait_pid(&pid_file).await;
    let cmdline = eventually(
        "the hook to exec sleep",
        Duration::from_secs(5),
        async || {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            cmdline.starts_with("sleep").then_some(cmdline)
        },
    )
    .await;
    assert!(
        !cmdline.contains(replicas_engine::process::SPAWN_SHIM_ARG),
        "{cmdline}"
    );
    let _spec = e.kill9().await;
    wait_gone(pid, "the hook to die with the engine").await;
}

#[tokio::test]
async fn warm_runs_warm_hooks_without_a_secret_and_exit_code_tells_failures() {
    let (spec, _guard) = EngineSpec::new();
    let ws = spec.workspaces();
    repo_with(
        &ws,
        "a",
        "replicas.yaml",
        "warmHook:\n  commands: ['echo warmed > warm.txt']\nstartHook:\n  commands: ['touch started']\n",
    );
    let spec = spec.without("REPLICAS_ENGINE_SECRET");

    let out = spec.command(&["warm"]).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("warm a [1/1] \"echo warmed > warm.txt\": succeeded (exit 0,"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("a/warm.txt")).unwrap(),
        "warmed\n"
    );
    assert!(!ws.join("a/started").exists(), "warm runs warm hooks only");
    assert!(!stderr.contains("listening on"), "warm never serves");

    repo_with(
        &ws,
        "b",
        "replicas.json",
        r#"{"warmHook":{"commands":["exit 4","echo still > still.txt"]}}"#,
    );
    repo_with(
        &ws,
        "c",
        "replicas.json",
        r#"{"warmHook":{"commands":["sleep 30"],"timeout":300}}"#,
    );
    let out = spec.command(&["warm"]).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("\"exit 4\": failed (exit 4,"), "{stdout}");
    assert!(
        stdout.contains("\"sleep 30\": timed_out (exit none,"),
        "{stdout}"
    );
    assert!(
        ws.join("b/still.txt").exists(),
        "a failure does not stop later commands"
    );

    std::fs::remove_dir_all(ws.join("b")).unwrap();
    std::fs::remove_dir_all(ws.join("c")).unwrap();
    repo_with(&ws, "d", "replicas.yaml", "warmHook: [oops\n");
    let out = spec.command(&["warm"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(1), "an invalid config fails warm");
    assert!(String::from_utf8_lossy(&out.stdout).contains("warm d: invalid replicas.yaml"));
}

/// Repo config files are repo content: a `replicas.yaml` symlinked to a
/// credentials file outside the repo is not read (its token reaches neither
/// `/hooks/status` nor the event journal), a FIFO named `replicas.json`
/// does not hang the boot, an oversized file is refused; other repos' hooks
/// still run.
#[tokio::test]
async fn hostile_config_files_fail_their_repo_without_reading_or_hanging() {
    const TOKEN: &str = "ghp_TOPSECRET_0123456789";
    let (spec, guard) = EngineSpec::new();
    let ws = spec.workspaces();
    let creds = spec.home.join("credentials");
    std::fs::write(&creds, format!("{{\"token\": \"{TOKEN}\"}}\n")).unwrap();
    for name in ["link", "fifo", "big"] {
        repo_with(&ws, name, "README", "x\n");
    }
    std::os::unix::fs::symlink(&creds, ws.join("link/replicas.yaml")).unwrap();
    sh(&ws.join("fifo"), "mkfifo replicas.json");
    std::fs::write(
        ws.join("big/replicas.yml"),
        format!("systemPrompt: {}\n", "a".repeat(70_000)),
    )
    .unwrap();
    repo_with(
        &ws,
        "good",
        "replicas.json",
        r#"{"startHook":{"commands":["true"]}}"#,
    );
    let e = TestEngine::start_spec(spec, guard).await;
    assert_eq!(e.get("/health").send().await.unwrap().status(), 200);

    let s = finished(&e).await;
    for (name, file, why) in [
        ("link", "replicas.yaml", "outside the repository"),
        ("fifo", "replicas.json", "not a regular file"),
        ("big", "replicas.yml", "the limit is 65536 bytes"),
    ] {
        let r = repo_status(&s, name);
        assert_eq!(
            (r["status"].as_str(), r["configFile"].as_str()),
            (Some("failed"), Some(file)),
            "{r}"
        );
        assert!(r["error"].as_str().unwrap().contains(why), "{r}");
    }
    assert_eq!(repo_status(&s, "good")["status"], "completed");
    let journal = std::fs::read_to_string(e.home().join(".replicas/engine/events.jsonl")).unwrap();
    assert!(!journal.contains(TOKEN));
    assert!(!s.to_string().contains(TOKEN));
    let logs = e.shutdown_logs().await;
    assert!(!logs.contains(TOKEN));
}
