//! The HTTP surface. Each resource owns its router; this file merges them
//! and applies the layers in one place.
//!
//! Layers: one hand-written [`request::RequestLayer`] (request id, span,
//! panics, auth on the protected routes, internal-error log, metrics, error
//! shape) with `DefaultBodyLimit` (the body cap for every extractor, 413)
//! inside it, applied once to each route (`Router::layer`, so it also wraps
//! each route's method fallback: a wrong method without the secret is 401,
//! not a 405) and around the 404 fallback. One layer because axum boxes and
//! clones every layer per route per request.
//!
//! Around the router, [`error::drop_stray_allow`] ([`App`]): axum's method
//! router adds `Allow` to whatever its fallback answered, the 401 included;
//! only a 405 keeps it. A plain response map, not another router: no extra
//! routing hop.

pub mod auth;
pub mod chats;
pub mod error;
pub mod events;
pub mod hooks;
pub mod metrics;
pub mod openapi;
pub mod plans;
pub mod repos;
pub mod request;
pub mod system;
pub mod token_refresh;

use axum::extract::DefaultBodyLimit;
use axum::handler::HandlerWithoutStateExt;
use axum::response::Response;
use axum::Router;
use tower::Layer;

use crate::app::AppState;
use error::ApiError;
use request::RequestLayer;

/// The engine's HTTP service: the router, with [`error::drop_stray_allow`]
/// on every response.
pub type App = tower::util::MapResponse<Router, fn(Response) -> Response>;

pub fn router(state: AppState) -> App {
    with_routes(state, Router::new())
}

/// The full router with `extra` routes added to the protected part (tests
/// use it to exercise the layers with a route of their own).
fn with_routes(state: AppState, extra: Router<AppState>) -> App {
    let public = RequestLayer {
        metrics: state.config.http_metrics,
        auth: None,
    };
    let protected = RequestLayer {
        auth: Some(auth::ExpectedSecret::new(&state)),
        ..public.clone()
    };
    let body_limit = DefaultBodyLimit::max(state.config.max_body_bytes);
    let protected = Router::new()
        .merge(system::router())
        .merge(events::router())
        .merge(chats::router())
        .merge(plans::router())
        .merge(token_refresh::router())
        .merge(repos::router())
        .merge(hooks::router())
        .merge(metrics::router())
        .merge(openapi::router())
        .merge(extra)
        .layer((protected, body_limit));
    let app = Router::new()
        .merge(system::public_router().layer((public.clone(), body_limit)))
        .merge(protected)
        .fallback_service(public.layer(not_found.into_service()))
        .with_state(state);
    tower::util::MapResponse::new(app, error::drop_stray_allow as fn(Response) -> Response)
}

/// Unknown routes: 404 in the error shape. Reached before auth, and says
/// nothing about which routes exist.
async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Method, StatusCode};
    use axum::routing::post;
    use axum::Json;
    use serde_json::{json, Value};
    use tower::ServiceExt;

    #[derive(serde::Deserialize)]
    struct Echo {
        message: String,
    }

    async fn echo(error::AppJson(e): error::AppJson<Echo>) -> Json<Value> {
        Json(json!({ "message": e.message }))
    }

    async fn app(max_body: usize) -> (App, tempfile::TempDir) {
        let home = tempfile::tempdir().unwrap();
        let mut config = crate::config::Config::for_home(home.path(), "s3cret");
        config.max_body_bytes = max_body;
        // No agent ever starts from these tests.
        config.claude_bin = "/nonexistent/claude".into();
        config.codex_bin = "/nonexistent/codex".into();
        let state = AppState::build(config, Default::default()).await.unwrap();
        (
            with_routes(state, Router::new().route("/echo", post(echo))),
            home,
        )
    }

    async fn call(
        app: &App,
        method: Method,
        uri: &str,
        ctype: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header("x-replicas-engine-secret", "s3cret");
        if let Some(c) = ctype {
            req = req.header("content-type", c);
        }
        let res = app
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = res.status();
        assert!(res.headers().contains_key("x-request-id"));
        let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    fn code(v: &Value) -> &str {
        v["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error shape: {v}"))
    }

    /// A panicking handler: logged, answered `500` in the error shape with
    /// a request id, and the next request is served as usual.
    #[tokio::test]
    async fn a_panicking_handler_answers_500_internal_and_the_engine_keeps_serving() {
        async fn boom() -> &'static str {
            panic!("handler bug")
        }
        let home = tempfile::tempdir().unwrap();
        let config = crate::config::Config::for_home(home.path(), "s3cret");
        let state = AppState::build(config, Default::default()).await.unwrap();
        let app = with_routes(
            state,
            Router::new().route("/boom", axum::routing::get(boom)),
        );
        let (s, v) = call(&app, Method::GET, "/boom", None, vec![]).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            v,
            json!({"error":{"code":"internal","message":"internal error; see the engine log"}})
        );
        // The same router still answers.
        let (s, v) = call(&app, Method::GET, "/status", None, vec![]).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let (s, _) = call(&app, Method::GET, "/boom", None, vec![]).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[tokio::test]
    async fn every_failure_has_the_error_shape() {
        let (app, _home) = app(1024).await;
        let json = Some("application/json");
        let (s, v) = call(
            &app,
            Method::POST,
            "/echo",
            json,
            br#"{"message":"hi"}"#.to_vec(),
        )
        .await;
        assert_eq!((s, v["message"].as_str()), (StatusCode::OK, Some("hi")));

        let (s, v) = call(&app, Method::POST, "/echo", json, b"{not json".to_vec()).await;
        assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_request"));

        let (s, v) = call(
            &app,
            Method::POST,
            "/echo",
            json,
            br#"{"message":5}"#.to_vec(),
        )
        .await;
        assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_request"));

        let (s, v) = call(
            &app,
            Method::POST,
            "/echo",
            json,
            br#"{"other":1}"#.to_vec(),
        )
        .await;
        assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_request"));
        assert!(
            v["error"]["message"].as_str().unwrap().contains("message"),
            "names the field: {v}"
        );

        let (s, v) = call(
            &app,
            Method::POST,
            "/echo",
            Some("text/plain"),
            br#"{"message":"x"}"#.to_vec(),
        )
        .await;
        assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_request"));

        let big = format!(r#"{{"message":"{}"}}"#, "x".repeat(2048));
        let (s, v) = call(&app, Method::POST, "/echo", json, big.into_bytes()).await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
        );

        let (s, v) = call(&app, Method::GET, "/echo", None, vec![]).await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
        );

        let (s, v) = call(&app, Method::GET, "/nope", None, vec![]).await;
        assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    }

    /// Without the secret a wrong method on a protected route is the same
    /// 401 as a right one: no 405, no `Allow` header listing the methods.
    #[tokio::test]
    async fn auth_runs_before_method_routing() {
        let (app, _home) = app(1024).await;
        for (method, uri) in [
            (Method::GET, "/echo"),
            (Method::DELETE, "/chats"),
            (Method::PUT, "/status"),
            (Method::POST, "/events"),
        ] {
            let req = axum::http::Request::builder()
                .method(method.clone())
                .uri(uri)
                .header("x-replicas-engine-secret", "wrong")
                .body(Body::empty())
                .unwrap();
            let res = app.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{method} {uri}");
            assert!(res.headers().get("allow").is_none(), "{method} {uri}");
        }
        // Public and unknown routes are unaffected.
        let (s, _) = call(&app, Method::GET, "/nope", None, vec![]).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let req = axum::http::Request::builder()
            .uri("/health")
            .body(Body::empty())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_ne!(res.status(), StatusCode::UNAUTHORIZED);
    }

    /// Arbitrary JSON (and arbitrary bytes) into every request body type,
    /// through the real router and layers: never a panic or a 500, always a
    /// clean status, and every failure in the error shape. Bodies are built
    /// around the real field names so the typed decoding is reached, not
    /// just the JSON parser.
    #[test]
    fn arbitrary_request_bodies_get_clean_answers() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};

        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => prop::sample::select(vec![
                    "provider", "title", "model", "cwd", "message", "planMode",
                    "thinkingLevel", "images", "clearQueue", "mediaType", "data",
                ])
                .prop_map(str::to_owned),
                1 => ".{0,6}",
            ]
        }
        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(Value::from),
                prop::sample::select(vec!["claude", "codex", "", "/", "..", "api", "high"])
                    .prop_map(Value::from),
                ".{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 5, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map(key(), inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }
        // Near-valid objects: the required fields present (with a
        // plausible value), the rest arbitrary.
        let near_valid = (
            prop::collection::btree_map(key(), value(), 0..4),
            prop::sample::select(vec!["claude", "codex", "gpt"]),
            ".{0,16}",
        )
            .prop_map(|(mut m, provider, message)| {
                m.entry("provider".into()).or_insert(provider.into());
                m.entry("message".into()).or_insert(message.into());
                Value::Object(m.into_iter().collect())
            });
        let body = prop_oneof![
            3 => value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            2 => near_valid.prop_map(|v| serde_json::to_vec(&v).unwrap()),
            1 => prop::collection::vec(any::<u8>(), 0..64),
        ];
        let route = prop::sample::select(vec![
            "/chats",
            "/chats/c_missing/messages",
            "/chats/c_missing/interrupt",
        ]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (app, home) = rt.block_on(app(64 * 1024));
        // A chat that exists, so valid bodies reach the service too; its
        // agent binary does not exist, so a turn fails at once.
        let (_, chat) = rt.block_on(call(
            &app,
            Method::POST,
            "/chats",
            Some("application/json"),
            br#"{"provider":"claude"}"#.to_vec(),
        ));
        let chat_id = chat["id"].as_str().unwrap().to_owned();
        let mut runner = TestRunner::new(Config {
            cases: 256,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&(route, any::<bool>(), body), |(route, existing, body)| {
                let route = if existing {
                    route.replace("c_missing", &chat_id)
                } else {
                    route.to_owned()
                };
                let (status, v) = rt.block_on(call(
                    &app,
                    Method::POST,
                    &route,
                    Some("application/json"),
                    body.clone(),
                ));
                prop_assert!(
                    [200u16, 201, 202, 400, 404, 409, 413, 422, 429].contains(&status.as_u16()),
                    "{route}: {status} for {:?}",
                    String::from_utf8_lossy(&body)
                );
                if !status.is_success() {
                    prop_assert!(v["error"]["code"].is_string(), "{route}: {v}");
                    prop_assert!(v["error"]["message"].is_string(), "{route}: {v}");
                }
                Ok(())
            })
            .unwrap();
        drop(home);
    }
}
