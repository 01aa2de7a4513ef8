//! Persistence of the registry and the attachments side folder.
//!
//! The registry lives in `chats.db`, SQLite in WAL mode: one row per chat
//! (`chats`, a column per field: start-up reads 10,000 chats without a JSON
//! parse each; only `lastTurn` and Codex's thread usage are JSON), one per
//! queued message (`queue`), one per running turn (`turns`). A change to one chat writes only the rows that changed, in one
//! transaction, so a write costs the same at 10 chats as at 10,000.
//!
//! One dedicated thread owns the connection ([`ChatDb`]): callers hand it the
//! records of the chats that changed and wait for the commit, so no SQLite
//! call ever runs on an async worker. Jobs that arrive while a commit runs
//! share the next transaction (group commit).
//!
//! Durability: `synchronous=FULL` (the WAL is fsynced at every commit). A
//! `kill -9` alone is survived by `NORMAL` too (the WAL write is in the page
//! cache), FULL also survives the VM losing power. Measured on the dev VM
//! (WAL, one 400-byte row per commit, 500 commits, machine shared with
//! builds): FULL p50 1.44 ms / p99 12.6 ms, NORMAL p50 0.05 ms / p99 0.49 ms
//! per commit. End to end a `POST /chats` stayed at a median of 0.84 ms
//! (`replicas-bench http`), and concurrent callers share one commit, so
//! FULL's cost is affordable and an acknowledged message is on disk, not
//! only in the page cache. An acknowledged message was
//! committed before the answer left.
//!
//! `chats.json` (the previous format, rewritten whole on every change) is
//! imported at the first start and renamed `chats.json.migrated`.
//!
//! Attachments: image blocks of accepted messages, one file per message,
//! written before the message is acknowledged and removed once its turn
//! ended.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::providers::Image;

use super::model::ChatRecord;

const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct ChatsFile {
    version: u32,
    chats: Vec<ChatRecord>,
}

/// What loading `chats.json` found.
#[derive(Debug)]
pub enum Loaded {
    /// No file yet: a fresh engine.
    Missing,
    Chats(Vec<ChatRecord>),
    /// Unreadable or unparsable; the file was moved to `moved_to` so the
    /// engine can start empty without destroying evidence.
    Corrupt {
        error: String,
        moved_to: Option<PathBuf>,
    },
}

pub fn load(path: &Path) -> Loaded {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
        Err(e) => return set_aside(path, format!("cannot read: {e}")),
    };
    match serde_json::from_slice::<ChatsFile>(&bytes) {
        Ok(f) if f.version == FORMAT_VERSION => Loaded::Chats(f.chats),
        Ok(f) => set_aside(path, format!("unknown format version {}", f.version)),
        Err(e) => set_aside(path, e.to_string()),
    }
}

fn set_aside(path: &Path, error: String) -> Loaded {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{stamp}"));
    let aside = PathBuf::from(aside);
    let moved_to = match std::fs::rename(path, &aside) {
        Ok(()) => Some(aside),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "could not move the corrupt chats file aside");
            None
        }
    };
    Loaded::Corrupt { error, moved_to }
}

// ----- chats.db ---------------------------------------------------------------

/// The engine cannot use its chat database: it stops (exit code 2) rather
/// than start empty and let the next write bury what the file held.
#[derive(Debug, thiserror::Error)]
#[error("cannot use the chat database {}: {reason}", path.display())]
pub struct DbError {
    pub path: PathBuf,
    pub reason: String,
}

/// One chat's change, as handed to the writer.
#[derive(Debug)]
pub enum Change {
    /// The chat as it is now (inserted or updated).
    Put(Box<ChatRecord>),
    Delete(String),
}

impl Change {
    pub fn chat_id(&self) -> &str {
        match self {
            Change::Put(rec) => &rec.id,
            Change::Delete(id) => id,
        }
    }
}

/// What opening the database found besides the chats.
#[derive(Debug, Default)]
pub struct Opened {
    pub chats: Vec<ChatRecord>,
    /// How many chats were imported from `chats.json` at this start.
    pub migrated: Option<usize>,
    /// `chats.json` existed but could not be read: it was set aside (the
    /// database, possibly empty, is used as is).
    pub legacy_corrupt: Option<(String, Option<PathBuf>)>,
}

type Reply = Box<dyn FnOnce(std::io::Result<()>) + Send>;

struct Job {
    changes: Vec<Change>,
    reply: Reply,
}

/// Handle to the writer thread that owns the connection. Cloning is cheap;
/// the thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct ChatDb {
    tx: std::sync::mpsc::Sender<Job>,
}

/// 1: `chats` held each record as JSON; 2: a column per field (the JSON
/// rows are converted when an engine of version 2 opens the file).
const SCHEMA_VERSION: i64 = 2;
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS chats (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    title TEXT NOT NULL,
    model TEXT,
    cwd BLOB NOT NULL,
    provider_session_id TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    cost_usd REAL,
    last_turn TEXT,
    codex_thread_usage TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queue (
    message_id TEXT PRIMARY KEY,
    chat_id TEXT NOT NULL,
    ord INTEGER NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_by_chat ON queue (chat_id, ord);
CREATE TABLE IF NOT EXISTS turns (
    chat_id TEXT PRIMARY KEY,
    turn TEXT NOT NULL
) WITHOUT ROWID;
";

/// Jobs committed together at most (bounds one transaction's size).
const MAX_BATCH: usize = 256;

impl ChatDb {
    /// Open (creating, mode 0600) the database at `path`, import
    /// `legacy_json` if it exists, read every chat, and start the writer.
    pub fn open(path: &Path, legacy_json: &Path) -> Result<(Self, Opened), DbError> {
        let fail = |reason: String| DbError {
            path: path.to_path_buf(),
            reason,
        };
        let mut conn = open_conn(path).map_err(|e| fail(e.to_string()))?;
        let mut writer = Writer::default();
        let mut opened = Opened::default();
        let mut chats = writer
            .load(&conn)
            .map_err(|e| fail(format!("cannot read it: {e}")))?;
        match load(legacy_json) {
            Loaded::Missing => {}
            Loaded::Corrupt { error, moved_to } => opened.legacy_corrupt = Some((error, moved_to)),
            Loaded::Chats(legacy) => {
                let n = legacy.len();
                let changes: Vec<Change> = legacy
                    .into_iter()
                    .map(|r| Change::Put(Box::new(r)))
                    .collect();
                writer
                    .commit(&mut conn, &changes)
                    .map_err(|e| fail(format!("importing {}: {e}", legacy_json.display())))?;
                let mut done = legacy_json.as_os_str().to_owned();
                done.push(".migrated");
                std::fs::rename(legacy_json, &done).map_err(|e| {
                    fail(format!(
                        "imported {} but cannot rename it: {e}",
                        legacy_json.display()
                    ))
                })?;
                chats = writer
                    .load(&conn)
                    .map_err(|e| fail(format!("cannot read it: {e}")))?;
                opened.migrated = Some(n);
            }
        }
        opened.chats = chats;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("chats-db".into())
            .spawn(move || writer.run(conn, rx))
            .map_err(|e| fail(format!("cannot start its writer thread: {e}")))?;
        Ok((Self { tx }, opened))
    }

    fn submit(&self, changes: Vec<Change>, reply: Reply) {
        if let Err(std::sync::mpsc::SendError(job)) = self.tx.send(Job { changes, reply }) {
            (job.reply)(Err(std::io::Error::other(
                "the chat database writer stopped",
            )));
        }
    }

    /// Commit `changes` (one transaction) and wait for it without blocking
    /// an async worker.
    pub async fn write(&self, changes: Vec<Change>) -> std::io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            changes,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await
            .unwrap_or_else(|_| Err(std::io::Error::other("the chat database writer stopped")))
    }

    /// [`write`](Self::write) for non-async callers (startup).
    pub fn write_blocking(&self, changes: Vec<Change>) -> std::io::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.submit(
            changes,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the chat database writer stopped")))
    }
}

fn open_conn(path: &Path) -> Result<rusqlite::Connection, String> {
    use rusqlite::OpenFlags;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    // Created 0600 before SQLite sees it; its -wal and -shm files take the
    // database file's mode.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| e.to_string())?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    let mut conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| e.to_string())?;
    // The first statement reads the header: a file that is not a database
    // fails here.
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("cannot switch to WAL mode (got {mode})"));
    }
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF;")
        .map_err(|e| e.to_string())?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if version > SCHEMA_VERSION {
        return Err(format!(
            "schema version {version} is newer than this engine's ({SCHEMA_VERSION})"
        ));
    }
    // Created once, in one transaction (one fsync): a restart writes
    // nothing here, so start-up stays in the milliseconds.
    if version == 1 {
        migrate_v1(&mut conn).map_err(|e| format!("converting it to schema 2: {e}"))?;
    } else if version < SCHEMA_VERSION {
        conn.execute_batch(&format!(
            "BEGIN; {SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
        ))
        .map_err(|e| e.to_string())?;
    }
    Ok(conn)
}

/// Schema 1 → 2 in one transaction: each chat's JSON record becomes a row
/// of columns; queue and turn rows stay as they are. A record that does not
/// parse fails the open (the engine stops; the file is untouched).
fn migrate_v1(conn: &mut rusqlite::Connection) -> Result<(), String> {
    let tx = conn.transaction().map_err(|e| e.to_string())?;
    tx.execute_batch(&format!("ALTER TABLE chats RENAME TO chats_v1; {SCHEMA}"))
        .map_err(|e| e.to_string())?;
    {
        let mut read = tx
            .prepare("SELECT id, record FROM chats_v1")
            .map_err(|e| e.to_string())?;
        let mut rows = read.query([]).map_err(|e| e.to_string())?;
        while let Some(row) = rows.next().map_err(|e| e.to_string())? {
            let text = row
                .get_ref(1)
                .and_then(|v| Ok(v.as_str()?))
                .map_err(|e| e.to_string())?;
            let rec: ChatRecord = serde_json::from_str(text).map_err(|e| {
                let id: String = row.get(0).unwrap_or_default();
                format!("the record of chat {id}: {e}")
            })?;
            put_meta(&tx, &Meta::of(&rec)).map_err(|e| e.to_string())?;
        }
    }
    tx.execute_batch(&format!(
        "DROP TABLE chats_v1; PRAGMA user_version={SCHEMA_VERSION};"
    ))
    .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())
}

/// A chat's `chats` row, borrowed from its record.
struct Meta<'a> {
    rec: &'a ChatRecord,
    last_turn: Option<String>,
    codex_thread_usage: Option<String>,
}

impl<'a> Meta<'a> {
    fn of(rec: &'a ChatRecord) -> Self {
        Self {
            rec,
            last_turn: rec.last_turn.as_ref().map(to_json),
            codex_thread_usage: rec.codex_thread_usage.as_ref().map(to_json),
        }
    }

    /// What the writer compares to skip an unchanged row.
    fn hash(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let r = self.rec;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (r.id.as_str(), r.provider.as_str(), r.title.as_str()).hash(&mut h);
        (r.model.as_deref(), r.cwd.as_os_str()).hash(&mut h);
        (r.provider_session_id.as_deref(), r.created_at.as_str()).hash(&mut h);
        r.updated_at.hash(&mut h);
        let u = &r.usage;
        (u.input_tokens, u.output_tokens, u.cached_input_tokens).hash(&mut h);
        u.cost_usd.map(f64::to_bits).hash(&mut h);
        (&self.last_turn, &self.codex_thread_usage).hash(&mut h);
        h.finish()
    }
}

/// Tokens as SQLite integers (i64; no count comes near its end).
fn tokens(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn put_meta(tx: &rusqlite::Transaction<'_>, m: &Meta<'_>) -> rusqlite::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let r = m.rec;
    tx.prepare_cached(
        "INSERT INTO chats (id, provider, title, model, cwd, provider_session_id,
             created_at, updated_at, input_tokens, output_tokens, cached_input_tokens,
             cost_usd, last_turn, codex_thread_usage)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
         ON CONFLICT (id) DO UPDATE SET provider = excluded.provider,
             title = excluded.title, model = excluded.model, cwd = excluded.cwd,
             provider_session_id = excluded.provider_session_id,
             created_at = excluded.created_at, updated_at = excluded.updated_at,
             input_tokens = excluded.input_tokens, output_tokens = excluded.output_tokens,
             cached_input_tokens = excluded.cached_input_tokens,
             cost_usd = excluded.cost_usd, last_turn = excluded.last_turn,
             codex_thread_usage = excluded.codex_thread_usage",
    )?
    .execute(rusqlite::params![
        r.id,
        r.provider.as_str(),
        r.title,
        r.model,
        r.cwd.as_os_str().as_bytes(),
        r.provider_session_id,
        r.created_at,
        r.updated_at,
        tokens(r.usage.input_tokens),
        tokens(r.usage.output_tokens),
        tokens(r.usage.cached_input_tokens),
        r.usage.cost_usd,
        m.last_turn,
        m.codex_thread_usage,
    ])?;
    Ok(())
}

/// The columns [`read_chat`] reads, in its order.
const CHAT_COLUMNS: &str = "id, provider, title, model, cwd, provider_session_id, created_at, \
    updated_at, input_tokens, output_tokens, cached_input_tokens, cost_usd, last_turn, \
    codex_thread_usage";

/// One `chats` row (selected with [`CHAT_COLUMNS`]) → its record, with an
/// empty queue and no running turn.
fn read_chat(row: &rusqlite::Row<'_>) -> rusqlite::Result<ChatRecord> {
    use rusqlite::types::FromSqlError;
    use std::os::unix::ffi::OsStrExt;
    let conv = |i: usize, e: FromSqlError| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    };
    let text = |i: usize| -> rusqlite::Result<String> {
        Ok(row.get_ref(i)?.as_str().map_err(|e| conv(i, e))?.to_owned())
    };
    let opt_text = |i: usize| -> rusqlite::Result<Option<&str>> {
        row.get_ref(i)?.as_str_or_null().map_err(|e| conv(i, e))
    };
    let count = |i: usize| -> rusqlite::Result<u64> {
        let n = row.get_ref(i)?.as_i64().map_err(|e| conv(i, e))?;
        u64::try_from(n).map_err(|_| conv(i, FromSqlError::OutOfRange(n)))
    };
    let bad = |i: usize, e: serde_json::Error| conv(i, FromSqlError::Other(Box::new(e)));
    let provider = opt_text(1)?
        .and_then(crate::providers::ProviderKind::parse)
        .ok_or_else(|| conv(1, FromSqlError::InvalidType))?;
    Ok(ChatRecord {
        id: text(0)?,
        provider,
        title: text(2)?,
        model: opt_text(3)?.map(str::to_owned),
        cwd: std::ffi::OsStr::from_bytes(row.get_ref(4)?.as_bytes().map_err(|e| conv(4, e))?)
            .into(),
        provider_session_id: opt_text(5)?.map(str::to_owned),
        created_at: text(6)?,
        updated_at: text(7)?,
        queue: Vec::new(),
        last_turn: opt_text(12)?
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| bad(12, e))?,
        usage: super::model::Usage {
            input_tokens: count(8)?,
            output_tokens: count(9)?,
            cached_input_tokens: count(10)?,
            cost_usd: row.get_ref(11)?.as_f64_or_null().map_err(|e| conv(11, e))?,
        },
        active_turn: None,
        codex_thread_usage: opt_text(13)?
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| bad(13, e))?,
    })
}

fn hash_of(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// What the database holds for one chat, as hashes: the writer compares a
/// new record against it and writes only the rows that differ. A chat
/// without one has no queue or turn rows and a `chats` row of unknown hash
/// (written at its first change): start-up reads every chat but hashes none.
#[derive(Default, Clone)]
struct Shadow {
    /// `None`: not known (the row is written).
    meta: Option<u64>,
    /// `(message id, ord, hash of the message JSON)` in queue order.
    queue: Vec<(String, i64, u64)>,
    turn: Option<u64>,
}

#[derive(Default)]
struct Writer {
    shadows: std::collections::HashMap<String, Shadow>,
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("chat records serialize")
}

impl Writer {
    /// Read every chat (and remember what is stored of their queues and
    /// turns). The chats come in id order, so queue and turn rows find
    /// theirs by binary search instead of through a map of every chat.
    fn load(&mut self, conn: &rusqlite::Connection) -> rusqlite::Result<Vec<ChatRecord>> {
        let bad = |what: &str, id: &str, e: serde_json::Error| {
            rusqlite::Error::FromSqlConversionFailure(
                0,
                rusqlite::types::Type::Text,
                format!("{what} of chat {id}: {e}").into(),
            )
        };
        self.shadows.clear();
        let mut recs: Vec<ChatRecord> = Vec::new();
        let mut stmt = conn.prepare(&format!("SELECT {CHAT_COLUMNS} FROM chats ORDER BY id"))?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            recs.push(read_chat(row)?);
        }
        // `ORDER BY id` (BINARY collation) is byte order, as `str`'s, and a
        // record's `id` is that column: sorted for the search below.
        let find = |recs: &[ChatRecord], chat: &str| {
            recs.binary_search_by(|r| r.id.as_str().cmp(chat)).ok()
        };
        let mut stmt = conn
            .prepare("SELECT chat_id, message_id, ord, message FROM queue ORDER BY chat_id, ord")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let (chat, mid, ord, text): (String, String, i64, String) =
                (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
            let Some(i) = find(&recs, &chat) else {
                continue;
            };
            recs[i]
                .queue
                .push(serde_json::from_str(&text).map_err(|e| bad("queued message", &chat, e))?);
            self.shadows
                .entry(chat)
                .or_default()
                .queue
                .push((mid, ord, hash_of(&text)));
        }
        let mut stmt = conn.prepare("SELECT chat_id, turn FROM turns")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let (chat, text): (String, String) = (row.get(0)?, row.get(1)?);
            let Some(i) = find(&recs, &chat) else {
                continue;
            };
            recs[i].active_turn =
                Some(serde_json::from_str(&text).map_err(|e| bad("running turn", &chat, e))?);
            self.shadows.entry(chat).or_default().turn = Some(hash_of(&text));
        }
        Ok(recs)
    }

    fn run(mut self, mut conn: rusqlite::Connection, rx: std::sync::mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            let mut changes = Vec::new();
            let mut replies = Vec::with_capacity(jobs.len());
            for j in jobs {
                changes.extend(j.changes);
                replies.push(j.reply);
            }
            // A failure is not logged here but by each caller, where it is
            // handled: a request's 500 by the HTTP layer (with its request
            // id), the runner's and startup's writes where they persist.
            let res = self.commit(&mut conn, &changes);
            for reply in replies {
                reply(
                    res.as_ref()
                        .map(|_| ())
                        .map_err(|e| std::io::Error::other(e.to_string())),
                );
            }
        }
    }

    /// Write `changes` in one transaction. On failure the shadows are left
    /// as they were, so the next write of those chats writes every row.
    fn commit(
        &mut self,
        conn: &mut rusqlite::Connection,
        changes: &[Change],
    ) -> rusqlite::Result<()> {
        let mut next: Vec<(String, Option<Shadow>)> = Vec::with_capacity(changes.len());
        let tx = conn.transaction()?;
        for change in changes {
            match change {
                Change::Delete(id) => {
                    tx.prepare_cached("DELETE FROM chats WHERE id = ?1")?
                        .execute([id])?;
                    tx.prepare_cached("DELETE FROM queue WHERE chat_id = ?1")?
                        .execute([id])?;
                    tx.prepare_cached("DELETE FROM turns WHERE chat_id = ?1")?
                        .execute([id])?;
                    next.push((id.clone(), None));
                }
                Change::Put(rec) => {
                    // A later change of the same chat in this batch wins; an
                    // earlier one's shadow is the base for this one.
                    let old = next
                        .iter()
                        .rev()
                        .find(|(i, _)| *i == rec.id)
                        .map(|(_, s)| s.clone().unwrap_or_default())
                        .or_else(|| self.shadows.get(&rec.id).cloned())
                        .unwrap_or_default();
                    let shadow = write_chat(&tx, rec, &old)?;
                    next.push((rec.id.clone(), Some(shadow)));
                }
            }
        }
        tx.commit()?;
        for (id, s) in next {
            match s {
                Some(s) => {
                    self.shadows.insert(id, s);
                }
                None => {
                    self.shadows.remove(&id);
                }
            }
        }
        Ok(())
    }
}

/// Write the rows of `rec` that differ from `old`; returns the new shadow.
fn write_chat(
    tx: &rusqlite::Transaction<'_>,
    rec: &ChatRecord,
    old: &Shadow,
) -> rusqlite::Result<Shadow> {
    let id = rec.id.as_str();
    let meta = Meta::of(rec);
    let meta_hash = meta.hash();
    if Some(meta_hash) != old.meta {
        put_meta(tx, &meta)?;
    }

    let turn = rec.active_turn.as_ref().map(to_json);
    let turn_hash = turn.as_deref().map(hash_of);
    if turn_hash != old.turn {
        match &turn {
            Some(t) => tx
                .prepare_cached(
                    "INSERT INTO turns (chat_id, turn) VALUES (?1, ?2)
                     ON CONFLICT (chat_id) DO UPDATE SET turn = excluded.turn",
                )?
                .execute((id, t))?,
            None => tx
                .prepare_cached("DELETE FROM turns WHERE chat_id = ?1")?
                .execute([id])?,
        };
    }

    let queue = write_queue(tx, id, &rec.queue, &old.queue)?;
    Ok(Shadow {
        meta: Some(meta_hash),
        queue,
        turn: turn_hash,
    })
}

/// Bring the chat's queue rows in line with `queue`. The usual changes
/// (append, take the head, put one back at the front, drop some) touch only
/// the rows of the messages concerned: `ord` leaves gaps and may go
/// negative, so a neighbour never needs renumbering. Anything else rewrites
/// the chat's queue.
fn write_queue(
    tx: &rusqlite::Transaction<'_>,
    chat: &str,
    queue: &[super::model::Message],
    old: &[(String, i64, u64)],
) -> rusqlite::Result<Vec<(String, i64, u64)>> {
    let texts: Vec<String> = queue.iter().map(to_json).collect();
    let old_pos = |mid: &str| old.iter().position(|(i, _, _)| i == mid);
    // Kept messages must be a contiguous, in-order run of the new queue.
    let kept: Vec<usize> = queue
        .iter()
        .enumerate()
        .filter(|(_, m)| old_pos(&m.id).is_some())
        .map(|(i, _)| i)
        .collect();
    let simple = kept
        .windows(2)
        .all(|w| w[1] == w[0] + 1 && old_pos(&queue[w[0]].id) < old_pos(&queue[w[1]].id));
    let mut out = Vec::with_capacity(queue.len());
    let delete = |mid: &str| -> rusqlite::Result<()> {
        tx.prepare_cached("DELETE FROM queue WHERE message_id = ?1")?
            .execute([mid])?;
        Ok(())
    };
    let upsert = |mid: &str, ord: i64, text: &str| -> rusqlite::Result<()> {
        tx.prepare_cached(
            "INSERT INTO queue (message_id, chat_id, ord, message) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (message_id) DO UPDATE SET chat_id = excluded.chat_id,
                 ord = excluded.ord, message = excluded.message",
        )?
        .execute((mid, chat, ord, text))?;
        Ok(())
    };
    for (mid, _, _) in old {
        if !queue.iter().any(|m| m.id == *mid) {
            delete(mid)?;
        }
    }
    if !simple {
        for (i, (m, text)) in queue.iter().zip(&texts).enumerate() {
            upsert(&m.id, i as i64, text)?;
            out.push((m.id.clone(), i as i64, hash_of(text)));
        }
        return Ok(out);
    }
    // ord of each position: kept ones keep theirs; new ones count down
    // from the first kept one (in front) or up from the last (behind), or
    // from 0 when nothing is kept.
    let ord_of = |k: usize| old[old_pos(&queue[k].id).expect("kept")].1;
    let (first, last) = match (kept.first(), kept.last()) {
        (Some(&f), Some(&l)) => ((f, ord_of(f)), (l, ord_of(l))),
        _ => ((0, 0), (0, 0)),
    };
    for (i, (m, text)) in queue.iter().zip(&texts).enumerate() {
        let h = hash_of(text);
        let ord = match old_pos(&m.id) {
            Some(p) => {
                let (_, ord, old_h) = &old[p];
                if *old_h != h {
                    upsert(&m.id, *ord, text)?;
                }
                *ord
            }
            None => {
                let ord = if kept.is_empty() || i > last.0 {
                    last.1 + i as i64 - last.0 as i64
                } else {
                    first.1 - (first.0 - i) as i64
                };
                upsert(&m.id, ord, text)?;
                ord
            }
        };
        out.push((m.id.clone(), ord, h));
    }
    Ok(out)
}

/// Image blocks of accepted messages, by message id.
#[derive(Debug, Clone)]
pub struct Attachments {
    dir: PathBuf,
}

impl Attachments {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn path(&self, message_id: &str) -> PathBuf {
        self.dir.join(format!("{message_id}.json"))
    }

    /// Durably store `images` for `message_id` (before the 2xx).
    pub fn put(&self, message_id: &str, images: &[Image]) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(images).map_err(std::io::Error::other)?;
        crate::util::write_atomic(&self.path(message_id), &bytes, Some(0o600))
    }

    /// The images of `message_id`; empty when there are none (or the file
    /// is unreadable, which is logged: the turn still runs, without them).
    pub fn get(&self, message_id: &str) -> Vec<Image> {
        let path = self.path(message_id);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "unreadable message attachments; sending without images");
                Vec::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable message attachments; sending without images");
                Vec::new()
            }
        }
    }

    pub fn remove(&self, message_id: &str) {
        match std::fs::remove_file(self.path(message_id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(message.id = message_id, error = %e, "could not remove message attachments")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("chats.json");
        std::fs::write(&p, b"{not json").unwrap();
        match load(&p) {
            Loaded::Corrupt {
                moved_to: Some(to), ..
            } => {
                assert!(to
                    .file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with("chats.json.corrupt-"));
                assert_eq!(std::fs::read(&to).unwrap(), b"{not json");
            }
            other => panic!("{other:?}"),
        }
        assert!(!p.exists());
        assert!(matches!(load(&p), Loaded::Missing));
    }

    use crate::chats::model::{ActiveTurn, Message, Usage};
    use crate::providers::ProviderKind;

    fn rec(id: &str) -> ChatRecord {
        ChatRecord {
            id: id.into(),
            provider: ProviderKind::Claude,
            title: "t".into(),
            model: None,
            cwd: "/w".into(),
            provider_session_id: None,
            created_at: "2026-01-01T00:00:00.000Z".into(),
            updated_at: "2026-01-01T00:00:00.000Z".into(),
            queue: vec![],
            last_turn: None,
            usage: Usage::default(),
            active_turn: None,
            codex_thread_usage: None,
        }
    }

    fn msg(id: &str) -> Message {
        Message {
            id: id.into(),
            text: format!("text of {id}"),
            queued_at: "t".into(),
            plan_mode: false,
            model: None,
            images: 0,
            thinking_level: None,
        }
    }

    fn reopen(dir: &Path) -> Vec<ChatRecord> {
        let (_db, opened) = ChatDb::open(&dir.join("chats.db"), &dir.join("chats.json")).unwrap();
        let mut chats = opened.chats;
        chats.sort_by(|a, b| a.id.cmp(&b.id));
        chats
    }

    /// Queue edits of every kind (append, take the head, requeue at the
    /// front, drop from the middle, clear) read back in order.
    #[tokio::test]
    async fn rows_follow_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let (db, opened) =
            ChatDb::open(&dir.path().join("chats.db"), &dir.path().join("chats.json")).unwrap();
        assert!(opened.chats.is_empty());
        let mut a = rec("c_a");
        let b = rec("c_b");
        db.write(vec![
            Change::Put(Box::new(a.clone())),
            Change::Put(Box::new(b.clone())),
        ])
        .await
        .unwrap();
        type Step = Box<dyn Fn(&mut ChatRecord)>;
        let steps: Vec<Step> = vec![
            Box::new(|r| r.queue.extend([msg("m1"), msg("m2"), msg("m3")])),
            Box::new(|r| {
                let m = r.queue.remove(0);
                r.active_turn = Some(ActiveTurn {
                    turn_id: "t1".into(),
                    message: m,
                    started_at: "t".into(),
                    pgid: Some(42),
                    start_time: Some(7),
                });
            }),
            Box::new(|r| r.queue.push(msg("m4"))),
            Box::new(|r| {
                let t = r.active_turn.take().unwrap();
                r.queue.insert(0, t.message);
            }),
            Box::new(|r| {
                r.queue.remove(2);
                r.queue.insert(0, msg("m0"));
                r.queue.push(msg("m5"));
            }),
            Box::new(|r| r.queue.swap(0, 3)),
            Box::new(|r| r.title = "renamed".into()),
            Box::new(|r| {
                r.model = Some("m".into());
                r.provider_session_id = Some("s".into());
                r.usage = Usage {
                    input_tokens: 1,
                    output_tokens: 2,
                    cached_input_tokens: 3,
                    cost_usd: Some(0.25),
                };
                r.last_turn = Some(crate::chats::model::LastTurn {
                    turn_id: "t1".into(),
                    outcome: crate::chats::model::Outcome::Failed,
                    finished_at: "f".into(),
                    reason: None,
                    error: Some(crate::events::ErrorBody {
                        code: "c".into(),
                        message: "m".into(),
                    }),
                });
                r.codex_thread_usage = Some(crate::providers::Usage {
                    input_tokens: 4,
                    ..Default::default()
                });
                r.provider = ProviderKind::Codex;
            }),
            Box::new(|r| r.queue.clear()),
        ];
        for step in steps {
            step(&mut a);
            db.write(vec![Change::Put(Box::new(a.clone()))])
                .await
                .unwrap();
            let got = reopen(dir.path());
            assert_eq!(got, vec![a.clone(), b.clone()]);
        }
        db.write(vec![Change::Delete("c_a".into())]).await.unwrap();
        assert_eq!(reopen(dir.path()), vec![b]);
    }

    #[test]
    fn file_is_private_and_in_wal_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("chats.db");
        let (db, _) = ChatDb::open(&p, &dir.path().join("chats.json")).unwrap();
        db.write_blocking(vec![Change::Put(Box::new(rec("c_1")))])
            .unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let conn = rusqlite::Connection::open(&p).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn legacy_json_is_imported_once_and_renamed() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("chats.json");
        let mut a = rec("c_a");
        a.queue.push(msg("m1"));
        let b = rec("c_b");
        let body = serde_json::json!({"version": 1, "chats": [a, b]});
        std::fs::write(&json, body.to_string()).unwrap();
        let (_db, opened) = ChatDb::open(&dir.path().join("chats.db"), &json).unwrap();
        assert_eq!(opened.migrated, Some(2));
        assert!(!json.exists());
        assert!(dir.path().join("chats.json.migrated").exists());
        drop(_db);
        assert_eq!(reopen(dir.path()), vec![a, b]);
    }

    /// A database of schema 1 (each chat a JSON record) is converted to
    /// columns at open; nothing is lost, queue rows stay.
    #[test]
    fn schema_1_is_converted_to_columns() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("chats.db");
        let mut a = rec("c_a");
        a.usage.cost_usd = Some(1.5);
        a.last_turn = Some(crate::chats::model::LastTurn {
            turn_id: "t".into(),
            outcome: crate::chats::model::Outcome::Completed,
            finished_at: "f".into(),
            reason: None,
            error: None,
        });
        let b = rec("c_b");
        {
            let conn = rusqlite::Connection::open(&p).unwrap();
            conn.execute_batch(
                "CREATE TABLE chats (id TEXT PRIMARY KEY, record TEXT NOT NULL) WITHOUT ROWID;
                 CREATE TABLE queue (message_id TEXT PRIMARY KEY, chat_id TEXT NOT NULL,
                     ord INTEGER NOT NULL, message TEXT NOT NULL);
                 CREATE INDEX queue_by_chat ON queue (chat_id, ord);
                 CREATE TABLE turns (chat_id TEXT PRIMARY KEY, turn TEXT NOT NULL) WITHOUT ROWID;
                 PRAGMA user_version=1;",
            )
            .unwrap();
            for r in [&a, &b] {
                conn.execute(
                    "INSERT INTO chats (id, record) VALUES (?1, ?2)",
                    (&r.id, serde_json::to_string(r).unwrap()),
                )
                .unwrap();
            }
            conn.execute(
                "INSERT INTO queue VALUES ('m1', 'c_a', 0, ?1)",
                [serde_json::to_string(&msg("m1")).unwrap()],
            )
            .unwrap();
        }
        a.queue.push(msg("m1"));
        assert_eq!(reopen(dir.path()), vec![a.clone(), b.clone()]);
        let conn = rusqlite::Connection::open(&p).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        drop(conn);
        assert_eq!(reopen(dir.path()), vec![a, b]);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("chats.db");
        std::fs::write(&p, vec![0x5a; 8192]).unwrap();
        let err = ChatDb::open(&p, &dir.path().join("chats.json"))
            .err()
            .expect("garbage opens");
        assert!(err.to_string().contains("chats.db"), "{err}");
        // Evidence kept.
        assert_eq!(std::fs::read(&p).unwrap(), vec![0x5a; 8192]);
    }
}
