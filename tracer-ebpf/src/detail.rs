//! `--detail` (each reason's sub-keys, from the exit's own fields or from the
//! `kvm_msr`, `kvm_cpuid` or `kvm_page_fault` event that follows on the same thread)
//! and `--rip` (exits per guest RIP).

use super::*;
use crate::pending::{CPU_PENDING, PENDING};

/// `--detail`: exits per (phase, VM, reason, sub-key), with their handling time.
#[map]
pub(crate) static DETAIL_EXITS: PerCpuHashMap<DetailKey, ExitStats> =
    PerCpuHashMap::with_max_entries(limits::MAX_DETAIL_ROWS, 0);

/// `--detail`: distinct sub-keys so far per (VM, isa, reason): the cap's bookkeeping,
/// touched only when a new sub-key is inserted.
#[map]
pub(crate) static DETAIL_KEYS: HashMap<u64, u64> =
    HashMap::with_max_entries(limits::MAX_DETAIL_REASONS, 0);

/// `--rip`: exits per (phase, VM, reason, guest RIP).
#[map]
pub(crate) static RIP_EXITS: PerCpuHashMap<RipKey, u64> =
    PerCpuHashMap::with_max_entries(limits::MAX_RIP_ROWS, 0);

/// `--detail` at an exit: counts it in its detail row when its own fields key it, or
/// says which tracepoint will. Returns the row counted in and the kind awaited.
#[inline(always)]
pub(crate) fn exit_detail(
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
pub(crate) fn count_detail(key: &DetailKey) -> DetailKey {
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
    let row = if keys < detail_kind::MAX_DETAIL_KEYS_PER_REASON
        && shared_add(&DETAIL_KEYS, vm_reason, 1)
    {
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
pub(crate) fn count_rip(row: &PhaseVcpuKey, rip: u64) {
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
pub(crate) fn detail_event(kind: u32, sub: u64) {
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
pub(crate) fn own_reason(isa: u32, kind: u32, sub: u64) -> u32 {
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
        count_drop(drop_kind::RECORD_LOST);
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
    let Ok(address) = (unsafe { ctx.read_at::<u64>(global(&PF_ADDRESS_OFF) as usize) }) else {
        count_drop(drop_kind::RECORD_LOST);
        return 0;
    };
    detail_event(detail_kind::GPA, address >> detail_kind::GPA_REGION_SHIFT);
    0
}
