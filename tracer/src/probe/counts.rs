//! The count path's maps in user space: a VM's cells summed over CPUs (with their
//! time cells on the per-VM timing path), ended VMs' slots read once and given back,
//! and the vendor module's layout checked again after a reload.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues};
use kvmtrace_model::snapshot::{Snapshot, sum_stats};
use tracer_common::{ExitKey, ExitStats, PhaseVcpuKey, VcpuKey, count, maps};

use super::{Probe, ProbeError, map_err};
use crate::exit_layout::{self, Choice};

/// How long a reloaded vendor module may lack a layout equal to the one the program
/// reads before that is an error (its BTF appears while it loads).
const RELOAD_GRACE: Duration = Duration::from_secs(2);

/// Cells of one slot, per CPU.
type Cells = [u64; count::CELLS as usize];
/// Cells of one slot on the per-VM timing path, per CPU: exits and their time.
type Times = [ExitStats; count::CELLS as usize];

/// The VM slots' state on the user side: the count path's, or the snapshots'.
#[derive(Debug)]
pub(super) struct CountPath {
    /// How the count path reads exits; `None`: the slots serve snapshots, or the
    /// timing path's per-VM rows.
    pub choice: Option<Choice>,
    /// The timing path's per-VM rows: the slots' cells are `TIMES`, not `COUNTS`.
    pub times: bool,
    /// The last phase whose vendor module was checked to have the layout read.
    verified_phase: u32,
    /// Since when the current phase's module has not shown that layout.
    unverified_since: Option<Instant>,
    /// Ended VMs, read from their slots: (phase, pid) -> exits per reason.
    ended: BTreeMap<(u32, u32), BTreeMap<ExitKey, ExitStats>>,
}

impl CountPath {
    pub fn new(choice: Option<Choice>, times: bool) -> Self {
        Self {
            choice,
            times,
            verified_phase: 0,
            unverified_since: None,
            ended: BTreeMap::new(),
        }
    }
}

/// Adds `stats` of `exit` by VM `pid` in `phase` to `snap`.
fn add(
    snap: &mut Snapshot,
    phase: u32,
    pid: u32,
    exit: ExitKey,
    stats: ExitStats,
) -> Result<(), ProbeError> {
    let vcpu = VcpuKey {
        pid,
        vcpu_id: count::ALL_VCPUS,
        exit,
    };
    snap.add_vcpu(vcpu, stats)?;
    snap.add_exits(phase, exit, stats)?;
    Ok(())
}

/// The cells of one slot summed over CPUs, as (exit, stats) for each cell with exits;
/// `stats` reads one CPU's cell.
fn sum_cells<T: aya::Pod>(
    per_cpu: &PerCpuValues<[T; count::CELLS as usize]>,
    stats: impl Fn(&T) -> ExitStats,
) -> Result<Vec<(ExitKey, ExitStats)>, ProbeError> {
    let mut out = Vec::new();
    // The total cell (kept with snapshots) is the sum of the others.
    for cell in (0..count::CELLS).filter(|&c| c != count::TOTAL) {
        let cells: Vec<ExitStats> = per_cpu.iter().map(|c| stats(&c[cell as usize])).collect();
        let sum = sum_stats(cells.iter())?;
        if sum.count > 0 {
            let exit = count::exit_of(cell).ok_or(ProbeError::CellWithoutReason(cell))?;
            out.push((exit, sum));
        }
    }
    Ok(out)
}

/// Whether process `pid` still exists (running, or a zombie not yet reaped).
fn pid_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Adds `more` to `row`, failing instead of wrapping.
fn add_stats(row: &mut ExitStats, more: ExitStats) -> Result<(), ProbeError> {
    *row = sum_stats([*row, more].iter())?;
    Ok(())
}

impl Probe {
    fn count_state(&mut self) -> Option<&mut CountPath> {
        self.counts.as_mut()
    }

    /// Slot `slot`'s cells summed over CPUs: the count path's (counts), or the per-VM
    /// timing path's (counts and time).
    fn slot_rows(&self, slot: u32) -> Result<Vec<(ExitKey, ExitStats)>, ProbeError> {
        if self.per_vm_time() {
            let cells: PerCpuArray<&MapData, Times> =
                PerCpuArray::try_from(self.map(maps::TIMES)?).map_err(map_err(maps::TIMES))?;
            return sum_cells(&cells.get(&slot, 0).map_err(map_err(maps::TIMES))?, |s| *s);
        }
        let cells: PerCpuArray<&MapData, Cells> =
            PerCpuArray::try_from(self.map(maps::COUNTS)?).map_err(map_err(maps::COUNTS))?;
        sum_cells(&cells.get(&slot, 0).map_err(map_err(maps::COUNTS))?, |&n| {
            ExitStats {
                count: n,
                ..ExitStats::default()
            }
        })
    }

    /// The count path's upkeep, at least every 100 ms while a record runs: reads the
    /// slots of VMs that ended (so slots are free for new VMs), and after a vendor
    /// module reload checks that the module the raw program reads has the same
    /// layout. A module without it is an error: the reasons read would be wrong.
    pub fn tick(&mut self) -> Result<(), ProbeError> {
        if self.counts.is_none() {
            return Ok(());
        }
        self.verify_layout()?;
        self.harvest()
    }

    fn verify_layout(&mut self) -> Result<(), ProbeError> {
        let phase = self.phase()?;
        let Some(path) = self.count_state() else {
            return Ok(());
        };
        let Some(choice @ Choice::Raw { .. }) = &path.choice else {
            return Ok(());
        };
        if phase == path.verified_phase {
            return Ok(());
        }
        let now = exit_layout::choose(std::path::Path::new(super::BTF_DIR));
        if now == *choice {
            path.verified_phase = phase;
            path.unverified_since = None;
            return Ok(());
        }
        let since = *path.unverified_since.get_or_insert_with(Instant::now);
        if since.elapsed() < RELOAD_GRACE {
            return Ok(());
        }
        Err(ProbeError::LayoutChanged {
            was: choice.describe(),
            now: now.describe(),
        })
    }

    /// Zeroes slot `slot` of the per-CPU cells `map` on every CPU.
    fn zero_cells<T: aya::Pod + Default>(
        &mut self,
        map: &'static str,
        slot: u32,
        nr_cpus: usize,
    ) -> Result<(), ProbeError> {
        let zeros = PerCpuValues::try_from(vec![[T::default(); count::CELLS as usize]; nr_cpus])
            .map_err(ProbeError::Cpus)?;
        let mut cells: PerCpuArray<&mut MapData, [T; count::CELLS as usize]> =
            PerCpuArray::try_from(self.map_mut(map)?).map_err(map_err(map))?;
        cells.set(slot, zeros, 0).map_err(map_err(map))
    }

    /// Reads the cells of every slot whose VM has ended into the ended VMs' counts,
    /// zeroes them, and frees the slot.
    fn harvest(&mut self) -> Result<(), ProbeError> {
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, e)| ProbeError::Cpus(e))?;
        let ended_slots: Vec<u32> = {
            let flags: Array<&MapData, u32> =
                Array::try_from(self.map(maps::SLOT_ENDED)?).map_err(map_err(maps::SLOT_ENDED))?;
            let owners: HashMap<&MapData, u32, u64> =
                HashMap::try_from(self.map(maps::SLOT_OWNERS)?)
                    .map_err(map_err(maps::SLOT_OWNERS))?;
            (1..count::MAX_VMS)
                .filter(|&s| flags.get(&s, 0).is_ok_and(|v| v != 0))
                // Only once the process is reaped: the group leader's exit ends the VM
                // (kernels without `group_dead`), and a vCPU thread's
                // sched_process_exit, which counts its last untimed exit on the per-VM
                // timing path, can come after it (do_exit wakes pthread_join in
                // exit_mm, before that tracepoint).
                .filter(|&s| {
                    owners
                        .get(&s, 0)
                        .map_or(true, |key| !pid_exists(key as u32))
                })
                .collect()
        };
        for slot in ended_slots {
            let owners: HashMap<&MapData, u32, u64> =
                HashMap::try_from(self.map(maps::SLOT_OWNERS)?)
                    .map_err(map_err(maps::SLOT_OWNERS))?;
            let owner = owners.get(&slot, 0).ok();
            let sums = self.slot_rows(slot)?;
            if let (Some(key), Some(path)) = (owner, self.counts.as_mut()) {
                let vm = path
                    .ended
                    .entry(((key >> 32) as u32, key as u32))
                    .or_default();
                for (exit, stats) in sums {
                    add_stats(vm.entry(exit).or_default(), stats)?;
                }
            }
            if self.per_vm_time() {
                self.zero_cells::<ExitStats>(maps::TIMES, slot, nr_cpus)?;
            } else {
                self.zero_cells::<u64>(maps::COUNTS, slot, nr_cpus)?;
            }
            // The shared cells, where they are used (older kernels, with snapshots).
            let mut shared: Array<&mut MapData, Cells> =
                Array::try_from(self.map_mut(maps::SHARED_CELLS)?)
                    .map_err(map_err(maps::SHARED_CELLS))?;
            if slot < shared.len() {
                shared
                    .set(slot, [0u64; count::CELLS as usize], 0)
                    .map_err(map_err(maps::SHARED_CELLS))?;
            }
            let mut flags: Array<&mut MapData, u32> =
                Array::try_from(self.map_mut(maps::SLOT_ENDED)?)
                    .map_err(map_err(maps::SLOT_ENDED))?;
            flags.set(slot, 0, 0).map_err(map_err(maps::SLOT_ENDED))?;
            let mut owners: HashMap<&mut MapData, u32, u64> =
                HashMap::try_from(self.map_mut(maps::SLOT_OWNERS)?)
                    .map_err(map_err(maps::SLOT_OWNERS))?;
            // The slot is free from here on: a new VM may take it.
            owners.remove(&slot).map_err(map_err(maps::SLOT_OWNERS))?;
        }
        Ok(())
    }

    /// The count path's rows: every VM (live slots, ended VMs, slot 0's VMs under pid
    /// 0) per reason, and the overflow map's reasons.
    pub(super) fn count_rows(&mut self, snap: &mut Snapshot) -> Result<(), ProbeError> {
        self.tick()?;
        let phase = self.phase()?;
        let owners: Vec<(u32, u64)> = {
            let owners: HashMap<&MapData, u32, u64> =
                HashMap::try_from(self.map(maps::SLOT_OWNERS)?)
                    .map_err(map_err(maps::SLOT_OWNERS))?;
            owners.iter().filter_map(Result::ok).collect()
        };
        let slots = owners.into_iter().chain([(0, count::slot_key(phase, 0))]);
        for (slot, key) in slots {
            for (exit, stats) in self.slot_rows(slot)? {
                add(snap, (key >> 32) as u32, key as u32, exit, stats)?;
            }
        }
        if let Some(path) = &self.counts {
            for (&(vm_phase, pid), exits) in &path.ended {
                for (&exit, &stats) in exits {
                    add(snap, vm_phase, pid, exit, stats)?;
                }
            }
        }
        let overflow: HashMap<&MapData, PhaseVcpuKey, u64> =
            HashMap::try_from(self.map(maps::COUNT_OVERFLOW)?)
                .map_err(map_err(maps::COUNT_OVERFLOW))?;
        for item in overflow.iter() {
            let (key, n) = item.map_err(map_err(maps::COUNT_OVERFLOW))?;
            let stats = ExitStats {
                count: n,
                ..ExitStats::default()
            };
            add(snap, key.phase(), key.pid, key.exit(), stats)?;
        }
        Ok(())
    }

    /// Forgets an ended VM's counts (the count path): returns what they were.
    pub(super) fn forget_counted_vm(
        &mut self,
        pid: u32,
    ) -> Result<Vec<(ExitKey, ExitStats)>, ProbeError> {
        self.tick()?;
        let mut gone: BTreeMap<ExitKey, ExitStats> = BTreeMap::new();
        if let Some(path) = self.count_state() {
            let keys: Vec<(u32, u32)> = path.ended.keys().filter(|k| k.1 == pid).copied().collect();
            for key in keys {
                for (exit, stats) in path.ended.remove(&key).unwrap_or_default() {
                    add_stats(gone.entry(exit).or_default(), stats)?;
                }
            }
        }
        let mut overflow: HashMap<&mut MapData, PhaseVcpuKey, u64> =
            HashMap::try_from(self.map_mut(maps::COUNT_OVERFLOW)?)
                .map_err(map_err(maps::COUNT_OVERFLOW))?;
        let mut rows = Vec::new();
        for item in overflow.iter() {
            let (key, n) = item.map_err(map_err(maps::COUNT_OVERFLOW))?;
            if key.pid == pid {
                rows.push((key, n));
            }
        }
        for (key, n) in rows {
            overflow
                .remove(&key)
                .map_err(map_err(maps::COUNT_OVERFLOW))?;
            let stats = ExitStats {
                count: n,
                ..ExitStats::default()
            };
            add_stats(gone.entry(key.exit()).or_default(), stats)?;
        }
        Ok(gone.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::{count, isa};

    #[test]
    fn every_cell_is_one_reason_and_back() {
        let mut seen = std::collections::BTreeSet::new();
        for cell in 0..count::CELLS {
            if let Some(exit) = count::exit_of(cell) {
                assert_eq!(count::dense_index(exit.isa, exit.reason), cell, "{exit:?}");
                assert!(seen.insert(exit));
            }
        }
        // VMX 0..80, SVM 0..0xa8, 0x400..0x404, -1.
        assert_eq!(seen.len(), 80 + 0xa8 + 4 + 1);
    }

    #[test]
    fn the_rest_overflows_with_its_code() {
        assert_eq!(count::dense_index(isa::VMX, 80), count::OVERFLOW);
        assert_eq!(
            count::dense_index(isa::VMX, 0x8000_0021),
            count::OVERFLOW,
            "a failed entry keeps its flag, in the overflow map"
        );
        assert_eq!(
            count::dense_index(isa::VMX, 0x0800_000a),
            10,
            "flags 30:16 ignored"
        );
        assert_eq!(count::dense_index(isa::SVM, 0xa8), count::OVERFLOW);
        assert_eq!(count::dense_index(isa::SVM, 0x404), count::OVERFLOW);
        assert_eq!(count::dense_index(isa::SVM, 0x400), count::SVM_HIGH_BASE);
        assert_eq!(count::dense_index(isa::SVM, u32::MAX), count::SVM_ERR);
        assert_eq!(count::dense_index(3, 1), count::OVERFLOW, "an unknown isa");
        const { assert!(count::SVM_ERR < count::TOTAL) };
    }
}
