//! Plans through the real server: listing from both folders newest first,
//! content, and every way a name could try to leave the plan folders —
//! sent as raw request lines so no client library normalizes them away.

use std::time::{Duration, SystemTime};

use crate::common::{TestEngine, SECRET};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `path` exactly as written (no normalization); returns status and body.
async fn raw_get(e: &TestEngine, path: &str) -> (u16, Value) {
    let addr = e.base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Replicas-Engine-Secret: {SECRET}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    let status: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn write_plan(dir: &std::path::Path, name: &str, content: &str, age_secs: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    let f = std::fs::File::options().write(true).open(&p).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(age_secs))
        .unwrap();
}

#[tokio::test]
async fn lists_both_folders_newest_first_and_serves_content() {
    let e = TestEngine::start().await;
    let claude = e.home().join(".claude/plans");
    let replicas = e.home().join(".replicas/plans");

    // No folders yet: an empty list, not an error.
    assert_eq!(
        e.get_json("/plans", 200).await,
        serde_json::json!({"plans": []})
    );

    write_plan(&claude, "old.md", "# Old", 300);
    write_plan(&replicas, "newest.md", "# Newest plan\n\n- step", 10);
    write_plan(&claude, "middle.md", "# Middle", 100);
    write_plan(&replicas, "notes.txt", "not a plan", 1);
    std::fs::create_dir_all(claude.join("dir.md")).unwrap();

    let list = e.get_json("/plans", 200).await;
    let plans = list["plans"].as_array().unwrap();
    let names: Vec<_> = plans
        .iter()
        .map(|p| p["filename"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["newest.md", "middle.md", "old.md"]);
    assert_eq!(plans[0]["source"], "replicas");
    assert_eq!(plans[1]["source"], "claude");
    assert_eq!(plans[0]["sizeBytes"], "# Newest plan\n\n- step".len());
    assert!(plans[0]["modifiedAt"].as_str().unwrap().ends_with('Z'));

    let plan = e.get_json("/plans/newest.md", 200).await;
    assert_eq!(plan["filename"], "newest.md");
    assert_eq!(plan["source"], "replicas");
    assert_eq!(plan["content"], "# Newest plan\n\n- step");
    assert_eq!(plan["modifiedAt"], plans[0]["modifiedAt"]);

    // A name with a space, percent-encoded by the client.
    write_plan(&claude, "my plan.md", "spaced", 5);
    assert_eq!(
        raw_get(&e, "/plans/my%20plan.md").await.1["content"],
        "spaced"
    );

    // The secret is required.
    let res = reqwest::get(e.url("/plans")).await.unwrap();
    assert_eq!(res.status(), 401);
    e.shutdown().await;
}

#[tokio::test]
async fn path_tricks_are_rejected_and_escapes_are_not_found() {
    let e = TestEngine::start().await;
    let claude = e.home().join(".claude/plans");
    write_plan(&claude, "ok.md", "fine", 1);
    // Targets outside the plan folders that a trick would want to read.
    std::fs::write(e.home().join("secret.md"), "TOP SECRET").unwrap();
    std::fs::write(e.home().join(".replicas/secret.md"), "TOP SECRET").unwrap();
    std::os::unix::fs::symlink(e.home().join("secret.md"), claude.join("escape.md")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", claude.join("passwd.md")).unwrap();
    std::os::unix::fs::symlink(claude.join("missing.md"), claude.join("dangling.md")).unwrap();

    let bad_requests = [
        "/plans/%2e%2e%2fsecret.md",          // ../secret.md, encoded
        "/plans/%2E%2E%2F%2E%2E%2Fsecret.md", // ../../secret.md, upper-case encoding
        "/plans/..%2fsecret.md",              // ../secret.md, half encoded
        "/plans/%2Fetc%2Fpasswd.md",          // absolute path
        "/plans/%2F",                         // a bare separator
        "/plans/..%5csecret.md",              // backslash
        "/plans/ok%00.md",                    // NUL
        "/plans/ok.md%00.txt",                // NUL hiding the real extension
        "/plans/..",                          // dot-dot itself
        "/plans/...md",                       // contains ..
        "/plans/notes.txt",                   // not .md
        "/plans/ok.MD.txt",                   // not .md
        "/plans/%ff.md",                      // not UTF-8
    ];
    for path in bad_requests {
        let (status, body) = raw_get(&e, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{path}");
    }

    for path in [
        "/plans/escape.md",
        "/plans/passwd.md",
        "/plans/dangling.md",
        "/plans/nope.md",
    ] {
        let (status, body) = raw_get(&e, path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
        assert!(!body.to_string().contains("TOP SECRET") && !body.to_string().contains("root:"));
    }
    // More than one segment never reaches the handler.
    for path in ["/plans/../secret.md", "/plans/a/b.md"] {
        let (status, body) = raw_get(&e, path).await;
        assert_eq!(status, 404, "{path}: {body}");
    }

    // Escaping symlinks are not listed either.
    let list = e.get_json("/plans", 200).await;
    let names: Vec<_> = list["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["filename"].clone())
        .collect();
    assert_eq!(names, [serde_json::json!("ok.md")]);

    // A symlink between the two plan folders is inside: served.
    let replicas = e.home().join(".replicas/plans");
    write_plan(&replicas, "shared.md", "shared", 1);
    std::os::unix::fs::symlink(replicas.join("shared.md"), claude.join("link.md")).unwrap();
    assert_eq!(e.get_json("/plans/link.md", 200).await["content"], "shared");

    // Too large: 413, nothing partial.
    let big = "x".repeat(5 * 1024 * 1024 + 1);
    write_plan(&claude, "big.md", &big, 1);
    let (status, body) = raw_get(&e, "/plans/big.md").await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large");
    e.shutdown().await;
}

/// A plan folder that cannot be read (here: a file where the folder
/// should be) is an internal error: 500 in the error shape with the
/// generic message, the cause logged once.
#[tokio::test]
async fn an_unreadable_plan_folder_answers_500_and_logs_the_cause_once() {
    let e = TestEngine::start().await;
    let claude = e.home().join(".claude/plans");
    let _ = std::fs::remove_dir_all(&claude);
    std::fs::create_dir_all(claude.parent().unwrap()).unwrap();
    std::fs::write(&claude, "not a folder").unwrap();
    let (status, body) = raw_get(&e, "/plans").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"error":{"code":"internal","message":"internal error; see the engine log"}})
    );
    let logs = e.shutdown_logs().await;
    let lines: Vec<_> = logs
        .lines()
        .filter(|l| l.contains("reading plans"))
        .collect();
    assert_eq!(lines.len(), 1, "{logs}");
    assert!(lines[0].contains("internal error"), "{logs}");
}
