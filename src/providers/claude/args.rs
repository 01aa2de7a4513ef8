//! Claude's command line and environment: one long-lived
//! `claude -p --input-format stream-json` process per chat, restarted when a
//! turn needs other flags.

use super::super::TurnInput;

/// The flags a Claude process is started with. Two turns can share one
/// process only when these are equal (apart from `resume`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaudeFlags {
    pub model: Option<String>,
    pub plan_mode: bool,
    /// `--effort` level.
    pub effort: Option<String>,
    pub system_prompt: Option<String>,
}

/// Arguments for a long-lived stream-json Claude process.
pub fn build_args(flags: &ClaudeFlags, resume: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = [
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--input-format",
        "stream-json",
        "--include-partial-messages",
        "--permission-mode",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Plan mode is a permission mode of its own; otherwise bypass (the VM is
    // the sandbox).
    args.push(
        if flags.plan_mode {
            "plan"
        } else {
            "bypassPermissions"
        }
        .into(),
    );
    if let Some(id) = resume {
        args.push("--resume".into());
        args.push(id.into());
    }
    if let Some(m) = &flags.model {
        args.push("--model".into());
        args.push(m.clone());
    }
    if let Some(e) = &flags.effort {
        args.push("--effort".into());
        args.push(effort_level(e).into());
    }
    if let Some(p) = flags
        .system_prompt
        .as_deref()
        .filter(|p| !p.trim().is_empty())
    {
        args.push("--append-system-prompt".into());
        args.push(p.into());
    }
    args
}

/// Our `low|medium|high|max` onto Claude's `--effort` choices.
fn effort_level(level: &str) -> &str {
    match level {
        "low" | "medium" | "high" | "xhigh" | "max" => level,
        _ => "medium",
    }
}

/// Environment every Claude process gets on top of the engine's: root may
/// bypass permissions only with `IS_SANDBOX=1`; no telemetry/update calls.
pub const ENV: [(&str, &str); 2] = [
    ("IS_SANDBOX", "1"),
    ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
];

/// The flags a turn needs.
pub fn flags_of(input: &TurnInput) -> ClaudeFlags {
    ClaudeFlags {
        model: input.model.clone().filter(|m| !m.is_empty()),
        plan_mode: input.plan_mode,
        effort: input.thinking_level.clone().filter(|m| !m.is_empty()),
        system_prompt: input.system_prompt.clone().filter(|m| !m.trim().is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_for_a_fresh_and_a_resumed_process() {
        let args = build_args(&ClaudeFlags::default(), None);
        assert_eq!(
            args.join(" "),
            "-p --output-format stream-json --verbose --input-format stream-json \
             --include-partial-messages --permission-mode bypassPermissions"
        );
        let flags = ClaudeFlags {
            model: Some("sonnet".into()),
            plan_mode: true,
            effort: Some("max".into()),
            system_prompt: Some("Be terse.".into()),
        };
        let args = build_args(&flags, Some("abc"));
        let s = args.join(" ");
        assert!(s.contains("--permission-mode plan"));
        assert!(s.contains("--resume abc"));
        assert!(s.contains("--model sonnet"));
        assert!(s.contains("--effort max"));
        assert_eq!(args.last().map(String::as_str), Some("Be terse."));
        assert!(!s.contains("bypassPermissions"));
    }
}
