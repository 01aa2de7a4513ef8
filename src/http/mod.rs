//! The HTTP surface. Each resource owns its router; this file merges them
//! and applies the layers in one place.
//!
//! Layer order, outermost first:
//! 1. `DefaultBodyLimit` — body cap for every extractor (413);
//! 2. [`request::RequestLayer`] (route layer, and around the 404 fallback)
//!    — `X-Request-Id` (kept if the client sent one, echoed), a DEBUG span
//!    with method, matched route and request id (never headers: they carry
//!    the secret), the one log line of an internal error, and the error
//!    shape for error responses without a JSON body. One hand-written layer
//!    because it runs on every request;
//! 3. auth — on the protected sub-router only.

pub mod auth;
pub mod chats;
pub mod error;
pub mod events;
pub mod hooks;
pub mod plans;
pub mod repos;
pub mod request;
pub mod system;
pub mod token_refresh;

use axum::extract::DefaultBodyLimit;
use axum::handler::HandlerWithoutStateExt;
use axum::Router;
use tower::Layer;

use crate::app::AppState;
use error::ApiError;
use request::RequestLayer;

pub fn router(state: AppState) -> Router {
    with_routes(state, Router::new())
}

/// The full router with `extra` routes added to the protected part (tests
/// use it to exercise the layers with a route of their own).
fn with_routes(state: AppState, extra: Router<AppState>) -> Router {
    let protected = Router::new()
        .merge(system::router())
        .merge(events::router())
        .merge(chats::router())
        .merge(plans::router())
        .merge(token_refresh::router())
        .merge(repos::router())
        .merge(hooks::router())
        .merge(extra)
        .route_layer(auth::RequireSecretLayer::new(&state));

    let body_limit = state.config.max_body_bytes;
    Router::new()
        .merge(system::public_router())
        .merge(protected)
        // Outermost on the routes: runs before auth, so a 401 has its
        // request id and the error log its route.
        .route_layer(RequestLayer)
        .fallback_service(RequestLayer.layer(not_found.into_service()))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
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

    async fn app(max_body: usize) -> (Router, tempfile::TempDir) {
        let home = tempfile::tempdir().unwrap();
        let mut config = crate::config::Config::for_home(home.path(), "s3cret");
        config.max_body_bytes = max_body;
        let state = AppState::build(config, Default::default()).await.unwrap();
        (
            with_routes(state, Router::new().route("/echo", post(echo))),
            home,
        )
    }

    async fn call(
        app: &Router,
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
}
