//! `replicas-engine`: parse the command line, set up logging, load and
//! validate the configuration, bind, run. Everything else lives in the
//! library so tests drive the same code.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use replicas_engine::app::{self, AppState};
use replicas_engine::config::{Config, ENV_HELP};
use tokio_util::sync::CancellationToken;

/// How long shutdown may take before the engine exits anyway.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(
    name = "replicas-engine",
    version,
    about = "The Replicas workspace daemon: drives Claude Code and Codex chats, streams events, reports repos and runs hooks over HTTP.",
    long_about = None,
    after_help = ENV_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API (the default).
    Serve,
    /// Run every repo's warmHook, print progress, exit non-zero if any command failed. Never starts the server.
    Warm,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A missing .env is normal; a malformed one is worth a line.
    if let Err(e) = dotenvy::dotenv() {
        if !e.not_found() {
            eprintln!("replicas-engine: ignoring .env: {e}");
        }
    }
    init_tracing();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            // One clear line naming the variable; journald shows it as is.
            eprintln!("replicas-engine: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("replicas-engine: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => runtime.block_on(serve(config)),
        Command::Warm => runtime.block_on(warm(config)),
    };
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "replicas-engine failed");
            eprintln!("replicas-engine: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // journald adds its own timestamps; plain text without colour reads best there.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let addr = SocketAddr::new(config.host, config.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let state = AppState::build(config, shutdown.clone()).await?;
    // Tests and operators look for this exact line.
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "listening on http://{local}"
    );

    tokio::spawn(watch_signals(shutdown.clone()));
    let server = tokio::spawn(app::run(state.clone(), listener));
    shutdown.cancelled().await;
    tracing::info!("shutting down");
    match tokio::time::timeout(SHUTDOWN_DEADLINE, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(e),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => {
            tracing::warn!("connections still open after {SHUTDOWN_DEADLINE:?}; exiting anyway")
        }
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
    }
    shutdown.cancel();
}

async fn warm(_config: Config) -> anyhow::Result<ExitCode> {
    anyhow::bail!("warm hooks are not available in this build yet")
}
