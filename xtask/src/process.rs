//! Child processes that never outlive xtask.
//!
//! Every child starts in a process group of its own and is listed here until it is
//! reaped. Ctrl-C, SIGTERM and SIGHUP reach xtask alone (the children are not in the
//! terminal's foreground group, so Bochs never drops into its debugger), and the
//! handler ends every listed group (SIGTERM, then SIGKILL after a grace period)
//! before xtask exits with 128 + the signal. A `Drop` guard kills and reaps a child
//! whose owner returns early (error, time-out, panic).

use std::{
    os::unix::process::CommandExt as _,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicI32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use signal_hook::{
    consts::{SIGHUP, SIGINT, SIGTERM},
    iterator::Signals,
};

/// Process groups of the children alive now.
static GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
/// How many xtasks run above this one (`cargo xtask test` runs tests that run
/// `cargo xtask lab`); each passes its depth + 1 to its children.
const DEPTH_VAR: &str = "KVMTRACE_XTASK_DEPTH";

/// How long a child group has between SIGTERM and SIGKILL when xtask is stopped:
/// 4 s at the top, halved at each level below, so an inner xtask has ended its own
/// children before the outer one kills it.
fn grace() -> Duration {
    Duration::from_millis(4000 >> depth().min(4))
}

/// This xtask's depth ([`DEPTH_VAR`]), 0 at the top.
fn depth() -> u32 {
    std::env::var(DEPTH_VAR)
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// Starts the thread that ends every child group when xtask gets SIGINT, SIGTERM or
/// SIGHUP. Call once, first thing in `main`.
pub fn stop_children_on_signals() -> anyhow::Result<()> {
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP]).context("cannot install signal handlers")?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                STOPPED_BY.store(sig, Ordering::SeqCst);
                eprintln!("xtask: stopped by signal {sig}: ending its child processes");
                kill_all();
                std::process::exit(128 + sig);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// The signal that stopped xtask, 0 while none did.
static STOPPED_BY: AtomicI32 = AtomicI32::new(0);

/// When a signal is stopping xtask, waits for the signal thread to end the children
/// and exit with 128 + the signal; the work the main thread was doing failed only
/// because its children were ended. Returns at once otherwise.
pub fn wait_if_stopping() {
    while STOPPED_BY.load(Ordering::SeqCst) != 0 {
        thread::park_timeout(Duration::from_secs(1));
    }
}

fn groups() -> std::sync::MutexGuard<'static, Vec<i32>> {
    GROUPS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// SIGTERM to every listed group, then SIGKILL to those still there after [`grace`].
fn kill_all() {
    let list = groups().clone();
    for &pgid in &list {
        // SAFETY: kill(2) on a process group this process created.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace();
    // SAFETY: kill(2) with signal 0 only checks that the group still exists.
    let alive = |pgid: i32| unsafe { libc::kill(-pgid, 0) } == 0;
    while Instant::now() < deadline && list.iter().any(|&g| alive(g)) {
        thread::sleep(Duration::from_millis(50));
    }
    for &pgid in list.iter().filter(|&&g| alive(g)) {
        // SAFETY: as above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

/// A child process (and its process group) that is killed and reaped when the guard
/// goes away, whatever the reason.
pub struct ChildGuard {
    child: Option<Child>,
    pgid: i32,
    what: String,
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> anyhow::Result<Self> {
        let what = show(cmd);
        // Hold the list while spawning, so a signal cannot slip in between the spawn
        // and the registration.
        let mut list = groups();
        cmd.env(DEPTH_VAR, (depth() + 1).to_string())
            .process_group(0);
        // SAFETY: prctl(2) is async-signal-safe. If xtask itself is killed outright
        // (SIGKILL, no handler runs), the kernel kills the child.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let pgid = i32::try_from(child.id()).context("pid out of range")?;
        list.push(pgid);
        Ok(Self {
            child: Some(child),
            pgid,
            what,
        })
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    /// The child's piped stdout, to read while it runs (once).
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    fn forget(&self) {
        groups().retain(|&g| g != self.pgid);
    }

    /// The exit status if the child has ended.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => child
                .try_wait()
                .with_context(|| format!("cannot wait for {}", self.what)),
            None => bail!("{} was already reaped", self.what),
        }
    }

    /// Waits for the child to end, collecting what it wrote to piped stdout/stderr.
    pub fn wait_with_output(mut self) -> anyhow::Result<Output> {
        let child = self.child.take().context("child already reaped")?;
        let out = child
            .wait_with_output()
            .with_context(|| format!("cannot wait for {}", self.what));
        self.forget();
        out
    }

    /// Kills the child's group (if still running) and reaps the child.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                // SAFETY: kill(2) on the process group this guard created.
                unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
            }
            let _ = child.wait();
            self.forget();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` with inherited stdio to its end; its status.
pub fn status(cmd: &mut Command) -> anyhow::Result<ExitStatus> {
    let out = ChildGuard::spawn(cmd)?.wait_with_output()?;
    Ok(out.status)
}

/// Runs `cmd` to its end with stdout and stderr captured.
pub fn output(cmd: &mut Command) -> anyhow::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    ChildGuard::spawn(cmd)?.wait_with_output()
}

/// Runs `cmd` to completion within `limit`; output goes where `cmd` says (by default
/// it is discarded, and stderr is captured into the error).
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> anyhow::Result<()> {
    let err_file = tempfile::NamedTempFile::new().context("cannot create a temporary file")?;
    let err = err_file
        .reopen()
        .context("cannot open the temporary file")?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
    let result = wait_bounded(cmd, limit);
    let stderr = std::fs::read_to_string(err_file.path()).unwrap_or_default();
    result.map_err(|e| {
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        if tail.is_empty() {
            e
        } else {
            e.context(tail.join("\n"))
        }
    })
}

fn wait_bounded(cmd: &mut Command, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut child = ChildGuard::spawn(cmd)?;
    loop {
        if let Some(status) = child.try_wait()? {
            child.kill();
            if status.success() {
                return Ok(());
            }
            bail!("{} failed: {status}", child.what());
        }
        if started.elapsed() > limit {
            bail!(
                "{} did not finish within {} s",
                child.what(),
                limit.as_secs()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A command line as a shell would show it.
pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_guard_kills_the_whole_group() {
        // The shell starts a grandchild in the same group; both must be gone.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 300 & echo $!; wait"])
            .stdout(Stdio::piped());
        let mut guard = ChildGuard::spawn(&mut cmd).unwrap_or_else(|e| panic!("{e:#}"));
        let pgid = guard.pgid;
        assert!(groups().contains(&pgid));
        let mut line = String::new();
        if let Some(out) = guard.child.as_mut().and_then(|c| c.stdout.as_mut()) {
            use std::io::BufRead as _;
            std::io::BufReader::new(out)
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let grandchild: i32 = line
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        drop(guard);
        assert!(!groups().contains(&pgid));
        // SAFETY: signal 0 only checks for existence. The grandchild was reparented
        // and killed; give init a moment to reap it.
        let gone = (0..100).any(|_| {
            thread::sleep(Duration::from_millis(20));
            let missing = unsafe { libc::kill(grandchild, 0) } != 0;
            missing
                || std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        });
        assert!(gone, "grandchild {grandchild} survived its group's guard");
    }

    #[test]
    fn bounded_runs_fail_with_the_stderr_tail() {
        let err = run_bounded(
            Command::new("sh").args(["-c", "echo broken >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .map_or_else(|e| format!("{e:#}"), |()| String::new());
        assert!(
            err.contains("broken") && err.contains("exit status: 3"),
            "{err}"
        );
        let err = run_bounded(Command::new("sleep").arg("5"), Duration::from_millis(200))
            .map_or_else(|e| format!("{e:#}"), |()| String::new());
        assert!(err.contains("did not finish within 0 s"), "{err}");
    }
}
