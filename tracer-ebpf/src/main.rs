//! kvmtrace's eBPF side: counts every `kvm:kvm_exit` by (isa, reason) and by
//! (VM, vCPU, isa, reason), and times each exit until the same thread's next
//! `kvm:kvm_entry`. Per-reason counts are split into phases: each load of a kvm vendor
//! module (`module:module_load`) starts a new one, so a record that spans
//! `rmmod kvm_intel; insmod kvm-intel.ko ept=0` keeps both halves apart.
//!
//! Counters live in per-CPU maps and are bumped with plain adds: a per-CPU slot has one
//! writer. Every insert that fails bumps a `DROPS` slot, so nothing is lost silently.
//! Field offsets are globals the loader fills in from the tracepoint's `format` file.
#![no_std]
#![no_main]
// bpfel has no compare-and-swap, so core's atomic types lack fetch_add; the intrinsic
// lowers to BPF's atomic add.
#![allow(
    internal_features,
    reason = "atomic_xadd is the only atomic add on bpfel"
)]
#![feature(core_intrinsics)]

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use core::intrinsics::AtomicOrdering;
use tracer_common::{
    CpuidEvent, ExitKey, ExitStats, HistKey, PendingExit, PhaseExitKey, VcpuKey, VmExitKey,
    drop_kind, hist_bucket, limits, vendor,
};

#[unsafe(no_mangle)]
static EXIT_REASON_OFF: u32 = 8;
#[unsafe(no_mangle)]
static EXIT_ISA_OFF: u32 = 24;
#[unsafe(no_mangle)]
static EXIT_VCPU_OFF: u32 = 56;
#[unsafe(no_mangle)]
static FORK_CHILD_OFF: u32 = 44;
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

#[map]
static EXITS: PerCpuHashMap<PhaseExitKey, ExitStats> =
    PerCpuHashMap::with_max_entries(limits::MAX_REASONS, 0);
#[map]
static VCPU_EXITS: PerCpuHashMap<VcpuKey, ExitStats> =
    PerCpuHashMap::with_max_entries(limits::MAX_VCPU_ROWS, 0);
#[map]
static HIST: PerCpuHashMap<HistKey, u64> =
    PerCpuHashMap::with_max_entries(limits::MAX_HIST_ROWS, 0);
/// vCPU thread id -> its exit being handled. One writer per key: the thread itself.
#[map]
static PENDING: HashMap<u32, PendingExit> = HashMap::with_max_entries(limits::MAX_PENDING, 0);
/// Processes to trace when `FILTER_PIDS_ENABLED` is set.
#[map]
static FILTER_PIDS: HashMap<u32, u32> = HashMap::with_max_entries(limits::MAX_FILTER_PIDS, 0);
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_kind::COUNT, 0);
/// Per-VM counts, kept only with `SNAPSHOTS`: the vCPUs of one VM share an entry, so
/// these are atomic adds (a VM's own vCPUs are the only writers).
#[map]
static VM_EXITS: HashMap<VmExitKey, u64> = HashMap::with_max_entries(limits::MAX_VM_ROWS, 0);
#[map]
static VM_TOTALS: HashMap<u32, u64> = HashMap::with_max_entries(limits::MAX_VMS, 0);
/// Slot 0: the current phase, bumped at each load of a kvm vendor module.
#[map]
static PHASE: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static CPUID_EVENTS: RingBuf = RingBuf::with_byte_size(limits::CPUID_RING_BYTES, 0);

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
        }
        return true;
    }
    // A concurrent insert of the same key from another CPU only sets that CPU's slot,
    // so BPF_ANY cannot overwrite anybody's count.
    map.insert(key, delta, u64::from(BPF_ANY)).is_ok()
}

/// Atomically adds 1 to `key`, creating it. Returns false when the map is full.
#[inline(always)]
fn shared_inc<K>(map: &HashMap<K, u64>, key: &K) -> bool {
    for _ in 0..2 {
        if let Some(slot) = map.get_ptr_mut(key) {
            // SAFETY: a live map value; other vCPUs of the VM add to it concurrently.
            unsafe {
                core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1)
            };
            return true;
        }
        // Lost a race with another vCPU's insert: EEXIST, so look it up again.
        if map.insert(key, &1, u64::from(BPF_NOEXIST)).is_ok() {
            return true;
        }
    }
    false
}

#[inline(always)]
fn traced(tgid: u32) -> bool {
    // SAFETY: the map value is only tested for presence.
    global(&FILTER_PIDS_ENABLED) == 0 || unsafe { FILTER_PIDS.get(&tgid) }.is_some()
}

#[tracepoint(category = "kvm", name = "kvm_exit")]
pub fn kvm_exit(ctx: TracePointContext) -> u32 {
    try_kvm_exit(&ctx);
    0
}

#[inline(always)]
fn try_kvm_exit(ctx: &TracePointContext) {
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    if !traced(tgid) {
        return;
    }
    // SAFETY: offsets come from this tracepoint's format file; read_at checks bounds.
    let fields = unsafe {
        (
            ctx.read_at::<u32>(global(&EXIT_REASON_OFF) as usize),
            ctx.read_at::<u32>(global(&EXIT_ISA_OFF) as usize),
            ctx.read_at::<u32>(global(&EXIT_VCPU_OFF) as usize),
        )
    };
    let (Ok(raw_reason), Ok(isa), Ok(vcpu_id)) = fields else {
        count_drop(drop_kind::READ_FAILED);
        return;
    };
    let vcpu_filter = global(&VCPU_FILTER);
    if vcpu_filter != u32::MAX && vcpu_filter != vcpu_id {
        return;
    }
    let exit = ExitKey::from_raw(isa, raw_reason);
    let phase = PHASE.get(0).copied().unwrap_or(0);
    let one = ExitStats {
        count: 1,
        timed: 0,
        time_ns: 0,
    };
    // A full map is counted, not logged: a log line per exit would flood the host.
    if !add_stats(&EXITS, &PhaseExitKey { phase, exit }, &one) {
        count_drop(drop_kind::EXIT_MAP_FULL);
        return;
    }
    let vcpu = VcpuKey {
        pid: tgid,
        vcpu_id,
        exit,
    };
    if !add_stats(&VCPU_EXITS, &vcpu, &one) {
        count_drop(drop_kind::VCPU_MAP_FULL);
    }
    if global(&SNAPSHOTS) != 0 {
        let vm = VmExitKey { pid: tgid, exit };
        if !shared_inc(&VM_EXITS, &vm) || !shared_inc(&VM_TOTALS, &tgid) {
            count_drop(drop_kind::VM_MAP_FULL);
        }
    }
    let pending = PendingExit {
        start_ns: now,
        vcpu,
        phase,
    };
    if PENDING.insert(&tid, &pending, u64::from(BPF_ANY)).is_err() {
        count_drop(drop_kind::PENDING_MAP_FULL);
    }
}

#[tracepoint(category = "kvm", name = "kvm_entry")]
pub fn kvm_entry(ctx: TracePointContext) -> u32 {
    let _ = ctx;
    try_kvm_entry();
    0
}

#[inline(always)]
fn try_kvm_entry() {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the entry is copied out before the delete below.
    let Some(pending) = (unsafe { PENDING.get(&tid) }).copied() else {
        // The first entry after attach, or a thread we do not trace.
        return;
    };
    let _ = PENDING.remove(&tid);
    // SAFETY: a helper with no arguments.
    let elapsed = unsafe { bpf_ktime_get_ns() }.saturating_sub(pending.start_ns);
    let timed = ExitStats {
        count: 0,
        timed: 1,
        time_ns: elapsed,
    };
    // Both entries exist unless the exit's insert failed, which was counted then.
    let key = PhaseExitKey {
        phase: pending.phase,
        exit: pending.vcpu.exit,
    };
    add_stats(&EXITS, &key, &timed);
    add_stats(&VCPU_EXITS, &pending.vcpu, &timed);
    let hist = HistKey {
        exit: pending.vcpu.exit,
        bucket: hist_bucket(elapsed),
    };
    if let Some(slot) = HIST.get_ptr_mut(&hist) {
        // SAFETY: this CPU's slot; no other writer.
        unsafe { *slot += 1 };
    } else if HIST.insert(&hist, &1, u64::from(BPF_ANY)).is_err() {
        count_drop(drop_kind::HIST_MAP_FULL);
    }
}

/// Snapshots each guest read of a counter leaf together with the host's own counts
/// for that VM at that instant (the CPUID exit being handled is already counted).
#[tracepoint(category = "kvm", name = "kvm_cpuid")]
pub fn kvm_cpuid(ctx: TracePointContext) -> u32 {
    if global(&SNAPSHOTS) != 0 {
        try_kvm_cpuid(&ctx);
    }
    0
}

#[inline(always)]
fn try_kvm_cpuid(ctx: &TracePointContext) {
    // SAFETY: offset from the format file; read_at checks bounds.
    let Ok(function) = (unsafe { ctx.read_at::<u32>(global(&CPUID_FUNCTION_OFF) as usize) }) else {
        count_drop(drop_kind::READ_FAILED);
        return;
    };
    if function == 0
        || (function != global(&LEAF_TOTAL)
            && function != global(&LEAF_COUNT)
            && function != global(&LEAF_CYCLES))
    {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    if !traced(tgid) {
        return;
    }
    // SAFETY: offsets from the format file; read_at checks bounds.
    let regs = unsafe {
        (
            ctx.read_at::<u32>(global(&CPUID_INDEX_OFF) as usize),
            ctx.read_at::<u64>(global(&CPUID_RAX_OFF) as usize),
            ctx.read_at::<u64>(global(&CPUID_RBX_OFF) as usize),
            ctx.read_at::<u64>(global(&CPUID_RCX_OFF) as usize),
            ctx.read_at::<u64>(global(&CPUID_RDX_OFF) as usize),
        )
    };
    let (Ok(index), Ok(rax), Ok(rbx), Ok(rcx), Ok(rdx)) = regs else {
        count_drop(drop_kind::READ_FAILED);
        return;
    };
    // SAFETY: entries are copied out.
    let isa = unsafe { PENDING.get(&tid) }.map_or(0, |p| p.vcpu.exit.isa);
    let reason_key = VmExitKey {
        pid: tgid,
        exit: ExitKey {
            isa,
            reason: index,
            failed_entry: 0,
        },
    };
    // SAFETY: plain reads of values other vCPUs may be adding to.
    let host_reason_count = unsafe { VM_EXITS.get(&reason_key) }.copied().unwrap_or(0);
    // SAFETY: as above.
    let host_total = unsafe { VM_TOTALS.get(&tgid) }.copied().unwrap_or(0);
    let event = CpuidEvent {
        // SAFETY: a helper with no arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        rax,
        rbx,
        rcx,
        rdx,
        host_reason_count,
        host_total,
        pid: tgid,
        tid,
        function,
        index,
        isa,
        _pad: 0,
    };
    if CPUID_EVENTS.output::<CpuidEvent>(&event, 0).is_err() {
        count_drop(drop_kind::CPUID_RING_FULL);
    }
}

/// Starts a new phase when kvm_intel or kvm_amd is loaded. It runs before the module's
/// init, so before any exit of a VM under the new load.
#[tracepoint(category = "module", name = "module_load")]
pub fn module_load(ctx: TracePointContext) -> u32 {
    // SAFETY: offset from the format file; read_at checks bounds.
    let Ok(loc) = (unsafe { ctx.read_at::<u32>(global(&MODULE_NAME_OFF) as usize) }) else {
        return 0;
    };
    // __data_loc: the low 16 bits are the string's offset in the record.
    let at = (loc & 0xffff) as usize;
    // SAFETY: read_at checks bounds; a short read of a shorter name fails or differs.
    let is_vendor = unsafe { ctx.read_at::<[u8; 10]>(at) }.is_ok_and(|n| n == *vendor::INTEL)
        // SAFETY: as above.
        || unsafe { ctx.read_at::<[u8; 8]>(at) }.is_ok_and(|n| n == *vendor::AMD);
    if is_vendor && let Some(slot) = PHASE.get_ptr_mut(0) {
        // SAFETY: a live map value; module loads are serialised, the add is atomic anyway.
        unsafe { core::intrinsics::atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(slot, 1) };
    }
    0
}

/// Adds forked children of traced processes to the filter, so `kvmtrace record -- CMD`
/// also counts a VMM that CMD starts.
#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    if global(&FILTER_PIDS_ENABLED) != 0 {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        // SAFETY: presence test only.
        if unsafe { FILTER_PIDS.get(&tgid) }.is_some() {
            // SAFETY: offset from the format file; read_at checks bounds.
            if let Ok(child) = unsafe { ctx.read_at::<u32>(global(&FORK_CHILD_OFF) as usize) } {
                if FILTER_PIDS.insert(&child, &1, u64::from(BPF_ANY)).is_err() {
                    count_drop(drop_kind::FILTER_MAP_FULL);
                    warn!(
                        &ctx,
                        "pid filter full: child {} of {} is not traced", child, tgid
                    );
                }
            }
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
