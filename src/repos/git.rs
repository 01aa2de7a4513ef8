//! Running git for the repo reader, and the pure parsers of its output.
//!
//! Every call goes through [`Git::run`]: `--no-optional-locks` (never take
//! the index lock from an agent working in the same repo), no prompts,
//! `GIT_CEILING_DIRECTORIES` at the workspace root (a folder that merely
//! *looks* like a repo must not be read as the workspace's parent repo), in
//! its own process group via [`crate::process::short_command`].

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// A git command that could not run or exited non-zero.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot run git ({bin}): {source}")]
    Spawn { bin: String, source: std::io::Error },
    #[error("git {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("unexpected output from git {args}: {detail}")]
    Parse { args: String, detail: String },
}

/// How to run git in one repository.
#[derive(Debug, Clone)]
pub struct Git {
    pub bin: PathBuf,
    pub repo: PathBuf,
    pub ceiling: PathBuf,
}

impl Git {
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = crate::process::short_command(&self.bin);
        cmd.arg("-C")
            .arg(&self.repo)
            .args([
                "--no-optional-locks",
                "-c",
                "core.quotePath=false",
                "-c",
                "color.ui=false",
            ])
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CEILING_DIRECTORIES", &self.ceiling)
            .env("GIT_PAGER", "cat")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn spawn_error(&self, source: std::io::Error) -> GitError {
        GitError::Spawn {
            bin: self.bin.display().to_string(),
            source,
        }
    }

    /// Run and return stdout; a non-zero exit is an error carrying stderr.
    pub async fn run(&self, args: &[&str]) -> Result<Vec<u8>, GitError> {
        let out = self
            .command(args)
            .output()
            .await
            .map_err(|e| self.spawn_error(e))?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(GitError::Failed {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .chars()
                    .take(500)
                    .collect(),
            })
        }
    }

    /// Run; `Ok(None)` when git exits non-zero (a ref that does not exist,
    /// an unset config key), errors only when git cannot run at all.
    pub async fn try_run(&self, args: &[&str]) -> Result<Option<Vec<u8>>, GitError> {
        let out = self
            .command(args)
            .output()
            .await
            .map_err(|e| self.spawn_error(e))?;
        Ok(out.status.success().then_some(out.stdout))
    }

    /// `git diff --raw --numstat -z [-p] [--merge-base] --end-of-options <base> --`: per-file stats of the
    /// working tree against `base`, and with `patch` the unified diff, kept
    /// up to `cap` bytes (the rest is not read: git is killed on drop).
    pub async fn diff(
        &self,
        merge_base: bool,
        base: &str,
        patch: bool,
        cap: usize,
    ) -> Result<TrackedDiff, GitError> {
        let mut args = vec![
            "diff",
            "--no-ext-diff",
            "--no-textconv",
            "--raw",
            "--numstat",
            "-z",
        ];
        if patch {
            args.push("-p");
        }
        // Revisions come from refs a repo controls: `--end-of-options` keeps
        // one named like an option from being read as one (`--` would make
        // them paths).
        if merge_base {
            args.push("--merge-base");
        }
        args.extend(["--end-of-options", base, "--"]);
        let mut child = self
            .command(&args)
            .spawn()
            .map_err(|e| self.spawn_error(e))?;
        let Some(stdout) = child.stdout.take() else {
            return Err(self.spawn_error(std::io::Error::other("no stdout")));
        };
        let mut stderr = child.stderr.take();
        let stderr_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            if let Some(s) = stderr.as_mut() {
                let _ = s.take(64 * 1024).read_to_end(&mut buf).await;
            }
            buf
        });
        let mut reader = BufReader::with_capacity(64 * 1024, stdout);
        let io = |e: std::io::Error| GitError::Parse {
            args: args.join(" "),
            detail: e.to_string(),
        };
        let mut tokens: Vec<Vec<u8>> = Vec::new();
        let mut in_patch = false;
        loop {
            let mut tok = Vec::new();
            let n = reader.read_until(0, &mut tok).await.map_err(io)?;
            if n == 0 {
                break;
            }
            if tok.last() == Some(&0) {
                tok.pop();
            }
            if tok.is_empty() {
                // The empty record separates the stats from the patch.
                in_patch = true;
                break;
            }
            tokens.push(tok);
        }
        let mut full = Vec::new();
        let mut truncated = false;
        if in_patch {
            let mut limited = (&mut reader).take(cap as u64 + 1);
            limited.read_to_end(&mut full).await.map_err(io)?;
            if full.len() > cap {
                truncated = true;
                // Stop git now instead of reading megabytes we will not send.
                let _ = child.start_kill();
            }
        }
        let status = child.wait().await.map_err(|e| self.spawn_error(e))?;
        let stderr = stderr_task.await.unwrap_or_default();
        if !status.success() && !truncated {
            return Err(GitError::Failed {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&stderr)
                    .trim()
                    .chars()
                    .take(500)
                    .collect(),
            });
        }
        let files = parse_raw_numstat(&tokens).map_err(|detail| GitError::Parse {
            args: args.join(" "),
            detail,
        })?;
        Ok(TrackedDiff {
            files,
            patch: patch.then_some(full),
            truncated,
        })
    }
}

/// One changed file as the contract reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[schema(as = DiffFile)]
pub struct FileChange {
    pub path: String,
    /// `modified`, `added`, `deleted`, `renamed` or `untracked`.
    #[schema(value_type = String)]
    pub status: &'static str,
    pub additions: u64,
    pub deletions: u64,
}

#[derive(Debug, Default)]
pub struct TrackedDiff {
    pub files: Vec<FileChange>,
    /// The raw unified diff (at most cap bytes + 1) when asked for.
    pub patch: Option<Vec<u8>>,
    pub truncated: bool,
}

/// Parse the NUL-separated records of `--raw --numstat -z`: all raw
/// entries (`:modes shas STATUS`, then one path, two for renames/copies),
/// then the numstat entries in the same order (`adds\tdels\tpath`, or
/// `adds\tdels\t` followed by two paths for a rename).
pub fn parse_raw_numstat(tokens: &[Vec<u8>]) -> Result<Vec<FileChange>, String> {
    let text = |t: &[u8]| String::from_utf8_lossy(t).into_owned();
    let mut raw: Vec<(&'static str, String)> = Vec::new();
    let mut i = 0;
    while i < tokens.len() && tokens[i].first() == Some(&b':') {
        let header = text(&tokens[i]);
        let letter = header
            .split_whitespace()
            .nth(4)
            .and_then(|s| s.chars().next())
            .ok_or(format!("raw record without a status: {header:?}"))?;
        let (status, paths) = match letter {
            'A' | 'C' => ("added", if letter == 'C' { 2 } else { 1 }),
            'D' => ("deleted", 1),
            'R' => ("renamed", 2),
            _ => ("modified", 1),
        };
        let path = tokens.get(i + paths).ok_or("raw record without a path")?;
        raw.push((status, text(path)));
        i += 1 + paths;
    }
    let mut files = Vec::with_capacity(raw.len());
    while i < tokens.len() {
        let rec = text(&tokens[i]);
        let mut parts = rec.splitn(3, '\t');
        let (Some(a), Some(d), Some(p)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("numstat record {rec:?}"));
        };
        let num = |s: &str| {
            if s == "-" {
                Ok(0)
            } else {
                s.parse::<u64>().map_err(|_| format!("count {s:?}"))
            }
        };
        let (additions, deletions) = (num(a)?, num(d)?);
        let path = if p.is_empty() {
            // Rename: source and destination follow as their own records.
            let dst = tokens.get(i + 2).ok_or("rename without a destination")?;
            i += 3;
            text(dst)
        } else {
            i += 1;
            p.to_owned()
        };
        let status = raw
            .get(files.len())
            .filter(|(_, rp)| *rp == path)
            .or_else(|| raw.iter().find(|(_, rp)| *rp == path))
            .map(|(s, _)| *s)
            .unwrap_or("modified");
        files.push(FileChange {
            path,
            status,
            additions,
            deletions,
        });
    }
    Ok(files)
}

/// What `git status --porcelain=v2 --branch -z --untracked-files=all` says.
#[derive(Debug, Default, PartialEq)]
pub struct StatusV2 {
    /// `None` for a repository without commits.
    pub head_sha: Option<String>,
    /// `None` for a detached HEAD.
    pub branch: Option<String>,
    pub upstream: Option<String>,
    pub ahead_behind: Option<(u64, u64)>,
    /// Any tracked change (staged or not) or untracked file.
    pub dirty: bool,
    /// Untracked paths (directories end in `/`, e.g. a nested repository).
    pub untracked: Vec<String>,
}

pub fn parse_status_v2(out: &[u8]) -> Result<StatusV2, String> {
    let mut s = StatusV2::default();
    let mut records = out.split(|b| *b == 0).filter(|r| !r.is_empty());
    while let Some(rec) = records.next() {
        let rec = String::from_utf8_lossy(rec);
        if let Some(h) = rec.strip_prefix("# ") {
            let (key, value) = h.split_once(' ').unwrap_or((h, ""));
            match key {
                "branch.oid" if value != "(initial)" => s.head_sha = Some(value.to_owned()),
                "branch.head" if value != "(detached)" => s.branch = Some(value.to_owned()),
                "branch.upstream" => s.upstream = Some(value.to_owned()),
                "branch.ab" => {
                    let mut it = value.split_whitespace();
                    let a = it
                        .next()
                        .and_then(|v| v.trim_start_matches('+').parse().ok());
                    let b = it
                        .next()
                        .and_then(|v| v.trim_start_matches('-').parse().ok());
                    if let (Some(a), Some(b)) = (a, b) {
                        s.ahead_behind = Some((a, b));
                    }
                }
                _ => {}
            }
            continue;
        }
        match rec.as_bytes().first() {
            Some(b'1') | Some(b'u') => s.dirty = true,
            Some(b'2') => {
                s.dirty = true;
                // A rename record is followed by the original path.
                records.next();
            }
            Some(b'?') => {
                s.dirty = true;
                s.untracked.push(rec[2..].to_owned());
            }
            Some(b'!') => {}
            _ => return Err(format!("status record {rec:?}")),
        }
    }
    Ok(s)
}

/// Remove credentials from a remote URL before it leaves the engine:
/// `https://x-access-token:TOKEN@github.com/a/b.git` → `https://github.com/a/b.git`.
/// scp-like addresses (`git@github.com:a/b.git`) carry a user name, not a
/// secret, and are returned unchanged; so are local paths.
pub fn strip_credentials(remote: &str) -> String {
    let remote = remote.trim();
    let Some(scheme_end) = remote.find("://") else {
        return remote.to_owned();
    };
    if let Ok(mut url) = url::Url::parse(remote) {
        if !url.username().is_empty() || url.password().is_some() {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            return url.to_string();
        }
        return remote.to_owned();
    }
    // Not a URL the parser accepts: cut anything up to the last '@' of the
    // authority by hand.
    let rest = &remote[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}{}", &remote[..scheme_end + 3], &rest[at + 1..]),
        None => remote.to_owned(),
    }
}

/// The remote to report: `origin` when present, else the first one.
/// Input: `git config -z --get-regexp ^remote\..*\.url$` output.
pub fn pick_remote(config_out: &[u8]) -> Option<(String, String)> {
    let mut remotes: Vec<(String, String)> = config_out
        .split(|b| *b == 0)
        .filter(|r| !r.is_empty())
        .filter_map(|r| {
            let r = String::from_utf8_lossy(r);
            let (key, url) = r.split_once('\n')?;
            let name = key.strip_prefix("remote.")?.strip_suffix(".url")?;
            Some((name.to_owned(), url.to_owned()))
        })
        .collect();
    if let Some(i) = remotes.iter().position(|(n, _)| n == "origin") {
        return Some(remotes.swap_remove(i));
    }
    remotes.into_iter().next()
}

/// Whether `dir` looks like a git repository (has a `.git` dir or file).
pub fn looks_like_repo(dir: &Path) -> bool {
    dir.join(".git").symlink_metadata().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_tokens_but_keeps_scp_and_paths() {
        assert_eq!(
            strip_credentials("https://x-access-token:ghs_SECRET@github.com/acme/api.git"),
            "https://github.com/acme/api.git"
        );
        assert_eq!(
            strip_credentials("https://tok@github.com/a/b"),
            "https://github.com/a/b"
        );
        assert_eq!(
            strip_credentials("git@github.com:acme/api.git"),
            "git@github.com:acme/api.git"
        );
        assert_eq!(strip_credentials("/srv/git/api.git"), "/srv/git/api.git");
        assert_eq!(
            strip_credentials("https://github.com/a/b.git"),
            "https://github.com/a/b.git"
        );
        assert_eq!(
            strip_credentials("ssh://git@host:22/a/b.git"),
            "ssh://host:22/a/b.git"
        );
        assert!(!strip_credentials("weird://u:p@ss@host/x").contains("ss@"));
    }

    #[test]
    fn parses_status_headers_and_entries() {
        let out = b"# branch.oid abc\0# branch.head feat/x\0# branch.upstream origin/feat/x\0# branch.ab +2 -1\0\
1 .M N... 100644 100644 100644 a a f.txt\0\
2 R. N... 100644 100644 100644 a a R100 new\0old\0? u.txt\0? nested/\0";
        let s = parse_status_v2(out).unwrap();
        assert_eq!(s.head_sha.as_deref(), Some("abc"));
        assert_eq!(s.branch.as_deref(), Some("feat/x"));
        assert_eq!(s.ahead_behind, Some((2, 1)));
        assert!(s.dirty);
        assert_eq!(s.untracked, vec!["u.txt", "nested/"]);

        let s = parse_status_v2(b"# branch.oid (initial)\0# branch.head main\0").unwrap();
        assert_eq!(
            (s.head_sha, s.branch.as_deref(), s.dirty),
            (None, Some("main"), false)
        );
        let s = parse_status_v2(b"# branch.oid abc\0# branch.head (detached)\0").unwrap();
        assert_eq!(s.branch, None);
    }

    #[test]
    fn parses_raw_and_numstat_with_renames_and_binaries() {
        let toks: Vec<Vec<u8>> = [
            ":100644 100644 1 0 M",
            "a",
            ":000000 100644 0 0 A",
            "bin",
            ":100644 100644 6 6 R100",
            "b",
            "c",
            "1\t0\ta",
            "-\t-\tbin",
            "0\t0\t",
            "b",
            "c",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        let f = parse_raw_numstat(&toks).unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!(
            (f[0].path.as_str(), f[0].status, f[0].additions),
            ("a", "modified", 1)
        );
        assert_eq!(
            (f[1].path.as_str(), f[1].status, f[1].additions),
            ("bin", "added", 0)
        );
        assert_eq!((f[2].path.as_str(), f[2].status), ("c", "renamed"));
    }

    #[test]
    fn picks_origin_first() {
        let out = b"remote.up.url\n/x\0remote.origin.url\nhttps://t@h/a\0";
        assert_eq!(
            pick_remote(out),
            Some(("origin".into(), "https://t@h/a".into()))
        );
        assert_eq!(pick_remote(b""), None);
    }
}
