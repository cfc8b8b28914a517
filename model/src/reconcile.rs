//! Reconciling what a guest read from the patched KVM's counter leaves with the host's
//! own count at the same instant (`record --snapshots`), reason by reason, and naming
//! the cause of every difference that has a known one. Pure: a report in, rows out.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet},
};

use serde::Serialize;

pub use crate::cause::Verdict;
use crate::{
    exit_reasons::{self, Isa},
    leaves::UNDEFINED_EDX,
    report::{CpuidRead, LeafKind, Report},
    verdict::{JudgedRead, Judging, RecordVerdict},
};

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
    /// Wrong only for causes the user accepts (`--accept`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub accepted: bool,
    /// Where the read stands among the VM's reads (for attributing totals).
    #[serde(skip)]
    at: ReadPoint,
}

/// What [`attribute_totals`] needs of a read besides its row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ReadPoint {
    ts_ns: u64,
    /// The VM's total at the read's exit.
    vm_total: u64,
    /// The VM's synthetic exits at the read, where the host counts them.
    synthetic: Option<u64>,
    /// vCPUs the VM ran.
    vcpus: usize,
    /// The other running VMs' exits at the read (see [`Host::live_others`]).
    live_others: Option<u64>,
    /// `kvm:kvm_cpuid` reported other values than the guest received.
    tracepoint_differs: bool,
    /// A read of the cycles leaf: no count to weigh against the VM's other reads.
    cycles: bool,
}

impl JudgedRead for Row {
    fn main_verdict(&self) -> Verdict {
        self.verdict
    }
    fn causes_found(&self) -> &[Verdict] {
        self.every_cause()
    }
    fn set_accepted(&mut self, accepted: bool) {
        self.accepted = accepted;
    }
    fn reads_cycles(&self) -> bool {
        self.is_cycles()
    }
    fn asked_reason(&self) -> Option<u32> {
        self.reason
    }
    fn guest_value(&self) -> u64 {
        self.guest
    }
}

impl Row {
    /// Every cause found for this read: `causes`, or the one `verdict`.
    pub fn every_cause(&self) -> &[Verdict] {
        if self.causes.is_empty() {
            std::slice::from_ref(&self.verdict)
        } else {
            &self.causes
        }
    }

    /// A read of the cycles leaf (its `host` is the reason's count, not cycles).
    pub fn is_cycles(&self) -> bool {
        self.at.cycles
    }
}

/// All reads of a record, reconciled, and the verdict on them (in the JSON, its fields
/// beside `schema` and `rows`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reconciliation {
    pub schema: &'static str,
    #[serde(flatten)]
    pub verdict: RecordVerdict,
    pub rows: Vec<Row>,
}

pub const RECONCILE_SCHEMA: &str = "kvmtrace.reconcile.v1";

/// Reasons KVM may complete on its fastpath, without the slow exit handler: the
/// TSC-deadline WRMSR and the VMX preemption timer; on 6.12 also HLT with an event
/// pending (VMX 12, SVM 0x78).
fn fastpath(isa: Isa, reason: u32) -> bool {
    use tracer_common::exit_reasons::{
        SVM_HLT, SVM_MSR, VMX_HLT, VMX_MSR_WRITE, VMX_PREEMPTION_TIMER,
    };
    match isa {
        Isa::Vmx => [VMX_HLT, VMX_MSR_WRITE, VMX_PREEMPTION_TIMER].contains(&reason),
        Isa::Svm => [SVM_HLT, SVM_MSR].contains(&reason),
        Isa::Other(_) => false,
    }
}

/// KVM's synthetic exit: VMX INVALID_STATE (33), made up by `vmx_vcpu_run()` when the
/// guest state needs emulation; never a `kvm:kvm_exit`.
fn synthetic(isa: Isa, reason: u32) -> bool {
    isa == Isa::Vmx && reason == tracer_common::exit_reasons::VMX_INVALID_STATE
}

/// What the host knew of the reading VM at the read: its counts at the CPUID exit
/// that asked and at the VM entry that gave the answer (KVM made the answer in
/// between, while other vCPUs and VMs ran on).
struct Host {
    /// The count the read is compared with (the reason's, or the VM's total), at the
    /// exit and at the entry.
    count: u64,
    count_at_entry: u64,
    /// The VM's total at the entry.
    vm_total_at_entry: u64,
    /// Every traced VM's exits since the record began, at the entry (newer records).
    all_vms_at_entry: Option<u64>,
    /// Of those, the exits of VMs that had ended (newest records).
    ended_vms: Option<u64>,
    /// vCPUs the VM ran.
    vcpus: usize,
}

impl Host {
    fn new(read: &CpuidRead, count: u64, count_at_entry: Option<u64>, vcpus: usize) -> Self {
        Self {
            count,
            count_at_entry: count_at_entry.unwrap_or(count).max(count),
            vm_total_at_entry: read
                .host_total_at_entry
                .unwrap_or(read.host_total)
                .max(read.host_total),
            all_vms_at_entry: read.host_all_vms_at_entry.or(read.host_all_vms),
            ended_vms: read.host_ended_vms,
            vcpus,
        }
    }

    /// The host count nearest to `guest` between the exit and the entry.
    fn nearest(&self, guest: u64) -> u64 {
        guest.clamp(self.count, self.count_at_entry)
    }

    /// The exits of the other VMs still running at the read (`None` in records without
    /// the all-VMs count). Without the ended VMs' share (older records), every other
    /// VM counts as running.
    fn live_others(&self) -> Option<u64> {
        let others = self
            .all_vms_at_entry?
            .saturating_sub(self.vm_total_at_entry);
        Some(others.saturating_sub(self.ended_vms.unwrap_or(0)))
    }
}

/// The causes of a guest value `excess` over every count the host had for the VM:
/// other VMs running at the same time (`live` exits: shared counters) and/or VMs or
/// module loads gone before (carried over).
fn excess_causes(live: Option<u64>, excess: u64) -> Vec<Verdict> {
    match live {
        Some(live) if live > 0 && excess <= live => vec![Verdict::SharedAcrossVms],
        Some(live) if live > 0 => vec![Verdict::SharedAcrossVms, Verdict::CarriedOver],
        _ => vec![Verdict::CarriedOver],
    }
}

/// The verdicts of one read, most telling first; empty means unexplained (for a total:
/// left to [`attribute_totals`], which sees the VM's other reads).
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
    let host_count = host.nearest(guest);
    match guest.cmp(&host_count) {
        Ordering::Equal if found.is_empty() => found.push(Verdict::Exact),
        Ordering::Equal => {}
        Ordering::Greater if reason.is_some_and(|r| synthetic(isa, r)) => {
            found.push(Verdict::SyntheticCounted);
        }
        // A total over its VM's count may be synthetic exits: attribute_totals.
        Ordering::Greater if reason.is_none() => {}
        Ordering::Greater => found.extend(excess_causes(host.live_others(), guest - host_count)),
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

/// The vCPUs each VM ran: its per-vCPU rows, or at least the threads that read.
fn vcpus_per_vm(report: &Report) -> BTreeMap<u32, usize> {
    let mut ids: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for v in &report.vcpus {
        ids.entry(v.pid).or_default().insert(v.vcpu_id);
    }
    let mut readers: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for r in &report.cpuid_reads {
        readers.entry(r.pid).or_default().insert(r.tid);
    }
    let mut vcpus: BTreeMap<u32, usize> = ids.into_iter().map(|(p, s)| (p, s.len())).collect();
    for (pid, tids) in readers {
        let n = vcpus.entry(pid).or_default();
        *n = (*n).max(tids.len());
    }
    vcpus
}

/// Host counts in one read that cannot all be true: a reason's count above the VM's
/// total, the VM's total above every VM's, or ended VMs' exits above every VM's. A
/// record like that was taken by a broken tracer (once, an eBPF map key the loader
/// changed); comparing the guest with it would blame the patch for kvmtrace's fault.
pub fn contradictions(report: &Report) -> Vec<String> {
    report
        .cpuid_reads
        .iter()
        .filter_map(|r| {
            let at_entry = (
                r.host_reason_count_at_entry.unwrap_or(r.host_reason_count),
                r.host_total_at_entry.unwrap_or(r.host_total),
                r.host_all_vms_at_entry.or(r.host_all_vms),
            );
            let mut wrong = Vec::new();
            for (when, (reason, total, all)) in [
                ("exit", (r.host_reason_count, r.host_total, r.host_all_vms)),
                ("entry", at_entry),
            ] {
                if r.kind == Some(LeafKind::Count) && reason > total {
                    wrong.push(format!(
                        "at the {when}, the reason's {reason} > the VM's {total}"
                    ));
                }
                if let Some(all) = all.filter(|&all| all < total) {
                    wrong.push(format!(
                        "at the {when}, every VM's {all} < the VM's {total}"
                    ));
                }
            }
            if let (Some(ended), Some(all)) = (r.host_ended_vms, r.host_all_vms)
                && ended > all
            {
                wrong.push(format!("ended VMs' {ended} > every VM's {all}"));
            }
            (!wrong.is_empty()).then(|| {
                format!(
                    "read at {} ns (pid {}, leaf {:#x} ECX {}): {}",
                    r.ts_ns,
                    r.pid,
                    r.leaf,
                    r.index,
                    wrong.join(", ")
                )
            })
        })
        .collect()
}

/// Reconciles every count and total read in `report` (cycles reads have no host
/// counterpart: only those with a cause get a row), accepting nothing and without the guest's
/// printout.
pub fn reconcile(report: &Report) -> Reconciliation {
    reconcile_judged(report, &Judging::default())
}

/// [`reconcile`], judged with the causes the user accepts and the guest's printout.
pub fn reconcile_judged(report: &Report, judging: &Judging) -> Reconciliation {
    let mut rows = reconciled_rows(report);
    let verdict = RecordVerdict::judge(&mut rows, judging);
    Reconciliation {
        schema: RECONCILE_SCHEMA,
        verdict,
        rows,
    }
}

/// A row for every count and total read, and for the cycles reads with a cause.
fn reconciled_rows(report: &Report) -> Vec<Row> {
    let mut rows = Vec::new();
    let vcpus = vcpus_per_vm(report);
    for read in &report.cpuid_reads {
        let isa = read.isa;
        let (reason, count, at_entry) = match read.kind {
            Some(LeafKind::Count) => (
                Some(read.index),
                read.host_reason_count,
                read.host_reason_count_at_entry,
            ),
            Some(LeafKind::Total) => (None, read.host_total, read.host_total_at_entry),
            Some(LeafKind::Cycles) => {
                rows.extend(cycles_row(read, &report.cpuid_reads));
                continue;
            }
            None => continue,
        };
        let host = Host::new(
            read,
            count,
            at_entry,
            vcpus.get(&read.pid).copied().unwrap_or(0),
        );
        let mut found = causes(isa, reason, read, &host);
        // A total that only lost its high half is truncation by contract, not an error.
        if reason.is_none() && found == [Verdict::Truncated32] {
            found = vec![Verdict::Exact];
        }
        let guest = guest_value(read);
        let shown = host.nearest(guest);
        rows.push(Row {
            pid: read.pid,
            isa,
            reason,
            name: reason.map_or_else(
                || "TOTAL".to_owned(),
                |r| exit_reasons::name(isa, r).into_owned(),
            ),
            host: shown,
            guest,
            difference: i128::from(guest) - i128::from(shown),
            verdict: found.first().copied().unwrap_or(Verdict::Unexplained),
            causes: if found.len() > 1 { found } else { Vec::new() },
            accepted: false,
            at: ReadPoint {
                ts_ns: read.ts_ns,
                vm_total: read.host_total,
                synthetic: read.host_synthetic,
                vcpus: host.vcpus,
                live_others: host.live_others(),
                tracepoint_differs: read.kvm_cpuid_differs.is_some(),
                cycles: false,
            },
        });
    }
    lost_not_own_exit(&mut rows);
    attribute_totals(&mut rows);
    add_tracepoint_cause(&mut rows);
    rows
}

/// A cycles read has no host counterpart: it only gets a row when the leaf answers like
/// an unpatched KVM about a defined reason the host saw exit twice or more (the earlier
/// exit's cycles are in; this query's are not yet), and the VM's count leaf did count
/// that reason (zero cycles for exits the patch never counted, e.g. fastpath ones, are
/// the count's fault, named on its row); or when `kvm:kvm_cpuid` saw another answer
/// (see [`add_tracepoint_cause`]). The contract: EAX = EDX = 0, EBX:ECX the cycles.
fn cycles_row(read: &CpuidRead, all: &[CpuidRead]) -> Option<Row> {
    let defined = tracer_common::exit_reasons::defined_by_spec(read.isa.raw(), read.index);
    let cycles = (u64::from(read.ebx) << 32) | u64::from(read.ecx);
    let uncounted = all
        .iter()
        .filter(|r| r.pid == read.pid && r.kind == Some(LeafKind::Count) && r.index == read.index)
        .min_by_key(|r| r.ts_ns.abs_diff(read.ts_ns))
        .is_some_and(|r| guest_value(r) == 0);
    let unimplemented = defined
        && !uncounted
        && read.edx != UNDEFINED_EDX
        && read.host_reason_count >= 2
        && (read.eax != 0 || cycles == 0);
    let tracepoint_differs = read.kvm_cpuid_differs.is_some();
    (unimplemented || tracepoint_differs).then(|| Row {
        pid: read.pid,
        isa: read.isa,
        reason: Some(read.index),
        name: format!("{} (cycles)", exit_reasons::name(read.isa, read.index)),
        host: read.host_reason_count,
        guest: cycles,
        difference: 0,
        // Exact until add_tracepoint_cause names the tracepoint's disagreement.
        verdict: if unimplemented {
            Verdict::CyclesNotImplemented
        } else {
            Verdict::Exact
        },
        causes: Vec::new(),
        accepted: false,
        at: ReadPoint {
            ts_ns: read.ts_ns,
            vm_total: read.host_total,
            synthetic: read.host_synthetic,
            vcpus: 0,
            live_others: None,
            tracepoint_differs,
            cycles: true,
        },
    })
}

/// Reads where `kvm:kvm_cpuid` reported other values than the guest received: the
/// patch set the answer after the tracepoint, a cause of its own besides whatever the
/// value itself shows. It comes first where the value is right (an exact value keeps
/// only this cause), after the value's own causes where it is not. Runs last, so that
/// the other reads' verdicts, which [`attribute_totals`] weighs, are about values alone.
fn add_tracepoint_cause(rows: &mut [Row]) {
    for r in rows.iter_mut().filter(|r| r.at.tracepoint_differs) {
        let value_right = r
            .every_cause()
            .iter()
            .all(|c| !c.is_fault() && *c != Verdict::Unexplained);
        let mut found: Vec<Verdict> = r
            .every_cause()
            .iter()
            .copied()
            .filter(|&c| c != Verdict::Exact)
            .collect();
        if value_right {
            found.insert(0, Verdict::AnswerAfterTracepoint);
        } else {
            found.push(Verdict::AnswerAfterTracepoint);
        }
        r.verdict = found[0];
        r.causes = if found.len() > 1 { found } else { Vec::new() };
    }
}

/// An interval of differences `[lo, hi]` (guest minus host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    lo: i128,
    hi: i128,
}

impl Span {
    const ZERO: Self = Self { lo: 0, hi: 0 };

    fn holds(self, d: i128) -> bool {
        (self.lo..=self.hi).contains(&d)
    }
}

/// How far the VM's fastpath deficit (exits its count leaf missed on KVM's fastpath)
/// can be at a total read. Each count read of a fastpath reason gives the deficit at
/// its own time; the deficit only grows, and by no more than the VM's exits in
/// between. Reasons never read add nothing.
fn fastpath_span(rows: &[Row], total: &Row) -> Span {
    let mut span = Span::ZERO;
    let mut reasons: Vec<u32> = rows
        .iter()
        .filter(|r| {
            r.pid == total.pid && !r.at.cycles && r.reason.is_some_and(|x| fastpath(r.isa, x))
        })
        .filter_map(|r| r.reason)
        .collect();
    reasons.sort_unstable();
    reasons.dedup();
    for reason in reasons {
        let (mut lo, mut hi) = (i128::MIN, 0i128);
        for r in rows
            .iter()
            .filter(|r| r.pid == total.pid && !r.at.cycles && r.reason == Some(reason))
        {
            let d = r.difference.min(0);
            let between = i128::from(r.at.vm_total.abs_diff(total.at.vm_total));
            if r.at.ts_ns >= total.at.ts_ns {
                // Read later: the deficit then was at least as deep.
                lo = lo.max(d);
                hi = hi.min(d + between);
            } else {
                hi = hi.min(d);
                lo = lo.max(d - between);
            }
        }
        if lo > hi {
            // Reads that contradict each other (e.g. another vCPU's): no bound.
            lo = hi.min(0).saturating_sub(i128::from(u32::MAX));
        }
        span.lo = span.lo.saturating_add(lo.max(i128::from(i64::MIN)));
        span.hi = span.hi.saturating_add(hi.min(0));
    }
    span
}

/// Reads short by exactly one in a VM with two or more vCPUs, where another read of the
/// VM's CPUID count or total was exact: that KVM counts the querying CPUID exit before
/// it answers, so the one missing is not this query's own exit but an update lost to
/// the other vCPUs (a million CPUIDs on two vCPUs can lose just one).
fn lost_not_own_exit(rows: &mut [Row]) {
    let self_kind = |r: &Row| {
        r.reason
            .is_none_or(|n| n == exit_reasons::cpuid_reason(r.isa))
    };
    let counts_own_exit: BTreeSet<u32> = rows
        .iter()
        .filter(|r| r.verdict == Verdict::Exact && !r.at.cycles && self_kind(r))
        .map(|r| r.pid)
        .collect();
    for r in rows.iter_mut() {
        if r.verdict == Verdict::CpuidSelfExit
            && r.at.vcpus >= 2
            && counts_own_exit.contains(&r.pid)
        {
            r.verdict = Verdict::LostUpdates;
        }
    }
}

/// A total the VM's other reads and host counts explain, each contribution named:
/// - fastpath exits the count leaf missed (bounded by the VM's fastpath count reads);
/// - synthetic exits counted: the host's own count of them at the read, or, where the
///   host has none, bounded by the VM's reads of the synthetic reason;
/// - updates lost by a VM with two or more vCPUs;
/// - other VMs' exits (shared counters) or earlier ones (carried over).
///
/// Else, while the VM's count reads are right, the total leaf itself answers wrongly.
fn attribute_totals(rows: &mut [Row]) {
    for i in 0..rows.len() {
        if rows[i].reason.is_some() || rows[i].verdict != Verdict::Unexplained {
            continue;
        }
        let pid = rows[i].pid;
        let fast = fastpath_span(rows, &rows[i]);
        let synthetic_reads: i128 = rows
            .iter()
            .filter(|r| {
                r.pid == pid && r.reason.is_some() && r.verdict == Verdict::SyntheticCounted
            })
            .map(|r| r.difference)
            .sum::<i128>()
            .max(0);
        let synthetic = match rows[i].at.synthetic {
            Some(n) => Span {
                lo: i128::from(n),
                hi: i128::from(n),
            },
            None => Span {
                lo: 0,
                hi: synthetic_reads,
            },
        };
        let d = rows[i].difference;
        let mut found = Vec::new();
        if fast.holds(d) {
            found.push(Verdict::FastpathNotCounted);
        } else if synthetic.hi > 0
            && (Span {
                lo: fast.lo + synthetic.lo,
                hi: fast.hi + synthetic.hi,
            })
            .holds(d)
        {
            // Over by the synthetic exits, less what the fastpath deficit took.
            if d < synthetic.hi || fast.hi < 0 {
                found.push(Verdict::FastpathNotCounted);
            }
            found.push(Verdict::SyntheticCounted);
        } else if d < fast.lo && rows[i].at.vcpus >= 2 {
            found.push(Verdict::LostUpdates);
            if fast.hi < 0 {
                found.push(Verdict::FastpathNotCounted);
            }
        } else if d > fast.hi + synthetic.hi {
            let over = u64::try_from(d - fast.hi - synthetic.hi).unwrap_or(u64::MAX);
            found.extend(excess_causes(rows[i].at.live_others, over));
            if fast.hi < 0 {
                found.push(Verdict::FastpathNotCounted);
            }
        } else {
            // Still unexplained while the VM's count leaf reads are right: the total
            // leaf itself answers wrongly.
            let count_reads = || {
                rows.iter()
                    .filter(|r| r.pid == pid && r.reason.is_some() && !r.at.cycles)
            };
            let counts_ok =
                count_reads().all(|r| r.verdict.is_ok() || r.verdict == Verdict::CpuidSelfExit);
            if counts_ok && count_reads().next().is_some() {
                found.push(Verdict::TotalLeafWrong);
            }
        }
        if let Some(&first) = found.first() {
            rows[i].verdict = first;
            rows[i].causes = if found.len() > 1 { found } else { Vec::new() };
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::report::{ReadSource, tests::sample_report};

    pub(crate) fn read(kind: LeafKind, index: u32, eax: u32, edx: u32, host: u64) -> CpuidRead {
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
            host_reason_count_at_entry: None,
            host_total_at_entry: None,
            host_all_vms_at_entry: None,
            host_ended_vms: None,
            host_synthetic: None,
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
    fn contradictory_host_counts_are_found() {
        // The read of the broken --detail record (amd micro, patched): reason 114 at
        // 1001 of the VM's 1106 exits, while "every VM" said 0.
        let mut broken = read(LeafKind::Count, 114, 1001, 0, 1001);
        broken.host_total = 1106;
        broken.host_all_vms = Some(0);
        broken.host_all_vms_at_entry = Some(0);
        broken.ts_ns = 7_358_029_069;
        let mut fine = broken.clone();
        fine.host_all_vms = Some(1106);
        fine.host_all_vms_at_entry = Some(1107);
        fine.host_total_at_entry = Some(1107);
        let mut r = sample_report();
        r.cpuid_reads = vec![fine.clone(), broken];
        assert_eq!(
            contradictions(&r),
            [
                "read at 7358029069 ns (pid 7, leaf 0x4ffffffe ECX 114): at the exit, every \
              VM's 0 < the VM's 1106, at the entry, every VM's 0 < the VM's 1106"
            ]
        );
        let mut reason_over_total = fine.clone();
        reason_over_total.host_reason_count = 1107;
        let mut ended_over_all = fine;
        ended_over_all.host_ended_vms = Some(1200);
        r.cpuid_reads = vec![reason_over_total, ended_over_all];
        let found = contradictions(&r);
        assert_eq!(found.len(), 2);
        assert!(found[0].ends_with("at the exit, the reason's 1107 > the VM's 1106"));
        assert!(found[1].ends_with("ended VMs' 1200 > every VM's 1106"));
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
        assert_eq!((rec.verdict.reads, rec.verdict.unexplained), (2, 1));
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

    /// `r` at time `ts_ns`, when its VM had made `vm_total` exits.
    fn at(mut r: CpuidRead, ts_ns: u64, vm_total: u64) -> CpuidRead {
        r.ts_ns = ts_ns;
        if r.kind == Some(LeafKind::Total) {
            r.host_reason_count = vm_total;
        }
        r.host_total = vm_total;
        r
    }

    fn rows(reads: Vec<CpuidRead>) -> Vec<Row> {
        let mut r = sample_report();
        r.cpuid_reads = reads;
        reconcile(&r).rows
    }

    fn all_causes(row: &Row) -> Vec<Verdict> {
        row.every_cause().to_vec()
    }

    #[test]
    fn a_total_names_fastpath_and_synthetic_exits_from_the_host_count() {
        // handler-top, ept=0 (lab): the total is over the fastpath deficit, which a
        // later MSR_WRITE read bounds, by exactly the host's synthetic exits.
        let mut total = at(read(LeafKind::Total, 0, 34_843, 0, 0), 1, 35_454);
        total.host_synthetic = Some(174);
        let msr = at(read(LeafKind::Count, 32, 39, 0, 824), 2, 35_480);
        let r = rows(vec![total.clone(), msr.clone()]);
        assert_eq!(
            all_causes(&r[0]),
            [Verdict::FastpathNotCounted, Verdict::SyntheticCounted]
        );
        // ept=1: no synthetic exits, the deficit alone.
        total.host_synthetic = Some(0);
        total.eax = 34_843 - 174 + 26;
        assert_eq!(
            all_causes(&rows(vec![total, msr])[0]),
            [Verdict::FastpathNotCounted]
        );
    }

    #[test]
    fn a_total_gets_the_fastpath_and_synthetic_causes_of_its_vm() {
        // No host count of synthetic exits: the VM's reads of reason 33 bound them,
        // even though another read of the VM has another cause.
        let reads = vec![
            at(read(LeafKind::Total, 0, 4195, 0, 0), 1, 4617),
            at(read(LeafKind::Count, 32, 31, 0, 753), 2, 4650),
            at(read(LeafKind::Count, 33, 300, 0, 0), 3, 4651),
            at(read(LeafKind::Count, 30, 2000, 0, 1387), 4, 4652),
        ];
        let r = rows(reads.clone());
        assert_eq!(
            all_causes(&r[0]),
            [Verdict::FastpathNotCounted, Verdict::SyntheticCounted]
        );
        assert_eq!(r[3].verdict, Verdict::CarriedOver);
        // Far more than both explain, while the count reads are wrong too: nothing to
        // blame on the total leaf alone.
        let mut wrong = reads;
        wrong[0].eax = 1000;
        wrong.truncate(3);
        assert_eq!(rows(wrong)[0].verdict, Verdict::Unexplained);
    }

    #[test]
    fn running_vms_are_shared_counters_and_ended_ones_carried_over() {
        let read_with = |guest, ended| {
            let mut r = with_all(read(LeafKind::Count, 30, guest, 0, 558), 3000, 4000);
            r.host_ended_vms = Some(ended);
            r
        };
        let r = rows(vec![
            read_with(900, 0),
            read_with(900, 1000),
            read_with(900, 500),
            read_with(9000, 500),
        ]);
        let got: Vec<Vec<Verdict>> = r.iter().map(all_causes).collect();
        assert_eq!(
            got,
            [
                vec![Verdict::SharedAcrossVms],
                vec![Verdict::CarriedOver],
                vec![Verdict::SharedAcrossVms],
                vec![Verdict::SharedAcrossVms, Verdict::CarriedOver],
            ]
        );
    }

    #[test]
    fn a_read_is_right_anywhere_between_its_exit_and_its_entry() {
        let bracket = |guest| {
            let mut r = read(LeafKind::Count, 10, guest, 0, 558);
            r.host_reason_count_at_entry = Some(570);
            r
        };
        let r = rows(vec![bracket(565), bracket(571), bracket(556)]);
        assert_eq!((r[0].verdict, r[0].host), (Verdict::Exact, 565));
        assert_eq!(
            (r[1].verdict, r[1].host, r[1].difference),
            (Verdict::CarriedOver, 570, 1)
        );
        assert_eq!((r[2].verdict, r[2].difference), (Verdict::Unexplained, -2));
    }

    #[test]
    fn two_vcpus_short_of_their_count_lost_updates() {
        let mut cpuid = at(read(LeafKind::Count, 10, 190_000, 0, 200_003), 1, 200_500);
        cpuid.tid = 9;
        let total = at(read(LeafKind::Total, 0, 190_400, 0, 0), 2, 200_501);
        let r = rows(vec![cpuid, total]);
        assert_eq!(r[0].verdict, Verdict::LostUpdates);
        assert_eq!(all_causes(&r[1]), [Verdict::LostUpdates]);
    }

    #[test]
    fn one_short_with_two_vcpus_is_a_lost_update_where_the_own_exit_is_counted() {
        // racy-shared, npt0 (lab): the CPUID count exact, the total one short.
        let two = |r: CpuidRead, tid| CpuidRead { tid, ..r };
        let cpuid = two(
            at(
                read(LeafKind::Count, 10, 1_984_345, 0, 1_984_345),
                1,
                1_996_050,
            ),
            9,
        );
        let total = at(read(LeafKind::Total, 0, 1_996_049, 0, 0), 2, 1_996_050);
        let r = rows(vec![cpuid.clone(), total.clone()]);
        assert_eq!(r[0].verdict, Verdict::Exact);
        assert_eq!(all_causes(&r[1]), [Verdict::LostUpdates]);
        // One vCPU: one short is the query's own exit.
        let one = rows(vec![CpuidRead { tid: 8, ..cpuid }, total.clone()]);
        assert_eq!(one[1].verdict, Verdict::CpuidSelfExit);
        // Two vCPUs, but no read shows the own exit counted: still the own exit.
        let alone = rows(vec![two(total.clone(), 9), total]);
        assert_eq!(alone[1].verdict, Verdict::CpuidSelfExit);
    }

    #[test]
    fn zero_cycles_of_uncounted_exits_are_the_counts_fault() {
        // slowpath-only: preemption timer exits never counted, so no cycles either.
        let r = rows(vec![
            at(read(LeafKind::Count, 52, 0, 0, 705), 1, 5000),
            at(read(LeafKind::Cycles, 52, 0, 0, 705), 2, 5001),
        ]);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].verdict, Verdict::FastpathNotCounted);
    }

    /// `r` as the vCPU registers and `kvm:kvm_cpuid` both saw it, the tracepoint with
    /// EAX `tp_eax` (the other registers as the guest got them).
    fn tracepoint_saw(mut r: CpuidRead, tp_eax: u32) -> CpuidRead {
        r.seen_by = vec![ReadSource::Registers, ReadSource::KvmCpuid];
        r.kvm_cpuid_differs = Some([tp_eax, r.ebx, r.ecx, r.edx]);
        r
    }

    #[test]
    fn an_answer_set_after_the_tracepoint_is_a_cause_of_its_own() {
        let cycles = |reason, ts| {
            let mut c = at(read(LeafKind::Cycles, reason, 0, 0, 558), ts, 3000 + ts);
            c.ecx = 123_456;
            c
        };
        let r = rows(vec![
            // The guest got the right count, the tracepoint another one.
            tracepoint_saw(at(read(LeafKind::Count, 30, 558, 0, 558), 1, 3000), 7),
            // Wrong for a known reason too: both causes.
            tracepoint_saw(at(read(LeafKind::Count, 32, 100, 0, 937), 2, 3001), 100),
            // An undefined reason answered as such, but not what the tracepoint said.
            tracepoint_saw(
                at(read(LeafKind::Count, 35, 0, UNDEFINED_EDX, 0), 3, 3002),
                0xd,
            ),
            // A total short by more than anything explains: still unexplained.
            tracepoint_saw(at(read(LeafKind::Total, 0, 1000, 0, 0), 4, 3003), 0),
            // A cycles read that answers right gets a row for the tracepoint alone.
            tracepoint_saw(cycles(30, 5), 9),
            // The same, agreeing with the tracepoint: nothing to say.
            cycles(28, 6),
        ]);
        let got: Vec<(Option<u32>, Vec<Verdict>)> =
            r.iter().map(|x| (x.reason, all_causes(x))).collect();
        assert_eq!(
            got,
            [
                (Some(30), vec![Verdict::AnswerAfterTracepoint]),
                (
                    Some(32),
                    vec![Verdict::FastpathNotCounted, Verdict::AnswerAfterTracepoint]
                ),
                (
                    Some(35),
                    vec![Verdict::AnswerAfterTracepoint, Verdict::Undefined]
                ),
                (
                    None,
                    vec![Verdict::Unexplained, Verdict::AnswerAfterTracepoint]
                ),
                (Some(30), vec![Verdict::AnswerAfterTracepoint]),
            ]
        );
        assert_eq!(r[0].verdict, Verdict::AnswerAfterTracepoint);
        assert_eq!(r[3].verdict, Verdict::Unexplained);
        assert_eq!(
            (r[4].name.as_str(), r[4].difference),
            ("IO_INSTRUCTION (cycles)", 0)
        );
    }

    #[test]
    fn a_cycles_row_says_nothing_about_the_counts() {
        // Two vCPUs, the total one short: the query's own exit, unless another read of
        // the VM shows the own exit counted. A cycles read of the CPUID reason, shown
        // for its tracepoint alone, is no such read.
        let mut cycles = tracepoint_saw(at(read(LeafKind::Cycles, 10, 0, 0, 651), 1, 6801), 1);
        cycles.ecx = 123_456;
        cycles.tid = 9;
        let total = at(read(LeafKind::Total, 0, 6800, 0, 0), 2, 6801);
        let r = rows(vec![cycles, total]);
        assert_eq!(
            r.iter().map(|x| x.verdict).collect::<Vec<_>>(),
            [Verdict::AnswerAfterTracepoint, Verdict::CpuidSelfExit]
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
