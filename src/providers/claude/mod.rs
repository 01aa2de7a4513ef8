//! Claude Code (`claude -p`, stream-json in and out): one long-lived
//! process per chat, reused across turns while its flags fit, respawned with
//! `--resume` when it died or a turn needs other flags (model, plan mode,
//! effort, system prompt).
//!
//! - [`args`]: command line and environment; [`bedrock`]: the Bedrock
//!   credentials file, read at each spawn;
//! - [`wire`]: the lines written to its stdin (user message, interrupt);
//! - [`parser`]: its stdout lines into [`ProviderEvent`]s.
//!
//! An interrupt is a control request; Claude answers with its `result`
//! line, then the tools it left are ended and the process stays. If no
//! `result` arrives within `interrupt_grace`, the whole group is stopped.

pub mod args;
pub mod bedrock;
pub mod parser;
pub mod wire;

use std::process::ExitStatus;
use std::time::Duration;

pub use args::{build_args, ClaudeFlags, ENV};
pub use parser::{is_auth_failure, is_missing_session, parse_line, try_parse_line, ClaudeParser};
pub use wire::{interrupt_line, user_message_line};

use super::driver::{exited_message, Proc, Protocol};
use super::session::{Cli, IdleProc};
use super::{Outcome, ProviderError, ProviderEvent, SessionConfig, TurnInput, TurnResult, Usage};

/// The Claude CLI.
pub(in crate::providers) struct Claude;

/// The process kept between turns, with the parser state of its stream.
pub(in crate::providers) struct ClaudeIdle {
    proc: Proc,
    parser: ClaudeParser,
    flags: ClaudeFlags,
}

impl IdleProc for ClaudeIdle {
    fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// One Claude turn's protocol state.
pub(in crate::providers) struct ClaudeTurn {
    parser: ClaudeParser,
    flags: ClaudeFlags,
    /// The user message line, to send again in a fresh session.
    message: String,
    interrupt_grace: Duration,
    seq: u32,
}

fn spawn(
    cfg: &SessionConfig,
    flags: &ClaudeFlags,
    resume: Option<&str>,
) -> Result<Proc, ProviderError> {
    let mut cmd = Proc::command(cfg);
    cmd.args(build_args(flags, resume)).envs(ENV);
    // Read at each spawn: the backend may rewrite the file at any time. It
    // wins over the engine's own environment.
    if let Some(bedrock) = cfg.bedrock_credentials.as_deref().and_then(bedrock::read) {
        cmd.envs(bedrock.set);
        for k in bedrock.remove {
            cmd.env_remove(k);
        }
    }
    Proc::spawn(cmd, cfg, true, resume.is_some())
}

impl Cli for Claude {
    type Idle = ClaudeIdle;
    type Protocol = ClaudeTurn;

    async fn begin(
        cfg: &SessionConfig,
        input: TurnInput,
        resume: Option<String>,
        idle: Option<ClaudeIdle>,
        _thread_usage: Option<Usage>,
    ) -> Result<(Proc, ClaudeTurn), ProviderError> {
        let flags = args::flags_of(&input);
        // Reuse the idle process only if it is alive and was started with
        // the flags this turn needs; otherwise resume the session in a new one.
        let mut reuse = match idle {
            Some(mut i) => {
                if i.proc.group.is_running() && i.flags == flags {
                    Some(i)
                } else {
                    i.proc.group.stop(cfg.kill_grace).await;
                    None
                }
            }
            None => None,
        };
        let message = user_message_line(&input.prompt, &input.images);
        // Two attempts: a process that died since the last turn fails the
        // write (broken pipe); then resume in a fresh one.
        for attempt in 0..2 {
            let (mut proc, parser) = match reuse.take() {
                Some(i) => (i.proc, i.parser),
                None => (spawn(cfg, &flags, resume.as_deref())?, ClaudeParser::new()),
            };
            match proc.send(message.as_bytes()).await {
                Ok(()) => {
                    let turn = ClaudeTurn {
                        parser,
                        flags,
                        message,
                        interrupt_grace: cfg.interrupt_grace,
                        seq: 0,
                    };
                    return Ok((proc, turn));
                }
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "claude did not take the message; respawning");
                    proc.group.stop(cfg.kill_grace).await;
                    if attempt == 1 {
                        return Err(ProviderError::Io(e));
                    }
                }
            }
        }
        Err(ProviderError::Io(std::io::Error::other(
            "claude could not be started",
        )))
    }
}

impl Protocol for ClaudeTurn {
    type Cli = Claude;

    fn ends_on_report(&self) -> bool {
        true
    }

    fn parse(&mut self, line: &str) -> Option<Vec<ProviderEvent>> {
        try_parse_line(&mut self.parser, line).ok()
    }

    fn too_long(&mut self, head: &[u8]) -> Option<TurnResult> {
        is_result_head(head).then(|| TurnResult {
            outcome: Outcome::Failed {
                code: "output_too_large".into(),
                message: "claude's result line was too large to read".into(),
            },
            usage: Usage::default(),
        })
    }

    async fn interrupt(&mut self, proc: &mut Proc) -> Option<Duration> {
        self.seq += 1;
        let line = interrupt_line(&format!("req_int_{}", self.seq));
        // A dead stdin means the process is going away; the grace deadline
        // then stops the group.
        if let Err(e) = proc.send(line.as_bytes()).await {
            tracing::debug!(error = %e, "interrupt request not delivered");
        }
        Some(self.interrupt_grace)
    }

    fn session_gone(&self, _proc: &Proc, reported: Option<&TurnResult>) -> bool {
        matches!(reported.map(|r| &r.outcome), Some(Outcome::Failed { message, .. }) if is_missing_session(message))
    }

    async fn restart_fresh(&mut self, cfg: &SessionConfig) -> Result<Proc, ProviderError> {
        let mut proc = spawn(cfg, &self.flags, None)?;
        proc.send(self.message.as_bytes()).await?;
        self.parser = ClaudeParser::new();
        Ok(proc)
    }

    fn exited(&self, status: Option<ExitStatus>, stderr: &str, interrupting: bool) -> TurnResult {
        let outcome = if interrupting {
            Outcome::Interrupted
        } else {
            Outcome::Failed {
                code: "exited".into(),
                message: exited_message("claude", status, stderr),
            }
        };
        TurnResult {
            outcome,
            usage: Usage::default(),
        }
    }

    fn into_idle(self, proc: Proc) -> Option<ClaudeIdle> {
        Some(ClaudeIdle {
            proc,
            parser: self.parser,
            flags: self.flags,
        })
    }
}

/// Whether the start of a Claude line is a `result` event.
fn is_result_head(head: &[u8]) -> bool {
    let compact: Vec<u8> = head
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    compact.starts_with(br#"{"type":"result""#)
}
