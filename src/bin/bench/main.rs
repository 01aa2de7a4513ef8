//! `replicas-bench`: benchmarks of the engine, run against the real release
//! binary with the load generator in the same run. One module per area; see
//! the README's "Benchmarks" section for the command and what each reports.
//!
//! Usage: `replicas-bench [area ...]` (default: all areas).

mod chats;
mod engine;
mod events;
mod http;
mod providers;
mod repos;
mod upstream;

use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The load generator runs its own single-threaded runtime.
    if args.first().map(String::as_str) == Some("__load") {
        return http::load_main(&args[1..]);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Vec<String>) -> anyhow::Result<()> {
    if args.first().map(String::as_str) == Some("__bare-axum") {
        return http::bare_axum().await;
    }
    if args.first().map(String::as_str) == Some("__engine-host") {
        return events::engine_host().await;
    }
    let all = args.is_empty() || args.iter().any(|a| a == "all");
    let want = |area: &str| all || args.iter().any(|a| a == area);
    if want("http") {
        http::run().await?;
    }
    if want("chats") {
        chats::run().await?;
    }
    if want("events") {
        events::run().await?;
    }
    if want("upstream") {
        upstream::run().await?;
    }
    if want("repos") {
        repos::run().await?;
    }
    if want("providers") {
        providers::run().await?;
    }
    Ok(())
}

/// p50/p99/max of a sample, for reports.
pub fn percentiles(samples: &mut [Duration]) -> (Duration, Duration, Duration) {
    if samples.is_empty() {
        return (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99), *samples.last().unwrap())
}

/// A duration in milliseconds, for reports.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
