//! The verdict on a whole reconciliation, computed once from its rows: where each read
//! stands (right, accepted, wrong, unexplained), how many reads each cause touches, and
//! the one [`Outcome`] that `reconcile`'s summary line, its JSON and its exit status all
//! state, so that they cannot disagree.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::{cause::Verdict, guest::GuestReadout};

/// What the verdict needs of a reconciled read (reconcile's rows implement it), so
/// that the verdict does not depend on reconcile, which uses it.
pub trait JudgedRead {
    /// Its main verdict.
    fn main_verdict(&self) -> Verdict;
    /// Every cause found for it.
    fn causes_found(&self) -> &[Verdict];
    /// Marks it as wrong only for causes the user accepts.
    fn set_accepted(&mut self, accepted: bool);
    /// Whether it read a cycles leaf.
    fn reads_cycles(&self) -> bool;
    /// The reason it asked about (`None`: the total leaf).
    fn asked_reason(&self) -> Option<u32>;
    /// What the guest received.
    fn guest_value(&self) -> u64;
}

/// What the verdict weighs besides the record's reads.
#[derive(Clone, Debug, Default)]
pub struct Judging<'a> {
    /// Causes the user accepts on purpose (`reconcile --accept`): reads wrong only for
    /// these are shown as accepted and leave the outcome right. Only faults
    /// ([`Verdict::is_fault`]) count.
    pub accept: BTreeSet<Verdict>,
    /// The guest's own printout (`reconcile --guest`): each value it printed must be one
    /// that a read returned.
    pub guest: Option<&'a GuestReadout>,
}

/// What the counters are, over every read: one value, which the exit status follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every read is right (exact, an undefined reason answered as such, or short by
    /// only this query's own CPUID exit), or wrong only for accepted causes.
    Right,
    /// Some reads are wrong, and every difference has a named cause.
    CausesNamed,
    /// A difference with no known cause: in a read, or a value the guest printed that
    /// no read returned.
    Unexplained,
}

/// Where one read stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Right: its one verdict is `Exact`, `Undefined` or `CpuidSelfExit`.
    Right(Verdict),
    /// Wrong, but only for accepted causes.
    Accepted,
    /// Wrong, every cause named, and one at least not accepted.
    Wrong,
    /// Some of its difference has no known cause.
    Unexplained,
}

impl Standing {
    pub fn of(row: &impl JudgedRead, accept: &BTreeSet<Verdict>) -> Self {
        let causes = row.causes_found();
        let mut faults = causes.iter().filter(|c| c.is_fault()).peekable();
        if causes.contains(&Verdict::Unexplained) {
            Self::Unexplained
        } else if faults.peek().is_none() {
            Self::Right(row.main_verdict())
        } else if faults.all(|c| accept.contains(c)) {
            Self::Accepted
        } else {
            Self::Wrong
        }
    }
}

/// A named fault and the reads it touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CauseCount {
    pub cause: Verdict,
    /// Reads with this cause, whether it is their only one or not.
    pub reads: usize,
    /// The user accepts it (`--accept`).
    pub accepted: bool,
}

/// The verdict on every read of a record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecordVerdict {
    pub outcome: Outcome,
    /// Reads reconciled (count and total reads, and the cycles reads with a cause).
    pub reads: usize,
    /// Reads by standing: together, `reads`.
    pub exact: usize,
    pub undefined: usize,
    pub cpuid_self_exit: usize,
    pub accepted: usize,
    pub wrong: usize,
    pub unexplained_reads: usize,
    /// Differences with no known cause: `unexplained_reads`, and each value in the
    /// guest's printout that no read returned.
    pub unexplained: usize,
    /// Every named fault with the reads it touches (a read with two causes counts
    /// under both), most reads first.
    pub causes: Vec<CauseCount>,
    /// Values the guest printed that no read of theirs returned (`--guest`).
    pub guest_printout_mismatches: Vec<String>,
}

impl RecordVerdict {
    /// Judges `rows` (marking the accepted ones) and the guest's printout.
    pub fn judge(rows: &mut [impl JudgedRead], judging: &Judging) -> Self {
        let mismatches = judging
            .guest
            .map(|g| printout_mismatches(rows, g))
            .unwrap_or_default();
        let mut v = Self {
            outcome: Outcome::Right,
            reads: rows.len(),
            exact: 0,
            undefined: 0,
            cpuid_self_exit: 0,
            accepted: 0,
            wrong: 0,
            unexplained_reads: 0,
            unexplained: 0,
            causes: Vec::new(),
            guest_printout_mismatches: mismatches,
        };
        let mut touched: BTreeMap<Verdict, usize> = BTreeMap::new();
        for row in rows.iter_mut() {
            let standing = Standing::of(&*row, &judging.accept);
            row.set_accepted(standing == Standing::Accepted);
            let tally = match standing {
                Standing::Right(Verdict::Undefined) => &mut v.undefined,
                Standing::Right(Verdict::CpuidSelfExit) => &mut v.cpuid_self_exit,
                Standing::Right(_) => &mut v.exact,
                Standing::Accepted => &mut v.accepted,
                Standing::Wrong => &mut v.wrong,
                Standing::Unexplained => &mut v.unexplained_reads,
            };
            *tally += 1;
            for &c in row.causes_found().iter().filter(|c| c.is_fault()) {
                *touched.entry(c).or_default() += 1;
            }
        }
        v.causes = touched
            .into_iter()
            .map(|(cause, reads)| CauseCount {
                cause,
                reads,
                accepted: judging.accept.contains(&cause),
            })
            .collect();
        // Stable: equal counts stay in the causes' order.
        v.causes.sort_by_key(|c| std::cmp::Reverse(c.reads));
        v.unexplained = v.unexplained_reads + v.guest_printout_mismatches.len();
        v.outcome = if v.unexplained > 0 {
            Outcome::Unexplained
        } else if v.wrong > 0 {
            Outcome::CausesNamed
        } else {
            Outcome::Right
        };
        v
    }
}

/// The guest's printout against the reads the host saw it make: every count it printed
/// for a reason must be one that a read of that reason returned (a record may hold
/// several VMs, each with its readout). Reasons the record has no read of are not
/// judged.
pub fn printout_mismatches(rows: &[impl JudgedRead], guest: &GuestReadout) -> Vec<String> {
    guest
        .reasons
        .iter()
        .filter(|g| {
            let mut reads = rows
                .iter()
                .filter(|r| !r.reads_cycles() && r.asked_reason() == Some(g.reason))
                .peekable();
            reads.peek().is_some() && !reads.any(|r| r.guest_value() == g.count)
        })
        .map(|g| {
            format!(
                "{} ({}): the guest printed {}, which no read of it returned",
                g.name, g.reason, g.count
            )
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        guest::{GUEST_SCHEMA, GuestReason},
        leaves::{PRESETS, UNDEFINED_EDX},
        reconcile::{reconcile_judged, tests::read},
        report::{CpuidRead, LeafKind, ReadSource, tests::sample_report},
    };

    fn judged(reads: Vec<CpuidRead>, judging: &Judging) -> RecordVerdict {
        let mut r = sample_report();
        r.cpuid_reads = reads;
        reconcile_judged(&r, judging).verdict
    }

    fn verdict(reads: Vec<CpuidRead>) -> RecordVerdict {
        judged(reads, &Judging::default())
    }

    fn count(cause: Verdict, reads: usize) -> CauseCount {
        CauseCount {
            cause,
            reads,
            accepted: false,
        }
    }

    /// Exact reads of IO_INSTRUCTION and EPT_VIOLATION, an undefined reason answered
    /// as such, and a CPUID count short by its own exit: right, all of them.
    fn right_reads() -> Vec<CpuidRead> {
        vec![
            read(LeafKind::Count, 30, 1387, 0, 1387),
            read(LeafKind::Count, 48, 544, 0, 544),
            read(LeafKind::Count, 35, 0, UNDEFINED_EDX, 0),
            read(LeafKind::Count, 10, 650, 0, 651),
        ]
    }

    pub(crate) fn with_tracepoint(mut r: CpuidRead, tp_eax: u32) -> CpuidRead {
        r.seen_by = vec![ReadSource::Registers, ReadSource::KvmCpuid];
        r.kvm_cpuid_differs = Some([tp_eax, r.ebx, r.ecx, r.edx]);
        r
    }

    /// For each fault, a read wrong for it alone.
    fn one_wrong_read_per_cause() -> Vec<(Verdict, CpuidRead)> {
        let mut unset = read(LeafKind::Count, 30, 1387, 0, 1387);
        unset.ecx = 30;
        let mut shared = read(LeafKind::Count, 30, 1500, 0, 1387);
        shared.host_total = 3000;
        shared.host_all_vms = Some(9000);
        // Another vCPU thread of the VM read: two vCPUs.
        let mut lost = read(LeafKind::Count, 30, 1380, 0, 1387);
        lost.tid = 9;
        let mut cycles = read(LeafKind::Cycles, 30, 7, 0, 1387);
        cycles.ebx = 0x340;
        vec![
            (
                Verdict::Truncated32,
                read(LeafKind::Count, 30, 5, 0, (1 << 32) + 5),
            ),
            (
                Verdict::FastpathNotCounted,
                read(LeafKind::Count, 32, 100, 0, 937),
            ),
            (
                Verdict::SyntheticCounted,
                read(LeafKind::Count, 33, 812, 0, 0),
            ),
            (Verdict::SharedAcrossVms, shared),
            (
                Verdict::CarriedOver,
                read(LeafKind::Count, 30, 2000, 0, 1387),
            ),
            (Verdict::LostUpdates, lost),
            (
                Verdict::TotalLeafWrong,
                read(LeafKind::Total, 0, 0, 0, 6801),
            ),
            (Verdict::RegistersUnset, unset),
            (Verdict::CyclesNotImplemented, cycles),
            (
                Verdict::WrongUndefinedAnswer,
                read(LeafKind::Count, 11, 0, UNDEFINED_EDX, 0),
            ),
            (
                Verdict::AnswerAfterTracepoint,
                with_tracepoint(read(LeafKind::Count, 30, 1387, 0, 1387), 7),
            ),
        ]
    }

    #[test]
    fn right_reads_are_right() {
        let v = verdict(right_reads());
        assert_eq!(
            (v.outcome, v.reads, v.exact, v.undefined, v.cpuid_self_exit),
            (Outcome::Right, 4, 2, 1, 1)
        );
        assert_eq!((v.accepted, v.wrong, v.unexplained), (0, 0, 0));
        assert!(v.causes.is_empty());
    }

    #[test]
    fn each_cause_alone_names_the_counters_wrong() {
        let wrong = one_wrong_read_per_cause();
        assert_eq!(
            wrong.len(),
            Verdict::ALL.iter().filter(|v| v.is_fault()).count(),
            "every fault"
        );
        for (cause, bad) in wrong {
            let mut reads = right_reads();
            reads.push(bad);
            let v = verdict(reads);
            assert_eq!(v.outcome, Outcome::CausesNamed, "{cause:?}: {v:?}");
            assert_eq!(
                (v.reads, v.wrong, v.unexplained, v.accepted),
                (5, 1, 0, 0),
                "{cause:?}"
            );
            assert_eq!(v.causes, [count(cause, 1)], "{cause:?}");
            // Accepted, it leaves the counters right, and says so.
            let accept = Judging {
                accept: [cause].into(),
                guest: None,
            };
            let v = judged(
                {
                    let mut reads = right_reads();
                    reads.extend(
                        one_wrong_read_per_cause()
                            .into_iter()
                            .filter(|(c, _)| *c == cause)
                            .map(|(_, r)| r),
                    );
                    reads
                },
                &accept,
            );
            assert_eq!(
                (v.outcome, v.accepted, v.wrong),
                (Outcome::Right, 1, 0),
                "{cause:?}"
            );
            assert_eq!(
                v.causes,
                [CauseCount {
                    accepted: true,
                    ..count(cause, 1)
                }]
            );
        }
    }

    #[test]
    fn combined_causes_count_under_each() {
        // Two reads with EBX/EDX unset, one of them carried over too; a third carried
        // over alone; an exact read whose answer was set after the tracepoint.
        let mut unset = read(LeafKind::Count, 30, 1387, 0, 1387);
        unset.edx = 5;
        let mut unset_carried = read(LeafKind::Count, 48, 600, 0, 544);
        unset_carried.edx = 5;
        let reads = vec![
            unset,
            unset_carried,
            read(LeafKind::Count, 28, 900, 0, 700),
            with_tracepoint(read(LeafKind::Count, 12, 40, 0, 40), 41),
            read(LeafKind::Count, 10, 651, 0, 651),
        ];
        let v = verdict(reads.clone());
        assert_eq!(
            (v.outcome, v.reads, v.exact, v.wrong, v.unexplained),
            (Outcome::CausesNamed, 5, 1, 4, 0)
        );
        assert_eq!(
            v.causes,
            [
                count(Verdict::CarriedOver, 2),
                count(Verdict::RegistersUnset, 2),
                count(Verdict::AnswerAfterTracepoint, 1),
            ]
        );
        // Accepting one cause of a read with two leaves it wrong.
        let accept = Judging {
            accept: [Verdict::RegistersUnset, Verdict::AnswerAfterTracepoint].into(),
            guest: None,
        };
        let mut r = sample_report();
        r.cpuid_reads = reads;
        let rec = reconcile_judged(&r, &accept);
        let v = &rec.verdict;
        assert_eq!(
            (v.outcome, v.exact, v.accepted, v.wrong),
            (Outcome::CausesNamed, 1, 2, 2)
        );
        let accepted: Vec<bool> = rec.rows.iter().map(|r| r.accepted).collect();
        assert_eq!(accepted, [true, false, false, true, false]);
        assert_eq!(
            v.causes.iter().map(|c| c.accepted).collect::<Vec<_>>(),
            [false, true, true]
        );
        // Accepting both: right.
        let all = Judging {
            accept: [
                Verdict::RegistersUnset,
                Verdict::AnswerAfterTracepoint,
                Verdict::CarriedOver,
            ]
            .into(),
            guest: None,
        };
        let v = reconcile_judged(&r, &all).verdict;
        assert_eq!((v.outcome, v.accepted, v.wrong), (Outcome::Right, 4, 0));
    }

    #[test]
    fn any_unexplained_difference_is_unexplained() {
        // Unexplained beside named causes, and within a read that has a named cause.
        let reads = vec![
            read(LeafKind::Count, 32, 100, 0, 937),
            read(LeafKind::Count, 30, 1000, 0, 1387),
            with_tracepoint(read(LeafKind::Count, 28, 500, 0, 700), 3),
        ];
        let v = verdict(reads.clone());
        assert_eq!(
            (v.outcome, v.wrong, v.unexplained_reads, v.unexplained),
            (Outcome::Unexplained, 1, 2, 2)
        );
        assert_eq!(
            v.causes,
            [
                count(Verdict::FastpathNotCounted, 1),
                count(Verdict::AnswerAfterTracepoint, 1),
            ]
        );
        // Accepting every named cause does not hide it.
        let accept = Judging {
            accept: [Verdict::FastpathNotCounted, Verdict::AnswerAfterTracepoint].into(),
            guest: None,
        };
        let v = judged(reads, &accept);
        assert_eq!(
            (v.outcome, v.accepted, v.unexplained),
            (Outcome::Unexplained, 1, 2)
        );
    }

    pub(crate) fn readout(reasons: &[(u32, &str, u64)]) -> GuestReadout {
        GuestReadout {
            schema: GUEST_SCHEMA.to_owned(),
            isa: crate::exit_reasons::Isa::Vmx,
            leaves: PRESETS[0].1,
            patched: true,
            detection: "counts".to_owned(),
            total_exits: None,
            total_cycles: None,
            reasons: reasons
                .iter()
                .map(|&(reason, name, count)| GuestReason {
                    reason,
                    name: name.to_owned(),
                    count,
                    cycles: None,
                    undefined: false,
                    queries_before: 0,
                })
                .collect(),
            queries: 0,
            leaf_status: None,
        }
    }

    #[test]
    fn a_printout_no_read_returned_is_unexplained() {
        let guest = readout(&[
            (30, "IO_INSTRUCTION", 1387),
            (48, "EPT_VIOLATION", 545),
            // No read of it in the record: not judged.
            (12, "HLT", 3),
        ]);
        let judging = Judging {
            accept: BTreeSet::new(),
            guest: Some(&guest),
        };
        let v = judged(right_reads(), &judging);
        assert_eq!(
            v.guest_printout_mismatches,
            ["EPT_VIOLATION (48): the guest printed 545, which no read of it returned"]
        );
        assert_eq!(
            (v.outcome, v.exact, v.unexplained_reads, v.unexplained),
            (Outcome::Unexplained, 2, 0, 1)
        );
        // A cycles row of a reason is no read of its count.
        let mut cycles = with_tracepoint(read(LeafKind::Cycles, 12, 0, 0, 3), 1);
        cycles.ecx = 3;
        let v = judged(vec![cycles], &judging);
        assert!(v.guest_printout_mismatches.is_empty(), "{v:?}");
    }
}
