//! The event journal: `events.jsonl`, one [`EngineEvent`](super::EngineEvent)
//! per line, plus at most one older segment `events.1.jsonl` kept after
//! rotation. Together they hold the newest events within the configured byte
//! budget; anything older is gone and a client asking for it gets
//! `stream.reset`.
//!
//! Invariants:
//! - ids are strictly increasing across segments; the in-memory index maps
//!   every retained id to its byte offset, so a replay seeks straight to the
//!   first wanted line instead of scanning the file;
//! - a line is appended with one `write` of `line + "\n"`, so after a
//!   `kill -9` the file holds every published event; only a power cut can
//!   leave a torn last line, which [`Journal::open`] cuts off with a warning
//!   (the last line is fully parsed at load: a torn line may well end in
//!   `}`); a failed append is cut back off, so a later line never follows a
//!   fragment;
//! - readers hold an `Arc<File>` of the segment they read, so a rotation
//!   (rename + new file) never pulls a file from under a running replay.
//!
//! The journal is owned by the bus and only touched under its lock.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::EventHeader;

struct Segment {
    path: PathBuf,
    file: Arc<File>,
    /// `(id, byte offset of its line)`, ascending.
    index: Vec<(u64, u64)>,
    len: u64,
}

impl Segment {
    fn first_id(&self) -> Option<u64> {
        self.index.first().map(|(id, _)| *id)
    }
    fn last_id(&self) -> Option<u64> {
        self.index.last().map(|(id, _)| *id)
    }
    /// Byte offset of the first line with id > `after`, if any.
    fn offset_after(&self, after: u64) -> Option<u64> {
        let i = self.index.partition_point(|(id, _)| *id <= after);
        self.index.get(i).map(|(_, off)| *off)
    }
}

/// What a replay must read: byte ranges of segments, oldest first.
pub struct ReplayPlan {
    pub chunks: Vec<(Arc<File>, u64, u64)>,
    /// Oldest id still retained (None when the journal is empty).
    pub oldest_available: Option<u64>,
}

/// A problem found while loading the journal; reported, never fatal.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadWarning {
    TornTail { path: PathBuf, bytes: u64 },
    BadLine { path: PathBuf, offset: u64 },
    OutOfOrder { path: PathBuf, offset: u64, id: u64 },
}

pub struct Journal {
    current: Segment,
    old: Option<Segment>,
    /// Rotate when the current segment passes this many bytes; two segments
    /// are kept, so the journal stays within about twice this.
    segment_max: u64,
}

impl Journal {
    /// Open (or create) the journal in `events_file`'s directory with a total
    /// budget of `max_bytes`.
    pub fn open(events_file: &Path, max_bytes: u64) -> io::Result<(Self, Vec<LoadWarning>)> {
        let dir = events_file.parent().unwrap_or(Path::new("."));
        crate::util::create_private_dir(dir)?;
        let mut warnings = Vec::new();
        let old_path = rotated_path(events_file);
        let old = if old_path.exists() {
            Some(load_segment(&old_path, false, &mut warnings)?)
        } else {
            None
        };
        let mut current = load_segment(events_file, true, &mut warnings)?;
        // Drop lines of the current segment that do not continue the old one
        // (cannot happen unless someone edited the files, but ids must stay
        // strictly increasing for the index to be right).
        if let (Some(old_last), Some(first)) =
            (old.as_ref().and_then(Segment::last_id), current.first_id())
        {
            if first <= old_last {
                let keep = current.index.partition_point(|(id, _)| *id <= old_last);
                for (id, offset) in current.index.drain(..keep) {
                    warnings.push(LoadWarning::OutOfOrder {
                        path: current.path.clone(),
                        offset,
                        id,
                    });
                }
            }
        }
        Ok((
            Self {
                current,
                old,
                segment_max: (max_bytes / 2).max(4096),
            },
            warnings,
        ))
    }

    /// Highest id in the journal, 0 when empty.
    pub fn last_id(&self) -> u64 {
        self.current
            .last_id()
            .or_else(|| self.old.as_ref().and_then(Segment::last_id))
            .unwrap_or(0)
    }

    pub fn oldest_id(&self) -> Option<u64> {
        self.old
            .as_ref()
            .and_then(Segment::first_id)
            .or_else(|| self.current.first_id())
    }

    pub fn len(&self) -> usize {
        self.current.index.len() + self.old.as_ref().map_or(0, |s| s.index.len())
    }

    /// Bytes in both segments.
    pub fn bytes(&self) -> u64 {
        self.current.len + self.old.as_ref().map_or(0, |s| s.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append one serialized event (without the trailing newline).
    pub fn append(&mut self, id: u64, json: &str) -> io::Result<()> {
        let mut buf = Vec::with_capacity(json.len() + 1);
        buf.extend_from_slice(json.as_bytes());
        buf.push(b'\n');
        self.append_line(id, &buf)
    }

    /// Append one serialized event that already ends with its `\n`.
    pub fn append_line(&mut self, id: u64, line: &[u8]) -> io::Result<()> {
        debug_assert_eq!(line.last(), Some(&b'\n'));
        if self.current.len >= self.segment_max {
            self.rotate()?;
        }
        if let Err(e) = (&*self.current.file).write_all(line) {
            // Part of the line may be on disk (disk full): cut it back off so
            // the next line starts where this one did.
            let cut = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.current.path)
                .and_then(|f| f.set_len(self.current.len));
            if let Err(cut) = cut {
                tracing::error!(error = %cut, "could not cut a failed event journal append back off");
            }
            return Err(e);
        }
        self.current.index.push((id, self.current.len));
        self.current.len += line.len() as u64;
        Ok(())
    }

    /// fsync the current segment.
    pub fn sync(&self) -> io::Result<()> {
        self.current.file.sync_data()
    }

    /// The current segment becomes the old one (replacing it); a fresh empty
    /// segment takes its place.
    fn rotate(&mut self) -> io::Result<()> {
        let old_path = rotated_path(&self.current.path);
        std::fs::rename(&self.current.path, &old_path)?;
        let file = open_append(&self.current.path)?;
        let fresh = Segment {
            path: self.current.path.clone(),
            file: Arc::new(file),
            index: Vec::new(),
            len: 0,
        };
        let mut previous = std::mem::replace(&mut self.current, fresh);
        previous.path = old_path;
        self.old = Some(previous);
        if let Some(dir) = self.current.path.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        tracing::info!(oldest_id = ?self.oldest_id(), "event journal rotated");
        Ok(())
    }

    /// The byte ranges holding every retained event with id > `after`.
    pub fn plan_after(&self, after: u64) -> ReplayPlan {
        let mut chunks = Vec::new();
        for seg in self.old.iter().chain(std::iter::once(&self.current)) {
            if let Some(start) = seg.offset_after(after) {
                if start < seg.len {
                    chunks.push((seg.file.clone(), start, seg.len));
                }
            }
        }
        ReplayPlan {
            chunks,
            oldest_available: self.oldest_id(),
        }
    }
}

/// `events.jsonl` → `events.1.jsonl`.
pub fn rotated_path(events_file: &Path) -> PathBuf {
    let stem = events_file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("events");
    events_file.with_file_name(format!("{stem}.1.jsonl"))
}

fn open_append(path: &Path) -> io::Result<File> {
    crate::util::open_private_append(path)
}

/// Parse the id of one journal line. Lines written by the engine start with
/// `{"id":"<digits>"`, which is read directly; anything else gets a full
/// parse of the envelope header.
pub fn line_id(line: &[u8]) -> Option<u64> {
    const PREFIX: &[u8] = br#"{"id":""#;
    if let Some(rest) = line.strip_prefix(PREFIX) {
        // Ids are short: a plain loop beats memchr's set-up here.
        let end = rest.iter().position(|&b| b == b'"')?;
        if let Some(id) = parse_id(&rest[..end]) {
            // Cheap sanity check that the line is a complete object; a full
            // parse happens when the line is replayed.
            if line.last() == Some(&b'}') {
                return Some(id);
            }
        }
        return None;
    }
    let header: EventHeader = serde_json::from_slice(line).ok()?;
    header.id.parse().ok()
}

/// Decimal digits → id, without a UTF-8 check or `str::parse` (the
/// start-up scan reads every line's id); `None` unless 1 to 20 digits that
/// fit a `u64`.
fn parse_id(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        if d.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        } else {
            None
        }
    })
}

/// Whether `line` is one complete JSON value.
fn is_complete_json(line: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok()
}

fn load_segment(
    path: &Path,
    is_current: bool,
    warnings: &mut Vec<LoadWarning>,
) -> io::Result<Segment> {
    // Opened for reading too: the scan reads through it.
    let file = open_append(path)?;
    // Read in blocks through one reused buffer: a whole-file read of a
    // 30 MB journal cost more in fresh pages than the scan itself.
    let mut total = file.metadata()?.len();
    let mut index = Vec::new();
    let mut last: Option<u64> = None;
    let mut good_end = 0u64;
    let mut buf: Vec<u8> = Vec::with_capacity(REPLAY_BLOCK);
    // File offset of `buf[0]`, and how far the file has been read.
    let (mut buf_start, mut read_to) = (0u64, 0u64);
    'scan: loop {
        let mut consumed = 0usize;
        loop {
            let rest = &buf[consumed..];
            let at_eof = read_to >= total;
            let (line, has_nl) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], true),
                None if at_eof && !rest.is_empty() => (rest, false),
                None if at_eof => break 'scan,
                None => break,
            };
            let pos = buf_start + consumed as u64;
            let end = pos + line.len() as u64;
            let is_last = !has_nl || end + 1 == total;
            // The fast id read only checks the line's ends; the last line is
            // the one a power cut can tear, so it must parse completely.
            let id = line_id(line).filter(|_| !is_last || is_complete_json(line));
            match id {
                Some(id) if last.is_none_or(|l| id > l) => {
                    index.push((id, pos));
                    last = Some(id);
                }
                Some(id) => warnings.push(LoadWarning::OutOfOrder {
                    path: path.to_owned(),
                    offset: pos,
                    id,
                }),
                None if line.is_empty() => {}
                None if is_last && is_current => {
                    // A torn tail: cut it off so the next append starts clean.
                    warnings.push(LoadWarning::TornTail {
                        path: path.to_owned(),
                        bytes: total - pos,
                    });
                    file.set_len(pos)?;
                    good_end = pos;
                    break 'scan;
                }
                None => warnings.push(LoadWarning::BadLine {
                    path: path.to_owned(),
                    offset: pos,
                }),
            }
            if has_nl {
                consumed += line.len() + 1;
                good_end = end + 1;
            } else {
                // A complete event that lost only its newline: restore it.
                if is_current {
                    (&file).write_all(b"\n")?;
                }
                good_end = total + u64::from(is_current);
                break 'scan;
            }
        }
        buf.drain(..consumed);
        buf_start += consumed as u64;
        // A line longer than a block is read whole: the buffer grows.
        let want = REPLAY_BLOCK.min((total - read_to) as usize);
        let old_len = buf.len();
        buf.resize(old_len + want, 0);
        let n = file.read_at(&mut buf[old_len..], read_to)?;
        buf.truncate(old_len + n);
        if n == 0 {
            // Shorter than its metadata said: what was read is all there is.
            total = read_to;
        }
        read_to += n as u64;
    }
    Ok(Segment {
        path: path.to_owned(),
        file: Arc::new(file),
        index,
        len: good_end,
    })
}

/// Block size of a client replay: small enough that a stalled client pins
/// little, large enough for few syscalls.
pub const REPLAY_BLOCK: usize = 256 * 1024;

/// Read the lines of a replay plan, calling `f` with each complete line.
/// Reads in [`REPLAY_BLOCK`]s (a longer line is read whole) with positioned
/// reads, so it is independent of any appends happening meanwhile. Blocking:
/// call from a blocking context.
pub fn read_plan(plan: &ReplayPlan, mut f: impl FnMut(&[u8]) -> bool) -> io::Result<()> {
    let block = REPLAY_BLOCK;
    let mut buf: Vec<u8> = Vec::with_capacity(block);
    for (file, start, end) in &plan.chunks {
        let mut off = *start;
        buf.clear();
        while off < *end {
            let want = block.min((*end - off) as usize);
            let old_len = buf.len();
            buf.resize(old_len + want, 0);
            let n = file.read_at(&mut buf[old_len..], off)?;
            buf.truncate(old_len + n);
            if n == 0 {
                break;
            }
            off += n as u64;
            let mut consumed = 0;
            while let Some(i) = memchr::memchr(b'\n', &buf[consumed..]) {
                let line = &buf[consumed..consumed + i];
                consumed += i + 1;
                if !line.is_empty() && !f(line) {
                    return Ok(());
                }
            }
            buf.drain(..consumed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn line(id: u64) -> String {
        format!(
            r#"{{"id":"{id}","ts":"t","type":"error","payload":{{"code":"c","message":"m","source":"s"}}}}"#
        )
    }

    fn ids(j: &Journal, after: u64) -> Vec<u64> {
        let mut out = Vec::new();
        read_plan(&j.plan_after(after), |l| {
            out.extend(line_id(l));
            true
        })
        .unwrap();
        out
    }

    #[test]
    fn ids_parse_like_str_parse() {
        for text in [
            "0",
            "7",
            "120001",
            "18446744073709551615",
            "18446744073709551616",
            "",
            "-1",
            "1a",
            " 1",
            "00012",
        ] {
            assert_eq!(parse_id(text.as_bytes()), text.parse().ok(), "{text:?}");
        }
        // The engine never writes a sign.
        assert_eq!(parse_id(b"+1"), None);
    }

    #[test]
    fn append_reopen_and_replay_from_any_id() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let (mut j, w) = Journal::open(&p, 1 << 20).unwrap();
        assert!(w.is_empty());
        for id in 1..=50 {
            j.append(id, &line(id)).unwrap();
        }
        drop(j);
        let (j, w) = Journal::open(&p, 1 << 20).unwrap();
        assert!(w.is_empty());
        assert_eq!(j.last_id(), 50);
        assert_eq!(ids(&j, 0), (1..=50).collect::<Vec<_>>());
        assert_eq!(ids(&j, 47), vec![48, 49, 50]);
        assert!(ids(&j, 50).is_empty());
    }

    #[test]
    fn torn_tail_is_cut_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let (mut j, _) = Journal::open(&p, 1 << 20).unwrap();
        j.append(1, &line(1)).unwrap();
        j.append(2, &line(2)).unwrap();
        drop(j);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(br#"{"id":"3","ts":"t","ty"#).unwrap();
        drop(f);
        let (mut j, w) = Journal::open(&p, 1 << 20).unwrap();
        assert!(
            matches!(w.as_slice(), [LoadWarning::TornTail { .. }]),
            "{w:?}"
        );
        assert_eq!(j.last_id(), 2);
        j.append(3, &line(3)).unwrap();
        drop(j);
        let (j, w) = Journal::open(&p, 1 << 20).unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(ids(&j, 0), vec![1, 2, 3]);
    }

    /// A power cut can tear the last line anywhere, also right after a `}`
    /// inside it: the fast id check would accept it, the full parse does not.
    #[test]
    fn a_torn_last_line_ending_in_a_brace_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let torn = r#"{"id":"3","ts":"t","type":"error","payload":{"code":"c"}"#;
        assert!(torn.ends_with('}'));
        for tail in [format!("{torn}\n"), torn.to_owned()] {
            std::fs::write(&p, format!("{}\n{}\n{tail}", line(1), line(2))).unwrap();
            let (mut j, w) = Journal::open(&p, 1 << 20).unwrap();
            assert!(
                matches!(w.as_slice(), [LoadWarning::TornTail { .. }]),
                "{w:?}"
            );
            assert_eq!(j.last_id(), 2);
            j.append(3, &line(3)).unwrap();
            assert_eq!(ids(&j, 0), vec![1, 2, 3]);
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(text
                .lines()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
        }
    }

    /// A failed append (here: the segment's file is read-only) leaves
    /// nothing behind and does not enter the index.
    #[test]
    fn a_failed_append_is_cut_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let (mut j, _) = Journal::open(&p, 1 << 20).unwrap();
        j.append(1, &line(1)).unwrap();
        let good = std::fs::metadata(&p).unwrap().len();
        // Simulate a partial write: bytes appended behind the journal's back,
        // then an append that fails.
        let writable = j.current.file.clone();
        (&*writable).write_all(br#"{"id":"2","ts""#).unwrap();
        j.current.file = Arc::new(File::open(&p).unwrap());
        assert!(j.append(2, &line(2)).is_err());
        j.current.file = writable;
        assert_eq!(std::fs::metadata(&p).unwrap().len(), good);
        assert_eq!(j.last_id(), 1);
        j.append(2, &line(2)).unwrap();
        drop(j);
        let (j, w) = Journal::open(&p, 1 << 20).unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(ids(&j, 0), vec![1, 2]);
    }

    /// The loader reads in blocks: lines across block edges and a line
    /// longer than a block load like any other.
    #[test]
    fn lines_across_and_longer_than_a_read_block_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let long = format!(
            r#"{{"id":"2","ts":"t","type":"error","payload":{{"code":"c","message":"{}","source":"s"}}}}"#,
            "x".repeat(REPLAY_BLOCK * 2 + 17)
        );
        let mut text = format!("{}\n{long}\n", line(1));
        for id in 3..=20_000 {
            text.push_str(&line(id));
            text.push('\n');
        }
        std::fs::write(&p, &text).unwrap();
        let (j, w) = Journal::open(&p, 1 << 40).unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(ids(&j, 0), (1..=20_000).collect::<Vec<_>>());
        assert_eq!(j.bytes(), text.len() as u64);
    }

    #[test]
    fn garbage_in_the_middle_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        std::fs::write(&p, format!("{}\nnot json at all\n{}\n", line(1), line(2))).unwrap();
        let (j, w) = Journal::open(&p, 1 << 20).unwrap();
        assert!(
            matches!(w.as_slice(), [LoadWarning::BadLine { .. }]),
            "{w:?}"
        );
        assert_eq!(ids(&j, 0), vec![1, 2]);
    }

    #[test]
    fn missing_final_newline_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        std::fs::write(&p, format!("{}\n{}", line(1), line(2))).unwrap();
        let (mut j, w) = Journal::open(&p, 1 << 20).unwrap();
        assert!(w.is_empty());
        j.append(3, &line(3)).unwrap();
        assert_eq!(ids(&j, 0), vec![1, 2, 3]);
    }

    #[test]
    fn rotation_keeps_newest_within_budget() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let budget = 16 * 1024;
        let (mut j, _) = Journal::open(&p, budget).unwrap();
        for id in 1..=2000 {
            j.append(id, &line(id)).unwrap();
        }
        let total = std::fs::metadata(&p).unwrap().len()
            + std::fs::metadata(rotated_path(&p)).unwrap().len();
        assert!(total <= budget + 200, "{total}");
        let oldest = j.oldest_id().unwrap();
        assert!(oldest > 1);
        let got = ids(&j, 0);
        assert_eq!(got, (oldest..=2000).collect::<Vec<_>>());
        drop(j);
        let (j, w) = Journal::open(&p, budget).unwrap();
        assert!(w.is_empty());
        assert_eq!(j.oldest_id(), Some(oldest));
        assert_eq!(j.last_id(), 2000);
    }

    /// One line of a generated journal file.
    #[derive(Debug, Clone)]
    enum Piece {
        Valid,
        /// Arbitrary bytes without a newline (torn lines, garbage).
        Garbage(Vec<u8>),
        /// A valid line cut short somewhere (a torn write). Only ever the
        /// last line: a failed append is cut back at once and the tail is
        /// checked at load, so a torn line cannot end up in the middle
        /// (where the loader only checks a line's id prefix and closing
        /// brace, to keep boot fast on a large journal).
        Torn(usize),
    }

    fn pieces() -> impl proptest::strategy::Strategy<Value = (Vec<Piece>, bool)> {
        use proptest::prelude::*;
        let piece = prop_oneof![
            4 => Just(Piece::Valid),
            1 => prop::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..80)
                .prop_map(Piece::Garbage),
            1 => (0usize..120).prop_map(Piece::Torn),
        ];
        (prop::collection::vec(piece, 0..24), any::<bool>()).prop_map(|(mut pieces, nl)| {
            // Torn lines only at the end (see `Piece::Torn`).
            let last = pieces.pop();
            pieces.retain(|p| !matches!(p, Piece::Torn(_)));
            pieces.extend(last);
            (pieces, nl)
        })
    }

    /// Arbitrary lines and bytes into the loader: it never panics or fails,
    /// loads exactly the valid lines (ids strictly increasing), cuts a bad
    /// tail, and appends after it cleanly.
    #[test]
    fn loader_takes_what_is_valid_from_anything() {
        use proptest::test_runner::{Config, TestRunner};
        let mut runner = TestRunner::new(Config {
            cases: 256,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&pieces(), |(pieces, final_newline)| {
                let dir = tempfile::tempdir().unwrap();
                let p = dir.path().join("events.jsonl");
                let mut data = Vec::new();
                let mut expected = Vec::new();
                let mut next = 1u64;
                for (i, piece) in pieces.iter().enumerate() {
                    match piece {
                        Piece::Valid => {
                            data.extend_from_slice(line(next).as_bytes());
                            expected.push(next);
                            next += 1;
                        }
                        Piece::Garbage(bytes) => data.extend_from_slice(bytes),
                        Piece::Torn(at) => {
                            let l = line(next);
                            data.extend_from_slice(&l.as_bytes()[..(*at).min(l.len() - 1)]);
                            next += 1;
                        }
                    }
                    if i + 1 < pieces.len() || final_newline {
                        data.push(b'\n');
                    }
                }
                std::fs::write(&p, &data).unwrap();
                let (mut j, _warnings) = Journal::open(&p, 1 << 30).unwrap();
                proptest::prop_assert_eq!(ids(&j, 0), expected.clone());
                // Every line a replay would deliver is a complete JSON value
                // (garbage lines in the middle stay in the file and are
                // skipped by the replay).
                let mut all_json = true;
                read_plan(&j.plan_after(0), |l| {
                    if line_id(l).is_some() {
                        all_json &= serde_json::from_slice::<serde_json::Value>(l).is_ok();
                    }
                    true
                })
                .unwrap();
                proptest::prop_assert!(all_json);
                // Appending continues cleanly, and a reload agrees.
                j.append(next, &line(next)).unwrap();
                drop(j);
                let (j, _) = Journal::open(&p, 1 << 30).unwrap();
                let mut want = expected;
                want.push(next);
                proptest::prop_assert_eq!(ids(&j, 0), want);
                Ok(())
            })
            .unwrap();
    }

    /// Arbitrary bytes, as the current segment and as the rotated one.
    #[test]
    fn loader_never_panics_on_arbitrary_bytes() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let mut runner = TestRunner::new(Config {
            cases: 256,
            failure_persistence: None,
            ..Config::default()
        });
        let bytes = prop::collection::vec(any::<u8>(), 0..512);
        runner
            .run(&(bytes.clone(), bytes), |(current, old)| {
                let dir = tempfile::tempdir().unwrap();
                let p = dir.path().join("events.jsonl");
                std::fs::write(&p, &current).unwrap();
                std::fs::write(rotated_path(&p), &old).unwrap();
                let (mut j, _) = Journal::open(&p, 1 << 30).unwrap();
                let got = ids(&j, 0);
                prop_assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
                let next = j.last_id() + 1;
                j.append(next, &line(next)).unwrap();
                prop_assert_eq!(ids(&j, 0).last().copied(), Some(next));
                Ok(())
            })
            .unwrap();
    }
}
