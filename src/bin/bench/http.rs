//! Request throughput of the engine's cheapest routes against a bare
//! one-route axum server (same axum version) started by this bench in the
//! same run, reported as ratios. Server and load generator run in separate
//! processes pinned to separate cores (`taskset`: server on cpu0, load on
//! cpu1) when there are at least two; the load generator is this binary
//! (`__load`), a single-threaded keep-alive HTTP/1.1 client with 64
//! connections, so no external tool is needed.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::engine::{Engine, SECRET};

const CONNECTIONS: usize = 64;
const SECONDS: u64 = 5;
/// Chats created (issue 10: the cost of a chat at 10,000 against 100).
const CHATS: usize = 10_000;
/// The small engine of the alternated POST figures.
const FEW_CHATS: usize = 100;
/// Rounds of the alternated POST figures (one of each request per engine).
const ROUNDS: usize = 300;
/// The agent CLI of the POST-message figures: a real program that exits at
/// once, so a message is accepted (`sent`), its turn spawns a process like
/// any turn (the cost that grew with the engine's memory while spawning
/// forked) and fails when the CLI ends without an answer. What is timed is
/// the engine accepting the message (validate, commit to `chats.db`,
/// answer) with the turn's spawn beside it on the same core.
const QUICK_CLI: &str = "/bin/true";

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn pinned(cpu: &str, program: &std::path::Path) -> tokio::process::Command {
    if cpus() >= 2 {
        let mut c = tokio::process::Command::new("taskset");
        c.arg("-c").arg(cpu).arg(program);
        c
    } else {
        tokio::process::Command::new(program)
    }
}

/// One load run's result.
struct Load {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

/// Run the load generator (pinned to cpu1) against `addr` `path`.
async fn load(addr: &str, path: &str, secret: bool) -> anyhow::Result<Load> {
    let me = std::env::current_exe()?;
    let out = pinned("1", &me)
        .args([
            "__load",
            addr,
            path,
            &SECONDS.to_string(),
            &CONNECTIONS.to_string(),
            if secret { SECRET } else { "" },
        ])
        .stderr(Stdio::inherit())
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    anyhow::ensure!(nums.len() == 3, "load generator said {text:?}");
    Ok(Load {
        rps: nums[0],
        p50: Duration::from_secs_f64(nums[1] / 1e6),
        p99: Duration::from_secs_f64(nums[2] / 1e6),
    })
}

pub async fn run() -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    println!(
        "http: {} cores; server on cpu0, load on cpu1 ({CONNECTIONS} keep-alive connections, {SECONDS} s per route)",
        cpus()
    );
    // The reference: bare axum, one route, pinned like the engine.
    let mut bare = pinned("0", &me)
        .arg("__bare-axum")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut line = String::new();
    BufReader::new(bare.stdout.take().context("bare stdout")?)
        .read_line(&mut line)
        .await?;
    let bare_addr = line.trim().to_owned();

    // A home with a 100,000-event journal: the chats below are added to
    // it, and the engine is restarted on it at the end (start-up target).
    let home = crate::events::home_with_events(100_000)?;
    let engine = start_big(home.path()).await?;
    // BENCH_HTTP=requests: only the request figures (/health, /status);
    // BENCH_HTTP=posts: only the POST medians at 10,000 vs 100 chats.
    let only = std::env::var("BENCH_HTTP").unwrap_or_default();
    let (only_requests, only_posts) = (only == "requests", only == "posts");
    if !only_posts {
        versus(&bare_addr, &engine.addr, "GET /health", "/health", false).await?;
    }
    if !only_requests && !only_posts {
        metrics_cost().await?;
    }
    // 2,000 chats for /status (does it walk them?), then up to 10,000 for
    // the cost of one more chat.
    let started = Instant::now();
    let mut took = Vec::with_capacity(CHATS);
    let mut ids = Vec::with_capacity(CHATS);
    for n in 0..CHATS {
        let t = Instant::now();
        ids.push(create_chat(&engine).await?);
        took.push(t.elapsed());
        if n + 1 == 2000 && !only_posts {
            versus(
                &bare_addr,
                &engine.addr,
                "GET /status (2,000 chats)",
                "/status",
                true,
            )
            .await?;
            let page = load(&engine.addr, "/chats?limit=50", true).await?;
            println!(
                "http: engine GET /chats?limit=50 (2,000 chats): {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
                page.rps,
                crate::ms(page.p50),
                crate::ms(page.p99)
            );
            if only_requests {
                engine.stop().await;
                let _ = bare.kill().await;
                return Ok(());
            }
        }
    }
    let (first, _, _) = crate::percentiles(&mut took[..100].to_vec());
    let (last, _, _) = crate::percentiles(&mut took[CHATS - 100..].to_vec());
    println!(
        "http: created {CHATS} chats in {:.1} s; POST /chats median {:.2} ms at 0-100 chats, {:.2} ms at {}-{CHATS} ({:.2}x, target <= 1.2x)",
        started.elapsed().as_secs_f64(),
        crate::ms(first),
        crate::ms(last),
        CHATS - 100,
        last.as_secs_f64() / first.as_secs_f64(),
    );
    post_medians(&engine, &ids, false).await?;
    engine.stop().await;
    let _ = bare.kill().await;
    // Again with every message queued: a start hook that never ends holds
    // the turns back, so no turn (no process spawn) runs beside the POSTs.
    let hook = hanging_start_hook(home.path())?;
    let engine = start_big(home.path()).await?;
    post_medians(&engine, &ids, true).await?;
    engine.stop().await;
    std::fs::remove_dir_all(hook)?;
    if only_posts {
        return Ok(());
    }
    let _ = std::fs::remove_file(home.path().join(".replicas/engine-state.json"));
    let mut times = Vec::new();
    for _ in 0..5 {
        let (engine, took) = crate::events::start_timed(home.path()).await?;
        times.push(took);
        engine.stop().await;
    }
    let (p50, _, max) = crate::percentiles(&mut times);
    println!(
        "http: start to first /health 200 with {CHATS} chats and 100,000 events, warm page cache: median {:.1} ms (max {:.1} ms over 5 runs; target <= 100 ms)",
        crate::ms(p50),
        crate::ms(max),
    );
    Ok(())
}

/// Rounds of bare axum against the engine, alternated (the machine's load
/// drifts between runs minutes apart: the ratio is taken from runs seconds
/// apart).
const VERSUS_ROUNDS: usize = 3;

/// `path` on the engine against `/` on the bare server, [`VERSUS_ROUNDS`] times
/// each, alternated; prints every round and the ratios of the medians.
async fn versus(
    bare: &str,
    engine: &str,
    name: &str,
    path: &str,
    secret: bool,
) -> anyhow::Result<()> {
    let (mut b, mut e) = (Vec::new(), Vec::new());
    for round in 0..VERSUS_ROUNDS {
        let r = load(bare, "/", false).await?;
        let l = load(engine, path, secret).await?;
        println!(
            "http: round {}: bare {:.0} req/s p99 {:.2} ms; engine {name} {:.0} req/s p99 {:.2} ms",
            round + 1,
            r.rps,
            crate::ms(r.p99),
            l.rps,
            crate::ms(l.p99)
        );
        b.push(r);
        e.push(l);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let rps = |v: &[Load]| v.iter().map(|l| l.rps).collect::<Vec<_>>();
    let p99 = |v: &[Load]| v.iter().map(|l| l.p99.as_secs_f64()).collect::<Vec<_>>();
    let (b_rps, e_rps) = (median(&mut rps(&b)), median(&mut rps(&e)));
    let (b_p99, e_p99) = (median(&mut p99(&b)), median(&mut p99(&e)));
    println!(
        "http: engine {name}: median {e_rps:.0} req/s vs bare {b_rps:.0} = {:.2}x (target >= 0.70x); p99 {:.2} ms vs {:.2} ms = {:.2}x (target <= 1.5x)",
        e_rps / b_rps,
        e_p99 * 1000.0,
        b_p99 * 1000.0,
        e_p99 / b_p99,
    );
    Ok(())
}

/// The engine of the 10,000 chats, on `home` (a journal that may grow past
/// the default bound; [`QUICK_CLI`] as its claude).
async fn start_big(home: &std::path::Path) -> anyhow::Result<Engine> {
    Engine::start_on(
        home,
        &[
            (
                "REPLICAS_EVENTS_MAX_BYTES",
                std::ffi::OsStr::new("1099511627776"),
            ),
            ("CLAUDE_BIN", std::ffi::OsStr::new(QUICK_CLI)),
        ],
        Some("0"),
    )
    .await
}

/// `POST {path}` with `body` on `engine`, expecting `status`; the answer.
async fn post(
    engine: &Engine,
    path: &str,
    body: serde_json::Value,
    status: u16,
) -> anyhow::Result<serde_json::Value> {
    let res = engine
        .client
        .post(format!("{}{path}", engine.base))
        .json(&body)
        .send()
        .await?;
    anyhow::ensure!(res.status() == status, "POST {path}: {}", res.status());
    Ok(res.json().await?)
}

/// `POST /chats`; the new chat's id.
async fn create_chat(engine: &Engine) -> anyhow::Result<String> {
    let chat = post(
        engine,
        "/chats",
        serde_json::json!({"provider": "claude"}),
        201,
    )
    .await?;
    chat["id"]
        .as_str()
        .map(str::to_owned)
        .context("POST /chats answered no id")
}

/// `POST /chats/:id/messages`, expecting the answer `status` (`sent`,
/// `queued`).
async fn send_message(engine: &Engine, chat: &str, status: &str) -> anyhow::Result<()> {
    let body = serde_json::json!({"message": "bench message"});
    let accepted = post(engine, &format!("/chats/{chat}/messages"), body, 202).await?;
    anyhow::ensure!(
        accepted["status"] == status,
        "POST message: {accepted} (expected {status})"
    );
    Ok(())
}

/// A repo under `home`'s workspaces whose start hook runs for an hour, so
/// the engine started next holds every turn back (messages are `queued`).
/// The engine's record of earlier start hooks is removed so they run.
fn hanging_start_hook(home: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let repo = home.join("workspaces/bench-hanging-hook");
    std::fs::create_dir_all(&repo)?;
    let ok = std::process::Command::new("git")
        .args(["init", "-q"])
        .current_dir(&repo)
        .status()?
        .success();
    anyhow::ensure!(ok, "git init failed");
    std::fs::write(
        repo.join("replicas.yaml"),
        "startHook:\n  commands: [\"sleep 3600\"]\n  timeout: 3600000\n",
    )?;
    let _ = std::fs::remove_file(home.join(".replicas/engine-state.json"));
    Ok(repo)
}

/// Issue 10: `POST /chats` and `POST /chats/:id/messages` at 10,000 chats
/// against 100. A second engine with [`FEW_CHATS`] chats runs beside the
/// big one (both pinned to cpu0) and the requests alternate between them,
/// round by round (who goes first alternates too), so the machine's drift
/// hits both sides alike. Messages go round the first [`FEW_CHATS`] chats
/// of each engine, each to a chat whose previous turn is long over, so
/// every one is `sent`; with `queued` the big
/// engine runs a start hook that never ends (so does the small one) and
/// every message waits in its chat's queue: the accept path alone.
async fn post_medians(big: &Engine, big_ids: &[String], queued: bool) -> anyhow::Result<()> {
    let home = tempfile::tempdir()?;
    if queued {
        hanging_start_hook(home.path())?;
    }
    let small = Engine::start_on(
        home.path(),
        &[("CLAUDE_BIN", std::ffi::OsStr::new(QUICK_CLI))],
        Some("0"),
    )
    .await?;
    let mut small_ids = Vec::with_capacity(FEW_CHATS);
    for _ in 0..FEW_CHATS {
        small_ids.push(create_chat(&small).await?);
    }
    let (mut create, mut message) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let engines = [(&small, &small_ids[..]), (big, big_ids)];
    for round in 0..ROUNDS {
        for k in 0..2 {
            let side = (round + k) % 2;
            let (engine, ids) = engines[side];
            let t = Instant::now();
            create_chat(engine).await?;
            create[side].push(t.elapsed());
            // The same 100 chats on both sides, so a chat's first turn
            // (its history file is created) weighs alike on both.
            let chat = &ids[round % FEW_CHATS];
            let t = Instant::now();
            send_message(engine, chat, if queued { "queued" } else { "sent" }).await?;
            message[side].push(t.elapsed());
        }
    }
    small.stop().await;
    let how = if queued {
        "queued behind a start hook"
    } else {
        "sent: the turn spawns a CLI that exits at once"
    };
    for (what, [few, many]) in [
        ("POST /chats", &mut create),
        ("POST /chats/:id/messages", &mut message),
    ] {
        let (few, _, _) = crate::percentiles(few);
        let (many, _, _) = crate::percentiles(many);
        println!(
            "http: {what} median, alternated ({ROUNDS} each; messages {how}): {:.2} ms at {FEW_CHATS} chats, {:.2} ms at {CHATS} ({:.2}x, target <= 1.2x)",
            crate::ms(few),
            crate::ms(many),
            many.as_secs_f64() / few.as_secs_f64(),
        );
    }
    Ok(())
}

/// `__bare-axum`: the reference server, one route answering a short body.
pub async fn bare_axum() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    axum::serve(listener, app).await?;
    Ok(())
}

/// `__load ADDR PATH SECONDS CONNECTIONS SECRET`: keep-alive GETs on
/// CONNECTIONS connections for SECONDS, single-threaded; prints
/// `req_per_s p50_us p99_us`.
pub fn load_main(args: &[String]) -> anyhow::Result<()> {
    let [addr, path, secs, conns, secret] = args else {
        anyhow::bail!("usage: __load ADDR PATH SECONDS CONNECTIONS SECRET");
    };
    let secs: u64 = secs.parse()?;
    let conns: usize = conns.parse()?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    if !secret.is_empty() {
        req.push_str(&format!("X-Replicas-Engine-Secret: {secret}\r\n"));
    }
    req.push_str("\r\n");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let req = std::sync::Arc::new(req.into_bytes());
        // Warm-up second not counted.
        let warm = Instant::now() + Duration::from_secs(1);
        let end = warm + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let (addr, req) = (addr.clone(), req.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut stream = tokio::net::TcpStream::connect(&addr).await?;
                stream.set_nodelay(true)?;
                let mut buf = Vec::with_capacity(64 * 1024);
                loop {
                    let t = Instant::now();
                    if t >= end {
                        break;
                    }
                    stream.write_all(&req).await?;
                    read_response(&mut stream, &mut buf).await?;
                    if t >= warm {
                        lat.push(t.elapsed());
                    }
                }
                anyhow::Ok(lat)
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        let n = all.len();
        let (p50, p99, _) = crate::percentiles(&mut all);
        println!(
            "{:.0} {:.0} {:.0}",
            n as f64 / secs as f64,
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
        anyhow::Ok(())
    })
}

/// Read one response (headers + Content-Length body) off a keep-alive
/// stream; `buf` keeps any bytes beyond it.
async fn read_response(
    stream: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> anyhow::Result<()> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end])?;
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .context("response without content-length")?;
            let total = end + 4 + len;
            while buf.len() < total {
                read_more(stream, buf).await?;
            }
            buf.drain(..total);
            return Ok(());
        }
        read_more(stream, buf).await?;
    }
}

async fn read_more(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await?;
    anyhow::ensure!(n > 0, "connection closed");
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// What the per-request metrics cost `/health` (issue 12: at most 5 %):
/// fresh engines with `REPLICAS_HTTP_METRICS=1` and `=0`, pinned like the
/// rest, alternated twice (the machine's load drifts); the ratio of the
/// better run of each.
async fn metrics_cost() -> anyhow::Result<()> {
    let (mut with, mut without) = (0f64, 0f64);
    for _ in 0..2 {
        for on in ["1", "0"] {
            let home = tempfile::tempdir()?;
            let engine = Engine::start_on(
                home.path(),
                &[("REPLICAS_HTTP_METRICS", std::ffi::OsStr::new(on))],
                Some("0"),
            )
            .await?;
            let l = load(&engine.addr, "/health", false).await?;
            engine.stop().await;
            let best = if on == "1" { &mut with } else { &mut without };
            *best = best.max(l.rps);
        }
    }
    println!(
        "http: GET /health with per-request metrics {with:.0} req/s, without {without:.0} req/s: {:.3}x (target >= 0.95x)",
        with / without
    );
    Ok(())
}
