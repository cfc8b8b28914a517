//! Steps with progress, time limits, and child processes that never outlive the lab.

use std::{
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};

use crate::exec::show;

/// One named step of the lab: a spinner while it runs, one line when it ends.
pub struct Step {
    name: String,
    bar: ProgressBar,
    started: Instant,
}

impl Step {
    pub fn start(name: impl Into<String>) -> Self {
        let name = name.into();
        let bar = ProgressBar::new_spinner();
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} {prefix}: {wide_msg} [{elapsed}]")
        {
            bar.set_style(style);
        }
        bar.set_prefix(name.clone());
        bar.enable_steady_tick(Duration::from_millis(200));
        Self {
            name,
            bar,
            started: Instant::now(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Shows what the step is doing now.
    pub fn message(&self, msg: impl Into<String>) {
        self.bar.set_message(msg.into());
    }

    /// Prints a line above the spinner (or to stderr when there is no terminal).
    pub fn note(&self, line: impl AsRef<str>) {
        if self.bar.is_hidden() {
            eprintln!("  {}: {}", self.name, line.as_ref());
        } else {
            self.bar
                .println(format!("  {}: {}", self.name, line.as_ref()));
        }
    }

    /// Ends the step with a one-line result and returns how long it took.
    pub fn done(self, result: impl AsRef<str>) -> Duration {
        let took = self.started.elapsed();
        self.bar.finish_and_clear();
        eprintln!(
            "[{:>6.1}s] {}: {}",
            took.as_secs_f64(),
            self.name,
            result.as_ref()
        );
        took
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if !self.bar.is_finished() {
            self.bar.finish_and_clear();
        }
    }
}

/// A child process that is killed and reaped when the guard goes away, whatever the
/// reason (error, time-out, panic, Ctrl-C unwinding through `?`).
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> anyhow::Result<Self> {
        let what = show(cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        Ok(Self {
            child: Some(child),
            what,
        })
    }

    pub fn what(&self) -> &str {
        &self.what
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

    /// Kills the child (if still running) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Either it is still running and dies now, or it has exited already.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` to completion within `limit`; output goes where `cmd` says (by default
/// it is discarded, and stderr is captured into the error).
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> anyhow::Result<()> {
    let err_file = tempfile_path("stderr");
    let err = std::fs::File::create(&err_file)
        .with_context(|| format!("cannot create {}", err_file.display()))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
    let result = wait_bounded(cmd, limit);
    let stderr = std::fs::read_to_string(&err_file).unwrap_or_default();
    let _ = std::fs::remove_file(&err_file);
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

fn tempfile_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("xtask-lab-{}-{tag}", std::process::id()))
}
