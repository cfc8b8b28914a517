//! `cargo xtask test`: the one command that checks everything, as CI runs it.
//!
//! Each step says how long it took, and the run ends with a summary of every step and
//! two lines: the total time, then `total: N passed, N failed`. Passed and failed count
//! the tests (from each `cargo test`'s `test result:` lines) and the other checks (fmt,
//! each clippy, each fuzz target, checkpatch and the module build of each kernel line,
//! one each). A failed step does not stop the run, so one run names every failure; a
//! run that executed no test fails.
//!
//! The lab tests boot emulators that each want one core: they run as two streams side
//! by side, Intel (Bochs) and AMD (QEMU TCG), each one lab at a time, and the labs that
//! need both CPUs after them (the scheduling is the test crate's, `tests/src/lib.rs`).

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use clap::Args;

use crate::{
    exec::{exec, exec_lines},
    fuzz, kmod, lab, setup,
};

#[derive(Args, Debug)]
pub struct Options {
    /// Skip the lab end-to-end tests (they boot emulated machines).
    #[arg(long)]
    pub no_lab: bool,
    /// Skip building the KVM patch (checkpatch still runs).
    #[arg(long)]
    pub no_kmod: bool,
    /// Also the lab's variant matrix: every TEST-ONLY kernel variant's verdicts (the
    /// tests marked `#[ignore]`, which a plain run lists as ignored).
    #[arg(long)]
    pub full: bool,
    /// Seconds of fuzzing per parser (`cargo xtask fuzz`); 0 skips it.
    #[arg(long, default_value_t = 20)]
    pub fuzz_seconds: u64,
    /// Labs at once: 2 runs an Intel and an AMD lab side by side (one emulator thread
    /// per core), 1 one lab at a time.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub lab_streams: u8,
}

/// The kernel lines whose series is checked and built (the lab boots each).
const LINES: &[kmod::KernelLine] = &[
    kmod::KernelLine::V6_1,
    kmod::KernelLine::V6_12,
    kmod::KernelLine::V5_10,
];

/// libtest threads for the lab tests: more than there are lab tests, so that every
/// test asks for its scenario at once and both streams always have a lab to run (the
/// test crate runs at most one lab per stream; the other threads wait).
const LAB_TEST_THREADS: &str = "128";

/// Passed, failed and ignored counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    fn add(&mut self, other: Self) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

/// The counts of one libtest summary line (`test result: ok. 3 passed; 1 failed; 2
/// ignored; 0 measured; 0 filtered out; finished in 0.01s`), or `None` for any other
/// line.
fn test_result(line: &str) -> Option<Tally> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_, counts) = rest.split_once(". ")?;
    let mut tally = Tally::default();
    let mut seen = false;
    for part in counts.split(';') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => tally.passed = n,
            "failed" => tally.failed = n,
            "ignored" => tally.ignored = n,
            _ => continue,
        }
        seen = true;
    }
    seen.then_some(tally)
}

/// A step's counts as its lines say them; `skipped` when nothing ran.
fn counts(t: Tally) -> String {
    if t == Tally::default() {
        return "skipped".to_owned();
    }
    let ignored = if t.ignored > 0 {
        format!(", {} ignored", t.ignored)
    } else {
        String::new()
    };
    format!("{} passed, {} failed{ignored}", t.passed, t.failed)
}

/// A finished step: its wall time, its counts, and what failed in it.
struct Done {
    step: &'static str,
    took: Duration,
    tally: Tally,
    failures: Vec<String>,
}

/// The steps so far, and the open one's counts. A step runs from the end of the one
/// before.
struct Steps {
    done: Vec<Done>,
    since: Instant,
    started: Instant,
    tally: Tally,
    failures: Vec<String>,
    /// Tests run (passed or failed) by every `cargo test` so far.
    tests_run: u64,
}

impl Steps {
    fn new() -> Self {
        Self {
            done: Vec::new(),
            since: Instant::now(),
            started: Instant::now(),
            tally: Tally::default(),
            failures: Vec::new(),
            tests_run: 0,
        }
    }

    /// Counts a check that is not a test binary: one passed, or one failed (said now,
    /// and again at the end).
    fn check(&mut self, what: &str, result: anyhow::Result<()>) {
        match result {
            Ok(()) => self.tally.passed += 1,
            Err(e) => self.fail(format!("{what}: {e:#}")),
        }
    }

    fn fail(&mut self, why: String) {
        eprintln!("xtask test: FAILED: {why}");
        self.tally.failed += 1;
        self.failures.push(why);
    }

    /// Runs `cmd`, a `cargo test`, counting its tests from the libtest summaries. It
    /// fails when it exits non-zero without a failed test (it did not build) and when
    /// it ran no test at all.
    fn tests(&mut self, what: &str, cmd: &mut Command) {
        let mut tally = Tally::default();
        let status = exec_lines(cmd, |line| {
            if let Some(t) = test_result(line) {
                tally.add(t);
            }
        });
        self.tally.add(tally);
        self.tests_run += tally.passed + tally.failed;
        let failed_tests = tally.failed;
        match status {
            Err(e) => self.fail(format!("{what}: {e:#}")),
            Ok(s) if !s.success() && failed_tests == 0 => {
                self.fail(format!(
                    "{what}: cargo test failed ({s}) before running tests"
                ));
            }
            Ok(_) if failed_tests > 0 => {
                self.failures.push(format!("{what}: {failed_tests} failed"));
            }
            Ok(_) if tally.passed == 0 => self.fail(format!("{what}: ran no test")),
            Ok(_) => {}
        }
    }

    fn end(&mut self, step: &'static str) {
        let took = self.since.elapsed();
        self.since = Instant::now();
        let tally = std::mem::take(&mut self.tally);
        eprintln!(
            "xtask test: {step} took {} s ({})",
            took.as_secs(),
            counts(tally)
        );
        self.done.push(Done {
            step,
            took,
            tally,
            failures: std::mem::take(&mut self.failures),
        });
    }

    /// The summary; its last two lines are the total time and the total counts. Fails
    /// when a check failed or no test ran (counted as a failure).
    fn summary(self) -> anyhow::Result<()> {
        let mut all = Tally::default();
        eprintln!("xtask test: the steps:");
        for d in &self.done {
            all.add(d.tally);
            eprintln!(
                "  {:>6} s  {}  ({})",
                d.took.as_secs(),
                d.step,
                counts(d.tally)
            );
        }
        let failures: Vec<&String> = self.done.iter().flat_map(|d| &d.failures).collect();
        for f in &failures {
            eprintln!("  failed: {f}");
        }
        if self.tests_run == 0 {
            all.failed += 1;
            eprintln!("  failed: no test ran");
        }
        let took = self.started.elapsed().as_secs();
        eprintln!(
            "xtask test: {took} s ({} min {:02} s) in all",
            took / 60,
            took % 60
        );
        eprintln!("total: {} passed, {} failed", all.passed, all.failed);
        if all.failed > 0 {
            return Err(Reported.into());
        }
        Ok(())
    }
}

/// A failed run whose failures the summary has said already.
#[derive(Debug)]
pub struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("xtask test failed (see above)")
    }
}

impl std::error::Error for Reported {}

pub fn run(opts: &Options, root: &Path) -> anyhow::Result<()> {
    let mut steps = Steps::new();
    // Nothing builds without the toolchain: a failed set-up ends the run.
    let setup = setup::run(&setup::Options::default(), root);
    let set_up = setup.is_ok();
    steps.check("setup", setup);
    steps.end("setup");
    if !set_up {
        return steps.summary();
    }
    let cargo = || {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        // A test that cannot run here (not root) must fail, not skip, as on CI.
        c.current_dir(root).env("CI", "true");
        c
    };
    steps.check("fmt", exec(cargo().args(["fmt", "--all", "--", "--check"])));
    // The whole workspace but the eBPF crate (linted below on its own target), in one
    // run: one dependency resolution and build for all.
    steps.check(
        "clippy",
        exec(cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "tracer-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])),
    );
    // The eBPF crate, with the workspace's lints, on its own target and toolchain.
    let ebpf = setup::ebpf_toolchain(root).and_then(|toolchain| {
        exec(
            Command::new("rustup")
                .current_dir(root.join("tracer-ebpf"))
                .args(["run", &toolchain, "cargo", "clippy", "--release"])
                .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
                .args(["--", "-D", "warnings"]),
        )
    });
    steps.check("clippy (eBPF)", ebpf);
    steps.end("fmt and clippy");
    // Unit tests, and the integration tests that load the eBPF programs (as root).
    // One thread: the tests attach to the same kernel tracepoints.
    steps.tests(
        "unit and root tests",
        cargo().args(["test", "--", "--test-threads=1"]),
    );
    steps.end("unit and root tests");
    // Every parser of user input, fuzzed for a bounded time, a target per core.
    if opts.fuzz_seconds > 0 {
        let fuzz_opts = fuzz::Options {
            seconds: opts.fuzz_seconds,
            targets: Vec::new(),
            jobs: fuzz::cpus(),
        };
        match fuzz::fuzz(&fuzz_opts, root) {
            Ok(f) => {
                for _ in f.failures.len()..f.targets {
                    steps.check("fuzzing", Ok(()));
                }
                for report in f.failures {
                    steps.fail(format!("fuzzing:\n{report}"));
                }
            }
            Err(e) => steps.fail(format!("fuzzing: {e:#}")),
        }
    }
    steps.end("fuzzing");
    // The KVM patch: checkpatch --strict on each line's series, with that line's own
    // checkpatch; then the series must build for every line.
    for &kernel in LINES {
        let check = kmod::Options {
            kernel,
            check: true,
            ..kmod::Options::default()
        };
        steps.check(&format!("checkpatch {kernel}"), kmod::run(&check, root));
    }
    steps.end("checkpatch");
    if !opts.no_kmod {
        for &kernel in LINES {
            let build = kmod::Options {
                kernel,
                ..kmod::Options::default()
            };
            steps.check(&format!("kmod {kernel}"), kmod::run(&build, root));
        }
    }
    steps.end("kmod builds");
    if !opts.no_lab {
        // kvmtrace for L1 once, before two labs would both wait for its build.
        steps.check(
            "kvmtrace for the lab",
            lab::inputs::build_kvmtrace(root).map(drop),
        );
        let mut lab = cargo();
        lab.args(["test", "--release", "-p", "kvmtrace-e2e", "--test", "lab"])
            .env("KVMTRACE_LAB_STREAMS", opts.lab_streams.to_string())
            .args(["--", "--test-threads", LAB_TEST_THREADS]);
        if opts.full {
            lab.arg("--include-ignored");
        }
        steps.tests("lab tests", &mut lab);
        steps.end("lab tests");
        // The xtask verbs as a user meets them (some boot a lab: one at a time, after
        // the lab tests), and the test crate's own unit tests.
        steps.tests(
            "xtask tests",
            cargo()
                .args(["test", "--release", "-p", "kvmtrace-e2e", "--lib"])
                .args(["--test", "xtask", "--", "--test-threads=1"]),
        );
        steps.end("xtask tests");
    }
    steps.summary()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_libtest_summaries() {
        assert_eq!(
            test_result(
                "test result: ok. 37 passed; 0 failed; 27 ignored; 0 measured; 0 filtered out; finished in 1269.01s"
            ),
            Some(Tally {
                passed: 37,
                failed: 0,
                ignored: 27
            })
        );
        assert_eq!(
            test_result("test result: FAILED. 5 passed; 2 failed; 0 ignored; 0 measured"),
            Some(Tally {
                passed: 5,
                failed: 2,
                ignored: 0
            })
        );
        assert_eq!(test_result("test a_test_result_parser ... ok"), None);
        assert_eq!(test_result("running 3 tests"), None);
        assert_eq!(test_result("test result: garbled"), None);
    }

    #[test]
    fn a_run_without_tests_fails() {
        let mut steps = Steps::new();
        steps.check("fmt", Ok(()));
        steps.end("fmt");
        assert!(steps.summary().is_err(), "only checks, no test");
        let mut steps = Steps::new();
        steps.check("fmt", Ok(()));
        steps.tests(
            "a test",
            Command::new("echo").arg("test result: ok. 1 passed; 0 failed"),
        );
        steps.end("a test");
        assert!(steps.summary().is_ok());
        let mut steps = Steps::new();
        steps.tests(
            "no test",
            Command::new("echo").arg("test result: ok. 0 passed; 0 failed"),
        );
        steps.end("no test");
        assert!(steps.summary().is_err());
    }
}
