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
//! Snapshots (`--snapshots`) keep rows per VM as well: [`crate::vm_rows`].

use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::{map, raw_tracepoint, tracepoint},
    maps::HashMap,
    programs::{RawTracePointContext, TracePointContext},
};
use tracer_common::{ExitKey, NO_FIELD, PhaseVcpuKey, VcpuKey, count, drop_kind, isa, limits};

use crate::{
    EXIT_FIELDS_OFF, EXIT_ISA_OFF, EXIT_REASON_OFF, count_drop, global, shared_add, thread_rows,
};
use tracer_common::rows::{self, CachedThread};

#[unsafe(no_mangle)]
static VMX_EXIT_REASON_OFF: u32 = NO_FIELD;
#[unsafe(no_mangle)]
static SVM_VMCB_OFF: u32 = NO_FIELD;
/// Offset of `vcpu_id` in `struct kvm_vcpu` (the timing path's raw exit).
#[unsafe(no_mangle)]
static VCPU_ID_OFF: u32 = NO_FIELD;
/// `struct vmcb_control_area.exit_code`: fixed by the hardware (AMD APM vol. 2,
/// appendix B), at the start of the VMCB. The loader checks the BTF agrees.
const VMCB_EXIT_CODE: u64 = 0x70;

/// Exits whose reason has no cell (rare), per (phase, VM, reason), added to
/// atomically; `vcpu_id` is `ALL_VCPUS`.
#[map]
static COUNT_OVERFLOW: HashMap<PhaseVcpuKey, u64> =
    HashMap::with_max_entries(limits::MAX_OVERFLOW_ROWS, 0);
/// The floor (`record --counts-only --empty-program`, for the bench): what any eBPF
/// program on the raw exit tracepoint costs, counting nothing.
#[raw_tracepoint(tracepoint = "kvm_exit")]
pub fn kvm_exit_empty(_ctx: RawTracePointContext) -> u32 {
    0
}

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

/// Counts one exit of a reason without a cell, per (phase, VM, reason), atomically.
#[inline(always)]
fn overflow_add(phase: u32, tgid: u32, exit_isa: u32, raw: u32) {
    let vcpu = VcpuKey {
        pid: tgid,
        reuse: 0,
        vcpu_id: count::ALL_VCPUS,
        exit: ExitKey::from_raw(exit_isa, raw),
    };
    let key = PhaseVcpuKey::new(phase, &vcpu);
    if shared_add(&COUNT_OVERFLOW, key, 1) {
        return;
    }
    count_drop(drop_kind::EXIT_MAP_FULL);
}
