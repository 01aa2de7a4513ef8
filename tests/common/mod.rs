//! Test harness: [`TestEngine`] runs the real `replicas-engine` binary on an
//! ephemeral port against a temp home, with a client that sends the secret,
//! an SSE reader that waits on events (never on time), and `shutdown()` that
//! proves a clean exit. Restart and `kill -9` reuse the same home.

#![allow(dead_code)]

pub mod backend;
pub mod e2e;
pub mod inproc;
pub mod sse;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[allow(unused_imports)]
pub use sse::{SseEvent, SseStream};

pub const SECRET: &str = "test-secret-0123456789";

/// How a test engine is started; reusable across restarts.
#[derive(Clone)]
pub struct EngineSpec {
    pub home: PathBuf,
    pub env: HashMap<String, String>,
    /// Keeps the temp home alive as long as any copy of the spec lives
    /// (across kill -9 and restarts).
    pub home_guard: Option<Arc<tempfile::TempDir>>,
}

pub struct TestEngine {
    /// Keeps the temp home alive for the engine's lifetime.
    pub _home_guard: Option<Arc<tempfile::TempDir>>,
    pub spec: EngineSpec,
    pub base: String,
    pub client: reqwest::Client,
    child: Child,
    logs: Arc<Mutex<String>>,
}

impl EngineSpec {
    /// A fresh temp home with an empty `workspaces/` and the readiness file
    /// present (so `/health` is 200 unless a test removes it).
    pub fn new() -> (Self, Arc<tempfile::TempDir>) {
        let dir = Arc::new(tempfile::tempdir().expect("temp home"));
        let home = dir.path().to_path_buf();
        std::fs::create_dir_all(home.join("workspaces")).unwrap();
        std::fs::write(home.join("ready"), "").unwrap();
        let mut env = HashMap::new();
        env.insert("REPLICAS_ENGINE_SECRET".into(), SECRET.into());
        env.insert("WORKSPACE_HOME".into(), home.display().to_string());
        env.insert("HOME".into(), home.display().to_string());
        env.insert("HOST".into(), "127.0.0.1".into());
        env.insert("PORT".into(), "0".into());
        env.insert("WORKSPACE_ID".into(), "ws_test".into());
        env.insert(
            "REPLICAS_READY_FILE".into(),
            home.join("ready").display().to_string(),
        );
        env.insert("PATH".into(), std::env::var("PATH").unwrap_or_default());
        env.insert("RUST_LOG".into(), "info,replicas_engine=debug".into());
        // The fake CLIs read FAKE_* knobs (FAKE_ARGS_FILE, FAKE_PID_FILE);
        // children see only the allow-list plus what is named here.
        env.insert("REPLICAS_CHILD_ENV".into(), "FAKE_*".into());
        // Most chat tests drive `fake-codex exec` and its failure knobs; the
        // app-server tests (the production default) ask for it by name.
        env.insert("REPLICAS_CODEX_TRANSPORT".into(), "exec".into());
        (
            Self {
                home,
                env,
                home_guard: Some(dir.clone()),
            },
            dir,
        )
    }

    pub fn with(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.insert(k.into(), v.into());
        self
    }

    pub fn without(mut self, k: &str) -> Self {
        self.env.remove(k);
        self
    }

    pub fn workspaces(&self) -> PathBuf {
        self.home.join("workspaces")
    }

    /// The engine command with exactly this environment (nothing inherited).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_replicas-engine"));
        cmd.args(args)
            .env_clear()
            .envs(&self.env)
            // No stray .env from the developer's checkout.
            .current_dir(&self.home)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }
}

impl TestEngine {
    pub async fn start() -> Self {
        let (spec, guard) = EngineSpec::new();
        let mut e = Self::start_with(spec).await;
        e._home_guard = Some(guard);
        e
    }

    /// Start with a spec from [`EngineSpec::new`]; keep its guard alive.
    pub async fn start_spec(spec: EngineSpec, guard: Arc<tempfile::TempDir>) -> Self {
        let mut e = Self::start_with(spec).await;
        e._home_guard = Some(guard);
        e
    }

    pub async fn start_with(spec: EngineSpec) -> Self {
        let mut child = spec
            .command(&[])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn replicas-engine");
        let logs = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<String>();
        let echo = std::env::var_os("TEST_ENGINE_LOG").is_some();
        {
            let logs = logs.clone();
            tokio::spawn(async move {
                let mut addr_tx = Some(addr_tx);
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if echo {
                        eprintln!("[engine] {line}");
                    }
                    if let Some(i) = line.find("listening on http://") {
                        if let Some(tx) = addr_tx.take() {
                            let addr = line[i + "listening on ".len()..]
                                .split_whitespace()
                                .next()
                                .unwrap()
                                .to_owned();
                            let _ = tx.send(addr);
                        }
                    }
                    let mut l = logs.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let base = match tokio::time::timeout(Duration::from_secs(30), addr_rx).await {
            Ok(Ok(addr)) => addr,
            _ => {
                let status = child.try_wait().ok().flatten();
                panic!(
                    "engine did not start (exit {status:?}); log:\n{}",
                    logs.lock().unwrap()
                );
            }
        };
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-replicas-engine-secret", SECRET.parse().unwrap());
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap();
        Self {
            _home_guard: None,
            spec,
            base,
            client,
            child,
            logs,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn home(&self) -> &Path {
        &self.spec.home
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("engine running")
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path))
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path))
    }

    pub fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.delete(self.url(path))
    }

    /// GET and parse JSON, asserting the status.
    pub async fn get_json(&self, path: &str, status: u16) -> serde_json::Value {
        let res = self.get(path).send().await.unwrap();
        assert_eq!(res.status().as_u16(), status, "GET {path}");
        res.json().await.unwrap()
    }

    /// POST JSON and parse the JSON answer, asserting the status.
    pub async fn post_json(
        &self,
        path: &str,
        body: serde_json::Value,
        status: u16,
    ) -> serde_json::Value {
        let res = self.post(path).json(&body).send().await.unwrap();
        let got = res.status().as_u16();
        let text = res.text().await.unwrap();
        assert_eq!(got, status, "POST {path}: {text}");
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    /// Open `GET /events` with an optional query string (e.g. `since=5`).
    pub async fn events(&self, query: &str) -> SseStream {
        let url = if query.is_empty() {
            self.url("/events")
        } else {
            self.url(&format!("/events?{query}"))
        };
        let res = self.client.get(url).send().await.unwrap();
        assert_eq!(res.status(), 200);
        SseStream::new(res)
    }

    /// Everything the engine logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// SIGTERM and wait; returns the exit status.
    pub async fn terminate(mut self) -> (ExitStatus, EngineSpec) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("engine exits after SIGTERM")
            .unwrap();
        (status, self.spec.clone())
    }

    /// Graceful stop that must exit 0.
    pub async fn shutdown(self) -> EngineSpec {
        let logs = self.logs.clone();
        let guard = self._home_guard.clone();
        let (status, spec) = self.terminate().await;
        assert!(
            status.success(),
            "engine exit {status:?}; log:\n{}",
            logs.lock().unwrap()
        );
        drop(guard);
        spec
    }

    /// Graceful stop that must exit 0; returns everything it logged.
    pub async fn shutdown_logs(self) -> String {
        let logs = self.logs.clone();
        self.shutdown().await;
        let out = logs.lock().unwrap().clone();
        out
    }

    /// `kill -9` the engine and wait for it.
    pub async fn kill9(mut self) -> EngineSpec {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
        self.spec.clone()
    }

    /// Stop gracefully and start again on the same home.
    pub async fn restart(self) -> Self {
        let guard = self._home_guard.clone();
        let spec = self.shutdown().await;
        let mut e = Self::start_with(spec).await;
        e._home_guard = guard;
        e
    }

    /// `kill -9`, then start again on the same home.
    pub async fn crash_and_restart(self) -> Self {
        let guard = self._home_guard.clone();
        let spec = self.kill9().await;
        let mut e = Self::start_with(spec).await;
        e._home_guard = guard;
        e
    }
}

/// Run a shell command (for git fixtures); panics with its output on failure.
pub fn sh(dir: &Path, script: &str) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "`{script}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
