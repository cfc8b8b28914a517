//! What the programs are loaded with: the field offsets read from tracefs and the
//! settings, as eBPF globals; the map sizes; and the tracepoint each program attaches to.

use aya::{
    Ebpf,
    programs::{RawTracePoint, TracePoint},
};
use kvmtrace_model::tracefs_format::{Field, Tracepoint};
use tracer_common::{NO_FIELD, globals, isa, limits, maps, rows};

use super::{ProbeConfig, ProbeError, find_program, load_error};
use crate::{exit_layout::Choice, tracefs::Tracefs};

/// The programs, in attach order: the entry, exit-cleanup and new-task programs first,
/// so an exit is only timed once its entry program is attached, threads that exit from
/// now on are forgotten, and child processes created from now on are followed.
const PROGRAMS: [&str; 12] = [
    "kvm_exit_raw",
    "kvm_exit_count",
    "kvm_exit_count_tp",
    "kvm_entry",
    "sched_switch",
    "sched_process_exit",
    "task_newtask",
    "kvm_cpuid",
    "kvm_msr",
    "kvm_page_fault",
    "module_load",
    "kvm_exit",
];

/// The tracepoints the programs attach to, and the globals they are loaded with.
pub(super) struct Setup {
    pub globals: Vec<(&'static str, u32)>,
    newtask: Tracepoint,
    process_exit: Tracepoint,
    switch: Tracepoint,
    cpuid: Tracepoint,
    msr: Tracepoint,
    page_fault: Tracepoint,
    /// `None` on kernels without `module:module_load`.
    module: Option<Tracepoint>,
}

impl Setup {
    /// Reads every field offset the programs need from `tracefs`; the optional ones
    /// (`group_dead`, `module_load`, and with `--detail` the exit's `info1` and
    /// `intr_info`) are [`NO_FIELD`] or `None` where this kernel lacks them.
    pub fn read(tracefs: &Tracefs, config: &ProbeConfig) -> Result<Self, ProbeError> {
        let exit_tp = &config.exit_tracepoint;
        tracefs.require(exit_tp)?;
        tracefs.require(&config.entry_tracepoint)?;
        let s = Self {
            globals: Vec::new(),
            newtask: Tracepoint::new("task", "task_newtask"),
            process_exit: Tracepoint::new("sched", "sched_process_exit"),
            switch: Tracepoint::new("sched", "sched_switch"),
            cpuid: Tracepoint::new("kvm", "kvm_cpuid"),
            msr: Tracepoint::new("kvm", "kvm_msr"),
            page_fault: Tracepoint::new("kvm", "kvm_page_fault"),
            module: None,
        };
        let mut g = exit_globals(tracefs, exit_tp, config.detail)?;
        g.extend(s.task_globals(tracefs)?);
        g.extend(s.kvm_globals(tracefs, config)?);
        g.extend(settings(config));
        // Optional: without it a vendor module reload does not start a new phase.
        let module = Tracepoint::new("module", "module_load");
        let module_name_off = tracefs.offset(&module, "name").ok();
        g.push((globals::MODULE_NAME_OFF, module_name_off.unwrap_or(0)));
        if module_name_off.is_none() {
            log::info!(
                "this kernel has no {module}: a kvm module reload during the record does not start a new phase"
            );
        }
        Ok(Self {
            globals: g,
            module: module_name_off.map(|_| module),
            ..s
        })
    }

    /// Whether a vendor module reload starts a new phase.
    pub fn tracks_phases(&self) -> bool {
        self.module.is_some()
    }

    /// `task:task_newtask` and `sched:sched_process_exit`.
    fn task_globals(&self, tracefs: &Tracefs) -> Result<Vec<(&'static str, u32)>, ProbeError> {
        let group_dead = group_dead_offset(&tracefs.fields(&self.process_exit)?);
        if group_dead.is_none() {
            log::debug!(
                "{} has no group_dead field: a traced process is forgotten when its group leader exits",
                self.process_exit
            );
        }
        Ok(vec![
            (
                globals::NEWTASK_PID_OFF,
                tracefs.offset(&self.newtask, "pid")?,
            ),
            (
                globals::NEWTASK_FLAGS_OFF,
                tracefs.offset(&self.newtask, "clone_flags")?,
            ),
            (globals::EXIT_GROUP_DEAD_OFF, group_dead.unwrap_or(NO_FIELD)),
        ])
    }

    /// `kvm:kvm_cpuid`, and with `--detail` `kvm:kvm_msr` and `kvm:kvm_page_fault`.
    fn kvm_globals(
        &self,
        tracefs: &Tracefs,
        config: &ProbeConfig,
    ) -> Result<Vec<(&'static str, u32)>, ProbeError> {
        let cpuid = |field| tracefs.offset(&self.cpuid, field);
        let mut g = vec![
            (globals::CPUID_FUNCTION_OFF, cpuid("function")?),
            (globals::CPUID_INDEX_OFF, cpuid("index")?),
            (globals::CPUID_RAX_OFF, cpuid("rax")?),
            (globals::CPUID_RBX_OFF, cpuid("rbx")?),
            (globals::CPUID_RCX_OFF, cpuid("rcx")?),
            (globals::CPUID_RDX_OFF, cpuid("rdx")?),
        ];
        if config.detail {
            g.extend([
                (globals::MSR_ECX_OFF, tracefs.offset(&self.msr, "ecx")?),
                (globals::MSR_WRITE_OFF, tracefs.offset(&self.msr, "write")?),
                (
                    globals::PF_ADDRESS_OFF,
                    tracefs.offset(&self.page_fault, "fault_address")?,
                ),
            ]);
        }
        Ok(g)
    }

    /// Loads each program and attaches it to its tracepoint; the optional ones only
    /// when used.
    pub fn attach_programs(&self, ebpf: &mut Ebpf, config: &ProbeConfig) -> Result<(), ProbeError> {
        let detail = config.detail;
        let counting = config.counts.as_ref();
        let raw = matches!(counting, Some(Choice::Raw { .. }));
        for program in PROGRAMS {
            // The count path: its one exit program, and the process and module
            // tracking; no entry, no sched_switch, no per-exit tracepoint but one.
            let timing_only = matches!(
                program,
                "kvm_exit"
                    | "kvm_entry"
                    | "sched_switch"
                    | "kvm_cpuid"
                    | "kvm_msr"
                    | "kvm_page_fault"
            );
            let raw_exit = config.raw_exit.is_some();
            let skip = match program {
                "kvm_exit_count" => !raw,
                "kvm_exit_count_tp" => counting.is_none() || raw,
                "kvm_exit_raw" => counting.is_some() || !raw_exit,
                "kvm_exit" => counting.is_some() || raw_exit,
                _ => counting.is_some() && timing_only,
            };
            if skip {
                continue;
            }
            let tp = match program {
                "kvm_entry" => &config.entry_tracepoint,
                "sched_switch" => &self.switch,
                "sched_process_exit" => &self.process_exit,
                "task_newtask" => &self.newtask,
                "module_load" => match &self.module {
                    Some(tp) => tp,
                    None => continue,
                },
                // Its tracepoint fires on every CPUID exit: only pay for it when used.
                "kvm_cpuid" if config.snapshots.is_none() && !detail => continue,
                "kvm_cpuid" => &self.cpuid,
                "kvm_msr" | "kvm_page_fault" if !detail => continue,
                "kvm_msr" => &self.msr,
                "kvm_page_fault" => &self.page_fault,
                _ => &config.exit_tracepoint,
            };
            attach(ebpf, program, tp)?;
        }
        Ok(())
    }
}

/// Loads `program` and attaches it to `tp`.
fn attach(ebpf: &mut Ebpf, program: &str, tp: &Tracepoint) -> Result<(), ProbeError> {
    let prog = find_program(ebpf, program)?;
    let unusable = |source| ProbeError::Program {
        action: "use",
        program: program.to_owned(),
        source,
    };
    let attached = if matches!(
        program,
        "kvm_entry" | "sched_switch" | "kvm_exit_count" | "kvm_exit_raw"
    ) {
        // A raw tracepoint: it needs no field of the record.
        let raw: &mut RawTracePoint = prog.try_into().map_err(unusable)?;
        raw.load().map_err(|e| load_error(program, e))?;
        raw.attach(&tp.name).map(drop)
    } else {
        let tracepoint: &mut TracePoint = prog.try_into().map_err(unusable)?;
        tracepoint.load().map_err(|e| load_error(program, e))?;
        tracepoint.attach(&tp.category, &tp.name).map(drop)
    };
    attached.map_err(|source| ProbeError::Program {
        action: "attach",
        program: format!("{program} to {tp}"),
        source,
    })
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

/// Whether a program can read another CPU's value of a per-CPU map entry
/// (`bpf_map_lookup_percpu_elem`, Linux 5.19): then a counter read sums the per-CPU
/// cells; otherwise exits also go to shared cells. When the version cannot be read,
/// the shared cells: slower, but they load everywhere.
pub fn sums_per_cpu() -> bool {
    use aya::util::KernelVersion;
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 19, 0))
}

/// The host's ISA, whose exit reasons get cells in thread rows: VMX where the CPU
/// has `vmx`, SVM where it has `svm` (`/proc/cpuinfo`), else by vendor. A host runs
/// one vendor's KVM; exits of the other ISA would still be counted, in the overflow
/// maps.
pub fn host_isa() -> u32 {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    isa_of_cpuinfo(&cpuinfo)
}

/// [`host_isa`] from the text of `/proc/cpuinfo`.
pub(super) fn isa_of_cpuinfo(cpuinfo: &str) -> u32 {
    let line = |key: &str| {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map_or("", |(_, v)| v)
    };
    let flags: Vec<&str> = line("flags").split_whitespace().collect();
    if flags.contains(&"vmx") {
        return isa::VMX;
    }
    if flags.contains(&"svm") {
        return isa::SVM;
    }
    match line("vendor_id").trim() {
        "AuthenticAMD" | "HygonGenuine" => isa::SVM,
        _ => isa::VMX,
    }
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
        (
            maps::COUNT_OVERFLOW,
            on(counting || snap, config.max_overflow_rows, 1),
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
