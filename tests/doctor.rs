//! `replicas-engine doctor`, through the real binary: one line per check,
//! `--json`, exit 0 when every essential check passes and 1 otherwise, the
//! secret and credential contents never printed.

use std::path::Path;

use crate::common::{find, script, sh, EngineSpec, TestEngine, SECRET};
use serde_json::Value;

/// A tool that prints a version.
fn fake_tool(dir: &Path, name: &str) -> String {
    script(&dir.join(name), &format!("echo '{name} 9.9.9 (fake)'\n"))
}

async fn doctor(spec: &EngineSpec, args: &[&str]) -> (i32, String) {
    let mut all = vec!["doctor"];
    all.extend_from_slice(args);
    let out = spec.command(&all).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !stdout.contains(SECRET) && !String::from_utf8_lossy(&out.stderr).contains(SECRET),
        "the secret was printed"
    );
    (out.status.code().unwrap(), stdout)
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    find(&report["checks"], "name", name)
}

#[tokio::test]
async fn a_healthy_machine_passes_and_problems_get_hints() {
    let (spec, _guard) = EngineSpec::new();
    let bin = spec.home.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let spec = spec
        .with("CLAUDE_BIN", fake_tool(&bin, "claude"))
        .with("CODEX_BIN", fake_tool(&bin, "codex"))
        .with("GH_BIN", "/nonexistent/gh");
    // A repo with a valid config and one with a broken one.
    for (name, file, text) in [
        ("good", "replicas.yaml", "startHook:\n  commands: [true]\n"),
        ("bad", "replicas.json", "{\"startHook\": {\"commands\": 5}}"),
    ] {
        let dir = spec.workspaces().join(name);
        sh(&spec.workspaces(), &format!("git init -q {name}"));
        std::fs::write(dir.join(file), text).unwrap();
    }
    // Credentials: contents never printed.
    let claude = spec.home.join(".claude");
    std::fs::create_dir_all(&claude).unwrap();
    let expires = chrono::Utc::now().timestamp_millis() + 3_600_000;
    std::fs::write(
        claude.join(".credentials.json"),
        format!(r#"{{"claudeAiOauth":{{"accessToken":"sk-ant-oat-SECRETTOKEN","expiresAt":{expires}}}}}"#),
    )
    .unwrap();

    let (code, out) = doctor(&spec, &["--json"]).await;
    let report: Value = serde_json::from_str(&out).unwrap();
    assert!(!out.contains("SECRETTOKEN"));
    // The broken repo config is essential: exit 1.
    assert_eq!(code, 1, "{out}");
    assert_eq!(report["ok"], false);
    let bad = check(&report, "repo bad");
    assert_eq!(bad["status"], "fail");
    assert!(
        bad["detail"].as_str().unwrap().contains("replicas.json"),
        "{bad}"
    );
    assert!(bad["hint"].is_string());
    assert_eq!(check(&report, "repo good")["status"], "ok");
    for ok in [
        "configuration",
        "secret",
        "port",
        "workspace directory",
        "ready file",
        "git",
        "state files",
        "event journal",
    ] {
        assert_eq!(check(&report, ok)["status"], "ok", "{ok}: {report:#}");
    }
    let claude = check(&report, "claude");
    assert!(
        claude["detail"]
            .as_str()
            .unwrap()
            .contains("claude 9.9.9 (fake)"),
        "{claude}"
    );
    let gh = check(&report, "gh");
    assert_eq!(gh["status"], "warn");
    assert!(
        gh["detail"].as_str().unwrap().contains("/nonexistent/gh"),
        "{gh}"
    );
    let cred = check(&report, "claude credential");
    assert_eq!(cred["status"], "ok");
    assert!(
        cred["detail"].as_str().unwrap().contains("expires"),
        "{cred}"
    );
    assert_eq!(check(&report, "codex credential")["status"], "warn");

    // Fixed: exit 0; the human form has one line per check.
    std::fs::remove_file(spec.workspaces().join("bad/replicas.json")).unwrap();
    let (code, out) = doctor(&spec, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("[ok]") && l.contains("secret")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("[warn]") && l.contains("/nonexistent/gh")),
        "{out}"
    );
    assert!(out.contains("hint:"));
}

#[tokio::test]
async fn missing_secret_fails_and_a_running_engine_on_the_port_is_fine() {
    let e = TestEngine::start().await;
    let port = e.base.rsplit(':').next().unwrap().to_owned();
    let (spec, _guard) = EngineSpec::new();
    let spec = spec.with("PORT", port.clone());
    let (code, out) = doctor(&spec, &["--json"]).await;
    let report: Value = serde_json::from_str(&out).unwrap();
    let p = check(&report, "port");
    assert_eq!(p["status"], "ok", "{p}");
    assert!(p["detail"].as_str().unwrap().contains("engine"), "{p}");
    assert_eq!(code, 0, "{out}");

    let spec = spec.without("REPLICAS_ENGINE_SECRET");
    let (code, out) = doctor(&spec, &["--json"]).await;
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(code, 1);
    assert_eq!(check(&report, "secret")["status"], "fail");

    // An invalid configuration is the one failing check.
    let spec = spec.with("PORT", "abc");
    let (code, out) = doctor(&spec, &[]).await;
    assert_eq!(code, 1);
    assert!(out.contains("[FAIL]") && out.contains("PORT"), "{out}");
    e.shutdown().await;
}
