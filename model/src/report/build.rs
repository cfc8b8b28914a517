//! The report built from a snapshot and what the run knew besides it. Pure: no I/O.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use tracer_common::{ExitKey, ExitStats};

use super::{
    reads::{Breakdown, name_of},
    schema::{
        Cost, CpuidRead, Dropped, Filter, PhaseInfo, PhaseRow, ReasonRow, RegistersInfo, Report,
        SCHEMA, Totals, VcpuRow, VmRow,
    },
};
use crate::{
    exit_reasons::Isa,
    leaves::Leaves,
    paging::Paging,
    snapshot::{Overflow, Snapshot},
};

/// Facts about the run that the maps do not hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunInfo {
    pub kernel_release: String,
    pub paging: Option<Paging>,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub filter: Filter,
    /// Command names of the VM processes, where known.
    pub comms: BTreeMap<u32, String>,
    /// The counter leaves whose guest reads were snapshotted.
    pub leaves: Option<Leaves>,
    /// The phases kvmtrace saw begin, by number.
    pub phases: BTreeMap<u32, PhaseInfo>,
    pub cost: Option<Cost>,
    /// How the vCPU registers were read (`--snapshots`).
    pub registers: Option<RegistersInfo>,
    /// Whether `--detail` sub-keys were counted.
    pub detail: bool,
    /// `--rip N`: how many RIPs to keep per reason.
    pub rip_top: Option<usize>,
}

/// Reason rows from a per-key map, most exits first, then by (isa, reason, failed
/// entry), with their detail and RIP rows.
fn reason_rows(
    exits: &BTreeMap<ExitKey, ExitStats>,
    hist: Option<&BTreeMap<ExitKey, Vec<u64>>>,
    breakdown: &Breakdown,
    info: &RunInfo,
) -> Vec<ReasonRow> {
    // A reason with emulated rows only (no exit of its own) still gets its row.
    let mut exits = exits.clone();
    for exit in breakdown.detail.keys() {
        exits.entry(*exit).or_default();
    }
    let mut rows: Vec<ReasonRow> = exits
        .iter()
        .map(|(exit, stats)| {
            let mut row = ReasonRow::new(exit, *stats, hist.and_then(|h| h.get(exit)));
            breakdown.fill(&mut row, exit, info.detail, info.rip_top);
            row
        })
        .collect();
    rows.sort_by(|a, b| {
        b.totals
            .count
            .cmp(&a.totals.count)
            .then((a.isa, a.reason, a.failed_entry).cmp(&(b.isa, b.reason, b.failed_entry)))
    });
    rows
}

fn phase_row(
    snap: &Snapshot,
    phase: u32,
    exits: &BTreeMap<ExitKey, ExitStats>,
    info: &RunInfo,
) -> Result<PhaseRow, Overflow> {
    let reasons = reason_rows(exits, None, &Breakdown::of(snap, Some(phase))?, info);
    let info = info.phases.get(&phase);
    let total = reasons
        .iter()
        .try_fold(Totals::default(), |acc, r| acc.checked_add(r.totals))?;
    Ok(PhaseRow {
        phase,
        paging: info.and_then(|i| i.paging.clone()),
        since: info.map(|i| i.since),
        total,
        reasons,
    })
}

impl Report {
    /// Builds the report from a snapshot. Pure: no I/O.
    pub fn build(snap: &Snapshot, info: RunInfo) -> Result<Self, Overflow> {
        let reasons = reason_rows(
            &snap.exits,
            Some(&snap.latency),
            &Breakdown::of(snap, None)?,
            &info,
        );

        // By (pid, reuse): a later process with an earlier VM's pid is a VM of its own.
        let mut vms: BTreeMap<(u32, u32), Totals> = BTreeMap::new();
        let mut vcpus = Vec::with_capacity(snap.vcpus.len());
        for (key, stats) in &snap.vcpus {
            let totals = Totals::from(*stats);
            let vm = vms.entry((key.pid, key.reuse)).or_default();
            *vm = vm.checked_add(totals)?;
            vcpus.push(VcpuRow {
                pid: key.pid,
                reuse: key.reuse,
                vcpu_id: key.vcpu_id,
                isa: Isa::from_raw(key.exit.isa),
                reason: key.exit.reason,
                failed_entry: key.exit.failed_entry != 0,
                name: name_of(&key.exit),
                totals,
            });
        }
        // A pid's name is its current process's: the last VM with that pid.
        let last: BTreeMap<u32, u32> = vms.keys().copied().collect();
        let vms = vms
            .into_iter()
            .map(|((pid, reuse), totals)| VmRow {
                pid,
                reuse,
                comm: (last.get(&pid) == Some(&reuse))
                    .then(|| info.comms.get(&pid).cloned())
                    .flatten(),
                totals,
            })
            .collect();

        let mut total = reasons
            .iter()
            .try_fold(Totals::default(), |acc, r| acc.checked_add(r.totals))?;
        total.count = snap.total_exits()?;
        let dropped = Dropped::from(&snap.drops);
        let cpuid_reads = snap
            .cpuid
            .iter()
            .map(|e| CpuidRead::new(e, info.leaves))
            .collect();
        let phases = snap
            .phases
            .iter()
            .map(|(&phase, exits)| phase_row(snap, phase, exits, &info))
            .collect::<Result<_, _>>()?;
        let duration_ns = (info.ended_at - info.started_at)
            .num_nanoseconds()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0);
        Ok(Self {
            schema: SCHEMA.to_owned(),
            kvmtrace_version: env!("CARGO_PKG_VERSION").to_owned(),
            kernel_release: info.kernel_release,
            paging: info.paging,
            started_at: info.started_at,
            ended_at: info.ended_at,
            duration_ns,
            filter: info.filter,
            total,
            reasons,
            vms,
            vcpus,
            dropped,
            phases,
            cost: info.cost,
            leaves: info.leaves,
            cpuid_reads,
            registers: info.registers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::VcpuKey;

    use crate::report::tests::{detail_report, sample_report, stats};

    #[test]
    fn detail_rows_add_up_to_their_reason() {
        let mut r = detail_report();
        let row = |r: &Report, reason| {
            r.reasons
                .iter()
                .find(|x| x.reason == reason)
                .cloned()
                .unwrap_or_else(|| panic!("reason {reason}"))
        };
        let io = row(&r, 30);
        let keys: Vec<(&str, u64)> = io
            .detail
            .iter()
            .map(|d| (d.key.as_str(), d.totals.count))
            .collect();
        assert_eq!(keys, [("0x3f8:out:1", 2), ("undecoded", 1)]);
        assert_eq!(io.detail[0].totals.max_ns, 1500);
        assert_eq!(
            (io.detail[1].totals.timed, io.detail[1].totals.time_ns),
            (1, 1000),
            "the undecoded rest has the rest of the time"
        );
        assert_eq!(io.totals.max_ns, 1500);
        assert_eq!(io.p50_ns, Some(1024), "bucket 9 ends at 1024 ns");
        let ept = row(&r, 48);
        let keys: Vec<(&str, u64)> = ept
            .detail
            .iter()
            .map(|d| (d.key.as_str(), d.totals.count))
            .collect();
        assert_eq!(keys, [("0xfee00000", 4), ("undecoded", 2)]);
        assert_eq!(io.rips.len(), 1, "--rip 1");
        assert_eq!(
            (io.rips[0].rip, io.rips[0].count, io.rips_rest),
            (0xffff_ffff_8107_1b2f, 2, 1)
        );
        assert_eq!(io.rips[0].symbol, None, "no symbols given");
        assert_eq!(io.rips.len(), 1);
        let syms = crate::symbols::Symbols::parse("ffffffff81071b20 T native_write_cr3\n", 0)
            .unwrap_or_else(|e| panic!("{e}"));
        r.symbolize(&syms);
        assert_eq!(
            row(&r, 30).rips[0].symbol.as_deref(),
            Some("native_write_cr3+0xf")
        );
        // Per phase too, and through JSON.
        assert_eq!(
            r.phases[0]
                .reasons
                .iter()
                .map(|x| x.detail.len())
                .sum::<usize>(),
            4
        );
        let text = serde_json::to_string(&r).unwrap_or_default();
        assert_eq!(Report::from_json(&text).ok(), Some(r));
    }

    #[test]
    fn a_pid_used_again_is_a_vm_of_its_own() {
        let mut snap = Snapshot::default();
        let io = ExitKey::from_raw(1, 30);
        for (reuse, n) in [(0, 5), (1, 7)] {
            let key = VcpuKey {
                pid: 42,
                reuse,
                vcpu_id: 0,
                exit: io,
            };
            snap.add_vcpu(key, stats(n, 0, 0)).ok();
            snap.add_exits(0, io, stats(n, 0, 0)).ok();
        }
        let info = RunInfo {
            comms: [(42, "qemu".to_owned())].into(),
            ..RunInfo::default()
        };
        let b = Report::build(&snap, info).unwrap_or_else(|e| panic!("{e}"));
        let vms: Vec<_> = b
            .vms
            .iter()
            .map(|v| (v.pid, v.reuse, v.comm.as_deref(), v.totals.count))
            .collect();
        // The pid's name is its current process's: the second VM's.
        assert_eq!(vms, [(42, 0, None, 5), (42, 1, Some("qemu"), 7)]);
        let ids: Vec<String> = b.vcpus.iter().map(VcpuRow::vm_id).collect();
        assert_eq!(ids, ["42", "42#2"]);
        // Only a reused pid's rows say so in the JSON.
        let text = serde_json::to_string(&b).unwrap_or_default();
        assert_eq!(text.matches("\"reuse\":1").count(), 2, "{text}");
        assert!(!text.contains("\"reuse\":0"));
        assert_eq!(Report::from_json(&text).ok(), Some(b));
    }

    #[test]
    fn emulated_rows_are_kept_beside_their_reason() {
        let mut snap = Snapshot::default();
        let io = ExitKey::from_raw(1, 30);
        snap.add_exits(0, io, stats(2, 2, 20)).ok();
        let row = |exit| {
            tracer_common::PhaseVcpuKey::new(
                0,
                &VcpuKey {
                    pid: 42,
                    reuse: 0,
                    vcpu_id: 0,
                    exit,
                },
            )
        };
        use tracer_common::detail_kind::{CPUID, EMULATED, PORT};
        snap.detail.insert(
            tracer_common::DetailKey::new(&row(io), PORT, 0x0070_0000),
            stats(2, 2, 20),
        );
        // Real-mode CPUIDs emulated under ept=0: no CPUID exit at all.
        let cpuid = ExitKey::from_raw(1, 10);
        snap.detail.insert(
            tracer_common::DetailKey::new(&row(cpuid), CPUID | EMULATED, 0),
            stats(3, 0, 0),
        );
        let info = RunInfo {
            detail: true,
            ..RunInfo::default()
        };
        let b = Report::build(&snap, info).unwrap_or_else(|e| panic!("{e}"));
        let cpuid_row = b.reasons.iter().find(|x| x.reason == 10);
        assert_eq!(
            cpuid_row.map(|x| x.totals.count),
            Some(0),
            "a row, with no exits"
        );
        let d = cpuid_row.map(|x| x.detail.clone()).unwrap_or_default();
        assert_eq!(d.len(), 1, "no undecoded rest: the reason has no exits");
        assert_eq!(
            (d[0].key.as_str(), d[0].emulated, d[0].totals.count),
            ("0x0:emulated", true, 3)
        );
        let totals = b.detail_totals(&[]);
        assert_eq!(
            totals.get(&("cpuid".into(), "0x0".into())),
            Some(&3),
            "counted like the hist"
        );
        let reasons: Vec<(u32, u64)> = b
            .reasons
            .iter()
            .map(|x| (x.reason, x.totals.count))
            .collect();
        assert_eq!(
            reasons,
            [(30, 2), (10, 0)],
            "the IO reason keeps its exits; the emulated CPUIDs sort after it"
        );
        let io_rows: Vec<(&str, bool, u64)> = b.reasons[0]
            .detail
            .iter()
            .map(|d| (d.key.as_str(), d.emulated, d.totals.count))
            .collect();
        assert_eq!(
            io_rows,
            [("0x70:out:1", false, 2)],
            "the IO reason keeps its port row, with no emulated row beside it"
        );
    }

    #[test]
    fn build_sorts_names_and_sums() {
        let r = sample_report();
        let names: Vec<_> = r.reasons.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "EPT_VIOLATION",
                "IO_INSTRUCTION",
                "INVALID_STATE",
                "UNKNOWN(99)"
            ]
        );
        assert!(r.reasons[2].failed_entry, "bit 31 is the failed-entry flag");
        assert_eq!(r.reasons[2].reason, 33, "bits 15:0 are the basic reason");
        assert_eq!(
            r.total,
            Totals {
                count: 11,
                timed: 9,
                time_ns: 4007,
                max_ns: 0,
            }
        );
        assert_eq!(r.reasons[1].mean_ns, Some(1000));
        assert_eq!(r.reasons[2].mean_ns, None);
        assert_eq!(r.duration_ns, 1_500_000_000);
        assert_eq!(r.vms.len(), 1);
        assert_eq!(
            r.vms[0].totals, r.total,
            "one VM: its rows sum to the totals"
        );
        assert_eq!(r.vms[0].comm.as_deref(), Some("qemu"));
    }

    #[test]
    fn phases_keep_their_paging_mode() {
        let mut snap = Snapshot::default();
        let cpuid = ExitKey::from_raw(1, 10);
        let cr = ExitKey::from_raw(1, 28);
        for (phase, exit, n) in [(0, cpuid, 5), (1, cpuid, 5), (1, cr, 9)] {
            snap.add_exits(phase, exit, stats(n, n, n))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let paging = |nested| Paging {
            module: "kvm_intel".into(),
            parameter: "ept".into(),
            nested,
        };
        let t0 = DateTime::<Utc>::default();
        let info = RunInfo {
            phases: [
                (
                    0,
                    PhaseInfo {
                        paging: Some(paging(true)),
                        since: t0,
                    },
                ),
                (
                    1,
                    PhaseInfo {
                        paging: Some(paging(false)),
                        since: t0,
                    },
                ),
            ]
            .into(),
            ..RunInfo::default()
        };
        let r = Report::build(&snap, info).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.total.count, 19);
        assert_eq!(r.phases.len(), 2);
        assert_eq!(r.phases[0].total.count, 5);
        assert_eq!(
            r.phases[0].paging.as_ref().map(Paging::label).as_deref(),
            Some("ept=1")
        );
        assert_eq!(r.phases[1].total.count, 14);
        assert_eq!(r.phases[1].reasons[0].name, "CR_ACCESS");
        assert_eq!(
            r.phases[1].paging.as_ref().map(Paging::label).as_deref(),
            Some("ept=0")
        );
        let back = Report::from_json(&serde_json::to_string(&r).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, r);
    }
}
