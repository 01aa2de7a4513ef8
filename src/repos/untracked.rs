//! Untracked files in diffs: git's own diff ignores them, the contract
//! counts them. Their stats and "new file" patches are produced here from
//! the files themselves (one read each) instead of one `git diff --no-index`
//! process per file; the output has the shape `git diff` would give.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::git::FileChange;

/// Files larger than this are reported with their line count but no patch
/// content (a 1 GB log file must not be read into memory).
const MAX_PATCH_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// git's heuristic: a NUL in the first 8000 bytes means binary.
const BINARY_SNIFF: usize = 8000;

/// Stats for one untracked path, and, if `patch` is given, its "new file"
/// diff appended while `patch` stays within `cap` bytes (`truncated` is set
/// when it would not).
pub fn untracked_change(
    repo: &Path,
    rel: &str,
    patch: Option<(&mut Vec<u8>, usize, &mut bool)>,
) -> FileChange {
    let path = repo.join(rel);
    let mut change = FileChange {
        path: rel.trim_end_matches('/').to_owned(),
        status: "untracked",
        additions: 0,
        deletions: 0,
    };
    // A trailing slash is a nested repository: listed, nothing to count.
    if rel.ends_with('/') {
        return change;
    }
    let Ok(meta) = path.symlink_metadata() else {
        // Vanished between `git status` and now: count nothing.
        return change;
    };
    let (content, mode, binary) = if meta.file_type().is_symlink() {
        let target = std::fs::read_link(&path)
            .map(|t| t.into_os_string().into_encoded_bytes())
            .unwrap_or_default();
        (Some(target), "120000", false)
    } else if meta.is_file() {
        let mode = if meta.permissions().mode() & 0o111 != 0 {
            "100755"
        } else {
            "100644"
        };
        if meta.len() > MAX_PATCH_FILE_BYTES || patch.is_none() {
            let (lines, binary) = count_lines(&path);
            change.additions = if binary { 0 } else { lines };
            if let Some((out, cap, truncated)) = patch {
                let body = if binary {
                    format!("Binary files /dev/null and b/{rel} differ\n")
                } else {
                    format!("@@ -0,0 +1,{lines} @@\n+[{} bytes not shown]\n", meta.len())
                };
                push_capped(out, header(rel, mode).as_bytes(), cap, truncated);
                push_capped(out, body.as_bytes(), cap, truncated);
            }
            return change;
        }
        match std::fs::read(&path) {
            Ok(bytes) => {
                let binary = memchr::memchr(0, &bytes[..bytes.len().min(BINARY_SNIFF)]).is_some();
                (Some(bytes), mode, binary)
            }
            Err(_) => return change,
        }
    } else {
        return change;
    };
    let content = content.unwrap_or_default();
    let lines = line_count(&content);
    change.additions = if binary { 0 } else { lines };
    if let Some((out, cap, truncated)) = patch {
        let mut p = header(rel, mode).into_bytes();
        if binary {
            p.extend_from_slice(format!("Binary files /dev/null and b/{rel} differ\n").as_bytes());
        } else if !content.is_empty() {
            p.extend_from_slice(
                format!(
                    "--- /dev/null\n+++ b/{rel}\n@@ -0,0 +1{} @@\n",
                    range_len(lines)
                )
                .as_bytes(),
            );
            for line in content.split_inclusive(|b| *b == b'\n') {
                p.push(b'+');
                p.extend_from_slice(line);
            }
            if content.last() != Some(&b'\n') {
                p.extend_from_slice(b"\n\\ No newline at end of file\n");
            }
        }
        push_capped(out, &p, cap, truncated);
    }
    change
}

fn header(rel: &str, mode: &str) -> String {
    format!("diff --git a/{rel} b/{rel}\nnew file mode {mode}\nindex 0000000..0000000\n")
}

fn range_len(lines: u64) -> String {
    if lines == 1 {
        String::new()
    } else {
        format!(",{lines}")
    }
}

fn line_count(content: &[u8]) -> u64 {
    let n = memchr::memchr_iter(b'\n', content).count() as u64;
    if content.last().is_some_and(|b| *b != b'\n') {
        n + 1
    } else {
        n
    }
}

/// Count lines of a file by streaming it; also says whether it looks binary.
fn count_lines(path: &Path) -> (u64, bool) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return (0, false);
    };
    let mut buf = vec![0u8; 64 * 1024];
    let (mut lines, mut first, mut last, mut binary) = (0u64, true, b'\n', false);
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if first {
            binary = memchr::memchr(0, &buf[..n.min(BINARY_SNIFF)]).is_some();
            first = false;
        }
        lines += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
        last = buf[n - 1];
    }
    if last != b'\n' {
        lines += 1;
    }
    (lines, binary)
}

/// Append `bytes` unless that would pass `cap`; then fill up to the cap and
/// mark the diff truncated.
pub fn push_capped(out: &mut Vec<u8>, bytes: &[u8], cap: usize, truncated: &mut bool) {
    if *truncated {
        return;
    }
    let room = cap.saturating_sub(out.len());
    if bytes.len() <= room {
        out.extend_from_slice(bytes);
    } else {
        out.extend_from_slice(&bytes[..room]);
        *truncated = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_file_patch_looks_like_git() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("n.txt"), "a\nb").unwrap();
        let mut out = Vec::new();
        let mut truncated = false;
        let c = untracked_change(
            dir.path(),
            "n.txt",
            Some((&mut out, 1 << 20, &mut truncated)),
        );
        assert_eq!((c.additions, c.status), (2, "untracked"));
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("+++ b/n.txt\n@@ -0,0 +1,2 @@\n+a\n+b\n\\ No newline at end of file\n"),
            "{text}"
        );
        assert!(!truncated);
    }

    #[test]
    fn binary_and_cap() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b"), b"x\0y\n").unwrap();
        let c = untracked_change(dir.path(), "b", None);
        assert_eq!(c.additions, 0);
        let mut out = Vec::new();
        let mut t = false;
        push_capped(&mut out, b"12345", 3, &mut t);
        assert_eq!((out.as_slice(), t), (&b"123"[..], true));
        assert_eq!(line_count(b""), 0);
        assert_eq!(line_count(b"a\n"), 1);
    }
}
