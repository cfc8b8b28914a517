//! Bad input to every subcommand: exit status 2, nothing on standard output, and one
//! line on standard error that starts with `kvmtrace:` and names the file or value.
//!
//! Runs as any user. `record` and `top` must reject their arguments before they check
//! privileges or attach, so as root (CI) these cases never reach the kernel; a case
//! that runs for more than a few seconds anyway is killed and reported.

use std::{
    ffi::OsString,
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use chrono::{TimeZone as _, Utc};
use kvmtrace_model::{
    exit_reasons::Isa,
    guest::{GUEST_SCHEMA, GuestReadout},
    leaves::Leaves,
    report::{CpuidRead, LeafKind, ReadSource, Report, RunInfo, SCHEMA},
    snapshot::Snapshot,
};
use tracer_common::{ExitKey, ExitStats};

/// How long one case may run before it counts as "did not reject its input".
const CASE_TIMEOUT: Duration = Duration::from_secs(20);

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("kvmtrace-bad-input-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Self(dir)
    }

    fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A small VMX record made with the library, as `record --format json` writes it.
fn sample_report() -> Report {
    let mut snap = Snapshot::default();
    for (reason, count, time_ns) in [(30, 1387, 45_678_901), (48, 426, 1_234_567), (10, 737, 9)] {
        let stats = ExitStats {
            count,
            timed: count,
            time_ns,
            max_ns: time_ns,
        };
        snap.add_exits(0, ExitKey::from_raw(1, reason), stats)
            .unwrap_or_else(|e| panic!("{e}"));
        snap.add_hist(ExitKey::from_raw(1, reason), 14, count)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let info = RunInfo {
        kernel_release: "6.1.0-27-amd64".to_owned(),
        started_at: Utc
            .timestamp_opt(1_764_000_000, 0)
            .single()
            .unwrap_or_default(),
        ended_at: Utc
            .timestamp_opt(1_764_000_009, 0)
            .single()
            .unwrap_or_default(),
        ..RunInfo::default()
    };
    Report::build(&snap, info).unwrap_or_else(|e| panic!("build the sample report: {e}"))
}

fn leaves() -> Leaves {
    kvmtrace_model::leaves::preset("kvmtrace").unwrap_or_else(|e| panic!("{e}"))
}

/// The sample with one guest read of a counter leaf (`record --snapshots`).
fn sample_with_reads() -> Report {
    let mut r = sample_report();
    r.leaves = Some(leaves());
    r.cpuid_reads.push(CpuidRead {
        ts_ns: 1,
        pid: 4242,
        tid: 4243,
        kind: Some(LeafKind::Count),
        leaf: 0x4fff_fffe,
        index: 10,
        eax: 737,
        ebx: 0,
        ecx: 0,
        edx: 0,
        isa: Isa::Vmx,
        host_reason_count: 737,
        host_total: 2550,
        host_all_vms: Some(2550),
        host_reason_count_at_entry: None,
        host_total_at_entry: None,
        host_all_vms_at_entry: None,
        host_ended_vms: None,
        host_synthetic: None,
        seen_by: vec![ReadSource::Registers],
        kvm_cpuid_differs: None,
    });
    r
}

fn guest_readout(schema: &str) -> GuestReadout {
    GuestReadout {
        schema: schema.to_owned(),
        isa: Isa::Vmx,
        leaves: leaves(),
        patched: true,
        detection: "counter leaves answer".to_owned(),
        total_exits: Some(2550),
        total_cycles: Some(1),
        reasons: Vec::new(),
        queries: 4,
        leaf_status: None,
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| panic!("serialize: {e}"))
}

/// A JSON text cut in half, on a character boundary.
fn truncated(text: &str) -> String {
    let mut end = text.len() / 2;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// One bad invocation and what its error line must contain.
struct Case {
    args: Vec<OsString>,
    /// Substrings of the error line: the offending file or value, and what is wrong.
    expect: Vec<String>,
}

fn case<A, E>(args: A, expect: E) -> Case
where
    A: IntoIterator,
    A::Item: Into<OsString>,
    E: IntoIterator,
    E::Item: Into<String>,
{
    Case {
        args: args.into_iter().map(Into::into).collect(),
        expect: expect.into_iter().map(Into::into).collect(),
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// Bad files for every subcommand that reads one: record JSON for `show`, both sides of
/// `diff` and `reconcile`; guest JSON for `reconcile --guest`.
fn file_cases(dir: &TempDir) -> Vec<Case> {
    let record = to_json(&sample_report());
    let good = dir.write("good.json", &record);
    let with_reads = dir.write("with-reads.json", to_json(&sample_with_reads()));
    let guest = to_json(&guest_readout(GUEST_SCHEMA));
    let missing = dir.0.join("missing.json");
    let a_dir = dir.0.join("a-directory.json");
    fs::create_dir_all(&a_dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", a_dir.display()));

    // (file, what the error line says besides the file name)
    let records: Vec<(PathBuf, &str)> = vec![
        (
            dir.write("truncated.json", truncated(&record)),
            "not a kvmtrace record",
        ),
        (
            dir.write("open-object.json", "{\"schema\":"),
            "not a kvmtrace record",
        ),
        (dir.write("array.json", "[]"), "not a kvmtrace record"),
        (
            dir.write("not-json.json", "not json"),
            "not a kvmtrace record",
        ),
        (dir.write("empty.json", ""), "not a kvmtrace record"),
        (
            dir.write(
                "garbage.json",
                [0x7f, b'E', b'L', b'F', 0xff, 0xfe, 0, 1, 2, 0x80],
            ),
            "not UTF-8",
        ),
        (
            dir.write("v0.json", record.replace(SCHEMA, "kvmtrace.record.v0")),
            "unsupported schema 'kvmtrace.record.v0'",
        ),
        (
            dir.write("v2.json", record.replace(SCHEMA, "kvmtrace.record.v2")),
            "unsupported schema 'kvmtrace.record.v2'",
        ),
        (
            dir.write("guest-as-record.json", &guest),
            "unsupported schema 'kvmtrace.guest.v1'",
        ),
        (missing.clone(), "cannot read"),
        (a_dir.clone(), "cannot read"),
    ];
    let mut cases = Vec::new();
    for (path, what) in &records {
        let p = display(path);
        cases.push(case([OsString::from("show"), path.into()], [&p, *what]));
        cases.push(case(
            [OsString::from("diff"), path.into(), good.clone().into()],
            [&p, *what],
        ));
        cases.push(case(
            [OsString::from("diff"), good.clone().into(), path.into()],
            [&p, *what],
        ));
        cases.push(case(
            [OsString::from("reconcile"), path.into()],
            [&p, *what],
        ));
    }
    // A well-formed record without `--snapshots` reads is not bad input: it has an exit
    // status of its own (tracer/tests/exit_status.rs).

    let guests: Vec<(PathBuf, &str)> = vec![
        (
            dir.write("guest-truncated.json", truncated(&guest)),
            "not a kvmtrace guest readout",
        ),
        (
            dir.write("guest-open-object.json", "{\"schema\":"),
            "not a kvmtrace guest readout",
        ),
        (
            dir.write("guest-array.json", "[]"),
            "not a kvmtrace guest readout",
        ),
        (
            dir.write("guest-not-json.json", "not json"),
            "not a kvmtrace guest readout",
        ),
        (
            dir.write("guest-empty.json", ""),
            "not a kvmtrace guest readout",
        ),
        (
            dir.write("guest-garbage.json", [0xc3, 0x28, 0xa0, 0xa1]),
            "not UTF-8",
        ),
        (
            dir.write(
                "guest-v0.json",
                to_json(&guest_readout("kvmtrace.guest.v0")),
            ),
            "unsupported schema 'kvmtrace.guest.v0'",
        ),
        (
            dir.write(
                "guest-v2.json",
                to_json(&guest_readout("kvmtrace.guest.v2")),
            ),
            "unsupported schema 'kvmtrace.guest.v2'",
        ),
        (
            dir.write("record-as-guest.json", &record),
            "unsupported schema 'kvmtrace.record.v1'",
        ),
        (missing, "cannot read"),
        (a_dir, "cannot read"),
    ];
    for (path, what) in &guests {
        cases.push(case(
            [
                OsString::from("reconcile"),
                with_reads.clone().into(),
                "--guest".into(),
                path.into(),
            ],
            [&display(path), *what],
        ));
    }
    // Guest symbol files for --rip rows.
    let symbols: Vec<(PathBuf, &str)> = vec![
        (
            dir.write("kallsyms-zeros.txt", "0000000000000000 T startup_64\n"),
            "no text symbols",
        ),
        (
            dir.write("kallsyms-bad.txt", "ffffffff81000000 T\n"),
            "line 1",
        ),
        (dir.0.join("missing-kallsyms"), "cannot read"),
    ];
    for (path, what) in &symbols {
        for cmd in ["show", "diff"] {
            let mut args = vec![OsString::from(cmd), good.clone().into()];
            if cmd == "diff" {
                args.push(good.clone().into());
            }
            args.extend([OsString::from("--guest-symbols"), path.into()]);
            cases.push(case(args, [&display(path), *what]));
        }
    }
    cases
}

/// Bad values of options and arguments.
fn argument_cases() -> Vec<Case> {
    let v = |s: &str| format!("'{s}'");
    vec![
        // Durations, intervals, counts.
        case(
            ["record", "--duration", "abc"],
            [v("abc"), "--duration".into()],
        ),
        case(["record", "-d", "0"], [v("0"), "positive".into()]),
        case(["record", "-d", "-1"], [v("-1")]),
        case(["record", "-d", "NaN"], [v("NaN"), "positive".into()]),
        case(["record", "-d", "1e30"], [v("1e30"), "out of range".into()]),
        case(["top", "--interval", "0"], [v("0"), "--interval".into()]),
        case(
            ["top", "-i", "soon"],
            [v("soon"), "number of seconds".into()],
        ),
        case(["top", "-n", "0"], [v("0"), "--iterations".into()]),
        case(["top", "-n", "many"], [v("many"), "--iterations".into()]),
        case(["top", "--rows", "-3"], [v("-3")]),
        case(
            ["record", "--max-overflow-rows", "0"],
            [v("0"), "--max-overflow-rows".into()],
        ),
        case(["record", "--max-vcpu-rows", "lots"], [v("lots")]),
        case(["record", "--rip", "0"], [v("0"), "--rip".into()]),
        case(["record", "--rip", "many"], [v("many"), "--rip".into()]),
        case(
            [
                "show",
                "x.json",
                "--guest-symbols",
                "m",
                "--kaslr-offset",
                "zz",
            ],
            [v("zz"), "hex".into()],
        ),
        case(
            ["show", "x.json", "--kaslr-offset", "0x1000"],
            ["--guest-symbols"],
        ),
        // Pids: malformed, out of range, gone.
        case(["record", "-p", "0"], [v("0"), "not a process id".into()]),
        case(
            ["record", "-p", "notapid"],
            [v("notapid"), "not a process id".into()],
        ),
        case(["record", "-p", "-1"], [v("-1")]),
        case(
            ["record", "-p", "4194304"],
            [v("4194304"), "not a process id".into()],
        ),
        case(["record", "-p", "99999999999"], [v("99999999999")]),
        case(["record", "-p", "4194303"], ["no process with pid 4194303"]),
        case(["top", "-p", "0"], [v("0"), "not a process id".into()]),
        case(
            ["export", "--listen", "localhost"],
            [v("localhost"), "--listen".into()],
        ),
        case(
            ["export", "--listen", "1.2.3.4:99999"],
            [v("1.2.3.4:99999")],
        ),
        case(
            ["export", "--retention", "0"],
            [v("0"), "--retention".into()],
        ),
        case(
            ["export", "--max-series", "0"],
            [v("0"), "number of series".into()],
        ),
        case(["export", "--per-vcpu=yes"], ["--per-vcpu"]),
        case(["top", "--pid", "x1"], [v("x1"), "not a process id".into()]),
        case(["record", "--vcpu", "first"], [v("first"), "--vcpu".into()]),
        case(["record", "-p", "1", "--", "qemu"], ["--pid", "CMD"]),
        case(
            ["record", "--counts-only", "--snapshots"],
            ["--counts-only", "--snapshots"],
        ),
        case(
            ["record", "--counts-only", "--per-vcpu"],
            ["--counts-only", "--per-vcpu"],
        ),
        case(
            ["record", "--counts-only", "--rip", "5"],
            ["--counts-only", "--rip"],
        ),
        // Leaf presets and leaf numbers.
        case(
            ["guest", "--preset", "nope"],
            [v("nope"), "unknown leaf preset".into()],
        ),
        case(
            ["record", "--preset", "nope"],
            [v("nope"), "unknown leaf preset".into()],
        ),
        case(
            ["record", "--snapshots", "--preset", "KVMTRACE"],
            [v("KVMTRACE"), "unknown leaf preset".into()],
        ),
        case(
            ["guest", "--count-leaf", "zz"],
            [v("zz"), "not a CPUID leaf".into()],
        ),
        case(
            ["guest", "--total-leaf", "0x1ffffffff"],
            [v("0x1ffffffff"), "not a CPUID leaf".into()],
        ),
        case(["record", "--cycles-leaf", "-1"], [v("-1")]),
        case(
            ["guest", "--count-leaf", "0x+5"],
            [v("0x+5"), "not a CPUID leaf".into()],
        ),
        // Reasons and isas: `reasons` takes no reason argument.
        case(["reasons", "abc"], [v("abc"), "unexpected argument".into()]),
        case(
            ["reasons", "0x1ffffffff"],
            [v("0x1ffffffff"), "unexpected argument".into()],
        ),
        case(["reasons", "-1"], [v("-1"), "unexpected argument".into()]),
        case(
            ["reasons", "--isa", "arm"],
            [v("arm"), "unknown isa".into()],
        ),
        case(["guest", "--isa", "x86"], [v("x86"), "unknown isa".into()]),
        // Formats, missing arguments, unknown words.
        case(
            ["show", "--format", "xml", "r.json"],
            [v("xml"), "possible values".into()],
        ),
        case(["diff", "--format", "pdf", "a.json", "b.json"], [v("pdf")]),
        case(["reconcile", "--format", "csv", "r.json"], [v("csv")]),
        case(["guest", "-f", "yaml"], [v("yaml")]),
        case(["show"], ["<RECORD>", "show --help"]),
        case(["diff", "a.json"], ["<B>", "diff --help"]),
        case(["reconcile"], ["<RECORD>"]),
        case(["reconcile", "r.json", "--guest"], ["--guest"]),
        case(
            [
                "reconcile",
                "r.json",
                "--accept",
                "fastpath_not_counted,nope",
            ],
            [
                v("nope"),
                "unknown cause".into(),
                "fastpath_not_counted".into(),
            ],
        ),
        case(
            ["reconcile", "r.json", "--accept", "unexplained"],
            [v("unexplained"), "not a fault to accept".into()],
        ),
        case(["shw", "r.json"], [v("shw"), "show".into()]),
        case(
            ["show", "--formt", "json", "r.json"],
            [v("--formt"), "--format".into()],
        ),
        case(
            ["record", "--exit-tracepoint", "kvm_exit"],
            [v("kvm_exit"), "category:name".into()],
        ),
        // The host would count one vCPU while the guest reads the whole VM.
        case(
            ["record", "--vcpu", "1", "--snapshots"],
            ["--vcpu", "--snapshots", "the whole VM"],
        ),
        // Output paths, checked before the run.
        case(
            ["record", "-o", "/nonexistent-kvmtrace-dir/r.json"],
            [
                "/nonexistent-kvmtrace-dir/r.json",
                "directory /nonexistent-kvmtrace-dir does not exist",
            ],
        ),
        case(
            ["record", "-d", "1", "-o", "/"],
            ["cannot write /", "it is a directory"],
        ),
    ]
}

/// Runs `kvmtrace args...` with a time limit; returns (exit code, stdout, stderr).
fn run(args: &[OsString]) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvmtrace"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run kvmtrace {args:?}: {e}"));
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > CASE_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return (None, String::new(), "still running: killed".to_owned());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("wait for kvmtrace {args:?}: {e}"),
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    (status.code(), out, err)
}

/// What is wrong with one case's outcome, if anything.
fn check(case: &Case) -> Option<String> {
    let (code, stdout, stderr) = run(&case.args);
    let line = stderr.strip_suffix('\n').unwrap_or(&stderr);
    let mut problems = Vec::new();
    if code != Some(2) {
        problems.push(format!("exit status {code:?}, not 2"));
    }
    if !stdout.is_empty() {
        problems.push(format!("stdout is not empty: {stdout:?}"));
    }
    if line.trim().is_empty() || line.contains('\n') {
        problems.push("stderr is not exactly one non-empty line".to_owned());
    }
    if !line.starts_with("kvmtrace: ") {
        problems.push("the line does not start with `kvmtrace: `".to_owned());
    }
    for want in &case.expect {
        if !line.contains(want.as_str()) {
            problems.push(format!("the line does not say {want:?}"));
        }
    }
    (!problems.is_empty()).then(|| {
        format!(
            "kvmtrace {}: {}\n  stderr: {stderr:?}",
            case.args
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            problems.join("; ")
        )
    })
}

fn check_all(cases: &[Case]) {
    let failures: Vec<String> = cases.iter().filter_map(check).collect();
    assert!(
        failures.is_empty(),
        "{} of {} bad inputs were not rejected as they should be:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn bad_files_are_one_line_and_exit_2() {
    let dir = TempDir::new("files");
    let cases = file_cases(&dir);
    assert!(cases.len() > 50, "{} cases", cases.len());
    check_all(&cases);
}

#[test]
fn bad_arguments_are_one_line_and_exit_2() {
    check_all(&argument_cases());
}

#[test]
fn the_sample_files_are_good() {
    // The bad cases above are bad for the reason they name, not because the good files
    // they pair with are broken.
    let dir = TempDir::new("good");
    let good = dir.write("good.json", to_json(&sample_report()));
    let reads = dir.write("reads.json", to_json(&sample_with_reads()));
    let guest = dir.write("guest.json", to_json(&guest_readout(GUEST_SCHEMA)));
    for args in [
        vec![OsString::from("show"), good.clone().into()],
        vec!["diff".into(), good.clone().into(), good.into()],
        vec![
            "reconcile".into(),
            reads.into(),
            "--guest".into(),
            guest.into(),
        ],
    ] {
        let (code, stdout, stderr) = run(&args);
        assert_eq!(code, Some(0), "kvmtrace {args:?}: {stderr}");
        assert!(!stdout.is_empty(), "kvmtrace {args:?} printed nothing");
    }
}

#[test]
fn help_and_version_still_work() {
    for args in [["--help"], ["--version"], ["-V"]] {
        let (code, stdout, stderr) = run(&args.map(OsString::from));
        assert_eq!(code, Some(0), "kvmtrace {args:?}: {stderr}");
        assert!(stdout.contains("kvmtrace"), "{stdout}");
        assert!(stderr.is_empty(), "{stderr}");
    }
    for cmd in [
        "record",
        "show",
        "reasons",
        "diff",
        "guest",
        "reconcile",
        "top",
        "export",
    ] {
        let (code, stdout, _) = run(&[cmd.into(), "--help".into()]);
        assert_eq!(code, Some(0), "kvmtrace {cmd} --help");
        assert!(stdout.contains("Usage: kvmtrace"), "{cmd}: {stdout}");
    }
}
