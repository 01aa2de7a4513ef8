//! Provider layer: what reading and normalizing agent output costs.
//!
//! - parse: the recorded transcripts through the capped line reader and the
//!   parsers, in memory (no process): lines/s per CLI.
//! - stream: a fake CLI printing 100,000 lines through a real
//!   `ProviderSession` (pipes, process group, channel), against the same
//!   script writing to /dev/null alone, so the engine's share shows.
//! - turn start: `start_turn` → first event, p50/p99, for a warm Claude
//!   process (stdin write) and a Codex spawn per turn (fake CLIs, python
//!   start-up included).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use crate::ms;
use replicas_engine::providers::lines::{CappedLines, Line};
use replicas_engine::providers::{
    claude, codex, ProviderEvent, ProviderKind, ProviderSession, SessionConfig, TurnInput,
};

const STREAM_LINES: usize = 100_000;

pub async fn run() -> anyhow::Result<()> {
    println!("== providers");
    parse_throughput().await?;
    let home = tempfile::tempdir()?;
    for kind in [ProviderKind::Codex, ProviderKind::Claude] {
        stream_throughput(kind, home.path()).await?;
    }
    for kind in [ProviderKind::Claude, ProviderKind::Codex] {
        turn_start(kind, home.path()).await?;
    }
    Ok(())
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn config(kind: ProviderKind, home: &Path) -> SessionConfig {
    let bin = fixtures().join("bin").join(format!("fake-{kind}"));
    let mut cfg = SessionConfig::new(kind, bin, home);
    cfg.env = vec![
        ("HOME".into(), home.display().to_string()),
        ("CODEX_HOME".into(), home.display().to_string()),
    ];
    cfg
}

/// All recorded transcripts of one CLI, repeated to about 200,000 lines.
fn corpus(kind: ProviderKind) -> anyhow::Result<(Vec<u8>, usize)> {
    let dir = fixtures().join(kind.as_str());
    let mut one = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "jsonl") {
            one.extend(std::fs::read(&path)?);
        }
    }
    let per = one.iter().filter(|&&b| b == b'\n').count().max(1);
    let reps = 200_000 / per + 1;
    Ok((one.repeat(reps), per * reps))
}

async fn parse_throughput() -> anyhow::Result<()> {
    for kind in [ProviderKind::Claude, ProviderKind::Codex] {
        let (bytes, lines) = corpus(kind)?;
        let mut reader = CappedLines::new(tokio::io::BufReader::new(&bytes[..]), 4 << 20);
        let mut cp = claude::ClaudeParser::new();
        let mut xp = codex::CodexParser::new();
        let mut events = 0usize;
        let t = Instant::now();
        while let Some(line) = reader.next_line().await? {
            if let Line::Text(s) = line {
                events += match kind {
                    ProviderKind::Claude => claude::parse_line(&mut cp, s).len(),
                    ProviderKind::Codex => codex::parse_line(&mut xp, s).len(),
                };
            }
        }
        let el = t.elapsed();
        println!(
            "parse {kind}: {lines} lines ({:.1} MB) in {:.0} ms = {:.0} lines/s, {:.0} MB/s, {events} events",
            bytes.len() as f64 / 1e6,
            el.as_secs_f64() * 1e3,
            lines as f64 / el.as_secs_f64(),
            bytes.len() as f64 / 1e6 / el.as_secs_f64(),
        );
    }
    Ok(())
}

async fn stream_throughput(kind: ProviderKind, home: &Path) -> anyhow::Result<()> {
    let prompt = format!("FAKE_LINES={STREAM_LINES}");
    // The script alone, output discarded: the floor.
    let bin = fixtures().join("bin").join(format!("fake-{kind}"));
    let t = Instant::now();
    let alone = match kind {
        ProviderKind::Codex => tokio::process::Command::new(&bin)
            .args(["exec", "--json", "--", &prompt])
            .env("CODEX_HOME", home)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .await?
            .success(),
        ProviderKind::Claude => {
            let msg = claude::user_message_line(&prompt, &[]);
            let mut child = tokio::process::Command::new(&bin)
                .env("HOME", home)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()?;
            let mut stdin = child.stdin.take().context("stdin")?;
            tokio::io::AsyncWriteExt::write_all(&mut stdin, msg.as_bytes()).await?;
            drop(stdin);
            child.wait().await?.success()
        }
    };
    let floor = t.elapsed();
    anyhow::ensure!(alone, "fake-{kind} failed on its own");

    let mut s = ProviderSession::new(config(kind, home));
    let t = Instant::now();
    let mut turn = s
        .start_turn(TurnInput {
            prompt,
            ..TurnInput::default()
        })
        .await?;
    let mut items = 0usize;
    while let Some(ev) = turn.events.recv().await {
        match ev {
            ProviderEvent::Item(_) => items += 1,
            ProviderEvent::Finished(r) => anyhow::ensure!(
                r.outcome == replicas_engine::providers::Outcome::Completed,
                "{kind} stream turn failed: {r:?}"
            ),
            _ => {}
        }
    }
    let el = t.elapsed();
    s.shutdown().await;
    println!(
        "stream {kind}: {items} items via ProviderSession in {:.0} ms = {:.0} lines/s (script alone {:.0} ms = {:.0} lines/s)",
        el.as_secs_f64() * 1e3,
        items as f64 / el.as_secs_f64(),
        floor.as_secs_f64() * 1e3,
        STREAM_LINES as f64 / floor.as_secs_f64(),
    );
    Ok(())
}

async fn turn_start(kind: ProviderKind, home: &Path) -> anyhow::Result<()> {
    let mut s = ProviderSession::new(config(kind, home));
    let mut samples = Vec::new();
    for i in 0..21 {
        let t = Instant::now();
        let mut turn = s
            .start_turn(TurnInput {
                prompt: format!("hello {i}"),
                ..TurnInput::default()
            })
            .await?;
        let first = turn.events.recv().await;
        let el = t.elapsed();
        anyhow::ensure!(first.is_some(), "{kind}: no event");
        while turn.events.recv().await.is_some() {}
        // The first Claude turn spawns the process; later ones reuse it.
        if i > 0 {
            samples.push(el);
        }
    }
    s.shutdown().await;
    let (p50, p99, max) = crate::percentiles(&mut samples);
    println!(
        "turn start {kind} (start_turn → first event, {}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        if kind == ProviderKind::Claude {
            "warm process"
        } else {
            "process per turn"
        },
        ms(p50),
        ms(p99),
        ms(max)
    );
    Ok(())
}
