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
//! Counts and times live in per-CPU maps and are bumped with plain adds: a per-CPU
//! slot has one writer. With `--snapshots`, the per-VM counts that counter reads are
//! compared with are the count path's per-CPU cells too (no hash lookup, no atomic
//! per exit), summed over CPUs when a guest reads a counter. Shared, with atomic
//! adds: a few control slots (the phase, the outstanding reads, the cache epoch) and
//! the ended VMs' total, once per VM. Every
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
mod thread_rows;

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

/// Exits the per-vCPU map had no room for, per reason: the overflow, not the counts.
#[map]
static OVERFLOW_EXITS: PerCpuHashMap<PhaseExitKey, ExitStats> =
    PerCpuHashMap::with_max_entries(limits::MAX_OVERFLOW_ROWS, 0);
/// Every exit, per (phase, VM, vCPU, reason): count and handling time.
#[map]
static VCPU_EXITS: PerCpuHashMap<PhaseVcpuKey, ExitStats> =
    PerCpuHashMap::with_max_entries(limits::MAX_VCPU_ROWS, 0);
/// kvmtrace's latency histogram: exits per log2 bucket of handling time, per thread
/// row cell ([`thread_rows::cell`]): an array, so an entry needs no hash lookup
/// for it. (Not the kernel's hist trigger, which the lab compares with.)
#[map]
static LATENCY_CELLS: PerCpuArray<[u64; limits::HIST_BUCKETS as usize]> =
    PerCpuArray::with_max_entries(rows::CELLS, 0);
/// The power of two above [`limits::HIST_BUCKETS`], for the verifier's mask.
const HIST_BUCKETS_POW2: u32 = 64;
/// The same for reasons without a cell (failed VM entries, unknown codes), per
/// (reason, bucket).
#[map]
static LATENCY_HIST: PerCpuHashMap<HistKey, u64> =
    PerCpuHashMap::with_max_entries(limits::MAX_HIST_ROWS, 0);
/// vCPU thread id -> its exit being handled. One writer per key: the thread itself,
/// which updates its entry in place. Not LRU: a full map is counted
/// (`PENDING_MAP_FULL`), never a silent eviction; an exiting thread's entry is deleted.
#[map]
static PENDING: HashMap<u32, PendingExit> = HashMap::with_max_entries(limits::MAX_PENDING, 0);
/// Processes (tgids) to trace when `FILTER_PIDS_ENABLED` is set.
#[map]
static FILTER_PIDS: HashMap<u32, u32> = HashMap::with_max_entries(limits::MAX_FILTER_PIDS, 0);
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_kind::COUNT, 0);
/// With snapshots, the ended VMs' exits ([`vm_totals_key::ENDED`]), added once per
/// VM when it ends. (A VM's own counts are the count path's cells, summed at a read.)
#[map]
static VM_TOTALS: HashMap<u32, u64> = HashMap::with_max_entries(limits::MAX_VMS, 0);
/// Per-VM synthetic exits (VMX INVALID_STATE, made up by `vmx_vcpu_run()` without a
/// VM entry), kept only with snapshots while the probe on `vmx_vcpu_run()` is attached.
#[map]
static VM_SYNTHETIC: HashMap<u32, u64> = HashMap::with_max_entries(limits::MAX_VMS, 0);
/// vCPU thread id -> 1 from `vmx_vcpu_run()`'s start until its `kvm_entry`: still 1 at
/// the thread's next run means that run entered no guest (a synthetic exit). One
/// writer per key: the thread itself.
#[map]
static RUN_STARTED: HashMap<u32, u32> = HashMap::with_max_entries(limits::MAX_VCPU_THREADS, 0);
/// Slot 0 of each CPU: the exit its vCPU thread is handling, while that thread has not
/// left the CPU. `sched_switch` moves it to `PENDING` when the thread is switched out,
/// so an entry finds its exit here (no hash lookup) unless the thread slept, was
/// preempted or migrated in between.
#[map]
static CPU_PENDING: PerCpuArray<PendingExit> = PerCpuArray::with_max_entries(1, 0);
/// Slot 0: the current phase, bumped at each load of a kvm vendor module.
#[map]
static PHASE: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static CPUID_EVENTS: RingBuf = RingBuf::with_byte_size(limits::CPUID_RING_BYTES, 0);
/// Where the vCPU registers are, and the register-learning state ([`regs_slot`]).
#[map]
static REGS: Array<u32> = Array::with_max_entries(regs_slot::COUNT, 0);
/// Register-learning samples ([`RegsSample`]), while the layout is not known.
#[map]
static REGS_SAMPLES: RingBuf = RingBuf::with_byte_size(limits::LEARN_RING_BYTES, 0);
/// vCPU thread id -> its `struct kvm_vcpu` (from `kvm_entry`'s argument), kept only
/// with snapshots. One writer per key: the thread itself.
#[map]
static VCPU_OF: HashMap<u32, u64> = HashMap::with_max_entries(limits::MAX_VCPU_THREADS, 0);
/// Slot 0 of each CPU: the vCPU thread that entered its guest here last, and its
/// `struct kvm_vcpu` (a hash update only when another thread enters here).
#[map]
static CPU_VCPU: PerCpuArray<CpuVcpu> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct CpuVcpu {
    tid: u32,
    _pad: u32,
    vcpu: u64,
}

/// `--detail`: exits per (phase, VM, reason, sub-key), with their handling time.
#[map]
static DETAIL_EXITS: PerCpuHashMap<DetailKey, ExitStats> =
    PerCpuHashMap::with_max_entries(limits::MAX_DETAIL_ROWS, 0);
/// `--detail`: distinct sub-keys so far per (VM, isa, reason): the cap's bookkeeping,
/// touched only when a new sub-key is inserted.
#[map]
static DETAIL_KEYS: HashMap<u64, u64> = HashMap::with_max_entries(limits::MAX_DETAIL_REASONS, 0);
/// `--rip`: exits per (phase, VM, reason, guest RIP).
#[map]
static RIP_EXITS: PerCpuHashMap<RipKey, u64> =
    PerCpuHashMap::with_max_entries(limits::MAX_RIP_ROWS, 0);

/// vCPU thread id -> its guest counter read, from the CPUID exit that asked until the
/// next VM entry, where the registers the guest receives are read.
#[map]
static PENDING_READS: HashMap<u32, CpuidEvent> =
    HashMap::with_max_entries(limits::MAX_VCPU_THREADS, 0);

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

/// Atomically adds 1 to `key`, creating it. Returns false when the map is full.
///
/// The key is taken by value and kept on the stack. A `&CONSTANT` key would be a
/// promoted constant, which LLVM may merge with a loader-set global of the same
/// initial value: `&vm_totals_key::ALL` once became `&DETAIL`, so every exit under
/// `--detail` was added to key 1 and the all-VMs total read 0. The tracer's
/// `globals_are_only_loaded` test checks the object for any such pointer.
#[inline(always)]
fn shared_inc<K: Copy>(map: &HashMap<K, u64>, key: K) -> bool {
    let key = &key;
    for _ in 0..2 {
        if let Some(slot) = map.get_ptr_mut(key) {
            // SAFETY: a live map value; other vCPUs of the VM add to it concurrently.
            unsafe {
                core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1)
            };
            return true;
        }
        // Lost a race with another vCPU's insert: EEXIST, so look it up again.
        if map.insert(key, 1, u64::from(BPF_NOEXIST)).is_ok() {
            return true;
        }
    }
    false
}

#[inline(always)]
fn traced(tgid: u32) -> bool {
    // SAFETY: the map value is only tested for presence.
    global(&FILTER_PIDS_ENABLED) == 0 || unsafe { FILTER_PIDS.get(tgid) }.is_some()
}

#[tracepoint(category = "kvm", name = "kvm_exit")]
pub fn kvm_exit(ctx: TracePointContext) -> u32 {
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // One read for all the fields (the helper call is most of a read's cost).
    // SAFETY: the offset comes from this tracepoint's format file; read_at checks it.
    let Ok(fields) = (unsafe {
        ctx.read_at::<[u32; (limits::EXIT_FIELDS_BYTES / 4) as usize]>(
            global(&EXIT_FIELDS_OFF) as usize
        )
    }) else {
        count_drop(drop_kind::READ_FAILED);
        return 0;
    };
    // The loader checked that each offset is 4-aligned and within the bytes read; the
    // mask only shows the verifier the bound.
    let field = |off: &'static u32| {
        let i = (global(off) / 4) as usize & ((limits::EXIT_FIELDS_BYTES / 4 - 1) as usize);
        fields[i]
    };
    let exit = Exit {
        raw_reason: field(&EXIT_REASON_OFF),
        isa: field(&EXIT_ISA_OFF),
        vcpu_id: field(&EXIT_VCPU_OFF),
        fields: Some(&fields),
    };
    try_kvm_exit(now, &exit);
    0
}

/// The timing path's exit without the record: where the vendor module's BTF shows
/// the layout, and nothing needs the record's other fields (no `--detail`, no
/// `--rip`, no register learning), the reason and the vCPU id are read from the vCPU.
#[raw_tracepoint(tracepoint = "kvm_exit")]
pub fn kvm_exit_raw(ctx: RawTracePointContext) -> u32 {
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let vcpu: u64 = ctx.arg(0);
    let isa = ctx.arg::<u64>(1) as u32;
    let Some(raw_reason) = count_path::reason_of(vcpu, isa) else {
        count_drop(drop_kind::READ_FAILED);
        return 0;
    };
    if global(&VM_TIME) != 0 {
        vm_exit(now, isa, raw_reason, || {
            if global(&VCPU_ROWS) == 0 {
                return count::ALL_VCPUS;
            }
            count_path::vcpu_id_of(vcpu).unwrap_or(count::ALL_VCPUS)
        });
        return 0;
    }
    let Some(vcpu_id) = count_path::vcpu_id_of(vcpu) else {
        count_drop(drop_kind::READ_FAILED);
        return 0;
    };
    let exit = Exit {
        raw_reason,
        isa,
        vcpu_id,
        fields: None,
    };
    try_kvm_exit(now, &exit);
    0
}

/// One exit, from the record or from the vCPU.
struct Exit<'a> {
    raw_reason: u32,
    isa: u32,
    vcpu_id: u32,
    /// The record's fields (the classic tracepoint): `--detail`'s and the RIP's source.
    fields: Option<&'a [u32; (limits::EXIT_FIELDS_BYTES / 4) as usize]>,
}

/// The per-VM timing path's exit: parked, with its thread's slot ([`thread_rows`]),
/// for its entry to count and time it in the thread's row. The slot is cached per
/// CPU; `vcpu_id` is read only when the thread takes its slot.
#[inline(always)]
fn vm_exit(now: u64, isa: u32, raw_reason: u32, vcpu_id: impl FnOnce() -> u32) {
    let Some(me) = thread_rows::current(vcpu_id) else {
        // Not traced.
        return;
    };
    if me.slot == rows::FULL_SLOT {
        count_drop(drop_kind::COUNT_SLOTS_FULL);
    }
    let row = PhaseVcpuKey::new(
        me.phase,
        &VcpuKey {
            pid: me.tgid,
            vcpu_id: me.vcpu_id,
            exit: ExitKey::from_raw(isa, raw_reason),
        },
    );
    let Some(slot) = CPU_PENDING.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, as in `try_kvm_exit`.
    let last = unsafe { *slot };
    if last.start_ns != 0 {
        // Its entry never came: counted without its time.
        count_drop(drop_kind::PENDING_LOST);
        count_untimed(&last);
    }
    // SAFETY: as above.
    unsafe {
        (*slot).start_ns = now;
        (*slot).tid = me.tid;
        (*slot).row = row;
        (*slot).vm_slot = me.slot;
    }
}

#[inline(always)]
fn try_kvm_exit(now: u64, ex: &Exit<'_>) {
    if global(&VM_TIME) != 0 {
        vm_exit(now, ex.isa, ex.raw_reason, || {
            if global(&VCPU_ROWS) == 0 {
                count::ALL_VCPUS
            } else {
                ex.vcpu_id
            }
        });
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    if !traced(tgid) {
        return;
    }
    let (raw_reason, isa, vcpu_id) = (ex.raw_reason, ex.isa, ex.vcpu_id);
    let vcpu_filter = global(&VCPU_FILTER);
    if vcpu_filter != u32::MAX && vcpu_filter != vcpu_id {
        return;
    }
    let exit = ExitKey::from_raw(isa, raw_reason);
    let vcpu = VcpuKey {
        pid: tgid,
        vcpu_id,
        exit,
    };
    let phase = PHASE.get(0).copied().unwrap_or(0);
    let row = PhaseVcpuKey::new(phase, &vcpu);
    let one = untimed_one();
    // Only snapshots and `--rip` need the RIP: assembled for them alone, from the
    // record (the raw program runs only where neither needs it: 0).
    let guest_rip = || {
        let at =
            (global(&EXIT_RIP_OFF) / 4) as usize & ((limits::EXIT_FIELDS_BYTES / 4 - 2) as usize);
        ex.fields
            .map_or(0, |f| u64::from(f[at]) | (u64::from(f[at + 1]) << 32))
    };
    if global(&SNAPSHOTS) != 0 {
        let vm = VmExitKey { pid: tgid, exit };
        count_path::count_for_snapshots(isa, raw_reason);
        cpuid_snapshot(tid, &vm, guest_rip());
    }
    if global(&RIPS) != 0 {
        count_rip(&row, guest_rip());
    }
    // The exit is counted at its entry, with its time (one hash lookup there, none
    // here); until then it is parked, and user space counts parked exits too.
    let (detail, awaiting) = match ex.fields {
        Some(fields) if global(&DETAIL) != 0 => exit_detail(fields, &exit, &row),
        _ => (DetailKey::default(), 0),
    };
    if let Some(slot) = CPU_PENDING.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; a tracing program does not migrate, and the slot is
        // only written by programs running on this CPU.
        unsafe {
            // An exit still in the slot never saw its entry: the thread would have left
            // the CPU (sched_switch empties the slot) or re-entered (kvm_entry does).
            if (*slot).start_ns != 0 {
                count_drop(drop_kind::PENDING_LOST);
                count_row(&(*slot).row, &one);
            }
            (*slot).start_ns = now;
            (*slot).tid = tid;
            (*slot).row = row;
            // Without --detail both stay zero, as the slot was made: no stores.
            if global(&DETAIL) != 0 {
                (*slot).awaiting = awaiting;
                (*slot).detail = detail;
            }
        }
    }
}

/// Adds `stats` to the exit's per-vCPU row, or, when that map is full, to its
/// reason's overflow row. A full map is counted, not logged: a log line per exit
/// would flood the host.
#[inline(always)]
fn count_row(row: &PhaseVcpuKey, stats: &ExitStats) {
    if add_stats(&VCPU_EXITS, row, stats) {
        return;
    }
    count_drop(drop_kind::VCPU_MAP_FULL);
    let overflow = PhaseExitKey {
        phase: row.phase(),
        exit: row.exit(),
    };
    if !add_stats(&OVERFLOW_EXITS, &overflow, stats) {
        count_drop(drop_kind::EXIT_MAP_FULL);
    }
}

/// `--detail` at an exit: counts it in its detail row when its own fields key it, or
/// says which tracepoint will. Returns the row counted in and the kind awaited.
#[inline(always)]
fn exit_detail(
    fields: &[u32; (limits::EXIT_FIELDS_BYTES / 4) as usize],
    exit: &ExitKey,
    row: &PhaseVcpuKey,
) -> (DetailKey, u32) {
    // As for the fixed fields, the loader checked the offsets (in the read, aligned to
    // the field's size); the masks show the verifier the bounds: an even index for the
    // u64 (its two halves), any index for the u32.
    let optional =
        |off: u32, mask: u32| (off != NO_FIELD).then_some((off / 4) as usize & mask as usize);
    let words = limits::EXIT_FIELDS_BYTES / 4;
    let info1 = optional(global(&EXIT_INFO1_OFF), words - 2)
        .map(|i| u64::from(fields[i]) | (u64::from(fields[i + 1]) << 32));
    let intr_info = optional(global(&EXIT_INTR_INFO_OFF), words - 1).map(|i| fields[i]);
    match detail_plan(exit, info1, intr_info) {
        DetailPlan::Now(kind, sub) => (count_detail(&DetailKey::new(row, kind, sub)), 0),
        DetailPlan::Await(kind) => (DetailKey::default(), kind),
        DetailPlan::None => (DetailKey::default(), 0),
    }
}

/// Counts one exit in its detail row, or, once its VM has
/// [`detail_kind::MAX_DETAIL_KEYS_PER_REASON`] sub-keys of its reason (or the
/// bookkeeping of those is full), in the reason's `OTHER` row. Returns the row counted
/// in (`kind` 0: none, the map was full).
#[inline(always)]
fn count_detail(key: &DetailKey) -> DetailKey {
    let one = ExitStats {
        count: 1,
        ..ExitStats::default()
    };
    if let Some(stats) = DETAIL_EXITS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of the entry; per-CPU, so no other writer.
        unsafe { (*stats).count += 1 };
        return *key;
    }
    // (VM, isa, reason): each VM has its own cap (every Linux boot probes 256
    // hypervisor CPUID leaves), so one VM cannot use up another's.
    let vm_reason = (u64::from(key.pid) << 32)
        | u64::from(((key.meta & 0xff) << 24) | (key.reason & 0x00ff_ffff));
    // SAFETY: the value is copied out.
    let keys = unsafe { DETAIL_KEYS.get(vm_reason) }.copied().unwrap_or(0);
    // A new sub-key: two CPUs may both count it, which only makes the cap a little
    // early.
    let row =
        if keys < detail_kind::MAX_DETAIL_KEYS_PER_REASON && shared_inc(&DETAIL_KEYS, vm_reason) {
            *key
        } else {
            count_drop(drop_kind::DETAIL_CAPPED);
            DetailKey {
                kind: detail_kind::OTHER,
                sub: 0,
                ..*key
            }
        };
    if add_stats(&DETAIL_EXITS, &row, &one) {
        row
    } else {
        count_drop(drop_kind::DETAIL_MAP_FULL);
        DetailKey::default()
    }
}

/// Counts one exit at its guest RIP.
#[inline(always)]
fn count_rip(row: &PhaseVcpuKey, rip: u64) {
    let key = RipKey {
        pid: row.pid,
        reason: row.reason,
        meta: row.meta,
        _pad: 0,
        rip,
    };
    if let Some(n) = RIP_EXITS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot; no other writer.
        unsafe { *n += 1 };
    } else if RIP_EXITS.insert(key, 1, u64::from(BPF_ANY)).is_err() {
        count_drop(drop_kind::RIP_MAP_FULL);
    }
}

/// The sub-key of the exit this vCPU thread is handling, from a tracepoint that fires
/// while KVM handles it (`kvm_msr`, `kvm_cpuid`, `kvm_page_fault`): counted when the
/// exit awaits that kind. Any other `kvm_msr` or `kvm_cpuid` event is an instruction
/// KVM emulated without an exit of its own (real-mode code under `ept=0`, or a second
/// one within one exit): it is counted under its own reason, marked emulated, so the
/// rows hold every event. A `kvm_page_fault` with no EPT violation or NPF waiting is
/// shadow paging's #PF, already keyed by its vector (its address is guest-virtual).
#[inline(always)]
fn detail_event(kind: u32, sub: u64) {
    let tid = bpf_get_current_pid_tgid() as u32;
    let slot = CPU_PENDING.get_ptr_mut(0);
    let pending = match slot {
        // SAFETY: this CPU's slot.
        Some(slot) if unsafe { (*slot).tid == tid && (*slot).start_ns != 0 } => slot,
        _ => match (PENDING.get_ptr_mut(tid), slot) {
            (Some(entry), _) => entry,
            // The thread's last exit, already entered: only its VM and isa are used.
            // SAFETY: as above.
            (None, Some(slot)) if unsafe { (*slot).tid == tid } => slot,
            _ => return,
        },
    };
    // SAFETY: this CPU's slot, or the thread's own entry: only this thread uses it now.
    unsafe {
        if (*pending).start_ns != 0 && (*pending).awaiting == kind {
            (*pending).awaiting = 0;
            (*pending).detail = count_detail(&DetailKey::new(&(*pending).row, kind, sub));
            return;
        }
        if kind == detail_kind::GPA {
            return;
        }
        let row = (*pending).row;
        let key = DetailKey {
            pid: row.pid,
            reason: own_reason(row.meta & 0xff, kind, sub),
            // The isa and phase of the thread's last exit; never a failed entry.
            meta: row.meta & !0x100,
            kind: kind | detail_kind::EMULATED,
            sub,
        };
        count_detail(&key);
    }
}

/// The exit reason of an emulated instruction's kind: CPUID, or RDMSR/WRMSR (`sub`'s
/// bit 32 is the write flag).
#[inline(always)]
fn own_reason(isa: u32, kind: u32, sub: u64) -> u32 {
    use tracer_common::exit_reasons as r;
    let write = sub >> 32 & 1 != 0;
    match (
        isa == tracer_common::isa::SVM,
        kind == detail_kind::CPUID,
        write,
    ) {
        (true, true, _) => r::SVM_CPUID,
        (true, false, _) => r::SVM_MSR,
        (false, true, _) => r::VMX_CPUID,
        (false, false, false) => r::VMX_MSR_READ,
        (false, false, true) => r::VMX_MSR_WRITE,
    }
}

/// `REGS` slot `i`.
#[inline(always)]
fn regs_slot_value(i: u32) -> u32 {
    REGS.get(i).copied().unwrap_or(0)
}

/// At an exit of a traced VM, with snapshots on: while the register layout is not
/// known, sends a learning sample (the exit's `guest_rip`, which `kvm_exit` just left
/// in `regs[RIP]`, and the vCPU's first bytes); once it is, a CPUID exit that asks
/// for a counter leaf snapshots the VM's counts, to be sent with the registers the
/// guest receives at the next VM entry (`kvm_entry`).
#[inline(always)]
fn cpuid_snapshot(tid: u32, vm: &VmExitKey, guest_rip: u64) {
    let plus_one = regs_slot_value(regs_slot::OFFSET_PLUS_ONE);
    if plus_one != 0 && !cpuid_exit(vm.exit.isa, vm.exit.reason) {
        // The layout is known and this exit asked nothing: no lookup at all.
        return;
    }
    let Some(vcpu) = vcpu_of(tid) else {
        // No entry of this thread seen yet (it entered before kvmtrace attached).
        return;
    };
    if plus_one == 0 {
        learn(vcpu, guest_rip);
        if cpuid_exit(vm.exit.isa, vm.exit.reason)
            && let Some(n) = REGS.get_ptr_mut(regs_slot::CPUID_BEFORE_LAYOUT)
        {
            // SAFETY: a live map value; a lost add only understates a report line.
            unsafe { *n += 1 };
        }
        return;
    }
    let regs = vcpu + u64::from((plus_one - 1) & 0xffff);
    // SAFETY: reads of kernel memory through the probe helper, which checks them.
    let asked = unsafe {
        (
            bpf_probe_read_kernel(regs as *const u64),
            bpf_probe_read_kernel((regs + 8) as *const u64),
        )
    };
    let (Ok(rax), Ok(rcx)) = asked else {
        count_drop(drop_kind::SNAPSHOT_LOST);
        return;
    };
    let (function, index) = (rax as u32, rcx as u32);
    if !counter_leaf(function) {
        return;
    }
    let (host_reason_count, host_total, host_all_vms) =
        count_path::vm_counts(vm.pid, vm.exit.isa, index);
    // SAFETY: a plain read of a value other CPUs may be adding to; a helper call.
    let event = unsafe {
        CpuidEvent {
            ts_ns: bpf_ktime_get_ns(),
            host_reason_count,
            host_total,
            host_all_vms,
            host_ended_vms: VM_TOTALS.get(vm_totals_key::ENDED).copied().unwrap_or(0),
            host_synthetic: synthetic_of(vm.pid),
            pid: vm.pid,
            tid,
            function,
            index,
            isa: vm.exit.isa,
            source: read_source::REGISTERS,
            ..CpuidEvent::default()
        }
    };
    if PENDING_READS
        .insert(tid, event, u64::from(BPF_ANY))
        .is_err()
    {
        count_drop(drop_kind::READ_PENDING_FULL);
    } else if let Some(n) = REGS.get_ptr_mut(regs_slot::READS_OUTSTANDING) {
        // SAFETY: a live map value shared by all CPUs.
        unsafe { core::intrinsics::atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(n, 1) };
    }
}

/// The synthetic exits of VM `pid` so far, or [`UNKNOWN`] when they are not counted:
/// no probe on `vmx_vcpu_run()`, or the vendor module was reloaded since it attached
/// (the probe went with the old module).
#[inline(always)]
fn synthetic_of(pid: u32) -> u64 {
    if regs_slot_value(regs_slot::SYNTHETIC_TRACKED) == 0 || PHASE.get(0).copied().unwrap_or(0) != 0
    {
        return UNKNOWN;
    }
    // SAFETY: a plain read of a value the VM's vCPUs add to.
    unsafe { VM_SYNTHETIC.get(pid) }.copied().unwrap_or(0)
}

/// The `struct kvm_vcpu` of vCPU thread `tid`: this CPU's slot when the thread entered
/// the guest here last, else its entry in `VCPU_OF`.
#[inline(always)]
fn vcpu_of(tid: u32) -> Option<u64> {
    match CPU_VCPU.get(0) {
        Some(slot) if slot.tid == tid && slot.vcpu != 0 => Some(slot.vcpu),
        // SAFETY: the value is copied out.
        _ => unsafe { VCPU_OF.get(tid) }.copied(),
    }
}

/// Whether `function` is one of the configured counter leaves.
#[inline(always)]
fn counter_leaf(function: u32) -> bool {
    function != 0
        && (function == global(&LEAF_TOTAL)
            || function == global(&LEAF_COUNT)
            || function == global(&LEAF_CYCLES))
}

/// Sends one register-learning sample, while the budget user space set lasts.
#[inline(always)]
fn learn(vcpu: u64, guest_rip: u64) {
    let Some(budget) = REGS.get_ptr_mut(regs_slot::LEARN_BUDGET) else {
        return;
    };
    // SAFETY: a live map value; racing CPUs may send a sample or two more.
    unsafe {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
    }
    let Some(mut entry) = REGS_SAMPLES.reserve::<RegsSample>(0) else {
        return;
    };
    let sample = entry.as_mut_ptr();
    // SAFETY: the reserved entry is ours until submitted; the window is filled by the
    // probe helper from kernel memory (zeros if it cannot be read).
    unsafe {
        (*sample).guest_rip = guest_rip;
        if bpf_probe_read_kernel_buf(vcpu as *const u8, &mut (*sample).window).is_err() {
            (*sample).guest_rip = 0;
        }
    }
    entry.submit(0);
}

/// At a VM entry, with snapshots on: remembers the thread's `struct kvm_vcpu`, and
/// completes its pending counter read with the registers the guest now receives.
#[inline(always)]
fn entry_snapshot(ctx: &RawTracePointContext, pid_tgid: u64) {
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !traced(tgid) {
        return;
    }
    if regs_slot_value(regs_slot::SYNTHETIC_TRACKED) != 0
        && let Some(started) = RUN_STARTED.get_ptr_mut(tid)
    {
        // SAFETY: the thread's own entry.
        unsafe { *started = 0 };
    }
    // kvm_entry's first argument is the vCPU on every kernel since 5.7.
    let vcpu: u64 = ctx.arg(0);
    let Some(slot) = CPU_VCPU.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot.
    if unsafe { (*slot).tid != tid || (*slot).vcpu != vcpu } {
        // Another thread entered here last: a traced one is remembered, here and in
        // the per-thread map (for an exit on another CPU).
        if !traced(tgid) {
            return;
        }
        // SAFETY: as above.
        unsafe {
            (*slot).tid = tid;
            (*slot).vcpu = vcpu;
        }
        match VCPU_OF.get_ptr_mut(tid) {
            // SAFETY: the thread's own entry.
            Some(v) => unsafe { *v = vcpu },
            None => {
                if VCPU_OF.insert(tid, vcpu, u64::from(BPF_ANY)).is_err() {
                    count_drop(drop_kind::READ_PENDING_FULL);
                }
            }
        }
    }
    if regs_slot_value(regs_slot::READS_OUTSTANDING) == 0 {
        return;
    }
    let Some(read) = PENDING_READS.get_ptr_mut(tid) else {
        return;
    };
    if let Some(n) = REGS.get_ptr_mut(regs_slot::READS_OUTSTANDING) {
        // SAFETY: a live map value shared by all CPUs; adding u32::MAX subtracts 1.
        unsafe {
            core::intrinsics::atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(n, u32::MAX)
        };
    }
    let plus_one = regs_slot_value(regs_slot::OFFSET_PLUS_ONE);
    let regs = vcpu + u64::from(plus_one.wrapping_sub(1) & 0xffff);
    // SAFETY: kernel reads through the probe helper; RAX, RCX, RDX, RBX are regs[0..4].
    let got = unsafe {
        (
            bpf_probe_read_kernel(regs as *const u64),
            bpf_probe_read_kernel((regs + 8) as *const u64),
            bpf_probe_read_kernel((regs + 16) as *const u64),
            bpf_probe_read_kernel((regs + 24) as *const u64),
        )
    };
    // SAFETY: the thread's own pending read; copied out, then removed.
    let mut event = unsafe { *read };
    let _ = PENDING_READS.remove(tid);
    let (Ok(rax), Ok(rcx), Ok(rdx), Ok(rbx)) = got else {
        count_drop(drop_kind::SNAPSHOT_LOST);
        return;
    };
    event.rax = rax;
    event.rbx = rbx;
    event.rcx = rcx;
    event.rdx = rdx;
    (
        event.host_reason_count_entry,
        event.host_total_entry,
        event.host_all_vms_entry,
    ) = count_path::vm_counts(tgid, event.isa, event.index);
    if CPUID_EVENTS.output::<CpuidEvent>(&event, 0).is_err() {
        count_drop(drop_kind::CPUID_RING_FULL);
    }
}

/// Moves the pending exit of a vCPU thread that leaves its CPU (it sleeps, is
/// preempted, or goes on elsewhere) from the CPU's slot to the per-thread map. The
/// raw tracepoint runs before the switch, so the current task is the one leaving.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> u32 {
    let _ = ctx;
    let Some(slot) = CPU_PENDING.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot.
    let pending = unsafe { *slot };
    if pending.start_ns == 0 || pending.tid != bpf_get_current_pid_tgid() as u32 {
        return 0;
    }
    // SAFETY: as above.
    unsafe { (*slot).start_ns = 0 };
    if let Some(entry) = PENDING.get_ptr_mut(pending.tid) {
        // SAFETY: the thread's entry; the thread is not running anywhere else now.
        unsafe { *entry = pending };
    } else if PENDING
        .insert(pending.tid, pending, u64::from(BPF_ANY))
        .is_err()
    {
        // Its time is lost, not the exit.
        count_drop(drop_kind::PENDING_MAP_FULL);
        count_untimed(&pending);
    }
    0
}

/// Counts a parked exit whose time is lost.
#[inline(always)]
fn count_untimed(pending: &PendingExit) {
    count_exit(pending, &untimed_one());
}

/// Counts a parked exit with `stats`: in its VM slot's cell on the per-VM timing path
/// (or, for a reason without a cell, in its VM's row), else in its vCPU's row.
#[inline(always)]
fn count_exit(pending: &PendingExit, stats: &ExitStats) {
    if global(&VM_TIME) != 0 {
        let exit = pending.row.exit();
        let cell = thread_rows::cell(exit.isa, exit.reason | (exit.failed_entry << 31));
        if cell < rows::CELLS {
            let own = pending.tid == bpf_get_current_pid_tgid() as u32;
            thread_rows::add_time(pending.vm_slot, cell, stats, own);
            return;
        }
    }
    count_row(&pending.row, stats);
}

/// One exit, without its time.
#[inline(always)]
fn untimed_one() -> ExitStats {
    ExitStats {
        count: 1,
        ..ExitStats::default()
    }
}

#[raw_tracepoint(tracepoint = "kvm_entry")]
pub fn kvm_entry(ctx: RawTracePointContext) -> u32 {
    if global(&SNAPSHOTS) != 0 {
        entry_snapshot(&ctx, bpf_get_current_pid_tgid());
    }
    try_kvm_entry();
    0
}

#[inline(always)]
fn try_kvm_entry() {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    // The exit is in this CPU's slot unless the thread left the CPU since.
    let pending = match CPU_PENDING.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        Some(slot) if unsafe { (*slot).tid == tid && (*slot).start_ns != 0 } => slot,
        _ => match PENDING.get_ptr_mut(tid) {
            Some(entry) => entry,
            // A thread we do not trace.
            None => return,
        },
    };
    // SAFETY: this CPU's slot, or the thread's own entry: only this thread uses it now.
    let (start_ns, row, detail, vm_slot) = unsafe {
        (
            (*pending).start_ns,
            (*pending).row,
            (*pending).detail,
            (*pending).vm_slot,
        )
    };
    if start_ns == 0 || row.pid != (pid_tgid >> 32) as u32 {
        // The first entry after attach, or an old exit of a thread id now reused.
        return;
    }
    // SAFETY: as above.
    unsafe { (*pending).start_ns = 0 };
    // SAFETY: a helper with no arguments.
    let elapsed = unsafe { bpf_ktime_get_ns() }.saturating_sub(start_ns);
    let timed = ExitStats {
        count: 1,
        timed: 1,
        time_ns: elapsed,
        max_ns: elapsed,
    };
    let exit = row.exit();
    let cell = thread_rows::cell(exit.isa, exit.reason | (exit.failed_entry << 31));
    if global(&VM_TIME) != 0 && cell < rows::CELLS {
        // The thread's own row: this is the thread.
        thread_rows::add_time(vm_slot, cell, &timed, true);
    } else {
        count_row(&row, &timed);
    }
    if detail.kind != 0 {
        let timed = ExitStats { count: 0, ..timed };
        // Exists too: its exit (or the tracepoint that gave its sub-key) created it.
        add_stats(&DETAIL_EXITS, &detail, &timed);
    }
    let bucket = hist_bucket(elapsed);
    if cell < rows::CELLS {
        // Known reasons: an array cell, no hash lookup.
        if let Some(buckets) = LATENCY_CELLS.get_ptr_mut(cell) {
            // SAFETY: this CPU's value, no other writer. Masked after a volatile
            // read, so LLVM keeps the mask that shows the verifier the bound.
            unsafe {
                let b = core::ptr::read_volatile(&bucket) & (HIST_BUCKETS_POW2 - 1);
                if b < limits::HIST_BUCKETS {
                    (*buckets)[b as usize] += 1;
                }
            }
        }
        return;
    }
    let hist = HistKey::new(&exit, bucket);
    if let Some(slot) = LATENCY_HIST.get_ptr_mut(hist) {
        // SAFETY: this CPU's slot; no other writer.
        unsafe { *slot += 1 };
    } else if LATENCY_HIST.insert(hist, 1, u64::from(BPF_ANY)).is_err() {
        count_drop(drop_kind::HIST_MAP_FULL);
    }
}

/// The leaf of a CPUID exit (`--detail`), and each guest read of a counter leaf
/// snapshotted together with the host's own counts for that VM at that instant (the
/// CPUID exit being handled is already counted).
#[tracepoint(category = "kvm", name = "kvm_cpuid")]
pub fn kvm_cpuid(ctx: TracePointContext) -> u32 {
    // SAFETY: offset from the format file; read_at checks bounds.
    let Ok(function) = (unsafe { ctx.read_at::<u32>(global(&CPUID_FUNCTION_OFF) as usize) }) else {
        count_drop(drop_kind::SNAPSHOT_LOST);
        return 0;
    };
    if global(&DETAIL) != 0 {
        detail_event(detail_kind::CPUID, u64::from(function));
    }
    if global(&SNAPSHOTS) != 0 {
        try_kvm_cpuid(&ctx, function);
    }
    0
}

/// The MSR of an MSR exit (`--detail`): index and direction.
#[tracepoint(category = "kvm", name = "kvm_msr")]
pub fn kvm_msr(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets from the format file; read_at checks bounds.
    let (Ok(ecx), Ok(write)) = (unsafe {
        (
            ctx.read_at::<u32>(global(&MSR_ECX_OFF) as usize),
            ctx.read_at::<u32>(global(&MSR_WRITE_OFF) as usize),
        )
    }) else {
        return 0;
    };
    detail_event(
        detail_kind::MSR,
        u64::from(ecx) | (u64::from(write != 0) << 32),
    );
    0
}

/// The guest-physical region of an EPT violation or nested page fault (`--detail`).
#[tracepoint(category = "kvm", name = "kvm_page_fault")]
pub fn kvm_page_fault(ctx: TracePointContext) -> u32 {
    // SAFETY: offset from the format file; read_at checks bounds.
    if let Ok(address) = unsafe { ctx.read_at::<u64>(global(&PF_ADDRESS_OFF) as usize) } {
        detail_event(detail_kind::GPA, address >> detail_kind::GPA_REGION_SHIFT);
    }
    0
}

#[inline(always)]
fn try_kvm_cpuid(ctx: &TracePointContext, function: u32) {
    if !counter_leaf(function) {
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
        count_drop(drop_kind::SNAPSHOT_LOST);
        return;
    };
    // A read the registers will show at the next entry: add what kvm_cpuid saw.
    if let Some(read) = PENDING_READS.get_ptr_mut(tid) {
        // SAFETY: the thread's own pending read.
        unsafe {
            if (*read).function == function && (*read).index == index {
                (*read).tp_rax = rax;
                (*read).tp_rbx = rbx;
                (*read).tp_rcx = rcx;
                (*read).tp_rdx = rdx;
                (*read).source |= read_source::KVM_CPUID;
                return;
            }
        }
    }
    // The isa of the exit being handled: in this CPU's slot, or the thread's entry.
    let isa = match CPU_PENDING.get(0) {
        Some(slot) if slot.tid == tid && slot.start_ns != 0 => slot.row.exit().isa,
        // SAFETY: the entry is copied out.
        _ => unsafe { PENDING.get(tid) }.map_or(0, |p| p.row.exit().isa),
    };
    let (host_reason_count, host_total, host_all_vms) = count_path::vm_counts(tgid, isa, index);
    // Only kvm_cpuid saw this read (no CPUID exit asked it, e.g. the emulator's CPUID,
    // or the register layout is not known yet).
    let event = CpuidEvent {
        // SAFETY: a helper with no arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        rax,
        rbx,
        rcx,
        rdx,
        tp_rax: rax,
        tp_rbx: rbx,
        tp_rcx: rcx,
        tp_rdx: rdx,
        host_reason_count,
        host_total,
        host_all_vms,
        host_reason_count_entry: host_reason_count,
        host_total_entry: host_total,
        host_all_vms_entry: host_all_vms,
        // SAFETY: as above.
        host_ended_vms: unsafe { VM_TOTALS.get(vm_totals_key::ENDED) }
            .copied()
            .unwrap_or(0),
        host_synthetic: synthetic_of(tgid),
        pid: tgid,
        tid,
        function,
        index,
        isa,
        source: read_source::KVM_CPUID,
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

/// Adds the new child processes of traced processes to the filter, so `kvmtrace record
/// -- CMD` also counts a VMM that CMD starts. Threads are not added: the filter holds
/// processes (every thread of a traced process is traced through its tgid). The
/// current task is the parent; the tracepoint fires before the child first runs.
#[tracepoint(category = "task", name = "task_newtask")]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    if global(&FILTER_PIDS_ENABLED) != 0 {
        try_task_newtask(&ctx);
    }
    0
}

#[inline(always)]
fn try_task_newtask(ctx: &TracePointContext) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: presence test only.
    if unsafe { FILTER_PIDS.get(tgid) }.is_none() {
        return;
    }
    // The low 32 bits of clone_flags (little-endian), where CLONE_THREAD is.
    // SAFETY: offset from the format file; read_at checks bounds.
    // An unreadable record is counted as a child not traced (READ_FAILED counts exits).
    let Ok(flags) = (unsafe { ctx.read_at::<u32>(global(&NEWTASK_FLAGS_OFF) as usize) }) else {
        count_drop(drop_kind::FILTER_MAP_FULL);
        return;
    };
    if flags & CLONE_THREAD != 0 {
        return;
    }
    // SAFETY: offset from the format file; read_at checks bounds.
    let Ok(child) = (unsafe { ctx.read_at::<u32>(global(&NEWTASK_PID_OFF) as usize) }) else {
        count_drop(drop_kind::FILTER_MAP_FULL);
        return;
    };
    if FILTER_PIDS.insert(child, 1, u64::from(BPF_ANY)).is_err() {
        count_drop(drop_kind::FILTER_MAP_FULL);
        warn!(
            ctx,
            "pid filter full: child {} of {} is not traced", child, tgid
        );
    }
}

/// Forgets an exiting thread's pending exit, and an exited process's filter entry. The
/// current task is the one exiting; it runs no vCPU any more.
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    // Its last exit, if any, has no entry to come: the exit stays counted, untimed.
    // Empty this CPU's slot too, or the thread's last sched_switch would move it back.
    if let Some(slot) = CPU_PENDING.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe {
            if (*slot).tid == tid && (*slot).start_ns != 0 {
                (*slot).start_ns = 0;
                count_untimed(&*slot);
            }
        }
    }
    // SAFETY: the entry is copied out; the thread is exiting, nothing else writes it.
    if let Some(pending) = unsafe { PENDING.get(tid) }.copied() {
        if pending.start_ns != 0 && pending.row.pid == tgid {
            count_untimed(&pending);
        }
        let _ = PENDING.remove(tid);
    }
    let gone = process_gone(&ctx, tid, tgid);
    if global(&SNAPSHOTS) != 0 {
        let _ = VCPU_OF.remove(tid);
        let _ = RUN_STARTED.remove(tid);
        if gone {
            let _ = VM_SYNTHETIC.remove(tgid);
        }
        if PENDING_READS.remove(tid).is_ok()
            && let Some(n) = REGS.get_ptr_mut(regs_slot::READS_OUTSTANDING)
        {
            // SAFETY: as in entry_snapshot: adding u32::MAX subtracts 1.
            unsafe {
                core::intrinsics::atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(n, u32::MAX)
            };
        }
    }
    // Its row is final (its last exit, if any, is counted above).
    thread_rows::thread_ended(tid);
    if gone {
        count_path::vm_ended(tgid);
    }
    if global(&FILTER_PIDS_ENABLED) != 0 && gone {
        // Fails (ENOENT) when the process was not traced.
        let _ = FILTER_PIDS.remove(tgid);
    }
    0
}

/// Counts synthetic exits: a vCPU thread that starts `vmx_vcpu_run()` again without a
/// `kvm_entry` since its last start made up an exit (INVALID_STATE, while the guest
/// state needs emulation) instead of entering the guest. Attached only with
/// snapshots, where `vmx_vcpu_run()` exists (kvm_intel loaded at attach).
#[kprobe]
pub fn vcpu_run_vmx(ctx: ProbeContext) -> u32 {
    let _ = ctx;
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !traced(tgid) {
        return 0;
    }
    if let Some(started) = RUN_STARTED.get_ptr_mut(tid) {
        // SAFETY: the thread's own entry.
        let synthetic = unsafe {
            let was = *started;
            *started = 1;
            was != 0
        };
        if synthetic && !shared_inc(&VM_SYNTHETIC, tgid) {
            count_drop(drop_kind::VM_MAP_FULL);
        }
    } else if RUN_STARTED.insert(tid, 1, u64::from(BPF_ANY)).is_err() {
        count_drop(drop_kind::READ_PENDING_FULL);
    }
    0
}

/// Whether the exiting thread is the last of its process: the record's `group_dead`
/// where the kernel has it (6.18 does, 6.1 does not), else whether it is the group
/// leader (a leader that ends before its other threads then ends the process's tracing
/// early).
#[inline(always)]
fn process_gone(ctx: &TracePointContext, tid: u32, tgid: u32) -> bool {
    let off = global(&EXIT_GROUP_DEAD_OFF);
    if off == NO_FIELD {
        return tid == tgid;
    }
    // SAFETY: offset from the format file; read_at checks bounds.
    // Unreadable: fall back to the leader test (at worst an entry stays a while).
    unsafe { ctx.read_at::<u8>(off as usize) }.map_or(tid == tgid, |group_dead| group_dead != 0)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
