//! `--snapshots`: each guest read of a counter leaf, with the host's own counts for
//! that VM at that instant, read from the vCPU's registers at the CPUID exit and at
//! the next entry; and the register layout learned from the first exits where BTF
//! does not give it.

use super::*;
use crate::{
    detail::detail_event,
    pending::{CPU_PENDING, PENDING},
    vm_rows::VM_TOTALS,
};

/// Per-VM synthetic exits (VMX INVALID_STATE, made up by `vmx_vcpu_run()` without a
/// VM entry), kept only with snapshots while the probe on `vmx_vcpu_run()` is attached.
#[map]
pub(crate) static VM_SYNTHETIC: HashMap<u32, u64> = HashMap::with_max_entries(limits::MAX_VMS, 0);

/// vCPU thread id -> 1 from `vmx_vcpu_run()`'s start until its `kvm_entry`: still 1 at
/// the thread's next run means that run entered no guest (a synthetic exit). One
/// writer per key: the thread itself.
#[map]
pub(crate) static RUN_STARTED: HashMap<u32, u32> =
    HashMap::with_max_entries(limits::MAX_VCPU_THREADS, 0);

#[map]
pub(crate) static CPUID_EVENTS: RingBuf = RingBuf::with_byte_size(limits::CPUID_RING_BYTES, 0);

/// Where the vCPU registers are, and the register-learning state ([`regs_slot`]).
#[map]
pub(crate) static REGS: Array<u32> = Array::with_max_entries(regs_slot::COUNT, 0);

/// Register-learning samples ([`RegsSample`]), while the layout is not known.
#[map]
pub(crate) static REGS_SAMPLES: RingBuf = RingBuf::with_byte_size(limits::LEARN_RING_BYTES, 0);

/// vCPU thread id -> its `struct kvm_vcpu` (from `kvm_entry`'s argument), kept only
/// with snapshots. One writer per key: the thread itself.
#[map]
pub(crate) static VCPU_OF: HashMap<u32, u64> =
    HashMap::with_max_entries(limits::MAX_VCPU_THREADS, 0);

/// Slot 0 of each CPU: the vCPU thread that entered its guest here last, and its
/// `struct kvm_vcpu` (a hash update only when another thread enters here).
#[map]
pub(crate) static CPU_VCPU: PerCpuArray<CpuVcpu> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct CpuVcpu {
    tid: u32,
    _pad: u32,
    vcpu: u64,
}

/// vCPU thread id -> its guest counter read, from the CPUID exit that asked until the
/// next VM entry, where the registers the guest receives are read.
#[map]
pub(crate) static PENDING_READS: HashMap<u32, CpuidEvent> =
    HashMap::with_max_entries(limits::MAX_VCPU_THREADS, 0);

/// `REGS` slot `i`.
#[inline(always)]
pub(crate) fn regs_slot_value(i: u32) -> u32 {
    REGS.get(i).copied().unwrap_or(0)
}

/// At an exit of a traced VM, with snapshots on: while the register layout is not
/// known, sends a learning sample (the exit's `guest_rip`, which `kvm_exit` just left
/// in `regs[RIP]`, and the vCPU's first bytes); once it is, a CPUID exit that asks
/// for a counter leaf snapshots the VM's counts, to be sent with the registers the
/// guest receives at the next VM entry (`kvm_entry`).
#[inline(always)]
pub(crate) fn cpuid_snapshot(tid: u32, vm: &VmExitKey, guest_rip: u64) {
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
    let Some((host_reason_count, host_total, host_all_vms)) =
        vm_rows::vm_counts(vm.pid, vm.exit.isa, index)
    else {
        // The VM has no row (every VM slot was taken): nothing to compare with.
        count_drop(drop_kind::SNAPSHOT_LOST);
        return;
    };
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
pub(crate) fn synthetic_of(pid: u32) -> u64 {
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
pub(crate) fn vcpu_of(tid: u32) -> Option<u64> {
    match CPU_VCPU.get(0) {
        Some(slot) if slot.tid == tid && slot.vcpu != 0 => Some(slot.vcpu),
        // SAFETY: the value is copied out.
        _ => unsafe { VCPU_OF.get(tid) }.copied(),
    }
}

/// Whether `function` is one of the configured counter leaves.
#[inline(always)]
pub(crate) fn counter_leaf(function: u32) -> bool {
    function != 0
        && (function == global(&LEAF_TOTAL)
            || function == global(&LEAF_COUNT)
            || function == global(&LEAF_CYCLES))
}

/// Sends one register-learning sample, while the budget user space set lasts.
#[inline(always)]
pub(crate) fn learn(vcpu: u64, guest_rip: u64) {
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
pub(crate) fn entry_snapshot(ctx: &RawTracePointContext, pid_tgid: u64) {
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
    let Some(at_entry) = vm_rows::vm_counts(tgid, event.isa, event.index) else {
        count_drop(drop_kind::SNAPSHOT_LOST);
        return;
    };
    (
        event.host_reason_count_entry,
        event.host_total_entry,
        event.host_all_vms_entry,
    ) = at_entry;
    if CPUID_EVENTS.output::<CpuidEvent>(&event, 0).is_err() {
        count_drop(drop_kind::CPUID_RING_FULL);
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
        on_cpuid(&ctx, function);
    }
    0
}

#[inline(always)]
pub(crate) fn on_cpuid(ctx: &TracePointContext, function: u32) {
    if !counter_leaf(function) {
        return;
    }
    let Some((tgid, tid)) = traced_current() else {
        return;
    };
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
    let Some((host_reason_count, host_total, host_all_vms)) = vm_rows::vm_counts(tgid, isa, index)
    else {
        count_drop(drop_kind::SNAPSHOT_LOST);
        return;
    };
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
        if synthetic && !shared_add(&VM_SYNTHETIC, tgid, 1) {
            count_drop(drop_kind::VM_MAP_FULL);
        }
    } else if RUN_STARTED.insert(tid, 1, u64::from(BPF_ANY)).is_err() {
        count_drop(drop_kind::READ_PENDING_FULL);
    }
    0
}
