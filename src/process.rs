//! All subprocess handling: every child the engine starts goes through
//! [`command`] (agent CLIs, hook commands) or [`short_command`] (git, gh),
//! which put it in its own process group and kill it if its handle is
//! dropped; [`command`] also ties its life to the engine's (parent-death
//! signal). [`stop_group`] ends a whole tree:
//! TERM to the group, a grace period, then KILL; "already gone" is success.
//!
//! Children get an allow-listed environment ([`child_env`]): the ambient
//! variables a shell, git, node and the agent CLIs need, never the engine's
//! own settings (`REPLICAS_*`, `MONOLITH_URL`: the secret is the key to the
//! API and the backend). Callers add their own explicit variables on top.
//!
//! Invariant: a caller reports a run as finished only after `wait()` on the
//! child returned, so "idle" never means "probably dead".

use std::ffi::{OsStr, OsString};
use std::process::ExitStatus;
use std::sync::RwLock;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// A command that runs in its own process group, dies with the engine and is
/// killed when its `Child` is dropped: for agents and hooks, which may run
/// for hours. Stdio is left for the caller to set.
///
/// Once the engine binary enabled it ([`use_spawn_shim`]), a program found
/// on the children's `PATH` starts through the spawn shim: the engine
/// `posix_spawn`s itself with [`SPAWN_SHIM_ARG`], and that fresh image sets
/// the parent-death signal and execs the program ([`run_spawn_shim`]); the
/// second exec costs about a millisecond at any engine size. Otherwise the
/// signal is set between `fork` and `exec` (`pre_exec`), and a `fork`
/// copies the page tables of the whole engine: its cost grows with the
/// engine's memory (10,000 chats made every turn's spawn 1.5x slower).
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let program = program.as_ref();
    let env = child_env();
    let shim = SHIM_ENABLED
        .load(std::sync::atomic::Ordering::Relaxed)
        .then(|| resolve_program(program, env_path(&env)))
        .flatten();
    let mut cmd = match &shim {
        Some(resolved) => {
            let mut cmd = Command::new(SELF_EXE);
            cmd.arg(SPAWN_SHIM_ARG)
                .arg(std::process::id().to_string())
                .arg(resolved);
            cmd
        }
        None => Command::new(program),
    };
    in_own_group(&mut cmd, env);
    if shim.is_none() {
        set_parent_death_signal(&mut cmd);
    }
    cmd
}

/// A [`command`] for a program that ends within seconds on its own (git,
/// gh): no parent-death signal, so it is a plain `posix_spawn` whatever
/// the engine's size; `kill_on_drop` still ends it with its caller, and if
/// the engine dies it finishes its short work alone.
pub fn short_command(program: impl AsRef<OsStr>) -> Command {
    let program = program.as_ref();
    let env = child_env();
    // A bare name with `PATH` in the environment makes std fork (it searches
    // `PATH` between fork and exec): search it here instead.
    let mut cmd = match resolve_program(program, env_path(&env)) {
        Some(resolved) => Command::new(resolved),
        None => Command::new(program),
    };
    in_own_group(&mut cmd, env);
    cmd
}

/// What every child gets: only `env`, its own process group, killed when
/// its handle is dropped.
fn in_own_group(cmd: &mut Command, env: Vec<(OsString, OsString)>) {
    cmd.env_clear()
        .envs(env)
        .process_group(0)
        .kill_on_drop(true);
}

fn env_path(env: &[(OsString, OsString)]) -> Option<&OsStr> {
    env.iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_os_str())
}

/// The engine's own image, even when its file was replaced or deleted.
const SELF_EXE: &str = "/proc/self/exe";

/// `argv[1]` that makes the engine binary act as the spawn shim:
/// `replicas-engine __replicas-spawn-shim <engine pid> <program> [args...]`.
pub const SPAWN_SHIM_ARG: &str = "__replicas-spawn-shim";

static SHIM_ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Start children through the spawn shim from now on. Only a binary whose
/// `main` begins with [`run_spawn_shim`] may call this (the engine does;
/// test harnesses linking the library do not, and fork instead).
/// Without `/proc` (the shim is `/proc/self/exe`) children keep forking,
/// and the engine says so once.
pub fn use_spawn_shim() {
    if std::fs::metadata(SELF_EXE).is_err() {
        tracing::warn!(
            path = SELF_EXE,
            "cannot see the engine's own binary; agent spawns fork (slower with many chats)"
        );
        return;
    }
    SHIM_ENABLED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// `program` as an executable file: itself when absolute, else the first
/// match on `path` (what `execvp` would run). `None` for anything else
/// (not found, relative with a slash): then [`command`] forks, and a
/// missing program fails `spawn` with `NotFound` as usual.
fn resolve_program(program: &OsStr, path: Option<&OsStr>) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let program_path = std::path::Path::new(program);
    if program_path.is_absolute() {
        return executable(program_path).then(|| program_path.to_path_buf());
    }
    if program.as_encoded_bytes().contains(&b'/') || program.is_empty() {
        return None;
    }
    std::env::split_paths(path?)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

/// The spawn shim's whole life, when `args` (the process's arguments,
/// `argv[0]` first) ask for it: set SIGKILL as the parent-death signal,
/// leave at once if the engine is already gone, exec the program. Returns
/// `None` for an ordinary command line; otherwise only if exec failed, with
/// the exit code (127, the shell's "cannot run").
pub fn run_spawn_shim(args: &[OsString]) -> Option<u8> {
    use std::os::unix::process::CommandExt;
    let [_, flag, parent, program, rest @ ..] = args else {
        return None;
    };
    if flag != SPAWN_SHIM_ARG {
        return None;
    }
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err()
        || parent.to_str().and_then(|p| p.parse::<i32>().ok())
            != Some(nix::unistd::getppid().as_raw())
    {
        // No signal would ever come: the engine died before it was set.
        return Some(127);
    }
    let err = std::process::Command::new(program).args(rest).exec();
    eprintln!(
        "replicas-engine: cannot run {}: {err}",
        program.to_string_lossy()
    );
    Some(127)
}

/// Ambient variables every child receives when the engine has them: what a
/// login shell, git, gh, node and the agent CLIs read. Documented in
/// `docs/API.md` ("Child processes"); keep the two in step.
pub const CHILD_ENV_NAMES: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TERM",
    "COLORTERM",
    "TMPDIR",
    "TZ",
    "EDITOR",
    "VISUAL",
    "SSH_AUTH_SOCK",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "GH_TOKEN",
    "GITHUB_TOKEN",
    "GH_HOST",
    "DISABLE_AUTOUPDATER",
    "DISABLE_TELEMETRY",
    "DISABLE_ERROR_REPORTING",
];

/// Prefixes of ambient variables children receive: locale, XDG dirs, the
/// agent CLIs' own settings and credentials, node/npm, AWS (Bedrock).
pub const CHILD_ENV_PREFIXES: &[&str] = &[
    "LC_",
    "XDG_",
    "ANTHROPIC_",
    "CLAUDE_",
    "OPENAI_",
    "CODEX_",
    "AWS_",
    "NODE_",
    "NPM_",
    "npm_config_",
];

/// Extra names (`NAME`, or `PREFIX*`) from `REPLICAS_CHILD_ENV`, set once at
/// boot by [`allow_child_env`].
static EXTRA_CHILD_ENV: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Pass these extra variables (`NAME` or `PREFIX*`) on to children as well.
/// Engine-only settings stay out whatever is listed.
pub fn allow_child_env(patterns: &[String]) {
    *EXTRA_CHILD_ENV.write().unwrap_or_else(|e| e.into_inner()) = patterns.to_vec();
}

/// Whether a variable is the engine's own and must never reach a child.
pub fn is_engine_only(name: &str) -> bool {
    name.starts_with("REPLICAS_") || name == "MONOLITH_URL"
}

fn child_may_see(name: &str, extra: &[String]) -> bool {
    if is_engine_only(name) {
        return false;
    }
    CHILD_ENV_NAMES.contains(&name)
        || CHILD_ENV_PREFIXES.iter().any(|p| name.starts_with(p))
        || extra.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == p,
        })
}

/// The engine's environment filtered down to what children may see.
pub fn child_env() -> Vec<(OsString, OsString)> {
    let extra = EXTRA_CHILD_ENV.read().unwrap_or_else(|e| e.into_inner());
    std::env::vars_os()
        .filter(|(k, _)| k.to_str().is_some_and(|k| child_may_see(k, &extra)))
        .collect()
}

/// Make the engine non-dumpable: no core dumps, and processes of the same
/// user (the agents) can neither `ptrace` it nor read its
/// `/proc/<pid>/environ` or memory, where the secret lives.
pub fn make_non_dumpable() -> std::io::Result<()> {
    nix::sys::prctl::set_dumpable(false).map_err(std::io::Error::from)
}

/// Ask the kernel to SIGKILL the child when the engine dies, so a `kill -9`
/// of the engine never leaves an agent running unsupervised.
///
/// The kernel delivers it when the *thread* that forked exits; tokio's worker
/// threads live as long as the runtime, which is the engine's lifetime.
#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut Command) {
    let parent = std::process::id() as i32;
    // SAFETY: the closure runs between fork and exec in the child and only
    // makes async-signal-safe syscalls (prctl, getppid, kill); it allocates
    // nothing and touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // The engine may have died between fork and prctl: then nobody
            // would ever deliver the signal, so leave now.
            if nix::unistd::getppid().as_raw() != parent {
                let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGKILL);
            }
            Ok(())
        });
    }
}

/// Send `signal` to the process group `pgid`. A group that no longer exists
/// is not an error.
pub fn signal_group(pgid: u32, signal: Signal) -> std::io::Result<()> {
    if pgid == 0 {
        return Ok(());
    }
    match killpg(Pid::from_raw(pgid as i32), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether any live (non-zombie) process is in group `pgid`. Zombies are
/// ignored: an orphan reaped late by init is dead for our purposes.
pub fn group_alive(pgid: u32) -> bool {
    if pgid == 0 || killpg(Pid::from_raw(pgid as i32), None).is_err() {
        return false;
    }
    match live_processes() {
        Some(procs) => procs.iter().any(|p| p.pgrp == pgid),
        None => true,
    }
}

/// One live process as `/proc` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    pub pgrp: u32,
}

/// Every live (non-zombie) process, from one pass over `/proc`; `None`
/// when `/proc` cannot be read. The one `/proc` directory reader.
pub fn live_processes() -> Option<Vec<ProcInfo>> {
    let dir = std::fs::read_dir("/proc").ok()?;
    Some(
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| {
                let (state, ppid, pgrp) = proc_stat(pid)?;
                is_live(state).then_some(ProcInfo { pid, ppid, pgrp })
            })
            .collect(),
    )
}

/// Live processes in group `pgid` or descended from `leader` (even when they
/// moved to a group of their own), except `leader` itself: what a
/// long-lived agent's tools left running.
pub fn members_and_descendants(pgid: u32, leader: u32) -> Vec<u32> {
    let Some(procs) = live_processes() else {
        return Vec::new();
    };
    let mut out: Vec<u32> = procs
        .iter()
        .filter(|p| p.pgrp == pgid && p.pid != leader)
        .map(|p| p.pid)
        .collect();
    let mut frontier = vec![leader];
    let mut seen = vec![leader];
    while let Some(parent) = frontier.pop() {
        for p in &procs {
            if p.ppid == parent && !seen.contains(&p.pid) {
                seen.push(p.pid);
                frontier.push(p.pid);
                out.push(p.pid);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Send `sig` to one process; "already gone" and pid 0/1 are ignored.
pub fn signal_pid(pid: u32, sig: Signal) {
    if pid > 1 {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), sig);
    }
}

/// `(state, ppid, pgrp)` of a process from `/proc/<pid>/stat`.
pub fn proc_stat(pid: u32) -> Option<(char, u32, u32)> {
    let stat = read_stat(pid)?;
    let mut rest = stat_after_comm(&stat)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgrp = rest.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}

/// `/proc/<pid>/stat`, the one file every process query here reads.
fn read_stat(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

/// The fields after the command name (field 2), which is in parentheses
/// and may itself contain spaces and parentheses.
fn stat_after_comm(stat: &str) -> Option<&str> {
    stat.get(stat.rfind(')')? + 2..)
}

fn is_live(state: char) -> bool {
    state != 'Z' && state != 'X'
}

/// Whether `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((state, _, _)) if is_live(state))
}

/// How long a KILLed process may take to actually be gone.
pub const KILL_SETTLE: Duration = Duration::from_secs(2);

/// Wait (at most [`KILL_SETTLE`]) until group `pgid` has no live member:
/// KILL is delivered asynchronously.
pub async fn settle_group(pgid: u32) {
    let deadline = tokio::time::Instant::now() + KILL_SETTLE;
    while group_alive(pgid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// End `child` and everything in its process group: TERM, wait up to
/// `grace`, then KILL. Returns once the leader's exit has been observed; any
/// member still alive after the leader exited gets KILL too (a grandchild
/// that ignored TERM must not outlive its turn).
pub async fn stop_group(child: &mut Child, grace: Duration) -> std::io::Result<ExitStatus> {
    let Some(pgid) = child.id() else {
        // Already reaped.
        return child.wait().await;
    };
    signal_group(pgid, Signal::SIGTERM)?;
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status?,
        Err(_) => {
            signal_group(pgid, Signal::SIGKILL)?;
            child.wait().await?
        }
    };
    kill_group_stragglers(pgid, grace).await;
    Ok(status)
}

/// After a group leader exited, give the rest of its group `grace` to leave
/// on their own, then KILL whatever remains and wait (briefly) until the
/// kernel has actually ended them, so callers can report "stopped" truthfully.
pub async fn kill_group_stragglers(pgid: u32, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    while group_alive(pgid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !group_alive(pgid) {
        return;
    }
    let _ = signal_group(pgid, Signal::SIGKILL);
    settle_group(pgid).await;
}

/// Start time of `pid` in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`). Recorded next to a pid so a later engine can tell
/// its stray process from an unrelated one that reused the number.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = read_stat(pid)?;
    stat_after_comm(&stat)?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Kill the process group a previous engine recorded as `(pgid, start_time)`
/// if that exact leader is still alive. Used on start for turns a dead
/// engine left running.
pub fn kill_recorded_group(pgid: u32, start_time: Option<u64>) -> bool {
    if pgid == 0 {
        return false;
    }
    let same = match (start_time, process_start_time(pgid)) {
        (Some(recorded), Some(now)) => recorded == now,
        // The leader is gone but members may linger; the group id cannot be
        // reused while any member lives, so the group is still ours.
        (_, None) => group_alive(pgid),
        (None, Some(_)) => false,
    };
    if same {
        let _ = signal_group(pgid, Signal::SIGKILL);
    }
    same
}

/// A child running as the leader of its own process group (started from a
/// [`command`]), with the leader's start time recorded for identity. The
/// one handle providers and hooks use to run, stop and reap a process tree.
///
/// Dropping a `Group` whose leader's exit was not observed KILLs the whole
/// group (`kill_on_drop` alone reaches only the leader); after the leader
/// exited normally its background children are left alone (a hook that
/// starts a service), unless the owner ends them with [`Group::reap_stragglers`].
pub struct Group {
    child: Child,
    pgid: u32,
    start_time: Option<u64>,
    exited: bool,
}

impl Group {
    /// Spawn `cmd` (built with [`command`]) as a new group.
    pub fn spawn(cmd: &mut Command) -> std::io::Result<Self> {
        let child = cmd.spawn()?;
        let pgid = child.id().unwrap_or(0);
        Ok(Self {
            child,
            pgid,
            start_time: process_start_time(pgid),
            exited: false,
        })
    }

    /// The process group id (the leader's pid).
    pub fn pgid(&self) -> u32 {
        self.pgid
    }

    /// Start time of the leader ([`process_start_time`]), for identity.
    pub fn start_time(&self) -> Option<u64> {
        self.start_time
    }

    /// The leader's pid while it has not been reaped.
    pub fn leader_pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The leader's `Child`, to take its pipes.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Whether the leader is still running (reaps it if it exited).
    ///
    /// A leader that cannot be reaped yet is not necessarily running: when
    /// a multi-threaded process (node, python) is killed, its main thread
    /// turns zombie at once but `waitpid` waits for the last thread to
    /// finish exiting, while its pipes are still open. Such a leader is
    /// dying, as [`group_alive`] already says; reusing it would hand a turn
    /// to a process that then ends by the signal.
    pub fn is_running(&mut self) -> bool {
        match self.child.try_wait() {
            Ok(None) => self.child.id().is_some_and(pid_alive),
            Ok(Some(_)) | Err(_) => {
                self.exited = true;
                false
            }
        }
    }

    /// Wait for the leader to exit on its own.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.child.wait().await;
        self.exited = true;
        status
    }

    /// End the whole group: TERM, `grace`, KILL; stragglers too. Returns
    /// once the leader's exit was observed and no member is left. Failure
    /// is logged, not returned: there is nothing more a caller could do.
    pub async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let status = match stop_group(&mut self.child, grace).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(pgid = self.pgid, error = %e, "stopping a process group failed");
                None
            }
        };
        self.exited = true;
        settle_group(self.pgid).await;
        status
    }

    /// Give the leader `grace` to exit on its own, then [`Group::stop`].
    pub async fn wait_or_stop(
        &mut self,
        grace: Duration,
        kill_grace: Duration,
    ) -> Option<ExitStatus> {
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.exited = true;
                Some(status)
            }
            _ => self.stop(kill_grace).await,
        }
    }

    /// After the leader exited: [`kill_group_stragglers`], then wait until
    /// the group is really empty.
    pub async fn reap_stragglers(&self, grace: Duration) {
        kill_group_stragglers(self.pgid, grace).await;
        settle_group(self.pgid).await;
    }

    /// End everything the leader started (members of its group and its
    /// descendants elsewhere), but not the leader: TERM, `grace`, KILL,
    /// then wait until they are gone. For a long-lived agent whose turn was
    /// interrupted: the agent stays, its tools do not.
    pub async fn end_members(&self, grace: Duration) {
        let leader = self.child.id().unwrap_or(self.pgid);
        let targets = members_and_descendants(self.pgid, leader);
        if targets.is_empty() {
            return;
        }
        tracing::info!(
            pgid = self.pgid,
            count = targets.len(),
            "ending processes left by an interrupted turn"
        );
        for &pid in &targets {
            signal_pid(pid, Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline && targets.iter().any(|&p| pid_alive(p)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Anything they spawned meanwhile is in the same set by construction.
        let targets: Vec<u32> = targets
            .into_iter()
            .chain(members_and_descendants(self.pgid, leader))
            .collect();
        for &pid in &targets {
            signal_pid(pid, Signal::SIGKILL);
        }
        let deadline = tokio::time::Instant::now() + KILL_SETTLE;
        while tokio::time::Instant::now() < deadline && targets.iter().any(|&p| pid_alive(p)) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// KILL the whole group now, without waiting (for `Drop` paths).
    pub fn kill_now(&mut self) {
        let _ = signal_group(self.pgid, Signal::SIGKILL);
        self.exited = true;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.exited {
            let _ = signal_group(self.pgid, Signal::SIGKILL);
        }
    }
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("pgid", &self.pgid).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[tokio::test]
    async fn stop_group_kills_grandchildren() {
        // The shell backgrounds a sleeper that ignores TERM, then waits.
        let mut cmd = command("sh");
        cmd.arg("-c")
            .arg("trap '' TERM; sleep 30 & echo $!; wait")
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let pgid = child.id().unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut buf = [0u8; 32];
        let n = tokio::io::AsyncReadExt::read(&mut out, &mut buf)
            .await
            .unwrap();
        let grandchild: i32 = std::str::from_utf8(&buf[..n])
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(group_alive(pgid));
        stop_group(&mut child, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(!group_alive(pgid));
        assert!(!pid_alive(grandchild as u32));
    }

    #[tokio::test]
    async fn a_dropped_group_is_killed_whole_but_an_exited_one_keeps_its_children() {
        let mut cmd = command("sh");
        cmd.arg("-c").arg("sleep 30 & wait");
        let g = Group::spawn(&mut cmd).unwrap();
        let pgid = g.pgid();
        assert!(g.start_time().is_some());
        assert!(group_alive(pgid));
        drop(g);
        settle_group(pgid).await;
        assert!(!group_alive(pgid));

        let mut cmd = command("sh");
        cmd.arg("-c").arg("sleep 30 & exit 0");
        let mut g = Group::spawn(&mut cmd).unwrap();
        let pgid = g.pgid();
        assert!(g.wait().await.unwrap().success());
        drop(g);
        assert!(
            group_alive(pgid),
            "a normally exited leader keeps its background child"
        );
        let _ = signal_group(pgid, Signal::SIGKILL);
        settle_group(pgid).await;
    }

    #[tokio::test]
    async fn a_leader_whose_main_thread_is_gone_is_not_running() {
        // What a killed multi-threaded CLI looks like for a moment: the main
        // thread is a zombie, another thread still exists, `waitpid` cannot
        // reap it yet. Here the main thread leaves on its own (deterministic).
        let mut cmd = command("python3");
        cmd.arg("-c").arg(
            "import ctypes, threading, time\n\
             threading.Thread(target=lambda: time.sleep(30), daemon=True).start()\n\
             ctypes.CDLL(None).pthread_exit(None)",
        );
        let mut g = Group::spawn(&mut cmd).unwrap();
        let pgid = g.pgid();
        for _ in 0..500 {
            if !pid_alive(pgid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!pid_alive(pgid), "the main thread did not exit");
        assert!(
            g.child_mut().try_wait().unwrap().is_none(),
            "not reapable yet"
        );
        assert!(!g.is_running());
        g.stop(Duration::from_millis(200)).await;
        assert!(!group_alive(pgid));
    }

    #[tokio::test]
    async fn end_members_spares_the_leader() {
        let mut cmd = command("sh");
        cmd.arg("-c").arg("sleep 30 & sleep 30 & wait");
        let mut g = Group::spawn(&mut cmd).unwrap();
        let leader = g.leader_pid().unwrap();
        // Wait until both sleepers exist.
        for _ in 0..200 {
            if members_and_descendants(g.pgid(), leader).len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(members_and_descendants(g.pgid(), leader).len(), 2);
        g.end_members(Duration::from_millis(200)).await;
        assert!(members_and_descendants(g.pgid(), leader).is_empty());
        // The shell's `wait` returns once its children are gone.
        let _ = g.wait().await;
        assert!(!group_alive(g.pgid()));
    }

    #[test]
    fn engine_settings_never_pass_even_when_listed() {
        let extra = vec![
            "REPLICAS_*".to_owned(),
            "MONOLITH_URL".to_owned(),
            "FAKE_*".to_owned(),
            "EXACT".to_owned(),
        ];
        for name in [
            "REPLICAS_ENGINE_SECRET",
            "REPLICAS_WORKSPACES_DIR",
            "MONOLITH_URL",
        ] {
            assert!(!child_may_see(name, &extra), "{name}");
        }
        for name in [
            "PATH",
            "HOME",
            "LC_ALL",
            "ANTHROPIC_BASE_URL",
            "CODEX_HOME",
            "FAKE_X",
            "EXACT",
        ] {
            assert!(child_may_see(name, &extra), "{name}");
        }
        for name in ["WORKSPACE_ID", "EXACTLY", "RANDOM_SETTING", "LD_PRELOAD"] {
            assert!(!child_may_see(name, &extra), "{name}");
        }
    }

    #[tokio::test]
    async fn children_see_only_the_allow_list() {
        let out = command("env").env("EXPLICIT", "1").output().await.unwrap();
        let env = String::from_utf8(out.stdout).unwrap();
        let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
        assert!(names.contains(&"EXPLICIT"), "{env}");
        assert!(names.contains(&"PATH"), "{env}");
        for n in &names {
            assert!(child_may_see(n, &[]) || *n == "EXPLICIT", "{n} leaked");
        }
    }

    #[test]
    fn programs_resolve_as_execvp_would() {
        let path = std::env::var_os("PATH");
        let sh = resolve_program(OsStr::new("sh"), path.as_deref()).unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{sh:?}");
        assert_eq!(resolve_program(sh.as_os_str(), None), Some(sh.clone()));
        for nothing in ["no-such-program-here", "./sh", "bin/sh", ""] {
            assert_eq!(resolve_program(OsStr::new(nothing), path.as_deref()), None);
        }
        // A file that is not executable is not a program.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data"), "x").unwrap();
        assert_eq!(
            resolve_program(OsStr::new("data"), Some(dir.path().as_os_str())),
            None
        );
    }

    #[test]
    fn only_the_shim_argument_makes_a_shim() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(run_spawn_shim(&args(&["replicas-engine"])), None);
        assert_eq!(run_spawn_shim(&args(&["e", "serve", "1", "x"])), None);
        // The engine (pid 1 here) is not our parent: exit, never exec.
        assert_eq!(
            run_spawn_shim(&args(&["e", SPAWN_SHIM_ARG, "1", "/bin/true"])),
            Some(127)
        );
    }

    #[tokio::test]
    async fn a_short_command_runs_a_program_found_on_path() {
        let out = short_command("sh")
            .args(["-c", "echo $0"])
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
        let missing = short_command("no-such-program-here").spawn();
        assert_eq!(missing.unwrap_err().kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn the_engine_can_make_itself_non_dumpable() {
        // Process-wide; harmless for the test binary.
        make_non_dumpable().unwrap();
        assert!(!nix::sys::prctl::get_dumpable().unwrap());
    }

    #[test]
    fn start_time_of_self_is_known() {
        assert!(process_start_time(std::process::id()).is_some());
        assert!(process_start_time(u32::MAX).is_none());
    }
}
