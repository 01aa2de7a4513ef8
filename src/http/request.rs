//! The per-request middleware, written by hand as one tower layer because it
//! runs on every request and the stack it replaces (request-id set and
//! propagate, a trace layer, a route recorder and an error-body rewriter)
//! cost more than the routes themselves (issue 10: `/health` at 0.21x a bare
//! axum route).
//!
//! What it does, cheaply:
//! - **`X-Request-Id`**: the client's value is echoed (a refcount bump, no
//!   copy); otherwise a fresh random id (one small allocation).
//! - **Request span** with method, matched route template and request id,
//!   at DEBUG: with the default `info` filter it is never created. What a
//!   handler logs at INFO carries its own fields (`chat.id`, …).
//! - **Internal errors** are logged once here, with method, route and
//!   request id ([`ApiError::internal`] leaves its cause on the response).
//! - **Metrics** (unless `REPLICAS_HTTP_METRICS=0`): the request counted
//!   and timed by method, route template (or `unmatched`) and status
//!   ([`crate::metrics::http_request`]).
//! - **Error shape**: an error response without a JSON body (axum's own
//!   rejections: 405, a layer's 413) is rewritten to
//!   `{"error":{"code","message"}}`. Only this slow path allocates a boxed
//!   future.
//!
//! Applied as a `route_layer` (so the matched route is known when the span
//! is made) and around the 404 fallback.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::extract::{MatchedPath, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::error::{code_for, ApiError, InternalCause};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Clone, Copy, Default)]
pub struct RequestLayer {
    /// Record the per-request `replicas_http_*` series.
    pub metrics: bool,
}

impl<S> Layer<S> for RequestLayer {
    type Service = RequestService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestService {
            inner,
            metrics: self.metrics,
        }
    }
}

#[derive(Clone)]
pub struct RequestService<S> {
    inner: S,
    metrics: bool,
}

/// A fresh request id: 32 lowercase hex digits of a random UUID.
fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    let s = uuid::Uuid::new_v4().simple().encode_lower(&mut buf);
    HeaderValue::from_str(s).expect("hex is a valid header value")
}

impl<S> Service<Request> for RequestService<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = RequestFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let id = match req.headers().get(REQUEST_ID) {
            Some(v) => v.clone(),
            None => new_request_id(),
        };
        // Disabled (the default filter): `Span::none()`, nothing built.
        let span = tracing::debug_span!(
            "request",
            method = %req.method(),
            route = req.extensions().get::<MatchedPath>().map(MatchedPath::as_str),
            request_id = id.to_str().unwrap_or("-"),
        );
        // Kept only for the error log; `Method` is a small copy for the
        // standard verbs.
        let method = req.method().clone();
        let route = req.extensions().get::<MatchedPath>().cloned();
        // Timed only when someone will read it.
        let started = (self.metrics || !span.is_disabled()).then(std::time::Instant::now);
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        RequestFuture::Inner {
            fut,
            meta: Some(Meta {
                id,
                span,
                method,
                route,
                started,
                metrics: self.metrics,
            }),
        }
    }
}

pub struct Meta {
    id: HeaderValue,
    span: tracing::Span,
    method: Method,
    route: Option<MatchedPath>,
    started: Option<std::time::Instant>,
    metrics: bool,
}

pin_project! {
    #[project = Proj]
    pub enum RequestFuture<F> {
        Inner { #[pin] fut: F, meta: Option<Meta> },
        Reshaping { fut: Pin<Box<dyn Future<Output = Response> + Send>> },
    }
}

impl<F> Future for RequestFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (mut res, id) = match self.as_mut().project() {
            Proj::Reshaping { fut } => return fut.as_mut().poll(cx).map(Ok),
            Proj::Inner { fut, meta } => {
                let mut res = {
                    let _entered = meta.as_ref().map(|m| m.span.enter());
                    match ready!(fut.poll(cx)) {
                        Ok(res) => res,
                        Err(never) => match never {},
                    }
                };
                let meta = meta.take().expect("polled after completion");
                if let (true, Some(started)) = (meta.metrics, meta.started) {
                    crate::metrics::http_request(
                        meta.method.as_str(),
                        meta.route.as_ref().map(MatchedPath::as_str),
                        res.status().as_u16(),
                        started.elapsed(),
                    );
                }
                if let (false, Some(started)) = (meta.span.is_disabled(), meta.started) {
                    tracing::debug!(
                        parent: &meta.span,
                        status = res.status().as_u16(),
                        latency_ms = started.elapsed().as_secs_f64() * 1000.0,
                        "finished processing request"
                    );
                }
                if let Some(cause) = res.extensions_mut().remove::<InternalCause>() {
                    tracing::error!(
                        method = %meta.method,
                        route = meta.route.as_ref().map(MatchedPath::as_str),
                        request_id = meta.id.to_str().unwrap_or("-"),
                        error = %cause.0,
                        "internal error"
                    );
                }
                (res, meta.id)
            }
        };
        res.headers_mut().insert(REQUEST_ID, id);
        if !needs_error_shape(&res) {
            return Poll::Ready(Ok(res));
        }
        self.set(RequestFuture::Reshaping {
            fut: Box::pin(error_shape(res)),
        });
        self.poll(cx)
    }
}

fn needs_error_shape(res: &Response) -> bool {
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return false;
    }
    !res.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// Rewrite an error response made outside our handlers (unknown method, a
/// layer's own rejection) into the error shape, keeping its text as the
/// message and its other headers (`Allow` on a 405, the request id).
async fn error_shape(res: Response) -> Response {
    let status = res.status();
    let (parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let mut message = String::from_utf8_lossy(&text).trim().to_owned();
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("error").to_owned();
    }
    let mut res = ApiError::new(status, code_for(status), message).into_response();
    for (k, v) in parts.headers.iter() {
        if k != CONTENT_TYPE && k != CONTENT_LENGTH {
            res.headers_mut().insert(k.clone(), v.clone());
        }
    }
    res
}
