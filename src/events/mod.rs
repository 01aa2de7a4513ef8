//! Engine events: the typed [`EventKind`] every service publishes, the
//! envelope written to `events.jsonl` and sent over SSE, the [`bus`] that
//! numbers, persists and fans them out, and the [`journal`] behind it.
//!
//! Wire shape (one journal line, one SSE `data:`):
//! `{"id":"1042","ts":"…","type":"chat.turn.completed","chatId":"c_…","payload":{…}}`.
//! Field order is fixed (`id` first) so the journal can be indexed without a
//! full parse.

pub mod bus;
pub mod journal;
#[cfg(test)]
mod wire_shapes;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use bus::{EventBus, Published, Subscription, SubscriptionItem};

use crate::chats::{Chat, Delivery, MessagePreview, Outcome, Usage};
use crate::hooks::{HookProgress, HooksStatus};
use crate::repos::Repo;
use crate::status::EngineStatus;

/// Declares [`EventKind`] and [`EventType`] from one list of variants, each
/// with its doc, its wire name (`#[serde(rename)]`) and its payload, so a
/// type's name is written once: adding an event type is one entry here (the
/// compiler then asks whether it is a webhook and whether it can change
/// `/status`, below). The name is matched as a `tt`: a `literal` fragment
/// reaches the derives wrapped in an invisible group, which serde reads but
/// utoipa does not.
macro_rules! event_types {
    ($( $(#[doc = $doc:tt])* #[serde(rename = $name:tt)] $variant:ident $payload:tt ),* $(,)?) => {
        /// Every externally visible transition, with its payload. Serialized
        /// adjacently tagged: `"type": "<name>", "payload": {…}`.
        ///
        /// Object-valued fields (`chat`, `repo`, `status`, `message`…) are
        /// the domain types the matching REST endpoint serializes, so they
        /// carry the same JSON.
        #[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
        #[serde(tag = "type", content = "payload")]
        pub enum EventKind {
            $( $(#[doc = $doc])* #[serde(rename = $name)] $variant $payload, )*
        }

        /// The type of an event without its payload: what a journal line,
        /// an SSE frame or a webhook names in `type`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EventType {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl EventType {
            /// Every type, in declaration order.
            pub const ALL: &'static [EventType] = &[$(Self::$variant),*];

            /// The wire name, e.g. `chat.turn.completed`.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }

            /// The type a wire name stands for; `None` for a name this
            /// engine never writes (`stream.reset` is stream-only).
            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($name => Some(Self::$variant),)*
                    _ => None,
                }
            }
        }

        impl EventKind {
            /// Its type, without the payload.
            pub fn event_type(&self) -> EventType {
                match self {
                    $(Self::$variant { .. } => EventType::$variant,)*
                }
            }
        }
    };
}

event_types! {
    /// Once per start, after state is loaded.
    #[serde(rename = "engine.ready")]
    EngineReady { version: String, pid: u32 },
    /// A `/status` summary field changed; carries the whole `/status` body.
    #[serde(rename = "engine.status.changed")]
    EngineStatusChanged { status: Box<EngineStatus<'static>> },
    /// A repository was found under the workspace root.
    #[serde(rename = "repo.discovered")]
    RepoDiscovered { repo: Box<Repo> },
    /// A turn or hook changed a repo's branch, HEAD, dirtiness or diff stats.
    #[serde(rename = "repo.status.changed")]
    RepoStatusChanged { repo: Box<Repo> },
    /// A chat was created.
    #[serde(rename = "chat.created")]
    ChatCreated { chat: Box<Chat> },
    /// A chat's title, status, queue or usage changed.
    #[serde(rename = "chat.updated")]
    ChatUpdated { chat: Box<Chat> },
    /// A chat was deleted (its id is in the envelope).
    #[serde(rename = "chat.deleted")]
    ChatDeleted {},
    /// A message was accepted: started at once (`sent`) or queued.
    #[serde(rename = "chat.turn.accepted")]
    TurnAccepted {
        message: MessagePreview,
        status: Delivery,
        /// 0 when sent, else the 1-based queue position.
        position: usize,
    },
    /// A turn's provider process started working on a message.
    #[serde(rename = "chat.turn.started")]
    TurnStarted {
        #[serde(rename = "turnId")]
        turn_id: String,
        #[serde(rename = "messageId")]
        message_id: String,
    },
    /// One normalized history item, or a streamed text fragment.
    #[serde(rename = "chat.turn.delta")]
    TurnDelta(TurnDelta),
    /// A turn finished, successfully (`completed`) or not (`failed`); an
    /// interrupted one is `chat.interrupted`.
    #[serde(rename = "chat.turn.completed")]
    TurnCompleted {
        #[serde(rename = "turnId")]
        turn_id: String,
        outcome: Outcome,
        /// This turn's.
        usage: Usage,
        #[serde(rename = "durationMs")]
        duration_ms: u64,
        /// When failed.
        #[serde(skip_serializing_if = "Option::is_none")]
        #[schema(required = false)]
        error: Option<ErrorBody>,
    },
    /// A running turn was stopped by an interrupt.
    #[serde(rename = "chat.interrupted")]
    ChatInterrupted {
        #[serde(rename = "turnId")]
        turn_id: String,
        #[serde(rename = "durationMs")]
        duration_ms: u64,
    },
    /// Start hooks began.
    #[serde(rename = "hooks.started")]
    HooksStarted { status: HooksStatus },
    /// One hook command changed state.
    #[serde(rename = "hooks.progress")]
    HooksProgress(HookProgress),
    /// Start hooks finished and every command succeeded.
    #[serde(rename = "hooks.completed")]
    HooksCompleted { status: HooksStatus },
    /// Start hooks finished and some command failed or timed out.
    #[serde(rename = "hooks.failed")]
    HooksFailed { status: HooksStatus },
    /// A snapshot of the hooks status.
    #[serde(rename = "hooks.status")]
    HooksStatus { status: HooksStatus },
    /// An engine-level fault a client should surface.
    #[serde(rename = "error")]
    Error {
        code: String,
        message: String,
        source: String,
    },
}

impl EventType {
    /// Sent to the backend as a webhook (`docs/API.md`, Upstream): chat
    /// lifecycle, turns, the hooks' result and errors.
    pub fn is_webhook(self) -> bool {
        use EventType::*;
        match self {
            ChatCreated | ChatDeleted | TurnAccepted | TurnStarted | TurnDelta | TurnCompleted
            | HooksCompleted | HooksFailed | Error => true,
            EngineReady | EngineStatusChanged | RepoDiscovered | RepoStatusChanged
            | ChatUpdated | ChatInterrupted | HooksStarted | HooksProgress | HooksStatus => false,
        }
    }

    /// May change a summary field of `/status` (chats, repos, hooks, token
    /// refresh): `engine.status.changed` is re-checked after it.
    pub fn may_change_status(self) -> bool {
        use EventType::*;
        match self {
            ChatCreated | ChatUpdated | ChatDeleted | RepoDiscovered | HooksStarted
            | HooksProgress | HooksCompleted | HooksFailed | HooksStatus | Error => true,
            EngineReady | EngineStatusChanged | RepoStatusChanged | TurnAccepted | TurnStarted
            | TurnDelta | TurnCompleted | ChatInterrupted => false,
        }
    }
}

impl EventKind {
    /// The wire type name, e.g. `chat.turn.completed`.
    pub fn type_name(&self) -> &'static str {
        self.event_type().name()
    }
}

/// Payload of `chat.turn.delta`: either a whole item or a text fragment.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum TurnDelta {
    Item {
        #[serde(rename = "turnId")]
        turn_id: String,
        /// The history item's JSON, serialized once by its producer.
        #[schema(value_type = crate::chats::HistoryItem)]
        item: RawJson,
    },
    Text {
        #[serde(rename = "turnId")]
        turn_id: String,
        #[serde(rename = "itemId")]
        item_id: String,
        #[serde(rename = "textDelta")]
        text_delta: String,
    },
}

/// `{"code","message"}`: a failed turn's error and the body of every HTTP
/// error (`{"error": ErrorBody}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// `invalid_request`, `unauthorized`, `not_found`, `method_not_allowed`,
    /// `conflict`, `payload_too_large`, `unprocessable`, `internal`,
    /// `unavailable`, … (for a failed turn: `timeout`, `auth_expired`, …)
    pub code: String,
    pub message: String,
}

/// The envelope as written to the journal, sent to clients and embedded in
/// a webhook.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct EngineEvent {
    /// Decimal string of a strictly increasing integer.
    pub id: String,
    pub ts: String,
    /// Present for chat events.
    #[serde(rename = "chatId", skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
    pub chat_id: Option<String>,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The few envelope fields the journal index and the SSE filters need,
/// parsed without touching the payload.
#[derive(Debug, Deserialize)]
pub struct EventHeader<'a> {
    #[serde(borrow)]
    pub id: std::borrow::Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    pub kind: std::borrow::Cow<'a, str>,
    #[serde(rename = "chatId", borrow, default)]
    pub chat_id: Option<std::borrow::Cow<'a, str>>,
}

/// A JSON value kept as its text (`serde_json`'s `RawValue`): written out
/// verbatim, so storing or streaming it costs a copy, not a parse into a
/// tree and a serialization back. Two values are equal when they are equal
/// as JSON (spacing and key order do not matter).
#[derive(Clone, Debug, Serialize)]
#[serde(transparent)]
pub struct RawJson(Box<serde_json::value::RawValue>);

impl RawJson {
    /// Wrap JSON text; `None` if it is not valid JSON.
    pub fn from_text(text: &str) -> Option<Self> {
        serde_json::value::RawValue::from_string(text.trim().to_owned())
            .ok()
            .map(Self)
    }

    /// Serialize anything serializable (infallible for `Value`-like data).
    pub fn from_serialize<T: Serialize + ?Sized>(v: &T) -> serde_json::Result<Self> {
        serde_json::value::to_raw_value(v).map(Self)
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Parse into a tree.
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.0.get()).unwrap_or(Value::Null)
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get() || self.to_value() == other.to_value()
    }
}

impl<'de> Deserialize<'de> for RawJson {
    /// Through a tree, so it also works inside untagged enums (whose
    /// content serde buffers, which `RawValue` cannot read from).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Self::from_serialize(&v).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn envelope_shape_matches_contract() {
        let ev = EngineEvent {
            id: "7".into(),
            ts: "2026-11-21T23:00:00.123Z".into(),
            chat_id: Some("c_1".into()),
            kind: EventKind::TurnStarted {
                turn_id: "t_1".into(),
                message_id: "m_1".into(),
            },
        };
        let line = serde_json::to_string(&ev).unwrap();
        assert!(line.starts_with(r#"{"id":"7","#), "{line}");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            json!({"id":"7","ts":"2026-11-21T23:00:00.123Z","chatId":"c_1","type":"chat.turn.started",
                   "payload":{"turnId":"t_1","messageId":"m_1"}})
        );
    }

    #[test]
    fn engine_level_events_have_no_chat_id_and_type_names_agree() {
        let kinds = vec![
            EventKind::EngineReady {
                version: "0.1.0".into(),
                pid: 1,
            },
            EventKind::ChatDeleted {},
            EventKind::TurnDelta(TurnDelta::Text {
                turn_id: "t".into(),
                item_id: "i".into(),
                text_delta: "hi".into(),
            }),
            EventKind::Error {
                code: "x".into(),
                message: "y".into(),
                source: "z".into(),
            },
        ];
        for kind in kinds {
            let ev = EngineEvent {
                id: "1".into(),
                ts: "t".into(),
                chat_id: None,
                kind: kind.clone(),
            };
            let v: Value = serde_json::to_value(&ev).unwrap();
            assert_eq!(v["type"], kind.type_name());
            assert!(v.get("chatId").is_none());
            assert!(v["payload"].is_object(), "{v}");
        }
    }

    #[test]
    fn type_names_are_unique_and_read_back() {
        let mut names = std::collections::HashSet::new();
        for &t in EventType::ALL {
            assert!(names.insert(t.name()), "{} twice", t.name());
            assert_eq!(EventType::from_name(t.name()), Some(t));
        }
        assert_eq!(EventType::from_name("stream.reset"), None);
        assert_eq!(EventType::from_name("chat.turn.unknown"), None);
    }
}
