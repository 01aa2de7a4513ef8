//! `codex exec --json` output into [`ProviderEvent`]s: a tolerant parser,
//! unit-tested against the recorded transcripts.
//!
//! Output shapes (see `tests/fixtures/codex/`): `thread.started` carries the
//! thread id; `item.started` / `item.updated` / `item.completed` carry one
//! item (`agent_message`, `reasoning`, `command_execution`, `file_change`,
//! `mcp_tool_call`, `web_search`, `todo_list`, `error`); `turn.completed`
//! carries usage *cumulative over the thread*; `turn.failed` and `error`
//! report failures. Text arrives whole in `item.completed` (no deltas).

use serde_json::{json, Value};

use super::super::{
    attach_raw, ItemKind, NormalizedItem, Outcome, ProviderEvent, ToolInfo, TurnResult, Usage,
};

/// Parser state across the lines of one thread (kept across turns, because
/// usage is cumulative per thread).
#[derive(Debug, Default)]
pub struct CodexParser {
    /// Thread totals after the previous turn, to report per-turn deltas.
    thread_usage: Option<Usage>,
    /// The last `error` event's message, for a turn that then fails.
    last_error: Option<String>,
    auth_failed: bool,
}

impl CodexParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Usage totals of the thread so far, when a turn has completed.
    pub fn thread_usage(&self) -> Option<Usage> {
        self.thread_usage
    }

    /// Seed the thread totals (e.g. persisted by a previous engine) so the
    /// next turn's usage is a delta.
    pub fn set_thread_usage(&mut self, u: Option<Usage>) {
        self.thread_usage = u;
    }

    /// Forget per-turn state before a new turn.
    pub fn begin_turn(&mut self) {
        self.last_error = None;
        self.auth_failed = false;
    }
}

/// Parse one stdout line. Unknown types and fields yield nothing; a line
/// that is not JSON yields nothing (the caller logs it).
pub fn parse_line(p: &mut CodexParser, line: &str) -> Vec<ProviderEvent> {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return Vec::new();
    };
    parse_value(p, v, line)
}

/// [`parse_line`] for an already parsed line (`line` is its text, kept as
/// the items' `raw`).
pub fn parse_value(p: &mut CodexParser, v: Value, line: &str) -> Vec<ProviderEvent> {
    let mut out = Vec::new();
    match v.get("type").and_then(Value::as_str).unwrap_or("") {
        "thread.started" => {
            if let Some(id) = v
                .get("thread_id")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
            {
                out.push(ProviderEvent::SessionId(id.to_string()));
            }
        }
        t @ ("item.started" | "item.updated" | "item.completed") => {
            if let Some(item) = v.get("item") {
                if let Some(n) = item_of(item, t == "item.completed") {
                    if n.kind == ItemKind::Error {
                        note_error(p, n.text.as_deref().unwrap_or(""), &mut out);
                    }
                    out.push(ProviderEvent::Item(n));
                }
            }
        }
        "turn.completed" => {
            let usage = turn_usage(p, v.get("usage"));
            out.push(ProviderEvent::Finished(TurnResult {
                outcome: Outcome::Completed,
                usage,
            }));
        }
        "turn.failed" => {
            let message = v
                .pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| p.last_error.clone())
                .unwrap_or_else(|| "codex reported a failed turn".into());
            if !p.auth_failed && is_auth_failure(&message) {
                p.auth_failed = true;
                out.push(ProviderEvent::AuthFailure {
                    message: message.clone(),
                });
            }
            let code = if p.auth_failed {
                "auth_expired"
            } else {
                "turn_failed"
            };
            out.push(ProviderEvent::Finished(TurnResult {
                outcome: Outcome::Failed {
                    code: code.into(),
                    message,
                },
                usage: Usage::default(),
            }));
        }
        "error" => {
            // Stream errors, including "Reconnecting… 1/5" retries: shown,
            // not fatal by themselves (a fatal one is followed by
            // turn.failed or the process exiting).
            let message = v
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            note_error(p, &message, &mut out);
            let mut item = NormalizedItem::new(ItemKind::Error);
            item.text = Some(message);
            out.push(ProviderEvent::Item(item));
        }
        _ => {}
    }
    attach_raw(&mut out, line);
    out
}

/// Remember an error for the turn's outcome and flag an auth failure once.
fn note_error(p: &mut CodexParser, message: &str, out: &mut Vec<ProviderEvent>) {
    p.last_error = Some(message.to_string());
    if !p.auth_failed && is_auth_failure(message) {
        p.auth_failed = true;
        out.push(ProviderEvent::AuthFailure {
            message: message.to_string(),
        });
    }
}

/// Whether the last turn saw an auth failure (for a process that then
/// exits without `turn.failed`).
pub fn saw_auth_failure(p: &CodexParser) -> bool {
    p.auth_failed
}

/// The last error message of the turn, if any.
pub fn last_error(p: &CodexParser) -> Option<&str> {
    p.last_error.as_deref()
}

/// One Codex item → a normalized item; `None` for items not worth a history
/// entry in this phase (e.g. a message that has not completed yet).
fn item_of(item: &Value, completed: bool) -> Option<NormalizedItem> {
    let s = |k: &str| item.get(k).and_then(Value::as_str);
    let id = s("id").unwrap_or("");
    let mut n = match s("type").unwrap_or("") {
        "agent_message" if completed => {
            let mut n = NormalizedItem::new(ItemKind::AssistantMessage);
            n.text = Some(s("text").unwrap_or("").to_string());
            n
        }
        "reasoning" if completed => {
            let mut n = NormalizedItem::new(ItemKind::Reasoning);
            n.text = Some(s("text").unwrap_or("").to_string());
            n
        }
        "command_execution" => {
            let exit_code = item
                .get("exit_code")
                .and_then(Value::as_i64)
                .map(|c| c as i32);
            let failed = s("status") == Some("failed") || exit_code.is_some_and(|c| c != 0);
            let mut n = NormalizedItem::new(ItemKind::Command);
            n.text = s("command").map(str::to_string);
            n.tool = Some(ToolInfo {
                name: "command".into(),
                input: json!({"command": s("command").unwrap_or("")}),
                output: completed.then(|| s("aggregated_output").unwrap_or("").to_string()),
                is_error: failed,
                exit_code,
            });
            n
        }
        "file_change" if completed => {
            let changes = item
                .get("changes")
                .cloned()
                .unwrap_or(Value::Array(Vec::new()));
            let text = changes
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    format!(
                        "{} {}",
                        c.get("kind").and_then(Value::as_str).unwrap_or("update"),
                        c.get("path").and_then(Value::as_str).unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            let mut n = NormalizedItem::new(ItemKind::FileChange);
            n.text = Some(text);
            n.tool = Some(ToolInfo {
                name: "apply_patch".into(),
                input: json!({"changes": changes}),
                output: None,
                is_error: s("status") == Some("failed"),
                exit_code: None,
            });
            n
        }
        "mcp_tool_call" => {
            let name = format!(
                "{}.{}",
                s("server").unwrap_or("mcp"),
                s("tool").unwrap_or("tool")
            );
            let output = completed.then(|| {
                item.get("error")
                    .and_then(|e| e.get("message").and_then(Value::as_str).map(str::to_string))
                    .or_else(|| item.get("result").map(mcp_result_text))
                    .unwrap_or_default()
            });
            let mut n = NormalizedItem::new(ItemKind::ToolCall);
            n.tool = Some(ToolInfo {
                name,
                input: item.get("arguments").cloned().unwrap_or(Value::Null),
                output,
                is_error: s("status") == Some("failed"),
                exit_code: None,
            });
            n
        }
        "web_search" => {
            let mut n = NormalizedItem::new(ItemKind::ToolCall);
            n.tool = Some(ToolInfo {
                name: "web_search".into(),
                input: json!({"query": s("query").unwrap_or("")}),
                output: None,
                is_error: false,
                exit_code: None,
            });
            n
        }
        "todo_list" => {
            let items = item.get("items").and_then(Value::as_array);
            let text = items
                .into_iter()
                .flatten()
                .map(|t| {
                    let done = t.get("completed").and_then(Value::as_bool).unwrap_or(false);
                    let text = t.get("text").and_then(Value::as_str).unwrap_or("");
                    format!("[{}] {text}", if done { "x" } else { " " })
                })
                .collect::<Vec<_>>()
                .join("\n");
            let mut n = NormalizedItem::new(ItemKind::TodoList);
            n.text = Some(text);
            n
        }
        "error" if completed => {
            let mut n = NormalizedItem::new(ItemKind::Error);
            n.text = Some(s("message").unwrap_or("").to_string());
            n
        }
        _ => return None,
    };
    n.key = Some(id.to_string()).filter(|k| !k.is_empty());
    Some(n)
}

/// An MCP result's content blocks as text.
fn mcp_result_text(result: &Value) -> String {
    let blocks = result.get("content").and_then(Value::as_array);
    match blocks {
        Some(blocks) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        None => result.to_string(),
    }
}

/// This turn's usage: the thread totals minus the previous turn's totals.
fn turn_usage(p: &mut CodexParser, u: Option<&Value>) -> Usage {
    let n = |k: &str| {
        u.and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let total = Usage {
        input_tokens: n("input_tokens"),
        output_tokens: n("output_tokens"),
        cached_input_tokens: n("cached_input_tokens"),
        cost_usd: None,
    };
    let prev = p.thread_usage.unwrap_or_default();
    // Totals only grow within a thread; if they did not (another thread, a
    // reset), the totals are this turn's.
    let delta =
        if total.input_tokens >= prev.input_tokens && total.output_tokens >= prev.output_tokens {
            Usage {
                input_tokens: total.input_tokens - prev.input_tokens,
                output_tokens: total.output_tokens - prev.output_tokens,
                cached_input_tokens: total
                    .cached_input_tokens
                    .saturating_sub(prev.cached_input_tokens),
                cost_usd: None,
            }
        } else {
            total
        };
    p.thread_usage = Some(total);
    delta
}

/// Whether an error says the thread to resume does not exist.
pub fn is_missing_thread(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("no rollout found") || t.contains("thread not found")
}

/// Whether an error text reports bad or expired credentials.
pub fn is_auth_failure(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "401",
        "unauthorized",
        "invalid api key",
        "incorrect api key",
        "token expired",
        "invalid_api_key",
        "refresh token",
    ]
    .iter()
    .any(|needle| t.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p: &mut CodexParser, name: &str) -> Vec<ProviderEvent> {
        let path = format!(
            "{}/tests/fixtures/codex/{name}.jsonl",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap();
        p.begin_turn();
        text.lines().flat_map(|l| parse_line(p, l)).collect()
    }

    fn fixture(name: &str) -> Vec<ProviderEvent> {
        run(&mut CodexParser::new(), name)
    }

    use crate::providers::items;

    fn finished(events: &[ProviderEvent]) -> &TurnResult {
        match events.last() {
            Some(ProviderEvent::Finished(r)) => r,
            other => panic!("last event is not Finished: {other:?}"),
        }
    }

    #[test]
    fn plain_turn() {
        for name in ["hello", "image"] {
            let ev = fixture(name);
            assert!(matches!(&ev[0], ProviderEvent::SessionId(id) if id.starts_with("01a20078-")));
            let it = items(&ev);
            assert_eq!(it.len(), 1);
            assert_eq!(it[0].kind, ItemKind::AssistantMessage);
            assert_eq!(it[0].text.as_deref(), Some("Hello from mock OpenAI!"));
            assert_eq!(it[0].key.as_deref(), Some("item_0"));
            let f = finished(&ev);
            assert_eq!(f.outcome, Outcome::Completed);
            assert_eq!(
                f.usage,
                Usage {
                    input_tokens: 20,
                    output_tokens: 8,
                    cached_input_tokens: 0,
                    cost_usd: None
                }
            );
        }
    }

    #[test]
    fn shell_command_started_then_completed_with_exit_code() {
        for name in ["tool_shell_bypass", "tool_shell_wswrite"] {
            let ev = fixture(name);
            let it = items(&ev);
            assert_eq!(it.len(), 3, "{name}");
            assert_eq!(it[0].kind, ItemKind::Command);
            assert_eq!(
                it[0].key, it[1].key,
                "the completion updates the started item"
            );
            let started = it[0].tool.as_ref().unwrap();
            assert_eq!(started.output, None);
            assert_eq!(started.exit_code, None);
            let done = it[1].tool.as_ref().unwrap();
            assert_eq!(done.input["command"], "/bin/bash -lc 'echo hi'");
            assert_eq!(done.output.as_deref(), Some("hi\n"));
            assert_eq!(done.exit_code, Some(0));
            assert!(!done.is_error);
            assert_eq!(it[2].kind, ItemKind::AssistantMessage);
            assert_eq!(finished(&ev).outcome, Outcome::Completed);
        }
    }

    #[test]
    fn file_change() {
        let ev = fixture("tool_patch");
        let it = items(&ev);
        assert_eq!(it[0].kind, ItemKind::FileChange);
        assert_eq!(
            it[0].text.as_deref(),
            Some("add /home/ubuntu/workspaces/demo/mock_patch.txt")
        );
        assert_eq!(
            it[0].tool.as_ref().unwrap().input["changes"][0]["kind"],
            "add"
        );
        assert_eq!(it[1].kind, ItemKind::AssistantMessage);
    }

    #[test]
    fn usage_is_reported_per_turn_although_codex_counts_per_thread() {
        let mut p = CodexParser::new();
        let first = run(&mut p, "hello");
        assert_eq!(finished(&first).usage.input_tokens, 20);
        // resume.jsonl is the second turn of that thread: totals 40/16.
        let second = run(&mut p, "resume");
        assert_eq!(finished(&second).usage.input_tokens, 20);
        assert_eq!(finished(&second).usage.output_tokens, 8);
        assert_eq!(p.thread_usage().unwrap().input_tokens, 40);
        // A parser seeded from persisted totals does the same after a restart.
        let mut q = CodexParser::new();
        q.set_thread_usage(Some(Usage {
            input_tokens: 20,
            output_tokens: 8,
            ..Usage::default()
        }));
        assert_eq!(finished(&run(&mut q, "resume")).usage.input_tokens, 20);
    }

    #[test]
    fn sigint_transcript_has_no_end() {
        let ev = fixture("sigint");
        assert_eq!(
            ev.len(),
            1,
            "only the thread id: the driver decides from the exit"
        );
        assert!(matches!(&ev[0], ProviderEvent::SessionId(_)));
    }

    #[test]
    fn item_types_without_a_recording() {
        let mut p = CodexParser::new();
        let lines = [
            r#"{"type":"item.completed","item":{"id":"r1","type":"reasoning","text":"**Thinking** about it"}}"#,
            r#"{"type":"item.started","item":{"id":"t1","type":"todo_list","items":[{"text":"a","completed":false},{"text":"b","completed":true}]}}"#,
            r#"{"type":"item.updated","item":{"id":"t1","type":"todo_list","items":[{"text":"a","completed":true},{"text":"b","completed":true}]}}"#,
            r#"{"type":"item.completed","item":{"id":"m1","type":"mcp_tool_call","server":"docs","tool":"search","arguments":{"q":"x"},"result":{"content":[{"type":"text","text":"found"}]},"status":"completed"}}"#,
            r#"{"type":"item.completed","item":{"id":"w1","type":"web_search","query":"rust"}}"#,
            r#"{"type":"item.completed","item":{"id":"c1","type":"command_execution","command":"false","aggregated_output":"","exit_code":1,"status":"failed"}}"#,
            r#"{"type":"item.completed","item":{"id":"e1","type":"error","message":"model refused"}}"#,
            r#"{"type":"item.started","item":{"id":"m2","type":"agent_message","text":""}}"#,
        ];
        let ev: Vec<ProviderEvent> = lines.iter().flat_map(|l| parse_line(&mut p, l)).collect();
        let it = items(&ev);
        let kinds: Vec<ItemKind> = it.iter().map(|i| i.kind).collect();
        assert_eq!(
            kinds,
            vec![
                ItemKind::Reasoning,
                ItemKind::TodoList,
                ItemKind::TodoList,
                ItemKind::ToolCall,
                ItemKind::ToolCall,
                ItemKind::Command,
                ItemKind::Error,
            ],
            "an agent message is recorded when it completes"
        );
        assert_eq!(it[1].text.as_deref(), Some("[ ] a\n[x] b"));
        assert_eq!(it[2].text.as_deref(), Some("[x] a\n[x] b"));
        let mcp = it[3].tool.as_ref().unwrap();
        assert_eq!(mcp.name, "docs.search");
        assert_eq!(mcp.output.as_deref(), Some("found"));
        assert_eq!(it[4].tool.as_ref().unwrap().input["query"], "rust");
        let cmd = it[5].tool.as_ref().unwrap();
        assert!(cmd.is_error);
        assert_eq!(cmd.exit_code, Some(1));
    }

    #[test]
    fn turn_failed_and_auth_errors() {
        let mut p = CodexParser::new();
        p.begin_turn();
        let ev = parse_line(
            &mut p,
            r#"{"type":"error","message":"Reconnecting... 1/5 (stream error)"}"#,
        );
        assert!(matches!(&ev[..], [ProviderEvent::Item(i)] if i.kind == ItemKind::Error));
        let ev = parse_line(
            &mut p,
            r#"{"type":"turn.failed","error":{"message":"stream disconnected"}}"#,
        );
        assert_eq!(
            finished(&ev).outcome,
            Outcome::Failed {
                code: "turn_failed".into(),
                message: "stream disconnected".into()
            }
        );

        p.begin_turn();
        let ev = parse_line(
            &mut p,
            r#"{"type":"error","message":"unexpected status 401 Unauthorized: invalid token"}"#,
        );
        assert!(matches!(&ev[0], ProviderEvent::AuthFailure { .. }));
        let ev = parse_line(
            &mut p,
            r#"{"type":"turn.failed","error":{"message":"unexpected status 401"}}"#,
        );
        assert_eq!(
            ev.iter()
                .filter(|e| matches!(e, ProviderEvent::AuthFailure { .. }))
                .count(),
            0,
            "reported once"
        );
        assert!(
            matches!(&finished(&ev).outcome, Outcome::Failed { code, .. } if code == "auth_expired")
        );
    }

    #[test]
    fn unknown_and_broken_lines_yield_nothing() {
        let mut p = CodexParser::new();
        for line in [
            "",
            "garbage",
            "{}",
            r#"{"type":"turn.started"}"#,
            r#"{"type":"item.completed"}"#,
            r#"{"type":"item.completed","item":{"type":"brand_new"}}"#,
            r#"{"type":"thread.started","thread_id":""}"#,
        ] {
            assert!(parse_line(&mut p, line).is_empty(), "{line}");
        }
    }
}

/// Property tests: whatever the CLI prints, the parser neither panics nor
/// reads anything into a line that is not JSON.
#[cfg(test)]
mod proptests {
    use super::*;
    use crate::testing::{arb_event, arb_json};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary bytes (as the line reader decodes them): no panic, and
        /// a line that is not JSON yields no events (the caller logs it).
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let line = String::from_utf8_lossy(&bytes);
            let mut p = CodexParser::new();
            p.begin_turn();
            let events = parse_line(&mut p, &line);
            if serde_json::from_str::<Value>(&line).is_err() {
                prop_assert!(events.is_empty());
            }
        }

        /// Arbitrary JSON values and CLI-shaped objects through one parser
        /// (usage and items carry state across lines): no panic, at most
        /// one `Finished` per line.
        #[test]
        fn arbitrary_json_lines_never_panic(
            lines in proptest::collection::vec(prop_oneof![arb_json(), arb_event()], 1..12)
        ) {
            let mut p = CodexParser::new();
            p.begin_turn();
            for v in lines {
                let events = parse_line(&mut p, &v.to_string());
                let ends = events.iter().filter(|e| matches!(e, ProviderEvent::Finished(_))).count();
                prop_assert!(ends <= 1);
            }
        }

        /// Item events with arbitrary items.
        #[test]
        fn arbitrary_items_never_panic(
            kind in proptest::sample::select(&["item.started", "item.updated", "item.completed"][..]),
            item in arb_json(),
        ) {
            let mut p = CodexParser::new();
            p.begin_turn();
            let _ = parse_line(&mut p, &serde_json::json!({"type": kind, "item": item}).to_string());
        }
    }
}
