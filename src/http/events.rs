//! `GET /events`: the bus as Server-Sent Events. Resume with `Last-Event-ID`
//! or `?since=`; filter with `?chatId=` and `?types=`; `retry: 3000` once;
//! a keepalive comment every `REPLICAS_SSE_KEEPALIVE_SECS` (15 s); the stream ends when the engine shuts
//! down. At most `REPLICAS_MAX_SUBSCRIBERS` streams are open; beyond, 503.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::BytesMut;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio_stream::wrappers::IntervalStream;

use super::error::{ApiError, AppQuery};
use crate::app::AppState;
use crate::events::{Published, SubscriptionItem};

pub fn router() -> Router<AppState> {
    Router::new().route("/events", get(stream_events))
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    since: Option<String>,
    #[serde(rename = "chatId")]
    chat_id: Option<String>,
    types: Option<String>,
}

/// Which events a client asked for.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    chat_id: Option<String>,
    /// Exact names and `prefix.` (from `prefix.*`).
    types: Vec<TypePattern>,
}

#[derive(Debug, Clone)]
enum TypePattern {
    Exact(String),
    Prefix(String),
}

impl Filter {
    pub fn new(chat_id: Option<String>, types: Option<&str>) -> Self {
        let types = types
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| match t.strip_suffix('*') {
                Some(prefix) => TypePattern::Prefix(prefix.to_owned()),
                None => TypePattern::Exact(t.to_owned()),
            })
            .collect();
        Self { chat_id, types }
    }

    /// A chat filter keeps that chat's events plus engine-level ones.
    pub fn matches(&self, ev: &Published) -> bool {
        if let (Some(want), Some(got)) = (&self.chat_id, &ev.chat_id) {
            if want != got {
                return false;
            }
        }
        self.types.is_empty()
            || self.types.iter().any(|p| match p {
                TypePattern::Exact(t) => *t == ev.kind,
                TypePattern::Prefix(p) => ev.kind.starts_with(p.as_str()),
            })
    }
}

async fn stream_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    AppQuery(q): AppQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    let header = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("\u{0}").to_owned());
    let since = match header.or(q.since) {
        Some(raw) => Some(raw.trim().parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "Last-Event-ID / since must be a non-negative integer, got {raw:?}"
            ))
        })?),
        None => None,
    };
    let filter = Filter::new(q.chat_id, q.types.as_deref());
    let subscription = state
        .bus
        .try_subscribe(since, state.config.max_subscribers)?;
    let events = subscription.filter_map(move |item| {
        let out = match item {
            // The frame was serialized once at publish time; every
            // subscriber sends the same buffer.
            SubscriptionItem::Event(ev) if filter.matches(&ev) => Some(ev.frame.clone()),
            SubscriptionItem::Event(_) => None,
            SubscriptionItem::Reset {
                oldest_available_id,
            } => Some(reset_frame(oldest_available_id)),
        };
        std::future::ready(out)
    });
    // Whatever is already waiting goes out as one chunk: a subscriber that
    // fell behind catches up with a few large writes instead of one write
    // per event (under fan-out to many clients, syscalls are the cost).
    let events = Coalesce::new(events, state.config.sse_coalesce);
    let every = state.config.sse_keepalive;
    let keepalive = IntervalStream::new(tokio::time::interval_at(
        tokio::time::Instant::now() + every,
        every,
    ))
    .map(|_| Bytes::from_static(b": keepalive\n\n"));
    let body =
        futures_util::stream::once(std::future::ready(Bytes::from_static(b"retry: 3000\n\n")))
            .chain(futures_util::stream::select(events, keepalive))
            .take_until(state.shutdown.clone().cancelled_owned())
            .map(Ok::<_, Infallible>);
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            // Proxies such as nginx must not buffer the stream.
            (HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// What one coalesced chunk holds at most.
const COALESCE_BYTES: usize = 64 * 1024;

pin_project_lite::pin_project! {
    /// Frames that are ready at once, joined into one chunk (one write, one
    /// chunked-encoding header). A lone frame goes out as it is (a
    /// refcount bump, no copy); the buffer is allocated only when a second
    /// frame is waiting (`ready_chunks` allocated a 256-slot `Vec` per
    /// wakeup per subscriber, the largest allocation cost of a fan-out).
    /// Writes to one stream are at least `gap` apart
    /// (`REPLICAS_SSE_COALESCE_MS`) while events keep coming: what arrives
    /// meanwhile goes in the next write, and the first event after a quiet
    /// spell goes at once. While it waits the stream is not polled, so the
    /// bus does not wake it per event (under fan-out, write syscalls per
    /// subscriber per event were two thirds of the engine's CPU: loopback
    /// TCP delivers to the client on the writer's core).
    struct Coalesce<S> {
        #[pin]
        inner: S,
        done: bool,
        gap: std::time::Duration,
        held: Option<Held>,
        last_write: Option<tokio::time::Instant>,
        // Armed while frames are held (`held` is `Some` only then, between
        // polls).
        timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }
}

/// Frames taken from the stream, not yet written.
enum Held {
    One(Bytes),
    Many(BytesMut),
}

impl Held {
    fn len(&self) -> usize {
        match self {
            Held::One(b) => b.len(),
            Held::Many(b) => b.len(),
        }
    }

    fn push(self, frame: Bytes) -> Self {
        match self {
            Held::One(first) => {
                let mut b = BytesMut::with_capacity((first.len() + frame.len()) * 4);
                b.extend_from_slice(&first);
                b.extend_from_slice(&frame);
                Held::Many(b)
            }
            Held::Many(mut b) => {
                b.extend_from_slice(&frame);
                Held::Many(b)
            }
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Held::One(b) => b,
            Held::Many(b) => b.freeze(),
        }
    }
}

impl<S> Coalesce<S> {
    fn new(inner: S, gap: std::time::Duration) -> Self {
        Self {
            inner,
            done: false,
            gap,
            held: None,
            last_write: None,
            timer: None,
        }
    }
}

impl<S: futures_util::Stream<Item = Bytes>> futures_util::Stream for Coalesce<S> {
    type Item = Bytes;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Bytes>> {
        use std::future::Future;
        use std::task::Poll;
        let mut this = self.project();
        loop {
            if this.held.is_some() {
                let timer = this.timer.as_mut().expect("armed");
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            while !*this.done && this.held.as_ref().map_or(0, Held::len) < COALESCE_BYTES {
                match this.inner.as_mut().poll_next(cx) {
                    Poll::Ready(Some(frame)) => {
                        *this.held = Some(match this.held.take() {
                            None => Held::One(frame),
                            Some(held) => held.push(frame),
                        });
                    }
                    Poll::Ready(None) => *this.done = true,
                    // The inner stream registered the waker: woken for more.
                    Poll::Pending => break,
                }
            }
            let Some(held) = this.held.take() else {
                return if *this.done {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                };
            };
            let now = tokio::time::Instant::now();
            let due = this.last_write.map(|t| t + *this.gap);
            if let Some(due) =
                due.filter(|&d| d > now && !*this.done && held.len() < COALESCE_BYTES)
            {
                *this.held = Some(held);
                match this.timer.as_mut() {
                    Some(t) => t.as_mut().reset(due),
                    None => *this.timer = Some(Box::pin(tokio::time::sleep_until(due))),
                }
                continue;
            }
            *this.last_write = Some(now);
            return Poll::Ready(Some(held.into_bytes()));
        }
    }
}

/// `stream.reset` is stream-only: no `id:` line (the client's position stays
/// where it was), never persisted.
fn reset_frame(oldest: u64) -> Bytes {
    let data = serde_json::json!({
        "type": "stream.reset",
        "ts": crate::util::now_ts(),
        "payload": {"oldestAvailableId": oldest.to_string()},
    });
    Bytes::from(format!("event: stream.reset\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, chat: Option<&str>) -> Published {
        Published::new(1, kind.into(), chat.map(Into::into), "{}")
    }

    /// The first frame goes at once; frames that follow within the gap go
    /// together when it has passed; with no gap, each goes as it comes.
    #[tokio::test]
    async fn coalesce_holds_frames_for_the_gap_only() {
        use std::time::Duration;
        use tokio::time::Instant;
        for gap in [Duration::from_millis(200), Duration::ZERO] {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
            let mut s = Coalesce::new(
                tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
                gap,
            );
            let t0 = Instant::now();
            tx.send(Bytes::from_static(b"a")).unwrap();
            assert_eq!(s.next().await.unwrap(), "a");
            assert!(t0.elapsed() < Duration::from_millis(100));
            tx.send(Bytes::from_static(b"b")).unwrap();
            tx.send(Bytes::from_static(b"c")).unwrap();
            let bc = s.next().await.unwrap();
            if gap.is_zero() {
                assert_eq!(bc, "bc", "both were ready at once");
            } else {
                assert_eq!(bc, "bc");
                assert!(t0.elapsed() >= gap, "held for the gap");
            }
            drop(tx);
            assert!(s.next().await.is_none());
        }
    }

    #[test]
    fn filters() {
        let f = Filter::new(Some("c_1".into()), Some("chat.turn.*, engine.ready"));
        assert!(f.matches(&ev("chat.turn.delta", Some("c_1"))));
        assert!(!f.matches(&ev("chat.turn.delta", Some("c_2"))));
        assert!(!f.matches(&ev("chat.updated", Some("c_1"))));
        assert!(f.matches(&ev("engine.ready", None)));
        let all = Filter::new(None, None);
        assert!(all.matches(&ev("anything", Some("c_9"))));
    }
}
