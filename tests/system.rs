//! System routes, auth, error shapes and boot validation, through the real
//! binary on an ephemeral port.

mod common;

use common::{EngineSpec, TestEngine, SECRET};
use serde_json::Value;

#[tokio::test]
async fn health_is_public_and_follows_the_readiness_file() {
    let (spec, guard) = EngineSpec::new();
    std::fs::remove_file(spec.home.join("ready")).unwrap();
    let e = TestEngine::start_spec(spec, guard).await;
    let plain = reqwest::Client::new();
    let res = plain.get(e.url("/health")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("x-request-id"));
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "initializing");

    // Seen within the recheck interval (250 ms) of appearing.
    std::fs::write(e.home().join("ready"), "done").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let res = loop {
        let res = plain.get(e.url("/health")).send().await.unwrap();
        if res.status() == 200 || std::time::Instant::now() > deadline {
            break res;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));

    // Readiness flips once: remembered even if the file goes away.
    std::fs::remove_file(e.home().join("ready")).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        plain.get(e.url("/health")).send().await.unwrap().status(),
        200
    );
    e.shutdown().await;
}

/// Every protected route, with a method that reaches it and the status it
/// answers with the right secret (a request without a body, for chats and
/// plans that do not exist: auth is checked before anything else).
const PROTECTED: &[(&str, &str, u16)] = &[
    ("GET", "/status", 200),
    ("GET", "/events", 200),
    ("GET", "/chats", 200),
    ("POST", "/chats", 400),
    ("GET", "/chats/c_nope", 404),
    ("DELETE", "/chats/c_nope", 404),
    ("POST", "/chats/c_nope/messages", 400),
    ("POST", "/chats/c_nope/interrupt", 404),
    ("GET", "/chats/c_nope/history", 404),
    ("GET", "/repos", 200),
    ("GET", "/hooks/status", 200),
    ("GET", "/plans", 200),
    ("GET", "/plans/nope.md", 404),
    ("GET", "/token-refresh/health", 200),
];

#[tokio::test]
async fn every_protected_route_needs_the_secret() {
    let e = TestEngine::start().await;
    let plain = reqwest::Client::new();
    for &(method, path, with_secret) in PROTECTED {
        let m: reqwest::Method = method.parse().unwrap();
        for secret in [
            None,
            Some("wrong"),
            Some(""),
            Some(&SECRET[..SECRET.len() - 1]),
        ] {
            let mut req = plain.request(m.clone(), e.url(path));
            if let Some(s) = secret {
                req = req.header("X-Replicas-Engine-Secret", s);
            }
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), 401, "{method} {path} with {secret:?}");
            assert!(res.headers().contains_key("x-request-id"));
            let text = res.text().await.unwrap();
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"]["code"], "unauthorized");
            if let Some(s) = secret.filter(|s| !s.is_empty()) {
                assert!(!text.contains(s), "401 echoes the secret");
            }
        }
        let res = e.client.request(m, e.url(path)).send().await.unwrap();
        assert_eq!(
            res.status().as_u16(),
            with_secret,
            "{method} {path} with the secret"
        );
    }
    assert!(!e.logs().contains(SECRET), "the secret reached the log");
    e.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_are_404_json_and_request_ids_are_kept() {
    let e = TestEngine::start().await;
    let res = e.get("/no/such/route").send().await.unwrap();
    assert_eq!(res.status(), 404);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found");

    let res = e
        .get("/status")
        .header("X-Request-Id", "req-123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "req-123");
    let a = e.get("/status").send().await.unwrap().headers()["x-request-id"].clone();
    let b = e.get("/status").send().await.unwrap().headers()["x-request-id"].clone();
    assert_ne!(a, b);
    e.shutdown().await;
}

#[tokio::test]
async fn status_reports_the_backbone_fields() {
    let e = TestEngine::start().await;
    let v = e.get_json("/status", 200).await;
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["workspaceId"], "ws_test");
    assert_eq!(
        v["workspaceRoot"],
        e.home().join("workspaces").display().to_string()
    );
    assert!(v["startedAt"].as_str().unwrap().ends_with('Z'));
    assert!(v["uptimeMs"].as_u64().is_some());
    assert_eq!(v["events"]["lastEventId"], "1");
    assert_eq!(v["events"]["subscribers"], 0);
    e.shutdown().await;
}

#[tokio::test]
async fn request_bodies_over_the_cap_are_413() {
    let (spec, guard) = EngineSpec::new();
    let e = TestEngine::start_spec(spec.with("REPLICAS_MAX_BODY_BYTES", "1024"), guard).await;
    // Any route: the cap applies before routing decides what to do with it.
    let res = e
        .post("/status")
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert!(
        res.status() == 405 || res.status() == 413,
        "{}",
        res.status()
    );
    let v: Value = res.json().await.unwrap();
    assert!(v["error"]["code"].is_string());
    e.shutdown().await;
}

/// Run the binary with `env` and return (exit code, stderr).
async fn boot(env: &[(&str, &str)], remove: &[&str]) -> (Option<i32>, String) {
    let (mut spec, _guard) = EngineSpec::new();
    for k in remove {
        spec = spec.without(k);
    }
    for (k, v) in env {
        spec = spec.with(k, *v);
    }
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        spec.command(&[])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .output(),
    )
    .await
    .expect("engine exits at once on bad config")
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn invalid_configuration_stops_the_engine_with_one_clear_line() {
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let cases: &[Case] = &[
        (&[], &["REPLICAS_ENGINE_SECRET"], "REPLICAS_ENGINE_SECRET"),
        (&[("PORT", "eighty")], &[], "PORT"),
        (
            &[("REPLICAS_ENGINE_PORT", "99999")],
            &["PORT"],
            "REPLICAS_ENGINE_PORT",
        ),
        (&[("MONOLITH_URL", "not a url")], &[], "MONOLITH_URL"),
        (
            &[("MONOLITH_URL", "http://127.0.0.1:9")],
            &["WORKSPACE_ID"],
            "WORKSPACE_ID",
        ),
        (&[("HOST", "localhost:80")], &[], "HOST"),
        (
            &[("REPLICAS_MAX_BODY_BYTES", "lots")],
            &[],
            "REPLICAS_MAX_BODY_BYTES",
        ),
    ];
    for (env, remove, var) in cases {
        let (code, stderr) = boot(env, remove).await;
        assert_eq!(code, Some(2), "{var}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{var}: {stderr}");
        assert!(
            lines[0].contains(&format!("invalid configuration: {var}:")),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn help_explains_every_variable() {
    let (spec, _guard) = EngineSpec::new();
    let out = spec.command(&["--help"]).output().await.unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "REPLICAS_ENGINE_SECRET",
        "PORT",
        "REPLICAS_ENGINE_PORT",
        "HOST",
        "WORKSPACE_ID",
        "MONOLITH_URL",
        "WORKSPACE_HOME",
        "REPLICAS_WORKSPACES_DIR",
        "REPLICAS_READY_FILE",
        "REPLICAS_DEFAULT_BRANCH",
        "CLAUDE_BIN",
        "CODEX_BIN",
        "GH_BIN",
        "GIT_BIN",
        "RUST_LOG",
        "serve",
        "warm",
    ] {
        assert!(help.contains(var), "--help does not mention {var}:\n{help}");
    }
}

#[tokio::test]
async fn busy_port_is_a_clear_failure() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, stderr) = boot(&[("PORT", &port)], &[]).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cannot listen on 127.0.0.1:"), "{stderr}");
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let Ok(which) = std::process::Command::new("sh")
        .arg("-c")
        .arg("command -v systemd-analyze")
        .output()
    else {
        return;
    };
    if !which.status.success() {
        eprintln!("skipped: systemd-analyze is not installed (Debian package `systemd`)");
        return;
    }
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/replicas-engine.service"
    ))
    .unwrap();
    assert!(unit.contains("Restart=on-failure"));
    assert!(unit.contains("EnvironmentFile="));
    assert!(unit.contains("User="));
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replicas-engine.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/replicas-engine",
            env!("CARGO_BIN_EXE_replicas-engine"),
        ),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn summary_changes_publish_engine_status_changed() {
    let e = TestEngine::start().await;
    let mut events = e.events("types=engine.status.changed").await;
    let chat = e
        .post_json("/chats", serde_json::json!({"provider": "codex"}), 201)
        .await;
    let (ev, _) = events
        .wait_for(std::time::Duration::from_secs(10), |ev| {
            ev.json()["payload"]["status"]["chats"]["total"] == 1
        })
        .await;
    let status = &ev.json()["payload"]["status"];
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["tokenRefresh"].is_object());
    // Internal consumers (this watcher) are not counted as subscribers.
    assert_eq!(e.get_json("/status", 200).await["events"]["subscribers"], 1);
    let id = chat["id"].as_str().unwrap();
    let res = e.delete(&format!("/chats/{id}")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    events
        .wait_for(std::time::Duration::from_secs(10), |ev| {
            ev.json()["payload"]["status"]["chats"]["total"] == 0
        })
        .await;
    e.shutdown().await;
}

#[tokio::test]
async fn request_log_names_the_route_and_never_the_secret() {
    let (spec, guard) = EngineSpec::new();
    let e = TestEngine::start_spec(
        spec.with("RUST_LOG", "info,replicas_engine::http=debug"),
        guard,
    )
    .await;
    let res = e
        .get("/status")
        .header("X-Request-Id", "rid-42")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = reqwest::Client::new()
        .get(e.url("/status"))
        .header("X-Replicas-Engine-Secret", "wrong-secret-value")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let logs = e.shutdown_logs().await;
    let line = logs
        .lines()
        .find(|l| l.contains("rid-42") && l.contains("finished processing"))
        .unwrap_or_else(|| panic!("no request log line:\n{logs}"));
    assert!(line.contains("route=\"/status\""), "{line}");
    assert!(line.contains("status=200"), "{line}");
    assert!(
        !logs.contains(SECRET) && !logs.contains("wrong-secret-value"),
        "{logs}"
    );
}
