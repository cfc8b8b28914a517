//! kvmtrace's eBPF side: counts every `kvm:kvm_exit` by (VM, vCPU, isa, reason), and
//! times each exit until the same thread's next `kvm_entry` (a raw tracepoint: only the
//! thread and the time are needed, so the kernel need not format a record). Per-reason
//! totals are the sums of those rows, made in user space; `OVERFLOW_EXITS` only takes
//! the exits `VCPU_EXITS` had no room for.
//!
//! This is the timing path. The count path (`--counts-only`, `top`, `export` without
//! `--time`) is [`count_path`]: one program per exit, no clock and no hash lookup.
//!
//! Hash lookups, without `--snapshots`: an exit does none: it is parked in a per-CPU
//! slot. Its entry does one: the exit's `VCPU_EXITS` row, which gets the count and the
//! time together (the overflow row only when that map is full); the histogram bucket
//! is an array cell (`LATENCY_CELLS`; the `LATENCY_HIST` hash only for a reason
//! without a cell). A second lookup (`PENDING`) is needed only when the thread left
//! the CPU in between. An exit whose entry never comes (the thread ends, or a parked
//! exit is overwritten) is counted untimed then; user space adds the exits still
//! parked at a snapshot. The pid filter (`-p`, `-- CMD`) adds one lookup per exit.
//!
//! Opt-in: `--detail` adds one lookup per exit (its detail row, keyed from the exit's
//! own fields, or for MSR, CPUID and EPT/NPF exits by the `kvm_msr`, `kvm_cpuid` or
//! `kvm_page_fault` event that follows on the same thread) and one per entry (the time);
//! `--rip` adds one per exit. A reason's new sub-keys past its cap go to its `other`
//! row, so a guest cannot grow the maps without bound.
//!
//! Every row is also keyed by phase: each load of a kvm vendor module
//! (`module:module_load`) starts a new one, so a record that spans
//! `rmmod kvm_intel; insmod kvm-intel.ko ept=0` keeps both halves apart.
//!
//! Counts and times live in thread rows or per-CPU maps and are bumped with plain
//! adds: each has one writer. With `--snapshots`, the per-VM counts that counter
//! reads are compared with are rows per VM ([`vm_rows`]), added to atomically by the
//! VM's own vCPUs. Shared by all CPUs, with atomic adds: a few control slots (the
//! phase, the outstanding reads, the cache epoch) and the ended VMs' total, once per
//! VM. Every
//! insert that fails bumps a `DROPS` slot, so nothing is lost silently. Field offsets
//! are globals the loader fills in from the tracepoint's `format` file.
//!
//! The per-thread and per-process maps only hold live tasks: `sched_process_exit`
//! deletes an exiting thread's pending exit and, once its whole process is gone, the
//! process's pid-filter entry; `task_newtask` adds only processes, never threads.
#![no_std]
#![no_main]
// bpfel has no compare-and-swap, so core's atomic types lack fetch_add; the intrinsic
// lowers to BPF's atomic add.
#![allow(
    internal_features,
    reason = "atomic_xadd is the only atomic add on bpfel"
)]
#![feature(core_intrinsics)]

mod count_path;
mod detail;
mod epoch;
mod lifecycle;
mod pending;
mod snapshots;
mod thread_rows;
mod timing;
mod vm_rows;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf,
    },
    macros::{kprobe, map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{ProbeContext, RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::warn;
// The jobs' modules use each other's maps and helpers through the crate root.
use core::intrinsics::AtomicOrdering;
use tracer_common::{
    CLONE_THREAD, CpuidEvent, DetailKey, DetailPlan, ExitKey, ExitStats, HistKey, NO_FIELD,
    PendingExit, PhaseExitKey, PhaseVcpuKey, RegsSample, RipKey, UNKNOWN, VcpuKey, VmExitKey,
    count, cpuid_exit, detail_kind, detail_plan, drop_kind, hist_bucket, limits, read_source,
    regs_slot, rows, vendor, vm_totals_key,
};

#[unsafe(no_mangle)]
static EXIT_FIELDS_OFF: u32 = 8;

/// 1: the per-VM timing path (see `count_path`): an exit is parked with its VM's slot
/// and counted and timed at its entry in the slot's cell; no per-vCPU rows.
#[unsafe(no_mangle)]
static VM_TIME: u32 = 0;

/// 1: with `VM_TIME`, rows per vCPU (the thread's `vcpu_id`); 0: per VM.
#[unsafe(no_mangle)]
static VCPU_ROWS: u32 = 0;

#[unsafe(no_mangle)]
static EXIT_REASON_OFF: u32 = 0;

#[unsafe(no_mangle)]
static EXIT_RIP_OFF: u32 = 8;

#[unsafe(no_mangle)]
static EXIT_ISA_OFF: u32 = 16;

#[unsafe(no_mangle)]
static EXIT_VCPU_OFF: u32 = 48;

#[unsafe(no_mangle)]
static NEWTASK_PID_OFF: u32 = 8;

#[unsafe(no_mangle)]
static NEWTASK_FLAGS_OFF: u32 = 32;

#[unsafe(no_mangle)]
static EXIT_GROUP_DEAD_OFF: u32 = NO_FIELD;

#[unsafe(no_mangle)]
static FILTER_PIDS_ENABLED: u32 = 0;

#[unsafe(no_mangle)]
static VCPU_FILTER: u32 = u32::MAX;

#[unsafe(no_mangle)]
static SNAPSHOTS: u32 = 0;

#[unsafe(no_mangle)]
static CPUID_FUNCTION_OFF: u32 = 8;

#[unsafe(no_mangle)]
static CPUID_INDEX_OFF: u32 = 12;

#[unsafe(no_mangle)]
static CPUID_RAX_OFF: u32 = 16;

#[unsafe(no_mangle)]
static CPUID_RBX_OFF: u32 = 24;

#[unsafe(no_mangle)]
static CPUID_RCX_OFF: u32 = 32;

#[unsafe(no_mangle)]
static CPUID_RDX_OFF: u32 = 40;

#[unsafe(no_mangle)]
static LEAF_TOTAL: u32 = 0;

#[unsafe(no_mangle)]
static LEAF_COUNT: u32 = 0;

#[unsafe(no_mangle)]
static LEAF_CYCLES: u32 = 0;

#[unsafe(no_mangle)]
static MODULE_NAME_OFF: u32 = 12;

#[unsafe(no_mangle)]
static DETAIL: u32 = 0;

#[unsafe(no_mangle)]
static RIPS: u32 = 0;

#[unsafe(no_mangle)]
static EXIT_INFO1_OFF: u32 = NO_FIELD;

#[unsafe(no_mangle)]
static EXIT_INTR_INFO_OFF: u32 = NO_FIELD;

#[unsafe(no_mangle)]
static MSR_ECX_OFF: u32 = 12;

#[unsafe(no_mangle)]
static MSR_WRITE_OFF: u32 = 8;

#[unsafe(no_mangle)]
static PF_ADDRESS_OFF: u32 = 16;

/// Processes (tgids) to trace when `FILTER_PIDS_ENABLED` is set.
#[map]
static FILTER_PIDS: HashMap<u32, u32> = HashMap::with_max_entries(limits::MAX_FILTER_PIDS, 0);

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_kind::COUNT, 0);

/// Slot 0: the current phase, bumped at each load of a kvm vendor module.
#[map]
static PHASE: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
fn global(value: &'static u32) -> u32 {
    // SAFETY: a read of a static; volatile so the loader's value is not folded away.
    unsafe { core::ptr::read_volatile(value) }
}

#[inline(always)]
fn count_drop(kind: u32) {
    if let Some(slot) = DROPS.get_ptr_mut(kind) {
        // SAFETY: a per-CPU slot, written only on this CPU with preemption off.
        unsafe { *slot += 1 };
    }
}

/// Adds `count` exits and `time_ns` (over `timed` of them) to `key`, creating the
/// entry on first use. Returns false when the map is full.
#[inline(always)]
fn add_stats<K>(map: &PerCpuHashMap<K, ExitStats>, key: &K, delta: &ExitStats) -> bool {
    if let Some(stats) = map.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of the entry; per-CPU, so no other writer.
        unsafe {
            (*stats).count += delta.count;
            (*stats).timed += delta.timed;
            (*stats).time_ns += delta.time_ns;
            if delta.max_ns > (*stats).max_ns {
                (*stats).max_ns = delta.max_ns;
            }
        }
        return true;
    }
    // A concurrent insert of the same key from another CPU only sets that CPU's slot,
    // so BPF_ANY cannot overwrite anybody's count.
    map.insert(key, delta, u64::from(BPF_ANY)).is_ok()
}

/// Atomically adds `delta` to `key`, creating it: a lookup, else an insert, and once
/// more if another CPU inserted the key in between. Returns false when the map is
/// full.
///
/// The key is taken by value and kept on the stack. A `&CONSTANT` key would be a
/// promoted constant, which LLVM may merge with a loader-set global of the same
/// initial value: `&vm_totals_key::ALL` once became `&DETAIL`, so every exit under
/// `--detail` was added to key 1 and the all-VMs total read 0. The tracer's
/// `globals_are_only_loaded` test checks the object for any such pointer.
#[inline(always)]
fn shared_add<K: Copy>(map: &HashMap<K, u64>, key: K, delta: u64) -> bool {
    let key = &key;
    for _ in 0..2 {
        if let Some(slot) = map.get_ptr_mut(key) {
            // SAFETY: a live map value; other CPUs add to it concurrently.
            unsafe {
                core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, delta)
            };
            return true;
        }
        // Lost a race with another CPU's insert: EEXIST, so look it up again.
        if map.insert(key, delta, u64::from(BPF_NOEXIST)).is_ok() {
            return true;
        }
    }
    false
}

/// The current thread's (tgid, tid), where the pid filter traces its process.
#[inline(always)]
fn traced_current() -> Option<(u32, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    traced(tgid).then_some((tgid, tid))
}

#[inline(always)]
fn traced(tgid: u32) -> bool {
    // SAFETY: the map value is only tested for presence.
    global(&FILTER_PIDS_ENABLED) == 0 || unsafe { FILTER_PIDS.get(tgid) }.is_some()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
