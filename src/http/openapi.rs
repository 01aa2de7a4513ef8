//! `GET /openapi.json`: the OpenAPI 3.1 document of this API, generated
//! with `utoipa` from the handlers' own types: the request bodies and the
//! domain types the handlers serialize and the events carry (`Chat`,
//! `Repo`, `HooksStatus`, `EngineEvent`, … derive `ToSchema` where they are
//! defined). The few bodies a handler builds with `json!` or by hand are
//! described by the schema structs below.
//!
//! The operations are declared on stub functions below (the real handlers
//! live in one file per resource); `tests::router_and_document_agree`
//! fails when the router and this document disagree on a route or method,
//! `tests::document_is_valid_openapi` checks the document's structure, and
//! `tests::real_chat_matches_schema` a real serialized chat against it.

// The operation stubs are never called: utoipa reads their attributes.
#![allow(dead_code)]

use std::sync::LazyLock;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::chats::{ChatList, CreateChat, Interrupt, SendMessage};
use crate::app::AppState;
use crate::chats::model::{ChatStatus, LastTurn, Outcome, ThinkingLevel, Usage};
use crate::chats::{Accepted, Chat, ChatCounts, HistoryItem, MessagePreview as Message};
use crate::events::{EngineEvent, ErrorBody, EventKind, TurnDelta};
use crate::hooks::runner::CommandState;
use crate::hooks::{CommandStatus as HookCommand, HookProgress, HooksStatus, RepoHooks};
use crate::plans::{Plan, PlanMeta as PlanInfo, PlanSource};
use crate::providers::ToolInfo as ToolCall;
use crate::repos::git::FileChange as DiffFile;
use crate::repos::{GitDiff, Repo};
use crate::status::EngineStatus as Status;
use crate::upstream::refresh::{Health as ManagerHealth, ManagerStatus};

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(get_openapi))
}

/// Built once: the document never changes while the engine runs.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_json()
        .expect("the OpenAPI document serializes")
});

async fn get_openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
}

/// The document (tests and tools).
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Replicas Engine",
        description = "The daemon inside every workspace VM: chats driving agent CLIs, events, repos, hooks. The contract is docs/API.md.",
    ),
    paths(
        health, status, token_refresh_health, metrics, openapi_json, events,
        create_chat, list_chats, get_chat, delete_chat, send_message, interrupt_chat, get_history,
        list_plans, get_plan, list_repos, hooks_status,
    ),
    components(schemas(
        ErrorResponse, ErrorBody, Health, Status, ChatCounts, TokenRefreshHealth, ManagerStatus,
        ManagerHealth, CreateChat, SendMessage, Interrupt, Chat, ChatStatus, Message,
        ThinkingLevel, LastTurn, Outcome, Usage, ChatList, Deleted, Accepted, HistoryItem,
        ToolCall, HistoryPage, PlanInfo, PlanSource, PlanList, Plan, Repo, GitDiff, DiffFile,
        RepoList, HooksStatus, RepoHooks, HookCommand, CommandState, HookProgress, EngineEvent,
        EventKind, TurnDelta, StreamReset, WebhookBody, Coalesced,
    )),
    modifiers(&SecretHeader, &StreamResetType),
    security(("secret" = [])),
    tags(
        (name = "system"), (name = "events"), (name = "chats"),
        (name = "plans"), (name = "repos"), (name = "hooks"),
    )
)]
struct ApiDoc;

/// The `apiKey` scheme: `X-Replicas-Engine-Secret`.
struct SecretHeader;

impl Modify for SecretHeader {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "secret",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Replicas-Engine-Secret",
                "REPLICAS_ENGINE_SECRET, compared in constant time",
            ))),
        );
    }
}

/// `stream.reset` among the `EventKind`s: a type a client meets on
/// `GET /events`, but never published or persisted, so it is no variant of
/// the real enum.
struct StreamResetType;

impl Modify for StreamResetType {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
        use utoipa::openapi::{Ref, RefOr};
        let schemas = &mut openapi
            .components
            .get_or_insert_with(Default::default)
            .schemas;
        if let Some(RefOr::T(Schema::OneOf(kinds))) = schemas.get_mut("EventKind") {
            kinds.items.push(
                ObjectBuilder::new()
                    .description(Some("Stream-only (never persisted, no `id:` line)."))
                    .property("payload", Ref::from_schema_name("StreamReset"))
                    .required("payload")
                    .property(
                        "type",
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .enum_values(Some(["stream.reset"])),
                    )
                    .required("type")
                    .into(),
            );
        }
    }
}

// ------------------------------------------------------------------ schemas
//
// Most schemas derive from the real domain types (`crate::chats::Chat`,
// `crate::repos::Repo`, `crate::events::EventKind`, …), so the document
// follows them. The structs below describe the rest: bodies built with
// `json!` or written as text, never from these structs;
// `tests::handler_bodies_match_schemas` checks the handlers' ones against
// real answers.

/// Every error: `{"error":{"code","message"}}`. Built with `json!` in
/// `http::error`.
#[derive(Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

/// Written by hand in `http::system::get_health` (a hot path).
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok` (200) or `initializing` (503).
    pub status: String,
    pub timestamp: String,
}

/// Built with `json!` in `http::token_refresh`.
#[derive(Serialize, ToSchema)]
pub struct TokenRefreshHealth {
    pub healthy: bool,
    /// `github`, `claude`, `codex`.
    pub managers: std::collections::BTreeMap<String, ManagerStatus>,
}

/// `{"success": true}`, built with `json!`.
#[derive(Serialize, ToSchema)]
pub struct Deleted {
    pub success: bool,
}

/// Built with `json!` in `http::chats::get_history`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryPage {
    pub items: Vec<HistoryItem>,
    pub total: usize,
    pub has_more: bool,
}

/// `{"plans": [...]}`, built with `json!`.
#[derive(Serialize, ToSchema)]
pub struct PlanList {
    pub plans: Vec<PlanInfo>,
}

/// `{"repos": [...]}`, built with `json!`.
#[derive(Serialize, ToSchema)]
pub struct RepoList {
    pub repos: Vec<Repo>,
}

/// Built with `json!` in `http::events::reset_frame`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamReset {
    pub oldest_available_id: String,
}

/// The body of `POST {MONOLITH_URL}/v1/engine/webhook` (engine → backend),
/// written as text in `upstream::webhooks`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookBody {
    pub workspace_id: String,
    pub event: EngineEvent,
    /// Only on merged text deltas.
    #[schema(required = false)]
    pub coalesced: Option<Coalesced>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Coalesced {
    pub first_id: String,
    pub count: usize,
}

// --------------------------------------------------------------- operations

#[utoipa::path(get, path = "/health", tag = "system", security(()),
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "The readiness file is missing", body = Health),
    ))]
fn health() {}

#[utoipa::path(get, path = "/status", tag = "system",
    responses(
        (status = 200, body = Status),
        (status = 401, description = "Missing or wrong secret", body = ErrorResponse),
    ))]
fn status() {}

#[utoipa::path(get, path = "/token-refresh/health", tag = "system",
    responses(
        (status = 200, description = "No enabled manager is failing", body = TokenRefreshHealth),
        (status = 401, description = "Missing or wrong secret", body = ErrorResponse),
        (status = 503, description = "A manager is failing", body = TokenRefreshHealth),
    ))]
fn token_refresh_health() {}

#[utoipa::path(get, path = "/metrics", tag = "system",
    responses(
        (status = 200, description = "Prometheus metrics (OpenMetrics text); series in docs/API.md",
         content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String),
        (status = 401, description = "Missing or wrong secret", body = ErrorResponse),
    ))]
fn metrics() {}

#[utoipa::path(get, path = "/openapi.json", tag = "system",
    responses(
        (status = 200, description = "This document", body = Object),
        (status = 401, description = "Missing or wrong secret", body = ErrorResponse),
    ))]
fn openapi_json() {}

#[utoipa::path(get, path = "/events", tag = "events",
    params(
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this id"),
        ("since" = Option<String>, Query, description = "Resume after this id (like Last-Event-ID)"),
        ("chatId" = Option<String>, Query, description = "Only this chat's events plus engine-level ones"),
        ("types" = Option<String>, Query, description = "Comma list of types or `prefix.*`"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: `id: <id>`, `event: <type>`, `data: <EngineEvent>`; `: keepalive` comments",
         content_type = "text/event-stream", body = EngineEvent),
        (status = 400, description = "Non-numeric position", body = ErrorResponse),
        (status = 401, description = "Missing or wrong secret", body = ErrorResponse),
    ))]
fn events() {}

#[utoipa::path(post, path = "/chats", tag = "chats", request_body = CreateChat,
    responses(
        (status = 201, body = Chat),
        (status = 400, description = "Bad JSON, unknown provider, cwd outside the workspace", body = ErrorResponse),
        (status = 401, description = "Missing or wrong secret", body = ErrorResponse),
        (status = 413, description = "Body over REPLICAS_MAX_BODY_BYTES", body = ErrorResponse),
    ))]
fn create_chat() {}

#[utoipa::path(get, path = "/chats", tag = "chats",
    params(
        ("limit" = Option<usize>, Query, description = "1..=1000; without it every chat"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
        ("status" = Option<ChatStatus>, Query, description = "Only chats in this status"),
        ("provider" = Option<String>, Query, description = "`claude` or `codex`"),
    ),
    responses(
        (status = 200, description = "Newest first", body = ChatList),
        (status = 400, description = "Bad limit, cursor, status or provider", body = ErrorResponse),
        (status = 401, description = "Missing or wrong secret", body = ErrorResponse),
    ))]
fn list_chats() {}

#[utoipa::path(get, path = "/chats/{chat_id}", tag = "chats",
    params(("chat_id" = String, Path)),
    responses(
        (status = 200, body = Chat),
        (status = 401, description = "Missing or wrong secret", body = ErrorResponse),
        (status = 404, description = "Unknown chat", body = ErrorResponse),
    ))]
fn get_chat() {}

#[utoipa::path(delete, path = "/chats/{chat_id}", tag = "chats",
    params(("chat_id" = String, Path)),
    responses(
        (status = 200, body = Deleted),
        (status = 401, description = "Missing or wrong secret", body = ErrorResponse),
        (status = 404, description = "Unknown chat", body = ErrorResponse),
    ))]
fn delete_chat() {}

#[utoipa::path(post, path = "/chats/{chat_id}/messages", tag = "chats",
    params(("chat_id" = String, Path)), request_body = SendMessage,
    responses(
        (status = 202, body = Accepted),
        (status = 400, description = "Bad JSON, empty message, bad thinkingLevel or image", body = ErrorResponse),
        (status = 401, description = "Missing or wrong secret", body = ErrorResponse),
        (status = 404, description = "Unknown chat", body = ErrorResponse),
        (status = 413, description = "Body over REPLICAS_MAX_BODY_BYTES", body = ErrorResponse),
    ))]
fn send_message() {}

#[utoipa::path(post, path = "/chats/{chat_id}/interrupt", tag = "chats",
    params(("chat_id" = String, Path)),
    request_body(content = Option<Interrupt>, description = "Optional"),
    responses(
        (status = 200, body = Chat),
        (status = 400, description = "Bad JSON", body = ErrorResponse),
        (status = 401, description = "Missing or wrong secret", body = ErrorResponse),
        (status = 404, description = "Unknown chat", body = ErrorResponse),
    ))]
fn interrupt_chat() {}

#[utoipa::path(get, path = "/chats/{chat_id}/history", tag = "chats",
    params(
        ("chat_id" = String, Path),
        ("limit" = Option<usize>, Query, description = "Default 100, at most 1000"),
        ("offset" = Option<usize>, Query, description = "Items skipped from the end"),
        ("raw" = Option<bool>, Query, description = "Include the provider's raw line"),
    ),
    responses(
        (status = 200, description = "Oldest first", body = HistoryPage),
        (status = 400, description = "Bad query", body = ErrorResponse),
        (status = 401, description = "Missing or wrong secret", body = ErrorResponse),
        (status = 404, description = "Unknown chat", body = ErrorResponse),
    ))]
fn get_history() {}

#[utoipa::path(get, path = "/plans", tag = "plans",
    responses(
        (status = 200, description = "Newest first", body = PlanList),
        (status = 401, description = "Missing or wrong secret", body = ErrorResponse),
    ))]
fn list_plans() {}

#[utoipa::path(get, path = "/plans/{filename}", tag = "plans",
    params(("filename" = String, Path, description = "`*.md`, no path separators")),
    responses(
        (status = 200, body = Plan),
        (status = 400, description = "Invalid name", body = ErrorResponse),
        (status = 401, description = "Missing or wrong secret", body = ErrorResponse),
        (status = 404, description = "Unknown plan", body = ErrorResponse),
        (status = 413, description = "Plan over 5 MiB", body = ErrorResponse),
    ))]
fn get_plan() {}

#[utoipa::path(get, path = "/repos", tag = "repos",
    params(("includeDiffs" = Option<bool>, Query, description = "Add gitDiff.fullDiff")),
    responses(
        (status = 200, body = RepoList),
        (status = 400, description = "includeDiffs not true/false", body = ErrorResponse),
        (status = 401, description = "Missing or wrong secret", body = ErrorResponse),
    ))]
fn list_repos() {}

#[utoipa::path(get, path = "/hooks/status", tag = "hooks",
    responses(
        (status = 200, body = HooksStatus),
        (status = 401, description = "Missing or wrong secret", body = ErrorResponse),
    ))]
fn hooks_status() {}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};

    use axum::body::Body;
    use axum::http::{Method, Request, StatusCode};
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;

    fn doc() -> Value {
        serde_json::from_str(&DOCUMENT).unwrap()
    }

    /// Every `.route("…"` in `src/http/*.rs`: the router's paths.
    fn router_paths() -> BTreeSet<String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http");
        let mut paths = BTreeSet::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("mod.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap();
            for piece in code.split(".route(\"").skip(1) {
                paths.insert(piece.split('"').next().unwrap().to_owned());
            }
        }
        paths
    }

    #[tokio::test]
    async fn router_and_document_agree() {
        let doc = doc();
        let documented: BTreeSet<String> =
            doc["paths"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            router_paths(),
            documented,
            "routes in src/http vs paths in the OpenAPI document"
        );

        // Methods: the router answers 405 exactly for the undocumented ones.
        let home = tempfile::tempdir().unwrap();
        let config = crate::config::Config::for_home(home.path(), "s3cret");
        let state = AppState::build(config, Default::default()).await.unwrap();
        let app = super::super::router(state);
        for (path, item) in doc["paths"].as_object().unwrap() {
            let concrete = path
                .replace("{chat_id}", "c_nope")
                .replace("{filename}", "nope.md");
            let ops: HashSet<&str> = item
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.as_str())
                .collect();
            for method in ["get", "post", "put", "patch", "delete"] {
                if path == "/events" && method == "get" {
                    continue; // a stream that never ends
                }
                let req = Request::builder()
                    .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
                    .uri(&concrete)
                    .header("x-replicas-engine-secret", "s3cret")
                    .header("content-type", "application/json")
                    .body(Body::from("{}"))
                    .unwrap();
                let status = app.clone().oneshot(req).await.unwrap().status();
                let routed = status != StatusCode::METHOD_NOT_ALLOWED;
                assert_eq!(
                    routed,
                    ops.contains(method),
                    "{} {path}: router answered {status}, document {}",
                    method.to_uppercase(),
                    if ops.contains(method) {
                        "has it"
                    } else {
                        "lacks it"
                    }
                );
            }
        }
    }

    #[test]
    fn document_is_valid_openapi() {
        let doc = doc();
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
        // It reads back as an OpenAPI document.
        let _: utoipa::openapi::OpenApi = serde_json::from_value(doc.clone()).unwrap();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let scheme = &doc["components"]["securitySchemes"]["secret"];
        assert_eq!(scheme["type"], "apiKey");
        assert_eq!(scheme["in"], "header");
        assert_eq!(scheme["name"], "X-Replicas-Engine-Secret");
        assert_eq!(doc["security"][0]["secret"], serde_json::json!([]));

        // Every $ref resolves.
        fn refs(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        out.push(r.clone());
                    }
                    m.values().for_each(|v| refs(v, out));
                }
                Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(!all.is_empty());
        for r in all {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected $ref {r}"));
            assert!(schemas.contains_key(name), "dangling $ref {r}");
        }

        let mut operation_ids = HashSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            assert!(path.starts_with('/'));
            let params: Vec<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            for (method, op) in item.as_object().unwrap() {
                assert!(
                    ["get", "post", "put", "patch", "delete"].contains(&method.as_str()),
                    "{method} {path}"
                );
                assert!(
                    operation_ids.insert(op["operationId"].as_str().unwrap().to_owned()),
                    "duplicate operationId in {method} {path}"
                );
                let responses = op["responses"].as_object().unwrap();
                assert!(!responses.is_empty(), "{method} {path} has no responses");
                for (code, res) in responses {
                    let n: u16 = code.parse().unwrap();
                    assert!((100..600).contains(&n));
                    assert!(res["description"].is_string(), "{method} {path} {code}");
                    // Every 4xx has the error shape.
                    if (400..500).contains(&n) {
                        assert_eq!(
                            res["content"]["application/json"]["schema"]["$ref"],
                            "#/components/schemas/ErrorResponse",
                            "{method} {path} {code}"
                        );
                    }
                }
                // Every protected route answers 401 and every path parameter
                // is declared.
                if path != "/health" {
                    assert!(responses.contains_key("401"), "{method} {path} lacks 401");
                } else {
                    assert_eq!(op["security"], serde_json::json!([{}]), "/health is public");
                }
                for p in &params {
                    assert!(
                        op["parameters"].as_array().is_some_and(|ps| ps
                            .iter()
                            .any(|x| x["name"] == *p
                                && x["in"] == "path"
                                && x["required"] == true)),
                        "{method} {path} does not declare {p}"
                    );
                }
            }
        }
        assert!(
            doc["paths"]["/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
                .is_object()
        );
    }

    /// `value`'s keys are properties of schema `name`, and every property
    /// the schema requires is there: a field added to, renamed in or
    /// removed from the real type without the document following fails.
    fn assert_matches_schema(doc: &Value, name: &str, value: &Value) {
        let schema = &doc["components"]["schemas"][name];
        let props = schema["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no schema {name}"));
        let keys = value.as_object().unwrap();
        for key in keys.keys() {
            assert!(
                props.contains_key(key),
                "{name}.{key} is sent but not documented"
            );
        }
        for req in schema["required"].as_array().into_iter().flatten() {
            let req = req.as_str().unwrap();
            assert!(
                keys.contains_key(req),
                "{name}.{req} is required but not sent"
            );
        }
    }

    /// A real wire `Chat` (with a queued message and a failed last turn,
    /// so every optional part is filled) against the document.
    #[test]
    fn real_chat_matches_schema() {
        use crate::chats::model::{ChatRecord, LastTurn, Message, Outcome, ThinkingLevel, Usage};
        use crate::providers::ProviderKind;
        let record = ChatRecord {
            id: "c_1".into(),
            provider: ProviderKind::Codex,
            title: "t".into(),
            model: Some("m".into()),
            cwd: "/w".into(),
            provider_session_id: Some("s".into()),
            created_at: "t".into(),
            updated_at: "t".into(),
            queue: vec![Message {
                id: "m_1".into(),
                text: "x".repeat(300),
                queued_at: "t".into(),
                plan_mode: true,
                model: None,
                images: 1,
                thinking_level: Some(ThinkingLevel::High),
            }],
            last_turn: Some(LastTurn {
                turn_id: "t_1".into(),
                outcome: Outcome::Failed,
                finished_at: "t".into(),
                reason: Some("user".into()),
                error: Some(crate::events::ErrorBody {
                    code: "timeout".into(),
                    message: "m".into(),
                }),
            }),
            usage: Usage {
                cost_usd: Some(0.5),
                ..Usage::default()
            },
            active_turn: None,
            codex_thread_usage: None,
        };
        let doc = doc();
        for chat in [record.view(false, true), record.view(true, false)] {
            let v = serde_json::to_value(&chat).unwrap();
            assert_matches_schema(&doc, "Chat", &v);
            assert_matches_schema(&doc, "Message", &v["queue"][0]);
            assert_matches_schema(&doc, "LastTurn", &v["lastTurn"]);
            assert_matches_schema(&doc, "ErrorBody", &v["lastTurn"]["error"]);
            assert_matches_schema(&doc, "Usage", &v["usage"]);
            // Enum values come from the real enums too.
            let status = &doc["components"]["schemas"]["ChatStatus"]["enum"];
            assert!(
                status.as_array().unwrap().contains(&v["status"]),
                "{status}"
            );
        }
        // A fresh chat: the optional parts are null or absent.
        let mut bare = record.clone();
        bare.queue.clear();
        bare.last_turn = None;
        let v = serde_json::to_value(bare.view(false, true)).unwrap();
        assert_matches_schema(&doc, "Chat", &v);
    }

    /// The bodies the real handlers answer (on an empty engine) against
    /// the document, including the ones built with `json!`.
    #[tokio::test]
    async fn handler_bodies_match_schemas() {
        let home = tempfile::tempdir().unwrap();
        let config = crate::config::Config::for_home(home.path(), "s3cret");
        let state = AppState::build(config, Default::default()).await.unwrap();
        let app = super::super::router(state);
        let doc = doc();
        let call = |method: &str, uri: &str, body: &str| {
            let req = Request::builder()
                .method(method)
                .uri(uri)
                .header("x-replicas-engine-secret", "s3cret")
                .header("content-type", "application/json")
                .body(Body::from(body.to_owned()))
                .unwrap();
            let app = app.clone();
            async move {
                let res = app.oneshot(req).await.unwrap();
                let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
                    .await
                    .unwrap();
                serde_json::from_slice::<Value>(&bytes).unwrap()
            }
        };
        let status = call("GET", "/status", "").await;
        assert_matches_schema(&doc, "Status", &status);
        assert_matches_schema(&doc, "ChatCounts", &status["chats"]);
        let refresh = call("GET", "/token-refresh/health", "").await;
        assert_matches_schema(&doc, "TokenRefreshHealth", &refresh);
        for m in refresh["managers"].as_object().unwrap().values() {
            assert_matches_schema(&doc, "ManagerStatus", m);
        }
        assert_matches_schema(&doc, "HooksStatus", &call("GET", "/hooks/status", "").await);
        assert_matches_schema(&doc, "RepoList", &call("GET", "/repos", "").await);
        assert_matches_schema(&doc, "PlanList", &call("GET", "/plans", "").await);
        let chat = call("POST", "/chats", r#"{"provider":"claude"}"#).await;
        assert_matches_schema(&doc, "Chat", &chat);
        assert_matches_schema(&doc, "ChatList", &call("GET", "/chats?limit=1", "").await);
        let id = chat["id"].as_str().unwrap();
        let history = call("GET", &format!("/chats/{id}/history"), "").await;
        assert_matches_schema(&doc, "HistoryPage", &history);
        let deleted = call("DELETE", &format!("/chats/{id}"), "").await;
        assert_matches_schema(&doc, "Deleted", &deleted);
        let missing = call("GET", &format!("/chats/{id}"), "").await;
        assert_matches_schema(&doc, "ErrorResponse", &missing);
        assert_matches_schema(&doc, "ErrorBody", &missing["error"]);

        // `hooks.progress` (built with `json!`) is a HookCommand with its
        // place: it carries every HookCommand property.
        let schemas = &doc["components"]["schemas"];
        for key in schemas["HookCommand"]["properties"]
            .as_object()
            .unwrap()
            .keys()
        {
            assert!(
                schemas["HookProgress"]["properties"].get(key).is_some(),
                "HookProgress lacks {key}"
            );
        }
    }

    /// Every event type the engine publishes, and `stream.reset`, is a
    /// variant of the document's `EventKind`, with a payload schema.
    #[test]
    fn every_event_type_has_a_payload_schema() {
        let doc = doc();
        let kinds = doc["components"]["schemas"]["EventKind"]["oneOf"]
            .as_array()
            .unwrap();
        let documented: HashSet<String> = kinds
            .iter()
            .map(|k| {
                let t = &k["properties"]["type"];
                t["enum"][0]
                    .as_str()
                    .or_else(|| t["const"].as_str())
                    .unwrap_or_else(|| panic!("no type in {k}"))
                    .to_owned()
            })
            .collect();
        for k in kinds {
            assert!(k["properties"]["payload"].is_object(), "{k}");
        }
        for t in crate::events::EventType::ALL {
            assert!(documented.contains(t.name()), "{} has no schema", t.name());
        }
        assert_eq!(documented.len(), crate::events::EventType::ALL.len() + 1);
        assert!(documented.contains("stream.reset"));
    }
}
