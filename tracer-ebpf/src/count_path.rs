//! The count path: `record --counts-only`, `top`, and `export` without `--time`.
//!
//! One program per exit, and per exit: two array reads (the phase, the cache epoch),
//! this CPU's cached thread slot, the exit reason, and one plain add to a cell of the
//! thread's own row ([`thread_rows`]). No clock, no hash lookup on the way: the
//! thread's slot is looked up (and taken on its first exit) only when this CPU last
//! counted another thread.
//!
//! Where the vendor module's BTF gave the layout (the loader checks it against the
//! tracepoint's prototype and the hardware's VMCB), the program is a raw tracepoint
//! and reads the reason from the vCPU itself, so the kernel does not build the
//! `kvm_exit` record. Otherwise the classic tracepoint's record gives it.
//!
//! Snapshots (`--snapshots`) keep per-VM cells here too, in VM slots: each exit adds
//! to them, and to the VM's total cell and this CPU's all-VMs count, without a hash
//! lookup or a shared atomic; a guest counter read sums them over CPUs
//! ([`vm_counts`]). Kernels before 5.19 have no helper to read another CPU's value:
//! there (`SUM_PER_CPU` = 0) each exit also adds to the VM's shared cells,
//! atomically, and a read takes those.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    cty::c_void,
    helpers::{bpf_get_current_pid_tgid, bpf_map_lookup_percpu_elem, bpf_probe_read_kernel},
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::{RawTracePointContext, TracePointContext},
};
use core::intrinsics::AtomicOrdering;
use tracer_common::{
    ExitKey, NO_FIELD, PhaseVcpuKey, VcpuKey,
    count::{self, CachedSlot},
    drop_kind, isa, limits,
};

use crate::{
    EXIT_FIELDS_OFF, EXIT_ISA_OFF, EXIT_REASON_OFF, PHASE, SNAPSHOTS, VM_TOTALS, count_drop,
    global, shared_add, thread_rows, traced,
};
use tracer_common::rows::{self, CachedThread};
use tracer_common::vm_totals_key;

#[unsafe(no_mangle)]
static VMX_EXIT_REASON_OFF: u32 = NO_FIELD;
#[unsafe(no_mangle)]
static SVM_VMCB_OFF: u32 = NO_FIELD;
/// Offset of `vcpu_id` in `struct kvm_vcpu` (the timing path's raw exit).
#[unsafe(no_mangle)]
static VCPU_ID_OFF: u32 = NO_FIELD;
/// Possible CPUs: a counter read sums the per-CPU cells of CPUs `0..NR_CPUS`.
#[unsafe(no_mangle)]
static NR_CPUS: u32 = 1;
/// 1 when the kernel has `bpf_map_lookup_percpu_elem` (5.19+): a counter read sums
/// the per-CPU cells. 0: it reads `SHARED_CELLS`, which each exit also adds to. The
/// loader sets it, and the verifier drops the branch not taken (read-only data), so
/// an older kernel never sees the helper.
#[unsafe(no_mangle)]
static SUM_PER_CPU: u32 = 1;

/// `struct vmcb_control_area.exit_code`: fixed by the hardware (AMD APM vol. 2,
/// appendix B), at the start of the VMCB. The loader checks the BTF agrees.
const VMCB_EXIT_CODE: u64 = 0x70;

/// Per VM slot, per CPU: exits per dense reason cell ([`count::dense_index`]).
#[map]
pub static COUNTS: PerCpuArray<[u64; count::CELLS as usize]> =
    PerCpuArray::with_max_entries(count::MAX_VMS, 0);
/// Per VM slot, shared by all CPUs, only with snapshots where `SUM_PER_CPU` is 0:
/// the same cells as `COUNTS`, added to atomically.
#[map]
static SHARED_CELLS: Array<[u64; count::CELLS as usize]> =
    Array::with_max_entries(count::MAX_VMS, 0);
/// Slot 0, as `SHARED_CELLS`: every traced VM's exits.
#[map]
static SHARED_ALL: Array<u64> = Array::with_max_entries(1, 0);
/// Exits whose reason has no cell (rare), per (phase, VM, reason), added to
/// atomically; `vcpu_id` is `ALL_VCPUS`.
#[map]
static COUNT_OVERFLOW: HashMap<PhaseVcpuKey, u64> =
    HashMap::with_max_entries(limits::MAX_OVERFLOW_ROWS, 0);
/// (phase, tgid) -> its slot, while the VM runs.
#[map]
static VM_SLOTS: HashMap<u64, u32> = HashMap::with_max_entries(count::MAX_VMS, 0);
/// Slot -> the (phase, tgid) that took it: an insert here is how a slot is taken.
/// User space removes the entry once it has read an ended VM's cells.
#[map]
static SLOT_OWNERS: HashMap<u32, u64> = HashMap::with_max_entries(count::MAX_VMS, 0);
/// Slot -> 1 once its VM has ended (its cells are final).
#[map]
static SLOT_ENDED: Array<u32> = Array::with_max_entries(count::MAX_VMS, 0);
/// Slot 0: bumped whenever a cached slot may have become wrong (a VM ended, the pid
/// filter grew); a cache entry of another epoch is not used.
#[map]
static COUNT_EPOCH: Array<u32> = Array::with_max_entries(1, 0);
/// Slot 0 of each CPU, with snapshots: every traced VM's exits on this CPU.
#[map]
static ALL_EXITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// Slot 0 of each CPU: the VM this CPU counted last.
#[map]
static CPU_SLOT: PerCpuArray<CachedSlot> = PerCpuArray::with_max_entries(1, 0);

/// The raw tracepoint: `kvm_exit(struct kvm_vcpu *vcpu, u32 isa)` since 5.11.
#[raw_tracepoint(tracepoint = "kvm_exit")]
pub fn kvm_exit_count(ctx: RawTracePointContext) -> u32 {
    let Some(me) = thread_rows::current(|| count::ALL_VCPUS) else {
        return 0;
    };
    let vcpu: u64 = ctx.arg(0);
    let exit_isa = ctx.arg::<u64>(1) as u32;
    match reason_of(vcpu, exit_isa) {
        Some(raw) => count_in_row(&me, exit_isa, raw),
        None => count_drop(drop_kind::READ_FAILED),
    }
    0
}

/// Counts one exit of the current thread in its row, or, for a reason without a
/// cell, in the overflow map under its VM.
#[inline(always)]
fn count_in_row(me: &CachedThread, exit_isa: u32, raw: u32) {
    if me.slot == rows::FULL_SLOT {
        count_drop(drop_kind::COUNT_SLOTS_FULL);
    }
    let c = thread_rows::cell(exit_isa, raw);
    if c < rows::CELLS {
        thread_rows::add_count(me.slot, c);
        return;
    }
    overflow_add(me.phase, me.tgid, exit_isa, raw);
}

/// The reason, read from the vCPU: `vcpu_vmx.exit_reason`, or
/// `vcpu_svm.vmcb->control.exit_code`.
#[inline(always)]
pub fn reason_of(vcpu: u64, exit_isa: u32) -> Option<u32> {
    let (vmx, svm) = (global(&VMX_EXIT_REASON_OFF), global(&SVM_VMCB_OFF));
    if exit_isa == isa::VMX && vmx != NO_FIELD {
        // SAFETY: a probe read: a bad address fails, it does not fault.
        return unsafe { bpf_probe_read_kernel((vcpu + u64::from(vmx)) as *const u32) }.ok();
    }
    if exit_isa == isa::SVM && svm != NO_FIELD {
        // SAFETY: as above.
        let vmcb = unsafe { bpf_probe_read_kernel((vcpu + u64::from(svm)) as *const u64) }.ok()?;
        // SAFETY: as above.
        return unsafe { bpf_probe_read_kernel((vmcb + VMCB_EXIT_CODE) as *const u32) }.ok();
    }
    None
}

/// The vCPU's `vcpu_id`, as `kvm:kvm_exit` reports it.
#[inline(always)]
pub fn vcpu_id_of(vcpu: u64) -> Option<u32> {
    let off = global(&VCPU_ID_OFF);
    if off == NO_FIELD {
        return None;
    }
    // SAFETY: a probe read: a bad address fails, it does not fault.
    unsafe { bpf_probe_read_kernel((vcpu + u64::from(off)) as *const u32) }.ok()
}

/// The classic tracepoint, where the vendor module has no BTF: the reason and isa
/// from the record.
#[tracepoint(category = "kvm", name = "kvm_exit")]
pub fn kvm_exit_count_tp(ctx: TracePointContext) -> u32 {
    let Some(me) = thread_rows::current(|| count::ALL_VCPUS) else {
        return 0;
    };
    // SAFETY: the offsets come from the format file; read_at checks them.
    let fields = unsafe {
        ctx.read_at::<[u32; (limits::EXIT_FIELDS_BYTES / 4) as usize]>(
            global(&EXIT_FIELDS_OFF) as usize
        )
    };
    let Ok(fields) = fields else {
        count_drop(drop_kind::READ_FAILED);
        return 0;
    };
    let field = |off: &'static u32| {
        fields[(global(off) / 4) as usize & ((limits::EXIT_FIELDS_BYTES / 4 - 1) as usize)]
    };
    count_in_row(&me, field(&EXIT_ISA_OFF), field(&EXIT_REASON_OFF));
    0
}

/// The timing path with snapshots: counts the current VM's exit in its cells, its
/// total cell and this CPU's all-VMs count, for [`vm_counts`].
#[inline(always)]
pub fn count_for_snapshots(exit_isa: u32, raw: u32) {
    let Some(slot) = vm_slot() else { return };
    add(slot, exit_isa, raw);
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

/// Where `SUM_PER_CPU` is 0, with snapshots: adds the exit to the slot's shared
/// total cell and reason cell.
#[inline(always)]
fn add_shared(slot: u32, cell: u32) {
    let Some(cells) = SHARED_CELLS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: a live map value other CPUs add to; the index is masked as in `add`.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &mut (*cells)[count::TOTAL as usize],
            1,
        );
        if cell < count::CELLS {
            let i = core::ptr::read_volatile(&cell) & (count::CELLS - 1);
            core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &mut (*cells)[i as usize],
                1,
            );
        }
    }
}

/// The epoch of the cached VM slots and thread slots (see `COUNT_EPOCH`).
#[inline(always)]
pub fn epoch() -> u32 {
    COUNT_EPOCH.get(0).copied().unwrap_or(0)
}

/// Empties every CPU's cache of VM and thread slots.
#[inline(always)]
pub fn bump_epoch() {
    if let Some(epoch) = COUNT_EPOCH.get_ptr_mut(0) {
        // SAFETY: a live map value other CPUs may bump too.
        unsafe { core::intrinsics::atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(epoch, 1) };
    }
}

/// Counts one exit of the VM in `slot`'s cells (snapshots).
#[inline(always)]
fn add(slot: u32, exit_isa: u32, raw: u32) {
    if slot == 0 {
        count_drop(drop_kind::COUNT_SLOTS_FULL);
    }
    let cell = count::dense_index(exit_isa, raw);
    let snapshots = global(&SNAPSHOTS) != 0;
    if snapshots && global(&SUM_PER_CPU) == 0 {
        add_shared(slot, cell);
    }
    if let Some(cells) = COUNTS.get_ptr_mut(slot) {
        // SAFETY: this CPU's value; a tracing program runs with migration off and
        // is this CPU's only writer of it. The index is masked after a volatile
        // read, so LLVM cannot drop the mask that shows the verifier the bound.
        unsafe {
            if snapshots {
                (*cells)[count::TOTAL as usize] += 1;
            }
            if cell < count::CELLS {
                let i = core::ptr::read_volatile(&cell) & (count::CELLS - 1);
                (*cells)[i as usize] += 1;
                return;
            }
        }
    }
    if cell < count::CELLS {
        return;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    overflow_add(PHASE.get(0).copied().unwrap_or(0), tgid, exit_isa, raw);
}

/// Counts one exit of a reason without a cell, per (phase, VM, reason), atomically.
#[inline(always)]
fn overflow_add(phase: u32, tgid: u32, exit_isa: u32, raw: u32) {
    let vcpu = VcpuKey {
        pid: tgid,
        vcpu_id: count::ALL_VCPUS,
        exit: ExitKey::from_raw(exit_isa, raw),
    };
    let key = PhaseVcpuKey::new(phase, &vcpu);
    if shared_add(&COUNT_OVERFLOW, key, 1) {
        return;
    }
    count_drop(drop_kind::EXIT_MAP_FULL);
}

/// The current VM's slot; `None` when the pid filter does not trace it.
#[inline(always)]
fn vm_slot() -> Option<u32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    vm_slot_of(tgid, PHASE.get(0).copied().unwrap_or(0))
}

/// VM `tgid`'s slot in `phase`; `None` when the pid filter does not trace it.
#[inline(always)]
fn vm_slot_of(tgid: u32, phase: u32) -> Option<u32> {
    let epoch = epoch();
    let cache = CPU_SLOT.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; only programs on this CPU use it, one at a time.
    let cached = unsafe { *cache };
    let slot = if cached.tgid == tgid && cached.phase == phase && cached.epoch == epoch {
        cached.slot
    } else {
        let slot = if traced(tgid) {
            take_slot(count::slot_key(phase, tgid))
        } else {
            count::NOT_TRACED
        };
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
    };
    (slot != count::NOT_TRACED).then_some(slot)
}

/// The VM's slot, taking a free one on its first exit; 0 when none is free.
#[inline(always)]
fn take_slot(key: u64) -> u32 {
    // SAFETY: the value is copied out.
    if let Some(&slot) = unsafe { VM_SLOTS.get(key) } {
        return slot;
    }
    for i in 1..count::MAX_VMS {
        // The helpers get a copy: a counter whose address they took would be unknown
        // to the verifier after the call, which then sees a loop without end.
        let mut slot = 0;
        // SAFETY: a write to a local.
        unsafe { core::ptr::write_volatile(&mut slot, i) };
        if SLOT_OWNERS
            .insert(slot, key, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            if VM_SLOTS.insert(key, slot, u64::from(BPF_NOEXIST)).is_ok() {
                return i;
            }
            // Another vCPU thread of this VM took a slot first: give this one back.
            let _ = SLOT_OWNERS.remove(slot);
            // SAFETY: the value is copied out.
            return unsafe { VM_SLOTS.get(key) }.copied().unwrap_or(0);
        }
    }
    0
}

/// VM `pid`'s counts now, summed over CPUs: exits of `(isa, reason)` (a reason
/// number the guest asked about), all its exits, and all traced VMs' exits.
#[inline(always)]
pub fn vm_counts(pid: u32, exit_isa: u32, reason: u32) -> (u64, u64, u64) {
    let phase = PHASE.get(0).copied().unwrap_or(0);
    // SAFETY: the value is copied out.
    let slot = unsafe { VM_SLOTS.get(count::slot_key(phase, pid)) }.copied();
    let cell = count::dense_index(exit_isa, reason);
    let overflow = PhaseVcpuKey::new(
        phase,
        &VcpuKey {
            pid,
            vcpu_id: count::ALL_VCPUS,
            exit: ExitKey::from_raw(exit_isa, reason),
        },
    );
    // SAFETY: the value is copied out.
    let mut of_reason = unsafe { COUNT_OVERFLOW.get(overflow) }
        .copied()
        .unwrap_or(0);
    if global(&SUM_PER_CPU) == 0 {
        return shared_counts(slot, cell, of_reason);
    }
    let (mut total, mut all) = (0u64, 0u64);
    let nr_cpus = global(&NR_CPUS);
    let zero = 0u32;
    for cpu in 0..count::MAX_CPUS {
        if cpu >= nr_cpus {
            break;
        }
        // SAFETY: the helper returns this CPU's value of the entry, or null; the maps
        // are passed as the loader relocates them.
        unsafe {
            if let Some(slot) = slot {
                let cells = bpf_map_lookup_percpu_elem(
                    core::ptr::addr_of!(COUNTS).cast_mut().cast::<c_void>(),
                    core::ptr::from_ref(&slot).cast::<c_void>(),
                    cpu,
                )
                .cast::<[u64; count::CELLS as usize]>();
                if !cells.is_null() {
                    total += (*cells)[count::TOTAL as usize];
                    if cell < count::CELLS {
                        let i = core::ptr::read_volatile(&cell) & (count::CELLS - 1);
                        of_reason += (*cells)[i as usize];
                    }
                }
            }
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
    (of_reason, total, all)
}

/// [`vm_counts`] where `SUM_PER_CPU` is 0: the shared cells.
#[inline(always)]
fn shared_counts(slot: Option<u32>, cell: u32, overflow: u64) -> (u64, u64, u64) {
    let all = SHARED_ALL.get(0).copied().unwrap_or(0);
    let Some(cells) = slot.and_then(|s| SHARED_CELLS.get(s)) else {
        return (overflow, 0, all);
    };
    let of_reason = if cell < count::CELLS {
        // SAFETY: a volatile read of a local, masked as in `add`.
        let i = unsafe { core::ptr::read_volatile(&cell) } & (count::CELLS - 1);
        cells[i as usize]
    } else {
        overflow
    };
    (of_reason, cells[count::TOTAL as usize], all)
}

/// A process has ended: if it was a VM with a slot, the slot's cells are final. Its
/// key leaves `VM_SLOTS` (a later process with the same pid gets a new slot), and the
/// epoch empties every CPU's cache.
#[inline(always)]
pub fn vm_ended(tgid: u32) {
    let key = count::slot_key(PHASE.get(0).copied().unwrap_or(0), tgid);
    // SAFETY: the value is copied out.
    let Some(&slot) = (unsafe { VM_SLOTS.get(key) }) else {
        return;
    };
    if global(&SNAPSHOTS) != 0 {
        // With snapshots, later reads tell counts carried over from ended VMs apart.
        let (_, total, _) = vm_counts(tgid, 0, 0);
        add_ended(total);
    }
    if let Some(ended) = SLOT_ENDED.get_ptr_mut(slot) {
        // SAFETY: a live map value; only the VM's end writes 1 here.
        unsafe { *ended = 1 };
    }
    let _ = VM_SLOTS.remove(key);
    bump_epoch();
}

/// Adds an ended VM's exits to the ended VMs' total (rare: once per VM).
#[inline(always)]
fn add_ended(total: u64) {
    if shared_add(&VM_TOTALS, vm_totals_key::ENDED, total) {
        return;
    }
    count_drop(drop_kind::VM_MAP_FULL);
}
