//! Chat history: one append-only JSONL file per chat
//! (`~/.replicas/engine/history/<chatId>.jsonl`), one [`HistoryItem`] a
//! line. Reading a page never touches another chat's data or the event
//! journal: the first access to a chat scans its file once to build an
//! index of line offsets, after which a page is one positioned read of
//! exactly the lines it returns.
//!
//! A torn last line (power loss mid-append) is cut off with a warning when
//! the index is built, so the next append starts on a clean line.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::model::{HistoryItem, ItemKind};

/// One page of history, oldest first.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<HistoryItem>,
    pub total: usize,
    pub has_more: bool,
}

pub struct HistoryStore {
    dir: PathBuf,
    open: Mutex<HashMap<String, Arc<Mutex<ChatHistory>>>>,
}

struct ChatHistory {
    path: PathBuf,
    /// Append handle, opened on the first write.
    file: Option<File>,
    /// `(offset, length)` of the current version of each item, in order.
    lines: Vec<(u64, u32)>,
    /// Length of the valid content (end of the last complete line).
    len: u64,
    /// Positions of the running turn's items by id: a provider may re-send
    /// an item as it progresses (a command that started, then finished);
    /// the new line replaces the old one in place.
    turn_ids: HashMap<String, usize>,
    /// Deferred lines not yet written; they start at file offset
    /// `len - pending.len()`.
    pending: Vec<u8>,
}

/// Deferred history bytes per chat before a write is forced.
pub const MAX_PENDING: usize = 64 * 1024;

impl HistoryStore {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, chat_id: &str) -> PathBuf {
        self.dir.join(format!("{chat_id}.jsonl"))
    }

    fn chat(&self, chat_id: &str) -> std::io::Result<Arc<Mutex<ChatHistory>>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = open.get(chat_id) {
            return Ok(h.clone());
        }
        let h = Arc::new(Mutex::new(ChatHistory::load(self.path(chat_id))?));
        open.insert(chat_id.to_owned(), h.clone());
        Ok(h)
    }

    /// Append one item, or replace the running turn's item with the same
    /// id (a user message starts a new turn). Not fsynced per line: the page
    /// cache survives an engine crash, and a torn tail from a power loss is
    /// repaired on load.
    pub fn append(&self, chat_id: &str, item: &HistoryItem) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(item).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.append_line(
            chat_id,
            &item.id,
            item.kind == ItemKind::UserMessage,
            &line,
            false,
        )
    }

    /// [`append`](Self::append) for an item its caller already serialized:
    /// `line` is the item's JSON plus `\n`; `starts_turn` for a user message.
    ///
    /// With `defer` the line may wait in memory (up to [`MAX_PENDING`]
    /// bytes) for the next [`flush`](Self::flush) or non-deferred append,
    /// so a burst of provider lines costs one write instead of one each.
    /// Readers of this store always see deferred lines.
    pub fn append_line(
        &self,
        chat_id: &str,
        item_id: &str,
        starts_turn: bool,
        line: &[u8],
        defer: bool,
    ) -> std::io::Result<()> {
        let h = self.chat(chat_id)?;
        let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
        h.append(item_id, starts_turn, line, defer)
    }

    /// Write a chat's deferred lines, if any.
    pub fn flush(&self, chat_id: &str) -> std::io::Result<()> {
        let h = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(chat_id)
            .cloned();
        match h {
            Some(h) => h.lock().unwrap_or_else(|e| e.into_inner()).flush(),
            None => Ok(()),
        }
    }

    /// The newest `limit` items after skipping `offset` from the end,
    /// oldest first. `raw` keeps the provider's original line.
    pub fn page(
        &self,
        chat_id: &str,
        limit: usize,
        offset: usize,
        raw: bool,
    ) -> std::io::Result<Page> {
        let h = self.chat(chat_id)?;
        let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
        h.flush()?;
        h.page(limit, offset, raw)
    }

    /// Number of items stored for a chat.
    pub fn count(&self, chat_id: &str) -> std::io::Result<usize> {
        let h = self.chat(chat_id)?;
        let n = h.lock().unwrap_or_else(|e| e.into_inner()).lines.len();
        Ok(n)
    }

    /// Forget a chat and delete its file.
    pub fn remove(&self, chat_id: &str) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(chat_id);
        match std::fs::remove_file(self.path(chat_id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(chat.id = chat_id, error = %e, "could not remove the history file")
            }
        }
    }
}

impl Drop for ChatHistory {
    /// Deferred lines are written when the engine lets go of a chat's
    /// history (shutdown), not lost.
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!(path = %self.path.display(), error = %e, "could not write the last chat history lines");
        }
    }
}

#[derive(serde::Deserialize)]
struct IdOnly {
    id: String,
}

impl ChatHistory {
    /// Scan the file once: index every complete line (a later line with the
    /// same id replaces the earlier one in place), cut a torn tail.
    fn load(path: PathBuf) -> std::io::Result<Self> {
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut lines: Vec<(u64, u32)> = Vec::new();
        let mut by_id: HashMap<String, usize> = HashMap::new();
        let mut start = 0usize;
        let mut len = 0u64;
        let mut bad = 0usize;
        let ends: Vec<usize> = memchr::memchr_iter(b'\n', &bytes).collect();
        for (n, &end) in ends.iter().enumerate() {
            let line = &bytes[start..end];
            let entry = (start as u64, (end - start) as u32);
            let line_start = start;
            start = end + 1;
            if line.is_empty() {
                len = start as u64;
                continue;
            }
            match serde_json::from_slice::<IdOnly>(line) {
                Ok(IdOnly { id }) => {
                    match by_id.get(&id) {
                        Some(&pos) => lines[pos] = entry,
                        None => {
                            by_id.insert(id, lines.len());
                            lines.push(entry);
                        }
                    }
                    len = start as u64;
                }
                // A bad last line is a torn write that happened to end in a
                // newline: cut it with the rest of the tail.
                Err(_) if n + 1 == ends.len() => {
                    len = line_start as u64;
                }
                Err(_) => {
                    bad += 1;
                    len = start as u64;
                }
            }
        }
        if bad > 0 {
            tracing::warn!(path = %path.display(), lines = bad, "skipping unreadable chat history lines");
        }
        if len < bytes.len() as u64 {
            tracing::warn!(
                path = %path.display(),
                bytes = bytes.len() as u64 - len,
                "chat history had a torn last line (power loss?); cut it off"
            );
            let f = OpenOptions::new().write(true).open(&path)?;
            f.set_len(len)?;
        }
        Ok(Self {
            path,
            file: None,
            lines,
            len,
            turn_ids: HashMap::new(),
            pending: Vec::new(),
        })
    }

    fn append(
        &mut self,
        id: &str,
        starts_turn: bool,
        line: &[u8],
        defer: bool,
    ) -> std::io::Result<()> {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                crate::util::create_private_dir(dir)?;
            }
            self.file = Some(crate::util::open_private_append(&self.path)?);
        }
        self.pending.extend_from_slice(line);
        if starts_turn {
            self.turn_ids.clear();
        }
        // Without the newline.
        let entry = (self.len, (line.len() - 1) as u32);
        self.len += line.len() as u64;
        match self.turn_ids.get(id) {
            Some(&pos) => self.lines[pos] = entry,
            None => {
                self.turn_ids.insert(id.to_owned(), self.lines.len());
                self.lines.push(entry);
            }
        }
        if !defer || self.pending.len() >= MAX_PENDING {
            self.flush()?;
        }
        Ok(())
    }

    /// Write the deferred lines in one `write`.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let Some(f) = self.file.as_mut() else {
            self.pending.clear();
            return Err(std::io::Error::other("history file not open"));
        };
        let res = f.write_all(&self.pending);
        self.pending.clear();
        if let Err(e) = res {
            // A partial write would leave a torn line, and the index counts
            // lines that are not in the file: drop the handle and re-derive
            // the index from the file (which cuts the torn tail).
            self.file = None;
            if let Ok(reloaded) = Self::load(self.path.clone()) {
                *self = reloaded;
            }
            return Err(e);
        }
        Ok(())
    }

    fn page(&self, limit: usize, offset: usize, raw: bool) -> std::io::Result<Page> {
        let total = self.lines.len();
        let end = total.saturating_sub(offset);
        let start = end.saturating_sub(limit);
        let mut items = Vec::with_capacity(end - start);
        if end > start {
            let file = File::open(&self.path)?;
            let mut buf = Vec::new();
            for &(at, len) in &self.lines[start..end] {
                buf.resize(len as usize, 0);
                file.read_exact_at(&mut buf, at)?;
                match serde_json::from_slice::<HistoryItem>(&buf) {
                    Ok(mut item) => {
                        if !raw {
                            item.raw = None;
                        }
                        items.push(item);
                    }
                    Err(e) => {
                        tracing::warn!(path = %self.path.display(), error = %e, "skipping an unreadable history line")
                    }
                }
            }
        }
        Ok(Page {
            items,
            total,
            has_more: start > 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn item(n: usize) -> HistoryItem {
        HistoryItem {
            id: format!("i_{n}"),
            turn_id: "t_1".into(),
            ts: "t".into(),
            kind: ItemKind::AssistantMessage,
            text: format!("item {n}"),
            tool: None,
            raw: crate::events::RawJson::from_serialize(&serde_json::json!({"n": n})).ok(),
        }
    }

    fn ids(p: &Page) -> Vec<String> {
        p.items.iter().map(|i| i.id.clone()).collect()
    }

    #[test]
    fn pages_from_the_end_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = HistoryStore::new(dir.path().to_path_buf());
        for n in 0..10 {
            store.append("c_1", &item(n)).unwrap();
        }
        let p = store.page("c_1", 3, 0, false).unwrap();
        assert_eq!(ids(&p), ["i_7", "i_8", "i_9"]);
        assert_eq!((p.total, p.has_more), (10, true));
        assert!(p.items[0].raw.is_none());
        let p = store.page("c_1", 3, 8, true).unwrap();
        assert_eq!(ids(&p), ["i_0", "i_1"]);
        assert!(!p.has_more);
        assert!(p.items[0].raw.is_some());
        let p = store.page("c_1", 3, 50, false).unwrap();
        assert!(p.items.is_empty() && !p.has_more);
        assert_eq!(store.page("c_other", 5, 0, false).unwrap().total, 0);
    }

    #[test]
    fn torn_tail_is_cut_and_appends_continue_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let store = HistoryStore::new(dir.path().to_path_buf());
        store.append("c_1", &item(0)).unwrap();
        store.append("c_1", &item(1)).unwrap();
        drop(store);
        let path = dir.path().join("c_1.jsonl");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"id":"i_2","turnId":"t_1","#).unwrap();
        drop(f);

        let store = HistoryStore::new(dir.path().to_path_buf());
        assert_eq!(store.count("c_1").unwrap(), 2);
        store.append("c_1", &item(3)).unwrap();
        let p = store.page("c_1", 10, 0, false).unwrap();
        assert_eq!(ids(&p), ["i_0", "i_1", "i_3"]);
        // The file itself is clean again.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
    }

    #[test]
    fn an_updated_item_replaces_its_line_in_place_and_after_reload() {
        let dir = tempfile::tempdir().unwrap();
        let store = HistoryStore::new(dir.path().to_path_buf());
        let mut user = item(0);
        user.kind = ItemKind::UserMessage;
        store.append("c_1", &user).unwrap();
        store.append("c_1", &item(1)).unwrap();
        store.append("c_1", &item(2)).unwrap();
        let mut done = item(1);
        done.text = "finished".into();
        store.append("c_1", &done).unwrap();
        let check = |store: &HistoryStore| {
            let p = store.page("c_1", 10, 0, false).unwrap();
            assert_eq!(ids(&p), ["i_0", "i_1", "i_2"]);
            assert_eq!(p.items[1].text, "finished");
        };
        check(&store);
        drop(store);
        check(&HistoryStore::new(dir.path().to_path_buf()));
    }

    fn deferred(store: &HistoryStore, n: usize) {
        let mut line = serde_json::to_vec(&item(n)).unwrap();
        line.push(b'\n');
        store
            .append_line("c_1", &format!("i_{n}"), false, &line, true)
            .unwrap();
    }

    #[test]
    fn deferred_lines_are_readable_at_once_and_written_on_flush_or_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c_1.jsonl");
        let store = HistoryStore::new(dir.path().to_path_buf());
        store.append("c_1", &item(0)).unwrap();
        deferred(&store, 1);
        deferred(&store, 2);
        // Not on disk yet.
        let on_disk = std::fs::read_to_string(&path).unwrap();
        assert_eq!(on_disk.lines().count(), 1);
        // An explicit flush writes them in one go.
        store.flush("c_1").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
        // A page read sees deferred lines (it flushes first).
        deferred(&store, 3);
        let p = store.page("c_1", 10, 0, false).unwrap();
        assert_eq!(ids(&p), ["i_0", "i_1", "i_2", "i_3"]);
        // A non-deferred append writes what waited before it, in order.
        deferred(&store, 4);
        store.append("c_1", &item(5)).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 6);
        // Dropping the store (shutdown) writes the rest.
        deferred(&store, 6);
        drop(store);
        let store = HistoryStore::new(dir.path().to_path_buf());
        let p = store.page("c_1", 10, 0, false).unwrap();
        assert_eq!(p.total, 7);
        assert_eq!(ids(&p).last().map(String::as_str), Some("i_6"));
    }

    #[test]
    fn remove_deletes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = HistoryStore::new(dir.path().to_path_buf());
        store.append("c_1", &item(0)).unwrap();
        store.remove("c_1");
        assert!(!dir.path().join("c_1.jsonl").exists());
        assert_eq!(store.count("c_1").unwrap(), 0);
    }
}
