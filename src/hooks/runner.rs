//! Running one hook's commands: each in the repo directory with `sh -c`, in
//! its own process group ([`crate::process::command`]), output appended to
//! a log file with a header and a trailer per command. Shared by the start
//! hooks and `replicas-engine warm`.
//!
//! `separate: true` gives each command its own shell and timeout;
//! `separate: false` runs all of them as one script in one shell with one
//! timeout, so `export` and `cd` carry over. Either way a failing command
//! does not stop the later ones. On timeout or cancellation the whole group
//! is ended (TERM, grace, KILL, stragglers too), so a backgrounded
//! grandchild cannot outlive its command. A command that exits normally
//! keeps its background children: starting a service is a legitimate hook.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::repos::config::Hook;

/// Grace between TERM and KILL when a timed-out hook's group is stopped.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Shorter on shutdown: the runtime is torn down about a second after the
/// server stops, and the KILL must be sent before that.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    Pending,
    Running,
    Succeeded,
    Failed,
    TimedOut,
}

/// What one shell run is: the label reported (the command, or for
/// `separate: false` all commands one per line) and the script it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub label: String,
    pub script: String,
}

/// The shell runs a hook is made of.
pub fn steps(hook: &Hook) -> Vec<Step> {
    if hook.separate || hook.commands.len() <= 1 {
        return hook
            .commands
            .iter()
            .map(|c| Step {
                label: c.clone(),
                script: c.clone(),
            })
            .collect();
    }
    // One script: each command in a brace group in the *current* shell (so
    // `export`/`cd` persist); a failure is remembered and the script goes
    // on, exiting with the last non-zero status.
    let mut script = String::from("__replicas_rc=0\n");
    for c in &hook.commands {
        script.push_str("{\n");
        script.push_str(c);
        script.push_str("\n} || __replicas_rc=$?\n");
    }
    script.push_str("exit $__replicas_rc\n");
    vec![Step {
        label: hook.commands.join("\n"),
        script,
    }]
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    pub state: CommandState,
    pub exit_code: Option<i32>,
    pub duration: Duration,
}

/// Run one step in `dir` with `timeout`, output to `log` (a file opened for
/// append, or a clone of stderr). `cancel` (engine shutdown, Ctrl-C) stops
/// the group like a timeout does and reports `failed`.
pub async fn run_step(
    repo: &str,
    dir: &Path,
    step: &Step,
    timeout: Duration,
    log: &std::fs::File,
    cancel: &CancellationToken,
) -> Outcome {
    let started = Instant::now();
    let mut log_w = log;
    let _ = writeln!(
        log_w,
        "\n===== {} repo={repo} command={:?}",
        crate::util::now_ts(),
        step.label
    );
    let outcome = run_inner(dir, step, timeout, log, cancel, started).await;
    let _ = writeln!(
        log_w,
        "----- repo={repo} command={:?} status={} exit={} duration={}ms",
        step.label,
        state_name(outcome.state),
        outcome
            .exit_code
            .map(|c| c.to_string())
            .unwrap_or_else(|| "none".into()),
        outcome.duration.as_millis()
    );
    outcome
}

async fn run_inner(
    dir: &Path,
    step: &Step,
    timeout: Duration,
    log: &std::fs::File,
    cancel: &CancellationToken,
    started: Instant,
) -> Outcome {
    let failed = |exit_code| Outcome {
        state: CommandState::Failed,
        exit_code,
        duration: started.elapsed(),
    };
    let (Ok(out), Ok(err)) = (log.try_clone(), log.try_clone()) else {
        return failed(None);
    };
    let mut cmd = crate::process::command("sh");
    cmd.arg("-c")
        .arg(&step.script)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    // A `Group` KILLs the whole group if this future is dropped mid-run
    // (the runtime shutting down after the server stopped, before the
    // cancel branch below got to run); `kill_on_drop` alone would reach
    // only the shell, not what it backgrounded.
    let mut group = match crate::process::Group::spawn(&mut cmd) {
        Ok(g) => g,
        Err(e) => {
            let mut w = log;
            let _ = writeln!(w, "cannot start sh in {}: {e}", dir.display());
            tracing::warn!(error = %e, dir = %dir.display(), "cannot start hook command");
            return failed(None);
        }
    };
    // Finished or stopped: a command that exited normally keeps whatever
    // it started in the background (the group is not killed on drop then).
    tokio::select! {
        status = group.wait() => match status {
            Ok(s) if s.success() => Outcome { state: CommandState::Succeeded, exit_code: Some(0), duration: started.elapsed() },
            Ok(s) => failed(s.code()),
            Err(_) => failed(None),
        },
        _ = tokio::time::sleep(timeout) => {
            group.stop(STOP_GRACE).await;
            Outcome { state: CommandState::TimedOut, exit_code: None, duration: started.elapsed() }
        }
        _ = cancel.cancelled() => {
            group.stop(SHUTDOWN_GRACE).await;
            failed(None)
        }
    }
}

pub fn state_name(s: CommandState) -> &'static str {
    match s {
        CommandState::Pending => "pending",
        CommandState::Running => "running",
        CommandState::Succeeded => "succeeded",
        CommandState::Failed => "failed",
        CommandState::TimedOut => "timed_out",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(commands: &[&str], separate: bool, timeout: u64) -> Hook {
        Hook {
            commands: commands.iter().map(|s| s.to_string()).collect(),
            timeout,
            separate,
        }
    }

    #[tokio::test]
    async fn one_script_shares_shell_state_and_reports_any_failure() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let h = hook(
            &[
                "export FOO=bar",
                "false",
                "mkdir s && cd s",
                "echo $FOO > foo",
            ],
            false,
            10_000,
        );
        let st = steps(&h);
        assert_eq!(st.len(), 1);
        let o = run_step(
            "r",
            dir.path(),
            &st[0],
            h.timeout(),
            &log,
            &CancellationToken::new(),
        )
        .await;
        assert_eq!((o.state, o.exit_code), (CommandState::Failed, Some(1)));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("s/foo")).unwrap(),
            "bar\n"
        );
        let text = std::fs::read_to_string(dir.path().join("log")).unwrap();
        assert!(
            text.contains("repo=r") && text.contains("status=failed exit=1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn timeout_and_cancel_stop_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let st = steps(&hook(&["sleep 30"], true, 100));
        let o = run_step(
            "r",
            dir.path(),
            &st[0],
            Duration::from_millis(100),
            &log,
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(o.state, CommandState::TimedOut);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let o = run_step(
            "r",
            dir.path(),
            &st[0],
            Duration::from_secs(30),
            &log,
            &cancel,
        )
        .await;
        assert_eq!(o.state, CommandState::Failed);
    }
}
