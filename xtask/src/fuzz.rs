//! `cargo xtask fuzz`: a bounded-time cargo-fuzz run of each of kvmtrace's parsers.
//!
//! 1. `cargo xtask setup` (building the library builds the eBPF objects, so it needs the
//!    nightly and bpf-linker), then cargo-fuzz, pinned, from crates.io.
//! 2. `fuzz/examples/seeds.rs` writes real inputs into `fuzz/corpus/<target>`: records
//!    and guest readouts made by the library, this host's tracepoint `format` files.
//! 3. `cargo fuzz build` (output streamed), then `cargo fuzz run` for each target with
//!    `-max_total_time` (and `fuzz/dicts/<target>.dict`, the JSON keys, where there is
//!    one), `--jobs` targets at a time (each libFuzzer is one thread: one per core);
//!    each run's output goes to `fuzz/target/logs/<target>.log`.
//! 4. A line per target with its executions. A crash (panic, timeout, out of memory)
//!    fails the run, naming the crashing input and the command that replays it; the
//!    other targets still run, and every failure is reported together.
//!
//! The fuzz targets build with the nightly the eBPF side uses (cargo-fuzz needs one),
//! without a sanitizer (the parsers are safe Rust: a panic is the bug to find) and with
//! debug assertions, so an arithmetic overflow panics as it would in a debug build.

use std::{
    fs,
    path::Path,
    process::Command,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::{Context as _, bail};
use clap::{Args, builder::PossibleValuesParser};

use crate::{
    exec::{exec, output},
    process::show,
    setup,
};

/// The fuzz targets, one per parser (`fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: [&str; 5] = [
    "report_json",
    "guest_json",
    "reason",
    "leaves",
    "tracefs_format",
];

/// cargo-fuzz release this was written against.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Build flags of every `cargo fuzz` call: the same for build and run, so run does not
/// rebuild.
const FUZZ_FLAGS: [&str; 3] = ["--sanitizer", "none", "--debug-assertions"];

#[derive(Args, Debug)]
pub struct Options {
    /// Seconds of fuzzing per target.
    #[arg(long, value_name = "N", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: u64,
    /// Fuzz only this target (repeatable); default: all of them.
    #[arg(long = "target", value_name = "NAME", value_parser = PossibleValuesParser::new(TARGETS))]
    pub targets: Vec<String>,
    /// Targets fuzzed at the same time (default: one per CPU).
    #[arg(long, value_name = "N", default_value_t = cpus(),
          value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: u16,
}

/// The CPUs this process may use (1 when unknown).
pub fn cpus() -> u16 {
    std::thread::available_parallelism().map_or(1, |n| u16::try_from(n.get()).unwrap_or(u16::MAX))
}

/// What a fuzz run did: how many targets ran, and the report of each that failed.
pub struct Fuzzed {
    pub targets: usize,
    pub failures: Vec<String>,
}

/// What one target's run did.
struct Outcome {
    target: String,
    executions: Option<u64>,
    corpus: usize,
    /// libFuzzer's own count, without the build; `None` when it did not finish.
    seconds: Option<u64>,
}

pub fn run(opts: &Options, root: &Path) -> anyhow::Result<()> {
    let fuzzed = fuzz(opts, root)?;
    if !fuzzed.failures.is_empty() {
        bail!(
            "{} of {} fuzz targets failed:\n{}",
            fuzzed.failures.len(),
            fuzzed.targets,
            fuzzed.failures.join("\n")
        );
    }
    Ok(())
}

/// Fuzzes the targets `opts` names; fails only when they cannot be fuzzed at all (a
/// crash is a failure in what it returns).
pub fn fuzz(opts: &Options, root: &Path) -> anyhow::Result<Fuzzed> {
    setup::run(&setup::Options::default(), root)?;
    ensure_cargo_fuzz()?;
    let toolchain = setup::ebpf_toolchain(root)?;
    let fuzz_dir = root.join("fuzz");
    let corpus = fuzz_dir.join("corpus");
    let logs = fuzz_dir.join("target/logs");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let cargo = || {
        let mut c = Command::new("cargo");
        c.arg(format!("+{toolchain}")).current_dir(root);
        c
    };

    exec(
        cargo()
            .args(["run", "--quiet", "--manifest-path"])
            .arg(fuzz_dir.join("Cargo.toml"))
            .args(["--example", "seeds", "--"])
            .arg(&corpus),
    )?;
    exec(
        cargo()
            .args(["fuzz", "build", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .args(FUZZ_FLAGS),
    )?;

    let targets: Vec<&str> = if opts.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        opts.targets.iter().map(String::as_str).collect()
    };
    // Workers take the next target until none is left; results keep the targets' order.
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..usize::from(opts.jobs).min(targets.len()) {
            scope.spawn(|| {
                while let Some(&target) = targets.get(next.fetch_add(1, Ordering::SeqCst)) {
                    let result =
                        fuzz_one(&mut cargo(), target, opts.seconds, &fuzz_dir, &toolchain);
                    done.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((target, result));
                }
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_else(PoisonError::into_inner);
    done.sort_by_key(|(target, _)| targets.iter().position(|t| t == target));
    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    for (_, result) in done {
        let (outcome, failure) = result?;
        outcomes.push(outcome);
        failures.extend(failure);
    }
    print_outcomes(&outcomes, opts.seconds);
    Ok(Fuzzed {
        targets: outcomes.len(),
        failures,
    })
}

/// Runs one target for `seconds` through `cmd` (`cargo +nightly`), its log under
/// fuzz/target/logs: what it did, and its crash report when it failed.
fn fuzz_one(
    cmd: &mut Command,
    target: &str,
    seconds: u64,
    fuzz_dir: &Path,
    toolchain: &str,
) -> anyhow::Result<(Outcome, Option<String>)> {
    let log = fuzz_dir.join("target/logs").join(format!("{target}.log"));
    cmd.args(["fuzz", "run", "--fuzz-dir"])
        .arg(fuzz_dir)
        .args(FUZZ_FLAGS)
        .arg(target)
        .args([
            "--",
            &format!("-max_total_time={}", seconds),
            // A single input that takes this long is a hang, reported as a crash.
            "-timeout=10",
            "-print_final_stats=1",
        ]);
    let dict = fuzz_dir.join(format!("dicts/{target}.dict"));
    if dict.is_file() {
        cmd.arg(format!("-dict={}", dict.display()));
    }
    let file =
        fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    cmd.stdout(file.try_clone()?).stderr(file);
    eprintln!("fuzz: {target} for {} s (log: {})", seconds, log.display());
    let result = exec(cmd);
    let text = fs::read_to_string(&log).unwrap_or_default();
    let executions = executions(&text);
    let failure = result
        .err()
        .map(|err| crash_report(target, &text, &log, toolchain, &err));
    let corpus = fs::read_dir(fuzz_dir.join("corpus").join(target)).map_or(0, Iterator::count);
    let outcome = Outcome {
        target: target.to_owned(),
        executions,
        corpus,
        seconds: fuzz_seconds(&text),
    };
    Ok((outcome, failure))
}

/// The executions, time and corpus of every target, on stderr.
fn print_outcomes(outcomes: &[Outcome], seconds: u64) {
    eprintln!("fuzz: executions per target ({} s each)", seconds);
    for o in outcomes {
        let or_unknown = |n: Option<u64>| n.map_or_else(|| "?".to_owned(), |n| n.to_string());
        eprintln!(
            "  {:<16} {:>10} runs in {} s, corpus {} inputs",
            o.target,
            or_unknown(o.executions),
            or_unknown(o.seconds),
            o.corpus
        );
    }
}

/// Installs the pinned cargo-fuzz unless it is there already.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let installed = output(Command::new("cargo").args(["fuzz", "--version"])).ok();
    match installed {
        Some(version) if version.contains(CARGO_FUZZ_VERSION) => return Ok(()),
        Some(version) => eprintln!("fuzz: replacing {}", version.trim()),
        None => {}
    }
    exec(Command::new("cargo").args([
        "install",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        "--locked",
        "--force",
    ]))
}

/// How long libFuzzer ran, from its closing `Done N runs in S second(s)`.
fn fuzz_seconds(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        let rest = l.strip_prefix("Done ")?;
        let (_, secs) = rest.split_once(" runs in ")?;
        secs.split_whitespace().next()?.parse().ok()
    })
}

/// The inputs libFuzzer ran, from `-print_final_stats` (or its closing `Done N runs`).
fn executions(log: &str) -> Option<u64> {
    let stat = log.lines().rev().find_map(|l| {
        l.strip_prefix("stat::number_of_executed_units:")
            .and_then(|n| n.trim().parse().ok())
    });
    stat.or_else(|| {
        log.lines().rev().find_map(|l| {
            l.strip_prefix("Done ")
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
    })
}

/// One failed target: the panic message, the input that caused it and how to replay it.
fn crash_report(
    target: &str,
    log: &str,
    log_path: &Path,
    toolchain: &str,
    err: &anyhow::Error,
) -> String {
    let lines: Vec<&str> = log.lines().collect();
    // Rust's panic message is the line after `thread '...' panicked at FILE:LINE:COL:`.
    let panic = lines.iter().enumerate().find_map(|(i, l)| {
        l.contains("panicked at").then(|| {
            let msg = lines.get(i + 1).map_or("", |m| m.trim());
            format!("{} {msg}", l.trim())
        })
    });
    let cause = panic
        .or_else(|| {
            lines
                .iter()
                .find(|l| l.contains("ERROR: libFuzzer:") || l.contains("ALARM:"))
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| format!("{err:#}"));
    let input = lines
        .iter()
        .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()));
    match input {
        Some(input) => {
            let mut replay = Command::new("cargo");
            replay
                .arg(format!("+{toolchain}"))
                .args(["fuzz", "run"])
                .args(FUZZ_FLAGS)
                .args([target, input]);
            format!(
                "  {target}: {cause}\n    crashing input: {input}\n    replay: {}\n    log: {}",
                show(&replay),
                log_path.display()
            )
        }
        None => format!(
            "  {target}: {cause} (no crashing input was written; log: {})",
            log_path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executions_from_the_final_stats() {
        let log = "#2\tINITED cov: 10\nDone 5120 runs in 11 second(s)\n\
                   stat::number_of_executed_units: 5121\nstat::peak_rss_mb: 40\n";
        assert_eq!(executions(log), Some(5121));
        assert_eq!(executions("Done 77 runs in 1 second(s)\n"), Some(77));
        assert_eq!(executions("error: could not compile\n"), None);
        assert_eq!(fuzz_seconds(log), Some(11));
    }

    #[test]
    fn a_crash_names_its_input() {
        let log = "thread '<unnamed>' panicked at src/diff.rs:104:9:\n\
                   attempt to add with overflow\n\
                   ==1== ERROR: libFuzzer: deadly signal\n\
                   artifact_prefix='/w/fuzz/artifacts/report_json/'; \
                   Test unit written to /w/fuzz/artifacts/report_json/crash-abc\n";
        let err = anyhow::anyhow!("exit status: 77");
        let r = crash_report("report_json", log, Path::new("x.log"), "nightly", &err);
        assert!(
            r.contains("panicked at src/diff.rs:104:9: attempt to add with overflow"),
            "{r}"
        );
        assert!(
            r.contains("crashing input: /w/fuzz/artifacts/report_json/crash-abc"),
            "{r}"
        );
        assert!(
            r.contains(
                "cargo +nightly fuzz run --sanitizer none --debug-assertions report_json /w/fuzz"
            ),
            "{r}"
        );
        let r = crash_report(
            "leaves",
            "ALARM: working on the last Unit for 11 seconds\n",
            Path::new("x.log"),
            "nightly",
            &err,
        );
        assert!(
            r.contains("ALARM") && r.contains("no crashing input"),
            "{r}"
        );
    }
}
