//! `codex app-server`: JSON-RPC 2.0 over stdio, one JSON object per line
//! (the pinned CLI prints its protocol with `codex app-server
//! generate-json-schema --out DIR`). The pure parts: the requests we write,
//! the answers to the server's requests (by chat mode), and a tolerant
//! parser of its notifications into [`ProviderEvent`]s.
//!
//! Lifecycle: `initialize` → `initialized`; `thread/start` or
//! `thread/resume {threadId}`; per turn `turn/start` (sandbox and approval
//! policy set on every turn, so plan mode can flip between turns);
//! `turn/interrupt {threadId, turnId}` ends a turn as `interrupted`.
//! Notifications (see `tests/fixtures/codex/app-server-*.jsonl`):
//! `item/agentMessage/delta {itemId, delta}` streams text; `item/started` /
//! `item/completed` carry items (`agentMessage`, `reasoning`,
//! `commandExecution`, `fileChange`, `mcpToolCall`, `webSearch`, …);
//! `thread/tokenUsage/updated` carries thread totals; `turn/completed`
//! ends the turn with its status.

use serde_json::{json, Value};

use super::super::{
    ItemKind, NormalizedItem, Outcome, ProviderEvent, RawJson, ToolInfo, TurnInput, TurnResult,
    Usage,
};
use super::parser::is_auth_failure;

/// One JSON-RPC request line (with `\n`).
pub fn request(id: u64, method: &str, params: Value) -> String {
    format!(
        "{}\n",
        json!({"id": id, "method": method, "params": params})
    )
}

/// One JSON-RPC notification line (with `\n`).
pub fn notification(method: &str) -> String {
    format!("{}\n", json!({"method": method}))
}

pub fn initialize_params() -> Value {
    json!({"clientInfo": {"name": "replicas-engine", "version": env!("CARGO_PKG_VERSION")}})
}

/// The agent's instructions for this turn's thread (the repo's system
/// prompt, plus the plan-mode rule).
fn developer_instructions(input: &TurnInput) -> Option<String> {
    input.system_prompt.clone().filter(|p| !p.trim().is_empty())
}

/// `thread/start` (`resume` = None) or `thread/resume` params.
pub fn thread_params(input: &TurnInput, cwd: &str, resume: Option<&str>) -> Value {
    let mut p = json!({
        "cwd": cwd,
        "approvalPolicy": "never",
        "sandbox": if input.plan_mode { "read-only" } else { "danger-full-access" },
    });
    if let Some(t) = resume {
        p["threadId"] = json!(t);
        p["excludeTurns"] = json!(true);
    }
    if let Some(i) = developer_instructions(input) {
        p["developerInstructions"] = json!(i);
    }
    p
}

/// `turn/start` params: the prompt as text, policy by mode, every turn.
pub fn turn_params(thread: &str, input: &TurnInput) -> Value {
    let mut text = input.prompt.clone();
    if input.plan_mode {
        text = format!(
            "{text}\n\n(You are in plan mode: investigate and reply with a plan; do not modify any file.)"
        );
    }
    let mut p = json!({
        "threadId": thread,
        "input": [{"type": "text", "text": text}],
        "approvalPolicy": "never",
        "sandboxPolicy": if input.plan_mode { json!({"type": "readOnly"}) } else { json!({"type": "dangerFullAccess"}) },
    });
    if let Some(m) = input.model.as_deref().filter(|m| !m.is_empty()) {
        p["model"] = json!(m);
    }
    if let Some(level) = &input.thinking_level {
        p["effort"] = json!(match level.as_str() {
            "minimal" | "low" | "medium" | "high" | "xhigh" => level.as_str(),
            "max" => "xhigh",
            _ => "medium",
        });
    }
    p
}

/// The answer to a server request: `Ok(result)` or `Err((code, message))`.
/// The engine runs unattended: approvals follow the chat's mode (plan mode
/// declines anything that would write or run; otherwise accept, the policy
/// `exec` runs with), questions get no answer, anything else is refused.
pub fn answer_server_request(method: &str, plan_mode: bool) -> Result<Value, (i64, String)> {
    let ok = !plan_mode;
    Ok(match method {
        "item/commandExecution/requestApproval" | "item/fileChange/requestApproval" => {
            json!({"decision": if ok { "accept" } else { "decline" }})
        }
        "execCommandApproval" | "applyPatchApproval" => {
            json!({"decision": if ok { "approved" } else { "denied" }})
        }
        "mcpServer/elicitation/request" => json!({"action": "decline"}),
        "item/tool/requestUserInput" => json!({"answers": {}}),
        _ => return Err((-32601, format!("replicas-engine does not handle {method}"))),
    })
}

/// Parser state of one thread (kept across turns: usage is per thread).
#[derive(Debug, Default)]
pub struct AppServerParser {
    /// Thread totals as last reported.
    total: Option<Usage>,
    /// Thread totals when the current turn started.
    baseline: Option<Usage>,
    last_error: Option<String>,
    /// The current turn's id, once `turn/start` answered.
    pub turn_id: Option<String>,
}

impl AppServerParser {
    /// Seed the thread totals (persisted by an earlier engine).
    pub fn with_thread_usage(u: Option<Usage>) -> Self {
        Self {
            total: u,
            ..Self::default()
        }
    }

    /// A new turn starts: usage from here on is its own.
    pub fn begin_turn(&mut self, turn_id: Option<String>) {
        self.baseline = self.total;
        self.last_error = None;
        self.turn_id = turn_id;
    }

    pub fn thread_usage(&self) -> Option<Usage> {
        self.total
    }

    fn turn_usage(&self) -> Usage {
        let Some(t) = self.total else {
            return Usage::default();
        };
        let b = self.baseline.unwrap_or_default();
        Usage {
            input_tokens: t.input_tokens.saturating_sub(b.input_tokens),
            output_tokens: t.output_tokens.saturating_sub(b.output_tokens),
            cached_input_tokens: t.cached_input_tokens.saturating_sub(b.cached_input_tokens),
            cost_usd: None,
        }
    }

    /// One notification into events. `line` is kept as the items' raw.
    pub fn notification(&mut self, method: &str, params: &Value, line: &str) -> Vec<ProviderEvent> {
        let mut out = Vec::new();
        match method {
            "thread/started" => {
                if let Some(id) = params.pointer("/thread/id").and_then(Value::as_str) {
                    out.push(ProviderEvent::SessionId(id.to_string()));
                }
            }
            "item/agentMessage/delta" => {
                if let (Some(id), Some(d)) = (
                    params.get("itemId").and_then(Value::as_str),
                    params.get("delta").and_then(Value::as_str),
                ) {
                    if !d.is_empty() {
                        out.push(ProviderEvent::TextDelta {
                            item_key: id.to_string(),
                            text: d.to_string(),
                        });
                    }
                }
            }
            "item/started" | "item/completed" => {
                if let Some(mut item) = params
                    .get("item")
                    .and_then(|i| item_of(i, method == "item/completed"))
                {
                    item.raw = RawJson::from_text(line);
                    out.push(ProviderEvent::Item(item));
                }
            }
            "thread/tokenUsage/updated" => {
                if let Some(t) = params.pointer("/tokenUsage/total") {
                    let n = |k: &str| t.get(k).and_then(Value::as_u64).unwrap_or(0);
                    self.total = Some(Usage {
                        input_tokens: n("inputTokens"),
                        output_tokens: n("outputTokens"),
                        cached_input_tokens: n("cachedInputTokens"),
                        cost_usd: None,
                    });
                }
            }
            "error" => {
                if let Some(m) = params.pointer("/error/message").and_then(Value::as_str) {
                    self.last_error = Some(m.to_string());
                    let retrying = params.get("willRetry").and_then(Value::as_bool) == Some(true);
                    if !retrying && is_auth_failure(m) {
                        out.push(ProviderEvent::AuthFailure {
                            message: m.to_string(),
                        });
                    }
                }
            }
            "turn/completed" => {
                let turn = params.get("turn").unwrap_or(&Value::Null);
                let id = turn.get("id").and_then(Value::as_str);
                // Another turn's end (none expected) is not ours.
                if self.turn_id.is_some() && id.is_some() && id != self.turn_id.as_deref() {
                    return out;
                }
                let status = turn.get("status").and_then(Value::as_str).unwrap_or("");
                let message = turn
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .or_else(|| self.last_error.clone());
                let outcome = match status {
                    "completed" => Outcome::Completed,
                    "interrupted" => Outcome::Interrupted,
                    _ => {
                        let message = message.unwrap_or_else(|| format!("the turn ended {status}"));
                        if is_auth_failure(&message) {
                            out.push(ProviderEvent::AuthFailure {
                                message: message.clone(),
                            });
                            Outcome::Failed {
                                code: "auth_expired".into(),
                                message,
                            }
                        } else {
                            Outcome::Failed {
                                code: "turn_failed".into(),
                                message,
                            }
                        }
                    }
                };
                out.push(ProviderEvent::Finished(TurnResult {
                    outcome,
                    usage: self.turn_usage(),
                }));
            }
            _ => {}
        }
        out
    }
}

fn text_of(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.as_str().or_else(|| p.get("text").and_then(Value::as_str)))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// One app-server item as a history item (keyed by its id); `None` for
/// kinds the history does not show (the user's own message) or unknown ones.
fn item_of(item: &Value, completed: bool) -> Option<NormalizedItem> {
    let id = item.get("id").and_then(Value::as_str)?;
    let mut out = match item.get("type").and_then(Value::as_str)? {
        "agentMessage" => {
            if !completed {
                return None;
            }
            let mut i = NormalizedItem::new(ItemKind::AssistantMessage);
            i.text = Some(text_of(item.get("text")));
            i
        }
        "reasoning" => {
            if !completed {
                return None;
            }
            let mut text = text_of(item.get("summary"));
            if text.is_empty() {
                text = text_of(item.get("content"));
            }
            if text.is_empty() {
                return None;
            }
            let mut i = NormalizedItem::new(ItemKind::Reasoning);
            i.text = Some(text);
            i
        }
        "commandExecution" => {
            let mut i = NormalizedItem::new(ItemKind::Command);
            let exit_code = item
                .get("exitCode")
                .and_then(Value::as_i64)
                .map(|c| c as i32);
            let status = item.get("status").and_then(Value::as_str).unwrap_or("");
            i.tool = Some(ToolInfo {
                name: "shell".into(),
                input: json!({"command": item.get("command").cloned().unwrap_or(Value::Null)}),
                output: completed.then(|| text_of(item.get("aggregatedOutput"))),
                is_error: matches!(status, "failed" | "declined")
                    || exit_code.is_some_and(|c| c != 0),
                exit_code,
            });
            i
        }
        "fileChange" => {
            let mut i = NormalizedItem::new(ItemKind::FileChange);
            let status = item.get("status").and_then(Value::as_str).unwrap_or("");
            i.tool = Some(ToolInfo {
                name: "apply_patch".into(),
                input: json!({"changes": item.get("changes").cloned().unwrap_or(Value::Null)}),
                output: completed.then(|| status.to_string()),
                is_error: matches!(status, "failed" | "declined"),
                exit_code: None,
            });
            i
        }
        "mcpToolCall" => {
            let mut i = NormalizedItem::new(ItemKind::ToolCall);
            let server = item.get("server").and_then(Value::as_str).unwrap_or("mcp");
            let tool = item.get("tool").and_then(Value::as_str).unwrap_or("tool");
            let status = item.get("status").and_then(Value::as_str).unwrap_or("");
            i.tool = Some(ToolInfo {
                name: format!("{server}.{tool}"),
                input: item.get("arguments").cloned().unwrap_or(Value::Null),
                output: completed.then(|| {
                    item.get("result")
                        .or_else(|| item.get("error"))
                        .map(|v| v.to_string())
                        .unwrap_or_default()
                }),
                is_error: status == "failed",
                exit_code: None,
            });
            i
        }
        "webSearch" => {
            let mut i = NormalizedItem::new(ItemKind::ToolCall);
            i.tool = Some(ToolInfo {
                name: "web_search".into(),
                input: json!({"query": item.get("query").cloned().unwrap_or(Value::Null)}),
                output: None,
                is_error: false,
                exit_code: None,
            });
            i
        }
        _ => return None,
    };
    out.key = Some(id.to_string());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed a recorded transcript; the turn starts at each `turn/started`.
    fn run(p: &mut AppServerParser, name: &str) -> Vec<ProviderEvent> {
        let path = format!(
            "{}/tests/fixtures/codex/{name}.jsonl",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(path).unwrap();
        let mut out = Vec::new();
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let Some(method) = v.get("method").and_then(Value::as_str) else {
                continue;
            };
            if method == "turn/started" {
                let id = v.pointer("/params/turn/id").and_then(Value::as_str);
                p.begin_turn(id.map(str::to_string));
            }
            out.extend(p.notification(method, &v["params"], line));
        }
        out
    }

    fn finished(ev: &[ProviderEvent]) -> Vec<&TurnResult> {
        ev.iter()
            .filter_map(|e| match e {
                ProviderEvent::Finished(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    fn deltas(ev: &[ProviderEvent]) -> String {
        ev.iter()
            .filter_map(|e| match e {
                ProviderEvent::TextDelta { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn tool_turn_streams_text_keyed_like_the_final_message() {
        let ev = run(&mut AppServerParser::default(), "app-server-tool");
        assert!(matches!(&ev[0], ProviderEvent::SessionId(id) if id.starts_with("01a23457")));
        let items: Vec<&NormalizedItem> = ev
            .iter()
            .filter_map(|e| match e {
                ProviderEvent::Item(i) => Some(i),
                _ => None,
            })
            .collect();
        // The command started, then completed (same key), then the answer.
        assert_eq!(items[0].kind, ItemKind::Command);
        assert_eq!(items[0].tool.as_ref().unwrap().output, None);
        assert_eq!(items[1].key, items[0].key);
        let done = items[1].tool.as_ref().unwrap();
        assert_eq!(done.exit_code, Some(0));
        assert!(done.output.as_deref().unwrap().contains("hi"));
        let answer = items[2];
        assert_eq!(answer.kind, ItemKind::AssistantMessage);
        assert_eq!(answer.text.as_deref(), Some(deltas(&ev).as_str()));
        let key = answer.key.clone().unwrap();
        assert!(ev.iter().all(|e| match e {
            ProviderEvent::TextDelta { item_key, .. } => *item_key == key,
            _ => true,
        }));
        let f = finished(&ev);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].outcome, Outcome::Completed);
        assert_eq!(f[0].usage.input_tokens, 40);
        assert_eq!(f[0].usage.output_tokens, 16);
    }

    #[test]
    fn an_interrupted_turn_then_a_normal_one_with_its_own_usage() {
        let ev = run(
            &mut AppServerParser::default(),
            "app-server-interrupt-then-turn",
        );
        let f = finished(&ev);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].outcome, Outcome::Interrupted);
        assert_eq!(f[1].outcome, Outcome::Completed);
        assert!(deltas(&ev).starts_with("tick0 tick1 tick2 "));
        assert_eq!(f[1].usage.input_tokens, 20);
    }

    #[test]
    fn a_resumed_thread_reports_only_the_new_turns_usage() {
        // The resume reports the thread's earlier totals before the turn.
        let ev = run(&mut AppServerParser::default(), "app-server-resume");
        let f = finished(&ev);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].usage.input_tokens, 20);
        assert_eq!(f[0].usage.output_tokens, 8);
    }

    #[test]
    fn plan_mode_transcript_has_no_file_change() {
        let ev = run(
            &mut AppServerParser::default(),
            "app-server-plan-refuses-write",
        );
        assert!(!ev.iter().any(|e| matches!(e, ProviderEvent::Item(i) if i.kind == ItemKind::FileChange && !i.tool.as_ref().unwrap().is_error)));
        assert!(deltas(&ev).contains("read-only"));
    }

    #[test]
    fn failed_and_auth_turns() {
        let mut p = AppServerParser::default();
        p.begin_turn(Some("t1".into()));
        let ev = p.notification(
            "turn/completed",
            &json!({"turn": {"id": "t1", "status": "failed", "error": {"message": "stream disconnected"}}}),
            "{}",
        );
        assert!(
            matches!(&ev[0], ProviderEvent::Finished(TurnResult { outcome: Outcome::Failed { code, .. }, .. }) if code == "turn_failed")
        );
        let ev = p.notification(
            "turn/completed",
            &json!({"turn": {"id": "t1", "status": "failed", "error": {"message": "401 Unauthorized"}}}),
            "{}",
        );
        assert!(matches!(&ev[0], ProviderEvent::AuthFailure { .. }));
        // Another turn's end is not ours; unknown methods and shapes yield nothing.
        assert!(p
            .notification(
                "turn/completed",
                &json!({"turn": {"id": "t9", "status": "completed"}}),
                "{}"
            )
            .is_empty());
        assert!(p
            .notification("item/completed", &json!({"item": 5}), "{}")
            .is_empty());
        assert!(p.notification("what/ever", &json!(null), "{}").is_empty());
    }

    #[test]
    fn server_requests_are_answered_by_mode() {
        let r = answer_server_request("item/fileChange/requestApproval", true).unwrap();
        assert_eq!(r["decision"], "decline");
        let r = answer_server_request("item/commandExecution/requestApproval", false).unwrap();
        assert_eq!(r["decision"], "accept");
        let r = answer_server_request("applyPatchApproval", true).unwrap();
        assert_eq!(r["decision"], "denied");
        let (code, _) =
            answer_server_request("account/chatgptAuthTokens/refresh", false).unwrap_err();
        assert_eq!(code, -32601);
    }

    #[test]
    fn turn_params_carry_the_mode_every_turn() {
        let input = TurnInput {
            prompt: "p".into(),
            plan_mode: true,
            ..TurnInput::default()
        };
        let p = turn_params("th", &input);
        assert_eq!(p["sandboxPolicy"]["type"], "readOnly");
        assert_eq!(p["approvalPolicy"], "never");
        let p = turn_params("th", &TurnInput::default());
        assert_eq!(p["sandboxPolicy"]["type"], "dangerFullAccess");
        assert_eq!(thread_params(&input, "/w", Some("th"))["threadId"], "th");
    }
}
