//! What the programs are loaded with: the field offsets read from tracefs and the
//! settings, as eBPF globals; the map sizes; and the attaching of the tracepoint
//! programs [`PROGRAMS`] names.

use kvmtrace_model::tracefs_format::{Field, Tracepoint};
use tracer_common::{NO_FIELD, globals, limits, maps, rows};

use super::{
    config::ProbeConfig,
    error::ProbeError,
    loaded::Loaded,
    programs::{
        KVM_CPUID, KVM_MSR, KVM_PAGE_FAULT, Kind, MODULE_LOAD, PROGRAMS, Program,
        SCHED_PROCESS_EXIT, TASK_NEWTASK,
    },
};
use crate::tracefs::Tracefs;

/// The globals the programs are loaded with, and whether this kernel has
/// `module:module_load`.
pub(super) struct Setup {
    pub globals: Vec<(&'static str, u32)>,
    module_load: bool,
}

/// The tracepoint of `program`, whose record's fields are read.
fn record(program: &Program, config: &ProbeConfig) -> Result<Tracepoint, ProbeError> {
    program
        .tracepoint(config)
        .ok_or_else(|| ProbeError::Program {
            action: "read the record of",
            program: program.name.to_owned(),
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })
}

impl Setup {
    /// Reads every field offset the programs need from `tracefs`; the optional ones
    /// (`group_dead`, `module_load`, and with `--detail` the exit's `info1` and
    /// `intr_info`) are [`NO_FIELD`] or absent where this kernel lacks them.
    pub fn read(tracefs: &Tracefs, config: &ProbeConfig) -> Result<Self, ProbeError> {
        let exit_tp = &config.exit_tracepoint;
        tracefs.require(exit_tp)?;
        tracefs.require(&config.entry_tracepoint)?;
        let mut g = exit_globals(tracefs, exit_tp, config.detail)?;
        g.extend(task_globals(tracefs, config)?);
        g.extend(kvm_globals(tracefs, config)?);
        g.extend(settings(config));
        // Optional: without it a vendor module reload does not start a new phase.
        let module = record(&MODULE_LOAD, config)?;
        let module_name_off = tracefs.offset(&module, "name").ok();
        g.push((globals::MODULE_NAME_OFF, module_name_off.unwrap_or(0)));
        if module_name_off.is_none() {
            log::info!(
                "this kernel has no {module}: a kvm module reload during the record does not start a new phase"
            );
        }
        Ok(Self {
            globals: g,
            module_load: module_name_off.is_some(),
        })
    }

    /// Whether a vendor module reload starts a new phase.
    pub fn tracks_phases(&self) -> bool {
        self.module_load
    }

    /// Loads each tracepoint program `config` wants and attaches it, in the table's
    /// order; `module_load` only where the kernel has its tracepoint.
    pub fn attach_programs(
        &self,
        loaded: &mut Loaded,
        config: &ProbeConfig,
    ) -> Result<(), ProbeError> {
        for program in &PROGRAMS {
            if program.kind == Kind::KProbe || !(program.wanted)(config) {
                continue;
            }
            if program.name == MODULE_LOAD.name && !self.module_load {
                continue;
            }
            program.attach(loaded, &record(program, config)?)?;
        }
        Ok(())
    }
}

/// `task:task_newtask` and `sched:sched_process_exit`.
fn task_globals(
    tracefs: &Tracefs,
    config: &ProbeConfig,
) -> Result<Vec<(&'static str, u32)>, ProbeError> {
    let process_exit = record(&SCHED_PROCESS_EXIT, config)?;
    let newtask = record(&TASK_NEWTASK, config)?;
    let group_dead = group_dead_offset(&tracefs.fields(&process_exit)?);
    if group_dead.is_none() {
        log::debug!(
            "{process_exit} has no group_dead field: a traced process is forgotten when its group leader exits"
        );
    }
    Ok(vec![
        (globals::NEWTASK_PID_OFF, tracefs.offset(&newtask, "pid")?),
        (
            globals::NEWTASK_FLAGS_OFF,
            tracefs.offset(&newtask, "clone_flags")?,
        ),
        (globals::EXIT_GROUP_DEAD_OFF, group_dead.unwrap_or(NO_FIELD)),
    ])
}

/// `kvm:kvm_cpuid`, and with `--detail` `kvm:kvm_msr` and `kvm:kvm_page_fault`.
fn kvm_globals(
    tracefs: &Tracefs,
    config: &ProbeConfig,
) -> Result<Vec<(&'static str, u32)>, ProbeError> {
    let cpuid_tp = record(&KVM_CPUID, config)?;
    let cpuid = |field| tracefs.offset(&cpuid_tp, field);
    let mut g = vec![
        (globals::CPUID_FUNCTION_OFF, cpuid("function")?),
        (globals::CPUID_INDEX_OFF, cpuid("index")?),
        (globals::CPUID_RAX_OFF, cpuid("rax")?),
        (globals::CPUID_RBX_OFF, cpuid("rbx")?),
        (globals::CPUID_RCX_OFF, cpuid("rcx")?),
        (globals::CPUID_RDX_OFF, cpuid("rdx")?),
    ];
    if config.detail {
        let msr = record(&KVM_MSR, config)?;
        let page_fault = record(&KVM_PAGE_FAULT, config)?;
        g.extend([
            (globals::MSR_ECX_OFF, tracefs.offset(&msr, "ecx")?),
            (globals::MSR_WRITE_OFF, tracefs.offset(&msr, "write")?),
            (
                globals::PF_ADDRESS_OFF,
                tracefs.offset(&page_fault, "fault_address")?,
            ),
        ]);
    }
    Ok(g)
}

/// `kvm:kvm_exit`'s fields: where the one read starts and each field's place in it.
fn exit_globals(
    tracefs: &Tracefs,
    exit_tp: &Tracepoint,
    detail: bool,
) -> Result<Vec<(&'static str, u32)>, ProbeError> {
    let fields = [
        (tracefs.offset(exit_tp, "exit_reason")?, 4),
        (tracefs.offset(exit_tp, "isa")?, 4),
        (tracefs.offset(exit_tp, "vcpu_id")?, 4),
        (tracefs.offset(exit_tp, "guest_rip")?, 8),
    ];
    let [base, reason, isa, vcpu, rip] = exit_fields(exit_tp, fields)?;
    let optional = |name: &str, size: u32| {
        let off = tracefs
            .offset(exit_tp, name)
            .ok()
            .and_then(|o| optional_exit_field(base, o, size));
        if off.is_none() && detail {
            log::info!(
                "{exit_tp} has no usable {name} field: --detail leaves the exits it keys undecoded"
            );
        }
        off.unwrap_or(NO_FIELD)
    };
    Ok(vec![
        (globals::EXIT_FIELDS_OFF, base),
        (globals::EXIT_REASON_OFF, reason),
        (globals::EXIT_ISA_OFF, isa),
        (globals::EXIT_VCPU_OFF, vcpu),
        (globals::EXIT_RIP_OFF, rip),
        (globals::EXIT_INFO1_OFF, optional("info1", 8)),
        (globals::EXIT_INTR_INFO_OFF, optional("intr_info", 4)),
    ])
}

/// What to count: the filters, the snapshots' leaves, `--detail`, `--rip`.
fn settings(config: &ProbeConfig) -> Vec<(&'static str, u32)> {
    let leaves = config.snapshots;
    let offsets = match &config.counts {
        Some(choice) => choice.offsets(),
        None => config.raw_exit,
    };
    // Possible CPUs, as the per-CPU maps hold them; one if that cannot be read (a
    // counter read then sums CPU 0 only, which reconcile would show as a difference).
    let nr_cpus = aya::util::nr_cpus().map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX));
    vec![
        (globals::NR_CPUS, nr_cpus),
        (globals::SUM_PER_CPU, u32::from(config.sum_per_cpu)),
        (globals::VM_TIME, u32::from(config.vm_time)),
        (globals::CELL_ISA, config.cell_isa),
        (globals::VCPU_ROWS, u32::from(config.vcpu_rows)),
        (
            globals::VMX_EXIT_REASON_OFF,
            offsets.and_then(|o| o.vmx_exit_reason).unwrap_or(NO_FIELD),
        ),
        (
            globals::SVM_VMCB_OFF,
            offsets.and_then(|o| o.svm_vmcb).unwrap_or(NO_FIELD),
        ),
        (
            globals::VCPU_ID_OFF,
            offsets.map_or(NO_FIELD, |o| o.vcpu_id),
        ),
        (globals::SNAPSHOTS, u32::from(leaves.is_some())),
        (
            globals::LEAF_TOTAL,
            leaves.and_then(|l| l.total).unwrap_or(0),
        ),
        (globals::LEAF_COUNT, leaves.map_or(0, |l| l.count)),
        (
            globals::LEAF_CYCLES,
            leaves.and_then(|l| l.cycles).unwrap_or(0),
        ),
        (
            globals::FILTER_PIDS_ENABLED,
            u32::from(!config.pids.is_empty()),
        ),
        (globals::VCPU_FILTER, config.vcpu.unwrap_or(u32::MAX)),
        (globals::DETAIL, u32::from(config.detail)),
        (globals::RIPS, u32::from(config.rips)),
    ]
}

/// Every map's size: as configured, or 1 entry (1 page for ring buffers) when the
/// option that uses it is off.
pub(super) fn map_sizes(config: &ProbeConfig) -> Vec<(&'static str, u32)> {
    let on = |used: bool, size: u32, otherwise: u32| if used { size } else { otherwise };
    // Per-VM counts are only kept for snapshots. The kernel maps all of a ring buffer's
    // pages (twice) into our memory at once: it too is only sized for snapshots when
    // they are taken.
    let snap = config.snapshots.is_some();
    let ring_min = limits::CPUID_RING_MIN_BYTES;
    let counting = config.counts.is_some();
    // Thread rows: the count path's, or the per-VM timing path's.
    let rows = counting || config.vm_time;
    let threads = limits::MAX_THREADS;
    let vms = limits::MAX_VMS;
    // With thread rows, the per-CPU hashes only take the reasons without a cell.
    let hashed = |size: u32| {
        if config.vm_time {
            size.min(limits::MAX_UNCELLED_ROWS)
        } else {
            size
        }
    };
    vec![
        (
            maps::OVERFLOW_EXITS,
            on(!counting, hashed(config.max_overflow_rows), 1),
        ),
        (
            maps::VCPU_EXITS,
            on(!counting, hashed(config.max_vcpu_rows), 1),
        ),
        (
            maps::LATENCY_HIST,
            on(!counting, hashed(limits::MAX_HIST_ROWS), 1),
        ),
        (maps::LATENCY_CELLS, on(!counting, rows::CELLS, 1)),
        (maps::PENDING, on(!counting, limits::MAX_PENDING, 1)),
        (maps::THREAD_SLOTS, on(rows, threads, 1)),
        (maps::SLOT_THREADS, on(rows, threads, 1)),
        (maps::VM_BORN, on(rows, threads, 1)),
        (maps::FREE_SLOTS, on(rows, threads, 1)),
        (maps::ENDED_SLOTS, on(rows, threads, 1)),
        (maps::COUNT_ROWS, on(counting, threads + 1, 1)),
        (maps::TIME_ROWS, on(config.vm_time, threads + 1, 1)),
        (maps::VM_ROWS, on(snap, vms + 1, 1)),
        (maps::VM_EXITS, on(snap, vms + 1, 1)),
        (maps::VM_FREE, on(snap, vms, 1)),
        (maps::VM_ENDED, on(snap, vms, 1)),
        (maps::VM_SLOTS, on(snap, vms, 1)),
        (maps::SLOT_OWNERS, on(snap, vms, 1)),
        (maps::VM_OVERFLOW, on(snap, config.max_overflow_rows, 1)),
        (
            maps::COUNT_OVERFLOW,
            on(counting, config.max_overflow_rows, 1),
        ),
        // Only the ended VMs' total.
        (maps::VM_TOTALS, on(snap, 1, 1)),
        (
            maps::CPUID_EVENTS,
            on(snap, limits::CPUID_RING_BYTES, ring_min),
        ),
        (
            maps::REGS_SAMPLES,
            on(snap, limits::LEARN_RING_BYTES, ring_min),
        ),
        (maps::VCPU_OF, on(snap, limits::MAX_VCPU_THREADS, 1)),
        (maps::VM_SYNTHETIC, on(snap, vms, 1)),
        (maps::RUN_STARTED, on(snap, limits::MAX_VCPU_THREADS, 1)),
        (maps::PENDING_READS, on(snap, limits::MAX_VCPU_THREADS, 1)),
        (
            maps::DETAIL_EXITS,
            on(config.detail, limits::MAX_DETAIL_ROWS, 1),
        ),
        (
            maps::DETAIL_KEYS,
            on(config.detail, limits::MAX_DETAIL_REASONS, 1),
        ),
        (maps::RIP_EXITS, on(config.rips, limits::MAX_RIP_ROWS, 1)),
    ]
}

/// The offset of `group_dead` in `sched:sched_process_exit`, a one-byte bool that newer
/// kernels have (6.18 does, 6.1 does not); `None` when this kernel's record lacks it.
pub(super) fn group_dead_offset(fields: &[Field]) -> Option<u32> {
    fields
        .iter()
        .find(|f| f.name == "group_dead" && f.size == 1)
        .map(|f| f.offset)
}

/// Where the one read of the exit fields starts, and each field's offset from there.
/// `fields` are (offset, size) pairs; each must be aligned to its size from the start.
pub(super) fn exit_fields(
    tp: &Tracepoint,
    fields: [(u32, u32); 4],
) -> Result<[u32; 5], ProbeError> {
    let base = fields.iter().map(|f| f.0).min().unwrap_or(0);
    let end = fields.iter().map(|f| f.0 + f.1).max().unwrap_or(0);
    let rel = fields.map(|(o, size)| (o - base, size));
    if end - base > limits::EXIT_FIELDS_BYTES || rel.iter().any(|(r, size)| r % size != 0) {
        return Err(ProbeError::FieldsApart {
            tracepoint: tp.to_string(),
            span: end - base,
            max: limits::EXIT_FIELDS_BYTES,
        });
    }
    Ok([base, rel[0].0, rel[1].0, rel[2].0, rel[3].0])
}

/// Offset of an optional `kvm:kvm_exit` field from `base`, where the one read of
/// [`limits::EXIT_FIELDS_BYTES`] reaches it aligned; `None` otherwise.
pub(super) fn optional_exit_field(base: u32, offset: u32, size: u32) -> Option<u32> {
    let rel = offset.checked_sub(base)?;
    (rel + size <= limits::EXIT_FIELDS_BYTES && rel % size == 0).then_some(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_fields_are_used_where_the_read_reaches() {
        // 6.1: info1 at 32, intr_info at 48, the read starts at 8.
        assert_eq!(optional_exit_field(8, 32, 8), Some(24));
        assert_eq!(optional_exit_field(8, 48, 4), Some(40));
        assert_eq!(optional_exit_field(8, 70, 4), None, "beyond the read");
        assert_eq!(optional_exit_field(8, 4, 4), None, "before it");
        assert_eq!(optional_exit_field(8, 36, 8), None, "misaligned");
    }

    #[test]
    fn exit_fields_are_read_at_once() {
        let tp = Tracepoint::new("kvm", "kvm_exit");
        // 6.1: exit_reason 8, guest_rip 16, isa 24, vcpu_id 56.
        let f = |r, i, v, rip| [(r, 4), (i, 4), (v, 4), (rip, 8)];
        assert_eq!(
            exit_fields(&tp, f(8, 24, 56, 16)).ok(),
            Some([8, 0, 16, 48, 8])
        );
        assert_eq!(
            exit_fields(&tp, f(56, 8, 24, 16)).ok(),
            Some([8, 48, 0, 16, 8])
        );
        let apart = exit_fields(&tp, f(8, 24, 80, 16))
            .err()
            .map(|e| e.to_string());
        assert!(
            apart.is_some_and(|e| e.contains("76 bytes apart")),
            "fields too far apart are refused"
        );
        assert!(exit_fields(&tp, f(8, 26, 40, 16)).is_err(), "misaligned");
        assert!(
            exit_fields(&tp, f(8, 24, 56, 12)).is_err(),
            "a u64 guest_rip not 8-aligned from the start"
        );
    }

    /// `sched:sched_process_exit` on 6.18 (with `group_dead`) and on 6.1 (without).
    const PROCESS_EXIT_6_18: &str = "name: sched_process_exit
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;
\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;
";
    const PROCESS_EXIT_6_1: &str = "name: sched_process_exit
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;
";

    #[test]
    fn group_dead_is_found_where_the_kernel_has_it() {
        use kvmtrace_model::tracefs_format::parse_format;
        assert_eq!(
            group_dead_offset(&parse_format(PROCESS_EXIT_6_18)),
            Some(32)
        );
        assert_eq!(group_dead_offset(&parse_format(PROCESS_EXIT_6_1)), None);
        let wide = PROCESS_EXIT_6_18.replace("size:1;", "size:4;");
        assert_eq!(
            group_dead_offset(&parse_format(&wide)),
            None,
            "only a one-byte bool is read"
        );
    }

    #[test]
    fn newtask_fields_parse() {
        use kvmtrace_model::tracefs_format::parse_format;
        let newtask = "name: task_newtask
format:
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:pid_t pid;\toffset:8;\tsize:4;\tsigned:1;
\tfield:char comm[16];\toffset:12;\tsize:16;\tsigned:0;
\tfield:u64 clone_flags;\toffset:32;\tsize:8;\tsigned:0;
\tfield:short oom_score_adj;\toffset:40;\tsize:2;\tsigned:1;
";
        let fields = parse_format(newtask);
        let off = |n: &str| fields.iter().find(|f| f.name == n).map(|f| f.offset);
        assert_eq!((off("pid"), off("clone_flags")), (Some(8), Some(32)));
        assert_eq!(tracer_common::CLONE_THREAD, libc::CLONE_THREAD as u32);
    }
}
