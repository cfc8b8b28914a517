//! Loading the eBPF programs, attaching them, and copying their maps into a
//! [`Snapshot`]. This is the only module that touches aya.
//!
//! Its parts depend on each other one way: `error` and `config` depend on none;
//! `loaded` (the object and its typed maps) on `error`; `programs` (one row per
//! program) on those; `setup`, `read` (the snapshot's readers), `counts` (the
//! thread rows) and `memory` (the maps' cost) on the ones before them; this module
//! on all.

use std::collections::BTreeSet;

use aya::{
    EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuHashMap, RingBuf},
};
use kvmtrace_model::snapshot::{ProgramCost, Snapshot};
use tracer_common::{
    CpuidEvent, ExitKey, ExitStats, PhaseVcpuKey, RegsSample, VcpuKey, maps, regs_slot,
};

mod config;
mod counts;
mod error;
mod lives;
mod loaded;
pub mod memory;
#[cfg(test)]
mod object_check;
mod programs;
mod read;
mod setup;
#[cfg(test)]
mod source_check;

pub use config::{BTF_DIR, ProbeConfig, host_isa, sums_per_cpu};
pub use error::ProbeError;

use error::map_err;
use loaded::Loaded;
use setup::Setup;

use crate::{exit_layout::Choice, tracefs::Tracefs, vcpu_regs};

/// The loaded and attached programs. Dropping it detaches them.
pub struct Probe {
    loaded: Loaded,
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
    /// The thread rows' state; `None` on the timing path without them.
    counts: Option<counts::CountPath>,
    /// The ISA whose reasons have cells ([`ProbeConfig::cell_isa`]).
    cell_isa: u32,
    /// Each map's planned cost ([`memory::plan`]), to set beside the kernel's.
    plan: Vec<memory::MapBytes>,
}

/// Attaches the synthetic-exit counter to `vmx_vcpu_run()` where kvm_intel is loaded
/// (its runs without a `kvm_entry` made up an INVALID_STATE exit), and tells the
/// programs it counts. Elsewhere (kvm_amd, no kvm_intel yet, or a kernel that hides
/// the symbol) synthetic exits stay unknown, which reconcile says: returns false.
fn attach_synthetic_counter(loaded: &mut Loaded) -> Result<bool, ProbeError> {
    let program = &programs::VCPU_RUN_VMX;
    let programs::Target::Symbol(symbol) = program.target else {
        return Ok(false);
    };
    let present = std::fs::read_to_string("/proc/kallsyms").is_ok_and(|k| {
        k.lines()
            .any(|l| l.split_whitespace().nth(2) == Some(symbol))
    });
    if !present {
        log::debug!("no {symbol} in /proc/kallsyms: synthetic exits are not counted");
        return Ok(false);
    }
    if let Err(e) = program.attach_kprobe(loaded)? {
        log::info!("cannot probe {symbol} ({e}): synthetic exits are not counted");
        return Ok(false);
    }
    let mut regs: Array<&mut MapData, u32> = loaded.typed_mut(maps::REGS)?;
    regs.set(regs_slot::SYNTHETIC_TRACKED, 1, 0)
        .map_err(map_err(maps::REGS))?;
    Ok(true)
}

/// Puts the `-p` / `-- CMD` processes in the pid filter.
fn fill_pid_filter(loaded: &mut Loaded, pids: &BTreeSet<u32>) -> Result<(), ProbeError> {
    let mut filter: HashMap<&mut MapData, u32, u32> = loaded.typed_mut(maps::FILTER_PIDS)?;
    for pid in pids {
        filter
            .insert(pid, 1, 0)
            .map_err(map_err(maps::FILTER_PIDS))?;
    }
    Ok(())
}

/// With snapshots: where the vCPU registers are, when known (BTF), or how many
/// exits may be sampled to learn it.
fn set_regs_source(loaded: &mut Loaded, config: &ProbeConfig) -> Result<(), ProbeError> {
    let mut regs: Array<&mut MapData, u32> = loaded.typed_mut(maps::REGS)?;
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
        let ebpf = loader.load(memory::object()).map_err(ProbeError::Object)?;
        let mut loaded = Loaded::new(ebpf);
        let logger = aya_log::EbpfLogger::init(loaded.ebpf_mut())
            .map_err(|e| log::debug!("no eBPF logger: {e}"))
            .ok();
        fill_pid_filter(&mut loaded, &config.pids)?;
        let leaves = config.snapshots;
        if leaves.is_some() {
            set_regs_source(&mut loaded, config)?;
        }
        setup.attach_programs(&mut loaded, config)?;
        let counts_synthetic =
            (programs::VCPU_RUN_VMX.wanted)(config) && attach_synthetic_counter(&mut loaded)?;
        let cpuid_events = loaded.take(maps::CPUID_EVENTS)?;
        let regs_samples = loaded.take(maps::REGS_SAMPLES)?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, e)| ProbeError::Cpus(e))?;
        let counts = (config.counts.is_some() || leaves.is_some() || config.vm_time).then(|| {
            counts::CountPath::new(
                config.counts.clone(),
                config.vm_time,
                leaves.is_some(),
                config.cell_isa,
            )
        });
        if let Some(path) = &counts {
            path.fill_free_slots(&mut loaded)?;
        }
        Ok(Self {
            plan: memory::plan(config, u32::try_from(nr_cpus).unwrap_or(u32::MAX))?,
            cell_isa: config.cell_isa,
            loaded,
            logger,
            cpuid_events,
            regs_samples,
            filter_enabled: !config.pids.is_empty(),
            tracks_phases: setup.tracks_phases(),
            counts_synthetic,
            counts,
        })
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
        read::phase(&self.loaded)
    }

    /// Run counts and times of the probe's programs. The times stay 0 unless
    /// `kernel.bpf_stats_enabled` is 1.
    pub fn costs(&self) -> Vec<ProgramCost> {
        self.loaded
            .ebpf()
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
            .loaded
            .ebpf()
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

    /// From now on, reads the vCPU registers at `layout` and stops learning.
    pub fn set_regs_layout(
        &mut self,
        layout: &kvmtrace_model::regs_layout::Layout,
    ) -> Result<(), ProbeError> {
        let mut regs: Array<&mut MapData, u32> = self.loaded.typed_mut(maps::REGS)?;
        regs.set(regs_slot::LEARN_BUDGET, 0, 0)
            .map_err(map_err(maps::REGS))?;
        regs.set(regs_slot::OFFSET_PLUS_ONE, layout.regs_offset + 1, 0)
            .map_err(map_err(maps::REGS))
    }

    /// CPUID exits of traced VMs seen while the register layout was not known yet.
    pub fn cpuid_exits_before_layout(&mut self) -> Result<u64, ProbeError> {
        let regs: Array<&MapData, u32> = self.loaded.typed(maps::REGS)?;
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
        fill_pid_filter(&mut self.loaded, &BTreeSet::from([pid]))?;
        // The count path may have cached the process as not traced: a new epoch
        // makes every CPU look again.
        let mut epoch: Array<&mut MapData, u32> = self.loaded.typed_mut(maps::COUNT_EPOCH)?;
        let now = epoch.get(&0, 0).map_err(map_err(maps::COUNT_EPOCH))?;
        epoch
            .set(0, now.wrapping_add(1), 0)
            .map_err(map_err(maps::COUNT_EPOCH))
    }

    /// The rows' upkeep, at least every 100 ms while a record runs: reads the rows of
    /// threads that ended (so slots are free for new ones), frees the snapshots' VM
    /// slots of reaped VMs, and after a vendor module reload checks that the module
    /// the raw program reads has the same layout (a module without it is an error).
    /// Nothing on the timing path without thread rows.
    pub fn tick(&mut self) -> Result<(), ProbeError> {
        match &mut self.counts {
            Some(path) => path.tick(&mut self.loaded),
            None => Ok(()),
        }
    }

    /// Deletes the per-vCPU rows of VM process (`pid`, `reuse`) (it has ended; see
    /// `VcpuKey::reuse`): its exits leave every later snapshot. Returns what the
    /// deleted rows held, per exit reason.
    pub fn forget_vm(
        &mut self,
        (pid, reuse): (u32, u32),
    ) -> Result<Vec<(ExitKey, ExitStats)>, ProbeError> {
        let counted = self.count_path().is_some();
        // The count path's rows, and the per-VM timing path's cells.
        let mut gone = match &mut self.counts {
            Some(path) if counted || path.times => {
                path.forget_vm(&mut self.loaded, (pid, reuse))?
            }
            _ => Vec::new(),
        };
        if counted {
            return Ok(gone);
        }
        // The rows of reasons without a cell: the pid's last process's.
        let last = self.counts.as_ref().map_or(0, |c| c.last_life(pid));
        if reuse != last {
            return Ok(gone);
        }
        let rows: Vec<(PhaseVcpuKey, ExitStats)> =
            read::per_cpu_stats(&self.loaded, maps::VCPU_EXITS)?;
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|(k, _)| k.vcpu().pid == pid)
            .collect();
        let mut map: PerCpuHashMap<&mut MapData, PhaseVcpuKey, ExitStats> =
            self.loaded.typed_mut(maps::VCPU_EXITS)?;
        for (key, _) in &rows {
            map.remove(key).map_err(map_err(maps::VCPU_EXITS))?;
        }
        gone.extend(rows.into_iter().map(|(k, s)| (k.exit(), s)));
        Ok(gone)
    }

    /// Copies every map, summed over CPUs (on the count path, after its upkeep: see
    /// [`Probe::tick`]).
    pub fn snapshot(&mut self) -> Result<Snapshot, ProbeError> {
        let mut snap = Snapshot::default();
        let timing = self.count_path().is_none();
        if !self.rows_in_cells() {
            self.tick()?;
        } else if let Some(path) = &mut self.counts {
            path.count_rows(&mut self.loaded, &mut snap)?;
        }
        let loaded = &self.loaded;
        // Every counted exit is in a per-vCPU row, or (when that map was full) in the
        // per-reason overflow map. Those rows are kept by pid: they count for the
        // pid's last VM process the thread rows saw (see `VcpuKey::reuse`).
        let mut by_pid = Snapshot::default();
        read::vcpu_rows(loaded, &mut by_pid)?;
        if timing {
            read::parked(loaded, &mut by_pid)?;
        }
        for (key, stats) in by_pid.vcpus {
            let reuse = self.counts.as_ref().map_or(0, |c| c.last_life(key.pid));
            snap.add_vcpu(VcpuKey { reuse, ..key }, stats)?;
        }
        for (phase, exits) in by_pid.phases {
            for (exit, stats) in exits {
                snap.add_exits(phase, exit, stats)?;
            }
        }
        read::overflow(loaded, &mut snap)?;
        if timing {
            read::latency_cells(loaded, self.cell_isa, &mut snap)?;
        }
        read::latency_hist(loaded, &mut snap)?;
        read::detail(loaded, &mut snap)?;
        read::rips(loaded, &mut snap)?;
        snap.drops = read::drops(loaded)?;
        snap.filter_pids = read::filter_pids(loaded, self.filter_enabled)?;
        Ok(snap)
    }
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
    let unshared = unsafe { libc::unshare(libc::CLONE_NEWNS) } == 0;
    // SAFETY: as above.
    let hidden = unshared
        && unsafe {
            libc::mount(
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
    // Without CAP_SYS_ADMIN (a service with only the capabilities it needs) unshare
    // fails and the thread never left its namespace: nothing to go back to.
    // SAFETY: `own` is this process's original mount namespace.
    if unshared && unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
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

#[cfg(test)]
mod tests {
    use tracer_common::{HistKey, PhaseVcpuKey};

    #[test]
    fn packed_keys_round_trip() {
        let exit = tracer_common::ExitKey::from_raw(tracer_common::isa::VMX, 0x8000_0021);
        let vcpu = tracer_common::VcpuKey {
            pid: 4_194_304,
            reuse: 0,
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
