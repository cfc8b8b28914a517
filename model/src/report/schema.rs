//! The report's types: what `--format json` writes and reads back.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracer_common::ExitStats;

use crate::{
    detail::{self, KeyCounts},
    exit_reasons::Isa,
    latency::{self, Bucket},
    leaves::Leaves,
    paging::Paging,
    snapshot::{MapCost, Overflow, ProgramCost, sum_u64},
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
    pub(super) fn checked_add(self, other: Self) -> Result<Self, Overflow> {
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
    /// How many earlier VM processes with this pid the trace saw (0, left out of the
    /// JSON: the first).
    #[serde(default, skip_serializing_if = "is_first")]
    pub reuse: u32,
    pub comm: Option<String>,
    #[serde(flatten)]
    pub totals: Totals,
}

/// One exit reason of one vCPU of one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuRow {
    pub pid: u32,
    /// As [`VmRow::reuse`].
    #[serde(default, skip_serializing_if = "is_first")]
    pub reuse: u32,
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

impl Report {
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

/// Whether a VM is its pid's first (for `skip_serializing_if`).
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_first(reuse: &u32) -> bool {
    *reuse == 0
}

/// How a VM is named by number: its pid, and after a `#` which process with that pid
/// it was when the trace saw several (`4242#2`: the second).
pub fn vm_id(pid: u32, reuse: u32) -> String {
    if reuse == 0 {
        pid.to_string()
    } else {
        format!("{pid}#{}", u64::from(reuse) + 1)
    }
}

impl VcpuRow {
    /// Its VM by number ([`vm_id`]).
    pub fn vm_id(&self) -> String {
        vm_id(self.pid, self.reuse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn count_path_rows_say_all_vcpus() {
        let row = |vcpu_id| VcpuRow {
            pid: 7,
            reuse: 0,
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
    fn json_round_trips() {
        let r = sample_report();
        let text = serde_json::to_string_pretty(&r).unwrap_or_default();
        let back = Report::from_json(&text).unwrap_or_else(|e| panic!("parse: {e}"));
        assert_eq!(back, r);
        assert!(text.contains("\"isa\": \"vmx\""));
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
