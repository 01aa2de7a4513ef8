//! Repo reader benchmarks (issue 4), against the release engine binary:
//!
//! 1. a generated repo with 20,000 tracked files and 500 changed ones:
//!    `GET /repos?includeDiffs=true` wall time vs. `git status` + `git diff`
//!    run by hand on the same repo (target ≤ 1.3×);
//! 2. `GET /repos` over 20 small repos (target ≤ 100 ms).

use std::ffi::OsStr;
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use anyhow::bail;

use crate::engine::{engine_bin, Engine};

const ROUNDS: usize = 15;

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
    let mut by_hand = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        git(&big, &["status"])?;
        git(&big, &["diff", "HEAD"])?;
        by_hand.push(t.elapsed());
    }
    let (api_p50, api_p99, _) = crate::percentiles(&mut api);
    let (hand_p50, hand_p99, _) = crate::percentiles(&mut by_hand);
    println!(
        "repos: includeDiffs on 20k files/500 changed: GET p50 {:.1?} p99 {:.1?} ({} KiB body); \
         git status + git diff by hand p50 {:.1?} p99 {:.1?}; ratio p50 {:.2}x (target <= 1.3x)",
        api_p50,
        api_p99,
        bytes / 1024,
        hand_p50,
        hand_p99,
        api_p50.as_secs_f64() / hand_p50.as_secs_f64()
    );
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
    let (p50, p99, max) = crate::percentiles(&mut list);
    let (hand_p50, _, _) = crate::percentiles(&mut hand);
    println!(
        "repos: GET /repos with 20 small repos: p50 {p50:.1?} p99 {p99:.1?} max {max:.1?} (target <= 100 ms); \
         20 x `git status` by hand p50 {hand_p50:.1?}"
    );
    engine.stop().await;
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
