//! The `/status` body ([`EngineStatus`]): the engine's summary, built by
//! `AppState::status_view` from maintained counters (no scans). Borrowed
//! for the hot `GET /status` route, owned ([`EngineStatus::into_owned`]) as
//! the payload of `engine.status.changed`.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;
use utoipa::ToSchema;

/// The `/status` body (`docs/API.md`); also the payload of
/// `engine.status.changed`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Status)]
pub struct EngineStatus<'a> {
    pub version: &'static str,
    #[schema(value_type = String)]
    pub started_at: Cow<'a, str>,
    pub uptime_ms: u64,
    #[schema(value_type = Option<String>)]
    pub workspace_id: Option<Cow<'a, str>>,
    #[schema(value_type = String)]
    pub workspace_root: Cow<'a, Path>,
    pub chats: crate::chats::ChatCounts,
    pub repos: RepoCount,
    pub hooks: HooksState,
    pub events: EventsState,
    /// Manager name → `ok|failing|disabled`, in the managers' order.
    #[schema(value_type = std::collections::BTreeMap<String, crate::upstream::refresh::Health>)]
    pub token_refresh: crate::upstream::refresh::Summary,
    pub providers: ProvidersState,
}

impl EngineStatus<'_> {
    /// Whether a field worth an event differs: chats, repos, hooks or
    /// token refresh (not the ones that move all the time: uptime, event
    /// counters, agent processes).
    pub fn summary_differs(&self, other: &EngineStatus<'_>) -> bool {
        (self.chats, &self.repos, &self.hooks, &self.token_refresh)
            != (
                other.chats,
                &other.repos,
                &other.hooks,
                &other.token_refresh,
            )
    }

    /// A copy that borrows nothing (for an event).
    pub fn into_owned(self) -> EngineStatus<'static> {
        EngineStatus {
            started_at: Cow::Owned(self.started_at.into_owned()),
            workspace_id: self.workspace_id.map(|w| Cow::Owned(w.into_owned())),
            workspace_root: Cow::Owned(self.workspace_root.into_owned()),
            version: self.version,
            uptime_ms: self.uptime_ms,
            chats: self.chats,
            repos: self.repos,
            hooks: self.hooks,
            events: self.events,
            token_refresh: self.token_refresh,
            providers: self.providers,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RepoCount {
    pub count: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct HooksState {
    /// The HooksStatus's `status`.
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventsState {
    pub last_event_id: String,
    /// Client event streams (the engine's own consumers do not count).
    pub subscribers: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProvidersState {
    /// `exec`, `app-server` or `pending` (until the first Codex turn).
    pub codex_transport: &'static str,
    pub agent_processes: AgentProcesses,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AgentProcesses {
    /// Live agent CLI processes.
    pub live: usize,
    /// The idle ones among them.
    pub idle: usize,
}

/// The last serialized `/status`, reused while every figure but `uptimeMs`
/// is unchanged (compared field by field against the fresh view); only the
/// uptime digits are written anew.
#[derive(Default)]
pub struct StatusCache(Mutex<Option<Cached>>);

struct Cached {
    /// The view the body was made from, with `uptime_ms` 0.
    key: EngineStatus<'static>,
    /// The body without the uptime digits, which go at `uptime_at`.
    bytes: Vec<u8>,
    uptime_at: usize,
}

impl StatusCache {
    const UPTIME: &'static [u8] = b",\"uptimeMs\":";

    /// `view` as JSON bytes.
    pub fn body(&self, mut view: EngineStatus<'_>) -> serde_json::Result<Vec<u8>> {
        let uptime = std::mem::take(&mut view.uptime_ms);
        let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.as_ref().filter(|c| c.key == view) {
            let mut out = Vec::with_capacity(c.bytes.len() + 20);
            out.extend_from_slice(&c.bytes[..c.uptime_at]);
            out.extend_from_slice(itoa::Buffer::new().format(uptime).as_bytes());
            out.extend_from_slice(&c.bytes[c.uptime_at..]);
            return Ok(out);
        }
        view.uptime_ms = uptime;
        let mut body = Vec::with_capacity(cache.as_ref().map_or(512, |c| c.bytes.len() + 32));
        serde_json::to_writer(&mut body, &view)?;
        view.uptime_ms = 0;
        *cache = Self::cached(view.into_owned(), &body);
        Ok(body)
    }

    /// `None` if the body does not have the expected shape (then nothing is
    /// cached).
    fn cached(key: EngineStatus<'static>, body: &[u8]) -> Option<Cached> {
        let at = body
            .windows(Self::UPTIME.len())
            .position(|w| w == Self::UPTIME)?
            + Self::UPTIME.len();
        let digits = body[at..].iter().take_while(|b| b.is_ascii_digit()).count();
        let mut bytes = body[..at].to_vec();
        bytes.extend_from_slice(&body[at + digits..]);
        Some(Cached {
            key,
            bytes,
            uptime_at: at,
        })
    }
}
