//! Reconciling what a guest read from the patched KVM's counter leaves with the host's
//! own count at the same instant (`record --snapshots`), reason by reason, and naming
//! the cause of every difference that has a known one. Pure: a report in, rows out.

use std::cmp::Ordering;

use serde::Serialize;

use crate::{
    exit_reasons::{self, Isa},
    guest::UNDEFINED_EDX,
    report::{CpuidRead, LeafKind, Report},
};

/// What a difference between the guest's and the host's count means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The guest read exactly the host's count.
    Exact,
    /// A reason the specification does not define, answered as undefined.
    Undefined,
    /// The guest is short by exactly the CPUID exit of this very query: the KVM counts
    /// an exit only after handling it.
    CpuidSelfExit,
    /// The guest value is the host count's low 32 bits: the high half was lost.
    Truncated32,
    /// The guest is short in a reason KVM handles on its fastpath (MSR writes of the
    /// TSC deadline, preemption timer), or a total is short by no more than those
    /// reasons' deficit: the KVM counts in the slow exit handler only.
    FastpathNotCounted,
    /// The guest counted KVM's synthetic INVALID_STATE exits (VMX reason 33), which
    /// `vmx_vcpu_run()` makes up when the guest needs emulation and which are not VM
    /// exits (`kvm:kvm_exit` never shows them): the KVM counts at the top of the exit
    /// handler.
    SyntheticCounted,
    /// The guest read the count of every VM running at the time: counters shared by
    /// all VMs (e.g. kvm.ko globals).
    SharedAcrossVms,
    /// The guest counted more than the host saw for this VM: counts carried over from an
    /// earlier VM or module load.
    CarriedOver,
    /// The guest is short in a VM with two or more vCPUs and nothing else explains it:
    /// updates lost to counters the vCPUs share without synchronisation.
    LostUpdates,
    /// The total leaf answers like an unpatched KVM (or zeros) while the count leaf
    /// works: the total is not reaching the guest (e.g. a missing `else` after it).
    TotalLeafWrong,
    /// EBX or EDX were not set (or ECX echoes the asked reason) while EAX is right.
    RegistersUnset,
    /// The cycles leaf answers like an unpatched KVM (zeros, or data in EAX) about a
    /// reason with exits: it is not implemented.
    CyclesNotImplemented,
    /// Undefined answered for a defined reason, or the other way round.
    WrongUndefinedAnswer,
    /// None of the above.
    Unexplained,
}

impl Verdict {
    pub fn is_ok(self) -> bool {
        matches!(self, Self::Exact | Self::Undefined)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Undefined => "undefined reason, answered as such",
            Self::CpuidSelfExit => "short by this query's own CPUID exit",
            Self::Truncated32 => "32-bit truncation",
            Self::FastpathNotCounted => "fastpath exits not counted",
            Self::SyntheticCounted => "synthetic INVALID_STATE exits counted",
            Self::SharedAcrossVms => "counters shared by all VMs",
            Self::CarriedOver => "counts carried over from an earlier VM or module load",
            Self::LostUpdates => "updates lost to unsynchronised counters (2+ vCPUs)",
            Self::TotalLeafWrong => "the total leaf answers wrongly (the count leaf works)",
            Self::RegistersUnset => "EBX/EDX not set, or ECX echoes the input",
            Self::CyclesNotImplemented => "the cycles leaf is not implemented",
            Self::WrongUndefinedAnswer => "wrong undefined/not-handled answer",
            Self::Unexplained => "unexplained",
        }
    }
}

/// One guest read, reconciled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Row {
    pub pid: u32,
    pub isa: Isa,
    /// `None` for the total leaf.
    pub reason: Option<u32>,
    pub name: String,
    pub host: u64,
    pub guest: u64,
    pub difference: i128,
    /// The main cause (the first of `causes`), `Exact`, `Undefined` or `Unexplained`.
    pub verdict: Verdict,
    /// Every cause found for this read, when more than one applies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<Verdict>,
}

/// All reads of a record, reconciled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reconciliation {
    pub schema: &'static str,
    pub reads: usize,
    pub unexplained: usize,
    pub rows: Vec<Row>,
}

pub const RECONCILE_SCHEMA: &str = "kvmtrace.reconcile.v1";

/// Reasons KVM may complete on its fastpath, without the slow exit handler: the
/// TSC-deadline WRMSR and the VMX preemption timer; on 6.12 also HLT with an event
/// pending (VMX 12, SVM 0x78).
fn fastpath(isa: Isa, reason: u32) -> bool {
    matches!(
        (isa, reason),
        (Isa::Vmx, 12 | 32 | 52) | (Isa::Svm, 0x78 | 0x7c)
    )
}

/// KVM's synthetic exit: VMX INVALID_STATE (33), made up by `vmx_vcpu_run()` when the
/// guest state needs emulation; never a `kvm:kvm_exit`.
fn synthetic(isa: Isa, reason: u32) -> bool {
    isa == Isa::Vmx && reason == tracer_common::exit_reasons::VMX_INVALID_STATE
}

/// What the host knew of the reading VM at the read.
struct Host {
    /// The count the read is compared with (the reason's, or the VM's total).
    count: u64,
    /// The VM's total.
    vm_total: u64,
    /// Every traced VM's exits since the record began (newer records).
    all_vms: Option<u64>,
    /// vCPUs the VM ran.
    vcpus: usize,
}

/// The verdicts of one read, most telling first; empty means unexplained.
fn causes(isa: Isa, reason: Option<u32>, read: &CpuidRead, host: &Host) -> Vec<Verdict> {
    let mut found = Vec::new();
    let mut guest = guest_value(read);
    if let Some(r) = reason {
        let defined = tracer_common::exit_reasons::defined_by_spec(isa.raw(), r);
        let says_undefined = read.edx == UNDEFINED_EDX;
        match (defined, says_undefined) {
            (false, true) if read.eax == 0 && read.ebx == 0 && read.ecx == 0 => {
                return vec![Verdict::Undefined];
            }
            (true, true) | (false, false) => return vec![Verdict::WrongUndefinedAnswer],
            _ => {}
        }
        // The contract: ECX = EDX = 0 and EBX the high half. A sloppy patch leaves
        // EBX/EDX as they were or echoes the asked reason in ECX: judge EAX alone.
        // (EBX = 0 under a larger count is a lost high half: Truncated32 below.)
        let high = (host.count >> 32) as u32;
        if (read.ecx != 0 && read.ecx == read.index)
            || read.edx != 0
            || (read.ebx != high && read.ebx != 0)
        {
            found.push(Verdict::RegistersUnset);
            guest = u64::from(read.eax) | (u64::from(high) << 32);
        }
    }
    let host_count = host.count;
    match guest.cmp(&host_count) {
        Ordering::Equal if found.is_empty() => found.push(Verdict::Exact),
        Ordering::Equal => {}
        Ordering::Greater => {
            let excess = guest - host_count;
            let others = host
                .all_vms
                .map_or(0, |all| all.saturating_sub(host.vm_total));
            if reason.is_some_and(|r| synthetic(isa, r)) {
                found.push(Verdict::SyntheticCounted);
            } else if others > 0 && excess <= others {
                found.push(Verdict::SharedAcrossVms);
            } else if others > 0 {
                found.extend([Verdict::SharedAcrossVms, Verdict::CarriedOver]);
            } else {
                found.push(Verdict::CarriedOver);
            }
        }
        Ordering::Less => {
            let cpuid_self = reason.is_none() || reason == Some(exit_reasons::cpuid_reason(isa));
            if reason.is_none() && read.eax == 0 && host_count > 0 {
                found.push(Verdict::TotalLeafWrong);
            } else if host_count > u64::from(u32::MAX) && guest == host_count & 0xffff_ffff {
                found.push(Verdict::Truncated32);
            } else if cpuid_self && host_count - guest == 1 {
                found.push(Verdict::CpuidSelfExit);
            } else if reason.is_some_and(|r| fastpath(isa, r)) {
                found.push(Verdict::FastpathNotCounted);
            } else if reason.is_some() && host.vcpus >= 2 {
                found.push(Verdict::LostUpdates);
            }
        }
    }
    found
}

/// The value a read returned: count leaf EBX:EAX; total leaf EAX (32 bits of exits by
/// contract).
fn guest_value(read: &CpuidRead) -> u64 {
    match read.kind {
        Some(LeafKind::Total) => u64::from(read.eax),
        _ => (u64::from(read.ebx) << 32) | u64::from(read.eax),
    }
}

/// Reconciles every count and total read in `report` (cycles reads have no host
/// counterpart and are left out).
pub fn reconcile(report: &Report) -> Reconciliation {
    let mut rows = Vec::new();
    for read in &report.cpuid_reads {
        let isa = read.isa;
        let (reason, count) = match read.kind {
            Some(LeafKind::Count) => (Some(read.index), read.host_reason_count),
            Some(LeafKind::Total) => (None, read.host_total),
            Some(LeafKind::Cycles) => {
                rows.extend(cycles_row(read));
                continue;
            }
            None => continue,
        };
        let host = Host {
            count,
            vm_total: read.host_total,
            all_vms: read.host_all_vms,
            vcpus: report
                .vcpus
                .iter()
                .filter(|v| v.pid == read.pid)
                .map(|v| v.vcpu_id)
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
        };
        let mut found = causes(isa, reason, read, &host);
        // A total that only lost its high half is truncation by contract, not an error.
        if reason.is_none() && found == [Verdict::Truncated32] {
            found = vec![Verdict::Exact];
        }
        let guest = guest_value(read);
        rows.push(Row {
            pid: read.pid,
            isa,
            reason,
            name: reason.map_or_else(
                || "TOTAL".to_owned(),
                |r| exit_reasons::name(isa, r).into_owned(),
            ),
            host: count,
            guest,
            difference: i128::from(guest) - i128::from(count),
            verdict: found.first().copied().unwrap_or(Verdict::Unexplained),
            causes: if found.len() > 1 { found } else { Vec::new() },
        });
    }
    attribute_totals(&mut rows);
    Reconciliation {
        schema: RECONCILE_SCHEMA,
        reads: rows.len(),
        unexplained: rows
            .iter()
            .filter(|r| r.verdict == Verdict::Unexplained)
            .count(),
        rows,
    }
}

/// A cycles read has no host counterpart: it only gets a row when the leaf answers like
/// an unpatched KVM about a defined reason the host saw exit twice or more (the earlier
/// exit's cycles are in; this query's are not yet). The contract: EAX = EDX = 0,
/// EBX:ECX the cycles.
fn cycles_row(read: &CpuidRead) -> Option<Row> {
    let defined = tracer_common::exit_reasons::defined_by_spec(read.isa.raw(), read.index);
    let cycles = (u64::from(read.ebx) << 32) | u64::from(read.ecx);
    let unimplemented = defined
        && read.edx != UNDEFINED_EDX
        && read.host_reason_count >= 2
        && (read.eax != 0 || cycles == 0);
    unimplemented.then(|| Row {
        pid: read.pid,
        isa: read.isa,
        reason: Some(read.index),
        name: format!("{} (cycles)", exit_reasons::name(read.isa, read.index)),
        host: read.host_reason_count,
        guest: cycles,
        difference: 0,
        verdict: Verdict::CyclesNotImplemented,
        causes: Vec::new(),
    })
}

/// A total the per-reason reads explain: short by no more than the fastpath deficit
/// and over by no more than the synthetic exits that the VM's count reads show (those
/// reads are bounds: such exits keep happening between the reads), whatever other
/// reads of the VM show. Names each contribution.
fn attribute_totals(rows: &mut [Row]) {
    for i in 0..rows.len() {
        if rows[i].reason.is_some() || rows[i].verdict != Verdict::Unexplained {
            continue;
        }
        let pid = rows[i].pid;
        let of_vm = |v: Verdict| -> i128 {
            rows.iter()
                .filter(|r| r.pid == pid && r.reason.is_some() && r.verdict == v)
                .map(|r| r.difference)
                .sum()
        };
        let (fastpath, synthetic) = (
            of_vm(Verdict::FastpathNotCounted).min(0),
            of_vm(Verdict::SyntheticCounted).max(0),
        );
        let d = rows[i].difference;
        if d < fastpath || d > synthetic {
            // Still unexplained while the VM's count leaf reads are right: the total
            // leaf itself answers wrongly.
            let count_reads = || {
                rows.iter().filter(|r| {
                    r.pid == pid && r.reason.is_some() && r.verdict != Verdict::CyclesNotImplemented
                })
            };
            let counts_ok =
                count_reads().all(|r| r.verdict.is_ok() || r.verdict == Verdict::CpuidSelfExit);
            let any_count = count_reads().next().is_some();
            if counts_ok && any_count {
                rows[i].verdict = Verdict::TotalLeafWrong;
            }
            continue;
        }
        let mut found = Vec::new();
        if fastpath < 0 && d < synthetic {
            found.push(Verdict::FastpathNotCounted);
        }
        if synthetic > 0 && d > fastpath {
            found.push(Verdict::SyntheticCounted);
        }
        if let Some(&first) = found.first() {
            rows[i].verdict = first;
            rows[i].causes = if found.len() > 1 { found } else { Vec::new() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{ReadSource, tests::sample_report};

    fn read(kind: LeafKind, index: u32, eax: u32, edx: u32, host: u64) -> CpuidRead {
        CpuidRead {
            ts_ns: 0,
            pid: 7,
            tid: 8,
            kind: Some(kind),
            leaf: 0x4fff_fffe,
            index,
            eax,
            ebx: 0,
            ecx: 0,
            edx,
            isa: Isa::Vmx,
            host_reason_count: host,
            host_total: host,
            host_all_vms: None,
            seen_by: vec![ReadSource::Registers],
            kvm_cpuid_differs: None,
        }
    }

    fn verdicts(reads: Vec<CpuidRead>) -> Vec<Verdict> {
        let mut r = sample_report();
        r.cpuid_reads = reads;
        reconcile(&r).rows.into_iter().map(|x| x.verdict).collect()
    }

    #[test]
    fn names_each_known_cause() {
        let v = verdicts(vec![
            read(LeafKind::Count, 48, 544, 0, 544),
            read(LeafKind::Count, 35, 0, UNDEFINED_EDX, 0),
            read(LeafKind::Count, 10, 650, 0, 651),
            read(LeafKind::Count, 32, 100, 0, 937),
            read(LeafKind::Count, 30, 2000, 0, 1387),
            read(LeafKind::Count, 11, 0, UNDEFINED_EDX, 0),
            read(LeafKind::Count, 30, 1000, 0, 1387),
            read(LeafKind::Total, 0, 6800, 0, 6801),
            read(LeafKind::Count, 30, 5, 0, (1 << 32) + 5),
        ]);
        assert_eq!(
            v,
            [
                Verdict::Exact,
                Verdict::Undefined,
                Verdict::CpuidSelfExit,
                Verdict::FastpathNotCounted,
                Verdict::CarriedOver,
                Verdict::WrongUndefinedAnswer,
                Verdict::Unexplained,
                Verdict::CpuidSelfExit,
                Verdict::Truncated32,
            ]
        );
    }

    #[test]
    fn a_total_short_by_the_fastpath_deficit_is_explained() {
        let v = verdicts(vec![
            read(LeafKind::Total, 0, 3184, 0, 4617),
            read(LeafKind::Count, 32, 31, 0, 753),
            read(LeafKind::Count, 52, 5, 0, 721),
            read(LeafKind::Count, 30, 558, 0, 558),
        ]);
        assert_eq!(v[0], Verdict::FastpathNotCounted, "1433 <= 722 + 711");
        let v = verdicts(vec![
            read(LeafKind::Total, 0, 3000, 0, 4617),
            read(LeafKind::Count, 32, 31, 0, 753),
        ]);
        assert_eq!(
            v[0],
            Verdict::Unexplained,
            "more missing than the fastpath explains"
        );
    }

    #[test]
    fn counts_unexplained_and_skips_cycles() {
        let mut r = sample_report();
        r.cpuid_reads = vec![
            read(LeafKind::Count, 30, 1000, 0, 1387),
            read(LeafKind::Cycles, 30, 0, 0, 0),
            read(LeafKind::Total, 0, 5, 0, (1 << 32) + 5),
        ];
        let rec = reconcile(&r);
        assert_eq!((rec.reads, rec.unexplained), (2, 1));
        assert_eq!(rec.rows[0].difference, -387);
        assert_eq!(
            rec.rows[1].verdict,
            Verdict::Exact,
            "the total leaf is 32-bit by contract"
        );
    }

    fn with_all(mut r: CpuidRead, vm_total: u64, all: u64) -> CpuidRead {
        r.host_total = vm_total;
        r.host_all_vms = Some(all);
        r
    }

    #[test]
    fn names_the_causes_of_wrong_patches() {
        let mut unset = read(LeafKind::Count, 30, 558, 0, 558);
        unset.ecx = 30;
        unset.ebx = 0x1234;
        let v = verdicts(vec![
            // INVALID_STATE counted by the patch, never traced.
            read(LeafKind::Count, 33, 812, 0, 0),
            // Another VM ran meanwhile: the guest read both VMs' exits.
            with_all(read(LeafKind::Count, 30, 900, 0, 558), 3000, 4000),
            // More than every VM since the record began: carried over too.
            with_all(read(LeafKind::Count, 30, 9000, 0, 558), 3000, 4000),
            // The total leaf answered zeros while counts work.
            read(LeafKind::Total, 0, 0, 0, 6801),
            // EAX right, but ECX echoes the reason and EBX is garbage.
            unset,
        ]);
        assert_eq!(
            v,
            [
                Verdict::SyntheticCounted,
                Verdict::SharedAcrossVms,
                Verdict::SharedAcrossVms,
                Verdict::TotalLeafWrong,
                Verdict::RegistersUnset,
            ]
        );
        let mut r = sample_report();
        r.cpuid_reads = vec![with_all(
            read(LeafKind::Count, 30, 9000, 0, 558),
            3000,
            4000,
        )];
        assert_eq!(
            reconcile(&r).rows[0].causes,
            [Verdict::SharedAcrossVms, Verdict::CarriedOver]
        );
    }

    #[test]
    fn a_total_gets_the_fastpath_and_synthetic_causes_of_its_vm() {
        // 300 synthetic exits over, up to 722 fastpath exits short, even though
        // another read of the VM has another cause.
        let v = verdicts(vec![
            read(LeafKind::Total, 0, 4400, 0, 4617),
            read(LeafKind::Count, 32, 31, 0, 753),
            read(LeafKind::Count, 33, 300, 0, 0),
            read(LeafKind::Count, 30, 2000, 0, 1387),
        ]);
        assert_eq!(v[0], Verdict::FastpathNotCounted);
        let mut r = sample_report();
        r.cpuid_reads = vec![
            read(LeafKind::Total, 0, 4400, 0, 4617),
            read(LeafKind::Count, 32, 31, 0, 753),
            read(LeafKind::Count, 33, 300, 0, 0),
        ];
        assert_eq!(
            reconcile(&r).rows[0].causes,
            [Verdict::FastpathNotCounted, Verdict::SyntheticCounted]
        );
    }

    #[test]
    fn a_wrong_total_leaf_and_a_missing_cycles_leaf_are_named() {
        // Intel stock's fallback for the total leaf (leaf 0xD data) while counts work.
        let mut total = read(LeafKind::Total, 0, 7, 0, 6801);
        total.ebx = 0x340;
        let mut cycles = read(LeafKind::Cycles, 30, 7, 0, 1387);
        cycles.ebx = 0x340;
        let zero_cycles = read(LeafKind::Cycles, 48, 0, 0, 544);
        let fine_cycles = {
            let mut c = read(LeafKind::Cycles, 28, 0, 0, 10);
            c.ecx = 123_456;
            c
        };
        let v = verdicts(vec![
            total,
            read(LeafKind::Count, 30, 1387, 0, 1387),
            cycles,
            zero_cycles,
            fine_cycles,
        ]);
        assert_eq!(
            v,
            [
                Verdict::TotalLeafWrong,
                Verdict::Exact,
                Verdict::CyclesNotImplemented,
                Verdict::CyclesNotImplemented,
            ]
        );
    }
}
