//! Chat benchmarks (issue: chats), against the release engine with a fake
//! `codex` that stamps every line with the wall-clock time it was written:
//!
//! - engine overhead per provider line: 100,000 lines through read → parse
//!   → normalize → history + journal → SSE fan-out; lines/s with a producer
//!   that never waits (buffered), and line→SSE latency with one flushed
//!   line at a time;
//! - `POST /messages` → `chat.turn.started` latency on an idle chat;
//! - 20 chats streaming at once vs one chat (paced lines, 1 per ms per
//!   chat): line→SSE latency and POST → started.
//!
//! Needs `cargo build --release --bins` first.

use std::ffi::OsStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use replicas_engine::events::EventType;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::{engine_bin, Engine};
use crate::{ms, percentiles};

const LINES: usize = 100_000;
const STARTED_SAMPLES: usize = 40;
const CONCURRENT: usize = 20;
const PACED_LINES: usize = 1_000;

/// A codex stand-in: `exec [resume] --json ... -- [THREAD] PROMPT` where the
/// prompt is `BULK=N` (write N lines without waiting), `LINES=N` (flush each
/// line) or `PACED=N` (flush each, 1 ms apart). Each line's text is
/// `t=<unix ns when written>`.
const FAKE_CODEX: &str = r#"#!/usr/bin/env python3
import sys, time, uuid
mode, _, n = sys.argv[-1].partition("=")
n = int(n or 0)
out = sys.stdout
ns = time.time_ns
out.write('{"type":"thread.started","thread_id":"%s"}\n{"type":"turn.started"}\n' % uuid.uuid4())
out.flush()
line = '{"type":"item.completed","item":{"id":"item_%d","type":"agent_message","text":"t=%d"}}\n'
if mode == "BULK":
    for i in range(n):
        out.write(line % (i, ns()))
elif mode == "PACED":
    for i in range(n):
        out.write(line % (i, ns()))
        out.flush()
        time.sleep(0.001)
else:
    for i in range(n):
        out.write(line % (i, ns()))
        out.flush()
out.write('{"type":"turn.completed","usage":{"input_tokens":1,"cached_input_tokens":0,"output_tokens":%d}}\n' % n)
out.flush()
"#;

pub async fn run() -> anyhow::Result<()> {
    let bin = engine_bin()?;
    let home = tempfile::tempdir()?;
    let fake = home.path().join("bench-codex");
    std::fs::write(&fake, FAKE_CODEX)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755))?;
    }
    let engine = Engine::start(
        home.path(),
        &[
            ("CODEX_BIN", fake.as_os_str()),
            (
                "RUST_LOG",
                OsStr::new("warn,replicas_engine=info,replicas_engine::chats=warn,replicas_engine::providers=warn"),
            ),
        ],
    )
    .await?;
    println!(
        "chats: engine {} with a python fake codex (line text = write time)",
        bin.display()
    );

    // 1. Throughput and per-line latency.
    for mode in ["BULK", "LINES"] {
        let chat = engine.create_chat().await?;
        let mut sse = engine.sse(&chat).await?;
        let t0 = Instant::now();
        let cpu0 = engine.cpu_secs();
        engine.send(&chat, &format!("{mode}={LINES}")).await?;
        let run = collect_turn(&mut sse, LINES).await?;
        let total = t0.elapsed();
        let cpu = engine.cpu_secs() - cpu0;
        let span = run
            .last_delta
            .duration_since(run.first_delta)
            .unwrap_or_default();
        let (p50, p99, max) = percentiles(&mut run.latencies.clone());
        println!(
            "chats: {LINES} provider lines ({}): engine CPU {:.1} µs/line = {:.0} lines per CPU-second; wall {:.0} lines/s first→last delta, {:.0} lines/s POST→completed ({:.2} s); line→SSE p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            if mode == "BULK" { "producer never waits" } else { "one flushed line at a time" },
            cpu * 1e6 / LINES as f64,
            LINES as f64 / cpu,
            LINES as f64 / span.as_secs_f64(),
            LINES as f64 / total.as_secs_f64(),
            total.as_secs_f64(),
            ms(p50),
            ms(p99),
            ms(max),
        );
        if run.latencies.len() != LINES {
            println!(
                "chats: WARNING saw {} of {LINES} deltas",
                run.latencies.len()
            );
        }
    }

    // 2. POST → chat.turn.started on an idle chat.
    let chat = engine.create_chat().await?;
    let mut sse = engine.sse(&chat).await?;
    let mut started = Vec::new();
    for _ in 0..STARTED_SAMPLES {
        let t0 = Instant::now();
        engine.send(&chat, "LINES=0").await?;
        let run = collect_turn(&mut sse, 0).await?;
        started.push(run.started_at.duration_since(t0));
    }
    let (p50, _, max) = percentiles(&mut started);
    println!(
        "chats: POST message → chat.turn.started, idle chat, one at a time ({STARTED_SAMPLES} turns): p50 {:.2} ms, max {:.2} ms",
        ms(p50),
        ms(max)
    );

    // 2b. The stand-in CLI alone: spawn → its first line → exit, without
    // the engine, so the figures above and below can be split into what the
    // engine costs and what the python stand-in's own start-up costs.
    let mut first_line = Vec::new();
    let mut exited = Vec::new();
    for _ in 0..STARTED_SAMPLES {
        use tokio::io::AsyncBufReadExt;
        let t0 = Instant::now();
        let mut child = tokio::process::Command::new(&fake)
            .args(["exec", "--json", "LINES=0"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        lines.next_line().await?;
        first_line.push(t0.elapsed());
        while lines.next_line().await?.is_some() {}
        child.wait().await?;
        exited.push(t0.elapsed());
    }
    let (f50, _, fmax) = percentiles(&mut first_line);
    let (e50, _, emax) = percentiles(&mut exited);
    println!(
        "chats: the stand-in CLI alone (python fake codex, {STARTED_SAMPLES} runs): spawn → first line p50 {:.2} ms, max {:.2} ms; spawn → exit p50 {:.2} ms, max {:.2} ms",
        ms(f50),
        ms(fmax),
        ms(e50),
        ms(emax)
    );

    // 3. One chat vs 20 at once, paced lines.
    let single = concurrent(&engine, 1).await?;
    let many = concurrent(&engine, CONCURRENT).await?;
    for (n, (lat, start)) in [(1, single), (CONCURRENT, many)] {
        let (mut lat, mut start) = (lat, start);
        let (l50, l99, lmax) = percentiles(&mut lat);
        let (s50, _, smax) = percentiles(&mut start);
        println!(
            "chats: {n:>2} fresh chat(s) at once × {PACED_LINES} paced lines: line→SSE p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; POST→started ({n} samples) p50 {:.2} ms, max {:.2} ms",
            ms(l50),
            ms(l99),
            ms(lmax),
            ms(s50),
            ms(smax)
        );
    }
    engine.stop().await;
    Ok(())
}

/// Run one paced turn in each of `n` fresh chats at once; all line
/// latencies and each POST → started.
async fn concurrent(engine: &Engine, n: usize) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let mut chats = Vec::new();
    for _ in 0..n {
        let chat = engine.create_chat().await?;
        let sse = engine.sse(&chat).await?;
        chats.push((chat, sse));
    }
    let mut tasks = Vec::new();
    for (chat, mut sse) in chats {
        let engine = engine.handle();
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            engine.send(&chat, &format!("PACED={PACED_LINES}")).await?;
            let run = collect_turn(&mut sse, PACED_LINES).await?;
            anyhow::Ok((run.latencies, run.started_at.duration_since(t0)))
        }));
    }
    let (mut lat, mut start) = (Vec::new(), Vec::new());
    for t in tasks {
        let (l, s) = t.await??;
        lat.extend(l);
        start.push(s);
    }
    Ok((lat, start))
}

struct TurnRun {
    started_at: Instant,
    first_delta: SystemTime,
    last_delta: SystemTime,
    latencies: Vec<Duration>,
}

/// Read one turn's events: started, `expect` deltas, completed.
async fn collect_turn(
    sse: &mut mpsc::UnboundedReceiver<Frame>,
    expect: usize,
) -> anyhow::Result<TurnRun> {
    let mut run = TurnRun {
        started_at: Instant::now(),
        first_delta: UNIX_EPOCH,
        last_delta: UNIX_EPOCH,
        latencies: Vec::with_capacity(expect),
    };
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(120), sse.recv())
            .await
            .context("no event for 120 s")?
            .context("event stream ended")?;
        match EventType::from_name(&frame.event) {
            Some(EventType::TurnStarted) => run.started_at = frame.at,
            Some(EventType::TurnDelta) => {
                // Cheap: find the stamp without parsing the JSON.
                if let Some(i) = frame.data.find("\"t=") {
                    let digits: String = frame.data[i + 3..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    if let Ok(ns) = digits.parse::<u64>() {
                        let written = UNIX_EPOCH + Duration::from_nanos(ns);
                        if run.latencies.is_empty() {
                            run.first_delta = frame.wall;
                        }
                        run.last_delta = frame.wall;
                        run.latencies
                            .push(frame.wall.duration_since(written).unwrap_or_default());
                    }
                }
            }
            Some(EventType::TurnCompleted) => {
                let v: Value = serde_json::from_str(&frame.data)?;
                if v["payload"]["outcome"] != "completed" {
                    bail!("turn did not complete: {}", frame.data);
                }
                return Ok(run);
            }
            _ => {}
        }
    }
}

struct Frame {
    event: String,
    data: String,
    at: Instant,
    wall: SystemTime,
}

/// Chat calls on the shared bench engine.
impl Engine {
    async fn create_chat(&self) -> anyhow::Result<String> {
        let res = self
            .client
            .post(format!("{}/chats", self.base))
            .json(&json!({"provider": "codex"}))
            .send()
            .await?;
        let v: Value = res.error_for_status()?.json().await?;
        Ok(v["id"].as_str().context("chat id")?.to_owned())
    }

    async fn send(&self, chat: &str, text: &str) -> anyhow::Result<()> {
        self.client
            .post(format!("{}/chats/{chat}/messages", self.base))
            .json(&json!({ "message": text }))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// A live `chat.turn.*` stream of one chat, parsed on a task of its own.
    async fn sse(&self, chat: &str) -> anyhow::Result<mpsc::UnboundedReceiver<Frame>> {
        let res = self
            .client
            .get(format!(
                "{}/events?chatId={chat}&types=chat.turn.*",
                self.base
            ))
            .send()
            .await?
            .error_for_status()?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut body = res.bytes_stream();
            let mut buf: Vec<u8> = Vec::new();
            while let Some(Ok(chunk)) = body.next().await {
                let (at, wall) = (Instant::now(), SystemTime::now());
                buf.extend_from_slice(&chunk);
                let mut start = 0;
                while let Some(end) = memchr::memmem::find(&buf[start..], b"\n\n") {
                    let text = String::from_utf8_lossy(&buf[start..start + end]).into_owned();
                    start += end + 2;
                    let (mut event, mut data) = (String::new(), String::new());
                    for line in text.lines() {
                        if let Some(v) = line.strip_prefix("event: ") {
                            event = v.to_owned();
                        } else if let Some(v) = line.strip_prefix("data: ") {
                            data = v.to_owned();
                        }
                    }
                    if !event.is_empty()
                        && tx
                            .send(Frame {
                                event,
                                data,
                                at,
                                wall,
                            })
                            .is_err()
                    {
                        return;
                    }
                }
                buf.drain(..start);
            }
        });
        Ok(rx)
    }
}
