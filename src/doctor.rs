//! `replicas-engine doctor`: checks a machine can run the engine, for
//! operators and VM image builds. One line per check with a mark and, when
//! something is off, a hint to fix it; `--json` for machines. Exit 0 when
//! every essential check passes, 1 otherwise.
//!
//! It reads the same environment (and `.env`) and runs the same validation
//! as `serve`, but never starts the engine, never prints the secret or a
//! credential's contents, and only reads state files (the one write is a
//! probe file in the workspace directory, removed at once).

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::config::Config;
use crate::upstream::refresh::parse_expiry;

/// How long a tool's `--version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mark {
    Ok,
    /// Worth fixing, but the engine runs (a non-essential check failed).
    Warn,
    /// An essential check failed: the engine cannot work as is.
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Mark,
    pub essential: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// Every essential check passed.
    pub ok: bool,
    pub checks: Vec<Check>,
}

struct Checks(Vec<Check>);

impl Checks {
    fn push(&mut self, name: &str, essential: bool, result: Result<String, (String, String)>) {
        let (status, detail, hint) = match result {
            Ok(detail) => (Mark::Ok, detail, None),
            Err((detail, hint)) => (
                if essential { Mark::Fail } else { Mark::Warn },
                detail,
                Some(hint),
            ),
        };
        self.0.push(Check {
            name: name.to_owned(),
            status,
            essential,
            detail,
            hint,
        });
    }
}

fn problem(detail: impl Into<String>, hint: impl Into<String>) -> Result<String, (String, String)> {
    Err((detail.into(), hint.into()))
}

/// Entry point of the subcommand: run the checks, print, exit code.
pub fn main(json: bool, vars: &std::collections::HashMap<String, String>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("replicas-engine doctor: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(run(vars));
    let mut out = std::io::stdout().lock();
    if json {
        let _ = serde_json::to_writer_pretty(&mut out, &report);
        let _ = writeln!(out);
    } else {
        for c in &report.checks {
            let mark = match c.status {
                Mark::Ok => "[ok]  ",
                Mark::Warn => "[warn]",
                Mark::Fail => "[FAIL]",
            };
            let _ = writeln!(out, "{mark} {:<22} {}", c.name, c.detail);
            if let Some(h) = &c.hint {
                let _ = writeln!(out, "       {:<22} hint: {h}", "");
            }
        }
        let _ = writeln!(
            out,
            "{}",
            if report.ok {
                "doctor: every essential check passed"
            } else {
                "doctor: an essential check failed"
            }
        );
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Run every check against this environment.
pub async fn run(vars: &std::collections::HashMap<String, String>) -> Report {
    let mut checks = Checks(Vec::new());
    // The secret separately, so the rest can be checked without it.
    let config = match Config::from_vars_without_secret(vars) {
        Ok(c) => {
            checks.push(
                "configuration",
                true,
                Ok("valid (the same validation as serve)".into()),
            );
            c
        }
        Err(e) => {
            checks.push(
                "configuration",
                true,
                problem(
                    e.to_string(),
                    format!("fix {} (replicas-engine --help explains it)", e.var),
                ),
            );
            return finish(checks);
        }
    };
    checks.push(
        "secret",
        true,
        if config.secret.expose().is_empty() {
            problem(
                "REPLICAS_ENGINE_SECRET is not set",
                "set it in /etc/replicas-engine/env or .env",
            )
        } else {
            Ok("set".into())
        },
    );
    checks.push("port", true, check_port(config.host, config.port).await);
    checks.push(
        "workspace directory",
        true,
        check_workspace(&config.workspaces_dir),
    );
    checks.push("ready file", false, check_ready(&config.ready_file));
    for (name, bin, var, essential) in [
        ("git", &config.git_bin, "GIT_BIN", true),
        ("claude", &config.claude_bin, "CLAUDE_BIN", false),
        ("codex", &config.codex_bin, "CODEX_BIN", false),
        ("gh", &config.gh_bin, "GH_BIN", false),
    ] {
        checks.push(name, essential, check_tool(bin, var).await);
    }
    let p = &config.paths;
    checks.push(
        "github credential",
        false,
        check_credential(&p.git_credentials_file, Kind::Git),
    );
    checks.push(
        "claude credential",
        false,
        check_credential(&p.claude_credentials_file, Kind::Claude),
    );
    checks.push(
        "codex credential",
        false,
        check_credential(&p.codex_auth_file, Kind::Codex),
    );
    for (repo, dir) in crate::repos::config::repo_dirs(&config.workspaces_dir) {
        let result = match crate::repos::config::load(&dir) {
            Ok(Some(c)) => Ok(format!("{} parses", c.file)),
            Ok(None) => Ok("no replicas.json|yaml|yml".into()),
            Err(e) => problem(
                e.to_string(),
                format!(
                    "fix {}/{}; its hooks and systemPrompt are ignored until then",
                    repo, e.file
                ),
            ),
        };
        checks.push(&format!("repo {repo}"), true, result);
    }
    checks.push("state files", true, check_state(&config));
    checks.push("event journal", false, check_journal(&config));
    finish(checks)
}

fn finish(checks: Checks) -> Report {
    Report {
        ok: checks.0.iter().all(|c| c.status != Mark::Fail),
        checks: checks.0,
    }
}

async fn check_port(host: IpAddr, port: u16) -> Result<String, (String, String)> {
    if port == 0 {
        return Ok("0: any free port is taken at start".into());
    }
    let addr = SocketAddr::new(host, port);
    match std::net::TcpListener::bind(addr) {
        Ok(_) => return Ok(format!("{addr} is free")),
        Err(e) if e.kind() != std::io::ErrorKind::AddrInUse => {
            return problem(
                format!("cannot listen on {addr}: {e}"),
                "pick another HOST/PORT",
            )
        }
        Err(_) => {}
    }
    // In use: is it an engine?
    let probe = if host.is_unspecified() {
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port)
    } else {
        addr
    };
    let answer = async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .ok()?;
        let res = client
            .get(format!("http://{probe}/health"))
            .send()
            .await
            .ok()?;
        let v: Value = res.json().await.ok()?;
        v["status"].as_str().map(str::to_owned)
    }
    .await;
    match answer {
        Some(status) => Ok(format!(
            "{addr} in use by an engine answering /health ({status})"
        )),
        None => problem(
            format!("{addr} is in use by something that is not an engine"),
            format!("stop it (ss -ltnp 'sport = :{port}') or set PORT"),
        ),
    }
}

fn check_workspace(dir: &Path) -> Result<String, (String, String)> {
    let hint = format!(
        "mkdir -p {0} and give the workspace user write access (or set REPLICAS_WORKSPACES_DIR)",
        dir.display()
    );
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return problem(format!("{} is not a directory", dir.display()), hint),
        Err(e) => return problem(format!("{}: {e}", dir.display()), hint),
    }
    match tempfile::Builder::new()
        .prefix(".replicas-doctor-")
        .tempfile_in(dir)
    {
        Ok(_) => Ok(format!("{} exists and is writable", dir.display())),
        Err(e) => problem(format!("{} is not writable: {e}", dir.display()), hint),
    }
}

fn check_ready(file: &Path) -> Result<String, (String, String)> {
    if file.exists() {
        Ok(format!("{} exists: /health answers 200", file.display()))
    } else {
        problem(
            format!(
                "{} is missing: /health answers 503 until it exists",
                file.display()
            ),
            "normal while cloud-init runs; else set REPLICAS_READY_FILE",
        )
    }
}

/// `bin` as configured: a path, or a name looked up on `PATH`.
fn resolve(bin: &Path) -> Result<PathBuf, String> {
    if bin.components().count() > 1 {
        return if bin.is_file() {
            Ok(bin.to_path_buf())
        } else {
            Err(format!("{} does not exist", bin.display()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "no {} in any PATH directory ({})",
                bin.display(),
                path.to_string_lossy()
            )
        })
}

async fn check_tool(bin: &Path, var: &str) -> Result<String, (String, String)> {
    let path = match resolve(bin) {
        Ok(p) => p,
        Err(e) => {
            return problem(
                format!("not found: {e}"),
                format!("install it or point {var} at it"),
            )
        }
    };
    let out = tokio::time::timeout(
        VERSION_TIMEOUT,
        tokio::process::Command::new(&path)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    match out {
        Ok(Ok(o)) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let version = text.lines().next().unwrap_or("").trim();
            Ok(format!("{} ({version})", path.display()))
        }
        Ok(Ok(o)) => problem(
            format!("{} --version exited with {}", path.display(), o.status),
            format!("reinstall it or point {var} at a working one"),
        ),
        Ok(Err(e)) => problem(
            format!("cannot run {}: {e}", path.display()),
            format!("make it executable or point {var} at another"),
        ),
        Err(_) => problem(
            format!(
                "{} --version did not answer within {VERSION_TIMEOUT:?}",
                path.display()
            ),
            format!("reinstall it or point {var} at a working one"),
        ),
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Git,
    Claude,
    Codex,
}

/// Present, parseable, and when it expires; never its contents.
fn check_credential(file: &Path, kind: Kind) -> Result<String, (String, String)> {
    let hint = "the engine writes it when MONOLITH_URL is set; else log the CLI in";
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return problem(format!("{} is missing", file.display()), hint)
        }
        Err(e) => return problem(format!("{}: {e}", file.display()), hint),
    };
    let expiry = match kind {
        Kind::Git => {
            return if text.lines().any(|l| l.trim_end().ends_with("@github.com")) {
                Ok(format!(
                    "{} has a github.com entry (expiry not recorded)",
                    file.display()
                ))
            } else {
                problem(format!("{} has no github.com entry", file.display()), hint)
            };
        }
        Kind::Claude | Kind::Codex => {
            let Ok(v) = serde_json::from_str::<Value>(&text) else {
                return problem(format!("{} is not valid JSON", file.display()), hint);
            };
            match kind {
                Kind::Claude => v.pointer("/claudeAiOauth/expiresAt").and_then(parse_expiry),
                _ => v
                    .pointer("/tokens/access_token")
                    .and_then(Value::as_str)
                    .and_then(jwt_expiry),
            }
        }
    };
    let now = chrono::Utc::now();
    match expiry {
        Some(t) if t <= now => problem(
            format!("{} expired at {}", file.display(), crate::util::ts(t)),
            "the engine refreshes it when MONOLITH_URL is set",
        ),
        Some(t) => Ok(format!(
            "{} present, expires {} (in {} min)",
            file.display(),
            crate::util::ts(t),
            (t - now).num_minutes()
        )),
        None => Ok(format!("{} present (expiry unknown)", file.display())),
    }
}

/// The `exp` claim of a JWT, without verifying it.
fn jwt_expiry(token: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    parse_expiry(v.get("exp")?)
}

/// The state files the engine loads at start: readable, JSON ones parse.
fn check_state(config: &Config) -> Result<String, (String, String)> {
    let p = &config.paths;
    let mut bad = Vec::new();
    let mut present = 0;
    for (file, json) in [
        (&p.chats_file, true),
        (&p.engine_state_file, true),
        (&p.webhook_cursor_file, true),
        (&p.events_file, false),
        (&p.webhook_outbox_file, false),
    ] {
        match std::fs::read(file) {
            Ok(bytes) => {
                present += 1;
                if json && serde_json::from_slice::<Value>(&bytes).is_err() {
                    bad.push(format!("{} is not valid JSON", file.display()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bad.push(format!("{}: {e}", file.display())),
        }
    }
    if bad.is_empty() {
        Ok(format!(
            "{present} present under {}, all readable",
            p.replicas_dir.display()
        ))
    } else {
        problem(
            bad.join("; "),
            "give the workspace user access; a corrupt chats.json is set aside at start",
        )
    }
}

fn check_journal(config: &Config) -> Result<String, (String, String)> {
    let p = &config.paths;
    let size = |f: &Path| std::fs::metadata(f).map_or(0, |m| m.len());
    let bytes = size(&p.events_file) + size(&crate::events::journal::rotated_path(&p.events_file));
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    // Two segments of half the budget each; a little over is normal.
    if bytes > config.events_max_bytes + config.events_max_bytes / 4 {
        problem(
            format!(
                "{:.1} MiB, over the {:.1} MiB budget",
                mib(bytes),
                mib(config.events_max_bytes)
            ),
            "it shrinks at the next rotation; raise REPLICAS_EVENTS_MAX_BYTES to keep more",
        )
    } else {
        Ok(format!(
            "{:.1} MiB of {:.1} MiB (REPLICAS_EVENTS_MAX_BYTES)",
            mib(bytes),
            mib(config.events_max_bytes)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_expiry_reads_exp_only() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!(
            "{}.{}.sig",
            b64("{}"),
            b64(r#"{"exp":1900000000,"sub":"x"}"#)
        );
        assert_eq!(jwt_expiry(&token).unwrap().timestamp(), 1_900_000_000);
        assert!(jwt_expiry("garbage").is_none());
    }

    #[test]
    fn a_missing_tool_names_the_path_tried() {
        let e = resolve(Path::new("/nonexistent/claude")).unwrap_err();
        assert!(e.contains("/nonexistent/claude"), "{e}");
        let e = resolve(Path::new("no-such-tool-xyz")).unwrap_err();
        assert!(
            e.starts_with("no no-such-tool-xyz in any PATH directory"),
            "{e}"
        );
    }
}
