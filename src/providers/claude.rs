//! Claude Code (`claude -p`) in stream-json mode: the pure parts. Argument
//! building for one long-lived process, the stdin lines we write (user
//! messages, the interrupt control request), and a tolerant parser of its
//! stdout lines into [`ProviderEvent`]s.
//!
//! Output shapes (see `tests/fixtures/claude/`): `system`/`init` carries the
//! session id; `assistant` lines carry one or more content blocks (`text`,
//! `thinking`, `tool_use`); `user` lines carry `tool_result` blocks; with
//! `--include-partial-messages` `stream_event` lines carry text deltas; a
//! `result` line ends the turn, success read from `subtype` + `is_error`.

use std::collections::{HashMap, VecDeque};

use serde_json::{json, Value};

use super::{Image, ItemKind, NormalizedItem, Outcome, ProviderEvent, ToolInfo, TurnResult, Usage};

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

/// The stdin line (with `\n`) that sends a user message.
pub fn user_message_line(prompt: &str, images: &[Image]) -> String {
    let mut content = Vec::with_capacity(1 + images.len());
    for img in images {
        content.push(json!({
            "type": "image",
            "source": {"type": "base64", "media_type": img.media_type, "data": img.data_base64},
        }));
    }
    content.push(json!({"type": "text", "text": prompt}));
    let msg = json!({
        "type": "user",
        "message": {"role": "user", "content": content},
        "parent_tool_use_id": null,
        "session_id": "",
    });
    format!("{msg}\n")
}

/// The stdin line (with `\n`) that interrupts the running turn.
pub fn interrupt_line(request_id: &str) -> String {
    let req = json!({
        "type": "control_request",
        "request_id": request_id,
        "request": {"subtype": "interrupt"},
    });
    format!("{req}\n")
}

/// Parser state across the lines of one process.
#[derive(Debug, Default)]
pub struct ClaudeParser {
    /// Tool names by `tool_use` id, so a result can name its tool.
    tool_names: HashMap<String, String>,
    /// Message id of the streamed message (`message_start`).
    stream_msg: Option<String>,
    /// Keys of text blocks streamed in the current message, in order, not
    /// yet matched to their final `assistant` line.
    streamed_text_keys: VecDeque<String>,
    /// Stream block index → key, for deltas.
    block_keys: HashMap<u64, String>,
    /// Set when an `assistant` line reported an authentication error, so the
    /// `result` that follows fails with `auth_expired`.
    auth_failed: bool,
}

impl ClaudeParser {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Parse one stdout line. Unknown types and fields yield nothing; a line
/// that is not JSON yields nothing (the caller logs it).
pub fn parse_line(p: &mut ClaudeParser, line: &str) -> Vec<ProviderEvent> {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return Vec::new();
    };
    parse_value(p, v)
}

/// [`parse_line`] for an already parsed line.
pub fn parse_value(p: &mut ClaudeParser, v: Value) -> Vec<ProviderEvent> {
    let mut out = Vec::new();
    match v.get("type").and_then(Value::as_str).unwrap_or("") {
        "system" => {
            if v.get("subtype").and_then(Value::as_str) == Some("init") {
                if let Some(id) = str_field(&v, "session_id") {
                    out.push(ProviderEvent::SessionId(id.to_string()));
                }
            } else if let Some(sub) = v.get("subtype").and_then(Value::as_str) {
                // `status` (requesting…) is noise; other subtypes (compaction,
                // hooks) are worth a line in the history.
                if sub == "compact_boundary" {
                    let mut item = NormalizedItem::new(ItemKind::System);
                    item.text = Some("Conversation compacted".into());
                    item.raw = Some(v);
                    out.push(ProviderEvent::Item(item));
                }
            }
        }
        "stream_event" => stream_event(p, &v, &mut out),
        "assistant" => assistant(p, &v, &mut out),
        "user" => user(p, &v, &mut out),
        "result" => result(p, &v, &mut out),
        _ => {}
    }
    out
}

fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn stream_event(p: &mut ClaudeParser, v: &Value, out: &mut Vec<ProviderEvent>) {
    // Deltas of sub-agents (parent_tool_use_id set) are not streamed; their
    // final lines still arrive.
    if v.get("parent_tool_use_id").is_some_and(|x| !x.is_null()) {
        return;
    }
    let Some(ev) = v.get("event") else { return };
    match ev.get("type").and_then(Value::as_str).unwrap_or("") {
        "message_start" => {
            p.stream_msg = ev
                .pointer("/message/id")
                .and_then(Value::as_str)
                .map(str::to_string);
            p.streamed_text_keys.clear();
            p.block_keys.clear();
        }
        "content_block_start" => {
            let idx = ev.get("index").and_then(Value::as_u64).unwrap_or(0);
            let kind = ev.pointer("/content_block/type").and_then(Value::as_str);
            if kind == Some("text") {
                let key = format!("{}:{idx}", p.stream_msg.as_deref().unwrap_or("msg"));
                p.block_keys.insert(idx, key.clone());
                p.streamed_text_keys.push_back(key);
            }
        }
        "content_block_delta" => {
            let idx = ev.get("index").and_then(Value::as_u64).unwrap_or(0);
            if ev.pointer("/delta/type").and_then(Value::as_str) == Some("text_delta") {
                let text = ev
                    .pointer("/delta/text")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if let (Some(key), false) = (p.block_keys.get(&idx), text.is_empty()) {
                    out.push(ProviderEvent::TextDelta {
                        item_key: key.clone(),
                        text: text.to_string(),
                    });
                }
            }
        }
        _ => {}
    }
}

fn assistant(p: &mut ClaudeParser, v: &Value, out: &mut Vec<ProviderEvent>) {
    let msg_id = v
        .pointer("/message/id")
        .and_then(Value::as_str)
        .unwrap_or("msg");
    let blocks = v.pointer("/message/content").and_then(Value::as_array);
    // The CLI marks a failed API call on the message (`"error":
    // "authentication_failed"`, …); its text is the human explanation.
    let error = str_field(v, "error");
    for (i, block) in blocks.into_iter().flatten().enumerate() {
        match block.get("type").and_then(Value::as_str).unwrap_or("") {
            "text" => {
                let text = block.get("text").and_then(Value::as_str).unwrap_or("");
                if let Some(err) = error {
                    if is_auth_failure(err) || is_auth_failure(text) {
                        p.auth_failed = true;
                        out.push(ProviderEvent::AuthFailure {
                            message: text.to_string(),
                        });
                    }
                    let mut item = NormalizedItem::new(ItemKind::Error);
                    item.text = Some(text.to_string());
                    item.raw = Some(v.clone());
                    out.push(ProviderEvent::Item(item));
                    continue;
                }
                // Pair the final text with the block whose deltas were
                // streamed so the chat can update the same item.
                let key = match p.streamed_text_keys.pop_front() {
                    Some(k) if k.starts_with(msg_id) => k,
                    _ => format!("{msg_id}:{i}"),
                };
                let mut item = NormalizedItem::new(ItemKind::AssistantMessage);
                item.text = Some(text.to_string());
                item.key = Some(key);
                item.raw = Some(v.clone());
                out.push(ProviderEvent::Item(item));
            }
            "thinking" | "redacted_thinking" => {
                let text = block.get("thinking").and_then(Value::as_str).unwrap_or("");
                if text.is_empty() {
                    continue;
                }
                let mut item = NormalizedItem::new(ItemKind::Reasoning);
                item.text = Some(text.to_string());
                item.key = Some(format!("{msg_id}:thinking:{i}"));
                item.raw = Some(v.clone());
                out.push(ProviderEvent::Item(item));
            }
            "tool_use" | "server_tool_use" => {
                let id = block.get("id").and_then(Value::as_str).unwrap_or("");
                let name = block.get("name").and_then(Value::as_str).unwrap_or("tool");
                p.tool_names.insert(id.to_string(), name.to_string());
                let mut item = NormalizedItem::new(ItemKind::ToolCall);
                item.tool = Some(ToolInfo {
                    name: name.to_string(),
                    input: block.get("input").cloned().unwrap_or(Value::Null),
                    output: None,
                    is_error: false,
                    exit_code: None,
                });
                item.key = Some(id.to_string());
                item.raw = Some(v.clone());
                out.push(ProviderEvent::Item(item));
            }
            _ => {}
        }
    }
}

fn user(p: &mut ClaudeParser, v: &Value, out: &mut Vec<ProviderEvent>) {
    let content = v.pointer("/message/content");
    // A plain string is our own prompt echoed back (--replay-user-messages);
    // the chat service records the user's message itself.
    let Some(blocks) = content.and_then(Value::as_array) else {
        return;
    };
    for block in blocks {
        match block.get("type").and_then(Value::as_str).unwrap_or("") {
            "tool_result" => {
                let id = block
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let name = p
                    .tool_names
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| "tool".into());
                let mut item = NormalizedItem::new(ItemKind::ToolResult);
                item.tool = Some(ToolInfo {
                    name,
                    input: Value::Null,
                    output: Some(tool_result_text(block.get("content"))),
                    is_error: block
                        .get("is_error")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    exit_code: None,
                });
                item.key = Some(format!("result:{id}"));
                item.raw = Some(v.clone());
                out.push(ProviderEvent::Item(item));
            }
            "text" => {
                // The CLI's own notes in the user role, e.g.
                // "[Request interrupted by user]".
                let text = block.get("text").and_then(Value::as_str).unwrap_or("");
                if text.starts_with('[') {
                    let mut item = NormalizedItem::new(ItemKind::System);
                    item.text = Some(text.to_string());
                    item.raw = Some(v.clone());
                    out.push(ProviderEvent::Item(item));
                }
            }
            _ => {}
        }
    }
}

/// A tool result's content is a string or a list of blocks.
fn tool_result_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter_map(|b| match b.get("type").and_then(Value::as_str) {
                Some("text") => b.get("text").and_then(Value::as_str).map(str::to_string),
                Some("image") => Some("[image]".to_string()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn result(p: &mut ClaudeParser, v: &Value, out: &mut Vec<ProviderEvent>) {
    if let Some(id) = str_field(v, "session_id") {
        out.push(ProviderEvent::SessionId(id.to_string()));
    }
    for denial in v
        .get("permission_denials")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let tool = denial
            .get("tool_name")
            .and_then(Value::as_str)
            .unwrap_or("tool");
        let mut item = NormalizedItem::new(ItemKind::Error);
        item.text = Some(format!("Permission denied for {tool}"));
        item.tool = Some(ToolInfo {
            name: tool.to_string(),
            input: denial.get("tool_input").cloned().unwrap_or(Value::Null),
            output: None,
            is_error: true,
            exit_code: None,
        });
        item.raw = Some(denial.clone());
        out.push(ProviderEvent::Item(item));
    }
    let usage = result_usage(v);
    let subtype = v.get("subtype").and_then(Value::as_str).unwrap_or("");
    let is_error = v.get("is_error").and_then(Value::as_bool).unwrap_or(false);
    let outcome = if subtype == "success" && !is_error {
        Outcome::Completed
    } else {
        let message = result_message(v);
        let auth = p.auth_failed
            || v.get("api_error_status").and_then(Value::as_u64) == Some(401)
            || is_auth_failure(&message);
        p.auth_failed = false;
        if auth {
            out.push(ProviderEvent::AuthFailure {
                message: message.clone(),
            });
            Outcome::Failed {
                code: "auth_expired".into(),
                message,
            }
        } else {
            let code = if subtype.is_empty() || subtype == "success" {
                "error".to_string()
            } else {
                subtype.to_string()
            };
            Outcome::Failed { code, message }
        }
    };
    // A new turn starts a new message stream.
    p.streamed_text_keys.clear();
    p.block_keys.clear();
    out.push(ProviderEvent::Finished(TurnResult { outcome, usage }));
}

/// The human explanation of a failed result: `errors`, else `result`.
fn result_message(v: &Value) -> String {
    let errors: Vec<String> = v
        .get("errors")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| match e {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect();
    if !errors.is_empty() {
        return errors.join("; ");
    }
    match str_field(v, "result") {
        Some(r) => r.to_string(),
        None => format!(
            "claude reported {}",
            v.get("subtype")
                .and_then(Value::as_str)
                .unwrap_or("an error")
        ),
    }
}

/// `input_tokens` includes cache reads and writes (Anthropic reports them
/// separately); `cached_input_tokens` is the cache reads.
fn result_usage(v: &Value) -> Usage {
    let u = v.get("usage");
    let n = |k: &str| {
        u.and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let cached = n("cache_read_input_tokens");
    Usage {
        input_tokens: n("input_tokens") + n("cache_creation_input_tokens") + cached,
        output_tokens: n("output_tokens"),
        cached_input_tokens: cached,
        cost_usd: v.get("total_cost_usd").and_then(Value::as_f64),
    }
}

/// Whether an error text reports bad or expired credentials.
pub fn is_auth_failure(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "authentication_failed",
        "authentication_error",
        "invalid api key",
        "invalid x-api-key",
        "oauth token has expired",
        "please run /login",
        "401",
        "unauthorized",
    ]
    .iter()
    .any(|needle| t.contains(needle))
}
