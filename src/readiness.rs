//! Readiness: `/health` answers 200 once the readiness file exists. It
//! flips once (cloud-init writes the file when the VM is set up), so the
//! answer is remembered as soon as the file is seen and `/health` then does
//! no filesystem work at all. While not ready, the file is looked at no more
//! than once per [`RECHECK`], however often `/health` is polled.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Least time between two looks at the readiness file while not ready.
pub const RECHECK: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub struct Readiness {
    file: PathBuf,
    ready: AtomicBool,
    /// Milliseconds after `epoch` of the next allowed look (0: look now).
    next_check_ms: AtomicU64,
    epoch: Instant,
}

impl Readiness {
    pub fn new(file: PathBuf) -> Self {
        Self {
            file,
            ready: AtomicBool::new(false),
            next_check_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Whether the engine is ready. A `stat` at most once per [`RECHECK`]
    /// while not ready (one caller wins the slot; the others answer with
    /// what is known), none once ready.
    pub fn is_ready(&self) -> bool {
        if self.ready.load(Ordering::Relaxed) {
            return true;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let next = self.next_check_ms.load(Ordering::Relaxed);
        if now < next
            || self
                .next_check_ms
                .compare_exchange(
                    next,
                    now + RECHECK.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return false;
        }
        // One `stat`, microseconds: not worth a trip to the blocking pool.
        if self.file.exists() {
            self.ready.store(true, Ordering::Relaxed);
            tracing::info!(file = %self.file.display(), "ready");
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flips_once_and_rechecks_at_most_every_250ms() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ready");
        let r = Readiness::new(file.clone());
        assert!(!r.is_ready());
        std::fs::write(&file, "").unwrap();
        // Within the recheck interval the earlier answer stands.
        assert!(!r.is_ready());
        std::thread::sleep(RECHECK + Duration::from_millis(20));
        assert!(r.is_ready());
        // Remembered: the file going away changes nothing.
        std::fs::remove_file(&file).unwrap();
        assert!(r.is_ready());
    }
}
