//! Event bus benchmarks (backbone issue):
//! - fan-out: 1,000 SSE subscribers, 1,000 events/s for 10 s; every
//!   subscriber must receive every event; publish→receive latency p50/p99;
//! - replay of a 100,000-event journal to one client;
//! - idle RSS and process start → first 200 from `/health`, with an empty
//!   journal and with 100,000 events;
//! - `GET /health` and `GET /status` throughput and p99 with 64 connections.
//! - `metrics`: `/health` with and without the per-request HTTP metrics
//!   (engine CPU per request and throughput, alternated runs).
//!
//! The engine always runs in its own process: the release binary, or for
//! fan-out (which needs a publisher inside the engine) this bench binary
//! re-executed as `__engine-host`, which runs the same library code
//! (`AppState::build` + `server::run`) plus a timed publisher.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Stdio;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use replicas_engine::events::{EventBus, EventKind};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::engine::{Engine, SECRET};
use crate::{ms, percentiles};

pub async fn run() -> anyhow::Result<()> {
    println!("== events");
    // BENCH_EVENTS=fanout (or startup,replay,requests,metrics) runs a subset.
    let only = std::env::var("BENCH_EVENTS").unwrap_or_default();
    let want = |name: &str| only.is_empty() || only.split(',').any(|o| o == name);
    if want("startup") {
        startup_and_rss().await?;
    }
    if want("replay") {
        replay().await?;
    }
    if want("requests") {
        request_throughput().await?;
    }
    if want("metrics") {
        metrics_overhead().await?;
    }
    if want("fanout") {
        // BENCH_FANOUT=subscribers,rate,seconds overrides 1000,1000,10.
        let f: Vec<u64> = std::env::var("BENCH_FANOUT")
            .unwrap_or_else(|_| "1000,1000,10".into())
            .split(',')
            .filter_map(|v| v.parse().ok())
            .collect();
        anyhow::ensure!(
            f.len() == 3,
            "BENCH_FANOUT must be subscribers,rate,seconds"
        );
        fanout(f[0] as usize, f[1], f[2]).await?;
    }
    Ok(())
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// A temp home whose journal already holds `n` events.
pub(crate) fn home_with_events(n: usize) -> anyhow::Result<tempfile::TempDir> {
    let home = tempfile::tempdir()?;
    std::fs::create_dir_all(home.path().join("workspaces"))?;
    if n > 0 {
        let events_file = replicas_engine::config::Paths::new(home.path()).events_file;
        let bus = EventBus::open(&events_file, 1 << 40)?;
        for i in 0..n {
            bus.publish(
                Some("c_0123456789abcdef"),
                EventKind::Error {
                    code: "bench".into(),
                    message: format!("journal filler event number {i} with a little text"),
                    source: "bench".into(),
                },
            );
        }
    }
    Ok(home)
}

/// Start the engine on `home` and time spawn → first 200 from `/health`.
pub(crate) async fn start_timed(home: &Path) -> anyhow::Result<(Engine, Duration)> {
    let engine = Engine::start(
        home,
        &[("REPLICAS_EVENTS_MAX_BYTES", OsStr::new("1099511627776"))],
    )
    .await?;
    while !matches!(raw_get(&engine.addr, "/health").await, Ok((200, _))) {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let took = engine.spawned_at.elapsed();
    Ok((engine, took))
}

/// One HTTP/1.1 GET on a fresh connection; returns (status, body).
async fn raw_get(addr: &str, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nX-Replicas-Engine-Secret: {SECRET}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let status = std::str::from_utf8(buf.get(9..12).unwrap_or_default())?.parse()?;
    Ok((status, buf))
}

async fn startup_and_rss() -> anyhow::Result<()> {
    for n in [0usize, 100_000] {
        let home = home_with_events(n)?;
        let mut times = Vec::new();
        let mut rss = 0.0;
        for run in 0..5 {
            let (engine, took) = start_timed(home.path()).await?;
            times.push(took);
            if run == 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                rss = engine.rss_kb();
            }
            engine.stop().await;
        }
        let (p50, _, max) = percentiles(&mut times);
        println!(
            "startup to first /health 200 with {n} events, warm page cache (binary and journal read by the previous run): median {:.1} ms (max {:.1} ms over 5 runs); idle RSS {:.1} MB",
            ms(p50),
            ms(max),
            rss / 1024.0
        );
    }
    Ok(())
}

async fn replay() -> anyhow::Result<()> {
    let n = 100_000usize;
    let home = home_with_events(n)?;
    let (engine, _) = start_timed(home.path()).await?;
    let last = n as u64 + 1; // + engine.ready
    let mut runs = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let mut s = TcpStream::connect(&engine.addr).await?;
        s.write_all(
            format!(
                "GET /events?since=0 HTTP/1.1\r\nHost: x\r\nX-Replicas-Engine-Secret: {SECRET}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        let needle = format!("id: {last}\n");
        let mut buf = vec![0u8; 1 << 20];
        let mut tail: Vec<u8> = Vec::new();
        let mut bytes = 0usize;
        loop {
            let k = s.read(&mut buf).await?;
            anyhow::ensure!(k > 0, "replay stream closed early");
            bytes += k;
            tail.extend_from_slice(&buf[..k]);
            if memchr::memmem::find(&tail, needle.as_bytes()).is_some() {
                break;
            }
            let keep = tail.len().saturating_sub(64);
            tail.drain(..keep);
        }
        let took = started.elapsed();
        runs.push(took);
        println!(
            "replay of {n} events ({:.1} MB of SSE) to one client: {:.0} ms",
            bytes as f64 / 1e6,
            ms(took)
        );
    }
    engine.stop().await;
    Ok(())
}

async fn request_throughput() -> anyhow::Result<()> {
    let home = home_with_events(0)?;
    let (engine, _) = start_timed(home.path()).await?;
    for path in ["/health", "/status"] {
        let conns = 64;
        let dur = Duration::from_secs(5);
        let (mut all, failed) = hammer(&engine.addr, path, conns, dur).await?;
        let count = all.len();
        let (p50, p99, max) = percentiles(&mut all);
        println!(
            "GET {path} with {conns} connections: {:.0} req/s ok, {failed} failed of {} ({:.2}% errors), p50 {:.2} ms, p99 {:.2} ms ({count} samples), max {:.1} ms",
            count as f64 / dur.as_secs_f64(),
            count + failed,
            100.0 * failed as f64 / (count + failed).max(1) as f64,
            ms(p50),
            ms(p99),
            ms(max)
        );
    }
    engine.stop().await;
    Ok(())
}

/// `conns` connections GET `path` in a loop for `dur`: the latencies of the
/// successful requests, and how many failed (an error status, a connection
/// error, a body cut short) — counted apart, never dropped.
async fn hammer(
    addr: &str,
    path: &str,
    conns: usize,
    dur: Duration,
) -> anyhow::Result<(Vec<Duration>, usize)> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(conns)
        .build()?;
    let url = format!("http://{addr}{path}");
    let deadline = Instant::now() + dur;
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let (mut lat, mut failed) = (Vec::new(), 0usize);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let res = client
                        .get(&url)
                        .header("x-replicas-engine-secret", SECRET)
                        .send()
                        .await;
                    match res {
                        Ok(res) => {
                            let ok = res.status().is_success();
                            if ok && res.bytes().await.is_ok() {
                                lat.push(t.elapsed());
                            } else {
                                failed += 1;
                            }
                        }
                        Err(_) => failed += 1,
                    }
                }
                (lat, failed)
            })
        })
        .collect();
    let (mut all, mut failed) = (Vec::new(), 0usize);
    for t in tasks {
        let (lat, f) = t.await?;
        all.extend(lat);
        failed += f;
    }
    Ok((all, failed))
}

/// What recording the HTTP metrics costs `/health`: the engine with
/// `REPLICAS_HTTP_METRICS=1` and `=0`, alternated over three rounds (the
/// machine's load drifts), 64 connections for 4 s each. Engine CPU per
/// request is the steadier figure; req/s is shown too.
async fn metrics_overhead() -> anyhow::Result<()> {
    let mut figures: [(Vec<f64>, Vec<f64>); 2] = Default::default();
    for _round in 0..3 {
        for (i, flag) in ["1", "0"].into_iter().enumerate() {
            let home = home_with_events(0)?;
            let engine =
                Engine::start(home.path(), &[("REPLICAS_HTTP_METRICS", OsStr::new(flag))]).await?;
            while !matches!(raw_get(&engine.addr, "/health").await, Ok((200, _))) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            hammer(&engine.addr, "/health", 64, Duration::from_millis(500)).await?;
            let cpu = engine.cpu_secs();
            let dur = Duration::from_secs(4);
            let n = hammer(&engine.addr, "/health", 64, dur).await?.0.len() as f64;
            let cpu = engine.cpu_secs() - cpu;
            figures[i].0.push(n / dur.as_secs_f64());
            figures[i].1.push(cpu * 1e6 / n);
            engine.stop().await;
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [(mut on_rps, mut on_cpu), (mut off_rps, mut off_cpu)] = figures;
    let (on_rps, on_cpu, off_rps, off_cpu) = (
        median(&mut on_rps),
        median(&mut on_cpu),
        median(&mut off_rps),
        median(&mut off_cpu),
    );
    println!(
        "GET /health with HTTP metrics: {on_rps:.0} req/s, {on_cpu:.1} µs engine CPU/request; without: {off_rps:.0} req/s, {off_cpu:.1} µs; CPU ratio with/without {:.3}, throughput ratio {:.3} (medians of 3 alternated runs)",
        on_cpu / off_cpu,
        on_rps / off_rps,
    );
    // In-process: the recording call alone.
    let n = 1_000_000u32;
    let t = Instant::now();
    for _ in 0..n {
        replicas_engine::metrics::HttpSeries::new("GET", Some("/health"), 200)
            .record(Duration::from_micros(50));
    }
    println!(
        "metrics::HttpSeries::new + record alone: {:.0} ns per call",
        t.elapsed().as_nanos() as f64 / n as f64
    );
    Ok(())
}

/// Child mode: the engine library plus a publisher, in its own process.
/// Prints `LISTENING <addr>`, then on a `GO <rate> <secs>` line on stdin
/// publishes `rate` events/s for `secs` seconds, each carrying its publish
/// time, then prints `DONE <last id>`.
pub async fn engine_host() -> anyhow::Result<()> {
    let home = tempfile::tempdir()?;
    let mut config = replicas_engine::config::Config::for_home(home.path(), SECRET);
    config.host = [127, 0, 0, 1].into();
    // The fan-out measures capacity beyond the default caps (256 streams,
    // 1,024 connections).
    config.max_subscribers = 4096;
    config.max_connections = 4096;
    // REPLICAS_SSE_COALESCE_MS from the bench's environment, to compare.
    if let Some(ms) = std::env::var("REPLICAS_SSE_COALESCE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.sse_coalesce = Duration::from_millis(ms);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let state = replicas_engine::app::AppState::build(config, Default::default()).await?;
    println!("LISTENING {}", listener.local_addr()?);
    tokio::spawn(replicas_engine::server::run(state.clone(), listener));
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = stdin.next_line().await? {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if let ["GO", rate, secs] = parts.as_slice() {
            let rate: u64 = rate.parse()?;
            let secs: u64 = secs.parse()?;
            let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut last = 0;
            for _ in 0..rate * secs {
                tick.tick().await;
                last = state
                    .bus
                    .publish(
                        None,
                        EventKind::Error {
                            code: "bench".into(),
                            message: now_nanos().to_string(),
                            source: "bench".into(),
                        },
                    )
                    .id;
            }
            println!("DONE {last}");
        }
    }
    Ok(())
}

/// Resident memory of `pid` now, in kB (0 if it is gone).
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) process `pid` used so far.
fn cpu_secs(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let f: Vec<&str> = stat
                .get(stat.rfind(')')? + 2..)?
                .split_whitespace()
                .collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// Pin every thread of process `pid` to `cpus` (a `taskset` list); a no-op
/// on a machine with one core.
async fn pin_all(pid: u32, cpus: &str) {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return;
    }
    let _ = tokio::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .await;
}

/// Fan-out to `subscribers` SSE clients. The engine host is pinned to cpu0
/// and this process (the clients) to cpu1, so the clients' own work is not
/// what the latency measures. RSS of the engine: idle before the clients
/// connect, the peak while they stream (sampled every 50 ms), and 10 s
/// after they all left (target: <= 2x idle).
async fn fanout(subscribers: usize, rate: u64, secs: u64) -> anyhow::Result<()> {
    // Started pinned (not pinned afterwards), so its runtime sizes itself
    // to the one core it has, as the engine's does under `taskset`.
    let two_cores = std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    let mut host = if two_cores {
        let mut c = tokio::process::Command::new("taskset");
        c.args(["-c", "0"]).arg(std::env::current_exe()?);
        c
    } else {
        tokio::process::Command::new(std::env::current_exe()?)
    };
    let mut host = host
        .arg("__engine-host")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let host_pid = host.id().context("engine host pid")?;
    let me = std::process::id();
    pin_all(me, "1").await;
    let mut out = BufReader::new(host.stdout.take().unwrap()).lines();
    let mut stdin = host.stdin.take().unwrap();
    let addr = loop {
        let line = out.next_line().await?.context("engine host exited")?;
        if let Some(a) = line.strip_prefix("LISTENING ") {
            break a.to_owned();
        }
    };
    // Let start-up work (repo discovery, status watch) settle first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = rss_kb(host_pid);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(idle_rss));
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(rss_kb(host_pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let total = (rate * secs) as usize;
    // Every subscriber starts after engine.ready (id 1): expects ids 2..=total+1.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(subscribers);
    let mut clients = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let addr = addr.clone();
        let ready_tx = ready_tx.clone();
        clients.push(tokio::spawn(async move {
            subscriber(addr, total, ready_tx).await
        }));
    }
    for _ in 0..subscribers {
        ready_rx
            .recv()
            .await
            .context("subscriber failed to connect")?;
    }
    let started = Instant::now();
    let cpu_before = (cpu_secs(host_pid), cpu_secs(me));
    stdin
        .write_all(format!("GO {rate} {secs}\n").as_bytes())
        .await?;
    let done = out.next_line().await?.unwrap_or_default();
    let publish_secs = started.elapsed().as_secs_f64();
    let mut all: Vec<Duration> = Vec::with_capacity(subscribers * total);
    let mut complete = 0;
    for c in clients {
        let (lat, ok) = c.await??;
        complete += usize::from(ok);
        all.extend(lat);
    }
    // Every client has closed its connection here.
    let left = Instant::now();
    let wall = started.elapsed().as_secs_f64();
    let (engine_cpu, clients_cpu) = (
        cpu_secs(host_pid) - cpu_before.0,
        cpu_secs(me) - cpu_before.1,
    );
    let received = all.len();
    let (p50, p99, max) = percentiles(&mut all);
    drop(all);
    println!(
        "fan-out: {subscribers} subscribers x {total} events ({rate}/s for {secs} s, published in {publish_secs:.2} s, {done}): \
         {complete}/{subscribers} received every event in order ({received} deliveries); \
         publish→receive p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms (target p99 <= 25 ms); \
         CPU over the {wall:.1} s: engine {engine_cpu:.1} s, clients {clients_cpu:.1} s \
         (a client near 100 % of its core would be the bottleneck)",
        ms(p50),
        ms(p99),
        ms(max)
    );
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(left.elapsed())).await;
    sampler.abort();
    let after = rss_kb(host_pid);
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "fan-out: engine RSS idle {:.1} MB, peak {:.1} MB, 10 s after the subscribers left {:.1} MB = {:.2}x idle (target <= 2x)",
        idle_rss as f64 / 1024.0,
        peak as f64 / 1024.0,
        after as f64 / 1024.0,
        after as f64 / idle_rss.max(1) as f64,
    );
    pin_all(
        me,
        &format!(
            "0-{}",
            std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
        ),
    )
    .await;
    drop(stdin);
    let _ = host.kill().await;
    Ok(())
}

/// One SSE subscriber on a raw socket: checks ids arrive contiguously and
/// records publish→receive latency from the payload's timestamp.
async fn subscriber(
    addr: String,
    total: usize,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<(Vec<Duration>, bool)> {
    let mut s = TcpStream::connect(&addr).await?;
    s.write_all(
        format!("GET /events HTTP/1.1\r\nHost: x\r\nX-Replicas-Engine-Secret: {SECRET}\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut lat = Vec::with_capacity(total);
    let mut expect = 2u64;
    let mut in_order = true;
    let mut signalled = false;
    let mut headers_done = false;
    let finder = memchr::memmem::Finder::new(b"\"message\":\"");
    while lat.len() < total {
        let k = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await??;
        if k == 0 {
            break;
        }
        if !signalled {
            // Headers arrived: the subscription is registered.
            signalled = true;
            let _ = ready.send(()).await;
        }
        pending.extend_from_slice(&buf[..k]);
        if !headers_done {
            // Skip the response headers (they contain `x-request-id: `).
            match memchr::memmem::find(&pending, b"\r\n\r\n") {
                Some(end) => {
                    pending.drain(..end + 4);
                    headers_done = true;
                }
                None => continue,
            }
        }
        let now = now_nanos();
        let mut consumed = 0;
        while let Some(i) = memchr::memmem::find(&pending[consumed..], b"\n\n") {
            let frame = &pending[consumed..consumed + i];
            consumed += i + 2;
            // Frames arrive inside HTTP chunked encoding: find the id line.
            let Some(at) = memchr::memmem::find(frame, b"id: ") else {
                continue;
            };
            let id_line = &frame[at + 4..];
            let id_end = memchr::memchr(b'\n', id_line).unwrap_or(id_line.len());
            let id: u64 = std::str::from_utf8(&id_line[..id_end])?.parse()?;
            in_order &= id == expect;
            expect = id + 1;
            if let Some(p) = finder.find(frame) {
                let rest = &frame[p + 11..];
                let end = memchr::memchr(b'"', rest).unwrap_or(rest.len());
                let sent: u128 = std::str::from_utf8(&rest[..end])?.parse()?;
                lat.push(Duration::from_nanos(now.saturating_sub(sent) as u64));
            }
        }
        pending.drain(..consumed);
    }
    let ok = in_order && lat.len() == total;
    Ok((lat, ok))
}
