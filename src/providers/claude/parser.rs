//! Claude's stdout (stream-json output) into [`ProviderEvent`]s: a tolerant
//! parser, unit-tested against the recorded transcripts.
//!
//! Output shapes (see `tests/fixtures/claude/`): `system`/`init` carries the
//! session id; `assistant` lines carry one or more content blocks (`text`,
//! `thinking`, `tool_use`); `user` lines carry `tool_result` blocks; with
//! `--include-partial-messages` `stream_event` lines carry text deltas; a
//! `result` line ends the turn, success read from `subtype` + `is_error`.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};

use serde_json::Value;

use super::super::{
    attach_raw, ItemKind, NormalizedItem, Outcome, ProviderEvent, ToolInfo, TurnResult, Usage,
};

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
    try_parse_line(p, line).unwrap_or_default()
}

/// [`parse_line`], telling a line that is not JSON (`Err`) from one that
/// yields nothing.
///
/// `stream_event` lines (most of a streamed turn: one per text delta) take a
/// typed fast path that borrows from the line and skips what it does not
/// need, instead of building a full JSON tree.
pub fn try_parse_line(
    p: &mut ClaudeParser,
    line: &str,
) -> Result<Vec<ProviderEvent>, serde_json::Error> {
    let head = &line.as_bytes()[..line.len().min(48)];
    if memchr::memmem::find(head, b"\"stream_event\"").is_some() {
        match serde_json::from_str::<StreamLine<'_>>(line) {
            Ok(l) if l.kind == "stream_event" => {
                let mut out = Vec::new();
                stream_event(p, l, &mut out);
                return Ok(out);
            }
            _ => {} // not what it looked like: the general path decides
        }
    }
    let v = serde_json::from_str::<Value>(line)?;
    Ok(parse_value(p, v, line))
}

/// The parts of a `stream_event` line we read.
#[derive(serde::Deserialize)]
struct StreamLine<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    event: StreamEvent<'a>,
    #[serde(default)]
    parent_tool_use_id: Option<serde::de::IgnoredAny>,
}

#[derive(serde::Deserialize)]
struct StreamEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    index: u64,
    #[serde(default, borrow)]
    delta: Option<StreamDelta<'a>>,
    #[serde(default, borrow)]
    content_block: Option<Typed<'a>>,
    #[serde(default, borrow)]
    message: Option<StreamMessage<'a>>,
}

#[derive(serde::Deserialize)]
struct StreamDelta<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct Typed<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Cow<'a, str>,
}

#[derive(serde::Deserialize)]
struct StreamMessage<'a> {
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
}

/// [`parse_line`] for an already parsed line (`line` is its text, kept as
/// the items' `raw`).
pub fn parse_value(p: &mut ClaudeParser, v: Value, line: &str) -> Vec<ProviderEvent> {
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
                    out.push(ProviderEvent::Item(item));
                }
            }
        }
        // Lines the fast path did not take (other key order or spacing).
        // Rare: the fast path in `try_parse_line` takes the CLI's own key order.
        "stream_event" => {
            let text = v.to_string();
            if let Ok(l) = serde_json::from_str::<StreamLine<'_>>(&text) {
                stream_event(p, l, &mut out);
            }
        }
        "assistant" => assistant(p, &v, &mut out),
        "user" => user(p, &v, &mut out),
        "result" => result(p, &v, &mut out),
        _ => {}
    }
    attach_raw(&mut out, line);
    out
}

fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn stream_event(p: &mut ClaudeParser, l: StreamLine<'_>, out: &mut Vec<ProviderEvent>) {
    // Deltas of sub-agents (parent_tool_use_id set) are not streamed; their
    // final lines still arrive.
    if l.parent_tool_use_id.is_some() {
        return;
    }
    let ev = l.event;
    match &*ev.kind {
        "message_start" => {
            p.stream_msg = ev.message.and_then(|m| m.id).map(Cow::into_owned);
            p.streamed_text_keys.clear();
            p.block_keys.clear();
        }
        "content_block_start" if ev.content_block.is_some_and(|b| b.kind == "text") => {
            let key = format!("{}:{}", p.stream_msg.as_deref().unwrap_or("msg"), ev.index);
            p.block_keys.insert(ev.index, key.clone());
            p.streamed_text_keys.push_back(key);
        }
        "content_block_delta" => {
            let Some(delta) = ev.delta.filter(|d| d.kind == "text_delta") else {
                return;
            };
            let text = delta.text.unwrap_or_default();
            if let (Some(key), false) = (p.block_keys.get(&ev.index), text.is_empty()) {
                out.push(ProviderEvent::TextDelta {
                    item_key: key.clone(),
                    text: text.into_owned(),
                });
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
                out.push(ProviderEvent::Item(item));
            }
            "text" => {
                // The CLI's own notes in the user role, e.g.
                // "[Request interrupted by user]".
                let text = block.get("text").and_then(Value::as_str).unwrap_or("");
                if text.starts_with('[') {
                    let mut item = NormalizedItem::new(ItemKind::System);
                    item.text = Some(text.to_string());
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
        item.raw = super::super::RawJson::from_serialize(denial).ok();
        out.push(ProviderEvent::Item(item));
    }
    let usage = result_usage(v);
    let subtype = v.get("subtype").and_then(Value::as_str).unwrap_or("");
    let is_error = v.get("is_error").and_then(Value::as_bool).unwrap_or(false);
    let outcome = if subtype == "success" && !is_error {
        Outcome::Completed
    } else {
        let message = result_message(v);
        // Reported once per turn: the assistant line may have done it.
        let already = p.auth_failed;
        let auth = already
            || v.get("api_error_status").and_then(Value::as_u64) == Some(401)
            || is_auth_failure(&message);
        if auth {
            if !already {
                out.push(ProviderEvent::AuthFailure {
                    message: message.clone(),
                });
            }
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
    p.auth_failed = false;
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

/// Whether an error says the session to resume does not exist.
pub fn is_missing_session(text: &str) -> bool {
    text.contains("No conversation found with session ID")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<ProviderEvent> {
        let path = format!(
            "{}/tests/fixtures/claude/{name}.jsonl",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let mut p = ClaudeParser::new();
        text.lines().flat_map(|l| parse_line(&mut p, l)).collect()
    }

    use crate::providers::items;

    fn finished(events: &[ProviderEvent]) -> Vec<&TurnResult> {
        events
            .iter()
            .filter_map(|e| match e {
                ProviderEvent::Finished(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn plain_turn_gives_session_text_and_usage() {
        let ev = fixture("hello_noenv");
        assert_eq!(
            ev[0],
            ProviderEvent::SessionId("18820089-7232-4e4e-bec8-b787c01811ff".into())
        );
        let it = items(&ev);
        assert_eq!(it.len(), 1);
        assert_eq!(it[0].kind, ItemKind::AssistantMessage);
        assert_eq!(it[0].text.as_deref(), Some("Hello from mock Anthropic!"));
        assert!(it[0].raw.is_some());
        let f = finished(&ev);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].outcome, Outcome::Completed);
        assert_eq!(f[0].usage.input_tokens, 12);
        assert_eq!(f[0].usage.output_tokens, 7);
        assert_eq!(f[0].usage.cached_input_tokens, 0);
        assert_eq!(f[0].usage.cost_usd, Some(0.000235));
        assert!(matches!(ev.last(), Some(ProviderEvent::Finished(_))));
    }

    #[test]
    fn resume_and_sessionid_transcripts_report_their_session() {
        for (name, id) in [
            ("resume", "dd779b37-128a-4039-8e75-07d6bc1c9dc7"),
            ("sessionid", "5e8676ab-63fe-4e08-a37a-bac9f9be2cd2"),
        ] {
            let ev = fixture(name);
            assert_eq!(ev[0], ProviderEvent::SessionId(id.into()), "{name}");
            assert_eq!(finished(&ev)[0].outcome, Outcome::Completed, "{name}");
            assert_eq!(items(&ev).len(), 1, "{name}");
        }
    }

    #[test]
    fn bash_tool_turn_has_call_result_and_answer() {
        let ev = fixture("tool_bash");
        let it = items(&ev);
        let kinds: Vec<ItemKind> = it.iter().map(|i| i.kind).collect();
        assert_eq!(
            kinds,
            vec![
                ItemKind::ToolCall,
                ItemKind::ToolResult,
                ItemKind::AssistantMessage
            ]
        );
        let call = it[0].tool.as_ref().unwrap();
        assert_eq!(call.name, "Bash");
        assert_eq!(call.input["command"], "echo hi");
        assert_eq!(it[0].key.as_deref(), Some("toolu_3e2be0c0451e4505a820"));
        let res = it[1].tool.as_ref().unwrap();
        assert_eq!(res.name, "Bash", "the result names its tool");
        assert_eq!(res.output.as_deref(), Some("hi"));
        assert!(!res.is_error);
        assert_eq!(
            it[1].key.as_deref(),
            Some("result:toolu_3e2be0c0451e4505a820")
        );
        assert_eq!(it[2].text.as_deref(), Some("Tool result was: hi"));
        let f = finished(&ev);
        assert_eq!(f[0].usage.input_tokens, 24);
        assert_eq!(f[0].usage.output_tokens, 14);
    }

    #[test]
    fn write_tool_turn() {
        let ev = fixture("tool_write");
        let it = items(&ev);
        let call = it[0].tool.as_ref().unwrap();
        assert_eq!(call.name, "Write");
        assert_eq!(call.input["content"], "written by mock\n");
        assert!(it[1]
            .tool
            .as_ref()
            .unwrap()
            .output
            .as_deref()
            .unwrap()
            .starts_with("File created"));
        assert_eq!(finished(&ev)[0].outcome, Outcome::Completed);
    }

    #[test]
    fn permission_denials_become_error_items() {
        let ev = fixture("write_defaultperm");
        let it = items(&ev);
        let result = it.iter().find(|i| i.kind == ItemKind::ToolResult).unwrap();
        assert!(result.tool.as_ref().unwrap().is_error);
        let denial = it.iter().find(|i| i.kind == ItemKind::Error).unwrap();
        assert_eq!(denial.text.as_deref(), Some("Permission denied for Write"));
        assert_eq!(
            denial.tool.as_ref().unwrap().input["content"],
            "written by mock\n"
        );
        // The turn itself succeeded: the agent answered.
        assert_eq!(finished(&ev)[0].outcome, Outcome::Completed);
    }

    #[test]
    fn partial_messages_stream_deltas_keyed_like_the_final_text() {
        let ev = fixture("partial");
        let deltas: Vec<(&str, &str)> = ev
            .iter()
            .filter_map(|e| match e {
                ProviderEvent::TextDelta { item_key, text } => {
                    Some((item_key.as_str(), text.as_str()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(deltas.len(), 4);
        let joined: String = deltas.iter().map(|(_, t)| *t).collect();
        assert_eq!(joined, "Hello from mock Anthropic!");
        let it = items(&ev);
        assert_eq!(it.len(), 1);
        assert_eq!(it[0].key.as_deref(), Some(deltas[0].0));
        assert!(deltas.iter().all(|(k, _)| *k == deltas[0].0));
    }

    #[test]
    fn sigint_result_is_a_failure_with_the_cli_reason() {
        let ev = fixture("sigint");
        let it = items(&ev);
        assert_eq!(it[0].text.as_deref(), Some("tick0 tick1 tick2 tick3 "));
        assert_eq!(it[1].kind, ItemKind::System);
        assert_eq!(it[1].text.as_deref(), Some("[Request interrupted by user]"));
        match &finished(&ev)[0].outcome {
            Outcome::Failed { code, message } => {
                assert_eq!(code, "error_during_execution");
                assert!(message.contains("ede_diagnostic"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn stream_json_interrupt_then_second_turn_in_one_process() {
        let ev = fixture("streamjson_interrupt");
        let f = finished(&ev);
        assert_eq!(f.len(), 2, "two turns, two results");
        assert!(matches!(f[0].outcome, Outcome::Failed { .. }));
        assert_eq!(f[1].outcome, Outcome::Completed);
        // The control_response line yields nothing; each turn's init repeats the session.
        let ids = ev
            .iter()
            .filter(|e| matches!(e, ProviderEvent::SessionId(_)))
            .count();
        assert!(ids >= 2);
        // Deltas of the second turn are keyed by the second message.
        let keys: Vec<&str> = ev
            .iter()
            .filter_map(|e| match e {
                ProviderEvent::TextDelta { item_key, .. } => Some(item_key.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(keys.len(), 7);
        assert!(keys[0].starts_with("msg_12f2440efe40492094982ec7"));
        assert!(keys[6].starts_with("msg_422d53b2d0cc4339aee7d8d2"));
        let texts: Vec<&NormalizedItem> = items(&ev)
            .into_iter()
            .filter(|i| i.kind == ItemKind::AssistantMessage)
            .collect();
        assert_eq!(texts.len(), 2);
        assert_eq!(texts[1].key.as_deref(), Some(keys[6]));
    }

    #[test]
    fn stream_events_parse_the_same_whatever_the_spacing() {
        let path = format!(
            "{}/tests/fixtures/claude/partial.jsonl",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let (mut a, mut b) = (ClaudeParser::new(), ClaudeParser::new());
        for line in text.lines() {
            // Python's json.dumps style: spaces after separators.
            let v: Value = serde_json::from_str(line).unwrap();
            let spaced = serde_json::to_string_pretty(&v).unwrap().replace('\n', "");
            assert_eq!(parse_line(&mut a, line), parse_line(&mut b, &spaced));
        }
        // A line that mentions stream_event but is something else.
        let odd = r#"{"type":"assistant","note":"stream_event","message":{"id":"m","content":[{"type":"text","text":"x"}]}}"#;
        assert!(matches!(
            &parse_line(&mut a, odd)[..],
            [ProviderEvent::Item(_)]
        ));
        assert!(try_parse_line(&mut a, "{\"type\":\"stream_event\"").is_err());
    }

    #[test]
    fn unknown_and_broken_lines_yield_nothing() {
        let mut p = ClaudeParser::new();
        for line in [
            "",
            "not json",
            "{\"type\":\"something_new\",\"x\":1}",
            "[1,2]",
            "{\"type\":\"assistant\"}",
            "{\"type\":\"assistant\",\"message\":{\"content\":\"oops\"}}",
            "{\"type\":\"user\",\"message\":{\"content\":[{\"type\":\"tool_result\"}]}}",
            "{\"type\":\"stream_event\",\"event\":{\"type\":\"content_block_delta\",\"index\":9,\"delta\":{\"type\":\"text_delta\",\"text\":\"x\"}}}",
            "{\"type\":\"system\",\"subtype\":\"status\"}",
            "{\"type\":\"control_response\",\"response\":{}}",
        ] {
            let ev = parse_line(&mut p, line);
            assert!(ev.iter().all(|e| !matches!(e, ProviderEvent::Finished(_))), "{line}");
        }
        // A result with nothing but its type still ends the turn, as a failure.
        let ev = parse_line(&mut p, "{\"type\":\"result\"}");
        assert!(matches!(
            &ev[..],
            [ProviderEvent::Finished(TurnResult {
                outcome: Outcome::Failed { .. },
                ..
            })]
        ));
    }

    #[test]
    fn auth_failure_is_reported_and_fails_the_turn() {
        let mut p = ClaudeParser::new();
        let a = r#"{"type":"assistant","message":{"id":"m1","content":[{"type":"text","text":"Invalid API key · Please run /login"}]},"error":"authentication_failed"}"#;
        let ev = parse_line(&mut p, a);
        assert!(matches!(&ev[0], ProviderEvent::AuthFailure { .. }));
        assert!(matches!(&ev[1], ProviderEvent::Item(i) if i.kind == ItemKind::Error));
        let r = r#"{"type":"result","subtype":"success","is_error":true,"result":"Invalid API key · Please run /login"}"#;
        let ev = parse_line(&mut p, r);
        match ev.last() {
            Some(ProviderEvent::Finished(TurnResult {
                outcome: Outcome::Failed { code, .. },
                ..
            })) => assert_eq!(code, "auth_expired"),
            other => panic!("unexpected {other:?}"),
        }
        // A plain API error is a failure, not an auth problem.
        let r = r#"{"type":"result","subtype":"success","is_error":true,"result":"API Error: 500 overloaded"}"#;
        match parse_line(&mut p, r).as_slice() {
            [ProviderEvent::Finished(TurnResult {
                outcome: Outcome::Failed { code, message },
                ..
            })] => {
                assert_eq!(code, "error");
                assert!(message.contains("500"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Property tests: whatever the CLI prints, the parser neither panics nor
/// invents a turn end from non-JSON; a non-JSON line is a clear error.
#[cfg(test)]
mod proptests {
    use super::*;
    use crate::testing::{arb_event, arb_json};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary bytes (as the line reader decodes them): no panic; if
        /// they are not JSON, `try_parse_line` says so with a position.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let line = String::from_utf8_lossy(&bytes);
            let mut p = ClaudeParser::new();
            match try_parse_line(&mut p, &line) {
                Ok(_) => prop_assert!(serde_json::from_str::<Value>(&line).is_ok()),
                Err(e) => prop_assert!(e.line() >= 1 && !e.to_string().is_empty()),
            }
            let _ = parse_line(&mut p, &line);
        }

        /// Arbitrary JSON values and CLI-shaped objects, many through one
        /// parser (its state carries across lines): no panic, at most one
        /// `Finished` per line.
        #[test]
        fn arbitrary_json_lines_never_panic(
            lines in proptest::collection::vec(prop_oneof![arb_json(), arb_event()], 1..12)
        ) {
            let mut p = ClaudeParser::new();
            for v in lines {
                let line = v.to_string();
                let events = try_parse_line(&mut p, &line).expect("valid JSON parses");
                let ends = events.iter().filter(|e| matches!(e, ProviderEvent::Finished(_))).count();
                prop_assert!(ends <= 1);
            }
        }

        /// The `stream_event` fast path with arbitrary payloads.
        #[test]
        fn arbitrary_stream_events_never_panic(event in arb_json(), session in arb_json()) {
            let line = serde_json::json!({"type": "stream_event", "event": event, "session_id": session}).to_string();
            let mut p = ClaudeParser::new();
            prop_assert!(try_parse_line(&mut p, &line).is_ok());
        }
    }
}
