//! Reconciling what a guest read from the patched KVM's counter leaves with the host's
//! own count at the same instant (`record --snapshots`), reason by reason, and naming
//! the cause of every difference that has a known one. Pure: a report in, rows out.

use serde::Serialize;

use crate::{
    exit_reasons::{self, Isa},
    guest::UNDEFINED_EDX,
    report::{CpuidRead, LeafKind, Report},
};

/// What a difference between the guest's and the host's count means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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
    /// TSC deadline, preemption timer): the KVM counts in the slow exit handler only.
    FastpathNotCounted,
    /// The guest counted more than the host saw for this VM: counts carried over from an
    /// earlier VM or module load.
    CarriedOver,
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
            Self::CarriedOver => "counts carried over from an earlier VM or module load",
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
    pub verdict: Verdict,
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

/// Reasons KVM may handle on its fastpath, without the slow exit handler.
fn fastpath(isa: Isa, reason: u32) -> bool {
    matches!((isa, reason), (Isa::Vmx, 32 | 52) | (Isa::Svm, 0x7c))
}

/// The CPUID exit reason of `isa`.
fn cpuid_reason(isa: Isa) -> Option<u32> {
    match isa {
        Isa::Vmx => Some(10),
        Isa::Svm => Some(0x72),
        Isa::Other(_) => None,
    }
}

fn verdict(isa: Isa, reason: Option<u32>, read: &CpuidRead, host: u64, guest: u64) -> Verdict {
    if let Some(r) = reason {
        let defined = tracer_common::exit_reasons::defined_by_spec(isa.raw(), r);
        let says_undefined = read.edx == UNDEFINED_EDX;
        match (defined, says_undefined) {
            (false, true) if guest == 0 && read.ecx == 0 => return Verdict::Undefined,
            (true, true) | (false, false) => return Verdict::WrongUndefinedAnswer,
            _ => {}
        }
    }
    let cpuid_self = reason.is_none() || reason == cpuid_reason(isa);
    match guest.cmp(&host) {
        std::cmp::Ordering::Equal => Verdict::Exact,
        std::cmp::Ordering::Greater => Verdict::CarriedOver,
        std::cmp::Ordering::Less => {
            if host > u64::from(u32::MAX) && guest == host & 0xffff_ffff {
                Verdict::Truncated32
            } else if cpuid_self && host - guest == 1 {
                Verdict::CpuidSelfExit
            } else if reason.is_some_and(|r| fastpath(isa, r)) {
                Verdict::FastpathNotCounted
            } else {
                Verdict::Unexplained
            }
        }
    }
}

/// Reconciles every count and total read in `report` (cycles reads have no host
/// counterpart and are left out).
pub fn reconcile(report: &Report) -> Reconciliation {
    let mut rows = Vec::new();
    for read in &report.cpuid_reads {
        let isa = read.isa;
        let (reason, host, guest) = match read.kind {
            Some(LeafKind::Count) => (
                Some(read.index),
                read.host_reason_count,
                (u64::from(read.ebx) << 32) | u64::from(read.eax),
            ),
            // The total leaf has 32 bits of exits; compare like with like.
            Some(LeafKind::Total) => (None, read.host_total, u64::from(read.eax)),
            Some(LeafKind::Cycles) | None => continue,
        };
        let v = verdict(isa, reason, read, host, guest);
        // A total that only lost its high half is truncation by contract, not an error.
        let v = match (reason, v) {
            (None, Verdict::Truncated32) => Verdict::Exact,
            (_, v) => v,
        };
        rows.push(Row {
            pid: read.pid,
            isa,
            reason,
            name: reason.map_or_else(
                || "TOTAL".to_owned(),
                |r| exit_reasons::name(isa, r).into_owned(),
            ),
            host,
            guest,
            difference: i128::from(guest) - i128::from(host),
            verdict: v,
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

/// A total that is short by no more than what the per-reason reads after it (up to the
/// next total read of the VM) blame on fastpath exits, while every other reason of that
/// readout is exact, has that cause too. The later reads are an upper bound: fastpath
/// exits keep happening between the total read and the per-reason reads.
fn attribute_totals(rows: &mut [Row]) {
    for i in 0..rows.len() {
        if rows[i].reason.is_some() || rows[i].verdict != Verdict::Unexplained {
            continue;
        }
        let pid = rows[i].pid;
        let readout: Vec<&Row> = rows[i + 1..]
            .iter()
            .filter(|r| r.pid == pid)
            .take_while(|r| r.reason.is_some())
            .collect();
        let fastpath_deficit: i128 = readout
            .iter()
            .filter(|r| r.verdict == Verdict::FastpathNotCounted)
            .map(|r| r.difference)
            .sum();
        let others_ok = readout
            .iter()
            .all(|r| r.verdict.is_ok() || r.verdict == Verdict::FastpathNotCounted);
        let deficit = rows[i].difference;
        if others_ok && deficit < 0 && fastpath_deficit <= deficit {
            rows[i].verdict = Verdict::FastpathNotCounted;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

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
}
