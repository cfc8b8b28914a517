//! End-to-end runs of the `kvmtrace` binary on this machine's kernel, as root.
//!
//! This host's KVM does not fire `kvm:kvm_exit` (shared/LAB-NOTES.md), so these tests
//! prove loading, attaching, filtering, signals and error paths; real counts are
//! checked in the lab tests against the kernel's own hist trigger.

mod common;

use std::{
    ffi::OsStr,
    io::{BufRead as _, BufReader, Read as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::Duration,
};

use common::{has_kvm_tracepoints, is_root, kvmtrace, names_in, run, run_unprivileged, stderr};
use kvmtrace_model::report::{Report, SCHEMA};

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kvmtrace-test-{}-{name}", std::process::id()))
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

fn read_report(path: &Path) -> Report {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    Report::from_json(&text).unwrap_or_else(|e| panic!("parse {}: {e}\n{text}", path.display()))
}

fn signal(child: &Child, sig: i32) {
    let pid = i32::try_from(child.id()).unwrap_or_else(|e| panic!("pid: {e}"));
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill {pid}");
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

/// The command after `--` (a VMM) gets none of kvmtrace's ambient capabilities: the
/// .deb's service user holds its capabilities that way, and a VMM has no use for them.
#[test]
fn the_command_gets_none_of_kvmtraces_ambient_capabilities() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    let dir = tempdir();
    let said = dir.path().join("status");
    let caps = "+bpf,+perfmon,+dac_read_search";
    let out = run(Command::new("setpriv")
        .arg(format!("--inh-caps={caps}"))
        .arg(format!("--ambient-caps={caps}"))
        .arg(env!("CARGO_BIN_EXE_kvmtrace"))
        .args(["record", "--format", "json", "-o"])
        .arg(dir.path().join("rec.json"))
        .args(["--", "sh", "-c"])
        .arg(format!(
            "grep -E '^Cap(Amb|Inh)' /proc/self/status > {}",
            said.display()
        )));
    assert!(out.status.success(), "{}", stderr(&out));
    let status = std::fs::read_to_string(&said).unwrap_or_else(|e| panic!("{e}"));
    // The ambient set is empty; the inheritable one (not raised at exec) stays.
    assert!(status.contains("CapAmb:\t0000000000000000"), "{status}");
    assert!(!status.contains("CapInh:\t0000000000000000"), "{status}");
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

    std::fs::remove_file(&path).ok();
}

#[test]
fn a_failing_command_exits_4_with_the_report_written() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    let out = run(kvmtrace().args(["record", "--", "false"]));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the command exited with exit status: 1"),
        "{}",
        stderr(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("no VM exits were recorded"));

    // Killed by a signal that kvmtrace did not send: failed too; the file is complete.
    let dir = tempdir();
    let path = dir.path().join("killed.json");
    let out = run(kvmtrace()
        .args(["record", "-f", "json", "-o"])
        .arg(&path)
        .args(["--", "sh", "-c", "kill -KILL $$"]));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("signal: 9"), "{}", stderr(&out));
    assert_eq!(read_report(&path).schema, SCHEMA);
    assert_eq!(names_in(dir.path()), ["killed.json"]);
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
    signal(&child, libc::SIGTERM);
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
    assert_eq!(
        out.status.code(),
        Some(1),
        "an error: kvmtrace could not attach"
    );
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
    let out = run_unprivileged(&["record", "-d", "1"]);
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

/// More short-lived processes than the pid filter has room for (4096): exited ones
/// must leave the filter, so none is refused and only the live ones remain.
#[test]
fn pid_filter_forgets_exited_processes() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    let path = tmp("churn.json");
    let pidfile = tmp("churn.pid");
    // 5000 subshells that exit at once, then one grandchild that outlives the command.
    let script = format!(
        "for i in $(seq 5000); do (true) & done; wait; sleep 30 >/dev/null 2>&1 & echo $! > {}",
        pidfile.display()
    );
    let out = run(kvmtrace()
        .args(["record", "-f", "json", "-o"])
        .arg(&path)
        .args(["--", "sh", "-c", &script]));
    let orphan = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok());
    if let Some(pid) = orphan {
        // SAFETY: kill(2) on the sleep the script started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(out.status.success(), "{}", stderr(&out));
    let report = read_report(&path);
    assert_eq!(report.dropped.filter_map_full, 0, "{:?}", report.dropped);
    assert!(!report.dropped.any(), "{:?}", report.dropped);
    // kvmtrace itself and the sleep are alive; sh and its 5000 subshells are gone.
    let filter_pids = report.cost.as_ref().and_then(|c| c.filter_pids);
    assert_eq!(filter_pids, Some(2), "{:?}", report.cost);
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    for field in [
        "\"pending_lost\"",
        "\"recursion_misses\"",
        "\"filter_pids\"",
    ] {
        assert!(text.contains(field), "{field} is written");
    }
    let programs: Vec<&str> = report
        .cost
        .iter()
        .flat_map(|c| c.programs.iter().map(|p| p.name.as_str()))
        .collect();
    for program in ["task_newtask", "sched_process_exit"] {
        assert!(programs.contains(&program), "{programs:?}");
    }
    std::fs::remove_file(&path).ok();
    std::fs::remove_file(&pidfile).ok();
}

/// Set by [`pid_filter_holds_processes_not_threads`] when it runs this test binary as
/// its helper process.
const HELPER_ENV: &str = "KVMTRACE_TEST_THREAD_HELPER";

/// Not a test on its own: with [`HELPER_ENV`] set it is the traced process of
/// [`pid_filter_holds_processes_not_threads`]. After a line on stdin it starts that
/// many threads and one child process, says so on stdout, and waits for stdin to close.
#[test]
fn thread_helper() {
    use std::io::{BufRead as _, Write as _};
    let Some(threads) = std::env::var(HELPER_ENV)
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return;
    };
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    if stdin.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let stop_rx = std::sync::Arc::new(std::sync::Mutex::new(stop_rx));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop_rx);
            std::thread::spawn(move || {
                // Every thread waits for the channel to close.
                let _ = stop.lock().map(|rx| rx.recv());
            })
        })
        .collect();
    let child = Command::new("sleep").arg("30").spawn();
    println!("started {threads} threads");
    let _ = std::io::stdout().flush();
    // Until the test closes stdin.
    let _ = stdin.read_line(&mut line);
    drop(stop_tx);
    for h in handles {
        let _ = h.join();
    }
    if let Ok(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A traced process that starts threads adds none of them to the pid filter; the
/// child process it starts is added.
#[test]
fn pid_filter_holds_processes_not_threads() {
    use std::io::{BufRead as _, BufReader, Write as _};
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("test binary: {e}"));
    let mut helper = Command::new(exe)
        .args([
            "--exact",
            "thread_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "50")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn the helper: {e}"));
    let path = tmp("threads.json");
    let mut record = kvmtrace()
        .args(["record", "-d", "3", "-f", "json", "-p"])
        .arg(helper.id().to_string())
        .arg("-o")
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn kvmtrace: {e}"));
    let mut status = BufReader::new(record.stderr.take().unwrap_or_else(|| panic!("stderr")));
    let mut line = String::new();
    while !line.contains("recording VM exits") {
        line.clear();
        let n = status.read_line(&mut line).unwrap_or(0);
        assert!(n > 0, "kvmtrace ended before attaching");
    }
    let mut to_helper = helper.stdin.take().unwrap_or_else(|| panic!("stdin"));
    let _ = writeln!(to_helper, "go");
    let mut from_helper = BufReader::new(helper.stdout.take().unwrap_or_else(|| panic!("stdout")));
    let mut said = String::new();
    while !said.contains("started 50 threads") {
        said.clear();
        let n = from_helper.read_line(&mut said).unwrap_or(0);
        assert!(n > 0, "the helper ended before starting its threads");
    }
    let out = record
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for kvmtrace: {e}"));
    drop(to_helper);
    let _ = helper.wait();
    assert!(out.status.success(), "{}", stderr(&out));
    let report = read_report(&path);
    assert!(!report.dropped.any(), "{:?}", report.dropped);
    // The helper and its sleep; none of its 50 (or the test harness's) threads.
    let filter_pids = report.cost.as_ref().and_then(|c| c.filter_pids);
    assert_eq!(filter_pids, Some(2), "{:?}", report.cost);
    std::fs::remove_file(&path).ok();
}

/// Sends `sig` the moment the "recording VM exits" line is on standard error: the
/// handlers are installed before the line, so the record still ends with its report
/// complete and exit status 0.
fn signal_right_after_the_line(sig: i32, name: &str) {
    let dir = tempdir();
    let path = dir.path().join("rec.json");
    let mut child = kvmtrace()
        .args(["record", "-f", "json", "-o"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn: {e}"));
    let mut err = BufReader::new(child.stderr.take().unwrap_or_else(|| panic!("no stderr")));
    let mut text = String::new();
    loop {
        let mut line = String::new();
        let n = err
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("read stderr: {e}"));
        assert!(n > 0, "kvmtrace ended before saying it records: {text}");
        text.push_str(&line);
        if line.contains("recording VM exits") {
            break;
        }
    }
    // Nothing is written (not even a temporary file) until the report is complete.
    assert_eq!(names_in(dir.path()), Vec::<String>::new());
    signal(&child, sig);
    err.read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("read stderr: {e}"));
    let status = child.wait().unwrap_or_else(|e| panic!("wait: {e}"));
    assert_eq!(status.code(), Some(0), "{name}: {status:?}: {text}");
    assert!(text.contains(&format!("stopped by {name}")), "{text}");
    let raw = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read: {e}"));
    assert!(raw.ends_with("}\n"), "the whole JSON document: {raw}");
    let report = read_report(&path);
    assert_eq!(report.schema, SCHEMA);
    assert!(report.ended_at >= report.started_at);
    assert!(report.cost.is_some(), "the cost is written at the very end");
    assert_eq!(
        names_in(dir.path()),
        ["rec.json"],
        "no temporary file is left"
    );
}

#[test]
fn sigint_right_after_the_line_still_writes_the_report() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    for _ in 0..3 {
        signal_right_after_the_line(libc::SIGINT, "SIGINT");
    }
}

#[test]
fn sigterm_right_after_the_line_still_writes_the_report() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    for _ in 0..3 {
        signal_right_after_the_line(libc::SIGTERM, "SIGTERM");
    }
}

/// Runs `kvmtrace ARGS -o FILE` where FILE holds an earlier report, and checks that the
/// run ends with `code` and leaves FILE as it was, with no temporary file beside it.
fn check_output_survives(args: &[&str], code: i32) {
    let dir = tempdir();
    let path = dir.path().join("keep.json");
    let old = "an earlier report\n";
    std::fs::write(&path, old).unwrap_or_else(|e| panic!("write: {e}"));
    let out = run(kvmtrace().args(args).arg("-o").arg(&path));
    assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
    assert_eq!(
        stderr(&out).lines().count(),
        1,
        "{args:?}: {}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&path).ok().as_deref(),
        Some(old),
        "{args:?} touched the output file"
    );
    assert_eq!(names_in(dir.path()), ["keep.json"], "{args:?}");
}

/// Runs as any user: these are rejected before kvmtrace asks for privileges.
#[test]
fn a_rejected_record_leaves_the_output_file_alone() {
    check_output_survives(&["record", "-d", "1", "--exit-tracepoint", "kvm_exit"], 2);
    check_output_survives(&["record", "-d", "1", "--vcpu", "0", "--snapshots"], 2);
}

#[test]
fn a_failed_record_leaves_the_output_file_alone() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    // Attaching fails: an error.
    check_output_survives(
        &[
            "record",
            "-d",
            "1",
            "--exit-tracepoint",
            "kvm:kvm_exit_missing",
        ],
        1,
    );
    // Attached, then the command cannot start: bad input.
    check_output_survives(&["record", "--", "/nonexistent/kvmtrace-test-vmm"], 2);
}

#[test]
fn the_output_file_is_replaced_whole() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    let dir = tempdir();
    let path = dir.path().join("rec.json");
    std::fs::write(&path, "an earlier report\n").unwrap_or_else(|e| panic!("write: {e}"));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640))
        .unwrap_or_else(|e| panic!("chmod: {e}"));
    let link = dir.path().join("latest.json");
    std::os::unix::fs::symlink("rec.json", &link).unwrap_or_else(|e| panic!("symlink: {e}"));
    let out = run(kvmtrace()
        .args(["record", "-d", "0.2", "-f", "json", "-o"])
        .arg(&link));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()),
        "the symlink is kept; what it points to is replaced"
    );
    assert_eq!(read_report(&path).schema, SCHEMA);
    let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode.ok(), Some(0o640), "the replaced file keeps its mode");
    assert_eq!(names_in(dir.path()), ["latest.json", "rec.json"]);
}

#[test]
fn the_root_guard_skips_locally_and_fails_in_ci() {
    use common::can_run;
    let ci = |v: &'static str| Some(OsStr::new(v));
    assert!(can_run(true, "needs root", ci("true")));
    assert!(can_run(true, "needs root", None));
    for local in [None, ci(""), ci("0"), ci("false")] {
        assert!(!can_run(false, "needs root", local), "{local:?}");
    }
    for set in ["true", "1", "yes"] {
        let failed = std::panic::catch_unwind(|| can_run(false, "needs root", ci(set)));
        let message = failed
            .err()
            .and_then(|p| p.downcast::<String>().ok())
            .unwrap_or_else(|| panic!("CI={set}: the guard did not fail the test"));
        assert!(
            message.contains("needs root") && message.contains("CI is set"),
            "{message}"
        );
    }

    // The same through a real root-only test of this binary, run as nobody.
    if !is_root() {
        return;
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("test binary: {e}"));
    let as_nobody = |ci: Option<&str>| {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&exe)
            .args([
                "--exact",
                "record_attaches_and_writes_an_empty_report",
                "--nocapture",
            ])
            .env_remove("CI");
        if let Some(v) = ci {
            cmd.env("CI", v);
        }
        run(&mut cmd)
    };
    let local = as_nobody(None);
    let text = common::stdout(&local);
    assert!(local.status.success(), "{text}{}", stderr(&local));
    assert!(
        text.contains("skipped: loading eBPF programs needs root"),
        "{text}"
    );
    let in_ci = as_nobody(Some("true"));
    assert!(!in_ci.status.success(), "a skipped test must fail in CI");
    assert!(
        stderr(&in_ci).contains("cannot run this test: loading eBPF programs needs root"),
        "{}",
        stderr(&in_ci)
    );
}

/// The snapshots' shared all-VMs cell (kernels before 5.19 have no per-CPU reads in
/// eBPF) passes the verifier and attaches; kvmtrace says that it uses it.
#[test]
fn snapshots_in_shared_cells_attach() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    let path = tmp("shared.json");
    let out = run(kvmtrace()
        .args(["record", "-d", "0.3", "--snapshots", "--shared-cells"])
        .args(["--format", "json", "-o"])
        .arg(&path));
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("one cell shared by all CPUs"),
        "{}",
        stderr(&out)
    );
    assert_eq!(read_report(&path).total.count, 0);
    std::fs::remove_file(&path).ok();
}
