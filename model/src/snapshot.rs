//! A plain-data copy of the eBPF maps at one instant: per-CPU values summed, no aya
//! types. Everything downstream ([`crate::report`], [`crate::render`]) works on this.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracer_common::{
    CpuidEvent, DetailKey, ExitKey, ExitStats, RipKey, VcpuKey, drop_kind, limits::HIST_BUCKETS,
};

/// A sum over CPUs did not fit in 64 bits. Never wrapped: the run is reported as failed.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("the {what} counter overflowed 64 bits while summing CPUs")]
pub struct Overflow {
    pub what: &'static str,
}

/// Sums per-CPU `u64`s, failing instead of wrapping.
pub fn sum_u64(values: impl IntoIterator<Item = u64>, what: &'static str) -> Result<u64, Overflow> {
    values
        .into_iter()
        .try_fold(0u64, |acc, v| acc.checked_add(v))
        .ok_or(Overflow { what })
}

/// Sums per-CPU [`ExitStats`] field by field, failing instead of wrapping.
pub fn sum_stats<'a>(
    values: impl IntoIterator<Item = &'a ExitStats>,
) -> Result<ExitStats, Overflow> {
    values.into_iter().try_fold(ExitStats::default(), |acc, v| {
        Ok(ExitStats {
            count: acc
                .count
                .checked_add(v.count)
                .ok_or(Overflow { what: "count" })?,
            timed: acc
                .timed
                .checked_add(v.timed)
                .ok_or(Overflow { what: "timed" })?,
            time_ns: acc
                .time_ns
                .checked_add(v.time_ns)
                .ok_or(Overflow { what: "time_ns" })?,
            max_ns: acc.max_ns.max(v.max_ns),
        })
    })
}

/// Events the eBPF side could not record in full: the `DROPS` slots, by cause (see
/// `drop_kind`), and the runs of its programs the kernel skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drops {
    /// The `DROPS` map, indexed by `drop_kind`.
    pub kinds: [u64; drop_kind::COUNT as usize],
    /// Runs of kvmtrace's programs that the kernel skipped because another eBPF
    /// program was running on the CPU (`bpf_prog_info.recursion_misses`, summed): the
    /// events they would have handled are missing from every count.
    pub recursion_misses: u64,
}

impl Drops {
    /// The count of one `drop_kind` slot (0 for a kind this build does not know).
    pub fn get(&self, kind: u32) -> u64 {
        self.kinds.get(kind as usize).copied().unwrap_or(0)
    }

    pub fn any(&self) -> bool {
        self.recursion_misses > 0 || self.kinds.iter().any(|&n| n > 0)
    }
}

/// The maps' contents, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Per (isa, reason, failed-entry), all phases together.
    pub exits: BTreeMap<ExitKey, ExitStats>,
    /// The same per phase: phase n began with the n-th load of a kvm vendor module
    /// after the probe attached.
    pub phases: BTreeMap<u32, BTreeMap<ExitKey, ExitStats>>,
    /// Per (VM pid, vcpu, isa, reason, failed-entry).
    pub vcpus: BTreeMap<VcpuKey, ExitStats>,
    /// Time histogram per exit key, indexed by bucket.
    pub latency: BTreeMap<ExitKey, Vec<u64>>,
    pub drops: Drops,
    /// Processes in the pid filter at the snapshot (those still alive); `None` when
    /// every process is traced.
    pub filter_pids: Option<u64>,
    /// Guest reads of the counter leaves, in the order they were taken.
    pub cpuid: Vec<CpuidEvent>,
    /// `--detail`: per (phase, VM, reason, sub-key).
    pub detail: BTreeMap<DetailKey, ExitStats>,
    /// `--rip`: exits per (phase, VM, reason, guest RIP).
    pub rips: BTreeMap<RipKey, u64>,
}

impl Snapshot {
    /// Adds a per-vCPU row (rows of the same vCPU and reason in several phases add up).
    pub fn add_vcpu(&mut self, key: VcpuKey, stats: ExitStats) -> Result<(), Overflow> {
        let row = self.vcpus.entry(key).or_default();
        *row = sum_stats([&*row, &stats])?;
        Ok(())
    }

    /// Adds the stats of `exit` in `phase`, to that phase and to the all-phase total.
    pub fn add_exits(
        &mut self,
        phase: u32,
        exit: ExitKey,
        stats: ExitStats,
    ) -> Result<(), Overflow> {
        let all = self.exits.entry(exit).or_default();
        *all = sum_stats([&*all, &stats])?;
        let one = self
            .phases
            .entry(phase)
            .or_default()
            .entry(exit)
            .or_default();
        *one = sum_stats([&*one, &stats])?;
        Ok(())
    }

    /// Adds `count` to histogram bucket `bucket` of `exit` (buckets past the last are
    /// folded into it).
    pub fn add_hist(&mut self, exit: ExitKey, bucket: u32, count: u64) -> Result<(), Overflow> {
        let buckets = self
            .latency
            .entry(exit)
            .or_insert_with(|| vec![0; HIST_BUCKETS as usize]);
        let i = (bucket.min(HIST_BUCKETS - 1)) as usize;
        buckets[i] = buckets[i]
            .checked_add(count)
            .ok_or(Overflow { what: "histogram" })?;
        Ok(())
    }

    /// All exits seen, including those only counted as dropped because a map was full
    /// or a field unreadable.
    pub fn total_exits(&self) -> Result<u64, Overflow> {
        let counted = sum_u64(self.exits.values().map(|s| s.count), "total")?;
        sum_u64(
            [
                counted,
                self.drops.get(drop_kind::EXIT_MAP_FULL),
                self.drops.get(drop_kind::READ_FAILED),
            ],
            "total",
        )
    }
}

/// What one eBPF program cost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramCost {
    pub name: String,
    pub run_count: u64,
    /// 0 unless `kernel.bpf_stats_enabled` was 1.
    pub run_time_ns: u64,
    /// Bytes of native code the JIT made; 0: the kernel interprets the program.
    #[serde(default)]
    pub jited_bytes: u32,
}

/// What one eBPF map costs in kernel memory, as the kernel charges it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapCost {
    pub name: String,
    pub entries: u32,
    /// The map's `memlock` in its fdinfo: the kernel's own figure.
    pub kernel_bytes: u64,
    /// What kvmtrace's plan says the kernel charges for it (its footprint before
    /// Linux 6.4, `tracer/src/probe/memory.rs`); equal to `kernel_bytes` on 5.11-6.3.
    #[serde(default)]
    pub planned_bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lost snapshot is a lost guest read, not an exit: its exit is counted already.
    #[test]
    fn a_lost_snapshot_is_not_an_exit() {
        let mut snap = Snapshot::default();
        snap.drops.kinds[drop_kind::READ_FAILED as usize] = 2;
        snap.drops.kinds[drop_kind::SNAPSHOT_LOST as usize] = 5;
        assert_eq!(snap.total_exits().ok(), Some(2));
    }

    fn stats(count: u64, timed: u64, time_ns: u64) -> ExitStats {
        ExitStats {
            count,
            timed,
            time_ns,
            max_ns: 0,
        }
    }

    #[test]
    fn sums_per_cpu_values() {
        let per_cpu = [stats(3, 2, 100), stats(0, 1, 50), stats(7, 7, 1)];
        assert_eq!(sum_stats(&per_cpu), Ok(stats(10, 10, 151)));
        let maxes = [
            ExitStats {
                max_ns: 40,
                ..stats(1, 1, 40)
            },
            ExitStats {
                max_ns: 90,
                ..stats(2, 2, 100)
            },
        ];
        assert_eq!(sum_stats(&maxes).map(|s| s.max_ns), Ok(90), "max, not sum");
        assert_eq!(sum_u64([1, 2, 3], "x"), Ok(6));
        assert_eq!(sum_stats([].iter()), Ok(ExitStats::default()));
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        assert_eq!(
            sum_u64([u64::MAX, 1], "count"),
            Err(Overflow { what: "count" })
        );
        let per_cpu = [stats(1, 0, u64::MAX), stats(1, 0, 1)];
        assert_eq!(sum_stats(&per_cpu), Err(Overflow { what: "time_ns" }));
    }

    #[test]
    fn total_includes_drops() {
        let mut s = Snapshot::default();
        s.exits.insert(ExitKey::from_raw(1, 10), stats(5, 5, 0));
        s.drops.kinds[drop_kind::EXIT_MAP_FULL as usize] = 2;
        s.drops.kinds[drop_kind::VCPU_MAP_FULL as usize] = 9; // counted in exits already
        s.drops.kinds[drop_kind::PENDING_LOST as usize] = 4; // counted, untimed
        s.drops.recursion_misses = 3; // not known to be exits
        assert_eq!(s.total_exits(), Ok(7));
    }

    #[test]
    fn every_drop_kind_is_a_drop() {
        for kind in 0..drop_kind::COUNT {
            let mut d = Drops::default();
            assert!(!d.any());
            d.kinds[kind as usize] = 1;
            assert!(d.any(), "kind {kind}");
            assert_eq!(d.get(kind), 1);
        }
        assert_eq!(Drops::default().get(drop_kind::COUNT), 0, "unknown kind");
        let misses = Drops {
            recursion_misses: 1,
            ..Drops::default()
        };
        assert!(misses.any());
    }

    #[test]
    fn phases_add_up_to_the_total() {
        let mut s = Snapshot::default();
        let cpuid = ExitKey::from_raw(1, 10);
        assert_eq!(s.add_exits(0, cpuid, stats(3, 3, 30)), Ok(()));
        assert_eq!(s.add_exits(1, cpuid, stats(4, 3, 40)), Ok(()));
        assert_eq!(s.exits[&cpuid], stats(7, 6, 70));
        assert_eq!(s.phases[&0][&cpuid], stats(3, 3, 30));
        assert_eq!(s.phases[&1][&cpuid], stats(4, 3, 40));
        assert_eq!(
            s.add_exits(2, cpuid, stats(u64::MAX, 0, 0)),
            Err(Overflow { what: "count" })
        );
    }

    #[test]
    fn hist_folds_high_buckets() {
        let mut s = Snapshot::default();
        let k = ExitKey::from_raw(2, 0x400);
        assert_eq!(s.add_hist(k, 3, 2), Ok(()));
        assert_eq!(s.add_hist(k, 500, 1), Ok(()));
        let h = &s.latency[&k];
        assert_eq!(h[3], 2);
        assert_eq!(h[HIST_BUCKETS as usize - 1], 1);
    }
}
