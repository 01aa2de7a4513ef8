//! Plans: the Markdown plan files agents write, read from two folders —
//! `~/.claude/plans` (source `claude`) and `~/.replicas/plans` (source
//! `replicas`).
//!
//! Invariants:
//! - a plan name is one path component ending in `.md`: no `/`, `\`, `..`
//!   or NUL (checked on the *decoded* name, so `%2e%2e%2f` is caught too);
//! - a file is served only if its canonical path lies inside one of the
//!   canonical plan folders, so a symlink pointing elsewhere is "not found",
//!   exactly like a missing file (nothing about the outside is revealed);
//! - content is read through a cap ([`MAX_PLAN_BYTES`]); a larger plan is an
//!   error, never a partial answer.
//!
//! Everything here is blocking file IO; callers run it off the async
//! threads (`spawn_blocking`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::config::Paths;

/// Largest plan served (5 MiB); plans are prose, anything bigger is a mistake.
pub const MAX_PLAN_BYTES: u64 = 5 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PlanSource {
    Claude,
    Replicas,
}

/// One entry of `GET /plans`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = PlanInfo)]
pub struct PlanMeta {
    pub filename: String,
    pub source: PlanSource,
    pub size_bytes: u64,
    pub modified_at: String,
    #[serde(skip)]
    modified: SystemTime,
}

/// `GET /plans/:filename`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub filename: String,
    pub source: PlanSource,
    pub content: String,
    pub modified_at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("invalid plan name: {0}")]
    InvalidName(&'static str),
    #[error("no such plan")]
    NotFound,
    #[error("plan is {size} bytes; the limit is {max}")]
    TooLarge { size: u64, max: u64 },
    #[error("reading plans: {0}")]
    Io(#[from] std::io::Error),
}

/// The two plan folders, in lookup order (a name present in both is served
/// from `claude`, the first listed).
#[derive(Debug, Clone)]
pub struct PlanStore {
    dirs: Vec<(PlanSource, PathBuf)>,
    max_bytes: u64,
}

impl PlanStore {
    pub fn new(paths: &Paths) -> Self {
        Self {
            dirs: vec![
                (PlanSource::Claude, paths.claude_plans_dir.clone()),
                (PlanSource::Replicas, paths.replicas_plans_dir.clone()),
            ],
            max_bytes: MAX_PLAN_BYTES,
        }
    }

    /// Every readable `*.md` plan inside the folders, newest first (ties by
    /// name). Missing folders are simply empty; entries that escape the
    /// folders (symlinks) or vanish while listing are skipped.
    pub fn list(&self) -> Result<Vec<PlanMeta>, PlanError> {
        let roots = self.canonical_roots();
        let mut out = Vec::new();
        for (source, dir) in &self.dirs {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            for entry in entries.flatten() {
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if validate_name(&name).is_err() {
                    continue;
                }
                let Some((_, meta)) = resolve_inside(&entry.path(), &roots) else {
                    continue;
                };
                let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                out.push(PlanMeta {
                    filename: name,
                    source: *source,
                    size_bytes: meta.len(),
                    modified_at: crate::util::ts(modified.into()),
                    modified,
                });
            }
        }
        out.sort_by(|a, b| {
            b.modified
                .cmp(&a.modified)
                .then_with(|| a.filename.cmp(&b.filename))
        });
        Ok(out)
    }

    /// One plan's content.
    pub fn get(&self, name: &str) -> Result<Plan, PlanError> {
        validate_name(name)?;
        let roots = self.canonical_roots();
        for (source, dir) in &self.dirs {
            let path = dir.join(name);
            // symlink_metadata: a dangling or outside symlink must still stop
            // the search here rather than fall through to the other folder.
            if std::fs::symlink_metadata(&path).is_err() {
                continue;
            }
            let Some((real, meta)) = resolve_inside(&path, &roots) else {
                return Err(PlanError::NotFound);
            };
            if meta.len() > self.max_bytes {
                return Err(PlanError::TooLarge {
                    size: meta.len(),
                    max: self.max_bytes,
                });
            }
            // Read through the cap: the file may grow between stat and read.
            let mut buf = Vec::with_capacity(meta.len() as usize);
            std::fs::File::open(&real)?
                .take(self.max_bytes + 1)
                .read_to_end(&mut buf)?;
            if buf.len() as u64 > self.max_bytes {
                return Err(PlanError::TooLarge {
                    size: buf.len() as u64,
                    max: self.max_bytes,
                });
            }
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            return Ok(Plan {
                filename: name.to_owned(),
                source: *source,
                content: String::from_utf8_lossy(&buf).into_owned(),
                modified_at: crate::util::ts(modified.into()),
            });
        }
        Err(PlanError::NotFound)
    }

    fn canonical_roots(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .filter_map(|(_, d)| d.canonicalize().ok())
            .collect()
    }
}

/// A plan name must be a single file name ending in `.md`.
pub fn validate_name(name: &str) -> Result<(), PlanError> {
    if name.contains('\0') {
        return Err(PlanError::InvalidName("must not contain NUL"));
    }
    if name.contains('/') || name.contains('\\') {
        return Err(PlanError::InvalidName("must not contain a path separator"));
    }
    if name.contains("..") {
        return Err(PlanError::InvalidName("must not contain `..`"));
    }
    if !name.ends_with(".md") || name.len() <= 3 {
        return Err(PlanError::InvalidName("must be a file name ending in .md"));
    }
    if name.len() > 255 {
        return Err(PlanError::InvalidName("is longer than 255 bytes"));
    }
    Ok(())
}

/// Canonicalize `path` and return it with its metadata if it is a regular
/// file inside one of `roots`.
fn resolve_inside(path: &Path, roots: &[PathBuf]) -> Option<(PathBuf, std::fs::Metadata)> {
    let real = path.canonicalize().ok()?;
    if !roots.iter().any(|r| real.starts_with(r) && real != *r) {
        return None;
    }
    let meta = std::fs::metadata(&real).ok()?;
    meta.is_file().then_some((real, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["plan.md", "a b.md", "x.y.md", ".hidden.md"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".md",
            "plan",
            "plan.txt",
            "../x.md",
            "a/b.md",
            "a\\b.md",
            "..md",
            "a..b.md",
            "/etc/x.md",
            "x\0.md",
        ] {
            assert!(
                matches!(validate_name(bad), Err(PlanError::InvalidName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn list_get_and_escapes() {
        let home = tempfile::tempdir().unwrap();
        let paths = Paths::new(home.path());
        std::fs::create_dir_all(&paths.claude_plans_dir).unwrap();
        std::fs::create_dir_all(&paths.replicas_plans_dir).unwrap();
        std::fs::write(paths.claude_plans_dir.join("a.md"), "# A").unwrap();
        std::fs::write(paths.replicas_plans_dir.join("b.md"), "# B").unwrap();
        std::fs::write(paths.replicas_plans_dir.join("notes.txt"), "no").unwrap();
        std::fs::write(home.path().join("secret.md"), "outside").unwrap();
        std::os::unix::fs::symlink(
            home.path().join("secret.md"),
            paths.claude_plans_dir.join("evil.md"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            paths.replicas_plans_dir.join("b.md"),
            paths.claude_plans_dir.join("alias.md"),
        )
        .unwrap();
        let store = PlanStore::new(&paths);
        let mut names: Vec<_> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|p| p.filename)
            .collect();
        names.sort();
        assert_eq!(names, ["a.md", "alias.md", "b.md"]);
        assert_eq!(store.get("b.md").unwrap().content, "# B");
        assert_eq!(store.get("b.md").unwrap().source, PlanSource::Replicas);
        assert_eq!(store.get("alias.md").unwrap().content, "# B");
        assert!(matches!(store.get("evil.md"), Err(PlanError::NotFound)));
        assert!(matches!(store.get("nope.md"), Err(PlanError::NotFound)));

        let mut small = store.clone();
        small.max_bytes = 2;
        assert!(matches!(small.get("a.md"), Err(PlanError::TooLarge { .. })));
    }
}
