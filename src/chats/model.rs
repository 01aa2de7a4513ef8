//! The chat types: what `chats.json` stores ([`ChatRecord`]) and what the
//! wire shows ([`Chat`], [`Message`], [`HistoryItem`]). The wire `Chat` is
//! derived from the record plus live facts (hooks finished, interrupt in
//! progress), never stored, so the two cannot disagree.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use crate::providers::{ItemKind, ProviderKind, ToolInfo, Usage};

/// Default title of a new chat.
pub fn default_title(provider: ProviderKind) -> &'static str {
    match provider {
        ProviderKind::Claude => "Claude chat",
        ProviderKind::Codex => "Codex chat",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChatStatus {
    Idle,
    Running,
    Interrupting,
    WaitingForHooks,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ThinkingLevel {
    Low,
    Medium,
    High,
    Max,
}

impl ThinkingLevel {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "low" => Some(Self::Low),
            "medium" => Some(Self::Medium),
            "high" => Some(Self::High),
            "max" => Some(Self::Max),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Max => "max",
        }
    }
}

/// A message as accepted: queued, or the one a turn is working on. The wire
/// shows `images` as a count; the image blocks themselves live in a side
/// file (see `store::Attachments`) so `chats.json` stays small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub id: String,
    pub text: String,
    pub queued_at: String,
    pub plan_mode: bool,
    pub model: Option<String>,
    pub images: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub thinking_level: Option<ThinkingLevel>,
}

/// Characters of a queued message's text that the wire shows.
pub const PREVIEW_CHARS: usize = 280;

/// A message as the wire shows it in `Chat.queue` and `chat.turn.accepted`:
/// the first [`PREVIEW_CHARS`] characters of its text and the full length.
/// The full text is stored once (with the record) and reaches the agent and
/// the history; repeating it in every `chat.updated` would make the journal
/// grow with the square of the queue.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Message)]
pub struct MessagePreview {
    pub id: String,
    /// The first [`PREVIEW_CHARS`] characters of the text.
    pub text: String,
    /// Length of the full text in characters (Unicode scalar values).
    pub text_length: usize,
    /// `text` is shorter than the full text.
    pub truncated: bool,
    pub queued_at: String,
    pub plan_mode: bool,
    pub model: Option<String>,
    /// How many images the message carries.
    pub images: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
    pub thinking_level: Option<ThinkingLevel>,
}

impl Message {
    /// The wire view: text cut at [`PREVIEW_CHARS`] characters.
    pub fn preview(&self) -> MessagePreview {
        let (text, text_length) = match self.text.char_indices().nth(PREVIEW_CHARS) {
            Some((cut, _)) => (
                self.text[..cut].to_owned(),
                PREVIEW_CHARS + self.text[cut..].chars().count(),
            ),
            None => (self.text.clone(), self.text.chars().count()),
        };
        MessagePreview {
            id: self.id.clone(),
            truncated: text_length > PREVIEW_CHARS,
            text,
            text_length,
            queued_at: self.queued_at.clone(),
            plan_mode: self.plan_mode,
            model: self.model.clone(),
            images: self.images,
            thinking_level: self.thinking_level,
        }
    }
}

/// How an accepted message was taken (`chat.turn.accepted` and the answer
/// to `POST /chats/:id/messages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// Its turn started at once.
    Sent,
    /// It waits in the chat's queue.
    Queued,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Queued => "queued",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Completed,
    Failed,
    Interrupted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
        }
    }
}

/// How the previous turn ended. `reason` says why an interrupted turn was
/// interrupted (`user`, `engine_restart`, `engine_shutdown`, `deleted`);
/// `error` is the failure of a failed turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastTurn {
    pub turn_id: String,
    pub outcome: Outcome,
    pub finished_at: String,
    /// When interrupted: `user`, `deleted`, `engine_restart`,
    /// `engine_shutdown`, `provider`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    #[schema(required = false)]
    pub reason: Option<String>,
    /// When failed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    #[schema(required = false)]
    pub error: Option<crate::events::ErrorBody>,
}

/// The turn a chat is working on, persisted so a later engine can tell what
/// a dead one left behind: `pgid` + `startTime` identify the provider's
/// process group exactly (a reused pid has another start time). `pgid` is
/// `None` until the process has been spawned: such a turn never ran, and its
/// message goes back to the front of the queue after a crash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActiveTurn {
    pub turn_id: String,
    pub message: Message,
    pub started_at: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pgid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub start_time: Option<u64>,
}

/// One chat as `chats.json` stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatRecord {
    pub id: String,
    pub provider: ProviderKind,
    pub title: String,
    pub model: Option<String>,
    pub cwd: std::path::PathBuf,
    pub provider_session_id: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default)]
    pub queue: Vec<Message>,
    pub last_turn: Option<LastTurn>,
    #[serde(default)]
    pub usage: Usage,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub active_turn: Option<ActiveTurn>,
    /// Codex reports usage cumulatively per thread; its totals so far let a
    /// resumed session after a restart still count per turn.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub codex_thread_usage: Option<crate::providers::Usage>,
}

/// The wire Chat.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Chat {
    pub id: String,
    /// `claude` or `codex` (a `providers` type, described as a string).
    #[schema(value_type = String)]
    pub provider: ProviderKind,
    pub title: String,
    pub model: Option<String>,
    #[schema(value_type = String)]
    pub cwd: std::path::PathBuf,
    pub status: ChatStatus,
    pub processing: bool,
    pub provider_session_id: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    /// Previews; the full texts stay in the record.
    pub queue: Vec<MessagePreview>,
    pub last_turn: Option<LastTurn>,
    pub usage: Usage,
}

impl ChatRecord {
    /// The wire view. `interrupting` and `hooks_done` are live facts the
    /// record does not store.
    pub fn view(&self, interrupting: bool, hooks_done: bool) -> Chat {
        let status = match (&self.active_turn, interrupting) {
            (Some(_), true) => ChatStatus::Interrupting,
            (Some(_), false) => ChatStatus::Running,
            (None, _) if !self.queue.is_empty() && !hooks_done => ChatStatus::WaitingForHooks,
            (None, _) => ChatStatus::Idle,
        };
        Chat {
            id: self.id.clone(),
            provider: self.provider,
            title: self.title.clone(),
            model: self.model.clone(),
            cwd: self.cwd.clone(),
            status,
            processing: self.active_turn.is_some() || !self.queue.is_empty(),
            provider_session_id: self.provider_session_id.clone(),
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
            queue: self.queue.iter().map(Message::preview).collect(),
            last_turn: self.last_turn.clone(),
            usage: self.usage,
        }
    }
}

/// One line of a chat's history file and one `chat.turn.delta` item
/// (replace by `id` when sent again). `raw` (the provider's original line)
/// is stored but only served with `?raw=true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryItem {
    pub id: String,
    pub turn_id: String,
    pub ts: String,
    pub kind: ItemKind,
    /// Empty when the item has no text.
    #[serde(default)]
    #[schema(required = true)]
    pub text: String,
    #[serde(default)]
    pub tool: Option<ToolInfo>,
    /// The provider's line, only with `?raw=true`.
    // Last, so a line is the wire item plus `,"raw":…` (see
    // `ChatService::publish_item`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    #[schema(value_type = Object, required = false)]
    pub raw: Option<crate::events::RawJson>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record() -> ChatRecord {
        ChatRecord {
            id: "c_1".into(),
            provider: ProviderKind::Claude,
            title: "Claude chat".into(),
            model: None,
            cwd: "/w".into(),
            provider_session_id: None,
            created_at: "t".into(),
            updated_at: "t".into(),
            queue: vec![],
            last_turn: None,
            usage: Usage::default(),
            active_turn: None,
            codex_thread_usage: None,
        }
    }

    #[test]
    fn wire_chat_matches_contract_shape() {
        let v = serde_json::to_value(record().view(false, true)).unwrap();
        assert_eq!(
            v,
            json!({"id":"c_1","provider":"claude","title":"Claude chat","model":null,"cwd":"/w",
                   "status":"idle","processing":false,"providerSessionId":null,"createdAt":"t",
                   "updatedAt":"t","queue":[],"lastTurn":null,
                   "usage":{"inputTokens":0,"outputTokens":0,"cachedInputTokens":0,"costUsd":null}})
        );
    }

    #[test]
    fn cost_is_unknown_until_a_turn_reports_one() {
        let turn = |cost| crate::providers::Usage {
            input_tokens: 10,
            output_tokens: 2,
            cached_input_tokens: 1,
            cost_usd: cost,
        };
        let mut u = Usage::default();
        u.add(&turn(None));
        assert_eq!((u.input_tokens, u.cost_usd), (10, None));
        u.add(&turn(Some(0.25)));
        u.add(&turn(None));
        u.add(&turn(Some(0.5)));
        assert_eq!((u.input_tokens, u.cost_usd), (40, Some(0.75)));
        // Records written before the field was optional still load.
        let old: Usage = serde_json::from_value(
            json!({"inputTokens":1,"outputTokens":0,"cachedInputTokens":0,"costUsd":0.0}),
        )
        .unwrap();
        assert_eq!(old.cost_usd, Some(0.0));
    }

    fn message(text: &str) -> Message {
        Message {
            id: "m_1".into(),
            text: text.into(),
            queued_at: "t".into(),
            plan_mode: false,
            model: None,
            images: 0,
            thinking_level: None,
        }
    }

    #[test]
    fn queued_messages_show_as_previews() {
        let short = message("héllo");
        assert_eq!(
            serde_json::to_value(short.preview()).unwrap(),
            json!({"id":"m_1","text":"héllo","textLength":5,"truncated":false,"queuedAt":"t",
                   "planMode":false,"model":null,"images":0})
        );
        // Exactly at the preview length: whole, not truncated.
        let at = message(&"é".repeat(PREVIEW_CHARS));
        let p = at.preview();
        assert_eq!(
            (p.text.chars().count(), p.text_length, p.truncated),
            (PREVIEW_CHARS, PREVIEW_CHARS, false)
        );
        // Longer: cut on a character boundary, full length kept.
        let long = message(&format!(
            "{}🦀{}",
            "a".repeat(PREVIEW_CHARS - 1),
            "b".repeat(1000)
        ));
        let p = long.preview();
        assert_eq!(p.text, format!("{}🦀", "a".repeat(PREVIEW_CHARS - 1)));
        assert_eq!((p.text_length, p.truncated), (PREVIEW_CHARS + 1000, true));
        // The record keeps the full text; the wire chat shows the preview.
        let mut r = record();
        r.queue.push(long.clone());
        assert_eq!(r.view(false, true).queue, vec![p]);
        assert_eq!(r.queue[0].text, long.text);
    }

    #[test]
    fn status_follows_turn_queue_and_hooks() {
        let mut r = record();
        let m = Message {
            id: "m_1".into(),
            text: "hi".into(),
            queued_at: "t".into(),
            plan_mode: false,
            model: None,
            images: 0,
            thinking_level: None,
        };
        r.queue.push(m.clone());
        assert_eq!(r.view(false, false).status, ChatStatus::WaitingForHooks);
        assert!(r.view(false, false).processing);
        r.active_turn = Some(ActiveTurn {
            turn_id: "t_1".into(),
            message: m,
            started_at: "t".into(),
            pgid: None,
            start_time: None,
        });
        assert_eq!(r.view(false, true).status, ChatStatus::Running);
        assert_eq!(r.view(true, true).status, ChatStatus::Interrupting);
        // The active turn never shows on the wire; only the queue does.
        let v = serde_json::to_value(r.view(false, true)).unwrap();
        assert!(v.get("activeTurn").is_none());
    }
}
