//! The lab end-to-end tests: a real KVM (kvm_intel under Bochs, kvm_amd under QEMU TCG)
//! runs a real guest, and kvmtrace's counts must equal the kernel's own hist trigger on
//! kvm:kvm_exit exactly, reason by reason, in nested and shadow paging.
//!
//! Each scenario boots once (`cargo xtask lab`), the first time a test asks for it.

use kvmtrace_e2e::{
    Scenario, assert_l2_ended, assert_matches_hist, assert_vcpus_sum, count_of, counts,
    differences, hist, l2_ended, lab, mode_dir, read, reason_counts, record, whole_record,
};
use kvmtrace_model::{
    exit_reasons::Isa,
    reconcile::{Verdict, reconcile},
    verdict::Outcome,
};

const fn boot(isa: &'static str) -> Scenario {
    Scenario::boot(isa)
}

const fn micro(isa: &'static str) -> Scenario {
    Scenario {
        workload: "micro",
        ..Scenario::boot(isa)
    }
}

fn boot_matches_hist(isa: &'static str) {
    for nested in [true, false] {
        let dir = mode_dir(boot(isa), nested);
        assert_l2_ended(&dir);
        assert_matches_hist(&dir);
    }
}

/// Nested-paging exits exist only with nested paging; #PF and CR exits explode without.
fn paging_exits_move(isa: &'static str, nested_only: &[&str], shadow_up: &[&str]) {
    let nested = record(&mode_dir(boot(isa), true));
    let shadow = record(&mode_dir(boot(isa), false));
    assert_eq!(nested.paging.as_ref().map(|p| p.nested), Some(true));
    assert_eq!(shadow.paging.as_ref().map(|p| p.nested), Some(false));
    for name in nested_only {
        assert!(count_of(&nested, name) > 0, "no {name} with nested paging");
        assert_eq!(count_of(&shadow, name), 0, "{name} with shadow paging");
    }
    for name in shadow_up {
        let (n, s) = (count_of(&nested, name), count_of(&shadow, name));
        assert!(
            s > 1000 && s >= 10 * n.max(1),
            "{name}: nested {n}, shadow {s}"
        );
    }
    assert!(shadow.total.count > 3 * nested.total.count);
}

/// The micro VMM runs exactly 1000 CPUIDs, 100 port writes and one HLT, then reads the
/// patched KVM's CPUID and I/O counts and the total (three more CPUID exits). The leaves
/// must give exactly the known counts, each query counting itself, and exactly what the
/// host saw at that instant.
fn micro_counts_are_exact(s: Scenario, cpuid: &str, io: &str, hlt: &str) {
    let isa = s.isa;
    for nested in [true, false] {
        let dir = mode_dir(s, nested);
        assert_matches_hist(&dir);
        let rec = record(&dir);
        assert_eq!(count_of(&rec, cpuid), 1000 + 3, "{}", dir.display());
        assert_eq!(count_of(&rec, io), 100, "{}", dir.display());
        assert_eq!(count_of(&rec, hlt), 1, "{}", dir.display());
        assert!(
            rec.reasons
                .iter()
                .all(|r| r.isa == if isa == "intel" { Isa::Vmx } else { Isa::Svm })
        );
        let serial = read(&dir.join("serial.log"));
        let leaves = serial
            .lines()
            .find_map(|l| {
                l.split_once("micro: leaves ")
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| panic!("{}: no leaf line", dir.display()));
        let field = |name: &str| {
            leaves
                .split_whitespace()
                .find_map(|kv| {
                    kv.strip_prefix(name)?
                        .strip_prefix('=')?
                        .parse::<u64>()
                        .ok()
                })
                .unwrap_or_else(|| panic!("no {name} in {leaves}"))
        };
        assert_eq!(
            field("cpuid"),
            1001,
            "the 1000 CPUIDs and this query: {leaves}"
        );
        assert_eq!(field("io"), 100, "{leaves}");
        assert!(field("total") >= 1000 + 100 + 3, "{leaves}");
        let r = reconcile(&rec);
        assert_eq!(r.verdict.reads, 3, "{}", dir.display());
        assert!(
            r.rows.iter().all(|x| x.verdict == Verdict::Exact),
            "{:#?}",
            r.rows
        );
    }
}

#[test]
fn intel_boot_matches_hist_in_both_modes() {
    boot_matches_hist("intel");
}

#[test]
fn intel_paging_exits_move() {
    paging_exits_move(
        "intel",
        &["EPT_VIOLATION", "EPT_MISCONFIG"],
        &["EXCEPTION_NMI", "CR_ACCESS"],
    );
}

#[test]
#[ignore = "the 6.12 and 5.10 Intel micro runs check the same counts in the default run: cargo xtask test --full"]
fn intel_micro_counts_are_exact() {
    micro_counts_are_exact(micro("intel"), "CPUID", "IO_INSTRUCTION", "HLT");
}

/// Two vCPUs (the micro VMM's threads, both running CPUIDs and port writes): every
/// (vCPU, reason) row equals the hist's, and the rows sum to the totals.
fn two_vcpus_rows_sum_to_totals(isa: &'static str) {
    let s = Scenario {
        extra: &["--micro-vcpus", "2"],
        tag: "2vcpus",
        ..micro(isa)
    };
    for nested in [true, false] {
        let dir = mode_dir(s, nested);
        assert_matches_hist(&dir);
        assert_vcpus_sum(&dir, 2);
    }
}

#[test]
#[ignore = "one ISA per claim in the default run: cargo xtask test --full"]
fn intel_two_vcpus_rows_sum_to_totals() {
    two_vcpus_rows_sum_to_totals("intel");
}

#[test]
fn amd_two_vcpus_rows_sum_to_totals() {
    two_vcpus_rows_sum_to_totals("amd");
}

#[test]
fn amd_boot_matches_hist_in_both_modes() {
    boot_matches_hist("amd");
}

#[test]
fn amd_paging_exits_move() {
    paging_exits_move("amd", &["NPF"], &["EXCP_PF", "WRITE_CR3"]);
}

#[test]
fn amd_lab_writes_the_ab_report() {
    let dir = kvmtrace_e2e::lab(boot("amd"));
    let md = read(&dir.join("report.md"));
    assert!(
        md.contains("| NPF |") && md.contains("| WRITE_CR3 |"),
        "{md}"
    );
    assert!(
        md.contains("npt1: ") && md.contains("0 unexplained"),
        "{md}"
    );
    assert!(read(&dir.join("report.svg")).starts_with("<svg"));
    // The why column cites the data (the lab records with --detail --rip 5): where the
    // CR3 writes come from, and which MMIO the nested page faults are.
    assert!(md.contains("mostly at load_new_mm_cr3"), "{md}");
    assert!(md.contains("(IOAPIC)"), "{md}");
}

/// The boot recorded with `--detail --rip 5` (the lab's default): shadow paging's
/// CR_ACCESS exits are CR3 writes from the guest's address-space switch, its #PF exits
/// are page faults, and the kernel's own triggers agree row by row (the lab checks every
/// row; here the causes a user reads).
#[test]
fn intel_detail_names_the_causes() {
    let dir = mode_dir(boot("intel"), false);
    let rec = record(&dir);
    let reason = |name: &str| {
        rec.reasons
            .iter()
            .find(|r| r.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {}", dir.display()))
    };
    let cr = reason("CR_ACCESS");
    assert_eq!(cr.detail.first().map(|d| d.key.as_str()), Some("cr3:write"));
    assert!(
        cr.detail[0].totals.count * 10 >= cr.totals.count * 9,
        "{:?}",
        cr.detail
    );
    let pf = reason("EXCEPTION_NMI");
    assert_eq!(pf.detail.first().map(|d| d.key.as_str()), Some("14"), "#PF");
    assert_eq!(cr.rips.len(), 5);
    let table = read(&dir.join("detail-table.txt"));
    assert!(table.contains("load_new_mm_cr3+"), "{table}");
    let nested = record(&mode_dir(boot("intel"), true));
    let ept = nested
        .reasons
        .iter()
        .find(|r| r.name == "EPT_VIOLATION")
        .map(|r| r.detail.clone())
        .unwrap_or_default();
    assert!(ept.iter().any(|d| d.kind == "gpa"), "{ept:?}");
}

#[test]
fn amd_micro_counts_are_exact() {
    micro_counts_are_exact(micro("amd"), "CPUID", "IOIO", "HLT");
}

fn guest_json(dir: &std::path::Path) -> serde_json::Value {
    let text = read(&dir.join("guest.json"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", dir.display()))
}

/// The guest's reads of the patched KVM's leaves equal the host's count at that instant,
/// for every reason and the total, in both paging modes.
fn patched_counters_reconcile(isa: &'static str) {
    for nested in [true, false] {
        let dir = mode_dir(boot(isa), nested);
        let guest = guest_json(&dir);
        assert_eq!(
            guest["patched"],
            true,
            "{}: {}",
            dir.display(),
            guest["detection"]
        );
        let rec = record(&dir);
        let r = reconcile(&rec);
        assert!(
            r.verdict.reads > 60,
            "{}: only {} reads",
            dir.display(),
            r.verdict.reads
        );
        let bad: Vec<_> = r.rows.iter().filter(|x| !x.verdict.is_ok()).collect();
        assert!(bad.is_empty(), "{}: {bad:#?}", dir.display());
        // The guest printed what the host saw it read (its last read of each reason:
        // reason 0 is also read once early, to detect the patch).
        let reasons = guest["reasons"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_else(|| panic!("{}: guest.json has no reasons array", dir.display()));
        assert!(
            !reasons.is_empty(),
            "{}: the guest printed no reason it read",
            dir.display()
        );
        for g in reasons {
            let reason = g["reason"].as_u64().and_then(|n| u32::try_from(n).ok());
            let host_row = r.rows.iter().rfind(|x| x.reason == reason);
            assert_eq!(
                host_row.map(|x| x.guest),
                g["count"].as_u64(),
                "{}: reason {reason:?}",
                dir.display()
            );
        }
    }
}

#[test]
fn intel_patched_counters_reconcile_exactly() {
    patched_counters_reconcile("intel");
}

#[test]
fn amd_patched_counters_reconcile_exactly() {
    patched_counters_reconcile("amd");
}

/// Stock kvm_amd answers the counter leaf with zeros, even about CPUID exits, one of
/// which the query itself is. (On the 6.12 line's stock boot, as for Intel.)
#[test]
fn amd_stock_kvm_is_told_apart() {
    let s = stock_on_6_12("amd");
    let guest = guest_json(&mode_dir(s, true));
    assert_eq!(guest["patched"], false, "{guest}");
    assert!(
        guest["detection"]
            .as_str()
            .is_some_and(|d| d.contains("not patched"))
    );
    assert_matches_hist(&mode_dir(s, true));
}

/// Stock kvm_intel answers the counter leaf with the highest basic leaf's data (0xD,
/// XSAVE), which the guest tool recognises instead of printing it as counts. (On the
/// 6.12 line's stock boot, which the default run boots anyway.)
#[test]
fn intel_stock_kvm_is_told_apart() {
    let s = stock_on_6_12("intel");
    let guest = guest_json(&mode_dir(s, true));
    assert_eq!(guest["patched"], false, "{guest}");
    let detection = guest["detection"].as_str().unwrap_or_default();
    assert!(
        detection.contains("answers like basic leaf 0xd"),
        "{detection}"
    );
    assert_matches_hist(&mode_dir(s, true));
}

/// Counting only in the exit handler misses exactly the fastpath exits (TSC-deadline
/// WRMSRs, preemption timer), in both modes; their cycles, never counted either, are
/// not blamed on the cycles leaf.
#[test]
#[ignore = "variant matrix (the default run names a foreign patch's cause with amd_survives_reload_build_is_blamed_on_carried_over_counts): cargo xtask test --full"]
fn intel_slowpath_only_build_is_blamed_on_fastpath_exits() {
    let s = variant("slowpath-only", boot("intel"));
    assert_eq!(causes(s), [Verdict::FastpathNotCounted].into());
    let r = reconcile(&record(&mode_dir(s, true)));
    assert!(
        r.rows
            .iter()
            .any(|x| x.verdict == Verdict::FastpathNotCounted
                && matches!(x.name.as_str(), "PREEMPTION_TIMER" | "MSR_WRITE")),
        "{:#?}",
        r.rows
    );
}

/// Counters in kvm.ko survive the reload of kvm_amd between the modes: npt=1, the
/// first load, is exact; npt=0 starts from npt=1's counts, carried over (no other VM
/// runs, so nothing is shared).
#[test]
fn amd_survives_reload_build_is_blamed_on_carried_over_counts() {
    let s = variant("survives-reload", boot("amd"));
    assert_eq!(causes_in(s, true), [].into());
    assert_eq!(causes_in(s, false), [Verdict::CarriedOver].into());
}

/// The same global counters with VMs one after the other: the second VM reads the
/// first's exits, which ended before it started: carried over, not shared.
#[test]
#[ignore = "variant matrix: cargo xtask test --full"]
fn amd_survives_reload_second_vm_carries_the_first() {
    let s = Scenario {
        vms: 2,
        ..variant("survives-reload", micro("amd"))
    };
    assert_eq!(causes(s), [Verdict::CarriedOver].into());
}

/// And with VMs at the same time: a short VM's reads while the long one runs hold the
/// long one's exits (shared), the next short VM's also the first short one's, which
/// had ended (carried over).
#[test]
#[ignore = "variant matrix: cargo xtask test --full"]
fn amd_survives_reload_concurrent_vms_share_counters() {
    let s = Scenario {
        workload: "churn",
        tag: "churn",
        extra: &["--micro-cpuids", "1000", "--micro-outs", "10"],
        ..variant("survives-reload", micro("amd"))
    };
    assert_eq!(
        causes_in(s, true),
        [Verdict::SharedAcrossVms, Verdict::CarriedOver].into()
    );
    let dir = mode_dir(s, true);
    let r = reconcile(&record(&dir));
    assert!(
        r.rows
            .iter()
            .any(|x| x.verdict == Verdict::SharedAcrossVms && x.causes.is_empty()),
        "{}: no read shared only: {:#?}",
        dir.display(),
        r.rows
    );
}

/// One plain array per VM that both vCPUs add to, in an L1 with two CPUs (QEMU's
/// multi-threaded TCG: Bochs runs its CPUs one instruction at a time and cannot
/// race): the vCPUs lose updates, in both modes, and nothing else is wrong. A million
/// CPUIDs per vCPU: 300 000 lost only 6 to 14 updates here, a million 59 to 151.
#[test]
#[ignore = "variant matrix: cargo xtask test --full"]
fn amd_racy_shared_counters_lose_updates_with_two_vcpus() {
    let s = Scenario {
        tag: "2vcpus",
        extra: &[
            "--micro-vcpus",
            "2",
            "--l1-cpus",
            "2",
            "--micro-cpuids",
            "1000000",
        ],
        ..variant("racy-shared", micro("amd"))
    };
    for nested in [true, false] {
        assert_eq!(
            causes_in(s, nested),
            [Verdict::LostUpdates].into(),
            "npt={}",
            u8::from(nested)
        );
    }
}

/// Every ECX in 0..=0xFFFF and the 32-bit edges, on the count and cycles leaves, is
/// answered as the tables say (undefined: EDX = 0xFFFFFFFF and zeros), and L1's kernel
/// logs no BUG, WARNING or oops. (Recorded without snapshots: 131 078 reads would not
/// fit through the serial console.)
fn sweep_classifies_every_ecx(isa: &'static str) {
    let s = Scenario {
        workload: "sweep",
        ..boot(isa)
    };
    for nested in [true, false] {
        let dir = mode_dir(s, nested);
        assert_matches_hist(&dir);
        let text = read(&dir.join("sweep.json"));
        let sweep: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: {e}\n{text}", dir.display()));
        assert_eq!(sweep["queried"], 2 * (0x10000 + 3), "{text}");
        assert_eq!(sweep["mismatches"], 0, "{text}");
        assert!(
            sweep["undefined"].as_u64().is_some_and(|n| n > 2 * 0xff00),
            "{text}"
        );
        // The sweep's own CPUID exits are all there on the host.
        assert!(
            count_of(&record(&dir), "CPUID") > 2 * 0x10000,
            "{}",
            dir.display()
        );
        let dmesg = read(&dir.join("dmesg-bad.txt"));
        let mut lines = dmesg.lines().filter(|l| !l.trim().is_empty());
        let logged = lines
            .next()
            .and_then(|l| l.strip_prefix("dmesg lines="))
            .and_then(|n| n.trim().parse::<u32>().ok());
        assert!(
            logged.is_some_and(|n| n > 50),
            "{}: dmesg was not read: {dmesg}",
            dir.display()
        );
        let complaints: Vec<&str> = lines.collect();
        assert!(complaints.is_empty(), "{}: {complaints:?}", dir.display());
    }
}

#[test]
#[ignore = "one ISA per claim in the default run: cargo xtask test --full"]
fn intel_sweep_classifies_every_ecx() {
    sweep_classifies_every_ecx("intel");
}

#[test]
fn amd_sweep_classifies_every_ecx() {
    sweep_classifies_every_ecx("amd");
}

/// Two VMs one after the other: each VM's guest reads equal the host's count for that
/// VM alone, so the second starts from zero.
#[test]
fn amd_second_vm_starts_from_zero() {
    let s = Scenario {
        vms: 2,
        ..boot("amd")
    };
    for nested in [true, false] {
        let dir = mode_dir(s, nested);
        assert_matches_hist(&dir);
        let rec = record(&dir);
        assert_eq!(rec.vms.len(), 2, "{}: {:?}", dir.display(), rec.vms);
        let r = reconcile(&rec);
        let pids: std::collections::BTreeSet<u32> = r.rows.iter().map(|x| x.pid).collect();
        assert_eq!(pids.len(), 2, "both VMs read their counters");
        assert!(
            r.rows.iter().all(|x| x.verdict.is_ok()),
            "{}: {:#?}",
            dir.display(),
            r.rows
        );
        // The second VM's total is its own, far below both VMs' exits together.
        let totals: Vec<u64> = r
            .rows
            .iter()
            .filter(|x| x.reason.is_none())
            .map(|x| x.guest)
            .collect();
        assert_eq!(totals.len(), 2);
        assert!(
            totals[1] < rec.total.count / 2 + rec.total.count / 4,
            "{totals:?} vs {}",
            rec.total.count
        );
    }
}

/// `rmmod kvm_intel; insmod kvm-intel.ko ept=0` (or kvm_amd's npt=0) while one
/// `kvmtrace record` runs: it keeps running (its tracepoints live in kvm.ko) and reports
/// each load as a phase with its paging mode, each equal to the hist of that load.
fn reload_mid_record_reports_each_phase(isa: &'static str, expected: [&str; 2]) {
    let s = Scenario {
        extra: &["--scenario", "reload"],
        tag: "reload",
        ..micro(isa)
    };
    let rec = whole_record(s);
    let with_exits: Vec<_> = rec.phases.iter().filter(|p| p.total.count > 0).collect();
    let labels: Vec<String> = with_exits
        .iter()
        .map(|p| p.paging.as_ref().map_or("?".into(), |g| g.label()))
        .collect();
    assert_eq!(labels, expected, "{:#?}", rec.phases);
    let mut all = 0;
    for (phase, nested) in with_exits.iter().zip([true, false]) {
        let h = hist(&mode_dir(s, nested));
        let diffs = differences(&reason_counts(&phase.reasons), &h);
        assert!(diffs.is_empty(), "phase {}: {diffs:?}", phase.phase);
        all += h.values().sum::<u64>();
    }
    assert_eq!(rec.total.count, all);
    assert!(!rec.dropped.any(), "{:?}", rec.dropped);
    assert_eq!(rec.vms.len(), 2, "one micro VM per load: {:?}", rec.vms);
    assert_eq!(counts(&rec).values().sum::<u64>(), all);
}

#[test]
#[ignore = "one ISA per claim in the default run: cargo xtask test --full"]
fn intel_reload_mid_record_reports_each_phase() {
    reload_mid_record_reports_each_phase("intel", ["ept=1", "ept=0"]);
}

#[test]
fn amd_reload_mid_record_reports_each_phase() {
    reload_mid_record_reports_each_phase("amd", ["npt=1", "npt=0"]);
}

/// SIGINT and SIGTERM (one per mode) reach `kvmtrace record -- micro` while the VM still
/// runs: the VM is stopped, and the report has every exit it made, equal to the hist.
#[test]
fn amd_signals_mid_run_keep_the_report_complete() {
    let s = Scenario {
        extra: &["--scenario", "signal", "--micro-cpuids", "50000000"],
        tag: "signal",
        ..micro("amd")
    };
    for (nested, signal) in [(true, "SIGINT"), (false, "SIGTERM")] {
        let dir = mode_dir(s, nested);
        assert!(
            !l2_ended(&dir),
            "{}: the VM ended on its own",
            dir.display()
        );
        assert_matches_hist(&dir);
        let rec = record(&dir);
        assert!(
            count_of(&rec, "CPUID") > 1000,
            "{}: the VM hardly ran",
            dir.display()
        );
        let stderr = read(&dir.join("kvmtrace.stderr"));
        assert!(stderr.contains(&format!("stopped by {signal}")), "{stderr}");
    }
}

/// A long VM runs while two short ones start and stop: every VM keeps its own rows,
/// each with exactly its own CPUID, I/O and HLT exits.
#[test]
fn amd_vms_starting_and_stopping_keep_their_rows() {
    let s = Scenario {
        workload: "churn",
        tag: "churn",
        extra: &["--micro-cpuids", "1000", "--micro-outs", "10"],
        ..micro("amd")
    };
    for nested in [true, false] {
        let dir = mode_dir(s, nested);
        assert_matches_hist(&dir);
        let rec = record(&dir);
        let mut per_vm: Vec<(u64, u64, u64)> = rec
            .vms
            .iter()
            .map(|vm| {
                let of = |name: &str| -> u64 {
                    rec.vcpus
                        .iter()
                        .filter(|v| v.pid == vm.pid && v.name == name)
                        .map(|v| v.totals.count)
                        .sum()
                };
                (of("CPUID"), of("IOIO"), of("HLT"))
            })
            .collect();
        per_vm.sort_unstable();
        // (CPUIDs + the 3 leaf reads, port writes, HLT) of the three VMs.
        assert_eq!(
            per_vm,
            [(1003, 10, 1), (2003, 20, 1), (20003, 0, 1)],
            "{}",
            dir.display()
        );
    }
}

/// The crowd: `vms` micro VMs at once on two L1 CPUs, VM i running 100 + i CPUIDs.
/// Every VM has its own row, which equals the kernel's hist of its thread reason by
/// reason (the thread named by its CPUID count), and nothing is dropped.
/// A crowd VM's row (raw reason -> count) -> its name: (CPUIDs, port writes).
fn crowd_name(row: &std::collections::BTreeMap<u64, u64>) -> (u64, u64) {
    let n = |r| row.get(&r).copied().unwrap_or(0);
    (n(0x72), n(0x7b))
}

/// A crowd mode's VMs by name, from the kernel's `common_pid,exit_reason` hist: each
/// thread's row (raw reason -> count); the crowd's VMs have one vCPU.
fn hist_vms(
    dir: &std::path::Path,
) -> std::collections::BTreeMap<(u64, u64), std::collections::BTreeMap<u64, u64>> {
    let hist_text = read(&dir.join("hist.txt"));
    let rows = kvmtrace_model::kernel_hist::rows(&hist_text).expect("hist.txt parses");
    let mut threads: std::collections::BTreeMap<u64, std::collections::BTreeMap<u64, u64>> =
        std::collections::BTreeMap::new();
    for (keys, n) in rows {
        if let (Some(&tid), Some(&reason), 2) =
            (keys.get("common_pid"), keys.get("exit_reason"), keys.len())
        {
            *threads.entry(tid).or_default().entry(reason).or_default() += n;
        }
    }
    threads
        .values()
        .map(|t| (crowd_name(t), t.clone()))
        .collect()
}

/// The crowd's VMs: `vms` micro VMs on the patched 6.1 L1 (2 CPUs), `waves` of them at
/// once, recorded with `--snapshots`. Every VM's row equals the hist by its threads,
/// and every guest read of the leaves (3 per VM) equals that VM's own host count at
/// that instant: a read compared with another VM's row, or not compared at all, fails.
fn crowd_is_exact(s: Scenario, vms: u16, wave: u16, modes: &[bool]) {
    for &nested in modes {
        let dir = mode_dir(s, nested);
        assert_matches_hist(&dir);
        let rec = record(&dir);
        assert!(!rec.dropped.any(), "{}: {:?}", dir.display(), rec.dropped);
        let r = reconcile(&rec);
        assert_eq!(
            r.verdict.reads,
            3 * usize::from(vms),
            "{}: guest reads",
            dir.display()
        );
        let bad: Vec<_> = r.rows.iter().filter(|x| !x.verdict.is_ok()).collect();
        assert!(bad.is_empty(), "{}: {bad:#?}", dir.display());
        let read_vms: std::collections::BTreeSet<u32> =
            rec.cpuid_reads.iter().map(|read| read.pid).collect();
        assert_eq!(read_vms.len(), usize::from(vms), "{}", dir.display());
        let hist_vms = hist_vms(&dir);
        let mut kvmtrace_vms = std::collections::BTreeMap::new();
        for vm in &rec.vms {
            let row: std::collections::BTreeMap<u64, u64> = rec
                .vcpus
                .iter()
                .filter(|v| v.pid == vm.pid)
                .map(|v| (u64::from(v.reason), v.totals.count))
                .collect();
            let name = crowd_name(&row);
            assert!(
                kvmtrace_vms.insert(name, row).is_none(),
                "{}: two VMs with {name:?}",
                dir.display()
            );
        }
        let want: Vec<(u64, u64)> = (0..u64::from(vms))
            .map(|i| (100 + i % u64::from(wave) + 3, 1 + i / u64::from(wave)))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(
            kvmtrace_vms.keys().copied().collect::<Vec<_>>(),
            want,
            "{}",
            dir.display()
        );
        assert_eq!(hist_vms, kvmtrace_vms, "{}", dir.display());
    }
}

const fn crowd(vms: u16, extra: &'static [&'static str], tag: &'static str) -> Scenario {
    Scenario {
        workload: "crowd",
        vms,
        tag,
        extra,
        ..micro("amd")
    }
}

#[test]
fn amd_crowd_of_256_vms_is_exact() {
    let s = crowd(
        256,
        &["--l1-cpus", "2", "--record-args", "--snapshots"],
        "crowd",
    );
    crowd_is_exact(s, 256, 256, &[true, false]);
}

#[test]
#[ignore = "1 024 VMs at once: cargo xtask test --full"]
fn amd_crowd_of_1024_vms_is_exact() {
    let s = crowd(
        1024,
        &["--l1-cpus", "2", "--record-args", "--snapshots"],
        "crowd",
    );
    crowd_is_exact(s, 1024, 1024, &[true, false]);
}

/// `kvmtrace export` over a crowd of 256 VMs (stock 6.1 L1, nested paging): the last
/// value Prometheus scraped of each VM's series equals the hist by that VM's thread,
/// reason by reason. (In --full: not yet reliable. Of its two runs on 2026-12-07, one
/// lost a micro VM to KVM_EXIT_SHUTDOWN under QEMU TCG's nested SVM, as the 1 024
/// crowd once did, and in the other two VMs never ended; cause not found.)
#[test]
#[ignore = "a second crowd of 256: cargo xtask test --full"]
fn amd_export_crowd_of_256_vms_equals_hist() {
    let s = crowd(
        256,
        &["--l1-cpus", "2", "--scenario", "export", "--modes", "1"],
        "export-crowd",
    );
    let s = Scenario {
        modules: "stock",
        ..s
    };
    let dir = mode_dir(s, true);
    let path = dir.join("prometheus-vms.json");
    let vms: std::collections::BTreeMap<String, Vec<serde_json::Value>> =
        serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut scraped = std::collections::BTreeMap::new();
    for (vm, reasons) in &vms {
        let row: std::collections::BTreeMap<u64, u64> = reasons
            .iter()
            .map(|r| {
                let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
                (n("reason"), n("count"))
            })
            .collect();
        let name = crowd_name(&row);
        assert!(
            scraped.insert(name, row).is_none(),
            "{}: two VMs with {name:?} ({vm})",
            dir.display()
        );
    }
    let want: Vec<(u64, u64)> = (0..256).map(|i| (100 + i + 3, 1)).collect();
    assert_eq!(
        scraped.keys().copied().collect::<Vec<_>>(),
        want,
        "{}",
        dir.display()
    );
    assert_eq!(hist_vms(&dir), scraped, "{}", dir.display());
}

/// 4 096 VM lifetimes, 256 at a time (nested paging only: the churn is about rows, not
/// paging): every row is freed and taken again many times (the free slots are a
/// stack), and each VM's row and reads stay its own.
#[test]
#[ignore = "4 096 VM lifetimes: cargo xtask test --full"]
fn amd_churn_of_4096_vm_lifetimes_is_exact() {
    let s = crowd(
        4096,
        &[
            "--l1-cpus",
            "2",
            "--at-once",
            "256",
            "--modes",
            "1",
            "--record-args",
            "--snapshots",
        ],
        "churn",
    );
    crowd_is_exact(s, 4096, 256, &[true]);
}

/// Maps far too small for the run (one vCPU row, two overflow reasons): the rows that
/// got in are exact, everything else is counted as dropped, and the total still equals
/// the hist.
#[test]
fn amd_full_maps_are_reported_not_silent() {
    let s = Scenario {
        tag: "full",
        extra: &[
            "--record-args",
            // --vcpu keeps the per-vCPU hash rows (thread rows have no such limit).
            "--vcpu 0 --max-overflow-rows 2 --max-vcpu-rows 1",
        ],
        ..micro("amd")
    };
    for nested in [true, false] {
        let dir = mode_dir(s, nested);
        let rec = record(&dir);
        let h = hist(&dir);
        // One reason has the vCPU row, at most two more the per-reason overflow rows.
        let mine = counts(&rec);
        assert!((2..=3).contains(&mine.len()), "{mine:?}");
        for (k, n) in &mine {
            assert_eq!(h.get(k), Some(n), "{}: {k:?}", dir.display());
        }
        let hist_total: u64 = h.values().sum();
        let counted: u64 = mine.values().sum();
        assert!(rec.dropped.exit_map_full > 0);
        assert_eq!(rec.dropped.exit_map_full, hist_total - counted);
        assert_eq!(rec.total.count, hist_total);
        assert_eq!(rec.vcpus.len(), 1);
        assert_eq!(
            rec.dropped.vcpu_map_full,
            hist_total - rec.vcpus[0].totals.count
        );
        let table = String::from_utf8(
            kvmtrace_model::render::render(
                &rec,
                kvmtrace_model::render::Format::Table,
                Default::default(),
            )
            .unwrap_or_default(),
        )
        .unwrap_or_default();
        assert!(table.contains("warning: incomplete data"), "{table}");
    }
}

/// The count path (`record --counts-only`, also `top` and `export` without `--time`):
/// one program per exit, no clock, no hash lookup. With Debian's modules, whose BTF
/// shows where the exit reason is, it is a raw tracepoint that reads the reason from
/// the vCPU; with ours, built without BTF, the classic tracepoint. Either way every
/// reason equals the hist, per VM too, and the micro VMM's known counts are exact.
fn counts_only_is_exact(isa: &'static str, modules: &'static str, via: &str) {
    let s = Scenario {
        modules,
        extra: &["--record-args", "--counts-only"],
        tag: "counts",
        ..micro(isa)
    };
    let (cpuid, io) = if isa == "intel" {
        ("CPUID", "IO_INSTRUCTION")
    } else {
        ("CPUID", "IOIO")
    };
    for nested in [true, false] {
        let dir = mode_dir(s, nested);
        assert_l2_ended(&dir);
        assert_matches_hist(&dir);
        let rec = record(&dir);
        assert_eq!(count_of(&rec, cpuid), 1000 + 3, "{}", dir.display());
        assert_eq!(count_of(&rec, io), 100, "{}", dir.display());
        assert!(
            rec.reasons.iter().all(|r| r.totals.timed == 0),
            "the count path times nothing: {}",
            dir.display()
        );
        assert_eq!(rec.vms.len(), 1, "one VM: {}", dir.display());
        assert_eq!(
            rec.vms[0].totals.count,
            rec.total.count,
            "{}",
            dir.display()
        );
        let stderr = read(&dir.join("kvmtrace.stderr"));
        assert!(
            stderr.contains(&format!("counting exits through the {via}")),
            "{}: {stderr}",
            dir.display()
        );
    }
}

#[test]
fn intel_counts_only_reads_the_reason_from_the_vcpu() {
    counts_only_is_exact(
        "intel",
        "stock",
        "raw tracepoint kvm_exit, vcpu_vmx.exit_reason",
    );
}

#[test]
fn amd_counts_only_reads_the_reason_from_the_vmcb() {
    counts_only_is_exact("amd", "stock", "raw tracepoint kvm_exit, vcpu_svm.vmcb");
}

#[test]
#[ignore = "one ISA per claim in the default run: cargo xtask test --full"]
fn intel_counts_only_without_btf_uses_the_classic_tracepoint() {
    counts_only_is_exact("intel", "patched", "classic tracepoint kvm:kvm_exit (");
}

#[test]
fn amd_counts_only_without_btf_uses_the_classic_tracepoint() {
    counts_only_is_exact("amd", "patched", "classic tracepoint kvm:kvm_exit (");
}

/// Asserts what every raw timing record shows: L2 ended, every reason equals the hist,
/// more than 1000 exits all timed but the VM's last, and `source` on stderr.
fn assert_raw_timing(dir: &std::path::Path, source: &str) -> kvmtrace_model::report::Report {
    assert_l2_ended(dir);
    assert_matches_hist(dir);
    let rec = record(dir);
    let timed: u64 = rec.reasons.iter().map(|r| r.totals.timed).sum();
    assert!(
        timed + 1 >= rec.total.count && rec.total.count > 1000,
        "{}: {timed} of {} timed",
        dir.display(),
        rec.total.count
    );
    let stderr = read(&dir.join("kvmtrace.stderr"));
    assert!(stderr.contains(source), "{}: {stderr}", dir.display());
    rec
}

/// The timing path reads each exit from the vCPU too (a raw tracepoint) where the
/// BTF shows the layout and nothing needs the record's other fields (no `--detail`,
/// no `--rip`): every reason and every (vCPU, reason) equals the hist, and every exit
/// but the VM's last is timed.
fn timing_raw_exit_is_exact(isa: &'static str) {
    let s = Scenario {
        modules: "stock",
        extra: &["--record-args", "--per-vcpu"],
        tag: "timing-raw",
        ..micro(isa)
    };
    for nested in [true, false] {
        let dir = mode_dir(s, nested);
        assert_raw_timing(&dir, "timing exits through the raw tracepoint kvm_exit");
        assert_vcpus_sum(&dir, 1);
    }
}

#[test]
#[ignore = "one ISA per claim in the default run: cargo xtask test --full"]
fn intel_timing_path_reads_the_exit_from_the_vcpu() {
    timing_raw_exit_is_exact("intel");
}

#[test]
#[ignore = "the default run times the raw exit on AMD in amd_default_record_times_rows_per_vm: cargo xtask test --full"]
fn amd_timing_path_reads_the_exit_from_the_vcpu() {
    timing_raw_exit_is_exact("amd");
}

/// The default record (time, no `--per-vcpu`) keeps rows per VM: each exit is counted
/// and timed at its entry in its VM slot's per-CPU cell, with no hash lookup. Every
/// reason equals the hist, the rows are the VM's ("all" vCPUs), and every exit but the
/// VM's last is timed; the last (the HLT that ends it) is counted, not lost.
fn per_vm_time_is_exact(isa: &'static str) {
    let s = Scenario {
        modules: "stock",
        extra: &["--record-args", ""],
        tag: "per-vm-time",
        ..micro(isa)
    };
    for nested in [true, false] {
        let dir = mode_dir(s, nested);
        let rec = assert_raw_timing(
            &dir,
            "timing exits through the raw tracepoint kvm_exit, in rows per VM",
        );
        assert!(
            !rec.vcpus.is_empty()
                && rec
                    .vcpus
                    .iter()
                    .all(|v| v.vcpu_id == tracer_common::count::ALL_VCPUS),
            "{}: rows are not per VM: {:?}",
            dir.display(),
            rec.vcpus
        );
        let time_ns: u64 = rec.reasons.iter().map(|r| r.totals.time_ns).sum();
        assert!(time_ns > 0, "{}: no handling time", dir.display());
    }
}

#[test]
fn amd_default_record_times_rows_per_vm() {
    per_vm_time_is_exact("amd");
}

#[test]
#[ignore = "one ISA per claim in the default run: cargo xtask test --full"]
fn intel_default_record_times_rows_per_vm() {
    per_vm_time_is_exact("intel");
}

/// A million exits through the count path, and not one differs from the hist.
#[test]
fn amd_a_million_exits_on_the_count_path_match_the_hist() {
    let s = Scenario {
        modules: "stock",
        tag: "million-counts",
        extra: &[
            "--micro-cpuids",
            "1000000",
            "--modes",
            "1",
            "--record-args",
            "--counts-only",
        ],
        ..micro("amd")
    };
    let dir = mode_dir(s, true);
    assert_matches_hist(&dir);
    assert_l2_ended(&dir);
    assert!(record(&dir).total.count >= 1_000_000);
}

/// A million exits in one run, and not one differs from the hist. (The default run
/// keeps the count path's million; this is the default record's, with time and rows
/// per VM.)
#[test]
#[ignore = "one run per claim in the default run: cargo xtask test --full"]
fn amd_a_million_exits_match_the_hist() {
    let s = Scenario {
        modules: "stock",
        tag: "million",
        extra: &[
            "--micro-cpuids",
            "1000000",
            "--modes",
            "1",
            "--record-args",
            "",
        ],
        ..micro("amd")
    };
    let dir = mode_dir(s, true);
    assert_matches_hist(&dir);
    assert_l2_ended(&dir);
    assert!(record(&dir).total.count >= 1_000_000);
}

/// The registers' offset in `struct kvm_vcpu` that a record used, and how it was found.
fn regs_layout(dir: &std::path::Path) -> kvmtrace_model::regs_layout::Layout {
    let rec = record(dir);
    let regs = rec
        .registers
        .unwrap_or_else(|| panic!("{}: no registers section", dir.display()));
    assert_eq!(regs.error, None, "{}", dir.display());
    regs.layout
        .unwrap_or_else(|| panic!("{}: the registers were never found", dir.display()))
}

/// A correct patch that answers the leaves in `kvm_emulate_cpuid()`, before
/// `kvm_cpuid()`: `kvm:kvm_cpuid` never fires for its reads, the modules (built out of
/// tree) have no BTF, and still every read is seen in the registers, exact, with the
/// values the guest printed and the micro VM's known exits.
fn answers_in_emulate_is_exact(isa: &'static str) {
    let s = Scenario {
        modules: "answers-in-emulate",
        ..micro(isa)
    };
    for nested in [true, false] {
        let dir = mode_dir(s, nested);
        let layout = regs_layout(&dir);
        assert!(
            matches!(
                layout.method,
                kvmtrace_model::regs_layout::Method::Learned { samples, distinct_rips }
                    if samples >= kvmtrace_model::regs_layout::MIN_SAMPLES && distinct_rips >= 2
            ),
            "{}: {layout:?}",
            dir.display()
        );
        let rec = record(&dir);
        assert_eq!(rec.cpuid_reads.len(), 3, "{}", dir.display());
        for read in &rec.cpuid_reads {
            assert_eq!(
                read.seen_by,
                [kvmtrace_model::report::ReadSource::Registers],
                "{}: kvm_cpuid fired for {read:?}",
                dir.display()
            );
        }
        let r = reconcile(&rec);
        assert!(
            r.rows.iter().all(|x| x.verdict == Verdict::Exact),
            "{}: {:#?}",
            dir.display(),
            r.rows
        );
        // So `kvmtrace reconcile` exits 0.
        assert_eq!(r.verdict.outcome, Outcome::Right, "{}", dir.display());
        // CPUID: 1000 in the loop + this query; IO: 100 port writes.
        let guest: Vec<u64> = r.rows.iter().map(|x| x.guest).collect();
        assert_eq!(&guest[..2], [1001, 100], "{}", dir.display());
        assert!(
            read(&dir.join("serial.log")).contains("micro: leaves cpuid=1001 io=100 total="),
            "{}",
            dir.display()
        );
        assert_matches_hist(&dir);
    }
}

#[test]
#[ignore = "one ISA per claim in the default run: cargo xtask test --full"]
fn intel_answers_in_emulate_is_seen_and_exact() {
    answers_in_emulate_is_exact("intel");
}

#[test]
fn amd_answers_in_emulate_is_seen_and_exact() {
    answers_in_emulate_is_exact("amd");
}

/// Debian's stock kvm module has BTF: the record takes the registers from it, at the
/// offset the learning finds for the same kernel, and both the registers and
/// `kvm:kvm_cpuid` see each read, with the same values.
#[test]
fn amd_stock_registers_come_from_btf_where_learning_finds_them() {
    let stock = Scenario {
        modules: "stock",
        ..micro("amd")
    };
    let learned = Scenario {
        modules: "answers-in-emulate",
        ..micro("amd")
    };
    for nested in [true, false] {
        let dir = mode_dir(stock, nested);
        let btf = regs_layout(&dir);
        assert!(
            matches!(&btf.method, kvmtrace_model::regs_layout::Method::Btf { file } if file == "/sys/kernel/btf/kvm"),
            "{btf:?}"
        );
        assert_eq!(
            btf.regs_offset,
            regs_layout(&mode_dir(learned, nested)).regs_offset
        );
        let rec = record(&dir);
        assert_eq!(rec.cpuid_reads.len(), 3, "{}", dir.display());
        for read in &rec.cpuid_reads {
            assert_eq!(
                read.seen_by,
                [
                    kvmtrace_model::report::ReadSource::Registers,
                    kvmtrace_model::report::ReadSource::KvmCpuid
                ],
                "{read:?}"
            );
            assert_eq!(read.kvm_cpuid_differs, None, "{read:?}");
        }
    }
}

/// Our own series answers inside `kvm_cpuid()`: every read of a boot is seen twice,
/// and the tracepoint's values are exactly what the guest received.
#[test]
fn amd_patched_reads_are_seen_twice_and_agree() {
    for nested in [true, false] {
        let rec = record(&mode_dir(boot("amd"), nested));
        assert!(rec.cpuid_reads.len() > 60);
        for read in &rec.cpuid_reads {
            assert_eq!(read.seen_by.len(), 2, "{read:?}");
            assert_eq!(read.kvm_cpuid_differs, None, "{read:?}");
        }
    }
}

/// Every cause `reconcile` names for a scenario's reads, in both paging modes.
fn causes(s: Scenario) -> std::collections::BTreeSet<Verdict> {
    let mut all = causes_in(s, true);
    all.extend(causes_in(s, false));
    all
}

/// Every cause `reconcile` names for a scenario's reads in one paging mode; there must
/// be reads, and none unexplained.
fn causes_in(s: Scenario, nested: bool) -> std::collections::BTreeSet<Verdict> {
    let dir = mode_dir(s, nested);
    let r = reconcile(&record(&dir));
    assert!(r.verdict.reads > 0, "{}: no reads", dir.display());
    assert_eq!(r.verdict.unexplained, 0, "{}: {:#?}", dir.display(), r.rows);
    let causes: std::collections::BTreeSet<Verdict> = r
        .rows
        .iter()
        .flat_map(|row| std::iter::once(row.verdict).chain(row.causes.iter().copied()))
        .filter(|v| !v.is_ok())
        .collect();
    // What `kvmtrace reconcile` exits with: 7 (wrong, every cause named) where a fault
    // is named, else 0.
    let outcome = if causes.iter().any(|c| c.is_fault()) {
        Outcome::CausesNamed
    } else {
        Outcome::Right
    };
    assert_eq!(r.verdict.outcome, outcome, "{}", dir.display());
    causes
}

fn variant(modules: &'static str, base: Scenario) -> Scenario {
    Scenario { modules, ..base }
}

#[test]
#[ignore = "variant matrix: cargo xtask test --full"]
fn amd_total_falls_through_is_named() {
    assert_eq!(
        causes(variant("total-falls-through", micro("amd"))),
        [Verdict::TotalLeafWrong].into()
    );
}

#[test]
#[ignore = "variant matrix: cargo xtask test --full"]
fn intel_total_falls_through_is_named() {
    assert_eq!(
        causes(variant("total-falls-through", micro("intel"))),
        [Verdict::TotalLeafWrong].into()
    );
}

#[test]
#[ignore = "variant matrix: cargo xtask test --full"]
fn amd_regs_unset_is_named() {
    assert_eq!(
        causes(variant("regs-unset", micro("amd"))),
        [Verdict::RegistersUnset].into()
    );
}

#[test]
#[ignore = "variant matrix: cargo xtask test --full"]
fn intel_regs_unset_is_named() {
    assert_eq!(
        causes(variant("regs-unset", micro("intel"))),
        [Verdict::RegistersUnset].into()
    );
}

/// Below 2^32 exits a 32-bit counter is right: nothing to name (the cause itself is
/// unit-tested; the lab cannot make 2^32 exits).
#[test]
#[ignore = "variant matrix: cargo xtask test --full"]
fn amd_counters_32bit_are_exact_below_2_32() {
    assert_eq!(causes(variant("counters-32bit", micro("amd"))), [].into());
}

#[test]
#[ignore = "variant matrix: cargo xtask test --full"]
fn amd_wrong_undefined_is_named() {
    assert_eq!(
        causes(variant("wrong-undefined", boot("amd"))),
        [Verdict::WrongUndefinedAnswer].into()
    );
}

#[test]
#[ignore = "variant matrix: cargo xtask test --full"]
fn amd_no_cycles_leaf_is_named() {
    assert_eq!(
        causes(variant("no-cycles-leaf", boot("amd"))),
        [Verdict::CyclesNotImplemented].into()
    );
}

#[test]
#[ignore = "variant matrix: cargo xtask test --full"]
fn intel_counters_32bit_are_exact_below_2_32() {
    assert_eq!(causes(variant("counters-32bit", micro("intel"))), [].into());
}

#[test]
#[ignore = "variant matrix: cargo xtask test --full"]
fn intel_wrong_undefined_is_named() {
    assert_eq!(
        causes(variant("wrong-undefined", boot("intel"))),
        [Verdict::WrongUndefinedAnswer].into()
    );
}

#[test]
#[ignore = "variant matrix: cargo xtask test --full"]
fn intel_no_cycles_leaf_is_named() {
    assert_eq!(
        causes(variant("no-cycles-leaf", boot("intel"))),
        [Verdict::CyclesNotImplemented].into()
    );
}

/// SVM's fastpath handles only WRMSR to the x2APIC ICR and the TSC deadline, and the
/// one-vCPU L2 boot under QEMU TCG makes neither (measured: every MSR exit of both
/// modes counted). So the slowpath-only build is exact here, and reconcile must not
/// invent a cause for it; Intel's boot, which does make fastpath exits, is the test
/// that names one.
#[test]
#[ignore = "variant matrix: cargo xtask test --full"]
fn amd_slowpath_only_build_is_exact_without_fastpath_exits() {
    assert_eq!(causes(variant("slowpath-only", boot("amd"))), [].into());
}

/// Counting at the top of the VMX exit handler misses the fastpath exits in both
/// modes, and under ept=0, where the L2 boot needs emulation, counts the synthetic
/// INVALID_STATE exits that the host counts on `vmx_vcpu_run()`.
#[test]
#[ignore = "variant matrix: cargo xtask test --full"]
fn intel_handler_top_is_named() {
    let s = variant("handler-top", boot("intel"));
    assert_eq!(causes_in(s, true), [Verdict::FastpathNotCounted].into());
    assert_eq!(
        causes_in(s, false),
        [Verdict::FastpathNotCounted, Verdict::SyntheticCounted].into()
    );
    let rec = record(&mode_dir(s, false));
    let synthetic = rec
        .cpuid_reads
        .iter()
        .filter_map(|r| r.host_synthetic)
        .max()
        .unwrap_or(0);
    assert!(
        synthetic > 0,
        "the host counted no synthetic exit under ept=0"
    );
}

/// `record --detail --rip` on the micro VM, whose sub-keys are known in advance: 1000
/// CPUIDs of leaf 0 and the three counter-leaf reads, 100 one-byte writes to port
/// 0x1e0, 50 reads and 50 writes of EFER. The lab itself fails unless every detail row
/// equals the kernel's hist keyed the same way (kvm_exit by info1 and intr_info,
/// kvm_msr by ecx and write, kvm_cpuid by function, kvm_page_fault by 1 MiB region,
/// kvm_exit by guest_rip); this checks the rows a user reads.
fn micro_detail_is_exact(isa: &'static str) {
    let s = Scenario {
        modules: "stock",
        tag: "detail",
        extra: &[
            "--micro-msrs",
            "50",
            "--record-args",
            "--per-vcpu --detail --rip 4",
        ],
        ..micro(isa)
    };
    for nested in [true, false] {
        let dir = mode_dir(s, nested);
        assert_matches_hist(&dir);
        assert_l2_ended(&dir);
        let rec = record(&dir);
        let row = |kind: &str, key: &str| -> u64 {
            rec.reasons
                .iter()
                .flat_map(|r| &r.detail)
                .filter(|d| d.kind == kind && d.key == key)
                .map(|d| d.totals.count)
                .sum()
        };
        let at = dir.display();
        assert_eq!(row("cpuid", "0x0"), 1000, "{at}");
        assert_eq!(row("cpuid", "0x4ffffffe"), 2, "{at}");
        assert_eq!(row("cpuid", "0x4fffffff"), 1, "{at}");
        assert_eq!(row("port", "0x1e0:out:1"), 100, "{at}");
        assert_eq!(row("msr", "0xc0000080:read"), 50, "{at}");
        assert_eq!(row("msr", "0xc0000080:write"), 50, "{at}");
        let undecoded: u64 = rec
            .reasons
            .iter()
            .flat_map(|r| &r.detail)
            .filter(|d| d.kind == "undecoded")
            .map(|d| d.totals.count)
            .sum();
        assert_eq!(undecoded, 0, "every keyed exit got its key: {at}");
        // The CPUID loop is one instruction: its RIP has the 1000 exits.
        let cpuid = rec
            .reasons
            .iter()
            .find(|r| r.name == "CPUID")
            .unwrap_or_else(|| panic!("no CPUID row: {at}"));
        assert_eq!(cpuid.rips.first().map(|x| x.count), Some(1000), "{at}");
        assert_eq!(
            cpuid.rips.iter().map(|x| x.count).sum::<u64>() + cpuid.rips_rest,
            cpuid.totals.count
        );
        assert!(
            cpuid.p50_ns.is_some() && cpuid.totals.max_ns >= cpuid.p50_ns.unwrap_or(0),
            "{at}"
        );
        let show = read(&dir.join("detail-table.txt"));
        assert!(show.contains("wrmsr EFER (0xc0000080)"), "{show}");
    }
}

#[test]
#[ignore = "one ISA per claim in the default run: cargo xtask test --full"]
fn intel_micro_detail_is_exact() {
    micro_detail_is_exact("intel");
}

#[test]
fn amd_micro_detail_is_exact() {
    micro_detail_is_exact("amd");
}

/// `kvmtrace export` runs in L1 across both paging modes while L2 boots; Debian's real
/// Prometheus on the host scrapes it every second through QEMU's forward (restricted
/// user networking). After each L2 ends, the last values Prometheus scraped of that VM
/// (`vm="l2-npt1"`, from QEMU's `-name`) equal L1's kernel hist, reason by reason; the
/// lab also checks the scrape lints clean, the VM leaves the scrape after the
/// retention, the exporter stops with status 0 on SIGTERM, and dist/ passes promtool.
///
/// The exporter serves over TLS, to a client certificate of the lab's CA with a
/// password (L1 checks that plain HTTP, no password and no certificate are refused),
/// and it is the .deb's kvmtrace, run as the unit runs it (see
/// [`assert_runs_as_the_units_user`]).
#[test]
fn amd_export_prometheus_equals_hist() {
    let s = Scenario {
        modules: "stock",
        extra: &["--scenario", "export", "--install", "deb"],
        tag: "export",
        ..boot("amd")
    };
    assert_runs_as_the_units_user(s);
    for nested in [true, false] {
        let dir = mode_dir(s, nested);
        assert_l2_ended(&dir);
        let path = dir.join("prometheus.json");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&read(&path))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let scraped: std::collections::BTreeMap<tracer_common::ExitKey, u64> = rows
            .iter()
            .map(|r| {
                let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
                let key = tracer_common::ExitKey {
                    isa: n("isa") as u32,
                    reason: n("reason") as u32,
                    failed_entry: u32::from(r["failed_entry"].as_bool() == Some(true)),
                };
                (key, n("count"))
            })
            .collect();
        let kernel = hist(&dir);
        assert!(
            kernel.values().sum::<u64>() > 1000,
            "{}: a boot has thousands of exits",
            dir.display()
        );
        assert_eq!(scraped, kernel, "{}", dir.display());
    }
}

/// L1 booted the kernel line the scenario asks for (`--kernel`), and L2 its usual 6.1.
fn assert_kernels(s: Scenario) {
    let serial = read(&lab(s).join("serial.log"));
    let l1 = serial
        .lines()
        .find_map(|l| {
            l.split_once("KVMLAB l1 up ")
                .map(|(_, rest)| rest.to_owned())
        })
        .unwrap_or_else(|| panic!("{}: L1 never came up", s.name()));
    assert!(
        l1.contains(&format!(" kernel={}.", s.kernel)),
        "{}: L1 is not on {}: {l1}",
        s.name(),
        s.kernel
    );
}

/// Another of Debian's kernel lines in L1, with its own stock kvm modules: the same
/// 6.1 guest boots in both paging modes, and kvmtrace equals the hist for every reason.
fn stock_boot_on(isa: &'static str, kernel: &'static str) {
    let s = Scenario {
        modules: "stock",
        kernel,
        ..boot(isa)
    };
    assert_kernels(s);
    for nested in [true, false] {
        let dir = mode_dir(s, nested);
        assert_l2_ended(&dir);
        assert_matches_hist(&dir);
        assert!(record(&dir).total.count > 1000, "{}", dir.display());
    }
}

/// The boot with the 6.12 line's stock modules (one boot serves several tests).
const fn stock_on_6_12(isa: &'static str) -> Scenario {
    Scenario {
        modules: "stock",
        kernel: "6.12",
        ..boot(isa)
    }
}

#[test]
fn intel_linux6_12_stock_boot_matches_hist_in_both_modes() {
    stock_boot_on("intel", "6.12");
}

#[test]
fn amd_linux6_12_stock_boot_matches_hist_in_both_modes() {
    stock_boot_on("amd", "6.12");
}

/// The series built for 6.12 (`kernel/6.12/`), loaded into a 6.12 L1: the micro VM's
/// known counts, and every counter read exact.
#[test]
fn intel_linux6_12_patched_micro_reconciles_exactly() {
    let s = Scenario {
        kernel: "6.12",
        ..micro("intel")
    };
    assert_kernels(s);
    micro_counts_are_exact(s, "CPUID", "IO_INSTRUCTION", "HLT");
}

#[test]
fn amd_linux6_12_patched_micro_reconciles_exactly() {
    let s = Scenario {
        kernel: "6.12",
        ..micro("amd")
    };
    assert_kernels(s);
    micro_counts_are_exact(s, "CPUID", "IOIO", "HLT");
}

/// The .deb of `cargo xtask dist`, installed in L1 with `dpkg -i`, its kvmtrace run
/// from /usr/bin as the exporter's unit runs it: uid 65534 with exactly the unit's
/// capabilities. Before that, L1 ran it with each capability missing in turn: it must
/// fail with one line that names the missing one; and with all of them at Debian's
/// `kernel.perf_event_paranoid=3`, which lets only CAP_SYS_ADMIN attach tracepoints: one
/// line naming the sysctl (L1 then sets it to 2, as dist/deb/README.md says).
fn assert_runs_as_the_units_user(s: Scenario) {
    let path = kvmtrace_e2e::lab(s).join("serial.log");
    let log = read(&path);
    assert!(
        log.contains("KVMLAB deb installed kvmtrace"),
        "{}: no dpkg -i",
        path.display()
    );
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_DAC_READ_SEARCH"] {
        let said = log
            .lines()
            .find_map(|l| l.split_once(&format!("KVMLAB deb without {cap}: ")))
            .map(|(_, said)| said)
            .unwrap_or_else(|| panic!("{}: nothing run without {cap}", path.display()));
        assert!(said.contains(cap), "without {cap}: {said}");
    }
    // Debian's perf_event_paranoid=3 refuses CAP_PERFMON: one line that names it.
    let paranoid = log
        .lines()
        .find_map(|l| l.split_once("KVMLAB deb perf_event_paranoid="))
        .map(|(_, said)| said)
        .unwrap_or_else(|| panic!("{}: no run with the unit's capabilities", path.display()));
    assert!(
        paranoid.starts_with("3: kvmtrace: cannot attach eBPF program")
            && paranoid.contains("kernel.perf_event_paranoid is 3"),
        "{paranoid}"
    );
    assert!(
        log.contains("KVMLAB deb record and top ran as the unit's user"),
        "{}",
        path.display()
    );
    assert!(
        log.contains(
            "KVMLAB deb kvmtrace runs as uid 65534 with -all,+bpf,+perfmon,+dac_read_search"
        ),
        "{}",
        path.display()
    );
}

/// The .deb on Debian 11's 5.10 (see [`assert_runs_as_the_units_user`]): the record
/// of the package's kvmtrace, as the unit's user, equals the kernel's trace buffer.
#[test]
fn intel_linux5_10_deb_records_as_the_units_user() {
    let s = Scenario {
        modules: "stock",
        kernel: "5.10",
        extra: &[
            "--record-args",
            "--per-vcpu --snapshots",
            "--install",
            "deb",
        ],
        tag: "deb",
        ..micro("intel")
    };
    assert_runs_as_the_units_user(s);
    for nested in [true, false] {
        let dir = mode_dir(s, nested);
        let rec = record(&dir);
        let diffs = differences(&counts(&rec), &hist(&dir));
        assert!(diffs.is_empty(), "{}: {}", dir.display(), diffs.join("\n"));
        assert!(rec.total.count > 1000, "{}", dir.display());
    }
}

/// Debian 11's 5.10 in L1: no hist triggers there, so the reference is every
/// kvm_exit record of the trace buffer (none lost, every line read). No `--detail` or
/// `--rip`: nothing in that kernel to check them against.
const ON_5_10: &[&str] = &["--record-args", "--per-vcpu --snapshots"];

#[test]
fn intel_linux5_10_stock_boot_matches_the_trace_buffer_in_both_modes() {
    let s = Scenario {
        extra: ON_5_10,
        tag: "trace",
        ..boot("intel")
    };
    stock_boot_on_5_10(s);
}

#[test]
fn amd_linux5_10_stock_boot_matches_the_trace_buffer_in_both_modes() {
    let s = Scenario {
        extra: ON_5_10,
        tag: "trace",
        ..boot("amd")
    };
    stock_boot_on_5_10(s);
}

fn stock_boot_on_5_10(s: Scenario) {
    let s = Scenario {
        modules: "stock",
        kernel: "5.10",
        ..s
    };
    assert_kernels(s);
    for nested in [true, false] {
        let dir = mode_dir(s, nested);
        assert!(
            dir.join("trace-counts.txt").is_file() && !dir.join("hist.txt").exists(),
            "{}: the reference is not the trace buffer",
            dir.display()
        );
        assert_l2_ended(&dir);
        let rec = record(&dir);
        let diffs = differences(&counts(&rec), &hist(&dir));
        assert!(diffs.is_empty(), "{}: {}", dir.display(), diffs.join("\n"));
        assert!(rec.total.count > 1000, "{}", dir.display());
        // 5.10's VMX re-enters the guest after a fastpath exit (the TSC-deadline
        // MSR_WRITE) inside vcpu_enter_guest() without a kvm_entry: those exits are
        // counted, but their time is unknown (pending_lost), and nothing else.
        let mut others = rec.dropped;
        others.pending_lost = 0;
        assert!(!others.any(), "{}: {:?}", dir.display(), rec.dropped);
        let msr_write = rec.reasons.iter().find(|r| r.name == "MSR_WRITE");
        let untimed = msr_write.map_or(0, |r| r.totals.count - r.totals.timed);
        if s.isa == "intel" {
            assert_eq!(rec.dropped.pending_lost, untimed, "{}", dir.display());
        } else {
            assert_eq!(rec.dropped.pending_lost, 0, "{}", dir.display());
        }
    }
}

/// The series for 5.10 (`kernel/5.10/`) in a 5.10 L1: the micro VM's known counts, and
/// every counter read exact (the host's counts for the reads are kept in shared cells
/// there: 5.10 cannot sum per-CPU ones from eBPF).
#[test]
fn intel_linux5_10_patched_micro_reconciles_exactly() {
    patched_micro_on_5_10("intel", "IO_INSTRUCTION");
}

#[test]
fn amd_linux5_10_patched_micro_reconciles_exactly() {
    patched_micro_on_5_10("amd", "IOIO");
}

fn patched_micro_on_5_10(isa: &'static str, io: &str) {
    let s = Scenario {
        kernel: "5.10",
        extra: ON_5_10,
        tag: "trace",
        ..micro(isa)
    };
    assert_kernels(s);
    micro_counts_are_exact(s, "CPUID", io, "HLT");
    let stderr = read(&mode_dir(s, true).join("kvmtrace.stderr"));
    assert!(stderr.contains("one cell shared by all CPUs"), "{stderr}");
}
