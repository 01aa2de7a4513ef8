//! Repositories under the workspace root: discovery, the contract's Repo
//! object (branch, default branch, HEAD, credential-free remote, dirtiness,
//! ahead/behind, diff stats against the merge-base with the default branch,
//! untracked files included, optional full diff, PR URL) and the
//! `repo.discovered` / `repo.status.changed` events.
//!
//! Invariants: git never takes the index lock (see [`git`]); each repo is
//! examined with its own timeout, in parallel, and a broken or slow repo is
//! reported with an `error` field instead of failing the listing; remote
//! URLs are stripped of credentials before they are stored, logged or sent.

pub mod config;
pub mod git;
pub mod untracked;
pub mod watch;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::events::{EventBus, EventKind};
pub use config::system_prompt_for;
use git::{FileChange, Git, GitError};

/// How long one repo may take to examine before it is reported as an error.
const REPO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `gh pr view` may take; it talks to GitHub.
const GH_TIMEOUT: Duration = Duration::from_secs(10);
/// How many repos are examined at once (each runs a few git processes).
const PARALLEL_REPOS: usize = 8;

/// The contract's Repo object.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Repo {
    pub name: String,
    pub path: String,
    /// `null` for a detached HEAD.
    pub branch: Option<String>,
    pub default_branch: String,
    /// `null` for a repository without commits.
    pub head_sha: Option<String>,
    pub remote_url: Option<String>,
    pub is_dirty: bool,
    /// Against the upstream when the branch has one, else against the
    /// default branch.
    pub ahead: u64,
    pub behind: u64,
    pub pr_url: Option<String>,
    pub start_hooks_completed: bool,
    pub git_diff: GitDiff,
    /// Present when the repo could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitDiff {
    pub files_changed: usize,
    pub added: u64,
    pub removed: u64,
    pub files: Vec<FileChange>,
    /// Only with `includeDiffs=true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
    pub full_diff: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
    pub truncated: Option<bool>,
}

/// What `repo.status.changed` compares between two looks.
type Fingerprint = (
    Option<String>,
    Option<String>,
    bool,
    Vec<FileChange>,
    Option<String>,
);

fn fingerprint(r: &Repo) -> Fingerprint {
    (
        r.branch.clone(),
        r.head_sha.clone(),
        r.is_dirty,
        r.git_diff.files.clone(),
        r.error.clone(),
    )
}

type AbEntry = ((String, String), (u64, u64));
type PrSlot = Arc<tokio::sync::Mutex<Option<(String, String, Option<String>)>>>;

/// What the refs say about a repo.
struct Refs {
    remote: Option<(String, String)>,
    default_branch: String,
    /// `(ref name, commit)` the diff is based on.
    base_ref: Option<(String, String)>,
}

/// Says whether a repo's start hooks are done (any outcome, or none).
pub type HooksCompleted = Arc<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Clone)]
pub struct RepoService {
    inner: Arc<Inner>,
}

struct Inner {
    workspaces_dir: PathBuf,
    git_bin: PathBuf,
    gh_bin: PathBuf,
    default_branch: Option<String>,
    max_diff_bytes: usize,
    bus: EventBus,
    hooks_completed: HooksCompleted,
    /// ahead/behind per repo path, valid for one (base commit, HEAD).
    ab_cache: Mutex<HashMap<PathBuf, AbEntry>>,
    /// `gh pr view` answers per repo path, valid for one (branch, HEAD).
    /// The per-repo async lock is held across the gh call so concurrent
    /// looks (a GET during the start-up refresh) ask gh once.
    pr_cache: Mutex<HashMap<PathBuf, PrSlot>>,
    /// The last look at each repo, for `refresh`. The async lock also
    /// serialises refreshes so events come out in a consistent order.
    last: tokio::sync::Mutex<Option<HashMap<String, Fingerprint>>>,
    limit: tokio::sync::Semaphore,
    /// The repo list and per-repo change generations ([`watch`]).
    tracker: Arc<watch::Tracker>,
    /// Each repo's last answer (without full diffs) and the generation it
    /// was read at; reused while the generation is unchanged.
    results: Mutex<HashMap<String, (u64, Repo)>>,
}

impl RepoService {
    pub fn new(config: &Config, bus: EventBus, hooks_completed: HooksCompleted) -> Self {
        Self {
            inner: Arc::new(Inner {
                workspaces_dir: config.workspaces_dir.clone(),
                git_bin: config.git_bin.clone(),
                gh_bin: config.gh_bin.clone(),
                default_branch: config.default_branch.clone(),
                max_diff_bytes: config.max_diff_bytes,
                bus,
                hooks_completed,
                pr_cache: Mutex::new(HashMap::new()),
                ab_cache: Mutex::new(HashMap::new()),
                last: tokio::sync::Mutex::new(None),
                limit: tokio::sync::Semaphore::new(PARALLEL_REPOS),
                tracker: watch::Tracker::new(config.workspaces_dir.clone()),
                results: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Keep the repo list current and watch worktrees for changes (see
    /// [`watch`]); a repo that appears is announced through [`refresh`].
    ///
    /// [`refresh`]: Self::refresh
    pub fn watch(&self, shutdown: tokio_util::sync::CancellationToken) {
        let tracker = self.inner.tracker.clone();
        tracker.start_watching();
        let svc = self.clone();
        tokio::spawn(tracker.run(shutdown, move || {
            let svc = svc.clone();
            tokio::spawn(async move { svc.refresh().await });
        }));
    }

    /// How many repositories are under the workspace root (from memory
    /// once [`watch`](Self::watch) runs).
    pub fn count(&self) -> usize {
        self.inner.tracker.dirs().len()
    }

    /// Every repo, examined in parallel, in name order.
    #[tracing::instrument(skip_all, fields(include_diffs))]
    pub async fn list(&self, include_diffs: bool) -> Vec<Repo> {
        let dirs = self.inner.tracker.dirs();
        let reads = dirs
            .iter()
            .map(|(name, dir)| self.examine(name.clone(), dir.clone(), include_diffs));
        futures_util::future::join_all(reads).await
    }

    /// Re-examine every repo and publish `repo.discovered` for repos not
    /// seen before and `repo.status.changed` for those whose branch, HEAD,
    /// dirtiness or diff stats changed since the last look. The first call
    /// (at engine start) discovers everything.
    #[tracing::instrument(skip_all)]
    pub async fn refresh(&self) {
        let mut last = self.inner.last.lock().await;
        let repos = self.list(false).await;
        let previous = last.take().unwrap_or_default();
        let mut next = HashMap::with_capacity(repos.len());
        for repo in repos {
            let fp = fingerprint(&repo);
            let kind = match previous.get(&repo.name) {
                None => Some(EventKind::RepoDiscovered {
                    repo: Box::new(repo.clone()),
                }),
                Some(old) if *old != fp => Some(EventKind::RepoStatusChanged {
                    repo: Box::new(repo.clone()),
                }),
                Some(_) => None,
            };
            if let Some(error) = &repo.error {
                if previous.get(&repo.name).and_then(|old| old.4.as_ref()) != Some(error) {
                    tracing::warn!(repo = %repo.name, error = %error, "cannot read repository");
                }
            }
            if let Some(kind) = kind {
                tracing::debug!(repo = %repo.name, event = kind.type_name(), "repo changed");
                self.inner.bus.publish(None, kind);
            }
            next.insert(repo.name, fp);
        }
        *last = Some(next);
    }

    async fn examine(&self, name: String, dir: PathBuf, include_diffs: bool) -> Repo {
        // Unchanged since the last look (watched, no event): reuse it.
        let generation = self.inner.tracker.generation(&name);
        if let (Some(g), false) = (generation, include_diffs) {
            let hit = self.inner.results.lock().ok().and_then(|r| {
                r.get(&name)
                    .filter(|(at, _)| *at == g)
                    .map(|(_, repo)| repo.clone())
            });
            if let Some(mut repo) = hit {
                repo.start_hooks_completed = (self.inner.hooks_completed)(&name);
                return repo;
            }
        }
        let repo = self.examine_afresh(name, dir, include_diffs).await;
        if let (Some(g), false, None) = (generation, include_diffs, &repo.error) {
            if let Ok(mut r) = self.inner.results.lock() {
                r.insert(repo.name.clone(), (g, repo.clone()));
            }
        }
        repo
    }

    async fn examine_afresh(&self, name: String, dir: PathBuf, include_diffs: bool) -> Repo {
        // A closed semaphore cannot happen (never closed); run unlimited then.
        let _permit = self.inner.limit.acquire().await.ok();
        let git = Git {
            bin: self.inner.git_bin.clone(),
            repo: dir.clone(),
            ceiling: self.inner.workspaces_dir.clone(),
        };
        let mut repo = match tokio::time::timeout(
            REPO_TIMEOUT,
            self.read(&git, &name, include_diffs),
        )
        .await
        {
            Ok(Ok(repo)) => repo,
            Ok(Err(e)) => {
                // Debug here (a dashboard polls); `refresh` warns once when
                // the error appears or changes.
                tracing::debug!(repo = %name, error = %e, "cannot read repository");
                self.broken(&name, &dir, e.to_string())
            }
            Err(_) => {
                tracing::debug!(repo = %name, timeout_s = REPO_TIMEOUT.as_secs(), "reading repository timed out");
                self.broken(
                    &name,
                    &dir,
                    format!(
                        "reading the repository took longer than {}s",
                        REPO_TIMEOUT.as_secs()
                    ),
                )
            }
        };
        repo.start_hooks_completed = (self.inner.hooks_completed)(&name);
        repo
    }

    fn broken(&self, name: &str, dir: &Path, error: String) -> Repo {
        Repo {
            name: name.to_owned(),
            path: dir.display().to_string(),
            branch: None,
            default_branch: self
                .inner
                .default_branch
                .clone()
                .unwrap_or_else(|| "main".into()),
            head_sha: None,
            remote_url: None,
            is_dirty: false,
            ahead: 0,
            behind: 0,
            pr_url: None,
            start_hooks_completed: false,
            git_diff: GitDiff::default(),
            error: Some(error),
        }
    }

    async fn read(&self, git: &Git, name: &str, include_diffs: bool) -> Result<Repo, GitError> {
        // Two worktree scans, run side by side: `git status` (branch, HEAD,
        // dirtiness, untracked files) and, after the cheap ref lookups that
        // find its base, `git diff`.
        let cap = self.inner.max_diff_bytes;
        let status_args = [
            "status",
            "--porcelain=v2",
            "--branch",
            "-z",
            "--untracked-files=all",
        ];
        let status = async {
            let out = git.run(&status_args).await?;
            git::parse_status_v2(&out).map_err(|detail| GitError::Parse {
                args: "status".into(),
                detail,
            })
        };
        let diff_side = async {
            let refs = self.refs(git).await?;
            let diff = self
                .diff_against_base(
                    git,
                    refs.base_ref.as_ref().map(|(r, _)| r.as_str()),
                    include_diffs,
                    cap,
                )
                .await?;
            Ok::<_, GitError>((refs, diff))
        };
        let (status, diff_side) = tokio::join!(status, diff_side);
        let status = status?;
        let (
            Refs {
                remote,
                default_branch,
                base_ref,
            },
            diff,
        ) = diff_side?;

        // Then ahead/behind (when there is no upstream) and the PR URL.
        let ahead_behind = async {
            if let Some(ab) = status.ahead_behind {
                return Ok::<_, GitError>(ab);
            }
            let (Some(head), Some((r, base_sha))) = (&status.head_sha, &base_ref) else {
                return Ok((0, 0));
            };
            // The counts depend only on the two commits: cached, so a
            // dashboard polling /repos costs no history walk.
            let key = (base_sha.clone(), head.clone());
            if let Some(ab) = self.inner.ab_cache.lock().ok().and_then(|c| {
                c.get(&git.repo)
                    .filter(|(k, _)| *k == key)
                    .map(|(_, ab)| *ab)
            }) {
                return Ok(ab);
            }
            let range = format!("{r}...HEAD");
            let out = git
                .try_run(&[
                    "rev-list",
                    "--left-right",
                    "--count",
                    "--end-of-options",
                    &range,
                ])
                .await?;
            let text = out
                .map(|o| String::from_utf8_lossy(&o).into_owned())
                .unwrap_or_default();
            let mut it = text
                .split_whitespace()
                .map(|n| n.parse::<u64>().unwrap_or(0));
            let behind = it.next().unwrap_or(0);
            let ab = (it.next().unwrap_or(0), behind);
            if let Ok(mut c) = self.inner.ab_cache.lock() {
                c.insert(git.repo.clone(), (key, ab));
            }
            Ok(ab)
        };
        let pr = self.pr_url(
            git,
            status.branch.as_deref(),
            status.head_sha.as_deref(),
            remote.is_some(),
        );
        let (ab, pr_url) = tokio::join!(ahead_behind, pr);
        let (ahead, behind) = ab?;

        let repo_dir = git.repo.clone();
        let untracked = status.untracked.clone();
        let git_diff =
            tokio::task::spawn_blocking(move || assemble_diff(&repo_dir, diff, &untracked, cap))
                .await
                .map_err(|e| GitError::Parse {
                    args: "diff".into(),
                    detail: e.to_string(),
                })?;

        Ok(Repo {
            name: name.to_owned(),
            path: git.repo.display().to_string(),
            branch: status.branch,
            default_branch,
            head_sha: status.head_sha,
            remote_url: remote.map(|(_, url)| url),
            is_dirty: status.dirty,
            ahead,
            behind,
            pr_url,
            start_hooks_completed: false,
            git_diff,
            error: None,
        })
    }

    /// The reported remote, the default branch (`REPLICAS_DEFAULT_BRANCH`,
    /// else the remote's HEAD, else `main`) and the ref the diff is based on
    /// (`<remote>/<default>` if it exists, else the local `<default>`),
    /// from two git calls run together.
    async fn refs(&self, git: &Git) -> Result<Refs, GitError> {
        let (config, refs) = tokio::join!(
            git.try_run(&["config", "-z", "--get-regexp", r"^remote\..*\.url$"]),
            git.try_run(&[
                "for-each-ref",
                "--format=%(refname) %(objectname) %(symref)",
                "refs/remotes",
                "refs/heads"
            ]),
        );
        // Strip credentials right away: the raw URL is never kept or logged.
        let remote = config?
            .as_deref()
            .and_then(git::pick_remote)
            .map(|(name, url)| (name, git::strip_credentials(&url)));
        let refs = String::from_utf8_lossy(&refs?.unwrap_or_default()).into_owned();
        // refname -> (commit, symref target or "")
        let refs: HashMap<&str, (&str, &str)> = refs
            .lines()
            .filter_map(|l| {
                let mut it = l.splitn(3, ' ');
                Some((it.next()?, (it.next()?, it.next().unwrap_or(""))))
            })
            .collect();
        let remote_name = remote.as_ref().map(|r| r.0.as_str());
        let default_branch = match &self.inner.default_branch {
            Some(b) => b.clone(),
            None => remote_name
                .and_then(|r| {
                    let (_, target) = refs.get(format!("refs/remotes/{r}/HEAD").as_str())?;
                    target
                        .strip_prefix(&format!("refs/remotes/{r}/"))
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| "main".into()),
        };
        let mut candidates = Vec::new();
        if let Some(r) = remote_name {
            candidates.push(format!("refs/remotes/{r}/{default_branch}"));
        }
        candidates.push(format!("refs/heads/{default_branch}"));
        let base_ref = candidates
            .into_iter()
            .find_map(|c| refs.get(c.as_str()).map(|(sha, _)| (sha.to_string(), c)))
            .map(|(sha, c)| (c, sha));
        Ok(Refs {
            remote,
            default_branch,
            base_ref,
        })
    }

    /// The working tree against the merge-base of HEAD and `base_ref`
    /// (`git diff --merge-base`); against HEAD when there is no base or no
    /// common ancestor; against the empty tree in a repository without
    /// commits. The fallbacks cost a process only in those rare cases.
    async fn diff_against_base(
        &self,
        git: &Git,
        base_ref: Option<&str>,
        include_diffs: bool,
        cap: usize,
    ) -> Result<git::TrackedDiff, GitError> {
        if let Some(r) = base_ref {
            if let Ok(d) = git.diff(true, r, include_diffs, cap).await {
                return Ok(d);
            }
        }
        match git.diff(false, "HEAD", include_diffs, cap).await {
            Ok(d) => Ok(d),
            Err(e) => match git
                .try_run(&["rev-parse", "-q", "--verify", "HEAD^{commit}"])
                .await?
            {
                Some(_) => Err(e),
                None => {
                    git.diff(false, empty_tree(git).await?.as_str(), include_diffs, cap)
                        .await
                }
            },
        }
    }

    /// `gh pr view --json url -- <branch>`, cached per (branch, HEAD); `None`
    /// when there is no branch or remote, or gh is missing or fails.
    async fn pr_url(
        &self,
        git: &Git,
        branch: Option<&str>,
        head: Option<&str>,
        has_remote: bool,
    ) -> Option<String> {
        let (Some(branch), Some(head), true) = (branch, head, has_remote) else {
            return None;
        };
        let slot = match self.inner.pr_cache.lock() {
            Ok(mut cache) => cache.entry(git.repo.clone()).or_default().clone(),
            Err(_) => return None,
        };
        let mut slot = slot.lock().await;
        if let Some((b, h, url)) = slot.as_ref() {
            if b == branch && h == head {
                return url.clone();
            }
        }
        let url = self.ask_gh(&git.repo, branch).await;
        *slot = Some((branch.to_owned(), head.to_owned(), url.clone()));
        url
    }

    async fn ask_gh(&self, dir: &Path, branch: &str) -> Option<String> {
        let mut cmd = crate::process::short_command(&self.inner.gh_bin);
        // The branch name is the repo's: after `--`, so a branch named
        // `--repo=evil/x` is a branch, not an option.
        cmd.args(["pr", "view", "--json", "url", "--", branch])
            .current_dir(dir)
            .env("GH_PROMPT_DISABLED", "1")
            .env("GH_NO_UPDATE_NOTIFIER", "1")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let out = match tokio::time::timeout(GH_TIMEOUT, cmd.output()).await {
            Ok(Ok(out)) if out.status.success() => out.stdout,
            Ok(Ok(out)) => {
                tracing::debug!(exit = ?out.status.code(), "gh pr view found no PR");
                return None;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "gh is not available");
                return None;
            }
            Err(_) => {
                tracing::warn!(timeout_s = GH_TIMEOUT.as_secs(), "gh pr view timed out");
                return None;
            }
        };
        let v: serde_json::Value = serde_json::from_slice(&out).ok()?;
        v.get("url")?
            .as_str()
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
    }
}

async fn empty_tree(git: &Git) -> Result<String, GitError> {
    // Not the well-known SHA-1 constant: a SHA-256 repository has another.
    let out = git.run(&["hash-object", "-t", "tree", "/dev/null"]).await?;
    Ok(String::from_utf8_lossy(&out).trim().to_owned())
}

/// Tracked changes plus untracked files, with totals and the capped patch.
fn assemble_diff(
    repo: &Path,
    tracked: git::TrackedDiff,
    untracked: &[String],
    cap: usize,
) -> GitDiff {
    let mut files = tracked.files;
    let mut truncated = tracked.truncated;
    let mut patch = tracked.patch;
    if let Some(p) = patch.as_mut() {
        p.truncate(cap);
    }
    for rel in untracked {
        let sink = patch.as_mut().map(|p| (p, cap, &mut truncated));
        files.push(untracked::untracked_change(repo, rel, sink));
    }
    let full_diff = patch.map(|p| {
        let mut s = String::from_utf8_lossy(&p).into_owned();
        if s.len() > cap {
            // Lossy decoding can grow the text; keep the cap a hard limit.
            let mut end = cap;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
        s
    });
    GitDiff {
        files_changed: files.len(),
        added: files.iter().map(|f| f.additions).sum(),
        removed: files.iter().map(|f| f.deletions).sum(),
        truncated: full_diff.as_ref().map(|_| truncated),
        full_diff,
        files,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh(dir: &Path, script: &str) {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "T")
            .env("GIT_AUTHOR_EMAIL", "t@e")
            .env("GIT_COMMITTER_NAME", "T")
            .env("GIT_COMMITTER_EMAIL", "t@e")
            .status()
            .unwrap()
            .success();
        assert!(ok, "{script}");
    }

    /// `refresh` discovers first, then publishes only real changes.
    #[tokio::test]
    async fn refresh_publishes_discovered_then_only_changes() {
        let home = tempfile::tempdir().unwrap();
        let config = Config::for_home(home.path(), "s");
        let ws = &config.workspaces_dir;
        std::fs::create_dir_all(ws.join("api")).unwrap();
        sh(
            &ws.join("api"),
            "git init -q -b main && echo a > a && git add a && git commit -qm init",
        );
        let bus = EventBus::open(&config.paths.events_file, 1 << 20).unwrap();
        let repos = RepoService::new(&config, bus.clone(), Arc::new(|_: &str| true));
        let types = |bus: &EventBus| -> Vec<String> {
            let text = std::fs::read_to_string(&config.paths.events_file).unwrap_or_default();
            let _ = bus;
            text.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .map(|v| v["type"].as_str().unwrap_or("").to_owned())
                .collect()
        };
        repos.refresh().await;
        assert_eq!(types(&bus), vec!["repo.discovered"]);
        repos.refresh().await;
        assert_eq!(
            types(&bus),
            vec!["repo.discovered"],
            "nothing changed, nothing published"
        );
        std::fs::write(ws.join("api/a"), "b\n").unwrap();
        repos.refresh().await;
        assert_eq!(types(&bus), vec!["repo.discovered", "repo.status.changed"]);
        assert_eq!(repos.count(), 1);
    }
}
