//! Thread rows ([`tracer_common::rows`]): each traced vCPU thread counts its exits in a
//! row of its own, which only it writes, so the adds are plain and the rows are not
//! copied per CPU. The row's slot is cached per CPU (`CPU_THREAD`): a hash lookup only
//! when this CPU last ran another thread, or after a thread ended somewhere.
//!
//! Slot 0 is shared by the threads that found no free slot: its adds are atomic, and
//! each of its exits is counted in `drop_kind::COUNT_SLOTS_FULL` too.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, Queue, Stack},
};
use core::intrinsics::AtomicOrdering;
use tracer_common::{
    ExitStats, drop_kind, isa, limits,
    rows::{self, CachedThread, FULL_SLOT, NOT_TRACED, ThreadOwner, ThreadSlot},
};

use crate::{PHASE, count_drop, epoch, global, traced};

/// The ISA whose reasons have cells ([`rows::cell`]): the host's, set by the loader.
#[unsafe(no_mangle)]
static CELL_ISA: u32 = isa::VMX;

/// vCPU thread id -> its slot, while the thread lives.
#[map]
static THREAD_SLOTS: HashMap<u32, ThreadSlot> = HashMap::with_max_entries(limits::MAX_THREADS, 0);
/// Slot -> the thread that holds it, for user space; removed when user space frees it.
#[map]
static SLOT_THREADS: HashMap<u32, ThreadOwner> = HashMap::with_max_entries(limits::MAX_THREADS, 0);
/// VM process (tgid) -> when it first took a slot, while it lives: what tells it from
/// a later process with the same pid. As many entries as slots: a process in it took
/// a slot, and leaves it when it ends.
#[map]
static VM_BORN: HashMap<u32, u64> = HashMap::with_max_entries(limits::MAX_THREADS, 0);
/// Free slots (1..), filled by user space at load and as it frees ended ones: a
/// stack, so a freed slot is the next one taken (its row is warm, and reuse is the
/// common case, not a rare one).
#[map]
static FREE_SLOTS: Stack<u32> = Stack::with_max_entries(limits::MAX_THREADS, 0);
/// Slots whose thread has ended: their rows are final, for user space to read.
#[map]
static ENDED_SLOTS: Queue<u32> = Queue::with_max_entries(limits::MAX_THREADS, 0);
/// The count path's rows: exits per cell.
#[map]
static COUNT_ROWS: Array<[u64; rows::CELLS as usize]> =
    Array::with_max_entries(limits::MAX_THREADS + 1, 0);
/// The per-VM timing path's rows: exits and their handling time per cell.
#[map]
static TIME_ROWS: Array<[ExitStats; rows::CELLS as usize]> =
    Array::with_max_entries(limits::MAX_THREADS + 1, 0);
/// Slot 0 of each CPU: the thread this CPU counted last.
#[map]
static CPU_THREAD: PerCpuArray<CachedThread> = PerCpuArray::with_max_entries(1, 0);

/// The cell of a raw exit in a thread row, or [`rows::NONE`].
#[inline(always)]
pub fn cell(exit_isa: u32, raw: u32) -> u32 {
    rows::cell(global(&CELL_ISA), exit_isa, raw)
}

/// The current thread, with its slot; `None` when the pid filter does not trace it.
/// `vcpu_id` is asked for only when the thread takes a slot.
#[inline(always)]
pub fn current(vcpu_id: impl FnOnce() -> u32) -> Option<CachedThread> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let phase = PHASE.get(0).copied().unwrap_or(0);
    let epoch = epoch::epoch();
    let cache = CPU_THREAD.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; only programs on this CPU use it, one at a time.
    let cached = unsafe { *cache };
    if cached.tid == tid && cached.tgid == tgid && cached.phase == phase && cached.epoch == epoch {
        return (cached.slot != NOT_TRACED).then_some(cached);
    }
    let mut now = CachedThread {
        tid,
        phase,
        epoch,
        slot: NOT_TRACED,
        vcpu_id: 0,
        tgid,
    };
    if traced(tgid) {
        let taken = take(tid, tgid, phase, vcpu_id);
        now.slot = taken.slot;
        now.vcpu_id = taken.vcpu_id;
    }
    // SAFETY: as above.
    unsafe { *cache = now };
    (now.slot != NOT_TRACED).then_some(now)
}

/// The thread's slot in `phase`, taking a free one on its first exit; slot 0 when
/// none is free (it tries again after the next thread ends).
#[inline(always)]
fn take(tid: u32, tgid: u32, phase: u32, vcpu_id: impl FnOnce() -> u32) -> ThreadSlot {
    // SAFETY: the value is copied out.
    if let Some(have) = unsafe { THREAD_SLOTS.get(tid) }.copied() {
        if have.phase == phase && have.tgid == tgid {
            return have;
        }
        // Its row of an earlier phase (a VMM that outlived a module reload) is final.
        end_slot(have.slot);
        let _ = THREAD_SLOTS.remove(tid);
    }
    let vcpu_id = vcpu_id();
    let full = ThreadSlot {
        slot: FULL_SLOT,
        phase,
        tgid,
        vcpu_id,
    };
    let Ok(Some(slot)) = FREE_SLOTS.pop() else {
        return full;
    };
    let owner = ThreadOwner {
        phase,
        tgid,
        tid,
        vcpu_id,
        born_ns: born(tgid),
    };
    let mine = ThreadSlot { slot, ..full };
    if SLOT_THREADS
        .insert(slot, owner, u64::from(BPF_ANY))
        .is_err()
        || THREAD_SLOTS.insert(tid, mine, u64::from(BPF_ANY)).is_err()
    {
        // Cannot happen (both hold as many entries as there are slots): the slot goes
        // back, and the thread counts in slot 0 meanwhile.
        let _ = SLOT_THREADS.remove(slot);
        let _ = FREE_SLOTS.push(slot, 0);
        return full;
    }
    mine
}

/// When process `tgid` first took a slot: noted by its first thread to take one (its
/// other threads find it). 0 when `VM_BORN` is full.
#[inline(always)]
fn born(tgid: u32) -> u64 {
    // SAFETY: the value is copied out.
    if let Some(&ns) = unsafe { VM_BORN.get(tgid) } {
        return ns;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if VM_BORN.insert(tgid, now, u64::from(BPF_NOEXIST)).is_ok() {
        return now;
    }
    // Another thread of the process noted it first, or the map is full.
    // SAFETY: as above.
    match unsafe { VM_BORN.get(tgid) } {
        Some(&ns) => ns,
        None => {
            count_drop(drop_kind::VM_MAP_FULL);
            0
        }
    }
}

/// Process `tgid` has ended: a later process with its pid is another VM.
#[inline(always)]
pub fn vm_gone(tgid: u32) {
    // Fails (ENOENT) for a process that took no slot.
    let _ = VM_BORN.remove(tgid);
}

/// Hands an ended thread's slot to user space.
#[inline(always)]
fn end_slot(slot: u32) {
    if slot != FULL_SLOT {
        // The queue holds every slot: a slot is ended once before it is free again.
        let _ = ENDED_SLOTS.push(slot, 0);
    }
}

/// The thread `tid` has ended: its row is final. Other CPUs' caches are emptied (the
/// thread id may come back as another VM's thread).
#[inline(always)]
pub fn thread_ended(tid: u32) {
    // SAFETY: the value is copied out.
    let Some(have) = (unsafe { THREAD_SLOTS.get(tid) }).copied() else {
        return;
    };
    end_slot(have.slot);
    let _ = THREAD_SLOTS.remove(tid);
    epoch::bump_epoch();
}

/// Counts one exit in cell `c` (below [`rows::CELLS`]) of `slot`'s count row. Only
/// the slot's thread writes a row, except slot 0, which is added to atomically.
#[inline(always)]
pub fn add_count(slot: u32, c: u32) {
    let Some(row) = COUNT_ROWS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: a live map value; its thread is its only writer (slot 0: atomic). The
    // index is masked after a volatile read, so LLVM keeps the mask the verifier needs.
    unsafe {
        let i = core::ptr::read_volatile(&c) & (rows::CELLS - 1);
        let n = &mut (*row)[i as usize];
        if slot == FULL_SLOT {
            core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, 1);
        } else {
            *n += 1;
        }
    }
}

/// Adds `stats` to cell `c` of `slot`'s time row. `own`: the caller is the slot's
/// thread; otherwise (and in slot 0) the adds are atomic.
#[inline(always)]
pub fn add_time(slot: u32, c: u32, stats: &ExitStats, own: bool) {
    let Some(row) = TIME_ROWS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: as in `add_count`.
    unsafe {
        let i = core::ptr::read_volatile(&c) & (rows::CELLS - 1);
        let s = &mut (*row)[i as usize];
        if own && slot != FULL_SLOT {
            s.count += stats.count;
            s.timed += stats.timed;
            s.time_ns += stats.time_ns;
        } else {
            // A zero is not added: LLVM turns an atomic add of 0 into an atomic OR,
            // which kernels before 5.12 reject (an untimed exit adds 0 time).
            if stats.count != 0 {
                core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                    &mut s.count,
                    stats.count,
                );
            }
            if stats.timed != 0 {
                core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                    &mut s.timed,
                    stats.timed,
                );
            }
            if stats.time_ns != 0 {
                core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                    &mut s.time_ns,
                    stats.time_ns,
                );
            }
        }
        // Shared slot: a racing larger max may be lost; the count and time are not.
        if stats.max_ns > s.max_ns {
            s.max_ns = stats.max_ns;
        }
    }
}
