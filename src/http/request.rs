//! The per-request middleware, written by hand as one tower layer because it
//! runs on every request and the stack it replaces (request-id set and
//! propagate, a trace layer, a route recorder, an error-body rewriter, a
//! panic catcher and the auth layer, each boxed again by axum per route)
//! cost more than the routes themselves (issue 10: `/health` at 0.21x a bare
//! axum route). axum boxes every layer it applies to a route and clones the
//! whole chain per request, so the cost grows with the square of the number
//! of layers: one layer, once.
//!
//! What it does, cheaply, outermost first:
//! - **`X-Request-Id`**: the client's value is echoed (a refcount bump, no
//!   copy); otherwise a fresh random id.
//! - **Request span** with method, matched route template and request id,
//!   at DEBUG: with the default `info` filter it is never created. What a
//!   handler logs at INFO carries its own fields (`chat.id`, …).
//! - **Panics**: a panicking handler answers `500` in the error shape
//!   ([`super::error::panic_response`]); the engine keeps serving.
//! - **Auth** (on the protected routes): the shared secret
//!   ([`super::auth::ExpectedSecret`]), before method routing's fallback, so
//!   a wrong method without the secret is 401, never a 405.
//! - **Internal errors** are logged once here, with method, route and
//!   request id ([`ApiError::internal`] leaves its cause on the response).
//! - **Metrics** (unless `REPLICAS_HTTP_METRICS=0`): the request counted
//!   and timed by method, route template (or `unmatched`) and status,
//!   through series resolved once per route ([`crate::metrics::HttpSeries`]).
//! - **Error shape**: an error response without a JSON body (axum's own
//!   rejections: 405, 413) is rewritten to `{"error":{"code","message"}}`.
//!   Only this slow path allocates a boxed future.
//!
//! Applied with `Router::layer` on the public and the protected routes (so
//! it wraps each route and its method fallback, and the matched route is
//! known) and around the 404 fallback.

use std::convert::Infallible;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::extract::{MatchedPath, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::auth::ExpectedSecret;
use super::error::{code_for, panic_response, ApiError, InternalCause};
use crate::metrics::HttpSeries;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Clone, Default)]
pub struct RequestLayer {
    /// Record the per-request `replicas_http_*` series.
    pub metrics: bool,
    /// Require the shared secret (`None`: a public route).
    pub auth: Option<ExpectedSecret>,
}

impl<S> Layer<S> for RequestLayer {
    type Service = RequestService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestService {
            inner,
            metrics: self.metrics,
            auth: self.auth.clone(),
            series: Arc::default(),
        }
    }
}

/// Metric series already resolved by this route's service, by (method,
/// route, status). A handful per route; bounded by [`SERIES_CACHED`].
type SeriesCache = Arc<Mutex<Vec<(Method, Option<MatchedPath>, u16, HttpSeries)>>>;
const SERIES_CACHED: usize = 32;

#[derive(Clone)]
pub struct RequestService<S> {
    inner: S,
    metrics: bool,
    auth: Option<ExpectedSecret>,
    series: SeriesCache,
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
        // Kept for the metrics and the error log; `Method` is a small copy
        // for the standard verbs, `MatchedPath` a refcount bump.
        let method = req.method().clone();
        let route = req.extensions().get::<MatchedPath>().cloned();
        // Timed only when someone will read it.
        let started = (self.metrics || !span.is_disabled()).then(std::time::Instant::now);
        let meta = Some(Meta {
            id,
            span,
            method,
            route,
            started,
            series: self.metrics.then(|| self.series.clone()),
        });
        if let Some(expected) = &self.auth {
            if !expected.admits(req.headers()) {
                return RequestFuture::Answered {
                    res: Some(super::auth::unauthorized()),
                    meta,
                };
            }
        }
        let called = {
            let _entered = meta.as_ref().map(|m| m.span.enter());
            catch_unwind(AssertUnwindSafe(|| self.inner.call(req)))
        };
        match called {
            Ok(fut) => RequestFuture::Inner { fut, meta },
            Err(panic) => RequestFuture::Answered {
                res: Some(panic_response(panic)),
                meta,
            },
        }
    }
}

pub struct Meta {
    id: HeaderValue,
    span: tracing::Span,
    method: Method,
    route: Option<MatchedPath>,
    started: Option<std::time::Instant>,
    /// This route's resolved series, when metrics are on.
    series: Option<SeriesCache>,
}

impl Meta {
    /// Everything that happens once the response is known; returns the
    /// request id for the response header.
    fn finish(self, res: &mut Response) -> HeaderValue {
        let status = res.status().as_u16();
        if let (Some(cache), Some(started)) = (&self.series, self.started) {
            let elapsed = started.elapsed();
            record(cache, &self.method, self.route.as_ref(), status, elapsed);
        }
        if let (false, Some(started)) = (self.span.is_disabled(), self.started) {
            tracing::debug!(
                parent: &self.span,
                status,
                latency_ms = started.elapsed().as_secs_f64() * 1000.0,
                "finished processing request"
            );
        }
        if let Some(cause) = res.extensions_mut().remove::<InternalCause>() {
            tracing::error!(
                method = %self.method,
                route = self.route.as_ref().map(MatchedPath::as_str),
                request_id = self.id.to_str().unwrap_or("-"),
                error = %cause.0,
                "internal error"
            );
        }
        self.id
    }
}

/// Count and time one request through the route's cached series (label
/// hashing and the route string's copy happen once per series, not per
/// request).
fn record(
    cache: &SeriesCache,
    method: &Method,
    route: Option<&MatchedPath>,
    status: u16,
    elapsed: std::time::Duration,
) {
    let route_str = route.map(MatchedPath::as_str);
    let mut cached = cache.lock().unwrap_or_else(|e| e.into_inner());
    let hit = cached.iter().find(|(m, r, s, _)| {
        *s == status && m == method && r.as_ref().map(MatchedPath::as_str) == route_str
    });
    match hit {
        Some((_, _, _, series)) => series.record(elapsed),
        None => {
            let series = HttpSeries::new(method.as_str(), route_str, status);
            series.record(elapsed);
            if cached.len() < SERIES_CACHED {
                cached.push((method.clone(), route.cloned(), status, series));
            }
        }
    }
}

pin_project! {
    #[project = Proj]
    pub enum RequestFuture<F> {
        Inner { #[pin] fut: F, meta: Option<Meta> },
        /// Answered without the inner service: a 401, or `call` panicked.
        Answered { res: Option<Response>, meta: Option<Meta> },
        Reshaping { fut: Pin<Box<dyn Future<Output = Response> + Send>> },
    }
}

impl<F> Future for RequestFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (mut res, meta) = match self.as_mut().project() {
            Proj::Reshaping { fut } => return fut.as_mut().poll(cx).map(Ok),
            Proj::Answered { res, meta } => (
                res.take().expect("polled after completion"),
                meta.take().expect("polled after completion"),
            ),
            Proj::Inner { fut, meta } => {
                let polled = {
                    let _entered = meta.as_ref().map(|m| m.span.enter());
                    catch_unwind(AssertUnwindSafe(|| fut.poll(cx)))
                };
                let res = match polled {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(Ok(res))) => res,
                    Ok(Poll::Ready(Err(never))) => match never {},
                    Err(panic) => panic_response(panic),
                };
                (res, meta.take().expect("polled after completion"))
            }
        };
        let id = meta.finish(&mut res);
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
