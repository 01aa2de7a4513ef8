//! Small shared helpers: wire timestamps, prefixed ids, atomic file writes,
//! private (0600/0700) state files.
//!
//! Every state file the engine writes is 0600 and every directory it creates
//! 0700: history, events and logs hold prompts, tool output and sometimes
//! credentials, and the VM may have other users.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use chrono::{DateTime, SecondsFormat, Utc};

/// A timestamp as the wire wants it: RFC 3339 UTC with milliseconds.
pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Now, formatted with [`ts`].
pub fn now_ts() -> String {
    let mut out = String::with_capacity(24);
    push_now_ts(&mut out);
    out
}

/// Append now, formatted with [`ts`], to `out`. The date and time up to the
/// second are formatted once a second per thread and the milliseconds by
/// hand (`/health` and every event carry one; chrono's formatter was a
/// tenth of a `/health` request).
pub fn push_now_ts(out: &mut String) {
    use std::cell::RefCell;
    thread_local! {
        /// The second last formatted and its text without the `Z`.
        static SECOND: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
    }
    let now = Utc::now();
    let secs = now.timestamp();
    // `Utc::now()` never lands on a leap second, but stay exact if it did.
    let millis = now.timestamp_subsec_millis();
    if millis >= 1000 {
        out.push_str(&ts(now));
        return;
    }
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            *text = now.to_rfc3339_opts(SecondsFormat::Secs, true);
            text.pop(); // the `Z`
            *second = secs;
        }
        out.push_str(text);
    });
    let digits = [
        b'.',
        b'0' + (millis / 100) as u8,
        b'0' + (millis / 10 % 10) as u8,
        b'0' + (millis % 10) as u8,
        b'Z',
    ];
    out.push_str(std::str::from_utf8(&digits).expect("ascii"));
}

/// A fresh random id with a type prefix, e.g. `c_3f2a…` for a chat.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Replace `path` atomically: write a temp file in the same directory, fsync
/// it, rename it over the target, fsync the directory. A reader (or a crash
/// at any instant) sees either the old content or the new, never a mix.
/// `mode` sets the permission bits of the new file (e.g. 0o600 for secrets)
/// before any content is written.
pub fn write_atomic(path: &Path, contents: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // Only directories created here become 0700; an existing parent (the
    // user's home for `.git-credentials`) is left as it is.
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    if let Some(mode) = mode {
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Create `dir` and any missing parents as 0700, and make `dir` itself 0700
/// (an older engine may have created it 0755). For the engine's own
/// directories only.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, Permissions::from_mode(0o700))
}

/// Open (creating it 0600) a state file for reading and appending; an
/// existing file is made 0600 too.
pub fn open_private_append(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(Permissions::from_mode(0o600))?;
    Ok(file)
}

/// Hand freed heap back to the kernel (glibc keeps it in its arenas
/// otherwise: after 1,000 SSE subscribers left, RSS stayed at the peak).
/// A no-op elsewhere.
#[allow(unsafe_code)]
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas; it takes no
    // pointers and is safe to call from any thread at any time.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Call [`trim_heap`] after a burst of work has ended: every
/// `every`, when `busy` (e.g. the number of SSE subscribers) went down
/// since the last look. Costs nothing while the load is steady.
pub async fn trim_heap_after_load(
    every: std::time::Duration,
    busy: impl Fn() -> usize,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut last = busy();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = busy();
        if now < last {
            tokio::task::spawn_blocking(trim_heap);
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ts_has_millis_and_z() {
        let t = DateTime::parse_from_rfc3339("2026-11-21T23:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(ts(t), "2026-11-21T23:00:00.123Z");
    }

    /// The cached fast path formats exactly as [`ts`] does.
    #[test]
    fn now_ts_agrees_with_ts() {
        for _ in 0..2000 {
            let before = Utc::now();
            let fast = now_ts();
            let after = Utc::now();
            let parsed = DateTime::parse_from_rfc3339(&fast)
                .unwrap()
                .with_timezone(&Utc);
            assert_eq!(ts(parsed), fast);
            assert!(ts(before) <= fast && fast <= ts(after), "{fast}");
        }
    }

    #[test]
    fn private_files_and_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        create_private_dir(&d).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        let f = d.join("log");
        std::fs::write(&f, "old").unwrap();
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        open_private_append(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        open_private_append(&d.join("new")).unwrap();
        assert_eq!(mode(&d.join("new")), 0o600);
    }

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/creds.json");
        write_atomic(&p, b"one", Some(0o600)).unwrap();
        write_atomic(&p, b"two", Some(0o600)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temp files left behind.
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
