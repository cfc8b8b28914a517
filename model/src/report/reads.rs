//! The snapshot's parts read into the report's rows: drop counts, guest reads,
//! reason rows and their `--detail` and `--rip` breakdowns.

use std::collections::BTreeMap;

use tracer_common::{
    CpuidEvent, DetailPlan, ExitKey, ExitStats, detail_plan, drop_kind, read_source,
};

use super::schema::{
    CpuidRead, DetailRow, Dropped, LeafKind, ReadSource, ReasonRow, RipRow, Totals,
};
use crate::{
    detail,
    exit_reasons::{self, Isa},
    latency,
    leaves::Leaves,
    snapshot::{Drops, Overflow, Snapshot, sum_stats, sum_u64},
};

impl From<&Drops> for Dropped {
    fn from(drops: &Drops) -> Self {
        Self {
            exit_map_full: drops.get(drop_kind::EXIT_MAP_FULL),
            vcpu_map_full: drops.get(drop_kind::VCPU_MAP_FULL),
            hist_map_full: drops.get(drop_kind::HIST_MAP_FULL),
            pending_map_full: drops.get(drop_kind::PENDING_MAP_FULL),
            read_failed: drops.get(drop_kind::READ_FAILED),
            filter_map_full: drops.get(drop_kind::FILTER_MAP_FULL),
            vm_map_full: drops.get(drop_kind::VM_MAP_FULL),
            cpuid_ring_full: drops.get(drop_kind::CPUID_RING_FULL),
            pending_lost: drops.get(drop_kind::PENDING_LOST),
            read_pending_full: drops.get(drop_kind::READ_PENDING_FULL),
            recursion_misses: drops.recursion_misses,
            detail_capped: drops.get(drop_kind::DETAIL_CAPPED),
            detail_map_full: drops.get(drop_kind::DETAIL_MAP_FULL),
            rip_map_full: drops.get(drop_kind::RIP_MAP_FULL),
            count_slots_full: drops.get(drop_kind::COUNT_SLOTS_FULL),
            snapshot_lost: drops.get(drop_kind::SNAPSHOT_LOST),
            record_lost: drops.get(drop_kind::RECORD_LOST),
        }
    }
}

/// Per-reason `--detail` and `--rip` rows, for one phase or all of them.
#[derive(Default)]
pub(super) struct Breakdown {
    pub(super) detail: BTreeMap<ExitKey, BTreeMap<(u32, u64), ExitStats>>,
    pub(super) rips: BTreeMap<ExitKey, BTreeMap<u64, u64>>,
}

impl Breakdown {
    /// The rows of `snap` in `phase` (all phases: `None`), summed over VMs.
    pub(super) fn of(snap: &Snapshot, phase: Option<u32>) -> Result<Self, Overflow> {
        let mut b = Self::default();
        for (key, stats) in &snap.detail {
            if phase.is_some_and(|p| p != key.phase()) {
                continue;
            }
            let row = b
                .detail
                .entry(key.exit())
                .or_default()
                .entry((key.kind, key.sub))
                .or_default();
            *row = sum_stats([&*row, stats])?;
        }
        for (key, &count) in &snap.rips {
            if phase.is_some_and(|p| p != key.phase()) {
                continue;
            }
            let row = b
                .rips
                .entry(key.exit())
                .or_default()
                .entry(key.rip)
                .or_default();
            *row = sum_u64([*row, count], "rip count")?;
        }
        Ok(b)
    }

    /// Fills the detail rows (with `detail`) and the `rip_top` RIP rows of `row`
    /// (whose exits are `exit`).
    pub(super) fn fill(
        &self,
        row: &mut ReasonRow,
        exit: &ExitKey,
        detail: bool,
        rip_top: Option<usize>,
    ) {
        if detail {
            row.detail = self.detail_rows(exit, row.isa, &row.totals);
        }
        if let Some(top) = rip_top {
            let mut rips: Vec<(u64, u64)> = self
                .rips
                .get(exit)
                .map(|m| m.iter().map(|(&rip, &n)| (rip, n)).collect())
                .unwrap_or_default();
            rips.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            rips.truncate(top);
            let shown: u64 = rips.iter().map(|r| r.1).sum();
            row.rips_rest = row.totals.count.saturating_sub(shown);
            row.rips = rips
                .into_iter()
                .map(|(rip, count)| RipRow {
                    rip,
                    count,
                    symbol: None,
                })
                .collect();
        }
    }

    fn detail_rows(&self, exit: &ExitKey, isa: Isa, totals: &Totals) -> Vec<DetailRow> {
        let mut rows: Vec<DetailRow> = self
            .detail
            .get(exit)
            .into_iter()
            .flatten()
            .map(|(&(kind, sub), stats)| {
                let d = detail::decode(isa, kind, sub);
                let totals = Totals::from(*stats);
                DetailRow {
                    kind: d.kind.to_owned(),
                    key: d.key,
                    label: d.label,
                    emulated: kind & tracer_common::detail_kind::EMULATED != 0,
                    totals,
                    mean_ns: totals.mean_ns(),
                }
            })
            .collect();
        rows.sort_by(|a, b| b.totals.count.cmp(&a.totals.count).then(a.key.cmp(&b.key)));
        let keyed = detail_plan(exit, Some(0), Some(0)) != DetailPlan::None;
        let sum = |f: fn(&Totals) -> u64| rows.iter().map(|r| f(&r.totals)).sum::<u64>();
        let rest = Totals {
            count: totals.count.saturating_sub(sum(|t| t.count)),
            timed: totals.timed.saturating_sub(sum(|t| t.timed)),
            time_ns: totals.time_ns.saturating_sub(sum(|t| t.time_ns)),
            max_ns: 0,
        };
        if (keyed || !rows.is_empty()) && rest.count > 0 {
            rows.push(DetailRow {
                kind: detail::UNDECODED_KEY.to_owned(),
                key: detail::UNDECODED_KEY.to_owned(),
                label: "no sub-key seen (its tracepoint did not fire, or the map was full)"
                    .to_owned(),
                emulated: false,
                totals: rest,
                mean_ns: rest.mean_ns(),
            });
        }
        rows
    }
}

impl CpuidRead {
    pub(super) fn new(e: &CpuidEvent, leaves: Option<Leaves>) -> Self {
        let kind = leaves.and_then(|l| {
            if Some(e.function) == l.total {
                Some(LeafKind::Total)
            } else if e.function == l.count {
                Some(LeafKind::Count)
            } else if Some(e.function) == l.cycles {
                Some(LeafKind::Cycles)
            } else {
                None
            }
        });
        // The registers are 32-bit CPUID outputs carried in unsigned longs.
        let low = |r: u64| (r & 0xffff_ffff) as u32;
        Self {
            ts_ns: e.ts_ns,
            pid: e.pid,
            tid: e.tid,
            kind,
            leaf: e.function,
            index: e.index,
            eax: low(e.rax),
            ebx: low(e.rbx),
            ecx: low(e.rcx),
            edx: low(e.rdx),
            isa: Isa::from_raw(e.isa),
            host_reason_count: e.host_reason_count,
            host_total: e.host_total,
            host_all_vms: Some(e.host_all_vms),
            host_reason_count_at_entry: Some(e.host_reason_count_entry),
            host_total_at_entry: Some(e.host_total_entry),
            host_all_vms_at_entry: Some(e.host_all_vms_entry),
            host_ended_vms: Some(e.host_ended_vms),
            host_synthetic: (e.host_synthetic != tracer_common::UNKNOWN)
                .then_some(e.host_synthetic),
            seen_by: [
                (read_source::REGISTERS, ReadSource::Registers),
                (read_source::KVM_CPUID, ReadSource::KvmCpuid),
            ]
            .into_iter()
            .filter(|(bit, _)| e.source & bit != 0)
            .map(|(_, s)| s)
            .collect(),
            kvm_cpuid_differs: {
                let tp = [e.tp_rax, e.tp_rbx, e.tp_rcx, e.tp_rdx].map(low);
                let both = read_source::REGISTERS | read_source::KVM_CPUID;
                let got = [e.rax, e.rbx, e.rcx, e.rdx].map(low);
                (e.source & both == both && tp != got).then_some(tp)
            },
        }
    }
}

pub(super) fn name_of(exit: &ExitKey) -> String {
    exit_reasons::name(Isa::from_raw(exit.isa), exit.reason).into_owned()
}

impl ReasonRow {
    /// The row of `exit`, with its histogram when there is one.
    pub(super) fn new(exit: &ExitKey, stats: ExitStats, hist: Option<&Vec<u64>>) -> Self {
        let totals = Totals::from(stats);
        let histogram = hist.map(|h| latency::buckets(h)).unwrap_or_default();
        // A bucket's upper bound, but no more than the longest exit seen.
        let quantile = |q| {
            latency::quantile_upper_bound(&histogram, q).map(|b| {
                if totals.max_ns > 0 {
                    b.min(totals.max_ns)
                } else {
                    b
                }
            })
        };
        Self {
            isa: Isa::from_raw(exit.isa),
            reason: exit.reason,
            failed_entry: exit.failed_entry != 0,
            name: name_of(exit),
            totals,
            mean_ns: totals.mean_ns(),
            p50_ns: quantile(0.5),
            p99_ns: quantile(0.99),
            histogram,
            detail: Vec::new(),
            rips: Vec::new(),
            rips_rest: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_reads_are_classified_by_leaf() {
        let leaves = crate::leaves::preset("kvmtrace").ok();
        let event = CpuidEvent {
            ts_ns: 5,
            rax: 0xffff_ffff_0000_0007,
            rbx: 1,
            function: 0x4fff_fffe,
            index: 48,
            isa: 1,
            host_reason_count: 7,
            host_total: 99,
            ..CpuidEvent::default()
        };
        let read = CpuidRead::new(&event, leaves);
        assert_eq!(read.kind, Some(LeafKind::Count));
        assert_eq!(
            (read.eax, read.ebx, read.isa),
            (7, 1, Isa::Vmx),
            "low 32 bits of rax"
        );
        let other = CpuidRead::new(
            &CpuidEvent {
                function: 0x4fff_ffff,
                ..event
            },
            leaves,
        );
        assert_eq!(other.kind, Some(LeafKind::Total));
        assert_eq!(CpuidRead::new(&event, None).kind, None);
    }

    #[test]
    fn every_drop_kind_reaches_the_report() {
        let mut snap = Snapshot::default();
        for kind in 0..drop_kind::COUNT {
            snap.drops.kinds[kind as usize] = 100 + u64::from(kind);
        }
        snap.drops.recursion_misses = 7;
        let d = Dropped::from(&snap.drops);
        let mut seen = [
            d.exit_map_full,
            d.vcpu_map_full,
            d.hist_map_full,
            d.pending_map_full,
            d.read_failed,
            d.filter_map_full,
            d.vm_map_full,
            d.cpuid_ring_full,
            d.pending_lost,
            d.read_pending_full,
            d.detail_capped,
            d.detail_map_full,
            d.rip_map_full,
            d.count_slots_full,
            d.snapshot_lost,
            d.record_lost,
        ];
        assert_eq!(seen.len(), drop_kind::COUNT as usize, "a kind has no field");
        seen.sort_unstable();
        let want: Vec<u64> = (0..drop_kind::COUNT).map(|k| 100 + u64::from(k)).collect();
        assert_eq!(seen.to_vec(), want, "each kind lands in its own field");
        assert_eq!(d.pending_lost, 100 + u64::from(drop_kind::PENDING_LOST));
        assert_eq!(d.recursion_misses, 7);
        for one in [
            Dropped {
                pending_lost: 1,
                ..Dropped::default()
            },
            Dropped {
                recursion_misses: 1,
                ..Dropped::default()
            },
        ] {
            assert!(one.any(), "{one:?}");
        }
    }
}
