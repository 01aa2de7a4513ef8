//! Event bus benchmarks (issue: backbone): SSE fan-out, journal replay,
//! startup time, idle RSS, /health and /status throughput.

pub async fn run() -> anyhow::Result<()> {
    println!("events: not yet measured");
    Ok(())
}
