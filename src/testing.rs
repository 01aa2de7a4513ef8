//! Test-only helpers shared by unit tests: proptest strategies for
//! arbitrary JSON shaped like what the agent CLIs and repo configs carry.

use proptest::prelude::*;
use serde_json::Value;

/// Field names and `type` values the parsers look at, so generated objects
/// reach past the first `match` instead of being ignored at once.
const WORDS: &[&str] = &[
    "type",
    "subtype",
    "message",
    "content",
    "item",
    "items",
    "text",
    "usage",
    "id",
    "name",
    "input",
    "result",
    "error",
    "errors",
    "is_error",
    "session_id",
    "thread_id",
    "event",
    "delta",
    "index",
    "tool_use_id",
    "exit_code",
    "changes",
    "path",
    "kind",
    "status",
    "command",
    "aggregated_output",
    "arguments",
    "thinking",
    "total_cost_usd",
    "permission_denials",
    "api_error_status",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_read_input_tokens",
    "assistant",
    "user",
    "system",
    "result",
    "stream_event",
    "content_block_delta",
    "content_block_start",
    "message_start",
    "text_delta",
    "tool_use",
    "tool_result",
    "server_tool_use",
    "redacted_thinking",
    "init",
    "success",
    "error_during_execution",
    "thread.started",
    "turn.started",
    "turn.completed",
    "turn.failed",
    "item.started",
    "item.updated",
    "item.completed",
    "agent_message",
    "reasoning",
    "command_execution",
    "file_change",
    "mcp_tool_call",
    "web_search",
    "todo_list",
    "systemPrompt",
    "startHook",
    "warmHook",
    "commands",
    "timeout",
    "separate",
];

fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(WORDS).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

/// Any JSON value, biased towards known keys and `type` values.
pub fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        word().prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 96, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(word(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An object with a known `type` (and sometimes `subtype`) plus arbitrary
/// fields: the shape of one CLI line.
pub fn arb_event() -> impl Strategy<Value = Value> {
    (
        proptest::sample::select(WORDS),
        proptest::option::of(proptest::sample::select(WORDS)),
        proptest::collection::btree_map(word(), arb_json(), 0..8),
    )
        .prop_map(|(ty, sub, fields)| {
            let mut o: serde_json::Map<String, Value> = fields.into_iter().collect();
            o.insert("type".into(), Value::from(ty));
            if let Some(s) = sub {
                o.insert("subtype".into(), Value::from(s));
            }
            Value::Object(o)
        })
}
