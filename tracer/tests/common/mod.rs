//! Helpers shared by the integration tests: the kvmtrace binary, and the guards of tests
//! that need root or the kvm module.
//!
//! A guard skips its test (prints why, and the test passes) on a developer's machine,
//! but fails it when the environment variable `CI` is set: CI runs as root on a machine
//! with kvm, so a test that cannot run there is a broken CI, not a skip.

#![allow(dead_code)] // each test crate uses a different part

pub mod exporter;

use std::{
    ffi::OsStr,
    path::Path,
    process::{Command, Output},
};

pub fn kvmtrace() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvmtrace"))
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|err| panic!("cannot run {cmd:?}: {err}"))
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `CI` (as its value) says this is a CI run: set, and not empty, `0` or `false`.
pub fn is_ci(ci: Option<&OsStr>) -> bool {
    ci.is_some_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The guard: true when the test can run. Otherwise, with `ci` (the value of `CI`)
/// saying CI, it panics naming what is missing; without, it prints `skipped: {why}` and
/// returns false.
pub fn can_run(available: bool, why: &str, ci: Option<&OsStr>) -> bool {
    if available {
        return true;
    }
    assert!(
        !is_ci(ci),
        "cannot run this test: {why}, and CI is set: CI must run every test (as root, with kvm loaded)"
    );
    println!("skipped: {why}");
    false
}

fn guard(available: bool, why: &str) -> bool {
    can_run(available, why, std::env::var_os("CI").as_deref())
}

/// True as root; see [`can_run`] otherwise.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    guard(
        unsafe { libc::geteuid() } == 0,
        "loading eBPF programs needs root",
    )
}

/// True when the kvm module is loaded; see [`can_run`] otherwise.
pub fn has_kvm_tracepoints() -> bool {
    let ok = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|t| Path::new(t).join("events/kvm/kvm_exit").is_dir())
        || Path::new("/sys/module/kvm").is_dir();
    guard(ok, "the kvm module is not loaded on this machine")
}

/// The names in `dir`, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Runs kvmtrace with `args` as the unprivileged user nobody, with no capabilities.
pub fn run_unprivileged(args: &[&str]) -> Output {
    run(Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_kvmtrace"))
        .args(args))
}
