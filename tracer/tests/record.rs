//! End-to-end runs of the `kvmtrace` binary on this machine's kernel, as root.
//!
//! This host's KVM does not fire `kvm:kvm_exit` (shared/LAB-NOTES.md), so these tests
//! prove loading, attaching, filtering, signals and error paths; real counts are
//! checked in the lab tests against the kernel's own hist trigger.

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    thread::sleep,
    time::Duration,
};

use kvmtrace::report::{Report, SCHEMA};

fn kvmtrace() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvmtrace"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        println!("skipped: loading eBPF programs needs root");
    }
    root
}

fn has_kvm_tracepoints() -> bool {
    let ok = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|t| PathBuf::from(t).join("events/kvm/kvm_exit").is_dir())
        || PathBuf::from("/sys/module/kvm").is_dir();
    if !ok {
        println!("skipped: the kvm module is not loaded on this machine");
    }
    ok
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|err| panic!("cannot run {cmd:?}: {err}"))
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kvmtrace-test-{}-{name}", std::process::id()))
}

fn read_report(path: &PathBuf) -> Report {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    Report::from_json(&text).unwrap_or_else(|e| panic!("parse {}: {e}\n{text}", path.display()))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn record_attaches_and_writes_an_empty_report() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    let path = tmp("empty.json");
    let out = run(kvmtrace()
        .args(["record", "-d", "0.5", "--format", "json", "-o"])
        .arg(&path));
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        stderr(&out)
    );
    let report = read_report(&path);
    assert_eq!(report.schema, SCHEMA);
    assert_eq!(report.total.count, 0, "this host's KVM fires no kvm_exit");
    assert!(report.reasons.is_empty() && report.vcpus.is_empty());
    assert!(!report.dropped.any());
    assert!(report.duration_ns >= 500_000_000, "{}", report.duration_ns);
    assert!(report.duration_ns < 5_000_000_000, "{}", report.duration_ns);
    std::fs::remove_file(&path).ok();
}

#[test]
fn record_runs_a_command_and_filters_its_pid() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    let path = tmp("cmd.json");
    let out = run(kvmtrace()
        .args(["record", "-f", "json", "-o"])
        .arg(&path)
        .args(["--", "sleep", "0.2"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let report = read_report(&path);
    assert_eq!(report.filter.pids.len(), 1, "{:?}", report.filter);
    assert!(report.duration_ns >= 200_000_000);

    let out = run(kvmtrace().args(["record", "--", "false"]));
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failing command fails the record"
    );
    assert!(
        stderr(&out).contains("the command exited with"),
        "{}",
        stderr(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("no VM exits were recorded"));
    std::fs::remove_file(&path).ok();
}

#[test]
fn sigterm_still_writes_the_report() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    let path = tmp("sigterm.json");
    let child = kvmtrace()
        .args(["record", "-f", "json", "-o"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn: {e}"));
    sleep(Duration::from_millis(1500));
    let pid = i32::try_from(child.id()).unwrap_or_else(|e| panic!("pid: {e}"));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait: {e}"));
    assert!(out.status.success(), "{:?}: {}", out.status, stderr(&out));
    assert!(
        stderr(&out).contains("stopped by SIGTERM"),
        "{}",
        stderr(&out)
    );
    let report = read_report(&path);
    assert!(
        report.duration_ns >= 1_000_000_000,
        "{}",
        report.duration_ns
    );
    std::fs::remove_file(&path).ok();
}

#[test]
fn missing_tracepoint_is_one_clear_line() {
    if !is_root() {
        return;
    }
    let out = run(kvmtrace().args([
        "record",
        "-d",
        "1",
        "--exit-tracepoint",
        "kvm:kvm_exit_missing",
    ]));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("kvmtrace: tracepoint kvm:kvm_exit_missing not found in "),
        "{err}"
    );
}

#[test]
fn bad_input_is_rejected() {
    let out = run(kvmtrace().args(["record", "-d", "ten"]));
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
    assert!(
        stderr(&out).contains("'ten' is not a number of seconds"),
        "{}",
        stderr(&out)
    );

    let out = run(kvmtrace().args(["record", "-f", "xml"]));
    assert_eq!(out.status.code(), Some(2));

    let out = run(kvmtrace().args(["record", "-p", "4000000000"]));
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out).trim(),
        "kvmtrace: invalid value '4000000000' for '--pid <PID>': '4000000000' is not a process id: pids go from 1 to 4194303 (see `kvmtrace record --help`)"
    );
}

#[test]
fn reasons_lists_both_tables() {
    let out = run(kvmtrace().args(["reasons", "--isa", "svm"]));
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0x400") && text.contains("NPF"), "{text}");
    assert!(!text.contains("EPT_VIOLATION"));
    let out = run(kvmtrace().args(["reasons"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("EPT_VIOLATION") && text.contains("GETSEC") && text.contains("VMGEXIT"));
}

#[test]
fn unprivileged_user_is_told_to_use_sudo() {
    if !is_root() {
        return;
    }
    let out = run(Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_kvmtrace"))
        .args(["record", "-d", "1"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).trim(),
        "kvmtrace: root (or CAP_BPF and CAP_PERFMON) is needed to load eBPF programs: run kvmtrace with sudo"
    );
}

#[test]
fn guest_recognises_this_unpatched_kvm() {
    // This machine is itself a guest of a stock KVM: the counter leaves are not there.
    let out = run(kvmtrace().args(["guest", "--format", "json"]));
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert_eq!(v["schema"], "kvmtrace.guest.v1");
    assert_eq!(v["patched"], false, "{text}");
    assert!(
        v["detection"]
            .as_str()
            .is_some_and(|d| d.contains("not patched")),
        "{text}"
    );
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn top_refreshes_and_stops() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    let out = run(kvmtrace()
        .args(["top", "-n", "3", "-i", "0.2"])
        .stdin(Stdio::null()));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("kvmtrace top").count(), 3, "{text}");
    assert!(
        !text.contains('\x1b'),
        "no terminal escapes when stdout is not a terminal"
    );
}
