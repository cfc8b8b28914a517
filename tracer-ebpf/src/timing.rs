//! The timing path: each exit is parked per CPU (or per thread once its thread
//! leaves the CPU) and counted with its handling time at its thread's next
//! `kvm_entry`, in the thread's row ([`thread_rows`], per VM or per vCPU) or, with
//! `--detail`, `--rip` or `--vcpu`, in its per-vCPU hash row.

use super::*;
use crate::{
    detail::{DETAIL_EXITS, count_rip, exit_detail},
    pending::{CPU_PENDING, PENDING},
    snapshots::{cpuid_snapshot, entry_snapshot},
};

/// Exits the per-vCPU map had no room for, per reason: the overflow, not the counts.
#[map]
pub(crate) static OVERFLOW_EXITS: PerCpuHashMap<PhaseExitKey, ExitStats> =
    PerCpuHashMap::with_max_entries(limits::MAX_OVERFLOW_ROWS, 0);

/// Every exit, per (phase, VM, vCPU, reason): count and handling time.
#[map]
pub(crate) static VCPU_EXITS: PerCpuHashMap<PhaseVcpuKey, ExitStats> =
    PerCpuHashMap::with_max_entries(limits::MAX_VCPU_ROWS, 0);

/// kvmtrace's latency histogram: exits per log2 bucket of handling time, per thread
/// row cell ([`thread_rows::cell`]): an array, so an entry needs no hash lookup
/// for it. (Not the kernel's hist trigger, which the lab compares with.)
#[map]
pub(crate) static LATENCY_CELLS: PerCpuArray<[u64; limits::HIST_BUCKETS as usize]> =
    PerCpuArray::with_max_entries(rows::CELLS, 0);

/// The power of two above [`limits::HIST_BUCKETS`], for the verifier's mask.
pub(crate) const HIST_BUCKETS_POW2: u32 = 64;

/// The same for reasons without a cell (failed VM entries, unknown codes), per
/// (reason, bucket).
#[map]
pub(crate) static LATENCY_HIST: PerCpuHashMap<HistKey, u64> =
    PerCpuHashMap::with_max_entries(limits::MAX_HIST_ROWS, 0);

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
    on_exit(now, &exit);
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
        let vcpu_id = || {
            if global(&VCPU_ROWS) == 0 {
                return count::ALL_VCPUS;
            }
            count_path::vcpu_id_of(vcpu).unwrap_or(count::ALL_VCPUS)
        };
        // This program runs only where no snapshot needs the RIP (the layout is known).
        vm_exit(now, isa, raw_reason, vcpu_id, || 0);
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
    on_exit(now, &exit);
    0
}

/// One exit, from the record or from the vCPU.
pub(crate) struct Exit<'a> {
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
pub(crate) fn vm_exit(
    now: u64,
    isa: u32,
    raw_reason: u32,
    vcpu_id: impl FnOnce() -> u32,
    guest_rip: impl FnOnce() -> u64,
) {
    let Some(me) = thread_rows::current(vcpu_id) else {
        // Not traced.
        return;
    };
    if global(&SNAPSHOTS) != 0 {
        let vm = VmExitKey {
            pid: me.tgid,
            exit: ExitKey::from_raw(isa, raw_reason),
        };
        vm_rows::count_for_snapshots(me.tgid, me.phase, isa, raw_reason);
        cpuid_snapshot(me.tid, &vm, guest_rip());
    }
    if me.slot == rows::FULL_SLOT {
        count_drop(drop_kind::COUNT_SLOTS_FULL);
    }
    let row = PhaseVcpuKey::new(
        me.phase,
        &VcpuKey {
            pid: me.tgid,
            reuse: 0,
            vcpu_id: me.vcpu_id,
            exit: ExitKey::from_raw(isa, raw_reason),
        },
    );
    let Some(slot) = CPU_PENDING.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, as in `on_exit`.
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
pub(crate) fn on_exit(now: u64, ex: &Exit<'_>) {
    // Only snapshots and `--rip` need the RIP: assembled for them alone, from the
    // record (the raw program runs only where neither needs it: 0).
    let guest_rip = || {
        let at =
            (global(&EXIT_RIP_OFF) / 4) as usize & ((limits::EXIT_FIELDS_BYTES / 4 - 2) as usize);
        ex.fields
            .map_or(0, |f| u64::from(f[at]) | (u64::from(f[at + 1]) << 32))
    };
    if global(&VM_TIME) != 0 {
        let vcpu_id = || {
            if global(&VCPU_ROWS) == 0 {
                count::ALL_VCPUS
            } else {
                ex.vcpu_id
            }
        };
        vm_exit(now, ex.isa, ex.raw_reason, vcpu_id, guest_rip);
        return;
    }
    let Some((tgid, tid)) = traced_current() else {
        return;
    };
    let (raw_reason, isa, vcpu_id) = (ex.raw_reason, ex.isa, ex.vcpu_id);
    let vcpu_filter = global(&VCPU_FILTER);
    if vcpu_filter != u32::MAX && vcpu_filter != vcpu_id {
        return;
    }
    let exit = ExitKey::from_raw(isa, raw_reason);
    let vcpu = VcpuKey {
        pid: tgid,
        reuse: 0,
        vcpu_id,
        exit,
    };
    let phase = PHASE.get(0).copied().unwrap_or(0);
    let row = PhaseVcpuKey::new(phase, &vcpu);
    let one = untimed_one();
    if global(&SNAPSHOTS) != 0 {
        let vm = VmExitKey { pid: tgid, exit };
        vm_rows::count_for_snapshots(tgid, phase, isa, raw_reason);
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
pub(crate) fn count_row(row: &PhaseVcpuKey, stats: &ExitStats) {
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
pub(crate) fn count_untimed(pending: &PendingExit) {
    count_exit(pending, &untimed_one());
}

/// Counts a parked exit with `stats`: in its VM slot's cell on the per-VM timing path
/// (or, for a reason without a cell, in its VM's row), else in its vCPU's row.
#[inline(always)]
pub(crate) fn count_exit(pending: &PendingExit, stats: &ExitStats) {
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
pub(crate) fn untimed_one() -> ExitStats {
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
    on_entry();
    0
}

#[inline(always)]
pub(crate) fn on_entry() {
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
        if !add_stats(&DETAIL_EXITS, &detail, &timed) {
            count_drop(drop_kind::DETAIL_MAP_FULL);
        }
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
