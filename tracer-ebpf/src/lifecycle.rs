//! Processes and phases: each load of a kvm vendor module starts a phase, child
//! processes of traced processes join the pid filter, and an exiting thread's
//! pending exit, row and entries are finished.

use super::*;
use crate::{
    pending::{CPU_PENDING, PENDING},
    snapshots::{PENDING_READS, REGS, RUN_STARTED, VCPU_OF, VM_SYNTHETIC},
    timing::count_untimed,
};

/// Starts a new phase when kvm_intel or kvm_amd is loaded. It runs before the module's
/// init, so before any exit of a VM under the new load.
#[tracepoint(category = "module", name = "module_load")]
pub fn module_load(ctx: TracePointContext) -> u32 {
    // SAFETY: offset from the format file; read_at checks bounds.
    let Ok(loc) = (unsafe { ctx.read_at::<u32>(global(&MODULE_NAME_OFF) as usize) }) else {
        count_drop(drop_kind::RECORD_LOST);
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
        on_newtask(&ctx);
    }
    0
}

#[inline(always)]
pub(crate) fn on_newtask(ctx: &TracePointContext) {
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
        thread_rows::vm_gone(tgid);
        vm_rows::vm_ended(tgid);
    }
    if global(&FILTER_PIDS_ENABLED) != 0 && gone {
        // Fails (ENOENT) when the process was not traced.
        let _ = FILTER_PIDS.remove(tgid);
    }
    0
}

/// Whether the exiting thread is the last of its process: the record's `group_dead`
/// where the kernel has it (6.18 does, 6.1 does not), else whether it is the group
/// leader (a leader that ends before its other threads then ends the process's tracing
/// early).
#[inline(always)]
pub(crate) fn process_gone(ctx: &TracePointContext, tid: u32, tgid: u32) -> bool {
    let off = global(&EXIT_GROUP_DEAD_OFF);
    if off == NO_FIELD {
        return tid == tgid;
    }
    // SAFETY: offset from the format file; read_at checks bounds.
    // Unreadable: fall back to the leader test (at worst an entry stays a while).
    unsafe { ctx.read_at::<u8>(off as usize) }.map_or(tid == tgid, |group_dead| group_dead != 0)
}
