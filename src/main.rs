//! `replicas-engine`: parse the command line, set up logging, load and
//! validate the configuration, bind, run. Everything else lives in the
//! library so tests drive the same code.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use replicas_engine::app::AppState;
use replicas_engine::config::{self, Config, ENV_HELP};
use replicas_engine::process;
use replicas_engine::server;
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
    /// Read `KEY=VALUE` lines from this file too (variables already in the
    /// environment win). No `.env` is read unless named here: under systemd
    /// the working directory is the workspace user's home, which agents can
    /// write.
    #[arg(long, value_name = "PATH", global = true)]
    env_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API (the default).
    Serve,
    /// Run every repo's warmHook, print progress, exit non-zero if any command failed. Never starts the server.
    Warm,
    /// Check this machine can run the engine: configuration, secret, port, workspace, tools, credentials, repo configs, state files. Exit 1 if an essential check fails.
    Doctor {
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // A child on its way to exec (see `process::command`): nothing else.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = process::run_spawn_shim(&args) {
        return ExitCode::from(code);
    }
    drop(args);
    // Agents run as our user: keep them out of /proc/<pid>/environ and mem.
    let dumpable = process::make_non_dumpable();
    let cli = Cli::parse();
    let mut vars: HashMap<String, String> = match &cli.env_file {
        Some(path) => match config::read_env_file(path) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("replicas-engine: cannot read --env-file {e}");
                return ExitCode::from(2);
            }
        },
        None => HashMap::new(),
    };
    vars.extend(std::env::vars());
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Doctor { json } = command {
        return replicas_engine::doctor::main(json, &vars);
    }
    init_tracing();
    process::use_spawn_shim();
    if let Err(e) = dumpable {
        tracing::warn!(error = %e, "could not make the engine non-dumpable");
    }
    // `warm` runs before the server is configured (pre-warming): no secret needed.
    let loaded = match command {
        Command::Serve => Config::from_vars(&vars),
        Command::Warm => Config::from_vars_for_warm(&vars),
        Command::Doctor { .. } => unreachable!("doctor returned above"),
    };
    drop(vars);
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            // One clear line naming the variable; journald shows it as is.
            eprintln!("replicas-engine: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    process::allow_child_env(&config.child_env);
    forget_engine_settings();
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
    let result = match command {
        Command::Serve => runtime.block_on(serve(config)),
        Command::Warm => runtime.block_on(warm(config)),
        Command::Doctor { .. } => unreachable!("doctor returned above"),
    };
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(e) if e.is::<replicas_engine::chats::store::DbError>() => {
            // One line naming the file; starting empty would bury its chats.
            eprintln!("replicas-engine: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "replicas-engine failed");
            eprintln!("replicas-engine: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Drop the engine's own settings (the secret, the backend URL) from the
/// process environment now that `Config` holds them. Runs before the runtime
/// starts any thread (`remove_var` is not thread-safe). Children never see
/// these anyway (`process::child_env`); this also keeps them out of
/// `/proc/<pid>/environ` for anything that could read it.
fn forget_engine_settings() {
    let names: Vec<_> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| k.to_str().is_some_and(process::is_engine_only))
        .collect();
    for name in names {
        std::env::remove_var(name);
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
    // Handlers first: a SIGTERM that arrives while state loads or right
    // after "listening" must shut down cleanly, not kill the process.
    let signals = Signals::install()?;
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

    tokio::spawn(signals.watch(shutdown.clone()));
    let server = tokio::spawn(server::run(state.clone(), listener));
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

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn watch(mut self, shutdown: CancellationToken) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
            _ = self.int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
        }
        shutdown.cancel();
    }
}

/// Run every repo's warmHook; exit 1 if any command failed, timed out or a
/// config was invalid. Ctrl-C/TERM stops the running command's group.
async fn warm(config: Config) -> anyhow::Result<ExitCode> {
    let cancel = CancellationToken::new();
    tokio::spawn(Signals::install()?.watch(cancel.clone()));
    let ok = replicas_engine::hooks::warm::run(&config, &cancel).await?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
