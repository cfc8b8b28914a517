//! Loading the eBPF programs, attaching them, and copying their maps into a
//! [`Snapshot`]. This is the only module that touches aya.

use std::collections::BTreeSet;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{ProgramError, RawTracePoint, TracePoint},
};
use thiserror::Error;
use tracer_common::{
    CpuidEvent, ExitStats, HistKey, PhaseExitKey, PhaseVcpuKey, drop_kind, globals, limits, maps,
};

use crate::{
    guest::Leaves,
    report::ProgramCost,
    snapshot::{Drops, Overflow, Snapshot, sum_stats, sum_u64},
    tracefs::{Tracefs, TracefsError, Tracepoint},
};

/// How many verifier lines an error shows (the end of the log says what failed).
const VERIFIER_TAIL: usize = 12;

/// Failures of loading, attaching or reading the eBPF side.
#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("cannot load the eBPF object: {0}")]
    Object(#[source] aya::EbpfError),
    #[error(
        "the kernel rejected eBPF program {program} ({io_error}); the verifier's last lines:\n{tail}"
    )]
    Verifier {
        program: String,
        io_error: std::io::Error,
        tail: String,
    },
    #[error("cannot {action} eBPF program {program}: {source}")]
    Program {
        action: &'static str,
        program: String,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "the fields of {tracepoint} lie {span} bytes apart, kvmtrace reads them in one {max}-byte read: this kernel's tracepoint is not supported"
    )]
    FieldsApart {
        tracepoint: String,
        span: u32,
        max: u32,
    },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error(transparent)]
    Overflow(#[from] Overflow),
}

/// What to trace.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// The tracepoint of VM exits (`kvm:kvm_exit`; another name only in tests).
    pub exit_tracepoint: Tracepoint,
    /// The tracepoint of VM entries (`kvm:kvm_entry`).
    pub entry_tracepoint: Tracepoint,
    /// Count only these processes and their forked children; empty counts all.
    pub pids: BTreeSet<u32>,
    /// Count only this vcpu_id.
    pub vcpu: Option<u32>,
    /// Snapshot the host's counts at each guest read of these leaves.
    pub snapshots: Option<Leaves>,
    /// Entries of the per-reason map (one per phase and reason).
    pub max_reasons: u32,
    /// Entries of the per-vCPU map (one per VM, vCPU and reason).
    pub max_vcpu_rows: u32,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            exit_tracepoint: Tracepoint::new("kvm", "kvm_exit"),
            entry_tracepoint: Tracepoint::new("kvm", "kvm_entry"),
            pids: BTreeSet::new(),
            vcpu: None,
            snapshots: None,
            max_reasons: limits::MAX_REASONS,
            max_vcpu_rows: limits::MAX_VCPU_ROWS,
        }
    }
}

/// The loaded and attached programs. Dropping it detaches them.
pub struct Probe {
    ebpf: Ebpf,
    /// Forwards the eBPF side's warnings (full maps) to the `log` crate.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    cpuid_events: RingBuf<MapData>,
    /// False when this kernel has no `module:module_load`: everything is phase 0.
    tracks_phases: bool,
}

/// The programs, in attach order: the entry and fork programs first, so an exit is only
/// timed once its entry program is attached and children forked from now on are
/// followed.
const PROGRAMS: [&str; 6] = [
    "kvm_entry",
    "sched_switch",
    "sched_process_fork",
    "kvm_cpuid",
    "module_load",
    "kvm_exit",
];

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> ProbeError {
    move |source| ProbeError::Map { map, source }
}

impl Probe {
    /// Loads the programs with field offsets from `tracefs`, fills the pid filter, and
    /// attaches to the exit, entry and fork tracepoints.
    pub fn attach(tracefs: &Tracefs, config: &ProbeConfig) -> Result<Self, ProbeError> {
        let exit_tp = &config.exit_tracepoint;
        tracefs.require(exit_tp)?;
        tracefs.require(&config.entry_tracepoint)?;
        let fork_tp = Tracepoint::new("sched", "sched_process_fork");
        let switch_tp = Tracepoint::new("sched", "sched_switch");
        let fields = [
            tracefs.offset(exit_tp, "exit_reason")?,
            tracefs.offset(exit_tp, "isa")?,
            tracefs.offset(exit_tp, "vcpu_id")?,
        ];
        let [fields_off, reason_off, isa_off, vcpu_off] = exit_fields(exit_tp, fields)?;
        let child_off = tracefs.offset(&fork_tp, "child_pid")?;
        let cpuid_tp = Tracepoint::new("kvm", "kvm_cpuid");
        let cpuid_off = |field| tracefs.offset(&cpuid_tp, field);
        let cpuid_offsets = [
            (globals::CPUID_FUNCTION_OFF, cpuid_off("function")?),
            (globals::CPUID_INDEX_OFF, cpuid_off("index")?),
            (globals::CPUID_RAX_OFF, cpuid_off("rax")?),
            (globals::CPUID_RBX_OFF, cpuid_off("rbx")?),
            (globals::CPUID_RCX_OFF, cpuid_off("rcx")?),
            (globals::CPUID_RDX_OFF, cpuid_off("rdx")?),
        ];
        let leaves = config.snapshots;
        let snapshots = u32::from(leaves.is_some());
        let leaf_total = leaves.and_then(|l| l.total).unwrap_or(0);
        let leaf_count = leaves.map_or(0, |l| l.count);
        let leaf_cycles = leaves.and_then(|l| l.cycles).unwrap_or(0);
        let filter_enabled = u32::from(!config.pids.is_empty());
        let vcpu_filter = config.vcpu.unwrap_or(u32::MAX);
        // Optional: without it a vendor module reload does not start a new phase.
        let module_tp = Tracepoint::new("module", "module_load");
        let module_name_off = tracefs.offset(&module_tp, "name").ok();
        let name_off = module_name_off.unwrap_or(0);

        let for_snapshots = |size, otherwise| if leaves.is_some() { size } else { otherwise };
        let mut loader = loader_without_kernel_btf();
        loader
            .map_max_entries(maps::EXITS, config.max_reasons)
            .map_max_entries(maps::VCPU_EXITS, config.max_vcpu_rows)
            // Per-VM counts are only kept for snapshots. The kernel maps all of a ring
            // buffer's pages (twice) into our memory at once: it too is only sized for
            // snapshots when they are taken.
            .map_max_entries(maps::VM_EXITS, for_snapshots(limits::MAX_VM_ROWS, 1))
            .map_max_entries(maps::VM_TOTALS, for_snapshots(limits::MAX_VMS, 1))
            .map_max_entries(
                maps::CPUID_EVENTS,
                for_snapshots(limits::CPUID_RING_BYTES, limits::CPUID_RING_MIN_BYTES),
            )
            .override_global(globals::MODULE_NAME_OFF, &name_off, true);
        for (name, off) in &cpuid_offsets {
            loader.override_global(name, off, true);
        }
        let mut ebpf = loader
            .override_global(globals::SNAPSHOTS, &snapshots, true)
            .override_global(globals::LEAF_TOTAL, &leaf_total, true)
            .override_global(globals::LEAF_COUNT, &leaf_count, true)
            .override_global(globals::LEAF_CYCLES, &leaf_cycles, true)
            .override_global(globals::EXIT_FIELDS_OFF, &fields_off, true)
            .override_global(globals::EXIT_REASON_OFF, &reason_off, true)
            .override_global(globals::EXIT_ISA_OFF, &isa_off, true)
            .override_global(globals::EXIT_VCPU_OFF, &vcpu_off, true)
            .override_global(globals::FORK_CHILD_OFF, &child_off, true)
            .override_global(globals::FILTER_PIDS_ENABLED, &filter_enabled, true)
            .override_global(globals::VCPU_FILTER, &vcpu_filter, true)
            .load(aya::include_bytes_aligned!(concat!(
                env!("OUT_DIR"),
                "/tracer"
            )))
            .map_err(ProbeError::Object)?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .map_err(|e| log::debug!("no eBPF logger: {e}"))
            .ok();

        {
            let mut filter: HashMap<&mut MapData, u32, u32> = HashMap::try_from(
                ebpf.map_mut(maps::FILTER_PIDS)
                    .ok_or(ProbeError::MissingMap(maps::FILTER_PIDS))?,
            )
            .map_err(map_err(maps::FILTER_PIDS))?;
            for pid in &config.pids {
                filter
                    .insert(pid, 1, 0)
                    .map_err(map_err(maps::FILTER_PIDS))?;
            }
        }

        for program in PROGRAMS {
            let tp = match program {
                "kvm_entry" => &config.entry_tracepoint,
                "sched_switch" => &switch_tp,
                "sched_process_fork" => &fork_tp,
                "module_load" if module_name_off.is_none() => {
                    log::info!(
                        "this kernel has no {module_tp}: a kvm module reload during the record does not start a new phase"
                    );
                    continue;
                }
                "module_load" => &module_tp,
                // Its tracepoint fires on every CPUID exit: only pay for it when used.
                "kvm_cpuid" if leaves.is_none() => continue,
                "kvm_cpuid" => &cpuid_tp,
                _ => exit_tp,
            };
            let prog = ebpf
                .program_mut(program)
                .ok_or_else(|| ProbeError::Program {
                    action: "find",
                    program: program.to_owned(),
                    source: ProgramError::NotLoaded,
                })?;
            let unusable = |source| ProbeError::Program {
                action: "use",
                program: program.to_owned(),
                source,
            };
            let attached = if matches!(program, "kvm_entry" | "sched_switch") {
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
            })?;
        }
        let cpuid_events = RingBuf::try_from(
            ebpf.take_map(maps::CPUID_EVENTS)
                .ok_or(ProbeError::MissingMap(maps::CPUID_EVENTS))?,
        )
        .map_err(map_err(maps::CPUID_EVENTS))?;
        Ok(Self {
            ebpf,
            logger,
            cpuid_events,
            tracks_phases: module_name_off.is_some(),
        })
    }

    /// Whether a vendor module load starts a new phase on this kernel.
    pub fn tracks_phases(&self) -> bool {
        self.tracks_phases
    }

    /// The current phase: how many times kvm_intel or kvm_amd was loaded since attach.
    pub fn phase(&self) -> Result<u32, ProbeError> {
        let phase: Array<&MapData, u32> = Array::try_from(
            self.ebpf
                .map(maps::PHASE)
                .ok_or(ProbeError::MissingMap(maps::PHASE))?,
        )
        .map_err(map_err(maps::PHASE))?;
        phase.get(&0, 0).map_err(map_err(maps::PHASE))
    }

    /// Run counts and times of the probe's programs. The times stay 0 unless
    /// `kernel.bpf_stats_enabled` is 1.
    pub fn costs(&self) -> Vec<ProgramCost> {
        self.ebpf
            .programs()
            .filter_map(|(name, prog)| {
                let info = prog.info().ok()?;
                Some(ProgramCost {
                    name: name.to_owned(),
                    run_count: info.run_count(),
                    run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                    jited_bytes: info.size_jitted(),
                })
            })
            .collect()
    }

    /// Takes the guest counter-leaf reads recorded since the last call.
    pub fn drain_cpuid(&mut self, into: &mut Vec<CpuidEvent>) {
        while let Some(item) = self.cpuid_events.next() {
            if item.len() >= size_of::<CpuidEvent>() {
                // SAFETY: the eBPF side writes whole CpuidEvents; read_unaligned copes
                // with the ring buffer's 8-byte alignment.
                into.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<CpuidEvent>()) });
            }
        }
    }

    /// Passes the eBPF side's pending log records to the `log` crate.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    /// Adds a process (and, from now on, its children) to the pid filter.
    pub fn trace_pid(&mut self, pid: u32) -> Result<(), ProbeError> {
        let mut filter: HashMap<&mut MapData, u32, u32> = HashMap::try_from(
            self.ebpf
                .map_mut(maps::FILTER_PIDS)
                .ok_or(ProbeError::MissingMap(maps::FILTER_PIDS))?,
        )
        .map_err(map_err(maps::FILTER_PIDS))?;
        filter.insert(pid, 1, 0).map_err(map_err(maps::FILTER_PIDS))
    }

    /// Copies every map, summed over CPUs.
    pub fn snapshot(&self) -> Result<Snapshot, ProbeError> {
        let map = |name: &'static str| self.ebpf.map(name).ok_or(ProbeError::MissingMap(name));
        let mut snap = Snapshot::default();

        // Every counted exit is in a per-vCPU row, or (when that map was full) in the
        // per-reason overflow map.
        let vcpus: PerCpuHashMap<&MapData, PhaseVcpuKey, ExitStats> =
            PerCpuHashMap::try_from(map(maps::VCPU_EXITS)?).map_err(map_err(maps::VCPU_EXITS))?;
        for item in vcpus.iter() {
            let (key, per_cpu) = item.map_err(map_err(maps::VCPU_EXITS))?;
            let stats = sum_stats(per_cpu.iter())?;
            snap.add_vcpu(key.vcpu(), stats)?;
            snap.add_exits(key.phase(), key.exit(), stats)?;
        }
        let overflow: PerCpuHashMap<&MapData, PhaseExitKey, ExitStats> =
            PerCpuHashMap::try_from(map(maps::EXITS)?).map_err(map_err(maps::EXITS))?;
        for item in overflow.iter() {
            let (key, per_cpu) = item.map_err(map_err(maps::EXITS))?;
            snap.add_exits(key.phase, key.exit, sum_stats(per_cpu.iter())?)?;
        }

        let hist: PerCpuHashMap<&MapData, HistKey, u64> =
            PerCpuHashMap::try_from(map(maps::HIST)?).map_err(map_err(maps::HIST))?;
        for item in hist.iter() {
            let (key, per_cpu) = item.map_err(map_err(maps::HIST))?;
            snap.add_hist(
                key.exit(),
                key.bucket(),
                sum_u64(per_cpu.iter().copied(), "histogram")?,
            )?;
        }

        let drops: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map(maps::DROPS)?).map_err(map_err(maps::DROPS))?;
        let mut counts = Drops::default();
        for kind in 0..drop_kind::COUNT {
            let per_cpu = drops.get(&kind, 0).map_err(map_err(maps::DROPS))?;
            counts.0[kind as usize] = sum_u64(per_cpu.iter().copied(), "dropped")?;
        }
        snap.drops = counts;
        Ok(snap)
    }
}

/// Where the one read of the exit fields starts, and each field's offset from there.
fn exit_fields(tp: &Tracepoint, offsets: [u32; 3]) -> Result<[u32; 4], ProbeError> {
    let base = offsets.iter().copied().min().unwrap_or(0);
    let end = offsets.iter().map(|o| o + 4).max().unwrap_or(0);
    let rel = offsets.map(|o| o - base);
    if end - base > limits::EXIT_FIELDS_BYTES || rel.iter().any(|r| r % 4 != 0) {
        return Err(ProbeError::FieldsApart {
            tracepoint: tp.to_string(),
            span: end - base,
            max: limits::EXIT_FIELDS_BYTES,
        });
    }
    Ok([base, rel[0], rel[1], rel[2]])
}

/// An `EbpfLoader` that has not parsed the kernel's BTF. The programs have no CO-RE
/// relocations (field offsets come from tracefs), but `EbpfLoader::new` parses all of
/// /sys/kernel/btf/vmlinux anyway: on a 6.x kernel that is most of kvmtrace's start
/// time and ~17 MB of its peak memory. So the loader is made in a private mount
/// namespace where that file is hidden, and the thread goes back to its own namespace
/// at once. If that cannot be done, the loader has simply parsed the BTF.
fn loader_without_kernel_btf() -> EbpfLoader<'static> {
    use std::os::fd::AsRawFd as _;
    let Ok(own) = std::fs::File::open("/proc/self/ns/mnt") else {
        return EbpfLoader::new();
    };
    // SAFETY: plain syscalls on this thread; no memory is shared with them.
    let hidden = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
            && libc::mount(
                c"none".as_ptr(),
                c"/sys/kernel/btf".as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY,
                std::ptr::null(),
            ) == 0
    };
    let loader = EbpfLoader::new();
    // SAFETY: `own` is this process's original mount namespace.
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
        log::warn!(
            "cannot return to the original mount namespace: {}",
            std::io::Error::last_os_error()
        );
    }
    if !hidden {
        log::debug!("kernel BTF not hidden: {}", std::io::Error::last_os_error());
    }
    loader
}

fn load_error(program: &str, err: ProgramError) -> ProbeError {
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(VERIFIER_TAIL)..].join("\n");
            ProbeError::Verifier {
                program: program.to_owned(),
                io_error,
                tail,
            }
        }
        source => ProbeError::Program {
            action: "load",
            program: program.to_owned(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_fields_are_read_at_once() {
        let tp = Tracepoint::new("kvm", "kvm_exit");
        // 6.1: exit_reason 8, isa 24 (after guest_rip), vcpu_id 56.
        assert_eq!(exit_fields(&tp, [8, 24, 56]).ok(), Some([8, 0, 16, 48]));
        assert_eq!(exit_fields(&tp, [56, 8, 24]).ok(), Some([8, 48, 0, 16]));
        let apart = exit_fields(&tp, [8, 24, 80]).err().map(|e| e.to_string());
        assert!(
            apart.is_some_and(|e| e.contains("76 bytes apart")),
            "fields too far apart are refused"
        );
        assert!(exit_fields(&tp, [8, 26, 40]).is_err(), "misaligned");
    }

    #[test]
    fn packed_keys_round_trip() {
        let exit = tracer_common::ExitKey::from_raw(tracer_common::isa::VMX, 0x8000_0021);
        let vcpu = tracer_common::VcpuKey {
            pid: 4_194_304,
            vcpu_id: 4095,
            exit,
        };
        let row = tracer_common::PhaseVcpuKey::new(3, &vcpu);
        assert_eq!((row.phase(), row.vcpu()), (3, vcpu));
        assert_eq!(
            tracer_common::PhaseVcpuKey::new(70_000, &vcpu).phase(),
            0xffff,
            "saturates"
        );
        let svm = tracer_common::ExitKey::from_raw(tracer_common::isa::SVM, 0x8000_0010);
        let h = tracer_common::HistKey::new(&svm, 47);
        assert_eq!((h.exit(), h.bucket()), (svm, 47));
        assert_eq!(size_of::<PhaseVcpuKey>(), 16);
        assert_eq!(size_of::<HistKey>(), 8);
        assert_eq!(size_of::<tracer_common::PendingExit>(), 32);
    }
}
