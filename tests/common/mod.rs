//! The world the integration tests run in. [`EngineSpec`] builds it: a temp
//! home with `workspaces/` and the readiness file, the engine's environment
//! (`with`/`without`), the fake CLIs of `tests/fixtures/bin`
//! ([`EngineSpec::fake_clis`]), git repos ([`git_repo`]) and a mock backend
//! ([`backend::Backend`], then `with("MONOLITH_URL", url)`).
//! [`TestEngine`] runs the real `replicas-engine` binary on an ephemeral port
//! against that home, with a client that sends the secret, an SSE reader
//! that waits on events ([`sse`]), and `shutdown()` that proves a clean exit;
//! restart and `kill -9` reuse the same home. [`inproc::InProc`] runs the
//! same engine inside the test process; [`e2e`] drives the real CLIs.
//! Every wait that cannot be an event is [`eventually`].
//!
//! The tests are one crate (`tests/main.rs`), so a helper here that no test
//! uses is a dead-code warning.

pub mod backend;
pub mod chat;
pub mod e2e;
pub mod inproc;
pub mod provider;
pub mod sse;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub use sse::{SseEvent, SseStream};

pub const SECRET: &str = "test-secret-0123456789";

/// How a test engine is started; reusable across restarts.
#[derive(Clone)]
pub struct EngineSpec {
    pub home: PathBuf,
    pub env: HashMap<String, String>,
    /// Keeps the temp home alive as long as any copy of the spec lives
    /// (across kill -9 and restarts), so as long as any engine started
    /// from it.
    _home: Arc<tempfile::TempDir>,
}

pub struct TestEngine {
    pub spec: EngineSpec,
    pub base: String,
    pub client: reqwest::Client,
    child: Child,
    logs: Arc<Mutex<String>>,
}

impl EngineSpec {
    /// A fresh temp home with an empty `workspaces/` and the readiness file
    /// present (so `/health` is 200 unless a test removes it).
    /// The spec also holds the returned guard: the home lives as long as
    /// either does.
    pub fn new() -> (Self, Arc<tempfile::TempDir>) {
        let dir = Arc::new(tempfile::tempdir().expect("temp home"));
        let home = dir.path().to_path_buf();
        std::fs::create_dir_all(home.join("workspaces")).unwrap();
        std::fs::write(home.join("ready"), "").unwrap();
        let spec = Self {
            home: home.clone(),
            env: HashMap::new(),
            _home: dir.clone(),
        };
        let spec = spec
            .with("REPLICAS_ENGINE_SECRET", SECRET)
            .with("WORKSPACE_HOME", home.display().to_string())
            .with("HOME", home.display().to_string())
            .with("HOST", "127.0.0.1")
            .with("PORT", "0")
            .with("WORKSPACE_ID", "ws_test")
            .with(
                "REPLICAS_READY_FILE",
                home.join("ready").display().to_string(),
            )
            .with("PATH", std::env::var("PATH").unwrap_or_default())
            .with("RUST_LOG", "info,replicas_engine=debug")
            // The fake CLIs read FAKE_* knobs (FAKE_ARGS_FILE, FAKE_PID_FILE);
            // children see only the allow-list plus what is named here.
            .with("REPLICAS_CHILD_ENV", "FAKE_*")
            // Most chat tests drive `fake-codex exec` and its failure knobs;
            // the app-server tests (the production default) ask for it by name.
            .with("REPLICAS_CODEX_TRANSPORT", "exec");
        (spec, dir)
    }

    /// The fake `claude` and `codex` of `tests/fixtures/bin`; they record
    /// their argv in `<home>/args.jsonl` ([`chat::last_argv`]) and
    /// `FAKE_LINGER`'s child pid in `<home>/linger.pid`.
    pub fn fake_clis(self) -> Self {
        let fake = |name: &str| format!("{}/tests/fixtures/bin/{name}", env!("CARGO_MANIFEST_DIR"));
        let args = self.home.join("args.jsonl").display().to_string();
        let pid = self.home.join("linger.pid").display().to_string();
        self.with("CLAUDE_BIN", fake("fake-claude"))
            .with("CODEX_BIN", fake("fake-codex"))
            .with("FAKE_ARGS_FILE", args)
            .with("FAKE_PID_FILE", pid)
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
    /// An engine on a fresh temp home.
    pub async fn start() -> Self {
        Self::start_with(EngineSpec::new().0).await
    }

    /// Start with a spec from [`EngineSpec::new`] and its guard (the spec
    /// keeps the home alive by itself: the same as [`Self::start_with`]).
    pub async fn start_spec(spec: EngineSpec, guard: Arc<tempfile::TempDir>) -> Self {
        drop(guard);
        Self::start_with(spec).await
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
        Self {
            spec,
            base,
            client: secret_client(),
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
        let (status, spec) = self.terminate().await;
        assert!(
            status.success(),
            "engine exit {status:?}; log:\n{}",
            logs.lock().unwrap()
        );
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

    /// Stop the engine (gracefully, or `kill -9` when `crash`), let `edit`
    /// touch its home, start it again on the same home.
    pub async fn restart_with(self, crash: bool, edit: impl FnOnce(&Path)) -> Self {
        let spec = if crash {
            self.kill9().await
        } else {
            self.shutdown().await
        };
        edit(&spec.home);
        Self::start_with(spec).await
    }

    /// Stop gracefully and start again on the same home.
    pub async fn restart(self) -> Self {
        self.restart_with(false, |_| {}).await
    }

    /// `kill -9`, then start again on the same home.
    pub async fn crash_and_restart(self) -> Self {
        self.restart_with(true, |_| {}).await
    }
}

/// A client that sends the secret with every request.
pub fn secret_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-replicas-engine-secret", SECRET.parse().unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// What a check given to [`eventually`] answers: `true`, `Some(value)` or
/// `Ok(value)` when the wait is over; `false`, `None` or `Err(why)` (shown
/// if the wait times out) while it is not.
pub trait Ready {
    type Value;
    fn ready(self) -> Result<Self::Value, String>;
}

impl Ready for bool {
    type Value = ();
    fn ready(self) -> Result<(), String> {
        self.then_some(()).ok_or_else(String::new)
    }
}

impl<T> Ready for Option<T> {
    type Value = T;
    fn ready(self) -> Result<T, String> {
        self.ok_or_else(String::new)
    }
}

impl<T> Ready for Result<T, String> {
    type Value = T;
    fn ready(self) -> Result<T, String> {
        self
    }
}

/// Run `check` every 20 ms until it is [`Ready`] and return its value;
/// after `timeout`, fail the test naming `what` (and the last `Err`).
/// For what has no event to wait on: files, processes, polled routes.
pub async fn eventually<R: Ready>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> R,
) -> R::Value {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let why = match check().await.ready() {
            Ok(v) => return v,
            Err(why) => why,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}{}{why}",
            if why.is_empty() { "" } else { "; last: " }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The object in the JSON array `list` whose `key` is `value`.
pub fn find<'a>(list: &'a serde_json::Value, key: &str, value: &str) -> &'a serde_json::Value {
    list.as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"))
        .iter()
        .find(|o| o[key] == value)
        .unwrap_or_else(|| panic!("no {key} {value:?} in {list:#}"))
}

/// The pid a test's process wrote to `path` (`echo $$ > path`), once the
/// whole line is there.
pub async fn wait_pid(path: &Path) -> i32 {
    eventually(
        &format!("a pid in {}", path.display()),
        Duration::from_secs(30),
        async || {
            std::fs::read_to_string(path)
                .ok()
                .filter(|s| s.ends_with('\n'))
                .and_then(|s| s.trim().parse().ok())
        },
    )
    .await
}

/// Whether `pid` is a live process (a zombie counts as gone).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z" | "X"))
        }
        Err(_) => false,
    }
}

/// A committed git repo `name` under `ws` (branch `main`) holding `files`
/// (path, content); returns its directory.
pub fn git_repo(ws: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = ws.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for (path, text) in files {
        std::fs::write(dir.join(path), text).unwrap();
    }
    sh(
        &dir,
        "git init -q -b main && git add . && git commit -qm init",
    );
    dir
}

/// Write an executable shell script (`#!/bin/sh` and `body`) at `path`, a
/// stand-in for a tool the engine runs; returns its path.
pub fn script(path: &Path, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
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
