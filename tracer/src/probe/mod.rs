//! Loading the eBPF programs, attaching them, and copying their maps into a
//! [`Snapshot`]. This is the only module that touches aya.

use std::collections::BTreeSet;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{KProbe, ProgramError},
};
use thiserror::Error;
use tracer_common::{
    CpuidEvent, DetailKey, ExitKey, ExitStats, HistKey, PendingExit, PhaseExitKey, PhaseVcpuKey,
    RegsSample, RipKey, drop_kind, limits, maps, regs_slot,
};

use kvmtrace_model::{
    leaves::Leaves,
    snapshot::{Drops, Overflow, ProgramCost, Snapshot, sum_stats, sum_u64},
    tracefs_format::Tracepoint,
};

mod counts;
pub mod memory;
#[cfg(test)]
mod object_check;
mod setup;
pub use setup::{host_isa, sums_per_cpu};

use setup::Setup;

use crate::{
    exit_layout::Choice,
    tracefs::{Tracefs, TracefsError},
    vcpu_regs,
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
    #[error("count cell {0} stands for no exit reason: the eBPF object and this kvmtrace disagree")]
    CellWithoutReason(u32),
    #[error(
        "the kvm vendor module was reloaded and its layout changed: the counts read {was}, it now needs the {now}; restart kvmtrace, or record with time (without --counts-only)"
    )]
    LayoutChanged { was: String, now: String },
    #[error("cannot read the maps of the eBPF object: {0}")]
    ObjectMaps(String),
    #[error("cannot tell how many CPUs this host has: {0}")]
    Cpus(#[source] std::io::Error),
}

/// Where the kernel publishes BTF (vmlinux's, and each module's split on it).
pub const BTF_DIR: &str = "/sys/kernel/btf";

/// What to trace.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// The tracepoint of VM exits (`kvm:kvm_exit`; another name only in tests).
    pub exit_tracepoint: Tracepoint,
    /// The tracepoint of VM entries (`kvm:kvm_entry`).
    pub entry_tracepoint: Tracepoint,
    /// Count only these processes and their child processes (added as they are
    /// created, removed as they exit); empty counts all.
    pub pids: BTreeSet<u32>,
    /// Count only this vcpu_id.
    pub vcpu: Option<u32>,
    /// Snapshot the host's counts at each guest read of these leaves.
    pub snapshots: Option<Leaves>,
    /// Where the vCPU registers are, when known before attach (BTF); `None` with
    /// snapshots: learned from the first exits (see [`vcpu_regs`]).
    pub regs: Option<kvmtrace_model::regs_layout::Layout>,
    /// Count each reason's exits per sub-key (`--detail`).
    pub detail: bool,
    /// Count exits per guest RIP (`--rip`).
    pub rips: bool,
    /// Entries of the per-reason map (one per phase and reason).
    pub max_overflow_rows: u32,
    /// Entries of the per-vCPU map (one per VM, vCPU and reason).
    pub max_vcpu_rows: u32,
    /// The count path, and how it reads exits: counts per VM and reason only, no
    /// time, no vCPU, no snapshots. `None`: the timing path.
    pub counts: Option<Choice>,
    /// The timing path: read each exit from the vCPU at these offsets (a raw
    /// tracepoint) instead of the `kvm:kvm_exit` record. Only where nothing needs the
    /// record's other fields: no `--detail`, no `--rip`, no register learning.
    pub raw_exit: Option<crate::exit_layout::Offsets>,
    /// With snapshots: a counter read sums the all-VMs count's per-CPU cells in the
    /// kernel (5.19+, [`sums_per_cpu`]); false: every exit also adds to a shared cell.
    pub sum_per_cpu: bool,
    /// The timing path on thread rows: each exit is parked with its thread's slot and
    /// its entry counts and times it in the thread's row, with no hash lookup at
    /// either (per VM, or per vCPU with `vcpu_rows`). Only without `vcpu`, `detail`
    /// and `rips` ([`ProbeConfig::per_vm_time_fits`]).
    pub vm_time: bool,
    /// The ISA whose reasons have cells in thread rows and latency cells: the host's
    /// ([`host_isa`]).
    pub cell_isa: u32,
    /// With `vm_time`: a row per vCPU (the thread's `vcpu_id`), not per VM.
    pub vcpu_rows: bool,
}

impl ProbeConfig {
    /// Whether nothing asked for needs the hash rows: the timing path can then keep
    /// thread rows (`vm_time`), per VM or per vCPU (`vcpu_rows`). Snapshots keep
    /// their own rows per VM beside them.
    pub fn per_vm_time_fits(&self) -> bool {
        self.counts.is_none() && self.vcpu.is_none() && !self.detail && !self.rips
    }
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            exit_tracepoint: Tracepoint::new("kvm", "kvm_exit"),
            entry_tracepoint: Tracepoint::new("kvm", "kvm_entry"),
            pids: BTreeSet::new(),
            vcpu: None,
            snapshots: None,
            regs: None,
            detail: false,
            rips: false,
            max_overflow_rows: limits::MAX_OVERFLOW_ROWS,
            max_vcpu_rows: limits::MAX_VCPU_ROWS,
            counts: None,
            raw_exit: None,
            sum_per_cpu: setup::sums_per_cpu(),
            vm_time: false,
            cell_isa: setup::host_isa(),
            vcpu_rows: false,
        }
    }
}

/// The loaded and attached programs. Dropping it detaches them.
pub struct Probe {
    ebpf: Ebpf,
    /// Forwards the eBPF side's warnings (full maps) to the `log` crate.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    cpuid_events: RingBuf<MapData>,
    /// Register-learning samples (see [`vcpu_regs`]).
    regs_samples: RingBuf<MapData>,
    /// Whether the pid filter is on.
    filter_enabled: bool,
    /// False when this kernel has no `module:module_load`: everything is phase 0.
    tracks_phases: bool,
    /// Whether the probe on `vmx_vcpu_run()` counts synthetic exits.
    counts_synthetic: bool,
    /// The count path's state; `None` on the timing path.
    counts: Option<counts::CountPath>,
    /// The ISA whose reasons have cells ([`ProbeConfig::cell_isa`]).
    cell_isa: u32,
    /// Each map's planned cost ([`memory::plan`]), to set beside the kernel's.
    plan: Vec<memory::MapBytes>,
}

/// The function whose runs that enter no guest are KVM's synthetic exits.
const VMX_VCPU_RUN: &str = "vmx_vcpu_run";

/// Attaches the synthetic-exit counter to `vmx_vcpu_run()` where kvm_intel is loaded
/// (its runs without a `kvm_entry` made up an INVALID_STATE exit), and tells the
/// programs it counts. Elsewhere (kvm_amd, no kvm_intel yet, or a kernel that hides
/// the symbol) synthetic exits stay unknown, which reconcile says: returns false.
fn attach_synthetic_counter(ebpf: &mut Ebpf) -> Result<bool, ProbeError> {
    let present = std::fs::read_to_string("/proc/kallsyms").is_ok_and(|k| {
        k.lines()
            .any(|l| l.split_whitespace().nth(2) == Some(VMX_VCPU_RUN))
    });
    if !present {
        log::debug!("no {VMX_VCPU_RUN} in /proc/kallsyms: synthetic exits are not counted");
        return Ok(false);
    }
    let program = "vcpu_run_vmx";
    let prog = find_program(ebpf, program)?;
    let kprobe: &mut KProbe = prog.try_into().map_err(|source| ProbeError::Program {
        action: "use",
        program: program.to_owned(),
        source,
    })?;
    kprobe.load().map_err(|e| load_error(program, e))?;
    if let Err(e) = kprobe.attach(VMX_VCPU_RUN, 0) {
        log::info!("cannot probe {VMX_VCPU_RUN} ({e}): synthetic exits are not counted");
        return Ok(false);
    }
    let mut regs: Array<&mut MapData, u32> = Array::try_from(
        ebpf.map_mut(maps::REGS)
            .ok_or(ProbeError::MissingMap(maps::REGS))?,
    )
    .map_err(map_err(maps::REGS))?;
    regs.set(regs_slot::SYNTHETIC_TRACKED, 1, 0)
        .map_err(map_err(maps::REGS))?;
    Ok(true)
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> ProbeError {
    move |source| ProbeError::Map { map, source }
}

/// Puts the `-p` / `-- CMD` processes in the pid filter.
fn fill_pid_filter(ebpf: &mut Ebpf, pids: &BTreeSet<u32>) -> Result<(), ProbeError> {
    let mut filter: HashMap<&mut MapData, u32, u32> = HashMap::try_from(
        ebpf.map_mut(maps::FILTER_PIDS)
            .ok_or(ProbeError::MissingMap(maps::FILTER_PIDS))?,
    )
    .map_err(map_err(maps::FILTER_PIDS))?;
    for pid in pids {
        filter
            .insert(pid, 1, 0)
            .map_err(map_err(maps::FILTER_PIDS))?;
    }
    Ok(())
}

/// With snapshots: where the vCPU registers are, when known (BTF), or how many
/// exits may be sampled to learn it.
fn set_regs_source(ebpf: &mut Ebpf, config: &ProbeConfig) -> Result<(), ProbeError> {
    let mut regs: Array<&mut MapData, u32> = Array::try_from(
        ebpf.map_mut(maps::REGS)
            .ok_or(ProbeError::MissingMap(maps::REGS))?,
    )
    .map_err(map_err(maps::REGS))?;
    let (slot, value) = match &config.regs {
        Some(layout) => (regs_slot::OFFSET_PLUS_ONE, layout.regs_offset + 1),
        None => (regs_slot::LEARN_BUDGET, vcpu_regs::MAX_SAMPLES),
    };
    regs.set(slot, value, 0).map_err(map_err(maps::REGS))
}

impl Probe {
    /// Loads the programs with field offsets from `tracefs`, fills the pid filter, and
    /// attaches to the exit, entry and fork tracepoints.
    pub fn attach(tracefs: &Tracefs, config: &ProbeConfig) -> Result<Self, ProbeError> {
        let setup = Setup::read(tracefs, config)?;
        let mut loader = loader_without_kernel_btf();
        for (map, size) in setup::map_sizes(config) {
            loader.map_max_entries(map, size);
        }
        for (name, value) in &setup.globals {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader.load(memory::object()).map_err(ProbeError::Object)?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .map_err(|e| log::debug!("no eBPF logger: {e}"))
            .ok();
        fill_pid_filter(&mut ebpf, &config.pids)?;
        let leaves = config.snapshots;
        if leaves.is_some() {
            set_regs_source(&mut ebpf, config)?;
        }
        setup.attach_programs(&mut ebpf, config)?;
        let counts_synthetic = leaves.is_some() && attach_synthetic_counter(&mut ebpf)?;
        let cpuid_events = RingBuf::try_from(
            ebpf.take_map(maps::CPUID_EVENTS)
                .ok_or(ProbeError::MissingMap(maps::CPUID_EVENTS))?,
        )
        .map_err(map_err(maps::CPUID_EVENTS))?;
        let regs_samples = RingBuf::try_from(
            ebpf.take_map(maps::REGS_SAMPLES)
                .ok_or(ProbeError::MissingMap(maps::REGS_SAMPLES))?,
        )
        .map_err(map_err(maps::REGS_SAMPLES))?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, e)| ProbeError::Cpus(e))?;
        let mut probe = Self {
            plan: memory::plan(config, u32::try_from(nr_cpus).unwrap_or(u32::MAX))?,
            cell_isa: config.cell_isa,
            ebpf,
            logger,
            cpuid_events,
            regs_samples,
            filter_enabled: !config.pids.is_empty(),
            tracks_phases: setup.tracks_phases(),
            counts_synthetic,
            counts: (config.counts.is_some() || leaves.is_some() || config.vm_time).then(|| {
                counts::CountPath::new(
                    config.counts.clone(),
                    config.vm_time,
                    leaves.is_some(),
                    config.cell_isa,
                )
            }),
        };
        probe.fill_free_slots()?;
        Ok(probe)
    }

    /// How the count path reads exits; `None` on the timing path.
    pub fn count_path(&self) -> Option<&Choice> {
        self.counts.as_ref().and_then(|c| c.choice.as_ref())
    }

    /// Whether the timing path keeps per-VM rows in the count path's cells
    /// ([`ProbeConfig::vm_time`]).
    pub fn per_vm_time(&self) -> bool {
        self.counts.as_ref().is_some_and(|c| c.times)
    }

    /// Whether the rows are thread rows: the count path, or the timing path's.
    fn rows_in_cells(&self) -> bool {
        self.count_path().is_some() || self.per_vm_time()
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, ProbeError> {
        self.ebpf.map(name).ok_or(ProbeError::MissingMap(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, ProbeError> {
        self.ebpf.map_mut(name).ok_or(ProbeError::MissingMap(name))
    }

    /// Whether synthetic VMX exits are counted (see [`attach_synthetic_counter`]).
    pub fn counts_synthetic(&self) -> bool {
        self.counts_synthetic
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

    /// Every map's entries and kernel bytes, as the kernel charges them.
    pub fn map_costs(&self) -> Vec<kvmtrace_model::snapshot::MapCost> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let data = |map: &aya::maps::Map| match map {
            aya::maps::Map::Array(m)
            | aya::maps::Map::PerCpuArray(m)
            | aya::maps::Map::HashMap(m)
            | aya::maps::Map::PerCpuHashMap(m)
            | aya::maps::Map::Queue(m)
            | aya::maps::Map::RingBuf(m) => Some((
                m.fd().as_fd().as_raw_fd(),
                m.info().map_or(0, |i| i.max_entries()),
            )),
            _ => None,
        };
        let mut out: Vec<_> = self
            .ebpf
            .maps()
            .filter_map(|(name, map)| Some((name.to_owned(), data(map)?)))
            .chain([
                (
                    maps::CPUID_EVENTS.to_owned(),
                    (self.cpuid_events.as_raw_fd(), 0),
                ),
                (
                    maps::REGS_SAMPLES.to_owned(),
                    (self.regs_samples.as_raw_fd(), 0),
                ),
            ])
            .filter_map(|(name, (fd, entries))| {
                let planned = self.plan.iter().find(|m| m.name == name);
                Some(kvmtrace_model::snapshot::MapCost {
                    entries: planned.map_or(entries, |m| m.entries),
                    planned_bytes: planned.map(|m| m.footprint),
                    kernel_bytes: memory::charged(fd)?,
                    name,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            b.kernel_bytes
                .cmp(&a.kernel_bytes)
                .then(a.name.cmp(&b.name))
        });
        out
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

    /// Feeds the register-learning samples sent since the last call to `learner`.
    pub fn drain_regs_samples(&mut self, learner: &mut vcpu_regs::Learner) {
        while let Some(item) = self.regs_samples.next() {
            if item.len() >= size_of::<RegsSample>() {
                // SAFETY: the eBPF side writes whole RegsSamples; read_unaligned copes
                // with the ring buffer's 8-byte alignment.
                let sample =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RegsSample>()) };
                // 0: the vCPU could not be read.
                if sample.guest_rip != 0 {
                    learner.add(sample.guest_rip, &sample.window);
                }
            }
        }
    }

    fn regs_map(&mut self) -> Result<Array<&mut MapData, u32>, ProbeError> {
        Array::try_from(
            self.ebpf
                .map_mut(maps::REGS)
                .ok_or(ProbeError::MissingMap(maps::REGS))?,
        )
        .map_err(map_err(maps::REGS))
    }

    /// From now on, reads the vCPU registers at `layout` and stops learning.
    pub fn set_regs_layout(
        &mut self,
        layout: &kvmtrace_model::regs_layout::Layout,
    ) -> Result<(), ProbeError> {
        let mut regs = self.regs_map()?;
        regs.set(regs_slot::LEARN_BUDGET, 0, 0)
            .map_err(map_err(maps::REGS))?;
        regs.set(regs_slot::OFFSET_PLUS_ONE, layout.regs_offset + 1, 0)
            .map_err(map_err(maps::REGS))
    }

    /// CPUID exits of traced VMs seen while the register layout was not known yet.
    pub fn cpuid_exits_before_layout(&mut self) -> Result<u64, ProbeError> {
        let regs = self.regs_map()?;
        Ok(u64::from(
            regs.get(&regs_slot::CPUID_BEFORE_LAYOUT, 0)
                .map_err(map_err(maps::REGS))?,
        ))
    }

    /// Passes the eBPF side's pending log records to the `log` crate.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    /// Adds a process (and, from now on, its child processes) to the pid filter.
    pub fn trace_pid(&mut self, pid: u32) -> Result<(), ProbeError> {
        let mut filter: HashMap<&mut MapData, u32, u32> = HashMap::try_from(
            self.ebpf
                .map_mut(maps::FILTER_PIDS)
                .ok_or(ProbeError::MissingMap(maps::FILTER_PIDS))?,
        )
        .map_err(map_err(maps::FILTER_PIDS))?;
        filter
            .insert(pid, 1, 0)
            .map_err(map_err(maps::FILTER_PIDS))?;
        // The count path may have cached the process as not traced: a new epoch
        // makes every CPU look again.
        let mut epoch: Array<&mut MapData, u32> = Array::try_from(self.map_mut(maps::COUNT_EPOCH)?)
            .map_err(map_err(maps::COUNT_EPOCH))?;
        let now = epoch.get(&0, 0).map_err(map_err(maps::COUNT_EPOCH))?;
        epoch
            .set(0, now.wrapping_add(1), 0)
            .map_err(map_err(maps::COUNT_EPOCH))
    }

    /// Deletes the per-vCPU rows of VM process `pid` (it has ended): its exits leave
    /// every later snapshot. Returns what the deleted rows held, per exit reason.
    pub fn forget_vm(&mut self, pid: u32) -> Result<Vec<(ExitKey, ExitStats)>, ProbeError> {
        if self.count_path().is_some() {
            return self.forget_counted_vm(pid);
        }
        // Per-VM time: the cells, and the rows of reasons without a cell.
        let mut gone_cells = if self.per_vm_time() {
            self.forget_counted_vm(pid)?
        } else {
            Vec::new()
        };
        let mut rows: PerCpuHashMap<&mut MapData, PhaseVcpuKey, ExitStats> =
            PerCpuHashMap::try_from(
                self.ebpf
                    .map_mut(maps::VCPU_EXITS)
                    .ok_or(ProbeError::MissingMap(maps::VCPU_EXITS))?,
            )
            .map_err(map_err(maps::VCPU_EXITS))?;
        let mut gone = Vec::new();
        for item in rows.iter() {
            let (key, per_cpu) = item.map_err(map_err(maps::VCPU_EXITS))?;
            if key.vcpu().pid == pid {
                gone.push((key, sum_stats(per_cpu.iter())?));
            }
        }
        for (key, _) in &gone {
            rows.remove(key).map_err(map_err(maps::VCPU_EXITS))?;
        }
        gone_cells.extend(gone.into_iter().map(|(k, s)| (k.exit(), s)));
        Ok(gone_cells)
    }

    /// Copies every map, summed over CPUs (on the count path, after its upkeep: see
    /// [`Probe::tick`]).
    pub fn snapshot(&mut self) -> Result<Snapshot, ProbeError> {
        let mut snap = Snapshot::default();
        if self.rows_in_cells() {
            self.count_rows(&mut snap)?;
        } else {
            self.tick()?;
        }
        let map = |name: &'static str| self.ebpf.map(name).ok_or(ProbeError::MissingMap(name));

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
        // Exits still waiting for their entry (counted there): parked per CPU, or per
        // thread once the thread left its CPU.
        if self.count_path().is_none() {
            let one = ExitStats {
                count: 1,
                ..ExitStats::default()
            };
            // The per-VM timing path parks exits in per-VM rows (vcpu_id: all).
            let mut parked = Vec::new();
            let slots: PerCpuArray<&MapData, PendingExit> =
                PerCpuArray::try_from(map(maps::CPU_PENDING)?)
                    .map_err(map_err(maps::CPU_PENDING))?;
            let per_cpu = slots.get(&0, 0).map_err(map_err(maps::CPU_PENDING))?;
            parked.extend(per_cpu.iter().filter(|p| p.start_ns != 0).map(|p| p.row));
            let threads: HashMap<&MapData, u32, PendingExit> =
                HashMap::try_from(map(maps::PENDING)?).map_err(map_err(maps::PENDING))?;
            // The eBPF side deletes entries while we walk: a bounded walk.
            let walk = 2 * limits::MAX_PENDING as usize;
            parked.extend(
                threads
                    .iter()
                    .take(walk)
                    .map_while(Result::ok)
                    .filter(|(_, p)| p.start_ns != 0)
                    .map(|(_, p)| p.row),
            );
            for row in parked {
                snap.add_vcpu(row.vcpu(), one)?;
                snap.add_exits(row.phase(), row.exit(), one)?;
            }
        }
        let overflow: PerCpuHashMap<&MapData, PhaseExitKey, ExitStats> =
            PerCpuHashMap::try_from(map(maps::OVERFLOW_EXITS)?)
                .map_err(map_err(maps::OVERFLOW_EXITS))?;
        for item in overflow.iter() {
            let (key, per_cpu) = item.map_err(map_err(maps::OVERFLOW_EXITS))?;
            snap.add_exits(key.phase, key.exit, sum_stats(per_cpu.iter())?)?;
        }

        let cells: PerCpuArray<&MapData, [u64; limits::HIST_BUCKETS as usize]> =
            PerCpuArray::try_from(map(maps::LATENCY_CELLS)?)
                .map_err(map_err(maps::LATENCY_CELLS))?;
        if self.count_path().is_none() {
            for cell in 0..tracer_common::rows::CELLS {
                let Some(exit) = tracer_common::rows::exit_of(self.cell_isa, cell) else {
                    continue;
                };
                let per_cpu = cells.get(&cell, 0).map_err(map_err(maps::LATENCY_CELLS))?;
                for bucket in 0..limits::HIST_BUCKETS {
                    let n = sum_u64(per_cpu.iter().map(|b| b[bucket as usize]), "histogram")?;
                    if n > 0 {
                        snap.add_hist(exit, bucket, n)?;
                    }
                }
            }
        }
        let hist: PerCpuHashMap<&MapData, HistKey, u64> =
            PerCpuHashMap::try_from(map(maps::LATENCY_HIST)?)
                .map_err(map_err(maps::LATENCY_HIST))?;
        for item in hist.iter() {
            let (key, per_cpu) = item.map_err(map_err(maps::LATENCY_HIST))?;
            snap.add_hist(
                key.exit(),
                key.bucket(),
                sum_u64(per_cpu.iter().copied(), "histogram")?,
            )?;
        }

        let detail: PerCpuHashMap<&MapData, DetailKey, ExitStats> =
            PerCpuHashMap::try_from(map(maps::DETAIL_EXITS)?)
                .map_err(map_err(maps::DETAIL_EXITS))?;
        for item in detail.iter() {
            let (key, per_cpu) = item.map_err(map_err(maps::DETAIL_EXITS))?;
            snap.detail.insert(key, sum_stats(per_cpu.iter())?);
        }
        let rips: PerCpuHashMap<&MapData, RipKey, u64> =
            PerCpuHashMap::try_from(map(maps::RIP_EXITS)?).map_err(map_err(maps::RIP_EXITS))?;
        for item in rips.iter() {
            let (key, per_cpu) = item.map_err(map_err(maps::RIP_EXITS))?;
            snap.rips
                .insert(key, sum_u64(per_cpu.iter().copied(), "rip count")?);
        }

        let drops: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map(maps::DROPS)?).map_err(map_err(maps::DROPS))?;
        let mut counts = Drops::default();
        for kind in 0..drop_kind::COUNT {
            let per_cpu = drops.get(&kind, 0).map_err(map_err(maps::DROPS))?;
            counts.kinds[kind as usize] = sum_u64(per_cpu.iter().copied(), "dropped")?;
        }
        counts.recursion_misses = self.recursion_misses()?;
        snap.drops = counts;
        snap.filter_pids = self.filter_pids()?;
        Ok(snap)
    }

    /// Runs of kvmtrace's programs the kernel skipped because another eBPF program was
    /// running on that CPU, summed over the programs (0 on kernels before 5.12, which do
    /// not report them; classic tracepoint programs count them since 6.7).
    fn recursion_misses(&self) -> Result<u64, ProbeError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let mut misses = Vec::new();
        for (name, prog) in self.ebpf.programs() {
            // A program that was not loaded (kvm_cpuid without snapshots) has no fd.
            let Ok(fd) = prog.fd() else { continue };
            match prog_recursion_misses(fd.as_fd().as_raw_fd()) {
                Ok(n) => misses.push(n.unwrap_or(0)),
                Err(e) => log::debug!("cannot read bpf_prog_info of {name}: {e}"),
            }
        }
        Ok(sum_u64(misses, "recursion_misses")?)
    }

    /// How many processes the pid filter holds now; `None` when it is off.
    fn filter_pids(&self) -> Result<Option<u64>, ProbeError> {
        let filter: HashMap<&MapData, u32, u32> = HashMap::try_from(
            self.ebpf
                .map(maps::FILTER_PIDS)
                .ok_or(ProbeError::MissingMap(maps::FILTER_PIDS))?,
        )
        .map_err(map_err(maps::FILTER_PIDS))?;
        // The eBPF side adds and deletes keys while we walk, and a walk whose key was
        // just deleted starts over: distinct keys only, and a bounded walk.
        let walk = 2 * limits::MAX_FILTER_PIDS as usize;
        let pids: BTreeSet<u32> = filter.keys().take(walk).map_while(Result::ok).collect();
        Ok(self.filter_enabled.then_some(pids.len() as u64))
    }
}

/// The head of the kernel's `struct bpf_prog_info` (uapi `linux/bpf.h`), up to
/// `recursion_misses`: 26 u64-sized words of older fields, then the counter.
#[repr(C)]
#[derive(Default)]
struct ProgInfoHead {
    _before: [u64; 26],
    recursion_misses: u64,
}

/// The `info` member of `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The `bpf(2)` command that fills a `bpf_prog_info`.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;

/// A program's `recursion_misses`, read with `BPF_OBJ_GET_INFO_BY_FD`; `None` when the
/// kernel's `bpf_prog_info` is too short to hold it (before 5.12).
fn prog_recursion_misses(fd: std::os::fd::RawFd) -> std::io::Result<Option<u64>> {
    let mut info = ProgInfoHead::default();
    let mut attr = InfoByFdAttr {
        bpf_fd: u32::try_from(fd).map_err(std::io::Error::other)?,
        info_len: size_of::<ProgInfoHead>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    // SAFETY: `attr` and the buffer it points to are live for the call; the kernel
    // writes at most `info_len` bytes there and shortens `info_len` to what it wrote.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            std::ptr::from_mut(&mut attr),
            size_of::<InfoByFdAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(has_recursion_misses(attr.info_len).then_some(info.recursion_misses))
}

/// Whether a `bpf_prog_info` of `len` bytes reaches past `recursion_misses`.
fn has_recursion_misses(len: u32) -> bool {
    len as usize >= size_of::<ProgInfoHead>()
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

/// The program `name` of the loaded object.
fn find_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut aya::programs::Program, ProbeError> {
    ebpf.program_mut(name).ok_or_else(|| ProbeError::Program {
        action: "find",
        program: name.to_owned(),
        source: ProgramError::NotLoaded,
    })
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
    use super::setup::{exit_fields, group_dead_offset, optional_exit_field};
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

    #[test]
    fn prog_info_head_reaches_recursion_misses() {
        // uapi linux/bpf.h: recursion_misses follows run_cnt at offset 200.
        assert_eq!(std::mem::offset_of!(ProgInfoHead, recursion_misses), 208);
        assert_eq!(size_of::<InfoByFdAttr>(), 16);
        assert!(has_recursion_misses(216));
        assert!(has_recursion_misses(232), "a newer, longer bpf_prog_info");
        assert!(!has_recursion_misses(208), "5.11 ends before it");
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
        assert_eq!(
            size_of::<tracer_common::PendingExit>(),
            64,
            "one cache line"
        );
        // Keys without padding: every byte is hashed.
        assert_eq!(size_of::<tracer_common::DetailKey>(), 24);
        assert_eq!(size_of::<tracer_common::RipKey>(), 24);
        let d = tracer_common::DetailKey::new(&row, 3, 0x3f8_0000);
        assert_eq!((d.exit(), d.phase(), d.pid), (exit, 3, 4_194_304));
    }
}
