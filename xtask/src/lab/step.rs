//! Steps of the lab, each with a spinner while it runs and one line when it ends.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

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
