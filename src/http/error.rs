//! The one place domain errors become HTTP: `{"error":{"code","message"}}`
//! with the contract's status codes. Each domain error type has a `From`
//! impl here, so handlers only write `?`. Internal errors answer a generic
//! message; their cause rides on the response ([`InternalCause`]) and is
//! logged once, with the request id, by [`super::request`]. Client errors
//! (4xx) are not logged; a bound that turns clients away (503) is logged
//! here, once, at warn.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::chats::ChatError;
use crate::events::bus::Full as SubscribersFull;
use crate::plans::PlanError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The real cause of an internal error (never sent to the client).
    pub cause: Option<String>,
}

/// Response extension: the cause of a 500, for the request middleware to
/// log (with method, route and request id) and remove.
#[derive(Clone, Debug)]
pub struct InternalCause(pub String);

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            cause: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable", message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
    /// The client gets a generic message; the real cause is logged once by
    /// the request middleware.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        let mut e = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the engine log",
        );
        e.cause = Some(cause.to_string());
        e
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        match e {
            ChatError::NotFound(_) => ApiError::not_found(e.to_string()),
            ChatError::Invalid { .. } => ApiError::bad_request(e.to_string()),
            ChatError::MessageTooLarge { .. } => ApiError::too_large(e.to_string()),
            ChatError::QueueFull { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", e.to_string())
            }
            ChatError::Persist(_) | ChatError::History(_) => ApiError::internal(e),
        }
    }
}

impl From<PlanError> for ApiError {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::InvalidName(_) => ApiError::bad_request(e.to_string()),
            PlanError::NotFound => ApiError::not_found("no such plan"),
            PlanError::TooLarge { .. } => ApiError::too_large(e.to_string()),
            PlanError::Io(e) => ApiError::internal(format!("reading plans: {e}")),
        }
    }
}

/// `REPLICAS_MAX_SUBSCRIBERS` streams are open: 503, and a warning, since
/// clients are being turned away.
impl From<SubscribersFull> for ApiError {
    fn from(full: SubscribersFull) -> Self {
        tracing::warn!(
            max = full.max,
            "event stream refused: subscriber limit reached"
        );
        ApiError::unavailable(full.to_string())
    }
}

/// A blocking task (`spawn_blocking`) that panicked or was cancelled.
impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::internal(e)
    }
}

/// The answer to a handler that panicked (caught by the request layer): logged once
/// here, inside the request span; the client gets the generic 500.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    ApiError::internal(format_args!("handler panicked: {detail}")).into_response()
}

/// The error code the contract uses for a bare status (used for errors that
/// did not come from our handlers: unknown routes, methods, layer failures).
pub fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request",
        401 => "unauthorized",
        404 => "not_found",
        405 => "method_not_allowed",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "unprocessable",
        429 => "too_many_requests",
        503 => "unavailable",
        s if s >= 500 => "internal",
        _ => "invalid_request",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut res = (self.status, Json(body)).into_response();
        if let Some(cause) = self.cause {
            res.extensions_mut().insert(InternalCause(cause));
        }
        res
    }
}

/// `Json<T>` whose rejections use the error shape: malformed JSON, wrong
/// types, missing fields and a missing JSON content type are 400 (naming
/// the problem), an over-long body 413.
pub struct AppJson<T>(pub T);

impl<S, T> FromRequest<S> for AppJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::too_large("request body is larger than the configured limit")
        }
        _ => match rejection {
            JsonRejection::MissingJsonContentType(_) => {
                ApiError::bad_request("expected a JSON body with Content-Type: application/json")
            }
            other => ApiError::bad_request(other.body_text()),
        },
    }
}

/// `Query<T>` whose rejections use the error shape.
pub struct AppQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for AppQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(e @ QueryRejection::FailedToDeserializeQueryString(_)) => {
                Err(ApiError::bad_request(e.body_text()))
            }
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

/// axum's method router puts `Allow` on whatever its method fallback
/// answered, including the 401 of auth (which runs inside it): only a 405,
/// which an authenticated client got, may list the methods.
pub fn drop_stray_allow(mut res: Response) -> Response {
    if res.status() != StatusCode::METHOD_NOT_ALLOWED {
        res.headers_mut().remove(axum::http::header::ALLOW);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Status, code, client message and logged cause of an error.
    fn shape(e: impl Into<ApiError>) -> (u16, &'static str, String, Option<String>) {
        let e = e.into();
        (e.status.as_u16(), e.code, e.message, e.cause)
    }

    #[track_caller]
    fn maps_to(
        e: impl Into<ApiError>,
        status: u16,
        code: &str,
        message: &str,
        cause: Option<&str>,
    ) {
        assert_eq!(
            shape(e),
            (status, code, message.to_owned(), cause.map(str::to_owned))
        );
    }

    fn io(msg: &str) -> std::io::Error {
        std::io::Error::other(msg.to_owned())
    }

    const INTERNAL: &str = "internal error; see the engine log";

    /// Every domain error as the contract answers it; the wire messages
    /// are pinned here so a change to a domain type's text shows.
    #[test]
    fn domain_errors_map_to_the_contract() {
        maps_to(
            ChatError::NotFound("c_x".into()),
            404,
            "not_found",
            r#"no chat with id "c_x""#,
            None,
        );
        maps_to(
            ChatError::Invalid {
                field: "provider",
                message: "unknown provider".into(),
            },
            400,
            "invalid_request",
            "provider: unknown provider",
            None,
        );
        maps_to(
            ChatError::MessageTooLarge { len: 10, max: 5 },
            413,
            "payload_too_large",
            "message: the text is 10 bytes; the limit is 5 bytes",
            None,
        );
        maps_to(
            ChatError::QueueFull { max: 100 },
            429,
            "queue_full",
            "the chat already has 100 queued messages; wait for them to run or interrupt with clearQueue",
            None,
        );
        maps_to(
            ChatError::Persist(io("disk full")),
            500,
            "internal",
            INTERNAL,
            Some("could not persist chat state: disk full"),
        );
        maps_to(
            ChatError::History(io("is a directory")),
            500,
            "internal",
            INTERNAL,
            Some("could not read chat history: is a directory"),
        );
        maps_to(
            PlanError::InvalidName("must not contain NUL"),
            400,
            "invalid_request",
            "invalid plan name: must not contain NUL",
            None,
        );
        maps_to(PlanError::NotFound, 404, "not_found", "no such plan", None);
        maps_to(
            PlanError::TooLarge { size: 6, max: 5 },
            413,
            "payload_too_large",
            "plan is 6 bytes; the limit is 5",
            None,
        );
        maps_to(
            PlanError::Io(io("not a directory")),
            500,
            "internal",
            INTERNAL,
            Some("reading plans: not a directory"),
        );
        maps_to(
            SubscribersFull { max: 2 },
            503,
            "unavailable",
            "2 event streams are open already; try again later",
            None,
        );
    }

    #[tokio::test]
    async fn a_failed_blocking_task_is_internal() {
        let task = tokio::task::spawn_blocking(|| panic!("bug in a blocking task"));
        let (status, code, message, cause) = shape(task.await.unwrap_err());
        assert_eq!(
            (status, code, message.as_str()),
            (500, "internal", INTERNAL)
        );
        assert!(cause.unwrap().contains("panicked"));
    }

    /// The body is the error shape; an internal cause rides on the response
    /// for the request layer to log, never in the body.
    #[tokio::test]
    async fn the_response_is_the_error_shape_and_keeps_the_cause_out_of_the_body() {
        let res = ApiError::from(ChatError::Persist(io("disk full"))).into_response();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            res.extensions()
                .get::<InternalCause>()
                .map(|c| c.0.as_str()),
            Some("could not persist chat state: disk full")
        );
        let body = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            json!({"error":{"code":"internal","message":INTERNAL}})
        );
    }
}
