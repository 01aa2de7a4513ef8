//! Credential files the agents and git read, and how a refreshed credential
//! is merged into what is already there. Pure functions plus one locked
//! read-merge-write ([`CredentialFile::update`]).
//!
//! - `~/.git-credentials`: the `github.com` line is replaced by
//!   `https://x-access-token:<token>@github.com` (in place; duplicates
//!   removed); every other line is kept as is.
//! - `~/.claude/.credentials.json`, `~/.codex/auth.json`: the new object is
//!   deep-merged into the existing one (new values win, objects merge, keys
//!   only the old file has are kept), so fields the CLI wrote itself survive.
//!   An unreadable existing file is replaced.
//!
//! Writes are atomic (temp + rename) with mode 0600, and serialized per file
//! by a mutex held across read-merge-write, so two refreshes never
//! interleave and a reader never sees a torn file.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// Whether `token` can sit inside a URL's userinfo without escaping or
/// injecting anything (no separators, whitespace or control characters).
pub fn valid_git_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 4096
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'~'))
}

/// `existing` with its github.com credential replaced by `token`.
pub fn git_credentials_with(existing: &str, token: &str) -> String {
    let new_line = format!("https://x-access-token:{token}@github.com");
    let mut out: Vec<&str> = Vec::new();
    let mut placed = false;
    for line in existing.lines() {
        if is_github_line(line) {
            if !placed {
                out.push(&new_line);
                placed = true;
            }
        } else if !line.trim().is_empty() {
            out.push(line);
        }
    }
    if !placed {
        out.push(&new_line);
    }
    let mut s = out.join("\n");
    s.push('\n');
    s
}

fn is_github_line(line: &str) -> bool {
    url::Url::parse(line.trim()).is_ok_and(|u| {
        u.host_str()
            .is_some_and(|h| h.eq_ignore_ascii_case("github.com"))
    })
}

/// Deep-merge `new` into `base`: objects merge key by key, anything else in
/// `new` replaces what `base` had.
pub fn deep_merge(base: &mut Value, new: &Value) {
    match (base, new) {
        (Value::Object(b), Value::Object(n)) => {
            for (k, v) in n {
                match b.get_mut(k) {
                    Some(slot) => deep_merge(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, n) => *b = n.clone(),
    }
}

/// The new content of a JSON credential file.
pub fn merged_json(existing: Option<&[u8]>, new: &Value) -> Vec<u8> {
    let mut base = existing
        .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| Value::Object(Default::default()));
    deep_merge(&mut base, new);
    let mut out = serde_json::to_vec_pretty(&base).unwrap_or_default();
    out.push(b'\n');
    out
}

/// One credential file with its write lock.
#[derive(Clone)]
pub struct CredentialFile {
    pub path: PathBuf,
    lock: Arc<Mutex<()>>,
}

impl CredentialFile {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            lock: Arc::new(Mutex::new(())),
        }
    }

    /// Read the current content (None if missing), compute the new one,
    /// write it atomically with mode 0600. Blocking.
    pub fn update(&self, f: impl FnOnce(Option<&[u8]>) -> Vec<u8>) -> std::io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let existing = match std::fs::read(&self.path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let next = f(existing.as_deref());
        crate::util::write_atomic(&self.path, &next, Some(0o600))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn git_line_replaced_others_kept() {
        let existing = "https://bob:pw@gitlab.com\nhttps://x-access-token:old@github.com\n\nhttps://u:p@GitHub.com\nnot a url\n";
        assert_eq!(
            git_credentials_with(existing, "ghs_new"),
            "https://bob:pw@gitlab.com\nhttps://x-access-token:ghs_new@github.com\nnot a url\n"
        );
        assert_eq!(
            git_credentials_with("", "t"),
            "https://x-access-token:t@github.com\n"
        );
        assert_eq!(
            git_credentials_with("https://a:b@example.com", "t"),
            "https://a:b@example.com\nhttps://x-access-token:t@github.com\n"
        );
    }

    #[test]
    fn token_validation() {
        assert!(valid_git_token("ghs_ABC123-x.y~z"));
        for bad in ["", "a b", "a\nb", "a@b", "a:b", "a/b", "tök"] {
            assert!(!valid_git_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn json_merge_keeps_unknown_fields() {
        let old = br#"{"claudeAiOauth":{"accessToken":"old","subscriptionType":"max"},"other":1}"#;
        let out = merged_json(
            Some(old),
            &json!({"claudeAiOauth":{"accessToken":"new","expiresAt":5}}),
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            json!({"claudeAiOauth":{"accessToken":"new","subscriptionType":"max","expiresAt":5},"other":1})
        );
        let v: Value =
            serde_json::from_slice(&merged_json(Some(b"garbage"), &json!({"a":1}))).unwrap();
        assert_eq!(v, json!({"a":1}));
    }
}
