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
//! - `vms[].reuse` and `vcpus[].reuse` (only when not 0): the record saw an earlier VM
//!   process with the same pid (pids wrap); 1 is the pid's second VM process, shown as
//!   `1234#2`. Rows of reasons without a thread-row cell, and `--detail`, `--rip` and
//!   `--vcpu` rows, are kept by pid and count for its last process.
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
//!
//! The schema's types are in `schema`, their build from a [`Snapshot`](crate::snapshot::Snapshot)
//! in `build`, and the reads of the snapshot's parts into rows in `reads`: `build`
//! uses `reads`, both use `schema`, and `schema` uses neither.

mod build;
mod reads;
mod schema;
#[cfg(test)]
pub(crate) mod tests;

pub use build::RunInfo;
pub use schema::{
    Cost, CpuidRead, DetailRow, Dropped, Filter, LeafKind, ParseError, PhaseInfo, PhaseRow,
    ReadSource, ReasonRow, RegistersInfo, Report, RipRow, SCHEMA, Totals, VcpuRow, VmRow, vm_id,
};
