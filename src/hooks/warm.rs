//! `replicas-engine warm`: run every repo's `warmHook` (same rules as start
//! hooks: repos in name order, each command in the repo directory in its
//! own process group with its timeout, a failure does not stop the rest),
//! one progress line per command on stdout, command output on stderr.
//! Used while pre-warming a workspace image, before the server ever runs.

use std::io::Write;
use std::os::fd::AsFd;

use tokio_util::sync::CancellationToken;

use super::runner::{self, CommandState};
use crate::config::Config;
use crate::repos::config as repo_config;

/// Run all warm hooks; true when every command succeeded (and every config
/// was valid). `cancel` (Ctrl-C/TERM) stops the running command's group.
pub async fn run(config: &Config, cancel: &CancellationToken) -> anyhow::Result<bool> {
    use anyhow::Context;
    // Command output goes to our stderr; stdout carries only progress lines.
    let output: std::fs::File = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating stderr for hook output")?
        .into();
    let mut out = std::io::stdout();
    let (mut ran, mut failed) = (0usize, 0usize);
    for (name, dir) in repo_config::repo_dirs(&config.workspaces_dir) {
        let hook = match repo_config::load(&dir) {
            Ok(Some(c)) => match c.config.warm_hook {
                Some(h) => h,
                None => continue,
            },
            Ok(None) => continue,
            Err(e) => {
                failed += 1;
                let _ = writeln!(out, "warm {name}: invalid {}: {}", e.file, e.message);
                continue;
            }
        };
        let steps = runner::steps(&hook);
        for (i, step) in steps.iter().enumerate() {
            if cancel.is_cancelled() {
                let _ = writeln!(out, "warm: interrupted");
                return Ok(false);
            }
            let o = runner::run_step(&name, &dir, step, hook.timeout(), &output, cancel).await;
            ran += 1;
            if o.state != CommandState::Succeeded {
                failed += 1;
            }
            let _ = writeln!(
                out,
                "warm {name} [{}/{}] {}: {} (exit {}, {} ms)",
                i + 1,
                steps.len(),
                one_line(&step.label),
                runner::state_name(o.state),
                o.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "none".into()),
                o.duration.as_millis()
            );
            let _ = out.flush();
        }
    }
    let _ = writeln!(out, "warm: {ran} command(s), {failed} failed");
    Ok(failed == 0)
}

/// A `separate:false` label spans lines; progress stays one line each.
fn one_line(label: &str) -> String {
    let s = label.lines().collect::<Vec<_>>().join("; ");
    format!("{s:?}")
}
