//! The micro workload: the exits its VMs make are known in advance, and so is what
//! the guest may receive from the counter leaves.

use std::path::Path;

use super::guest::reconcile;
use tracer_common::exit_reasons::{
    SVM_CPUID, SVM_HLT, SVM_IOIO, SVM_MSR, VMX_CPUID, VMX_HLT, VMX_IO_INSTRUCTION, VMX_MSR_READ,
    VMX_MSR_WRITE,
};

use crate::lab::{
    console::{self, Line},
    hist::Hist,
    image::{self, L1, Workload as L2Workload},
    options::{Isa, Modules, Options},
    reason::Reason,
    record::Record,
};

/// The micro workload with patched modules (any variant): what each VM's guest
/// received from the leaves (`micro: leaves cpuid=C io=I total=T` on L2's console)
/// against the VM's known exits (C = CPUIDs + the query itself, I = port writes), and
/// `kvmtrace reconcile` of the record (when it took snapshots), which must have seen
/// every read (3 per VM).
/// Correct modules must match and reconcile exactly; for the deliberately wrong
/// variants the result is printed, and the lab tests check their verdicts.
pub fn micro_readout(
    opts: &Options,
    dir: &Path,
    lines: &[Line],
    l1: &L1,
) -> anyhow::Result<Vec<String>> {
    let (L2Workload::Micro { .. }, Some((kvmtrace, _))) = (&l1.workload, &l1.kvmtrace) else {
        return Ok(Vec::new());
    };
    let vms = micro_runs(l1);
    let modules = opts.module_set();
    if modules == Modules::Stock {
        return Ok(Vec::new());
    }
    let received = console::micro_leaves_received(lines);
    let mut problems = leaves_problems(&received, &micro_leaf_ranges(&vms), modules.correct());
    if !l1
        .record_args
        .split_whitespace()
        .any(|a| a == "--snapshots")
    {
        // Recorded without snapshots (e.g. the full-maps scenario): nothing to reconcile.
        return Ok(problems);
    }
    let reconciled = reconcile(kvmtrace, dir, None, modules)?;
    println!(
        "  kvmtrace reconcile: {}",
        reconciled.table.lines().next().unwrap_or_default()
    );
    let want_reads = MICRO_LEAF_READS * micro_vcpus(&vms);
    if reconciled.reads != want_reads {
        problems.push(format!(
            "kvmtrace saw {} guest counter reads, the guest made {want_reads}",
            reconciled.reads
        ));
    }
    problems.extend(reconciled.problem);
    Ok(problems)
}

/// What the guests `received` from the leaves against what each vCPU may receive
/// (`ranges`), printed; a problem when they do not fit and the modules are `correct`.
fn leaves_problems(
    received: &[(u64, u64)],
    ranges: &[(std::ops::RangeInclusive<u64>, std::ops::RangeInclusive<u64>)],
    correct: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    let known = micro_leaves_fit(received, ranges);
    if ranges
        .iter()
        .all(|(c, i)| c.start() == c.end() && i.start() == i.end())
    {
        // One vCPU per VM: each VM's own exits, exactly.
        let mut expected: Vec<(u64, u64)> = ranges
            .iter()
            .map(|(c, i)| (*c.start(), *i.start()))
            .collect();
        expected.sort_unstable();
        println!(
            "  micro leaves received {received:?}, known exits {expected:?}: {}",
            if known { "equal" } else { "DIFFERENT" }
        );
        if !known && correct {
            problems.push(format!(
                "the guest received {received:?} from the leaves, its known exits are {expected:?}"
            ));
        }
    } else {
        // Several vCPUs: what each reads depends on the others' progress.
        let bounds: Vec<String> = ranges
            .iter()
            .map(|(c, i)| format!("cpuid {c:?} io {i:?}"))
            .collect();
        println!(
            "  micro leaves received {received:?} ({} vCPUs), each within one of [{}]: {}",
            ranges.len(),
            bounds.join(", "),
            if known { "yes" } else { "NO" }
        );
        if !known && correct {
            problems.push(format!(
                "the {} vCPUs received {received:?} from the leaves, outside their bounds [{}]",
                ranges.len(),
                bounds.join(", ")
            ));
        }
    }
    problems
}

/// The micro workload's exits known in advance against the hist and the record, per
/// reason, printed; a problem for each count that is off.
pub fn check_counts(
    isa: Isa,
    l1: &L1,
    tag: &str,
    hist: &Hist,
    record: Option<&Record>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let expect = micro_expectations(isa, &micro_runs(l1));
    for (reason, want) in expect {
        let have = hist.by_reason.get(&reason).copied().unwrap_or(0);
        let rec_have = record.map(|r| r.by_reason.get(&reason).copied().unwrap_or(0));
        // With a full per-reason map a reason may be only in the drops.
        let full = record.map_or(0, |r| r.dropped.exit_map_full);
        let ok = have == want && rec_have.is_none_or(|k| k == want || (k == 0 && full > 0));
        println!(
            "  micro {}: expected {want}, hist {have}{} {}",
            reason.name(),
            rec_have.map_or(String::new(), |k| format!(", kvmtrace {k}")),
            if ok { "ok" } else { "WRONG" }
        );
        if !ok {
            problems.push(format!("{tag}: micro {} count is off", reason.name()));
        }
    }
    problems
}

/// The raw CPUID exit reason of `isa` (the kvm_exit tracepoint's).
pub fn cpuid_reason(isa: u32) -> u32 {
    if isa == crate::lab::reason::ISA_VMX {
        VMX_CPUID
    } else {
        SVM_CPUID
    }
}

/// The raw port I/O exit reason of `isa`.
pub fn io_reason(isa: u32) -> u32 {
    if isa == crate::lab::reason::ISA_VMX {
        VMX_IO_INSTRUCTION
    } else {
        SVM_IOIO
    }
}

/// The micro VMM's exits that are fixed in advance.
/// The micro guest's own counter-leaf reads at the end (CPUID count, I/O count, total).
pub const MICRO_LEAF_READS: u64 = 3;

/// Every micro VM one mode runs: the workload's VMs, `l1.vms` times over.
pub fn micro_runs(l1: &L1) -> Vec<image::MicroVm> {
    match &l1.workload {
        L2Workload::Micro { vms, .. } => {
            let times = usize::from(l1.vms.max(1));
            vms.iter()
                .cycle()
                .take(vms.len() * times)
                .copied()
                .collect()
        }
        L2Workload::Boot { .. } => Vec::new(),
    }
}

/// All the vCPUs of `vms`.
fn micro_vcpus(vms: &[image::MicroVm]) -> u64 {
    vms.iter().map(|v| u64::from(v.vcpus)).sum()
}

/// What each vCPU of `vms` may receive from the counter leaves, with correct modules:
/// a (CPUID count, I/O count) range per vCPU. One vCPU reads its VM's exact exits:
/// its CPUIDs and the query itself, its port writes. With several, a vCPU's read
/// also counts what the others did so far: at least its own, at most all of theirs
/// (each vCPU's CPUIDs and its three queries).
fn micro_leaf_ranges(
    vms: &[image::MicroVm],
) -> Vec<(std::ops::RangeInclusive<u64>, std::ops::RangeInclusive<u64>)> {
    let mut ranges = Vec::new();
    for vm in vms {
        let (c, o, n) = (
            u64::from(vm.cpuids),
            u64::from(vm.outs),
            u64::from(vm.vcpus),
        );
        for _ in 0..vm.vcpus {
            ranges.push(if n == 1 {
                (c + 1..=c + 1, o..=o)
            } else {
                (c + 1..=n * (c + MICRO_LEAF_READS), o..=n * o)
            });
        }
    }
    ranges
}

/// Whether the readout lines fit the vCPUs' ranges one to one: as many lines as
/// vCPUs, and each vCPU's line within its range (a bipartite matching, since lines do
/// not say which VM printed them).
fn micro_leaves_fit(
    received: &[(u64, u64)],
    ranges: &[(std::ops::RangeInclusive<u64>, std::ops::RangeInclusive<u64>)],
) -> bool {
    if received.len() != ranges.len() {
        return false;
    }
    let fits = |line: usize, slot: usize| {
        let ((c, i), (cr, ir)) = (received[line], &ranges[slot]);
        cr.contains(&c) && ir.contains(&i)
    };
    // Kuhn's augmenting paths: owner[slot] is the line that has it.
    fn augment(
        line: usize,
        slots: usize,
        fits: &dyn Fn(usize, usize) -> bool,
        seen: &mut [bool],
        owner: &mut [Option<usize>],
    ) -> bool {
        for slot in 0..slots {
            if seen[slot] || !fits(line, slot) {
                continue;
            }
            seen[slot] = true;
            if owner[slot].is_none_or(|other| augment(other, slots, fits, seen, owner)) {
                owner[slot] = Some(line);
                return true;
            }
        }
        false
    }
    let mut owner = vec![None; ranges.len()];
    (0..received.len()).all(|line| {
        let mut seen = vec![false; ranges.len()];
        augment(line, ranges.len(), &fits, &mut seen, &mut owner)
    })
}

/// The exits of `vms` known in advance, per reason: every vCPU's CPUIDs and its three
/// leaf reads, its port writes and its HLT.
pub fn micro_expectations(isa: Isa, vms: &[image::MicroVm]) -> Vec<(Reason, u64)> {
    let n = micro_vcpus(vms);
    let each = |f: fn(&image::MicroVm) -> u32| -> u64 {
        vms.iter()
            .map(|v| u64::from(v.vcpus) * u64::from(f(v)))
            .sum()
    };
    let cpuids = each(|v| v.cpuids);
    let outs = each(|v| v.outs);
    let msrs = each(|v| v.msrs);
    let r = |reason| Reason {
        isa: isa.trace_isa(),
        reason,
        failed_entry: false,
    };
    let (cpuid, io, hlt) = match isa {
        Isa::Intel => (VMX_CPUID, VMX_IO_INSTRUCTION, VMX_HLT),
        Isa::Amd => (SVM_CPUID, SVM_IOIO, SVM_HLT),
    };
    let mut expect = vec![
        (r(cpuid), cpuids + n * MICRO_LEAF_READS),
        (r(io), outs),
        (r(hlt), n),
    ];
    if msrs > 0 {
        match isa {
            Isa::Intel => expect.extend([(r(VMX_MSR_READ), msrs), (r(VMX_MSR_WRITE), msrs)]),
            Isa::Amd => expect.push((r(SVM_MSR), 2 * msrs)),
        }
    }
    expect
}

/// The micro workload's `--detail` rows known in advance, by (kind, key): CPUID leaf
/// 0, the port writes, the EFER reads and writes. Not the counter leaves: a patch may
/// answer them before `kvm_cpuid()` (answers-in-emulate), and then no `kvm:kvm_cpuid`
/// event keys those three exits (they are `undecoded`, and the hist has none either).
pub fn micro_detail_expectations(vms: &[image::MicroVm]) -> Vec<((String, String), u64)> {
    let each = |f: fn(&image::MicroVm) -> u32| -> u64 {
        vms.iter()
            .map(|v| u64::from(v.vcpus) * u64::from(f(v)))
            .sum()
    };
    let key = |kind: &str, key: &str| (kind.to_owned(), key.to_owned());
    let mut expect = vec![
        (key("cpuid", "0x0"), each(|v| v.cpuids)),
        (
            key("port", &format!("{MICRO_PORT:#x}:out:1")),
            each(|v| v.outs),
        ),
        (
            key("msr", &format!("{MICRO_MSR:#x}:read")),
            each(|v| v.msrs),
        ),
        (
            key("msr", &format!("{MICRO_MSR:#x}:write")),
            each(|v| v.msrs),
        ),
    ];
    expect.retain(|(_, n)| *n > 0);
    expect
}

/// The port the micro guest writes to (`MICRO_PORT` in lab/micro.c).
pub const MICRO_PORT: u16 = 0x1e0;
/// The MSR the micro guest reads and writes back (`MICRO_MSR` in lab/micro.c: EFER).
pub const MICRO_MSR: u32 = 0xc000_0080;

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn vm(cpuids: u32, outs: u32, vcpus: u8) -> image::MicroVm {
        image::MicroVm {
            cpuids,
            outs,
            vcpus,
            msrs: 0,
        }
    }

    fn raw(expect: &[(Reason, u64)]) -> Vec<(u64, u64)> {
        expect.iter().map(|(r, n)| (r.reason.into(), *n)).collect()
    }

    #[test]
    fn one_vcpu_expectations_are_unchanged() {
        let e = micro_expectations(Isa::Intel, &[vm(1000, 100, 1)]);
        assert_eq!(raw(&e), [(10, 1003), (30, 100), (12, 1)]);
        let e = micro_expectations(Isa::Amd, &[vm(1000, 100, 1), vm(10, 1, 1)]);
        assert_eq!(raw(&e), [(0x72, 1016), (0x7b, 101), (0x78, 2)]);
    }

    #[test]
    fn expectations_multiply_by_vcpus() {
        let e = micro_expectations(Isa::Amd, &[vm(100_000, 100, 2)]);
        assert_eq!(raw(&e), [(0x72, 200_006), (0x7b, 200), (0x78, 2)]);
        // A churn: VMs of several vCPUs each.
        let e = micro_expectations(Isa::Intel, &[vm(20, 0, 3), vm(1, 2, 3)]);
        assert_eq!(raw(&e), [(10, 3 * 23 + 3 * 4), (30, 6), (12, 6)]);
    }

    #[test]
    fn leaf_ranges_are_exact_for_one_vcpu() {
        let r = micro_leaf_ranges(&[vm(1000, 100, 1)]);
        assert_eq!(r, [(1001..=1001, 100..=100)]);
        assert!(micro_leaves_fit(&[(1001, 100)], &r));
        assert!(!micro_leaves_fit(&[(1000, 100)], &r));
        assert!(!micro_leaves_fit(&[(1001, 100), (1001, 100)], &r));
        assert!(!micro_leaves_fit(&[], &r));
    }

    #[test]
    fn leaf_ranges_of_several_vcpus_bound_what_each_sees() {
        let r = micro_leaf_ranges(&[vm(1000, 100, 2)]);
        assert_eq!(r, [(1001..=2006, 100..=200), (1001..=2006, 100..=200)]);
        // The first vCPU to read sees part of the other's exits, the last all of them.
        assert!(micro_leaves_fit(&[(1500, 150), (2004, 200)], &r));
        assert!(micro_leaves_fit(&[(1001, 100), (1001, 100)], &r));
        // A lost update: less than the vCPU's own CPUIDs and query.
        assert!(!micro_leaves_fit(&[(999, 100), (2004, 200)], &r));
        assert!(!micro_leaves_fit(&[(1500, 201), (2004, 200)], &r));
        // One line per vCPU.
        assert!(!micro_leaves_fit(&[(1500, 150)], &r));
    }

    #[test]
    fn leaves_are_matched_to_vms_one_to_one() {
        // Two VMs; the lines in any order.
        let r = micro_leaf_ranges(&[vm(10, 0, 2), vm(1000, 5, 2)]);
        assert!(micro_leaves_fit(
            &[(1500, 7), (15, 0), (1003, 10), (11, 0)],
            &r
        ));
        // Three lines fit the big VM, one of them only there: no one-to-one fit.
        assert!(!micro_leaves_fit(
            &[(1500, 7), (1003, 10), (1001, 5), (11, 0)],
            &r
        ));
        // The first line fits both VMs; the matching must move it to make room.
        let r = [(1..=100, 0..=0), (1..=10, 0..=0)];
        assert!(micro_leaves_fit(&[(5, 0), (50, 0)], &r));
    }

    #[test]
    fn micro_runs_repeat_the_vms() {
        let workload = L2Workload::Micro {
            binary: PathBuf::new(),
            vms: vec![vm(1, 2, 2), vm(3, 4, 2)],
            launch: crate::lab::image::Launch::InTurn,
        };
        let l1 = L1::with_workload(workload, 2, "");
        let runs = micro_runs(&l1);
        assert_eq!(runs, [vm(1, 2, 2), vm(3, 4, 2), vm(1, 2, 2), vm(3, 4, 2)]);
        let known = micro_detail_expectations(&runs);
        let key = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        assert_eq!(
            known,
            [(key("cpuid", "0x0"), 16), (key("port", "0x1e0:out:1"), 24),],
            "no MSR rows when the VMs do none"
        );
        assert_eq!(micro_vcpus(&runs) * MICRO_LEAF_READS, 24);
    }
}
