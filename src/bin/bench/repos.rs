//! Repo reader benchmarks (issue 4), against the release engine binary:
//!
//! 1. a generated repo with 20,000 tracked files and 500 changed ones:
//!    `GET /repos?includeDiffs=true` wall time against the same git work
//!    done by hand: the four commands the engine runs for it (`status
//!    --porcelain=v2 --untracked-files=all`, `config --get-regexp`,
//!    `for-each-ref`, `diff --raw --numstat -p --merge-base`), once one
//!    after another and once with `status` beside the rest as the engine
//!    does. The ratio is API time / by-hand time: what the HTTP layer,
//!    parsing and JSON cost on top of git (target <= 1.3x). Measured on both
//!    cores and with everything (engine, its git children, this bench and
//!    the by-hand git) pinned to one core with `taskset`, where the
//!    engine's parallelism cannot help;
//! 2. `GET /repos` over 20 small repos (target <= 100 ms).
//!
//! Samples are few (15 and 30 requests), so the tail is reported as the
//! maximum, not as a p99.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::engine::{engine_bin, Engine};

const ROUNDS: usize = 15;

/// The git options the engine puts before every command.
const GIT_PREFIX: [&str; 5] = [
    "--no-optional-locks",
    "-c",
    "core.quotePath=false",
    "-c",
    "color.ui=false",
];

pub async fn run() -> anyhow::Result<()> {
    let bin = engine_bin()?;
    println!("repos: engine {}", bin.display());

    // 1. One big repo.
    let home = tempfile::tempdir()?;
    let ws = home.path().join("workspaces");
    let big = ws.join("big");
    let t = Instant::now();
    generate_big_repo(&big, 20_000, 500)?;
    println!(
        "repos: generated 20,000 files / 500 changed in {:.1?}",
        t.elapsed()
    );
    let engine = Engine::start(home.path(), &[("GH_BIN", OsStr::new("/nonexistent/gh"))]).await?;
    let all_cpus = format!("0-{}", std::thread::available_parallelism()?.get() - 1);
    for cores in ["two cores", "one core"] {
        let pin = if cores == "one core" {
            "0"
        } else {
            all_cpus.as_str()
        };
        // Every thread of the engine and of this bench, and what they spawn
        // from now on (git), runs on `pin`.
        taskset(pin, engine.pid())?;
        taskset(pin, Some(std::process::id()))?;
        let mut api = Vec::new();
        let mut bytes = 0;
        for i in 0..ROUNDS + 2 {
            let t = Instant::now();
            let body = engine.get("/repos?includeDiffs=true").await?;
            if i >= 2 {
                api.push(t.elapsed());
            }
            bytes = body.len();
            let v: serde_json::Value = serde_json::from_str(&body)?;
            let d = &v["repos"][0]["gitDiff"];
            if d["filesChanged"] != 500 {
                bail!("expected 500 changed files, got {}", d["filesChanged"]);
            }
        }
        let (mut seq, mut par) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            seq.push(engine_git_work(&big, false)?);
            par.push(engine_git_work(&big, true)?);
        }
        let (api_p50, _, api_max) = crate::percentiles(&mut api);
        let (seq_p50, _, seq_max) = crate::percentiles(&mut seq);
        let (par_p50, _, par_max) = crate::percentiles(&mut par);
        let ratio = |d: Duration| api_p50.as_secs_f64() / d.as_secs_f64();
        let verdict = |r: f64| if r <= 1.3 { "met" } else { "MISSED" };
        println!(
            "repos: includeDiffs on 20k files/500 changed, {cores}: GET p50 {api_p50:.1?} max {api_max:.1?} ({} KiB body); \
             the engine's git commands by hand: one after another p50 {seq_p50:.1?} max {seq_max:.1?}, \
             status beside the rest p50 {par_p50:.1?} max {par_max:.1?}; \
             ratio p50 {:.2}x vs sequential ({}), {:.2}x vs parallel ({}) (target <= 1.3x)",
            bytes / 1024,
            ratio(seq_p50),
            verdict(ratio(seq_p50)),
            ratio(par_p50),
            verdict(ratio(par_p50)),
        );
    }
    taskset(&all_cpus, Some(std::process::id()))?;
    engine.stop().await;

    // 2. Twenty small repos.
    let home = tempfile::tempdir()?;
    let ws = home.path().join("workspaces");
    for i in 0..20 {
        generate_big_repo(&ws.join(format!("repo-{i:02}")), 20, 2)?;
    }
    let engine = Engine::start(home.path(), &[("GH_BIN", OsStr::new("/nonexistent/gh"))]).await?;
    let mut list = Vec::new();
    for i in 0..ROUNDS * 2 + 2 {
        let t = Instant::now();
        let body = engine.get("/repos").await?;
        if i >= 2 {
            list.push(t.elapsed());
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        if v["repos"].as_array().map(Vec::len) != Some(20) {
            bail!("expected 20 repos");
        }
    }
    // Reference for the machine's load: one plain `git status` per repo.
    let mut hand = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for i in 0..20 {
            git(&ws.join(format!("repo-{i:02}")), &["status"])?;
        }
        hand.push(t.elapsed());
    }
    let (p50, _, max) = crate::percentiles(&mut list);
    let (hand_p50, _, _) = crate::percentiles(&mut hand);
    println!(
        "repos: GET /repos with 20 small repos ({} requests): p50 {p50:.1?} max {max:.1?} (target <= 100 ms: {}); \
         20 x `git status` by hand p50 {hand_p50:.1?}",
        ROUNDS * 2,
        if p50 <= Duration::from_millis(100) { "met" } else { "MISSED" }
    );
    engine.stop().await;
    Ok(())
}

/// Pin every thread of `pid` (and what it spawns later) to `cpus`.
fn taskset(cpus: &str, pid: Option<u32>) -> anyhow::Result<()> {
    let Some(pid) = pid else {
        bail!("no pid to pin");
    };
    let st = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("taskset -a -p -c {cpus} {pid} failed");
    }
    Ok(())
}

/// The git work behind one `GET /repos?includeDiffs=true` of the big repo,
/// with the engine's options, output read into memory as the engine does:
/// `status`, then `config` + `for-each-ref` + `diff --merge-base`, either
/// one after another or (`parallel`) `status` beside the other three.
fn engine_git_work(dir: &Path, parallel: bool) -> anyhow::Result<Duration> {
    let status = || {
        git_read(
            dir,
            &[
                "status",
                "--porcelain=v2",
                "--branch",
                "-z",
                "--untracked-files=all",
            ],
        )
    };
    let rest = || -> anyhow::Result<()> {
        // No remote: git exits 1 for the empty config lookup, as for the engine.
        let _ = git_read(dir, &["config", "-z", "--get-regexp", r"^remote\..*\.url$"]);
        git_read(
            dir,
            &[
                "for-each-ref",
                "--format=%(refname) %(objectname) %(symref)",
                "refs/remotes",
                "refs/heads",
            ],
        )?;
        git_read(
            dir,
            &[
                "diff",
                "--no-ext-diff",
                "--no-textconv",
                "--raw",
                "--numstat",
                "-z",
                "-p",
                "--merge-base",
                "--end-of-options",
                "refs/heads/main",
                "--",
            ],
        )
    };
    let t = Instant::now();
    if parallel {
        std::thread::scope(|s| {
            let st = s.spawn(status);
            let r = rest();
            st.join().expect("status thread")?;
            r
        })?;
    } else {
        status()?;
        rest()?;
    }
    Ok(t.elapsed())
}

/// Run git with the engine's options and read its whole stdout.
fn git_read(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(GIT_PREFIX)
        .args(args)
        .env("GIT_PAGER", "cat")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("git {args:?} failed in {}", dir.display());
    }
    std::hint::black_box(out.stdout.len());
    Ok(())
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let st = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.com")
        .env("GIT_COMMITTER_NAME", "Bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.com")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("git {args:?} failed in {}", dir.display());
    }
    Ok(())
}

/// `files` tracked files of ~20 lines in 100-file folders, committed; then
/// `changed` of them edited (one line changed, one added).
fn generate_big_repo(dir: &Path, files: usize, changed: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    git(dir, &["init", "-q", "-b", "main"])?;
    let body: String = (0..20)
        .map(|l| format!("line {l} of some source text\n"))
        .collect();
    for i in 0..files {
        let sub = dir.join(format!("d{:03}", i / 100));
        std::fs::create_dir_all(&sub)?;
        std::fs::write(sub.join(format!("f{i:05}.txt")), &body)?;
    }
    git(dir, &["add", "-A"])?;
    git(dir, &["commit", "-qm", "init"])?;
    let step = (files / changed.max(1)).max(1);
    for i in (0..files).step_by(step).take(changed) {
        let path = dir
            .join(format!("d{:03}", i / 100))
            .join(format!("f{i:05}.txt"));
        let text = body.replacen("line 3 of", "LINE 3 OF", 1) + "an added line\n";
        std::fs::write(path, text)?;
    }
    // Let git record fresh stat data once, as an agent's own git use would.
    git(dir, &["status"])?;
    Ok(())
}
