//! What changed on disk, so the request path does no scans and no git runs
//! it need not do.
//!
//! - The **repo list** (directories under the workspace root holding a
//!   `.git`) is kept in memory. A background task rescans the root when
//!   inotify reports a change at the top level, and in any case when the
//!   root's mtime changed or a directory there had no `.git` yet (a clone in
//!   progress), at most once per [`RESCAN`]. A new repo triggers
//!   [`RepoService::refresh`](super::RepoService::refresh), which publishes
//!   `repo.discovered`.
//! - Each repo's worktree (`.git` included) is watched recursively; any
//!   event but a read bumps the repo's **generation**. A repo's last
//!   `GET /repos` answer is reused while its generation is unchanged. A repo
//!   that cannot be watched (inotify watch limit) is never reused: always
//!   examined afresh. Our own git runs pass `--no-optional-locks`, so they
//!   do not write the index and do not invalidate what they just read.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;

/// Least time between two rescans of the workspace root.
pub const RESCAN: Duration = Duration::from_secs(1);

pub type RepoDirs = Arc<Vec<(String, PathBuf)>>;

/// Shared by the service, the notify callback and the rescan task.
pub struct Tracker {
    root: PathBuf,
    dirs: RwLock<RepoDirs>,
    /// Per repo name: generation, bumped by every write event under it.
    gens: Mutex<HashMap<String, u64>>,
    /// Repos with a working recursive watch.
    watched: Mutex<HashSet<String>>,
    /// Something changed at the top level of the root.
    root_changed: Notify,
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
    /// The rescan task keeps `dirs` current.
    started: std::sync::atomic::AtomicBool,
}

impl Tracker {
    pub fn new(root: PathBuf) -> Arc<Self> {
        let dirs = super::config::repo_dirs(&root);
        Arc::new(Self {
            root,
            dirs: RwLock::new(Arc::new(dirs)),
            gens: Mutex::new(HashMap::new()),
            watched: Mutex::new(HashSet::new()),
            root_changed: Notify::new(),
            watcher: Mutex::new(None),
            started: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The repos as last scanned (no filesystem access once
    /// [`Tracker::start_watching`] ran; before, a fresh scan).
    pub fn dirs(&self) -> RepoDirs {
        if !self.started.load(std::sync::atomic::Ordering::Relaxed) {
            return Arc::new(super::config::repo_dirs(&self.root));
        }
        self.cached_dirs()
    }

    fn cached_dirs(&self) -> RepoDirs {
        self.dirs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The repo's generation if its worktree is watched; `None`: do not
    /// reuse anything for it.
    pub fn generation(&self, name: &str) -> Option<u64> {
        if !lock(&self.watched).contains(name) {
            return None;
        }
        Some(lock(&self.gens).get(name).copied().unwrap_or(0))
    }

    fn on_event(&self, ev: notify::Result<notify::Event>) {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                // Lost events (queue overflow): trust nothing cached.
                tracing::debug!(error = %e, "file watch error; forgetting cached repo states");
                let mut gens = lock(&self.gens);
                for g in gens.values_mut() {
                    *g += 1;
                }
                self.root_changed.notify_one();
                return;
            }
        };
        if matches!(ev.kind, EventKind::Access(_)) {
            return;
        }
        let mut top = false;
        let mut gens = lock(&self.gens);
        for path in &ev.paths {
            let Ok(rel) = path.strip_prefix(&self.root) else {
                continue;
            };
            let mut parts = rel.components();
            let Some(first) = parts.next() else {
                top = true;
                continue;
            };
            let name = first.as_os_str().to_string_lossy();
            *gens.entry(name.into_owned()).or_insert(0) += 1;
            // `<root>/<dir>` itself, or its `.git` appearing: the list may change.
            match parts.next() {
                None => top = true,
                Some(c) if c.as_os_str() == ".git" && parts.next().is_none() => top = true,
                _ => {}
            }
        }
        drop(gens);
        if top {
            self.root_changed.notify_one();
        }
    }

    /// Start watching (the root, and every repo recursively). Without
    /// inotify the rescan task still polls the root's mtime.
    pub fn start_watching(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let watcher = notify::recommended_watcher(move |ev| {
            if let Some(me) = me.upgrade() {
                me.on_event(ev);
            }
        });
        match watcher {
            Ok(mut w) => {
                if let Err(e) = w.watch(&self.root, RecursiveMode::NonRecursive) {
                    tracing::debug!(root = %self.root.display(), error = %e, "cannot watch the workspace root; polling it");
                }
                *lock(&self.watcher) = Some(w);
            }
            Err(e) => {
                tracing::warn!(error = %e, "file watching unavailable; repos are polled and examined on every request")
            }
        }
        // Scanned after the root watch exists, so no repo slips between.
        self.rescan();
        let dirs = self.cached_dirs();
        self.sync_watches(&dirs);
        self.started
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Watch new repos, unwatch gone ones.
    fn sync_watches(&self, dirs: &[(String, PathBuf)]) {
        let mut guard = lock(&self.watcher);
        let Some(w) = guard.as_mut() else {
            return;
        };
        let mut watched = lock(&self.watched);
        let names: HashSet<&str> = dirs.iter().map(|(n, _)| n.as_str()).collect();
        watched.retain(|n| {
            if names.contains(n.as_str()) {
                return true;
            }
            let _ = w.unwatch(&self.root.join(n));
            false
        });
        for (name, dir) in dirs {
            if watched.contains(name) {
                continue;
            }
            match w.watch(dir, RecursiveMode::Recursive) {
                Ok(()) => {
                    // Anything cached from before the watch is stale.
                    *lock(&self.gens).entry(name.clone()).or_insert(0) += 1;
                    watched.insert(name.clone());
                }
                Err(e) => {
                    // Most likely the inotify watch limit: correct, just slower.
                    let _ = w.unwatch(dir);
                    tracing::warn!(repo = %name, error = %e, "cannot watch the repository; it is examined afresh on every request");
                }
            }
        }
    }

    /// Rescan the root: returns whether the repo list changed.
    fn rescan(&self) -> bool {
        let dirs = super::config::repo_dirs(&self.root);
        let changed = *self.cached_dirs() != dirs;
        if changed {
            self.sync_watches(&dirs);
            *self.dirs.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(dirs);
        }
        changed
    }

    /// Whether the root needs a look: its mtime moved, or a directory in
    /// it is not a repo yet (a clone may be filling it in).
    fn worth_a_look(&self, last_mtime: &mut Option<SystemTime>) -> bool {
        let mtime = std::fs::metadata(&self.root)
            .and_then(|m| m.modified())
            .ok();
        let moved = mtime != *last_mtime;
        *last_mtime = mtime;
        moved || pending_dirs(&self.root, &self.cached_dirs())
    }

    /// The rescan loop; `on_new` runs when the repo list changed.
    pub async fn run(
        self: Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
        on_new: impl Fn() + Send + 'static,
    ) {
        let mut last_mtime = None;
        let mut last_scan = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.root_changed.notified() => {}
                _ = tokio::time::sleep(RESCAN) => {}
            }
            // At most one rescan per RESCAN, however busy the root is.
            tokio::time::sleep_until(last_scan + RESCAN).await;
            last_scan = tokio::time::Instant::now();
            let me = self.clone();
            let mt = last_mtime;
            let changed = tokio::task::spawn_blocking(move || {
                let mut mt = mt;
                let look = me.worth_a_look(&mut mt);
                (mt, look && me.rescan())
            })
            .await;
            if let Ok((mt, changed)) = changed {
                last_mtime = mt;
                if changed {
                    on_new();
                }
            }
        }
    }
}

/// A directory directly under `root` that is not (yet) a known repo.
fn pending_dirs(root: &Path, known: &[(String, PathBuf)]) -> bool {
    let Ok(entries) = std::fs::read_dir(root) else {
        return false;
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .any(|e| !known.iter().any(|(_, d)| *d == e.path()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
