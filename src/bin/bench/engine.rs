//! The release engine as the benchmarks drive it: spawned in its own
//! process with a temp home and a clean environment, found by its
//! "listening on" log line, with a client that sends the secret.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};

pub const SECRET: &str = "bench-secret";

/// `target/release/replicas-engine`, next to this bench binary.
pub fn engine_bin() -> anyhow::Result<PathBuf> {
    let bin = std::env::current_exe()?.with_file_name("replicas-engine");
    if !bin.exists() {
        bail!(
            "{} not found; run `cargo build --release --bins` first",
            bin.display()
        );
    }
    Ok(bin)
}

pub struct Engine {
    /// `None` on a [`handle`](Self::handle) copy, which does not own the process.
    child: Option<tokio::process::Child>,
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// Sends the secret on every request.
    pub client: reqwest::Client,
    /// When the process was spawned (start-up timings count from here).
    pub spawned_at: Instant,
}

impl Engine {
    /// Start the engine on `home` (its workspaces under `home/workspaces`).
    /// `env` adds to or overrides the defaults (ready file `/dev/null`, so
    /// `/health` is 200; `RUST_LOG=warn,replicas_engine=info`).
    pub async fn start(home: &Path, env: &[(&str, &OsStr)]) -> anyhow::Result<Self> {
        Self::start_on(home, env, None).await
    }

    /// [`start`](Self::start) pinned to `cpu` with `taskset` (when given).
    pub async fn start_on(
        home: &Path,
        env: &[(&str, &OsStr)],
        cpu: Option<&str>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(home.join("workspaces"))?;
        // Built before the spawn so start-up timings do not include it.
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-replicas-engine-secret", SECRET.parse()?);
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .build()?;
        let bin = engine_bin()?;
        let spawned_at = Instant::now();
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = tokio::process::Command::new("taskset");
                c.arg("-c").arg(cpu).arg(bin);
                c
            }
            None => tokio::process::Command::new(bin),
        };
        let mut child = cmd
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("REPLICAS_ENGINE_SECRET", SECRET)
            .env("WORKSPACE_HOME", home)
            .env("HOME", home)
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("REPLICAS_READY_FILE", "/dev/null")
            .env("RUST_LOG", "warn,replicas_engine=info")
            .envs(env.iter().copied())
            .current_dir(home)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the release engine")?;
        let mut lines = BufReader::new(child.stderr.take().context("engine stderr")?).lines();
        let addr = loop {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .context("engine did not start within 30 s")??
                .context("engine exited before listening")?;
            if let Some(i) = line.find("listening on http://") {
                break line[i + "listening on http://".len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child: Some(child),
            spawned_at,
            base: format!("http://{addr}"),
            addr,
            client,
        })
    }

    /// A copy for other tasks that shares the client but not the process.
    pub fn handle(&self) -> Self {
        Self {
            child: None,
            spawned_at: self.spawned_at,
            addr: self.addr.clone(),
            base: self.base.clone(),
            client: self.client.clone(),
        }
    }

    /// GET `path`, failing on a non-2xx status.
    pub async fn get(&self, path: &str) -> anyhow::Result<String> {
        let res = self
            .client
            .get(format!("{}{}", self.base, path))
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("GET {path}: {}", res.status());
        }
        Ok(res.text().await?)
    }

    /// The engine's pid (for `taskset`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    fn stat_field(&self, file: &str, pick: impl Fn(&str) -> Option<f64>) -> f64 {
        let Some(pid) = self.child.as_ref().and_then(|c| c.id()) else {
            return 0.0;
        };
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .ok()
            .and_then(|s| pick(&s))
            .unwrap_or(0.0)
    }

    /// Resident memory now, in kB.
    pub fn rss_kb(&self) -> f64 {
        self.stat_field("status", |s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
    }

    /// CPU time (user + system) used so far, in seconds.
    pub fn cpu_secs(&self) -> f64 {
        self.stat_field("stat", |stat| {
            // Fields 14 and 15 (utime, stime), counted from field 3 here.
            let f: Vec<&str> = stat
                .get(stat.rfind(')')? + 2..)?
                .split_whitespace()
                .collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
    }

    /// SIGTERM and wait (bounded) for the exit.
    pub async fn stop(mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    }
}
