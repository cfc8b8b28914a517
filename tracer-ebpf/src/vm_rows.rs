//! `--snapshots`' VM rows: the per-VM counts a guest counter read is compared with.
//!
//! A read asks for its whole VM's count at that instant, so the count must be one
//! place: a row per VM (not per thread, not per CPU), its cells those of a thread row
//! ([`thread_rows::cell`]) plus the VM's total. The VM's vCPU threads add to it
//! atomically: the only contention is between the vCPUs of one VM, never across VMs.
//! Kernel memory is one row per VM slot, whatever the CPU count.
//!
//! A VM takes a slot on its first exit, from a queue of free slots that user space
//! fills; when the VM ends its slot goes on the queue of ended slots, and user space
//! zeroes the row and frees the slot once the process is reaped. A VM that finds no
//! free slot has no row: its guest reads are counted as lost snapshots
//! (`drop_kind::SNAPSHOT_LOST`), never compared with another VM's counts.
//!
//! The all-VMs count is a per-CPU cell, summed over CPUs at a read; kernels before
//! 5.19 have no helper to read another CPU's value, and there (`SUM_PER_CPU` = 0) it
//! is one cell shared by all CPUs.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    cty::c_void,
    helpers::bpf_map_lookup_percpu_elem,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, Queue, Stack},
};
use core::intrinsics::AtomicOrdering;
use tracer_common::{
    ExitKey, PhaseVcpuKey, VcpuKey,
    count::{self, CachedSlot},
    drop_kind, limits,
    rows::{self, FULL_SLOT},
    vm_totals_key,
};

use crate::{PHASE, count_drop, epoch, global, shared_add, thread_rows};

/// Possible CPUs: a read sums the all-VMs cells of CPUs `0..NR_CPUS`.
#[unsafe(no_mangle)]
static NR_CPUS: u32 = 1;
/// 1 when the kernel has `bpf_map_lookup_percpu_elem` (5.19+): the all-VMs count is
/// per CPU. 0: it is `SHARED_ALL`. The loader sets it, and the verifier drops the
/// branch not taken (read-only data), so an older kernel never sees the helper.
#[unsafe(no_mangle)]
static SUM_PER_CPU: u32 = 1;

/// With snapshots, the ended VMs' exits ([`vm_totals_key::ENDED`]), added once per
/// VM when it ends. (A VM's own counts are its row.)
#[map]
pub(crate) static VM_TOTALS: HashMap<u32, u64> = HashMap::with_max_entries(limits::MAX_VMS, 0);

/// Per VM slot: exits per thread-row cell, added to atomically by the VM's vCPUs.
/// Slot 0 is never used (a VM without a slot has no row).
#[map]
static VM_ROWS: Array<[u64; rows::CELLS as usize]> =
    Array::with_max_entries(limits::MAX_VMS + 1, 0);
/// Per VM slot: all of the VM's exits.
#[map]
static VM_EXITS: Array<u64> = Array::with_max_entries(limits::MAX_VMS + 1, 0);
/// Free VM slots (1..), filled by user space at load and as it frees ended ones: a
/// stack, as the thread rows' free slots.
#[map]
static VM_FREE: Stack<u32> = Stack::with_max_entries(limits::MAX_VMS, 0);
/// Slots whose VM has ended, for user space to zero and free once it is reaped.
#[map]
static VM_ENDED: Queue<u32> = Queue::with_max_entries(limits::MAX_VMS, 0);
/// (phase, tgid) -> its slot, while the VM runs.
#[map]
static VM_SLOTS: HashMap<u64, u32> = HashMap::with_max_entries(limits::MAX_VMS, 0);
/// Slot -> the (phase, tgid) that holds it, for user space; removed when it frees it.
#[map]
static SLOT_OWNERS: HashMap<u32, u64> = HashMap::with_max_entries(limits::MAX_VMS, 0);
/// Per (VM slot, reason), for the reasons without a cell: exits, added to atomically.
/// The key is a `PhaseVcpuKey` whose `pid` is the VM's slot (one VM's lifetime) and
/// whose phase is 0; user space removes a slot's entries when it frees the slot. (Not
/// the count path's overflow map: the report reads that one as rows.)
#[map]
static VM_OVERFLOW: HashMap<PhaseVcpuKey, u64> =
    HashMap::with_max_entries(limits::MAX_OVERFLOW_ROWS, 0);
/// Slot 0 of each CPU: every traced VM's exits on this CPU (`SUM_PER_CPU` = 1).
#[map]
static ALL_EXITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// Slot 0: every traced VM's exits (`SUM_PER_CPU` = 0), added to atomically.
#[map]
static SHARED_ALL: Array<u64> = Array::with_max_entries(1, 0);
/// Slot 0 of each CPU: the VM this CPU counted last.
#[map]
static CPU_SLOT: PerCpuArray<CachedSlot> = PerCpuArray::with_max_entries(1, 0);

/// Counts the current thread's exit in its VM's row and in the all-VMs count. The
/// caller has checked that the pid filter traces it, and passes the VM (`tgid`) and
/// the phase it already read.
#[inline(always)]
pub fn count_for_snapshots(tgid: u32, phase: u32, exit_isa: u32, raw: u32) {
    let slot = vm_slot_of(tgid, phase);
    if slot != FULL_SLOT {
        add(slot, exit_isa, raw);
    }
    if global(&SUM_PER_CPU) == 0 {
        if let Some(all) = SHARED_ALL.get_ptr_mut(0) {
            // SAFETY: a live map value other CPUs add to.
            unsafe {
                core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(all, 1)
            };
        }
    } else if let Some(all) = ALL_EXITS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, no other writer.
        unsafe { *all += 1 };
    }
}

/// Adds one exit to `slot`'s total and cell; a reason without a cell goes to the
/// count path's overflow map under its VM.
#[inline(always)]
fn add(slot: u32, exit_isa: u32, raw: u32) {
    if let Some(total) = VM_EXITS.get_ptr_mut(slot) {
        // SAFETY: a live map value the VM's other vCPUs add to.
        unsafe { core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(total, 1) };
    }
    let c = thread_rows::cell(exit_isa, raw);
    if c >= rows::CELLS {
        if !shared_add(&VM_OVERFLOW, overflow_key(slot, exit_isa, raw), 1) {
            count_drop(drop_kind::VM_MAP_FULL);
        }
        return;
    }
    let Some(row) = VM_ROWS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: a live map value the VM's other vCPUs add to. The index is masked after
    // a volatile read, so LLVM keeps the mask that shows the verifier the bound.
    unsafe {
        let i = core::ptr::read_volatile(&c) & (rows::CELLS - 1);
        core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &mut (*row)[i as usize],
            1,
        );
    }
}

/// VM `tgid`'s slot in `phase` ([`FULL_SLOT`] when none was free), cached per CPU.
#[inline(always)]
fn vm_slot_of(tgid: u32, phase: u32) -> u32 {
    let epoch = epoch::epoch();
    let Some(cache) = CPU_SLOT.get_ptr_mut(0) else {
        return FULL_SLOT;
    };
    // SAFETY: this CPU's slot; only programs on this CPU use it, one at a time.
    let cached = unsafe { *cache };
    if cached.tgid == tgid && cached.phase == phase && cached.epoch == epoch {
        return cached.slot;
    }
    let slot = take_slot(count::slot_key(phase, tgid));
    // SAFETY: as above.
    unsafe {
        *cache = CachedSlot {
            tgid,
            phase,
            epoch,
            slot,
        }
    };
    slot
}

/// The VM's slot, taking a free one on its first exit; [`FULL_SLOT`] when none is
/// free (it tries again after the next VM ends).
#[inline(always)]
fn take_slot(key: u64) -> u32 {
    // SAFETY: the value is copied out.
    if let Some(&slot) = unsafe { VM_SLOTS.get(key) } {
        return slot;
    }
    let Ok(Some(slot)) = VM_FREE.pop() else {
        return FULL_SLOT;
    };
    // The slot is this thread's alone until it is in VM_SLOTS: its owner first, so
    // that user space never sees a taken slot without one.
    if SLOT_OWNERS.insert(slot, key, u64::from(BPF_ANY)).is_ok()
        && VM_SLOTS.insert(key, slot, u64::from(BPF_NOEXIST)).is_ok()
    {
        return slot;
    }
    // Another vCPU thread of this VM took a slot first: this one goes back.
    let _ = SLOT_OWNERS.remove(slot);
    let _ = VM_FREE.push(slot, 0);
    // SAFETY: the value is copied out.
    unsafe { VM_SLOTS.get(key) }.copied().unwrap_or(FULL_SLOT)
}

/// VM `pid`'s counts now: exits of `(isa, reason)` (a reason number the guest asked
/// about), all its exits, and all traced VMs' exits. `None` when the VM has no row
/// (no slot was free): the caller counts its read as lost.
#[inline(always)]
pub fn vm_counts(pid: u32, exit_isa: u32, reason: u32) -> Option<(u64, u64, u64)> {
    let phase = PHASE.get(0).copied().unwrap_or(0);
    // SAFETY: the value is copied out.
    let slot = unsafe { VM_SLOTS.get(count::slot_key(phase, pid)) }.copied()?;
    let total = VM_EXITS.get(slot).copied()?;
    let c = thread_rows::cell(exit_isa, reason);
    let of_reason = if c < rows::CELLS {
        // SAFETY: a volatile read of a local, masked as in `add`.
        let i = unsafe { core::ptr::read_volatile(&c) } & (rows::CELLS - 1);
        VM_ROWS.get(slot)?[i as usize]
    } else {
        // SAFETY: the value is copied out.
        unsafe { VM_OVERFLOW.get(overflow_key(slot, exit_isa, reason)) }
            .copied()
            .unwrap_or(0)
    };
    Some((of_reason, total, all_exits()))
}

/// `VM_OVERFLOW`'s key of a reason without a cell in VM slot `slot`.
#[inline(always)]
fn overflow_key(slot: u32, exit_isa: u32, raw: u32) -> PhaseVcpuKey {
    PhaseVcpuKey::new(
        0,
        &VcpuKey {
            pid: slot,
            reuse: 0,
            vcpu_id: count::ALL_VCPUS,
            exit: ExitKey::from_raw(exit_isa, raw),
        },
    )
}

/// Every traced VM's exits so far.
#[inline(always)]
fn all_exits() -> u64 {
    if global(&SUM_PER_CPU) == 0 {
        return SHARED_ALL.get(0).copied().unwrap_or(0);
    }
    let (mut all, zero, nr_cpus) = (0u64, 0u32, global(&NR_CPUS));
    for cpu in 0..count::MAX_CPUS {
        if cpu >= nr_cpus {
            break;
        }
        // SAFETY: the helper returns this CPU's value of the entry, or null; the map
        // is passed as the loader relocates it.
        unsafe {
            let n = bpf_map_lookup_percpu_elem(
                core::ptr::addr_of!(ALL_EXITS).cast_mut().cast::<c_void>(),
                core::ptr::from_ref(&zero).cast::<c_void>(),
                cpu,
            )
            .cast::<u64>();
            if !n.is_null() {
                all += *n;
            }
        }
    }
    all
}

/// A process has ended: if it was a VM with a row, the row is final. Its total joins
/// the ended VMs' (later reads tell counts carried over from ended VMs apart), its
/// key leaves `VM_SLOTS` (a later process with the same pid gets a new slot), its
/// slot goes to user space, and the epoch empties every CPU's cache.
#[inline(always)]
pub fn vm_ended(tgid: u32) {
    let key = count::slot_key(PHASE.get(0).copied().unwrap_or(0), tgid);
    // SAFETY: the value is copied out.
    let Some(&slot) = (unsafe { VM_SLOTS.get(key) }) else {
        return;
    };
    let total = VM_EXITS.get(slot).copied().unwrap_or(0);
    if !shared_add(&VM_TOTALS, vm_totals_key::ENDED, total) {
        count_drop(drop_kind::VM_MAP_FULL);
    }
    let _ = VM_SLOTS.remove(key);
    // The queue holds every slot: a slot is ended once before it is free again.
    let _ = VM_ENDED.push(slot, 0);
    epoch::bump_epoch();
}
