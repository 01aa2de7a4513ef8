//! The event bus: the one way any service makes a transition visible.
//!
//! [`EventBus::publish`] assigns the next id, appends the line to the
//! journal and broadcasts it, all under one lock, so the order of ids, the
//! order of lines in the file and the order every live subscriber sees are
//! the same.
//!
//! A subscriber ([`EventBus::subscribe`]) attaches under that same lock: it
//! gets a broadcast receiver *and* the journal byte ranges holding every
//! event up to the newest one, so the replay and the live tail meet exactly —
//! no gap, no duplicate. If a subscriber falls behind the broadcast buffer
//! (`Lagged`), it re-attaches from its cursor and is caught up from the
//! journal instead of losing events. Publishers never wait for subscribers.
//!
//! Ids are unique across a power loss ([`IdFloor`]): the journal is not
//! fsynced per event, so a power cut can lose its tail after those events
//! went out (SSE, webhooks); the ids handed out are reserved durably in
//! blocks, and after a reboot numbering resumes above the reservation, never
//! reusing an id the backend (which deduplicates by id) has already seen.

use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::Stream;
use serde::Serialize;
use tokio::sync::broadcast;

use super::journal::{self, Journal, LoadWarning, ReplayPlan};
use super::{EventHeader, EventKind};

/// Live events buffered per subscriber before it counts as lagging.
const BROADCAST_CAPACITY: usize = 4096;

/// One published event, serialized once and shared by every subscriber.
#[derive(Debug)]
pub struct Published {
    pub id: u64,
    pub kind: String,
    pub chat_id: Option<String>,
    /// The complete SSE frame (`id:`, `event:`, `data:`), built once so a
    /// thousand subscribers share one buffer instead of formatting it each.
    /// The envelope JSON (the journal line) is a slice of it.
    pub frame: Bytes,
    json_start: usize,
}

impl Published {
    /// From a complete frame whose envelope JSON starts at `json_start` and
    /// which ends with `\n\n`.
    fn from_frame(
        id: u64,
        kind: String,
        chat_id: Option<String>,
        frame: Vec<u8>,
        json_start: usize,
    ) -> Self {
        Self {
            id,
            kind,
            chat_id,
            frame: Bytes::from(frame),
            json_start,
        }
    }

    pub fn new(id: u64, kind: String, chat_id: Option<String>, json: &str) -> Self {
        let head = format!("id: {id}\nevent: {kind}\ndata: ");
        let mut frame = Vec::with_capacity(head.len() + json.len() + 2);
        frame.extend_from_slice(head.as_bytes());
        frame.extend_from_slice(json.as_bytes());
        frame.extend_from_slice(b"\n\n");
        Self {
            id,
            kind,
            chat_id,
            frame: Bytes::from(frame),
            json_start: head.len(),
        }
    }

    /// The envelope JSON: one journal line, the SSE `data:`.
    pub fn json(&self) -> &str {
        // Built from a &str in `new`, so the slice is valid UTF-8.
        std::str::from_utf8(&self.frame[self.json_start..self.frame.len() - 2]).unwrap_or_default()
    }

    /// Rebuild from a journal line; `None` if it is not a valid envelope.
    pub fn from_line(line: &[u8]) -> Option<Self> {
        if let Some((id, kind, chat_id)) = fast_header(line) {
            return Some(Self::new(
                id,
                kind.to_owned(),
                chat_id.map(str::to_owned),
                std::str::from_utf8(line).ok()?,
            ));
        }
        let header: EventHeader = serde_json::from_slice(line).ok()?;
        let id = header.id.parse().ok()?;
        let kind = header.kind.into_owned();
        let chat_id = header.chat_id.map(|c| c.into_owned());
        Some(Self::new(
            id,
            kind,
            chat_id,
            std::str::from_utf8(line).ok()?,
        ))
    }
}

/// The header of a line this engine wrote, read without a JSON parse: the
/// envelope starts `{"id":"N","ts":"…",["chatId":"…",]"type":"…"` and none
/// of those strings contain escapes. Anything else returns `None` and gets
/// the full parse.
fn fast_header(line: &[u8]) -> Option<(u64, &str, Option<&str>)> {
    fn string<'a>(rest: &'a [u8], key: &[u8]) -> Option<(&'a str, &'a [u8])> {
        let rest = rest.strip_prefix(key)?;
        let end = memchr::memchr2(b'"', b'\\', rest)?;
        if rest[end] != b'"' {
            return None;
        }
        Some((std::str::from_utf8(&rest[..end]).ok()?, &rest[end + 1..]))
    }
    if line.last() != Some(&b'}') {
        return None;
    }
    let (id, rest) = string(line, br#"{"id":""#)?;
    let (_ts, rest) = string(rest, br#","ts":""#)?;
    let (chat_id, rest) = match string(rest, br#","chatId":""#) {
        Some((chat, rest)) => (Some(chat), rest),
        None => (None, rest),
    };
    let (kind, _) = string(rest, br#","type":""#)?;
    Some((id.parse().ok()?, kind, chat_id))
}

/// What a subscription yields.
#[derive(Debug, Clone)]
pub enum SubscriptionItem {
    /// The requested position is older than what is retained (or unknown);
    /// the client should refetch snapshots. Never persisted.
    Reset {
        oldest_available_id: u64,
    },
    Event(Arc<Published>),
}

struct BusState {
    journal: Journal,
    last_id: u64,
    floor: IdFloor,
}

/// Ids reserved per durable write of the floor file.
const ID_RESERVE: u64 = 4096;

/// The durable high-water mark of ids: `event-ids.json` next to the journal,
/// `{"bootId","reserved"}`. Before an id above `reserved` is handed out,
/// `reserved` moves up by [`ID_RESERVE`] and is written with fsync. On open,
/// in the same boot (a restart or `kill -9`: the page cache survived, the
/// journal is complete) numbering continues from the journal; after a
/// reboot (possibly a power cut that lost the journal's tail) it continues
/// above `reserved`. A clean shutdown ([`EventBus::sync`]) fsyncs the
/// journal and lowers `reserved` to the last id, so a clean reboot
/// continues without a jump.
struct IdFloor {
    path: std::path::PathBuf,
    boot_id: String,
    reserved: u64,
}

#[derive(Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct FloorFile {
    boot_id: String,
    reserved: u64,
}

impl IdFloor {
    /// Load the floor; returns it and the lowest id the next one must exceed
    /// because of it (0 in the same boot).
    fn load(path: std::path::PathBuf, boot_id: String) -> (Self, u64) {
        let stored = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<FloorFile>(&b).ok());
        let (reserved, above) = match stored {
            Some(f) if f.boot_id == boot_id && !boot_id.is_empty() => (f.reserved, 0),
            Some(f) => {
                tracing::info!(
                    reserved = f.reserved,
                    "first start since a reboot; event ids continue above the reserved ones"
                );
                (f.reserved, f.reserved)
            }
            None => (0, 0),
        };
        (
            Self {
                path,
                boot_id,
                reserved,
            },
            above,
        )
    }

    /// Make sure `id` is covered by a durable reservation.
    fn cover(&mut self, id: u64) {
        if id <= self.reserved {
            return;
        }
        self.write(id + ID_RESERVE - 1);
    }

    fn write(&mut self, reserved: u64) {
        let body = serde_json::to_vec(&FloorFile {
            boot_id: self.boot_id.clone(),
            reserved,
        })
        .expect("floor serializes");
        match crate::util::write_atomic(&self.path, &body, Some(0o600)) {
            Ok(()) => self.reserved = reserved,
            // Still hand the id out: a power cut before the next successful
            // write could reuse ids, which is what we had before; not worth
            // stopping the engine for.
            Err(e) => {
                tracing::error!(error = %e, path = %self.path.display(), "could not reserve event ids")
            }
        }
    }
}

/// This kernel boot's id; empty (treated as "another boot") if unknown.
fn current_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// `.../events.jsonl` → `.../event-ids.json`.
fn floor_path(events_file: &std::path::Path) -> std::path::PathBuf {
    events_file.with_file_name("event-ids.json")
}

struct Inner {
    state: Mutex<BusState>,
    tx: broadcast::Sender<Arc<Published>>,
    subscribers: AtomicUsize,
}

#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

/// The envelope minus its id, serialized outside the lock.
#[derive(Serialize)]
struct Unnumbered<'a> {
    ts: String,
    #[serde(rename = "chatId", skip_serializing_if = "Option::is_none")]
    chat_id: Option<&'a str>,
    #[serde(flatten)]
    kind: &'a EventKind,
}

impl EventBus {
    /// Open the journal and continue numbering after its last id. Load
    /// problems (torn tail, garbage lines) are logged as warnings.
    pub fn open(events_file: &std::path::Path, max_bytes: u64) -> std::io::Result<Self> {
        Self::open_in_boot(events_file, max_bytes, current_boot_id())
    }

    /// [`open`](Self::open) as if the kernel's boot id were `boot_id`.
    fn open_in_boot(
        events_file: &std::path::Path,
        max_bytes: u64,
        boot_id: String,
    ) -> std::io::Result<Self> {
        let (journal, warnings) = Journal::open(events_file, max_bytes)?;
        for w in &warnings {
            match w {
                LoadWarning::TornTail { path, bytes } => {
                    tracing::warn!(path = %path.display(), bytes, "event journal had a torn last line (power loss?); cut it off")
                }
                LoadWarning::BadLine { path, offset } => {
                    tracing::warn!(path = %path.display(), offset, "skipping unreadable event journal line")
                }
                LoadWarning::OutOfOrder { path, offset, id } => {
                    tracing::warn!(path = %path.display(), offset, id, "skipping out-of-order event journal line")
                }
            }
        }
        let (floor, above) = IdFloor::load(floor_path(events_file), boot_id);
        let last_id = journal.last_id().max(above);
        tracing::info!(last_id, retained = journal.len(), "event journal loaded");
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Ok(Self {
            inner: Arc::new(Inner {
                state: Mutex::new(BusState {
                    journal,
                    last_id,
                    floor,
                }),
                tx,
                subscribers: AtomicUsize::new(0),
            }),
        })
    }

    /// Publish an event: number it, persist it, fan it out. Never blocks on
    /// subscribers. A journal write failure (disk full) is logged and the
    /// event is still delivered live.
    pub fn publish(&self, chat_id: Option<&str>, kind: EventKind) -> Arc<Published> {
        let type_name = kind.type_name();
        crate::metrics::event_published(type_name);
        let mut body = Vec::with_capacity(256);
        serde_json::to_writer(
            &mut body,
            &Unnumbered {
                ts: crate::util::now_ts(),
                chat_id,
                kind: &kind,
            },
        )
        .expect("events serialize");
        let mut state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let id = state.last_id + 1;
        state.last_id = id;
        state.floor.cover(id);
        // The SSE frame is built in one buffer; the journal line is a slice
        // of it (the envelope plus the first of the two closing newlines).
        // `body` starts with `{`; put the id first so the journal index can
        // read it without a full parse.
        let mut frame = Vec::with_capacity(body.len() + type_name.len() + 64);
        let _ = write!(frame, "id: {id}\nevent: {type_name}\ndata: ");
        let json_start = frame.len();
        let _ = write!(frame, "{{\"id\":\"{id}\",");
        frame.extend_from_slice(&body[1..]);
        frame.push(b'\n');
        if let Err(e) = state.journal.append_line(id, &frame[json_start..]) {
            tracing::error!(error = %e, id, "could not append to the event journal");
        }
        frame.push(b'\n');
        let published = Arc::new(Published::from_frame(
            id,
            type_name.to_owned(),
            chat_id.map(str::to_owned),
            frame,
            json_start,
        ));
        // No receivers is fine.
        let _ = self.inner.tx.send(published.clone());
        drop(state);
        tracing::debug!(id, r#type = type_name, "event published");
        published
    }

    /// Clean shutdown: fsync the journal and lower the id reservation to the
    /// last id, so the next start (even after a reboot) numbers on without a
    /// jump. Publishing afterwards is still safe (it reserves again).
    pub fn sync(&self) {
        let mut state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = state.journal.sync() {
            tracing::error!(error = %e, "could not fsync the event journal");
            return;
        }
        let last = state.last_id;
        state.floor.write(last);
    }

    pub fn last_id(&self) -> u64 {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_id
    }

    pub fn oldest_id(&self) -> Option<u64> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .journal
            .oldest_id()
    }

    /// Bytes in the journal files (both segments).
    pub fn journal_bytes(&self) -> u64 {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .journal
            .bytes()
    }

    /// Open SSE streams right now.
    pub fn subscriber_count(&self) -> usize {
        self.inner.subscribers.load(Ordering::Relaxed)
    }

    /// Attach under the lock: a live receiver plus the journal ranges of
    /// every event after `after` that was published before the receiver
    /// existed.
    fn attach(&self, after: u64) -> (broadcast::Receiver<Arc<Published>>, ReplayPlan, u64) {
        let state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.inner.tx.subscribe();
        (rx, state.journal.plan_after(after), state.last_id)
    }

    /// A client stream like [`subscribe`](Self::subscribe), unless `max`
    /// client streams are already open (the check and the count are one
    /// atomic step, so concurrent requests cannot overshoot).
    pub fn try_subscribe(&self, after: Option<u64>, max: usize) -> Result<Subscription, Full> {
        let counter = &self.inner.subscribers;
        let mut now = counter.load(Ordering::Relaxed);
        loop {
            if now >= max {
                return Err(Full { max });
            }
            match counter.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(seen) => now = seen,
            }
        }
        // The guard takes over the increment made above.
        let guard = SubscriberGuard(self.inner.clone());
        Ok(self.subscription(after, Some(guard)))
    }

    /// Every event with id > `after` (or only live ones when `after` is
    /// `None`), in order, forever. Starts with a `Reset` when `after` is older
    /// than the retained journal or newer than the last id ever published.
    pub fn subscribe(&self, after: Option<u64>) -> Subscription {
        self.subscribe_counted(after, true)
    }

    /// Like [`subscribe`](Self::subscribe), for the engine's own consumers
    /// (webhooks, the status watcher): not counted in `subscriber_count`,
    /// which reports client streams.
    pub fn subscribe_internal(&self, after: Option<u64>) -> Subscription {
        self.subscribe_counted(after, false)
    }

    fn subscribe_counted(&self, after: Option<u64>, counted: bool) -> Subscription {
        let guard = counted.then(|| SubscriberGuard::new(self.inner.clone()));
        self.subscription(after, guard)
    }

    fn subscription(&self, after: Option<u64>, guard: Option<SubscriberGuard>) -> Subscription {
        let bus = self.clone();
        let stream = async_stream::stream! {
            let _guard = guard;
            let mut cursor = match after {
                Some(after) => after,
                None => bus.last_id(),
            };
            loop {
                let (mut rx, mut plan, last_id) = bus.attach(cursor);
                // A position we cannot honour: events after it were dropped
                // by retention, or it comes from a journal that no longer
                // exists (newer than anything published). Tell the client,
                // then give it all we have.
                let oldest = plan.oldest_available.unwrap_or(last_id + 1);
                let lost = cursor + 1 < oldest && cursor < last_id;
                let from_future = cursor > last_id;
                if lost || from_future {
                    yield SubscriptionItem::Reset { oldest_available_id: oldest };
                }
                if from_future {
                    cursor = 0;
                    (rx, plan, _) = bus.attach(cursor);
                }
                if !plan.chunks.is_empty() {
                    let mut batches = replay_batches(plan, cursor);
                    while let Some(batch) = batches.recv().await {
                        match batch {
                            Ok(batch) => {
                                for ev in batch {
                                    cursor = ev.id;
                                    yield SubscriptionItem::Event(ev);
                                }
                            }
                            Err(e) => tracing::error!(error = %e, "event journal replay failed; live events continue"),
                        }
                    }
                }
                loop {
                    match rx.recv().await {
                        Ok(ev) => {
                            if ev.id > cursor {
                                cursor = ev.id;
                                yield SubscriptionItem::Event(ev);
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(skipped)) => {
                            tracing::info!(skipped, cursor, "slow event subscriber; catching up from the journal");
                            break;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        };
        Subscription {
            inner: Box::pin(stream),
        }
    }
}

/// All client streams are taken: `REPLICAS_MAX_SUBSCRIBERS` are open.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("{max} event streams are open already; try again later")]
pub struct Full {
    pub max: usize,
}

/// Events per replay batch at most.
const REPLAY_BATCH_EVENTS: usize = 512;
/// Bytes per replay batch at most (a single larger event is one batch).
const REPLAY_BATCH_BYTES: usize = 256 * 1024;

/// Read a replay plan on a blocking thread and hand the events over in
/// batches, so a long replay starts streaming at once and reading and
/// sending overlap. Bounded by bytes, not by the journal: the channel holds
/// one batch, so the next chunk of the journal is read only once the
/// previous batch was taken by the stream (which takes it when the client
/// has accepted what came before). A stalled client thus pins a few hundred
/// KiB, whatever the journal size. Reading stops when the subscriber goes
/// away.
fn replay_batches(
    plan: ReplayPlan,
    after: u64,
) -> tokio::sync::mpsc::Receiver<std::io::Result<Vec<Arc<Published>>>> {
    replay_batches_counted(plan, after, None)
}

/// [`replay_batches`], adding every line read to `read_bytes` (tests).
fn replay_batches_counted(
    plan: ReplayPlan,
    after: u64,
    read_bytes: Option<Arc<std::sync::atomic::AtomicU64>>,
) -> tokio::sync::mpsc::Receiver<std::io::Result<Vec<Arc<Published>>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::task::spawn_blocking(move || {
        let mut batch = Vec::with_capacity(64);
        let mut batch_bytes = 0usize;
        let mut open = true;
        let read = journal::read_plan(&plan, |line| {
            if let Some(n) = &read_bytes {
                n.fetch_add(line.len() as u64 + 1, Ordering::Relaxed);
            }
            match Published::from_line(line) {
                Some(p) if p.id > after => {
                    batch_bytes += p.frame.len();
                    batch.push(Arc::new(p));
                }
                Some(_) => {}
                None => tracing::warn!("skipping unreadable event journal line during replay"),
            }
            if batch.len() >= REPLAY_BATCH_EVENTS || batch_bytes >= REPLAY_BATCH_BYTES {
                batch_bytes = 0;
                open = tx.blocking_send(Ok(std::mem::take(&mut batch))).is_ok();
            }
            open
        });
        if open && !batch.is_empty() {
            let _ = tx.blocking_send(Ok(batch));
        }
        if let Err(e) = read {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

struct SubscriberGuard(Arc<Inner>);

impl SubscriberGuard {
    fn new(inner: Arc<Inner>) -> Self {
        inner.subscribers.fetch_add(1, Ordering::Relaxed);
        Self(inner)
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream of [`SubscriptionItem`]s; dropping it unsubscribes.
pub struct Subscription {
    inner: std::pin::Pin<Box<dyn Stream<Item = SubscriptionItem> + Send>>,
}

impl Stream for Subscription {
    type Item = SubscriptionItem;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn ev(i: u64) -> EventKind {
        EventKind::Error {
            code: "test".into(),
            message: format!("{i}"),
            source: "test".into(),
        }
    }

    async fn take_ids(sub: &mut Subscription, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        while out.len() < n {
            match tokio::time::timeout(std::time::Duration::from_secs(10), sub.next()).await {
                Ok(Some(SubscriptionItem::Event(e))) => out.push(e.id),
                Ok(Some(SubscriptionItem::Reset { .. })) => {}
                other => panic!("stream ended early: {other:?} after {out:?}"),
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replay_meets_live_without_gap_or_duplicate_under_concurrent_publish() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open(&dir.path().join("events.jsonl"), 1 << 30).unwrap();
        for i in 0..500 {
            bus.publish(None, ev(i));
        }
        let publisher = {
            let bus = bus.clone();
            tokio::spawn(async move {
                for i in 0..2000 {
                    bus.publish(Some("c_1"), ev(i));
                    if i % 100 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        let mut sub = bus.subscribe(Some(100));
        let got = take_ids(&mut sub, 2400).await;
        publisher.await.unwrap();
        assert_eq!(got, (101..=2500).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn lagging_subscriber_is_caught_up_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open(&dir.path().join("events.jsonl"), 1 << 30).unwrap();
        let mut sub = bus.subscribe(Some(0));
        // Make the subscriber attach, then publish far more than the buffer.
        bus.publish(None, ev(0));
        assert_eq!(take_ids(&mut sub, 1).await, vec![1]);
        let n = BROADCAST_CAPACITY as u64 * 3;
        for i in 0..n {
            bus.publish(None, ev(i));
        }
        let got = take_ids(&mut sub, n as usize).await;
        assert_eq!(got, (2..=n + 1).collect::<Vec<_>>());
    }

    /// A subscriber that stops reading in the middle of a long replay pins
    /// a bounded number of bytes: the reader waits for it after about one
    /// block and two batches, however long the journal.
    #[tokio::test]
    async fn a_stalled_replay_reads_a_bounded_number_of_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open(&dir.path().join("events.jsonl"), 1 << 30).unwrap();
        let big = "x".repeat(16 * 1024);
        for i in 0..1000 {
            bus.publish(
                None,
                EventKind::Error {
                    code: "test".into(),
                    message: format!("{i}{big}"),
                    source: "test".into(),
                },
            );
        }
        let journal_bytes = std::fs::metadata(dir.path().join("events.jsonl"))
            .unwrap()
            .len();
        assert!(journal_bytes > 16_000_000);
        let (_rx, plan, _) = bus.attach(0);
        let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut rx = replay_batches_counted(plan, 0, Some(read.clone()));
        let first = rx.recv().await.unwrap().unwrap();
        assert!(!first.is_empty());
        // Wait until the reader has stopped (blocked on the full channel).
        let mut last = u64::MAX;
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let now = read.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
        }
        let bound = (journal::REPLAY_BLOCK + 3 * REPLAY_BATCH_BYTES + 64 * 1024) as u64;
        assert!(
            last <= bound,
            "read {last} bytes of {journal_bytes} for a stalled subscriber (bound {bound})"
        );
        // Reading on resumes and ends with every event.
        let mut n = first.len();
        while let Some(batch) = rx.recv().await {
            n += batch.unwrap().len();
        }
        assert_eq!(n, 1000);
    }

    #[tokio::test]
    async fn client_streams_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open(&dir.path().join("events.jsonl"), 1 << 30).unwrap();
        let a = bus.try_subscribe(None, 2).unwrap();
        let _internal = bus.subscribe_internal(None);
        let b = bus.try_subscribe(Some(0), 2).unwrap();
        assert_eq!(bus.subscriber_count(), 2);
        assert_eq!(bus.try_subscribe(None, 2).err().map(|f| f.max), Some(2));
        drop(a);
        let c = bus.try_subscribe(None, 2).unwrap();
        assert_eq!(bus.subscriber_count(), 2);
        drop((b, c));
        assert_eq!(bus.subscriber_count(), 0);
    }

    #[test]
    fn fast_header_agrees_with_the_full_parse() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open(&dir.path().join("events.jsonl"), 1 << 30).unwrap();
        let a = bus.publish(Some("c_1"), ev(1));
        let b = bus.publish(None, EventKind::ChatDeleted {});
        for p in [a, b] {
            let line = p.json().as_bytes();
            let (id, kind, chat) = fast_header(line).expect("engine lines take the fast path");
            let full: EventHeader = serde_json::from_slice(line).unwrap();
            assert_eq!(id.to_string(), full.id);
            assert_eq!(kind, full.kind);
            assert_eq!(chat, full.chat_id.as_deref());
        }
        // Other shapes fall back to the full parse.
        assert!(fast_header(br#"{"type":"error","id":"3","payload":{}}"#).is_none());
        assert!(fast_header(br#"{"id":"3","ts":"x\"y","type":"error"}"#).is_none());
        let p = Published::from_line(br#"{"type":"error","id":"3","payload":{}}"#).unwrap();
        assert_eq!((p.id, p.kind.as_str()), (3, "error"));
    }

    #[tokio::test]
    async fn ids_continue_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let bus = EventBus::open(&path, 1 << 30).unwrap();
        for i in 0..3 {
            bus.publish(None, ev(i));
        }
        drop(bus);
        let bus = EventBus::open(&path, 1 << 30).unwrap();
        assert_eq!(bus.publish(None, ev(9)).id, 4);
    }

    /// A power cut loses the journal's unsynced tail (ids 6..=10 here, which
    /// clients and the backend may have seen): after the reboot, ids go on
    /// above every id ever handed out. Within one boot (restart, kill -9)
    /// and after a clean shutdown they continue without a jump.
    #[tokio::test]
    async fn ids_are_never_reused_after_a_power_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let bus = EventBus::open_in_boot(&path, 1 << 30, "boot-a".into()).unwrap();
        let mut cut_at = 0;
        for i in 1..=10 {
            bus.publish(None, ev(i));
            if i == 5 {
                cut_at = std::fs::metadata(&path).unwrap().len();
            }
        }
        drop(bus);
        // Same boot (kill -9): the journal is complete; numbering goes on.
        let bus = EventBus::open_in_boot(&path, 1 << 30, "boot-a".into()).unwrap();
        assert_eq!(bus.publish(None, ev(0)).id, 11);
        drop(bus);
        // Power cut: the tail after id 5 is gone, the machine rebooted.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(cut_at).unwrap();
        drop(f);
        let bus = EventBus::open_in_boot(&path, 1 << 30, "boot-b".into()).unwrap();
        let next = bus.publish(None, ev(0)).id;
        assert!(
            next > 11,
            "id {next} may have been seen before the power cut"
        );
        // A clean shutdown, then a reboot: no jump.
        bus.sync();
        drop(bus);
        let bus = EventBus::open_in_boot(&path, 1 << 30, "boot-c".into()).unwrap();
        assert_eq!(bus.publish(None, ev(0)).id, next + 1);
    }

    #[tokio::test]
    async fn position_beyond_retention_or_from_the_future_resets() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::open(&dir.path().join("events.jsonl"), 8192).unwrap();
        for i in 0..500 {
            bus.publish(None, ev(i));
        }
        let oldest = bus.oldest_id().unwrap();
        assert!(oldest > 1);
        let mut sub = bus.subscribe(Some(0));
        match sub.next().await.unwrap() {
            SubscriptionItem::Reset {
                oldest_available_id,
            } => assert_eq!(oldest_available_id, oldest),
            other => panic!("{other:?}"),
        }
        assert_eq!(take_ids(&mut sub, 1).await, vec![oldest]);

        let mut sub = bus.subscribe(Some(10_000));
        assert!(matches!(
            sub.next().await.unwrap(),
            SubscriptionItem::Reset { .. }
        ));
        assert_eq!(take_ids(&mut sub, 1).await, vec![oldest]);
    }
}
