//! `cargo xtask test`: the one command that checks everything, as CI runs it.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use clap::Args;

use crate::{exec::exec, fuzz, kmod, setup};

#[derive(Args, Debug)]
pub struct Options {
    /// Skip the lab end-to-end tests (they boot emulated machines, ~10 minutes).
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
}

/// The kernel lines whose series is checked and built (the lab boots each).
const LINES: &[kmod::KernelLine] = &[
    kmod::KernelLine::V6_1,
    kmod::KernelLine::V6_12,
    kmod::KernelLine::V5_10,
];

/// Each step's wall time, said as it ends and again in a summary at the end, so that a
/// CI log shows where its time went. A step runs from the end of the one before.
struct Steps {
    done: Vec<(&'static str, Duration)>,
    since: Instant,
}

impl Steps {
    fn new() -> Self {
        Self {
            done: Vec::new(),
            since: Instant::now(),
        }
    }

    fn end(&mut self, step: &'static str) {
        let took = self.since.elapsed();
        self.since = Instant::now();
        eprintln!("xtask test: {step} took {} s", took.as_secs());
        self.done.push((step, took));
    }

    fn summary(&self) {
        let all: Duration = self.done.iter().map(|(_, d)| *d).sum();
        eprintln!("xtask test: all steps took {} s:", all.as_secs());
        for (step, took) in &self.done {
            eprintln!("  {:>6} s  {step}", took.as_secs());
        }
    }
}

pub fn run(opts: &Options, root: &Path) -> anyhow::Result<()> {
    let mut steps = Steps::new();
    setup::run(&setup::Options::default(), root)?;
    steps.end("setup");
    let cargo = || {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.current_dir(root);
        c
    };
    exec(cargo().args(["fmt", "--all", "--", "--check"]))?;
    exec(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    exec(cargo().args([
        "clippy",
        "-p",
        "kvmtrace-e2e",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF crate, with the workspace's lints, on its own target and toolchain.
    let toolchain = setup::ebpf_toolchain(root)?;
    exec(
        Command::new("rustup")
            .current_dir(root.join("tracer-ebpf"))
            .args(["run", &toolchain, "cargo", "clippy", "--release"])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .args(["--", "-D", "warnings"]),
    )?;
    steps.end("fmt and clippy");
    // Unit tests, and the integration tests that load the eBPF programs (as root).
    // One thread: the tests attach to the same kernel tracepoints.
    exec(cargo().args(["test", "--", "--test-threads=1"]))?;
    steps.end("unit and root tests");
    // Every parser of user input, fuzzed for a bounded time.
    if opts.fuzz_seconds > 0 {
        fuzz::run(
            &fuzz::Options {
                seconds: opts.fuzz_seconds,
                targets: Vec::new(),
            },
            root,
        )?;
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
        kmod::run(&check, root)?;
    }
    steps.end("checkpatch");
    if !opts.no_kmod {
        for &kernel in LINES {
            let build = kmod::Options {
                kernel,
                ..kmod::Options::default()
            };
            kmod::run(&build, root)?;
        }
    }
    steps.end("kmod builds");
    if !opts.no_lab {
        // One scenario at a time: each boots an emulator that wants a whole core.
        let mut lab = cargo();
        lab.args([
            "test",
            "--release",
            "-p",
            "kvmtrace-e2e",
            "--",
            "--test-threads=1",
        ]);
        if opts.full {
            lab.arg("--include-ignored");
        }
        exec(&mut lab)?;
    }
    steps.end("lab and xtask tests");
    steps.summary();
    Ok(())
}
