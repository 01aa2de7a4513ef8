//! Codex, over one of two transports:
//!
//! - `codex exec --json` (this file): one process per turn (`exec`, or
//!   `exec resume <thread>` once the thread id is known), the prompt on
//!   stdin; the turn ends when the process exits (its `turn.completed` is
//!   held until then); an interrupt stops the group. [`args`] builds its
//!   command line, [`parser`] reads its JSONL events.
//! - `codex app-server` (`app_turn.rs`, wire and parser in [`app_server`]):
//!   one long-lived JSON-RPC process per chat, streamed text, interrupt by
//!   `turn/interrupt`; `exec` is the fallback when it fails its handshake.

pub mod app_server;
mod app_turn;
pub mod args;
pub mod parser;

pub use app_turn::transport;
pub(in crate::providers) use app_turn::Codex;

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

pub use args::build_args;
pub use parser::{
    is_auth_failure, is_missing_thread, last_error, parse_line, parse_value, saw_auth_failure,
    CodexParser,
};

use super::driver::{exited_message, Proc, Protocol};
use super::session::Cli;
use super::{Outcome, ProviderError, ProviderEvent, SessionConfig, TurnInput, TurnResult, Usage};

/// The Codex CLI driven through `codex exec --json`.
pub(in crate::providers) struct CodexExec;

/// One `codex exec` turn.
pub(in crate::providers) struct CodexExecTurn {
    parser: CodexParser,
    /// Kept to start the turn again in a fresh thread when the thread to
    /// resume no longer exists.
    input: TurnInput,
    image_files: Vec<PathBuf>,
    /// Deleted when the turn ends.
    _images: Option<tempfile::TempDir>,
}

async fn spawn(
    cfg: &SessionConfig,
    input: &TurnInput,
    resume: Option<&str>,
    image_files: &[PathBuf],
) -> Result<Proc, ProviderError> {
    let mut cmd = Proc::command(cfg);
    cmd.args(build_args(input, resume, image_files));
    let mut proc = Proc::spawn(cmd, cfg, true, resume.is_some())?;
    // The prompt goes on stdin: not visible in `ps`, and no argument size
    // limit. A CLI that exits before reading it is reported by its exit.
    if let Err(e) = proc.send_and_close(input.prompt.as_bytes()).await {
        tracing::warn!(error = %e, "codex did not take the prompt on stdin");
    }
    Ok(proc)
}

impl Cli for CodexExec {
    type Idle = std::convert::Infallible;
    type Protocol = CodexExecTurn;

    async fn begin(
        cfg: &SessionConfig,
        input: TurnInput,
        resume: Option<String>,
        _idle: Option<Self::Idle>,
        thread_usage: Option<Usage>,
    ) -> Result<(Proc, CodexExecTurn), ProviderError> {
        let (images, image_files) = write_images(&input)?;
        let proc = spawn(cfg, &input, resume.as_deref(), &image_files).await?;
        let mut parser = CodexParser::new();
        parser.set_thread_usage(thread_usage);
        let turn = CodexExecTurn {
            parser,
            input,
            image_files,
            _images: images,
        };
        Ok((proc, turn))
    }
}

impl Protocol for CodexExecTurn {
    type Cli = CodexExec;

    fn ends_on_report(&self) -> bool {
        false
    }

    fn parse(&mut self, line: &str) -> Option<Vec<ProviderEvent>> {
        let v = serde_json::from_str(line).ok()?;
        Some(parse_value(&mut self.parser, v, line))
    }

    async fn interrupt(&mut self, _proc: &mut Proc) -> Option<Duration> {
        None
    }

    fn session_gone(&self, proc: &Proc, reported: Option<&TurnResult>) -> bool {
        reported.is_none()
            && (last_error(&self.parser).is_some_and(is_missing_thread)
                || is_missing_thread(&proc.stderr.text()))
    }

    async fn restart_fresh(&mut self, cfg: &SessionConfig) -> Result<Proc, ProviderError> {
        let proc = spawn(cfg, &self.input, None, &self.image_files).await?;
        self.parser = CodexParser::new();
        self.parser.begin_turn();
        Ok(proc)
    }

    fn exited(&self, status: Option<ExitStatus>, stderr: &str, interrupting: bool) -> TurnResult {
        let outcome = if interrupting {
            Outcome::Interrupted
        } else if saw_auth_failure(&self.parser) {
            Outcome::Failed {
                code: "auth_expired".into(),
                message: last_error(&self.parser)
                    .unwrap_or("authentication failed")
                    .to_string(),
            }
        } else {
            let mut stderr = stderr.to_string();
            if let Some(e) = last_error(&self.parser) {
                stderr = format!("{e}\n{stderr}");
            }
            Outcome::Failed {
                code: "exited".into(),
                message: exited_message("codex", status, &stderr),
            }
        };
        TurnResult {
            outcome,
            usage: Usage::default(),
        }
    }

    fn thread_usage(&self) -> Option<Usage> {
        self.parser.thread_usage()
    }

    fn into_idle(self, _proc: Proc) -> Option<std::convert::Infallible> {
        None
    }
}

/// Images go to files that live until the turn ends.
fn write_images(
    input: &TurnInput,
) -> Result<(Option<tempfile::TempDir>, Vec<PathBuf>), ProviderError> {
    if input.images.is_empty() {
        return Ok((None, Vec::new()));
    }
    let dir = tempfile::Builder::new()
        .prefix("replicas-images-")
        .tempdir()?;
    let mut files = Vec::with_capacity(input.images.len());
    for (i, img) in input.images.iter().enumerate() {
        let bytes = decode_base64(&img.data_base64).ok_or_else(|| {
            ProviderError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("image {} is not valid base64", i + 1),
            ))
        })?;
        let ext = img.media_type.rsplit('/').next().unwrap_or("png");
        let ext: String = ext
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(8)
            .collect();
        let path = dir.path().join(format!("image-{}.{ext}", i + 1));
        std::fs::write(&path, bytes)?;
        files.push(path);
    }
    Ok((Some(dir), files))
}

/// Base64 as clients send it (standard alphabet, padding optional);
/// `None` if invalid.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    use base64::engine::{DecodePaddingMode, Engine};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    LENIENT.decode(compact).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_standard_and_rejects_garbage() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVsbG8").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVs\nbG8h").unwrap(), b"hello!");
        assert!(decode_base64("a$b").is_none());
    }
}
