//! What to trace ([`ProbeConfig`]), and the host facts its defaults come from.

use std::collections::BTreeSet;

use kvmtrace_model::{leaves::Leaves, tracefs_format::Tracepoint};
use tracer_common::{isa, limits};

use crate::exit_layout::Choice;

/// Where the kernel publishes BTF (vmlinux's, and each module's split on it).
pub const BTF_DIR: &str = "/sys/kernel/btf";

/// What to trace.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// The tracepoint of VM exits (`kvm:kvm_exit`; another name only in tests).
    pub exit_tracepoint: Tracepoint,
    /// The tracepoint of VM entries (`kvm:kvm_entry`).
    pub entry_tracepoint: Tracepoint,
    /// Count only these processes and their child processes (added as they are
    /// created, removed as they exit); empty counts all.
    pub pids: BTreeSet<u32>,
    /// Count only this vcpu_id.
    pub vcpu: Option<u32>,
    /// Snapshot the host's counts at each guest read of these leaves.
    pub snapshots: Option<Leaves>,
    /// Where the vCPU registers are, when known before attach (BTF); `None` with
    /// snapshots: learned from the first exits (see [`vcpu_regs`](crate::vcpu_regs)).
    pub regs: Option<kvmtrace_model::regs_layout::Layout>,
    /// Count each reason's exits per sub-key (`--detail`).
    pub detail: bool,
    /// Count exits per guest RIP (`--rip`).
    pub rips: bool,
    /// Entries of the per-reason map (one per phase and reason).
    pub max_overflow_rows: u32,
    /// Entries of the per-vCPU map (one per VM, vCPU and reason).
    pub max_vcpu_rows: u32,
    /// The count path, and how it reads exits: counts per VM and reason only, no
    /// time, no vCPU, no snapshots. `None`: the timing path.
    pub counts: Option<Choice>,
    /// The timing path: read each exit from the vCPU at these offsets (a raw
    /// tracepoint) instead of the `kvm:kvm_exit` record. Only where nothing needs the
    /// record's other fields: no `--detail`, no `--rip`, no register learning.
    pub raw_exit: Option<crate::exit_layout::Offsets>,
    /// With snapshots: a counter read sums the all-VMs count's per-CPU cells in the
    /// kernel (5.19+, [`sums_per_cpu`]); false: every exit also adds to a shared cell.
    pub sum_per_cpu: bool,
    /// The timing path on thread rows: each exit is parked with its thread's slot and
    /// its entry counts and times it in the thread's row, with no hash lookup at
    /// either (per VM, or per vCPU with `vcpu_rows`). Only without `vcpu`, `detail`
    /// and `rips` ([`ProbeConfig::per_vm_time_fits`]).
    pub vm_time: bool,
    /// The ISA whose reasons have cells in thread rows and latency cells: the host's
    /// ([`host_isa`]).
    pub cell_isa: u32,
    /// With `vm_time`: a row per vCPU (the thread's `vcpu_id`), not per VM.
    pub vcpu_rows: bool,
    /// With `counts`: an empty program on the raw exit tracepoint instead of the
    /// count path's, which counts nothing (the floor any eBPF counter there pays).
    pub empty_exit: bool,
}

impl ProbeConfig {
    /// Whether nothing asked for needs the hash rows: the timing path can then keep
    /// thread rows (`vm_time`), per VM or per vCPU (`vcpu_rows`). Snapshots keep
    /// their own rows per VM beside them.
    pub fn per_vm_time_fits(&self) -> bool {
        self.counts.is_none() && self.vcpu.is_none() && !self.detail && !self.rips
    }
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            exit_tracepoint: Tracepoint::new("kvm", "kvm_exit"),
            entry_tracepoint: Tracepoint::new("kvm", "kvm_entry"),
            pids: BTreeSet::new(),
            vcpu: None,
            snapshots: None,
            regs: None,
            detail: false,
            rips: false,
            max_overflow_rows: limits::MAX_OVERFLOW_ROWS,
            max_vcpu_rows: limits::MAX_VCPU_ROWS,
            counts: None,
            raw_exit: None,
            sum_per_cpu: sums_per_cpu(),
            vm_time: false,
            cell_isa: host_isa(),
            vcpu_rows: false,
            empty_exit: false,
        }
    }
}

/// Whether a program can read another CPU's value of a per-CPU map entry
/// (`bpf_map_lookup_percpu_elem`, Linux 5.19): then a counter read sums the per-CPU
/// cells; otherwise exits also go to shared cells. When the version cannot be read,
/// the shared cells: slower, but they load everywhere.
pub fn sums_per_cpu() -> bool {
    use aya::util::KernelVersion;
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 19, 0))
}

/// The host's ISA, whose exit reasons get cells in thread rows: VMX where the CPU
/// has `vmx`, SVM where it has `svm` (`/proc/cpuinfo`), else by vendor. A host runs
/// one vendor's KVM; exits of the other ISA would still be counted, in the overflow
/// maps.
pub fn host_isa() -> u32 {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    isa_of_cpuinfo(&cpuinfo)
}

/// [`host_isa`] from the text of `/proc/cpuinfo`.
fn isa_of_cpuinfo(cpuinfo: &str) -> u32 {
    let line = |key: &str| {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map_or("", |(_, v)| v)
    };
    let flags: Vec<&str> = line("flags").split_whitespace().collect();
    if flags.contains(&"vmx") {
        return isa::VMX;
    }
    if flags.contains(&"svm") {
        return isa::SVM;
    }
    match line("vendor_id").trim() {
        "AuthenticAMD" | "HygonGenuine" => isa::SVM,
        _ => isa::VMX,
    }
}
