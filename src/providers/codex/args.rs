//! Codex's command line for `codex exec --json`, one process per turn
//! (`exec` or `exec resume <thread>`). The prompt goes on stdin (`-`), never
//! on the command line: `ps` would show it, and a long one would exceed the
//! kernel's argument size limit.

use std::ffi::OsString;
use std::path::PathBuf;

use super::super::TurnInput;

/// Arguments for one `codex exec` turn. `image_files` are the turn's images
/// already written to disk. The prompt is not among them: it is `-`, read
/// from stdin.
pub fn build_args(
    input: &TurnInput,
    resume: Option<&str>,
    image_files: &[PathBuf],
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["exec".into()];
    if resume.is_some() {
        args.push("resume".into());
    }
    args.extend(["--json", "--skip-git-repo-check"].map(OsString::from));
    if input.plan_mode {
        // Plan mode: the agent may read but not write. `exec resume` takes
        // no `-s`, so use the config key for both.
        args.extend(config("sandbox_mode", "read-only"));
        args.extend(config("approval_policy", "never"));
    } else {
        args.push("--dangerously-bypass-approvals-and-sandbox".into());
    }
    if let Some(m) = &input.model {
        args.push("-m".into());
        args.push(m.into());
    }
    if let Some(level) = &input.thinking_level {
        args.extend(config("model_reasoning_effort", reasoning_effort(level)));
    }
    let mut instructions = input.system_prompt.clone().filter(|p| !p.trim().is_empty());
    if input.plan_mode {
        let plan =
            "You are in plan mode: investigate and reply with a plan; do not modify any file.";
        instructions = Some(match instructions {
            Some(p) => format!("{p}\n\n{plan}"),
            None => plan.to_string(),
        });
    }
    if let Some(text) = instructions {
        args.extend(config("developer_instructions", &text));
    }
    for f in image_files {
        args.push("-i".into());
        args.push(f.into());
    }
    // `-i` takes several values: end the options before the positionals so
    // neither the thread id nor a prompt starting with `-` is taken as one.
    args.push("--".into());
    if let Some(thread) = resume {
        args.push(thread.into());
    }
    // The prompt itself is written to stdin.
    args.push("-".into());
    args
}

/// `-c key=<TOML string>`.
fn config(key: &str, value: &str) -> [OsString; 2] {
    ["-c".into(), format!("{key}={}", toml_string(value)).into()]
}

/// A TOML basic string: quotes, backslashes and control characters escaped.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\u{:04X}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Our `low|medium|high|max` onto Codex's `model_reasoning_effort`.
fn reasoning_effort(level: &str) -> &str {
    match level {
        "minimal" | "low" | "medium" | "high" | "xhigh" => level,
        "max" => "xhigh",
        _ => "medium",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_for_exec_and_resume() {
        let input = TurnInput {
            prompt: "-do it".into(),
            model: Some("gpt-5.5".into()),
            thinking_level: Some("max".into()),
            system_prompt: Some("Say \"hi\"\nfirst".into()),
            ..TurnInput::default()
        };
        let s = |a: Vec<OsString>| {
            a.into_iter()
                .map(|x| x.into_string().unwrap())
                .collect::<Vec<_>>()
        };
        let args = s(build_args(
            &input,
            None,
            &[PathBuf::from("/tmp/a.png"), PathBuf::from("/tmp/b.png")],
        ));
        assert_eq!(
            args,
            [
                "exec",
                "--json",
                "--skip-git-repo-check",
                "--dangerously-bypass-approvals-and-sandbox",
                "-m",
                "gpt-5.5",
                "-c",
                "model_reasoning_effort=\"xhigh\"",
                "-c",
                "developer_instructions=\"Say \\\"hi\\\"\\nfirst\"",
                "-i",
                "/tmp/a.png",
                "-i",
                "/tmp/b.png",
                "--",
                "-"
            ]
        );
        let plan = TurnInput {
            prompt: "p".into(),
            plan_mode: true,
            ..TurnInput::default()
        };
        let args = s(build_args(&plan, Some("thread-1"), &[]));
        assert_eq!(
            &args[..4],
            ["exec", "resume", "--json", "--skip-git-repo-check"]
        );
        assert!(args.contains(&"sandbox_mode=\"read-only\"".to_string()));
        assert!(!args.iter().any(|a| a.starts_with("--dangerously")));
        assert_eq!(&args[args.len() - 3..], ["--", "thread-1", "-"]);
    }
}
