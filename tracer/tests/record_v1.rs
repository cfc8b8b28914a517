//! A `kvmtrace.record.v1` report as the first release wrote it must keep parsing and
//! rendering the same: `fixtures/record-v1.json` was written by that release's own
//! writer (`Report::build` + `render --format json`, commit f735806), for a record made
//! with `--snapshots -- CMD` across a reload of kvm_intel (ept=1, then ept=0): two VMs,
//! one with two vCPUs, guest counter reads, histograms, a non-zero `dropped` and
//! `cost`. Do not regenerate it: it stands for files users already have.

mod common;

use chrono::{TimeZone as _, Utc};
use common::{kvmtrace, run, stderr, stdout};
use kvmtrace_model::{
    exit_reasons::Isa,
    latency::Bucket,
    report::{LeafKind, Report, SCHEMA, Totals},
};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/record-v1.json");

fn fixture() -> Report {
    let text = std::fs::read_to_string(FIXTURE).unwrap_or_else(|e| panic!("read {FIXTURE}: {e}"));
    Report::from_json(&text).unwrap_or_else(|e| panic!("parse {FIXTURE}: {e}"))
}

fn totals(count: u64, timed: u64, time_ns: u64) -> Totals {
    Totals {
        count,
        timed,
        time_ns,
        // The fixture predates max_ns: it reads as 0.
        max_ns: 0,
    }
}

#[test]
fn the_v1_fixture_parses_with_every_section() {
    let r = fixture();
    assert_eq!(r.schema, SCHEMA);
    assert_eq!(r.kvmtrace_version, "0.1.0");
    assert_eq!(r.kernel_release, "6.1.0-27-cloud-amd64");
    let paging = r.paging.as_ref().map(|p| (p.module.as_str(), p.nested));
    assert_eq!(paging, Some(("kvm_intel", true)));
    let t0 = Utc
        .with_ymd_and_hms(2026, 11, 24, 16, 0, 0)
        .single()
        .unwrap_or_else(|| panic!("t0"));
    assert_eq!(r.started_at, t0);
    assert_eq!(r.duration_ns, 2_750_000_000);
    assert_eq!(r.filter.pids, [4240]);
    assert_eq!(r.filter.vcpu, None);
    assert_eq!(r.total, totals(11_993, 11_991, 140_433_000));

    // Reasons, most exits first, with histograms.
    assert_eq!(r.reasons.len(), 11);
    let io = &r.reasons[0];
    assert_eq!(
        (io.isa, io.reason, io.name.as_str(), io.failed_entry),
        (Isa::Vmx, 30, "IO_INSTRUCTION", false)
    );
    assert_eq!(io.totals, totals(2495, 2495, 112_275_000));
    assert_eq!(io.mean_ns, Some(45_000));
    assert_eq!(
        io.histogram,
        [
            Bucket {
                from_ns: 32_768,
                to_ns: Some(65_536),
                count: 2246
            },
            Bucket {
                from_ns: 65_536,
                to_ns: Some(131_072),
                count: 249
            },
        ]
    );
    let hlt = r.reasons.iter().find(|x| x.reason == 12);
    assert_eq!(hlt.map(|h| h.totals), Some(totals(6, 4, 8_000_000)));

    // VMs and per-vCPU rows, which add up to them.
    assert_eq!(r.vms.len(), 2);
    assert_eq!(r.vms[0].pid, 4242);
    assert_eq!(r.vms[0].comm.as_deref(), Some("qemu-system-x86"));
    assert_eq!(r.vms[0].totals, totals(7641, 7640, 124_972_500));
    assert_eq!(r.vms[1].totals, totals(4352, 4351, 15_460_500));
    assert_eq!(r.vcpus.len(), 21);
    for vm in &r.vms {
        let sum: u64 = r
            .vcpus
            .iter()
            .filter(|v| v.pid == vm.pid)
            .map(|v| v.totals.count)
            .sum();
        assert_eq!(sum, vm.totals.count, "VM {}", vm.pid);
    }
    let row = r
        .vcpus
        .iter()
        .find(|v| (v.pid, v.vcpu_id, v.reason) == (4242, 1, 7));
    assert_eq!(
        row.map(|v| (v.name.as_str(), v.totals)),
        Some(("INTERRUPT_WINDOW", totals(728, 728, 582_400)))
    );

    // Dropped: one forked process not traced, nothing else.
    assert_eq!(r.dropped.filter_map_full, 1);
    assert_eq!(r.dropped.exit_map_full + r.dropped.vcpu_map_full, 0);
    assert!(r.dropped.any());

    // Phases: a reload of kvm_intel from ept=1 to ept=0.
    let phases: Vec<(u32, Option<bool>, u64)> = r
        .phases
        .iter()
        .map(|p| (p.phase, p.paging.as_ref().map(|x| x.nested), p.total.count))
        .collect();
    assert_eq!(phases, [(0, Some(true), 7641), (1, Some(false), 4352)]);
    assert_eq!(
        r.phases[1].since.map(|s| s.to_rfc3339()),
        Some("2026-11-24T16:00:01.400+00:00".to_owned())
    );

    // Cost.
    let cost = r.cost.as_ref().unwrap_or_else(|| panic!("no cost"));
    assert_eq!(
        (cost.attach_ns, cost.peak_rss_kib, cost.bpf_stats),
        (21_400_000, 5120, true)
    );
    let exit = cost.programs.iter().find(|p| p.name == "kvm_exit");
    assert_eq!(
        exit.map(|p| (p.run_count, p.run_time_ns, p.jited_bytes)),
        Some((11_993, 3_358_040, 1980))
    );
    assert_eq!(cost.programs.len(), 6);

    // Counter-leaf snapshots.
    let leaves = r.leaves.unwrap_or_else(|| panic!("no leaves"));
    assert_eq!(
        (leaves.count, leaves.total, leaves.cycles),
        (0x4fff_fffe, Some(0x4fff_ffff), Some(0x4fff_fffd))
    );
    assert_eq!(r.cpuid_reads.len(), 30);
    let read = &r.cpuid_reads[2];
    assert_eq!(read.kind, Some(LeafKind::Count));
    assert_eq!(
        (
            read.pid,
            read.tid,
            read.index,
            read.eax,
            read.host_reason_count,
            read.host_total
        ),
        (4242, 4243, 1, 1129, 1129, 7625)
    );
    let undefined = r
        .cpuid_reads
        .iter()
        .find(|x| x.index == 35 && x.kind == Some(LeafKind::Count));
    assert_eq!(undefined.map(|x| x.edx), Some(0xffff_ffff));
}

#[test]
fn kvmtrace_show_renders_the_v1_fixture() {
    let out = run(kvmtrace().args(["show", FIXTURE]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "kernel 6.1.0-27-cloud-amd64, the kvm vendor module was reloaded: phase 0 ept=1, phase 1 ept=0, 2.75 s, 11993 exits"
    );
    for row in [
        // No histograms and no max in a v1 record from before them: "-".
        "│     30 ┆ IO_INSTRUCTION     ┆  2495 ┆    20.8 ┆  112.28 ms ┆ 45.00 µs ┆     - ┆     - ┆   - │",
        "│     28 ┆ CR_ACCESS          ┆  1760 ┆    14.7 ┆    2.11 ms ┆  1.20 µs ┆     - ┆     - ┆   - │",
        "│     12 ┆ HLT                ┆     6 ┆     0.1 ┆    8.00 ms ┆  2.00 ms ┆     - ┆     - ┆   - │",
        // The phase table.
        "│        ┆ all                ┆          7641 ┆          4352 │",
        "│     10 ┆ CPUID              ┆           737 ┆          1003 │",
        "│     48 ┆ EPT_VIOLATION      ┆           426 ┆             - │",
    ] {
        assert!(lines.contains(&row), "no row {row}:\n{text}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("warning: incomplete data")),
        "the dropped fork is reported:\n{text}"
    );

    let out = run(kvmtrace().args(["show", "--per-vcpu", FIXTURE]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for row in [
        "│ 4242 qemu-system-x86 ┆    1 ┆      7 ┆ INTERRUPT_WINDOW   ┆   728 ┆     6.1 ┆  582.40 µs ┆   800 ns ┆   - │",
        "│ 4300 qemu-system-x86 ┆    0 ┆     12 ┆ HLT                ┆     1 ┆     0.0 ┆          - ┆        - ┆   - │",
    ] {
        assert!(text.lines().any(|l| l == row), "no row {row}:\n{text}");
    }

    // The reads reconcile exactly, as they did when the record was written.
    let out = run(kvmtrace().args(["reconcile", FIXTURE]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(
            "17 guest counter reads: 16 exact, 1 undefined reason answered as such; 0 unexplained\n"
        ),
        "{}",
        stdout(&out)
    );
}
