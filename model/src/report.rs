//! The record report: what `kvmtrace record --format json` writes, and what every
//! other view is rendered from.
//!
//! # JSON format (`"schema": "kvmtrace.record.v1"`)
//!
//! One object. A reader must check `schema` first; fields may be added within `v1`,
//! never renamed or removed.
//!
//! ```json
//! {
//!   "schema": "kvmtrace.record.v1",
//!   "kvmtrace_version": "0.1.0",
//!   "kernel_release": "6.1.0-27-cloud-amd64",
//!   "paging": { "module": "kvm_intel", "parameter": "ept", "nested": true },
//!   "started_at": "2026-11-24T16:00:00.000000Z",
//!   "ended_at": "2026-11-24T16:00:09.000000Z",
//!   "duration_ns": 9000000000,
//!   "filter": { "pids": [1234], "vcpu": null },
//!   "total": { "count": 6800, "timed": 6799, "time_ns": 123456789 },
//!   "reasons": [
//!     { "isa": "vmx", "reason": 30, "failed_entry": false, "name": "IO_INSTRUCTION",
//!       "count": 1387, "timed": 1387, "time_ns": 45678901, "mean_ns": 32933,
//!       "histogram": [ { "from_ns": 16384, "to_ns": 32768, "count": 1000 } ] }
//!   ],
//!   "vms": [ { "pid": 1234, "comm": "qemu-system-x86", "count": 6800, "timed": 6799, "time_ns": 123456789 } ],
//!   "vcpus": [
//!     { "pid": 1234, "vcpu_id": 0, "isa": "vmx", "reason": 30, "failed_entry": false,
//!       "name": "IO_INSTRUCTION", "count": 1387, "timed": 1387, "time_ns": 45678901 }
//!   ],
//!   "dropped": { "exit_map_full": 0, "vcpu_map_full": 0, "hist_map_full": 0,
//!                "pending_map_full": 0, "read_failed": 0, "filter_map_full": 0,
//!                "vm_map_full": 0, "cpuid_ring_full": 0, "pending_lost": 0,
//!                "read_pending_full": 0, "recursion_misses": 0, "detail_capped": 0,
//!                "detail_map_full": 0, "rip_map_full": 0, "count_slots_full": 0,
//!                "snapshot_lost": 0, "record_lost": 0 },
//!   "phases": [
//!     { "phase": 0, "paging": { "module": "kvm_intel", "parameter": "ept", "nested": true },
//!       "since": "2026-11-24T16:00:00.000000Z", "total": { "count": 6800, "timed": 6799, "time_ns": 123456789 },
//!       "reasons": [ { "isa": "vmx", "reason": 30, "failed_entry": false, "name": "IO_INSTRUCTION",
//!                      "count": 1387, "timed": 1387, "time_ns": 45678901, "mean_ns": 32933,
//!                      "histogram": [] } ] }
//!   ],
//!   "cost": { "attach_ns": 41000000, "peak_rss_kib": 9200, "bpf_stats": true, "filter_pids": 2,
//!             "programs": [ { "name": "kvm_exit", "run_count": 6800, "run_time_ns": 1904000, "jited_bytes": 1024 } ] },
//!   "leaves": { "total": 1342177279, "count": 1342177278, "cycles": 1342177277 },
//!   "cpuid_reads": [
//!     { "ts_ns": 123456789, "pid": 1234, "tid": 1240, "kind": "count",
//!       "leaf": 1342177278, "index": 10, "eax": 652, "ebx": 0, "ecx": 0, "edx": 0,
//!       "isa": "vmx", "host_reason_count": 652, "host_total": 6801 }
//!   ]
//! }
//! ```
//!
//! - `reason` is the VMX basic exit reason (bits 15:0; bit 31 becomes `failed_entry`)
//!   or the whole SVM exit code. `isa` is `"vmx"`, `"svm"`, or the raw number.
//! - `count` counts `kvm:kvm_exit` events. `timed` of them were followed by a
//!   `kvm:kvm_entry` of the same thread within the run; `time_ns` is the sum of those
//!   exit→entry times (the time KVM spent handling the exit, sleeps in HLT included).
//! - `reasons` are sorted by count, highest first; `vcpus` by pid, vcpu, reason.
//! - `max_ns` (in every `count`/`timed`/`time_ns` group; 0 in reports from before it)
//!   is the longest exit→entry time. `p50_ns` and `p99_ns` (reasons with a
//!   histogram) are upper bounds: the end of the log2 bucket the quantile falls in,
//!   never above `max_ns`.
//! - `reasons[].detail` (`record --detail`): the reason's exits split by what caused
//!   them, most first, each `{ "kind", "key", "label", "count", "timed", "time_ns",
//!   "max_ns", "mean_ns" }`. `kind` is `vector` (VMX EXCEPTION_NMI: `intr_info`'s
//!   vector, `nmi` for NMIs), `cr` (VMX CR_ACCESS: `cr3:write`, `cr0:read`, `clts`,
//!   `lmsw`), `port` (VMX IO_INSTRUCTION, SVM IOIO: `0x3f8:out:1`, with `:string` for
//!   INS/OUTS), `msr` (`kvm:kvm_msr`: `0x6e0:write`), `cpuid` (`kvm:kvm_cpuid`: the
//!   leaf, `0x1`), `gpa` (EPT_VIOLATION, SVM NPF: the 1 MiB guest-physical region of
//!   `kvm:kvm_page_fault`, `0xfee00000`); `other` holds a reason's exits past the cap
//!   of 512 sub-keys per VM (`dropped.detail_capped`), `undecoded` those no sub-key was
//!   seen for (their tracepoint did not fire: e.g. a patch that answers CPUID leaves
//!   before `kvm_cpuid()`). The rows of a reason add up to its `count`, besides rows with `"emulated":
//!   true` (key suffix `:emulated`): a `kvm_msr` or `kvm_cpuid` event with no exit of its
//!   own waiting for it, i.e. an instruction KVM emulated (real-mode code under shadow
//!   paging, or a second one within one exit), counted under the instruction's own
//!   reason (a reason row with `count` 0 when it had no exit). So the `cpuid` and `msr`
//!   rows hold every `kvm_cpuid` and `kvm_msr` event.
//! - `reasons[].rips` (`record --rip N`): the N guest RIPs with the most exits of the
//!   reason, `{ "rip", "count", "symbol" }` (`symbol` with `--guest-symbols`:
//!   `function+0xoff`, or `user space`), and `rips_rest`, the exits at every other RIP.
//! - `leaves` and `cpuid_reads` are present with `record --snapshots`: every guest read of
//!   a counter leaf, the registers it got, and the host's own count for that VM at that
//!   instant (the read's own CPUID exit included), for `kvmtrace reconcile`. A read is
//!   seen in the vCPU's registers (EAX and ECX at the CPUID exit; EAX..EDX at the next
//!   VM entry: what the guest received, wherever the patch answered) and, when the
//!   patch answers inside `kvm_cpuid()`, by `kvm:kvm_cpuid` too (`seen_by`); where both
//!   saw it and disagree, `kvm_cpuid_differs` holds the tracepoint's registers.
//!   `host_all_vms` counts every traced VM's exits since the record began.
//! - `registers` (with `--snapshots`): where the vCPU registers were found (`layout`:
//!   `regs_offset` in `struct kvm_vcpu`, `method` `btf` with its `file`, or `learned`
//!   with `samples` and `distinct_rips`), or the `error` that kept them from being found,
//!   and `cpuid_exits_before_layout`: CPUID exits whose leaf could not be read yet.
//! - `phases`: the same rows (without histograms) split at each load of kvm_intel / kvm_amd during the run
//!   (`rmmod kvm_intel; insmod kvm-intel.ko ept=0` starts phase 1), each with the paging
//!   mode that load had (`null` when it was reloaded again before kvmtrace looked).
//!   Phase 0 is whatever was loaded when the record began. A VM cannot outlive its
//!   module, so every VM's exits fall in one phase.
//! - `cost.maps`, `cost.map_bytes`: each eBPF map's entries and kernel bytes, as the
//!   kernel charges them (`memlock` in the map's fdinfo), and their sum.
//! - `cost`: what kvmtrace itself cost: time from its start to all probes attached, its
//!   peak resident memory, and each eBPF program's run count and run time (the times
//!   are 0 unless `sysctl kernel.bpf_stats_enabled=1`, then `bpf_stats` is true).
//!   `cost.filter_pids` (absent in older reports, and `null` when every process was
//!   traced): how many processes the `-p` / `-- CMD` pid filter held when the record
//!   ended. The filter holds processes, not threads: a traced process's child processes
//!   are added as they are created, and a process is removed when it exits, so this is
//!   the traced processes still alive (kvmtrace itself included with `-- CMD`).
//! - `dropped` counts what the eBPF side could not record in full, by cause. Fields
//!   added after the first `v1` reports read as 0 when absent.
//!   - `exit_map_full`: exits counted only here: the per-vCPU map and the per-reason
//!     overflow map (`--max-overflow-rows`) were both full.
//!   - `vcpu_map_full`: exits with no per-vCPU row (`record --max-vcpu-rows`); they are
//!     still in `reasons` unless `exit_map_full` counts them too.
//!   - `hist_map_full`: timed exits missing from their reason's histogram (the time is
//!     in the totals).
//!   - `pending_map_full`: exits whose time is unknown because the map of exits waiting
//!     for their next entry (one entry per live vCPU thread) was full.
//!   - `pending_lost`: exits whose time is unknown because a later exit on the same CPU
//!     replaced them before their entry was seen (a missed `kvm_entry` or
//!     `sched_switch` run). Not counted: each vCPU thread's last exit before the thread
//!     ends (it has no next entry; it is in `count` but not in `timed`).
//!   - `read_failed`: exits counted only here: a `kvm:kvm_exit` field was unreadable.
//!   - `filter_map_full`: child processes of traced processes that were not traced,
//!     because the pid filter held `MAX_FILTER_PIDS` live processes (or the
//!     `task:task_newtask` record was unreadable).
//!   - `vm_map_full` (`--snapshots`): what the maps kept beside a VM's own counts
//!     could not hold: a VM that ended whose exits are missing from `host_ended_vms`,
//!     or a synthetic exit missing from its VM's `host_synthetic`. A VM's own counts
//!     are the count path's VM cells.
//!   - `cpuid_ring_full`: guest counter-leaf reads not recorded (`cpuid_reads`).
//!   - `read_pending_full`: guest counter-leaf reads not recorded because the map of
//!     reads waiting for their VM entry (or of vCPU threads) was full.
//!   - `detail_capped`: exits counted in their reason's `other` detail row (their VM
//!     had 512 sub-keys of the reason already); `detail_map_full`: exits in no detail row (in
//!     `undecoded`); `rip_map_full`: exits whose RIP was not counted (in `rips_rest`).
//!   - `count_slots_full`: exits of vCPU threads that found every thread row taken
//!     (16 384), counted under pid 0 ("other VMs") instead of their own VM (they are
//!     in `total` and `reasons`).
//!   - `snapshot_lost` (`--snapshots`): guest counter reads whose registers or
//!     `kvm:kvm_cpuid` record could not be read; their exits are counted, the reads
//!     are not in `cpuid_reads`.
//!   - `record_lost`: `kvm:kvm_msr` or `kvm:kvm_page_fault` records (`--detail`) or
//!     `module:module_load` records that could not be read: an exit awaiting its
//!     sub-key stays `undecoded` (an emulated instruction is in no detail row), or a
//!     vendor module load starts no new phase. Their exits are counted.
//!   - `recursion_misses`: runs of kvmtrace's eBPF programs that the kernel skipped
//!     because another eBPF program was running on that CPU (`bpf_prog_info`'s
//!     `recursion_misses`, summed over kvmtrace's programs; kernels before 5.12 do not
//!     report it, and count it for classic tracepoint programs only since 6.7). A
//!     skipped `kvm_exit` run is an exit missing from every count.
//! - `total.count` includes exits that were counted only in `dropped` (a full map or
//!   an unreadable field). Any non-zero `dropped` field means some detail is missing.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracer_common::{
    CpuidEvent, DetailPlan, ExitKey, ExitStats, detail_plan, drop_kind, read_source,
};

use crate::{
    detail::{self, KeyCounts},
    exit_reasons::{self, Isa},
    latency::{self, Bucket},
    leaves::Leaves,
    paging::Paging,
    snapshot::{Drops, MapCost, Overflow, ProgramCost, Snapshot, sum_stats, sum_u64},
};

/// The `schema` value this version writes and reads.
pub const SCHEMA: &str = "kvmtrace.record.v1";

/// Counts and time of a group of exits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub count: u64,
    pub timed: u64,
    pub time_ns: u64,
    /// The longest of the timed exits (0 in reports from before it was kept).
    #[serde(default)]
    pub max_ns: u64,
}

impl From<ExitStats> for Totals {
    fn from(s: ExitStats) -> Self {
        Self {
            count: s.count,
            timed: s.timed,
            time_ns: s.time_ns,
            max_ns: s.max_ns,
        }
    }
}

impl Totals {
    fn checked_add(self, other: Self) -> Result<Self, Overflow> {
        Ok(Self {
            count: sum_u64([self.count, other.count], "count")?,
            timed: sum_u64([self.timed, other.timed], "timed")?,
            time_ns: sum_u64([self.time_ns, other.time_ns], "time_ns")?,
            max_ns: self.max_ns.max(other.max_ns),
        })
    }

    /// Mean exit→entry time, ns.
    pub fn mean_ns(&self) -> Option<u64> {
        latency::mean(self.time_ns, self.timed)
    }
}

/// One exit reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonRow {
    pub isa: Isa,
    pub reason: u32,
    pub failed_entry: bool,
    pub name: String,
    #[serde(flatten)]
    pub totals: Totals,
    #[serde(default)]
    pub mean_ns: Option<u64>,
    /// Upper bounds of the median and 99th-percentile handling times, from the
    /// histogram's log2 buckets (and never above `max_ns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ns: Option<u64>,
    #[serde(default)]
    pub histogram: Vec<Bucket>,
    /// `--detail`: the exits split by what caused them, most first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detail: Vec<DetailRow>,
    /// `--rip N`: the guest RIPs with the most exits, most first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rips: Vec<RipRow>,
    /// `--rip N`: the exits at every other RIP (and those no RIP row held).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rips_rest: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One sub-key of a reason (`--detail`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetailRow {
    /// `vector`, `cr`, `port`, `msr`, `cpuid`, `gpa`; `other` (past the per-reason
    /// cap) or `undecoded` (no sub-key was seen for these exits).
    pub kind: String,
    pub key: String,
    pub label: String,
    /// An instruction KVM emulated without an exit of its own (real-mode code under
    /// shadow paging, or a second one within one exit), counted under its reason
    /// besides that reason's exits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub emulated: bool,
    #[serde(flatten)]
    pub totals: Totals,
    #[serde(default)]
    pub mean_ns: Option<u64>,
}

/// Exits at one guest RIP (`--rip`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RipRow {
    pub rip: u64,
    pub count: u64,
    /// `function+0xoff` from `--guest-symbols`, or `user space`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbol: Option<String>,
}

/// One VM (a VMM process).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRow {
    pub pid: u32,
    pub comm: Option<String>,
    #[serde(flatten)]
    pub totals: Totals,
}

/// One exit reason of one vCPU of one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuRow {
    pub pid: u32,
    /// The vCPU, or `tracer_common::count::ALL_VCPUS` in a count-path record, whose
    /// rows are per VM ([`VcpuRow::vcpu_label`] says `all`).
    pub vcpu_id: u32,
    pub isa: Isa,
    pub reason: u32,
    pub failed_entry: bool,
    pub name: String,
    #[serde(flatten)]
    pub totals: Totals,
}

impl VcpuRow {
    /// The vCPU id, or `all` for a count-path row.
    pub fn vcpu_label(&self) -> String {
        if self.vcpu_id == tracer_common::count::ALL_VCPUS {
            "all".to_owned()
        } else {
            self.vcpu_id.to_string()
        }
    }
}

/// Events the eBPF side could not record in full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub exit_map_full: u64,
    pub vcpu_map_full: u64,
    pub hist_map_full: u64,
    pub pending_map_full: u64,
    pub read_failed: u64,
    pub filter_map_full: u64,
    /// `--snapshots`: ended VMs missing from `host_ended_vms`, and synthetic exits
    /// missing from `host_synthetic` (their maps were full).
    #[serde(default)]
    pub vm_map_full: u64,
    #[serde(default)]
    pub cpuid_ring_full: u64,
    #[serde(default)]
    pub pending_lost: u64,
    #[serde(default)]
    pub read_pending_full: u64,
    #[serde(default)]
    pub recursion_misses: u64,
    /// `--detail`: exits counted in their reason's `other` row, past its cap of
    /// sub-keys.
    #[serde(default)]
    pub detail_capped: u64,
    /// `--detail`: exits in no detail row (the map was full); they are in their
    /// reason's `undecoded` row.
    #[serde(default)]
    pub detail_map_full: u64,
    /// `--rip`: exits whose RIP is not counted (the map was full).
    #[serde(default)]
    pub rip_map_full: u64,
    /// Exits of vCPU threads that found every thread row taken, counted under pid 0
    /// ("other VMs") instead of their own VM.
    #[serde(default)]
    pub count_slots_full: u64,
    /// `--snapshots`: guest counter reads whose registers or `kvm:kvm_cpuid` record
    /// could not be read (their exits are counted; the reads are not in
    /// `cpuid_reads`).
    #[serde(default)]
    pub snapshot_lost: u64,
    /// `kvm:kvm_msr`, `kvm:kvm_page_fault` or `module:module_load` records that could
    /// not be read: a `--detail` sub-key, or a new phase, is missing (the exits are
    /// counted).
    #[serde(default)]
    pub record_lost: u64,
}

impl Dropped {
    pub fn any(&self) -> bool {
        *self != Self::default()
    }

    /// The non-zero counters, by their JSON names: `vcpu_map_full 2, detail_capped 3`.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .by_kind()
            .into_iter()
            .filter(|&(_, n)| n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        parts.join(", ")
    }

    /// Every counter, by its JSON name, in the JSON's order.
    pub fn by_kind(&self) -> Vec<(String, u64)> {
        let fields = serde_json::to_value(self).unwrap_or_default();
        fields
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
            .collect()
    }
}

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
struct Breakdown {
    detail: BTreeMap<ExitKey, BTreeMap<(u32, u64), ExitStats>>,
    rips: BTreeMap<ExitKey, BTreeMap<u64, u64>>,
}

impl Breakdown {
    /// The rows of `snap` in `phase` (all phases: `None`), summed over VMs.
    fn of(snap: &Snapshot, phase: Option<u32>) -> Result<Self, Overflow> {
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

    /// Fills the detail and RIP rows of `row` (whose exits are `exit`).
    fn fill(&self, row: &mut ReasonRow, exit: &ExitKey, info: &RunInfo) {
        if info.detail {
            row.detail = self.detail_rows(exit, row.isa, &row.totals);
        }
        if let Some(top) = info.rip_top {
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

/// What was traced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    pub pids: Vec<u32>,
    pub vcpu: Option<u32>,
}

/// The reasons of one phase (a load of the kvm vendor module).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseRow {
    pub phase: u32,
    /// The paging mode of that load; `None` when it is not known.
    pub paging: Option<Paging>,
    /// When kvmtrace first saw the phase (the record's start for phase 0).
    pub since: Option<DateTime<Utc>>,
    pub total: Totals,
    /// The phase's reasons (without histograms: those are kept for the whole run).
    pub reasons: Vec<ReasonRow>,
}

/// What kvmtrace knew of a phase when it saw it begin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseInfo {
    pub paging: Option<Paging>,
    pub since: DateTime<Utc>,
}

/// What kvmtrace itself cost.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    /// From the start of the command to every program attached.
    pub attach_ns: u64,
    /// Peak resident memory of the kvmtrace process.
    pub peak_rss_kib: u64,
    /// Whether `kernel.bpf_stats_enabled` was on, so run times were measured.
    pub bpf_stats: bool,
    /// Processes in the pid filter when the record ended; `None` without a filter.
    #[serde(default)]
    pub filter_pids: Option<u64>,
    pub programs: Vec<ProgramCost>,
    /// Every eBPF map's kernel memory, read back from the kernel (absent in older
    /// reports).
    #[serde(default)]
    pub maps: Vec<MapCost>,
    /// Their sum.
    #[serde(default)]
    pub map_bytes: u64,
}

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

/// Which counter leaf a guest read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeafKind {
    Total,
    Count,
    Cycles,
}

/// One guest read of a counter leaf, with the host's count at that instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidRead {
    /// Monotonic kernel time of the read, ns.
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub kind: Option<LeafKind>,
    pub leaf: u32,
    pub index: u32,
    /// The registers the guest got.
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
    /// isa of the CPUID exit (the reason numbering of `index`).
    pub isa: Isa,
    /// The host's count of exits with reason `index` for this VM, this read included.
    pub host_reason_count: u64,
    /// The host's count of all exits for this VM, this read included.
    pub host_total: u64,
    /// The host's count of every traced VM's exits since the record began, this read
    /// included (absent in older reports).
    #[serde(default)]
    pub host_all_vms: Option<u64>,
    /// The same three counts at the vCPU's next VM entry, when the guest had its
    /// answer: KVM made it in between, while other vCPUs and VMs ran on (absent in older
    /// reports and for reads only `kvm:kvm_cpuid` saw: equal to the counts above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_reason_count_at_entry: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_total_at_entry: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_all_vms_at_entry: Option<u64>,
    /// The exits of traced VMs that had ended (their process gone) by the read, out of
    /// `host_all_vms` (absent in older reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ended_vms: Option<u64>,
    /// The VM's synthetic exits by the read: VMX INVALID_STATE exits that KVM made up
    /// without a VM entry, which `kvm:kvm_exit` never shows. Absent where they are not
    /// counted (SVM has none; or kvm_intel was not loaded at attach, or was reloaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_synthetic: Option<u64>,
    /// Who saw the read: the vCPU's registers (at the CPUID exit and the next VM
    /// entry) and/or the `kvm:kvm_cpuid` tracepoint (absent in older reports, which
    /// only had the tracepoint).
    #[serde(default)]
    pub seen_by: Vec<ReadSource>,
    /// What `kvm:kvm_cpuid` reported, when it fired and the registers saw the read too
    /// and differ from it (EAX, EBX, ECX, EDX). It fires inside `kvm_cpuid()`, so a patch
    /// that changes the answer after it is caught here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm_cpuid_differs: Option<[u32; 4]>,
}

/// Who saw a guest counter read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadSource {
    Registers,
    KvmCpuid,
}

/// How `record --snapshots` found the vCPU registers, and what it could not see.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistersInfo {
    /// The layout and how it was found; `None` when it was never found.
    pub layout: Option<crate::regs_layout::Layout>,
    /// Why it was not found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// CPUID exits of traced VMs before the layout was known: their leaf could not be
    /// read, so a counter read among them would not be in `cpuid_reads`.
    pub cpuid_exits_before_layout: u64,
}

impl CpuidRead {
    fn new(e: &CpuidEvent, leaves: Option<Leaves>) -> Self {
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

/// A whole record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub kvmtrace_version: String,
    pub kernel_release: String,
    pub paging: Option<Paging>,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub duration_ns: u64,
    pub filter: Filter,
    pub total: Totals,
    pub reasons: Vec<ReasonRow>,
    pub vms: Vec<VmRow>,
    pub vcpus: Vec<VcpuRow>,
    pub dropped: Dropped,
    /// The counts split at each load of the kvm vendor module.
    #[serde(default)]
    pub phases: Vec<PhaseRow>,
    /// What kvmtrace itself cost (written by `record`).
    #[serde(default)]
    pub cost: Option<Cost>,
    /// The leaves snapshotted with `--snapshots`.
    #[serde(default)]
    pub leaves: Option<Leaves>,
    /// Guest reads of the counter leaves (`--snapshots`), in order.
    #[serde(default)]
    pub cpuid_reads: Vec<CpuidRead>,
    /// How the reads were seen (`--snapshots`; absent in older reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registers: Option<RegistersInfo>,
}

/// Why a JSON text is not a report this version can read.
#[derive(Debug, Error)]
pub enum ParseError {
    #[error("not a kvmtrace record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported schema '{found}': this kvmtrace reads {SCHEMA}")]
    Schema { found: String },
}

fn name_of(exit: &ExitKey) -> String {
    exit_reasons::name(Isa::from_raw(exit.isa), exit.reason).into_owned()
}

impl ReasonRow {
    /// The row of `exit`, with its histogram when there is one.
    fn new(exit: &ExitKey, stats: ExitStats, hist: Option<&Vec<u64>>) -> Self {
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
            breakdown.fill(&mut row, exit, info);
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

        let mut vms: BTreeMap<u32, Totals> = BTreeMap::new();
        let mut vcpus = Vec::with_capacity(snap.vcpus.len());
        for (key, stats) in &snap.vcpus {
            let totals = Totals::from(*stats);
            let vm = vms.entry(key.pid).or_default();
            *vm = vm.checked_add(totals)?;
            vcpus.push(VcpuRow {
                pid: key.pid,
                vcpu_id: key.vcpu_id,
                isa: Isa::from_raw(key.exit.isa),
                reason: key.exit.reason,
                failed_entry: key.exit.failed_entry != 0,
                name: name_of(&key.exit),
                totals,
            });
        }
        let vms = vms
            .into_iter()
            .map(|(pid, totals)| VmRow {
                pid,
                comm: info.comms.get(&pid).cloned(),
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

    /// Names the kernel RIPs of every `--rip` row from the guest's symbols.
    pub fn symbolize(&mut self, symbols: &crate::symbols::Symbols) {
        let rows = self
            .reasons
            .iter_mut()
            .chain(self.phases.iter_mut().flat_map(|p| p.reasons.iter_mut()))
            .flat_map(|r| r.rips.iter_mut());
        for row in rows {
            row.symbol = symbols.describe(row.rip);
        }
    }

    /// Parses a report, checking the schema before anything else.
    pub fn from_json(text: &str) -> Result<Self, ParseError> {
        crate::parse::versioned_json(text, SCHEMA, |found| ParseError::Schema { found })
    }

    /// The VM pids in the report.
    pub fn pids(&self) -> BTreeSet<u32> {
        self.vms.iter().map(|v| v.pid).collect()
    }

    /// The `--detail` rows, summed over reasons by (kind, key), without the
    /// `undecoded` and `other` rows (the kernel's reference, [`detail::reference`], has
    /// neither), and without the kinds in `skip`.
    pub fn detail_totals(&self, skip: &[&str]) -> KeyCounts {
        let mut out = KeyCounts::new();
        for d in self.reasons.iter().flat_map(|r| &r.detail) {
            if d.kind == detail::UNDECODED_KEY
                || d.kind == "other"
                || skip.contains(&d.kind.as_str())
            {
                continue;
            }
            let key = d
                .key
                .strip_suffix(detail::EMULATED_SUFFIX)
                .unwrap_or(&d.key);
            *out.entry((d.kind.clone(), key.to_owned())).or_default() += d.totals.count;
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use chrono::TimeZone;
    use tracer_common::VcpuKey;

    use super::*;

    pub(crate) fn stats(count: u64, timed: u64, time_ns: u64) -> ExitStats {
        ExitStats {
            count,
            timed,
            time_ns,
            max_ns: 0,
        }
    }

    /// A two-vCPU VMX run with an unknown reason and a failed entry.
    pub(crate) fn sample_report() -> Report {
        let mut snap = Snapshot::default();
        let io = ExitKey::from_raw(1, 30);
        let ept = ExitKey::from_raw(1, 48);
        let odd = ExitKey::from_raw(1, 0x8000_0021);
        let unknown = ExitKey::from_raw(1, 99);
        for (key, s) in [
            (io, stats(3, 3, 3000)),
            (ept, stats(6, 5, 1000)),
            (odd, stats(1, 0, 0)),
            (unknown, stats(1, 1, 7)),
        ] {
            snap.exits.insert(key, s);
        }
        for (vcpu_id, key, s) in [
            (0, io, stats(2, 2, 2000)),
            (1, io, stats(1, 1, 1000)),
            (0, ept, stats(6, 5, 1000)),
            (1, odd, stats(1, 0, 0)),
            (1, unknown, stats(1, 1, 7)),
        ] {
            snap.vcpus.insert(
                VcpuKey {
                    pid: 42,
                    vcpu_id,
                    exit: key,
                },
                s,
            );
        }
        snap.add_hist(io, 9, 3).ok();
        snap.add_hist(ept, 7, 5).ok();
        let t0 = Utc
            .with_ymd_and_hms(2026, 11, 24, 12, 0, 0)
            .single()
            .unwrap_or_default();
        let info = RunInfo {
            kernel_release: "6.1.0-test".into(),
            paging: Some(Paging {
                module: "kvm_intel".into(),
                parameter: "ept".into(),
                nested: true,
            }),
            started_at: t0,
            ended_at: t0 + chrono::Duration::milliseconds(1500),
            filter: Filter::default(),
            comms: [(42, "qemu".to_owned())].into(),
            ..RunInfo::default()
        };
        Report::build(&snap, info).unwrap_or_else(|e| panic!("build: {e}"))
    }

    /// `sample_report` recorded with `--detail --rip 1`: IO by port, EPT by region.
    pub(crate) fn detail_report() -> Report {
        let base = sample_report();
        let mut snap = Snapshot::default();
        let io = ExitKey::from_raw(1, 30);
        let ept = ExitKey::from_raw(1, 48);
        let io_stats = ExitStats {
            max_ns: 1500,
            ..stats(3, 3, 3000)
        };
        snap.add_exits(0, io, io_stats).ok();
        snap.add_exits(0, ept, stats(6, 5, 1000)).ok();
        snap.add_hist(io, 9, 3).ok();
        let row = |exit: ExitKey| {
            tracer_common::PhaseVcpuKey::new(
                0,
                &VcpuKey {
                    pid: 42,
                    vcpu_id: 0,
                    exit,
                },
            )
        };
        let detail = |exit, kind, sub| tracer_common::DetailKey::new(&row(exit), kind, sub);
        snap.detail.insert(
            detail(io, tracer_common::detail_kind::PORT, 0x03f8_0000),
            ExitStats {
                max_ns: 1500,
                ..stats(2, 2, 2000)
            },
        );
        snap.detail.insert(
            detail(ept, tracer_common::detail_kind::GPA, 0xfee),
            stats(4, 4, 400),
        );
        let rip = |exit, rip| tracer_common::RipKey {
            pid: 42,
            reason: row(exit).reason,
            meta: row(exit).meta,
            _pad: 0,
            rip,
        };
        snap.rips.insert(rip(io, 0xffff_ffff_8107_1b2f), 2);
        snap.rips.insert(rip(io, 0x7f00_0000_1000), 1);
        let info = RunInfo {
            kernel_release: base.kernel_release.clone(),
            paging: base.paging.clone(),
            started_at: base.started_at,
            ended_at: base.ended_at,
            comms: [(42, "qemu".to_owned())].into(),
            detail: true,
            rip_top: Some(1),
            ..RunInfo::default()
        };
        Report::build(&snap, info).unwrap_or_else(|e| panic!("build: {e}"))
    }

    #[test]
    fn count_path_rows_say_all_vcpus() {
        let row = |vcpu_id| VcpuRow {
            pid: 7,
            vcpu_id,
            isa: Isa::Vmx,
            reason: 10,
            failed_entry: false,
            name: "CPUID".into(),
            totals: Totals::default(),
        };
        assert_eq!(row(tracer_common::count::ALL_VCPUS).vcpu_label(), "all");
        assert_eq!(row(3).vcpu_label(), "3");
    }

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
    fn emulated_rows_are_kept_beside_their_reason() {
        let mut snap = Snapshot::default();
        let io = ExitKey::from_raw(1, 30);
        snap.add_exits(0, io, stats(2, 2, 20)).ok();
        let row = |exit| {
            tracer_common::PhaseVcpuKey::new(
                0,
                &VcpuKey {
                    pid: 42,
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
    fn json_round_trips() {
        let r = sample_report();
        let text = serde_json::to_string_pretty(&r).unwrap_or_default();
        let back = Report::from_json(&text).unwrap_or_else(|e| panic!("parse: {e}"));
        assert_eq!(back, r);
        assert!(text.contains("\"isa\": \"vmx\""));
    }

    #[test]
    fn every_drop_kind_reaches_the_report() {
        let mut snap = Snapshot::default();
        for kind in 0..drop_kind::COUNT {
            snap.drops.kinds[kind as usize] = 100 + u64::from(kind);
        }
        snap.drops.recursion_misses = 7;
        let r = Report::build(&snap, RunInfo::default()).unwrap_or_else(|e| panic!("{e}"));
        let d = r.dropped;
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

    #[test]
    fn the_schema_doc_names_every_dropped_field() {
        let doc: String = include_str!("report.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .collect::<Vec<_>>()
            .join("\n");
        for (field, _) in Dropped::default().by_kind() {
            assert!(doc.contains(&format!("`{field}`")), "{field} has no bullet");
            assert!(
                doc.contains(&format!("\"{field}\": 0")),
                "{field} is not in the example"
            );
        }
    }

    #[test]
    fn reports_without_the_new_fields_still_parse() {
        let mut v = serde_json::to_value(sample_report()).unwrap_or_default();
        v["cost"] = serde_json::json!({
            "attach_ns": 1, "peak_rss_kib": 2, "bpf_stats": false, "programs": []
        });
        if let Some(dropped) = v["dropped"].as_object_mut() {
            for new in [
                "vm_map_full",
                "cpuid_ring_full",
                "pending_lost",
                "read_pending_full",
                "recursion_misses",
            ] {
                assert!(dropped.remove(new).is_some(), "{new} is written");
            }
        }
        let r = Report::from_json(&v.to_string()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.dropped, Dropped::default());
        assert_eq!(r.cost.map(|c| c.filter_pids), Some(None));
    }

    #[test]
    fn json_rejects_other_schemas() {
        let text = serde_json::to_string(&sample_report())
            .unwrap_or_default()
            .replace(SCHEMA, "kvmtrace.record.v9");
        let err = Report::from_json(&text).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("unsupported schema 'kvmtrace.record.v9': this kvmtrace reads kvmtrace.record.v1")
        );
        assert!(Report::from_json("{\"schema\": ").is_err());
    }
}
