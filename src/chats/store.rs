//! Persistence of the registry: `chats.json` (every chat with its queue and
//! running turn, rewritten atomically on every change) and the attachments
//! side folder (image blocks of accepted messages, one file per message,
//! written before the message is acknowledged and removed once its turn
//! ended).

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

/// Serialize the registry (called under the state lock; cheap).
pub fn encode(chats: &[&ChatRecord]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Out<'a> {
        version: u32,
        chats: &'a [&'a ChatRecord],
    }
    serde_json::to_vec_pretty(&Out {
        version: FORMAT_VERSION,
        chats,
    })
    .expect("chat records serialize")
}

pub fn save(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::util::write_atomic(path, bytes, Some(0o600))
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

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("chats.json");
        save(&p, &encode(&[])).unwrap();
        assert!(matches!(load(&p), Loaded::Chats(c) if c.is_empty()));
    }
}
