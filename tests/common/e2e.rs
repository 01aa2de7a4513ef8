//! End-to-end helpers: the real `claude` and `codex` CLIs driven offline
//! against the mock model servers in `tests/e2e/` (an Anthropic Messages API
//! and an OpenAI Responses API), started on loopback with a free port.
//!
//! Everything lives under one home directory (a temp dir, or the engine's
//! temp home in HTTP-level tests) so nothing touches the real `~/.claude`
//! or `~/.codex`. The tests are `#[ignore]`d; `scripts/test.sh` runs them
//! with `-- --include-ignored` after installing the pinned CLIs and
//! exporting `REPLICAS_E2E_CLAUDE_BIN` / `REPLICAS_E2E_CODEX_BIN`.
//!
//! ```ignore
//! #[tokio::test]
//! #[ignore = "end-to-end: …"]
//! async fn my_test() {
//! let e = e2e::E2eEnv::start().await;          // or start_in(engine_home)
//! let spec = spec.with("CLAUDE_BIN", e.claude_bin.display().to_string());
//! for (k, v) in e.env() { spec = spec.with(&k, v); }
//! ```

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The installed CLI: `$REPLICAS_E2E_<NAME>_BIN`, else the caches
/// `scripts/test.sh` and the dev machines use.
pub fn cli_bin(name: &str) -> PathBuf {
    let var = format!("REPLICAS_E2E_{}_BIN", name.to_ascii_uppercase());
    if let Some(p) = std::env::var_os(&var) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let mut candidates = vec![home
        .join(".cache/replicas-e2e/npm/node_modules/.bin")
        .join(name)];
    if let Ok(dir) = std::fs::read_dir(home.join(".cache/replicas-engine-e2e")) {
        for e in dir.flatten() {
            candidates.push(e.path().join("node_modules/.bin").join(name));
        }
    }
    candidates
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("{var} is not set and no cached {name} was found; run scripts/test.sh")
        })
}

/// A mock model server (python) on a free loopback port; killed on drop.
pub struct MockServer {
    pub port: u16,
    /// One JSON line per request the CLI made.
    pub log: PathBuf,
    _child: Child,
}

impl MockServer {
    /// `script` is `mock_anthropic.py` or `mock_openai.py`; it runs in `dir`
    /// (where the CLIs write files in tool turns, it also logs there).
    pub async fn start(script: &str, dir: &Path) -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/e2e")
            .join(script);
        let log = dir.join(format!("{script}.log.jsonl"));
        let mut child = Command::new("python3")
            // No __pycache__ of mock_http.py in the checkout.
            .arg("-B")
            .arg(&path)
            .arg("0")
            .env("MOCK_LOG", &log)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start python3 mock server");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let port = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(p) = line.strip_prefix("LISTENING ") {
                    return p.trim().parse::<u16>().ok();
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("{script} did not report its port"));
        Self {
            port,
            log,
            _child: child,
        }
    }

    /// The requests logged so far.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// Both mock servers, the CLIs' config under one home, and the env that
/// points the CLIs at the mocks.
pub struct E2eEnv {
    _tmp: Option<tempfile::TempDir>,
    /// `HOME` for the CLIs (`~/.claude` and `CODEX_HOME` live here).
    pub home: PathBuf,
    /// A workspace directory for the agent's cwd: `<home>/workspaces/demo`.
    pub workspace: PathBuf,
    pub codex_home: PathBuf,
    pub claude_bin: PathBuf,
    pub codex_bin: PathBuf,
    pub anthropic: MockServer,
    pub openai: MockServer,
}

impl E2eEnv {
    /// Everything in a fresh temp home.
    pub async fn start() -> Self {
        let tmp = tempfile::tempdir().expect("temp home");
        let mut e = Self::start_in(tmp.path()).await;
        e._tmp = Some(tmp);
        e
    }

    /// Everything under `home` (e.g. a TestEngine's temp home).
    pub async fn start_in(home: &Path) -> Self {
        let workspace = home.join("workspaces/demo");
        std::fs::create_dir_all(&workspace).unwrap();
        let mocks = home.join("mocks");
        std::fs::create_dir_all(&mocks).unwrap();
        let (anthropic, openai) = tokio::join!(
            MockServer::start("mock_anthropic.py", &mocks),
            MockServer::start("mock_openai.py", &mocks)
        );
        let codex_home = home.join(".codex");
        std::fs::create_dir_all(&codex_home).unwrap();
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/codex_config.toml"),
        )
        .unwrap();
        let config = template.replace(
            "http://127.0.0.1:18556/v1",
            &format!("http://127.0.0.1:{}/v1", openai.port),
        );
        assert_ne!(
            config, template,
            "codex_config.toml no longer has the mock base_url to replace"
        );
        std::fs::write(codex_home.join("config.toml"), config).unwrap();
        Self {
            _tmp: None,
            home: home.to_path_buf(),
            workspace,
            codex_home,
            claude_bin: cli_bin("claude"),
            codex_bin: cli_bin("codex"),
            anthropic,
            openai,
        }
    }

    /// Environment for both CLIs (on top of PATH etc.). Keys without
    /// secrets: the mocks accept any key.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("HOME".into(), self.home.display().to_string()),
            (
                "ANTHROPIC_BASE_URL".into(),
                format!("http://127.0.0.1:{}", self.anthropic.port),
            ),
            ("ANTHROPIC_API_KEY".into(), "sk-ant-mock".into()),
            ("CODEX_HOME".into(), self.codex_home.display().to_string()),
            ("MOCK_API_KEY".into(), "mock-key".into()),
            // codex reads the mock provider's key from MOCK_API_KEY, which
            // is not on the children's allow-list.
            ("REPLICAS_CHILD_ENV".into(), "FAKE_*,MOCK_API_KEY".into()),
            // Keep the CLIs from touching anything outside.
            ("DISABLE_AUTOUPDATER".into(), "1".into()),
            ("NO_PROXY".into(), "127.0.0.1,localhost".into()),
        ]
    }
}
