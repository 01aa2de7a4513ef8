//! The webhook outbox: webhook events not yet delivered, in id order, on
//! disk so they survive a restart or a `kill -9`.
//!
//! Files (both under `~/.replicas/engine/`):
//! - `webhook-outbox.jsonl`: append-only, one event envelope per line
//!   (exactly the journal line). Delivered lines stay until a compaction
//!   rewrites the file with only the pending ones.
//! - `webhook-cursor.json`: `{"deliveredId":N}` — every event with id ≤ N is
//!   finished (delivered, permanently rejected, or dropped by the bound).
//!   Written by rename, at most every few hundred milliseconds: a crash can
//!   only make it stale, which means a few events are sent twice
//!   (at-least-once; the receiver dedupes by id), never skipped.
//!
//! Invariants:
//! - `pending` holds events with id > `cursor`, strictly increasing; the file
//!   holds a superset of them (plus finished ones until compaction);
//! - each append is one `write` of `line + "\n"`, so a `kill -9` never loses
//!   an appended event; a torn last line (power loss) is skipped on load;
//! - the pending set is bounded by count and bytes: past either bound the
//!   oldest events are dropped and counted (the caller reports them), so a
//!   backend that is gone for days cannot fill the disk. The file stays
//!   within about twice the byte bound plus [`COMPACT_MIN_BYTES`];
//! - all state sits behind one short `std` mutex; the slow part of a
//!   compaction (writing the new file) happens outside it.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::events::Published;

/// Never compact a file smaller than this: rewriting a small file on every
/// delivery would cost more than it saves.
pub const COMPACT_MIN_BYTES: u64 = 256 * 1024;

#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub file: PathBuf,
    pub cursor_file: PathBuf,
    pub max_events: usize,
    pub max_bytes: u64,
}

/// What [`Outbox::open`] found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadReport {
    /// Pending events loaded.
    pub pending: usize,
    /// Lines that were not events (torn tail, garbage) and were skipped.
    pub bad_lines: usize,
    /// Events dropped because the file held more than the bound.
    pub dropped: u64,
    /// The cursor file was unreadable; everything in the outbox is resent.
    pub cursor_unreadable: bool,
}

#[derive(Serialize, Deserialize)]
struct CursorFile {
    #[serde(rename = "deliveredId")]
    delivered_id: u64,
}

struct State {
    file: File,
    file_len: u64,
    pending: VecDeque<Arc<Published>>,
    pending_bytes: u64,
    cursor: u64,
    /// Highest id ever appended (0 when none): where the collector resumes.
    last_enqueued: u64,
    cursor_dirty: bool,
    dropped_unreported: u64,
    compacting: bool,
}

pub struct Outbox {
    cfg: OutboxConfig,
    state: Mutex<State>,
    /// Serializes cursor-file writes so an older value never lands last.
    cursor_write: Mutex<()>,
}

fn line_bytes(ev: &Published) -> u64 {
    ev.json().len() as u64 + 1
}

impl Outbox {
    pub fn open(cfg: OutboxConfig) -> io::Result<(Self, LoadReport)> {
        if let Some(dir) = cfg.file.parent() {
            crate::util::create_private_dir(dir)?;
        }
        let mut report = LoadReport::default();
        let cursor = match std::fs::read(&cfg.cursor_file) {
            Ok(bytes) => match serde_json::from_slice::<CursorFile>(&bytes) {
                Ok(c) => c.delivered_id,
                Err(_) => {
                    report.cursor_unreadable = true;
                    0
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let data = match std::fs::read(&cfg.file) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut pending = VecDeque::new();
        let mut pending_bytes = 0;
        let mut last_enqueued = 0;
        for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match Published::from_line(line) {
                Some(ev) if ev.id > last_enqueued => {
                    last_enqueued = ev.id;
                    if ev.id > cursor {
                        pending_bytes += line_bytes(&ev);
                        pending.push_back(Arc::new(ev));
                    }
                }
                _ => report.bad_lines += 1,
            }
        }
        let file = crate::util::open_private_append(&cfg.file)?;
        let mut file_len = data.len() as u64;
        // A torn last line must not swallow the next append.
        if data.last().is_some_and(|b| *b != b'\n') {
            (&file).write_all(b"\n")?;
            file_len += 1;
        }
        let outbox = Self {
            cfg,
            state: Mutex::new(State {
                file,
                file_len,
                pending,
                pending_bytes,
                cursor,
                last_enqueued,
                cursor_dirty: false,
                dropped_unreported: 0,
                compacting: false,
            }),
            cursor_write: Mutex::new(()),
        };
        {
            let mut st = outbox.lock();
            report.dropped = outbox.enforce_bound(&mut st);
            report.pending = st.pending.len();
        }
        Ok((outbox, report))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bus position to resume collecting after: everything up to it is
    /// already in the outbox or finished.
    pub fn resume_after(&self) -> u64 {
        let st = self.lock();
        st.cursor.max(st.last_enqueued)
    }

    /// Forget everything (the event journal was reset and ids restarted).
    pub fn reset_to(&self, id: u64) {
        let mut st = self.lock();
        st.pending.clear();
        st.pending_bytes = 0;
        st.cursor = id;
        st.last_enqueued = id;
        st.cursor_dirty = true;
    }

    /// Append an event (ids must increase; older ones are ignored). The
    /// event is queued in memory even if the disk write fails (logged by the
    /// caller). Returns how many of the oldest events the bound dropped.
    pub fn push(&self, ev: Arc<Published>) -> (u64, io::Result<()>) {
        let mut st = self.lock();
        if ev.id <= st.last_enqueued {
            return (0, Ok(()));
        }
        let mut buf = Vec::with_capacity(ev.json().len() + 1);
        buf.extend_from_slice(ev.json().as_bytes());
        buf.push(b'\n');
        let written = (&st.file).write_all(&buf);
        if written.is_ok() {
            st.file_len += buf.len() as u64;
        }
        st.last_enqueued = ev.id;
        st.pending_bytes += buf.len() as u64;
        st.pending.push_back(ev);
        let dropped = self.enforce_bound(&mut st);
        (dropped, written)
    }

    fn enforce_bound(&self, st: &mut State) -> u64 {
        let mut dropped = 0;
        while st.pending.len() > self.cfg.max_events
            || (st.pending_bytes > self.cfg.max_bytes && st.pending.len() > 1)
        {
            let Some(ev) = st.pending.pop_front() else {
                break;
            };
            st.pending_bytes -= line_bytes(&ev);
            st.cursor = st.cursor.max(ev.id);
            st.cursor_dirty = true;
            dropped += 1;
        }
        st.dropped_unreported += dropped;
        dropped
    }

    /// The oldest pending event.
    pub fn front(&self) -> Option<Arc<Published>> {
        self.lock().pending.front().cloned()
    }

    /// The oldest pending event with an id above `id` (the coalescer walks
    /// the queue with it without holding the lock).
    pub fn next_after(&self, id: u64) -> Option<Arc<Published>> {
        let st = self.lock();
        let i = st.pending.partition_point(|e| e.id <= id);
        st.pending.get(i).cloned()
    }

    /// Is `id` still pending (not dropped by the bound meanwhile)?
    pub fn is_pending(&self, id: u64) -> bool {
        let st = self.lock();
        id > st.cursor && st.pending.front().is_some_and(|f| f.id <= id)
    }

    /// Everything up to `id` is finished.
    pub fn ack(&self, id: u64) {
        let mut st = self.lock();
        while st.pending.front().is_some_and(|f| f.id <= id) {
            if let Some(ev) = st.pending.pop_front() {
                st.pending_bytes -= line_bytes(&ev);
            }
        }
        if id > st.cursor {
            st.cursor = id;
            st.cursor_dirty = true;
        }
    }

    pub fn len(&self) -> usize {
        self.lock().pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn cursor(&self) -> u64 {
        self.lock().cursor
    }

    /// Drops not yet reported to clients; resets the count.
    pub fn take_dropped_unreported(&self) -> u64 {
        std::mem::take(&mut self.lock().dropped_unreported)
    }

    /// Write the cursor file if it changed. Blocking (small file + rename).
    pub fn persist_cursor(&self) -> io::Result<()> {
        let _w = self.cursor_write.lock().unwrap_or_else(|e| e.into_inner());
        let cursor = {
            let mut st = self.lock();
            if !st.cursor_dirty {
                return Ok(());
            }
            st.cursor_dirty = false;
            st.cursor
        };
        let body = serde_json::to_vec(&CursorFile {
            delivered_id: cursor,
        })
        .map_err(io::Error::other)?;
        let res = write_replace(&self.cfg.cursor_file, &body);
        if res.is_err() {
            self.lock().cursor_dirty = true;
        }
        res
    }

    /// Whether the file holds enough finished lines to be worth rewriting.
    pub fn needs_compaction(&self) -> bool {
        let st = self.lock();
        !st.compacting && st.file_len > COMPACT_MIN_BYTES && st.file_len > 2 * st.pending_bytes
    }

    /// Rewrite the file with only the pending events. Blocking. The cursor
    /// is persisted first so a crash mid-way cannot resurrect finished
    /// events beyond what the cursor already covers.
    pub fn compact(&self) -> io::Result<()> {
        self.persist_cursor()?;
        let (snapshot, snap_last) = {
            let mut st = self.lock();
            if st.compacting {
                return Ok(());
            }
            st.compacting = true;
            let snap: Vec<Arc<Published>> = st.pending.iter().cloned().collect();
            (snap, st.last_enqueued)
        };
        let result = self.compact_from(snapshot, snap_last);
        self.lock().compacting = false;
        result
    }

    fn compact_from(&self, snapshot: Vec<Arc<Published>>, snap_last: u64) -> io::Result<()> {
        let dir = self.cfg.file.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-outbox-")
            .tempfile_in(dir)?;
        {
            let mut w = io::BufWriter::new(tmp.as_file_mut());
            for ev in &snapshot {
                w.write_all(ev.json().as_bytes())?;
                w.write_all(b"\n")?;
            }
            w.flush()?;
        }
        tmp.as_file().sync_data()?;
        // Under the lock: add what was appended meanwhile, swap files.
        let mut st = self.lock();
        let mut extra = Vec::new();
        for ev in st.pending.iter().filter(|e| e.id > snap_last) {
            extra.extend_from_slice(ev.json().as_bytes());
            extra.push(b'\n');
        }
        tmp.as_file_mut().write_all(&extra)?;
        let len = tmp.as_file().metadata()?.len();
        tmp.persist(&self.cfg.file).map_err(|e| e.error)?;
        st.file = OpenOptions::new().append(true).open(&self.cfg.file)?;
        st.file_len = len;
        drop(st);
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        tracing::debug!(bytes = len, "webhook outbox compacted");
        Ok(())
    }

    /// Bytes currently in the outbox file.
    pub fn file_len(&self) -> u64 {
        self.lock().file_len
    }
}

/// Temp file + rename, without fsync: the cursor only needs to survive a
/// process crash, and a stale one merely causes duplicates.
fn write_replace(path: &Path, body: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-cursor-")
        .tempfile_in(dir)?;
    tmp.write_all(body)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: u64) -> Arc<Published> {
        let line = format!(
            r#"{{"id":"{id}","ts":"t","type":"error","payload":{{"code":"c","message":"m","source":"s"}}}}"#
        );
        Arc::new(Published::from_line(line.as_bytes()).unwrap())
    }

    fn cfg(dir: &Path, max_events: usize) -> OutboxConfig {
        OutboxConfig {
            file: dir.join("outbox.jsonl"),
            cursor_file: dir.join("cursor.json"),
            max_events,
            max_bytes: 1 << 30,
        }
    }

    fn ids(o: &Outbox) -> Vec<u64> {
        o.lock().pending.iter().map(|e| e.id).collect()
    }

    #[test]
    fn survives_reopen_with_cursor_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (o, r) = Outbox::open(cfg(dir.path(), 100)).unwrap();
        assert_eq!(r, LoadReport::default());
        for id in [3, 5, 8, 9] {
            assert_eq!(o.push(ev(id)).0, 0);
        }
        o.push(ev(8)).1.unwrap(); // older than the last: ignored
        o.ack(5);
        o.persist_cursor().unwrap();
        drop(o);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("outbox.jsonl"))
            .unwrap();
        f.write_all(br#"{"id":"10","ts""#).unwrap();
        drop(f);
        let (o, r) = Outbox::open(cfg(dir.path(), 100)).unwrap();
        assert_eq!(r.bad_lines, 1);
        assert_eq!(ids(&o), vec![8, 9]);
        assert_eq!(o.resume_after(), 9);
        assert_eq!(o.next_after(0).unwrap().id, 8);
        assert_eq!(o.next_after(8).unwrap().id, 9);
        assert!(o.next_after(9).is_none());
        o.push(ev(11)).1.unwrap();
        drop(o);
        let (o, r) = Outbox::open(cfg(dir.path(), 100)).unwrap();
        assert_eq!(r.bad_lines, 1);
        assert_eq!(ids(&o), vec![8, 9, 11]);
    }

    #[test]
    fn bound_drops_oldest_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let (o, _) = Outbox::open(cfg(dir.path(), 3)).unwrap();
        let dropped: u64 = (1..=10).map(|id| o.push(ev(id)).0).sum();
        assert_eq!(dropped, 7);
        assert_eq!(ids(&o), vec![8, 9, 10]);
        assert_eq!(o.cursor(), 7);
        assert_eq!(o.take_dropped_unreported(), 7);
        assert_eq!(o.take_dropped_unreported(), 0);
        o.persist_cursor().unwrap();
        drop(o);
        let (o, r) = Outbox::open(cfg(dir.path(), 2)).unwrap();
        assert_eq!(r.dropped, 1);
        assert_eq!(ids(&o), vec![9, 10]);
    }

    #[test]
    fn compaction_keeps_pending_and_concurrent_appends() {
        let dir = tempfile::tempdir().unwrap();
        let (o, _) = Outbox::open(cfg(dir.path(), 1_000_000)).unwrap();
        for id in 1..=5000 {
            o.push(ev(id)).1.unwrap();
        }
        o.ack(4990);
        assert!(o.needs_compaction());
        // Simulate an append between snapshot and swap.
        let (snap, last) = {
            let st = o.lock();
            (st.pending.iter().cloned().collect(), st.last_enqueued)
        };
        o.push(ev(5001)).1.unwrap();
        o.compact_from(snap, last).unwrap();
        o.push(ev(5002)).1.unwrap();
        assert!(!o.needs_compaction());
        drop(o);
        let (o, r) = Outbox::open(cfg(dir.path(), 1_000_000)).unwrap();
        assert_eq!(r.bad_lines, 0);
        assert_eq!(ids(&o), (4991..=5002).collect::<Vec<_>>());
    }
}
