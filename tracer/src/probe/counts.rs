//! The thread rows in user space ([`tracer_common::rows`]): each live thread's row,
//! ended threads' rows read once, zeroed and their slots given back; the snapshots' VM
//! slots freed once their VM is reaped; and the vendor module's layout checked again
//! after a reload.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData, MapError, Queue, Stack};
use kvmtrace_model::snapshot::{Snapshot, sum_stats};
use tracer_common::{
    ExitKey, ExitStats, PhaseVcpuKey, VcpuKey, count, maps,
    rows::{self, ThreadOwner},
};

use super::{
    config::BTF_DIR,
    error::{ProbeError, map_err},
    lives::Lives,
    loaded::Loaded,
    read,
};
use crate::exit_layout::{self, Choice};

/// How long a reloaded vendor module may lack a layout equal to the one the program
/// reads before that is an error (its BTF appears while it loads).
const RELOAD_GRACE: Duration = Duration::from_secs(2);

/// A count row (and a snapshots' VM row).
type CountRow = [u64; rows::CELLS as usize];
/// A time row: exits and their time.
type TimeRow = [ExitStats; rows::CELLS as usize];

/// The thread rows' state on the user side.
#[derive(Debug)]
pub(super) struct CountPath {
    /// How the count path reads exits; `None`: the rows are the timing path's, or
    /// only the snapshots' VM slots are kept.
    pub choice: Option<Choice>,
    /// The timing path's per-VM rows: the rows are `TIME_ROWS`, not `COUNT_ROWS`.
    pub times: bool,
    /// Snapshots keep VM slots, freed here once their VM is reaped.
    pub snapshots: bool,
    /// The ISA whose reasons have cells (`CELL_ISA`).
    pub cell_isa: u32,
    /// The last phase whose vendor module was checked to have the layout read.
    verified_phase: u32,
    /// Since when the current phase's module has not shown that layout.
    unverified_since: Option<Instant>,
    /// Ended threads, read from their rows: (phase, pid, birth, vcpu_id) -> exits
    /// per reason.
    ended: BTreeMap<(u32, u32, u64, u32), BTreeMap<ExitKey, ExitStats>>,
    /// Which VM process each (pid, birth) is.
    lives: Lives,
    /// Snapshots' VM slots whose VM has ended but is not reaped yet.
    vms_ended: Vec<u32>,
}

impl CountPath {
    pub fn new(choice: Option<Choice>, times: bool, snapshots: bool, cell_isa: u32) -> Self {
        Self {
            choice,
            times,
            snapshots,
            cell_isa,
            verified_phase: 0,
            unverified_since: None,
            ended: BTreeMap::new(),
            lives: Lives::default(),
            vms_ended: Vec::new(),
        }
    }

    /// Whether exits are counted in thread rows.
    fn rows(&self) -> bool {
        self.choice.is_some() || self.times
    }
}

/// Adds `stats` of `exit` by VM (`pid`, `reuse`)'s vCPU `vcpu_id` (`ALL_VCPUS`: the
/// VM's row) in `phase` to `snap`.
fn add(
    snap: &mut Snapshot,
    (phase, pid, reuse, vcpu_id): (u32, u32, u32, u32),
    exit: ExitKey,
    stats: ExitStats,
) -> Result<(), ProbeError> {
    let vcpu = VcpuKey {
        pid,
        reuse,
        vcpu_id,
        exit,
    };
    snap.add_vcpu(vcpu, stats)?;
    snap.add_exits(phase, exit, stats)?;
    Ok(())
}

/// A row's cells with exits, as (exit, stats).
fn row_exits(
    cell_isa: u32,
    cells: impl Iterator<Item = ExitStats>,
) -> Result<Vec<(ExitKey, ExitStats)>, ProbeError> {
    let mut out = Vec::new();
    for (c, stats) in (0..rows::CELLS).zip(cells) {
        if stats.count > 0 {
            let exit = rows::exit_of(cell_isa, c).ok_or(ProbeError::CellWithoutReason(c))?;
            out.push((exit, stats));
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

impl CountPath {
    /// Slot `slot`'s row: the count path's (counts), or the per-VM timing path's
    /// (counts and time).
    fn slot_rows(&self, maps: &Loaded, slot: u32) -> Result<Vec<(ExitKey, ExitStats)>, ProbeError> {
        if self.times {
            let rows: Array<&MapData, TimeRow> = maps.typed(maps::TIME_ROWS)?;
            let row = rows.get(&slot, 0).map_err(map_err(maps::TIME_ROWS))?;
            return row_exits(self.cell_isa, row.into_iter());
        }
        let rows: Array<&MapData, CountRow> = maps.typed(maps::COUNT_ROWS)?;
        let row = rows.get(&slot, 0).map_err(map_err(maps::COUNT_ROWS))?;
        row_exits(
            self.cell_isa,
            row.into_iter().map(|n| ExitStats {
                count: n,
                ..ExitStats::default()
            }),
        )
    }

    /// Puts every slot but slot 0 on the free stacks (at attach): the thread rows',
    /// and the snapshots' VM rows'.
    pub fn fill_free_slots(&self, maps: &mut Loaded) -> Result<(), ProbeError> {
        if self.rows() {
            fill_free(maps, maps::FREE_SLOTS)?;
        }
        if self.snapshots {
            fill_free(maps, maps::VM_FREE)?;
        }
        Ok(())
    }

    /// The rows' upkeep, at least every 100 ms while a record runs: reads the rows of
    /// threads that ended (so slots are free for new ones), frees the snapshots' VM
    /// slots of reaped VMs, and after a vendor module reload checks that the module
    /// the raw program reads has the same layout. A module without it is an error:
    /// the reasons read would be wrong.
    pub fn tick(&mut self, maps: &mut Loaded) -> Result<(), ProbeError> {
        self.verify_layout(maps)?;
        if self.rows() {
            self.harvest(maps)?;
        }
        if self.snapshots {
            self.free_vm_slots(maps)?;
        }
        Ok(())
    }

    fn verify_layout(&mut self, maps: &Loaded) -> Result<(), ProbeError> {
        let Some(choice @ Choice::Raw { .. }) = &self.choice else {
            return Ok(());
        };
        let phase = read::phase(maps)?;
        if phase == self.verified_phase {
            return Ok(());
        }
        let now = exit_layout::choose(std::path::Path::new(BTF_DIR));
        if now == *choice {
            self.verified_phase = phase;
            self.unverified_since = None;
            return Ok(());
        }
        let since = *self.unverified_since.get_or_insert_with(Instant::now);
        if since.elapsed() < RELOAD_GRACE {
            return Ok(());
        }
        Err(ProbeError::LayoutChanged {
            was: choice.describe(),
            now: now.describe(),
        })
    }

    /// Reads the row of every slot whose thread has ended into the ended VMs' counts,
    /// zeroes it, and frees the slot. Only its thread wrote the row, and it has ended.
    fn harvest(&mut self, maps: &mut Loaded) -> Result<(), ProbeError> {
        while let Some(slot) = next_ended(maps, maps::ENDED_SLOTS)? {
            let owner = {
                let owners: HashMap<&MapData, u32, ThreadOwner> = maps.typed(maps::SLOT_THREADS)?;
                owners.get(&slot, 0).map_err(map_err(maps::SLOT_THREADS))?
            };
            let sums = self.slot_rows(maps, slot)?;
            let vm = self
                .ended
                .entry((owner.phase, owner.tgid, owner.born_ns, owner.vcpu_id))
                .or_default();
            for (exit, stats) in sums {
                add_stats(vm.entry(exit).or_default(), stats)?;
            }
            if self.times {
                let mut rows: Array<&mut MapData, TimeRow> = maps.typed_mut(maps::TIME_ROWS)?;
                rows.set(slot, [ExitStats::default(); rows::CELLS as usize], 0)
                    .map_err(map_err(maps::TIME_ROWS))?;
            } else {
                let mut rows: Array<&mut MapData, CountRow> = maps.typed_mut(maps::COUNT_ROWS)?;
                rows.set(slot, [0; rows::CELLS as usize], 0)
                    .map_err(map_err(maps::COUNT_ROWS))?;
            }
            let mut owners: HashMap<&mut MapData, u32, ThreadOwner> =
                maps.typed_mut(maps::SLOT_THREADS)?;
            owners.remove(&slot).map_err(map_err(maps::SLOT_THREADS))?;
            // The slot is free from here on: a new thread may take it.
            free_slot(maps, maps::FREE_SLOTS, slot)?;
        }
        Ok(())
    }

    /// Snapshots: zeroes the row of every VM slot whose VM has ended and been reaped,
    /// and frees the slot. An ended VM not reaped yet waits for a later tick.
    fn free_vm_slots(&mut self, maps: &mut Loaded) -> Result<(), ProbeError> {
        while let Some(slot) = next_ended(maps, maps::VM_ENDED)? {
            self.vms_ended.push(slot);
        }
        let (mut still, mut freed) = (Vec::new(), Vec::new());
        for slot in std::mem::take(&mut self.vms_ended) {
            let owner: Option<u64> = {
                let owners: HashMap<&MapData, u32, u64> = maps.typed(maps::SLOT_OWNERS)?;
                owners.get(&slot, 0).ok()
            };
            // Only once the process is reaped: the group leader's exit ends the VM
            // (kernels without `group_dead`), and its other threads may still run.
            if owner.is_some_and(|key| pid_exists(key as u32)) {
                still.push(slot);
                continue;
            }
            clear_vm_slot(maps, slot)?;
            freed.push(slot);
        }
        self.vms_ended = still;
        if !freed.is_empty() {
            clear_vm_overflow(maps, &freed)?;
        }
        // Free from here on: a new VM may take them.
        for slot in freed {
            free_slot(maps, maps::VM_FREE, slot)?;
        }
        Ok(())
    }

    /// The thread rows: every VM (live threads' rows, ended threads', slot 0's
    /// threads under pid 0) per reason, and the overflow map's reasons.
    pub fn count_rows(&mut self, maps: &mut Loaded, snap: &mut Snapshot) -> Result<(), ProbeError> {
        self.tick(maps)?;
        let phase = read::phase(maps)?;
        // By slot: a walk that restarts (the map changed under it) sees a slot twice.
        let owners: BTreeMap<u32, ThreadOwner> = {
            let owners: HashMap<&MapData, u32, ThreadOwner> = maps.typed(maps::SLOT_THREADS)?;
            let walk = 2 * tracer_common::limits::MAX_THREADS as usize;
            owners.iter().take(walk).filter_map(Result::ok).collect()
        };
        let full = ThreadOwner {
            phase,
            tgid: 0,
            tid: 0,
            vcpu_id: count::ALL_VCPUS,
            born_ns: 0,
        };
        self.lives.note(
            owners
                .values()
                .map(|o| (o.tgid, o.born_ns))
                .chain(self.ended.keys().map(|k| (k.1, k.2))),
        );
        let slots = owners.into_iter().chain([(rows::FULL_SLOT, full)]);
        for (slot, o) in slots {
            let reuse = self.lives.reuse(o.tgid, o.born_ns);
            for (exit, stats) in self.slot_rows(maps, slot)? {
                add(snap, (o.phase, o.tgid, reuse, o.vcpu_id), exit, stats)?;
            }
        }
        for (&(phase, pid, born, vcpu_id), exits) in &self.ended {
            let reuse = self.lives.reuse(pid, born);
            for (&exit, &stats) in exits {
                add(snap, (phase, pid, reuse, vcpu_id), exit, stats)?;
            }
        }
        // The reasons without a cell are kept by pid, not by process: they count
        // for the pid's last process.
        let overflow: HashMap<&MapData, PhaseVcpuKey, u64> = maps.typed(maps::COUNT_OVERFLOW)?;
        for item in overflow.iter() {
            let (key, n) = item.map_err(map_err(maps::COUNT_OVERFLOW))?;
            let stats = ExitStats {
                count: n,
                ..ExitStats::default()
            };
            let reuse = self.lives.last(key.pid).unwrap_or(0);
            let row = (key.phase(), key.pid, reuse, key.vcpu_id);
            add(snap, row, key.exit(), stats)?;
        }
        Ok(())
    }

    /// The reuse number of the last VM process seen with `pid` (0 if none).
    pub fn last_life(&self, pid: u32) -> u32 {
        self.lives.last(pid).unwrap_or(0)
    }

    /// Forgets ended VM (`pid`, `reuse`)'s counts (the count path): returns what they
    /// were. The pid's reasons without a cell go with its last process.
    pub fn forget_vm(
        &mut self,
        maps: &mut Loaded,
        (pid, reuse): (u32, u32),
    ) -> Result<Vec<(ExitKey, ExitStats)>, ProbeError> {
        self.tick(maps)?;
        let mut gone: BTreeMap<ExitKey, ExitStats> = BTreeMap::new();
        let born = self.lives.born(pid, reuse);
        let keys: Vec<_> = self
            .ended
            .keys()
            .filter(|k| k.1 == pid && Some(k.2) == born)
            .copied()
            .collect();
        for key in keys {
            for (exit, stats) in self.ended.remove(&key).unwrap_or_default() {
                add_stats(gone.entry(exit).or_default(), stats)?;
            }
        }
        let last = self.lives.last(pid).unwrap_or(0) == reuse;
        self.lives.forget(pid, reuse);
        if !last {
            return Ok(gone.into_iter().collect());
        }
        let mut overflow: HashMap<&mut MapData, PhaseVcpuKey, u64> =
            maps.typed_mut(maps::COUNT_OVERFLOW)?;
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

/// Puts slots `1..=capacity` on the free stack `name`, slot 1 on top.
fn fill_free(maps: &mut Loaded, name: &'static str) -> Result<(), ProbeError> {
    let mut free: Stack<&mut MapData, u32> = maps.typed_mut(name)?;
    for slot in (1..=free.capacity()).rev() {
        free.push(slot, 0).map_err(map_err(name))?;
    }
    Ok(())
}

/// Puts `slot` back on the free stack `name`: the next slot taken.
fn free_slot(maps: &mut Loaded, name: &'static str, slot: u32) -> Result<(), ProbeError> {
    let mut free: Stack<&mut MapData, u32> = maps.typed_mut(name)?;
    free.push(slot, 0).map_err(map_err(name))
}

/// The next slot on the queue of ended threads or VMs `name`, if any.
fn next_ended(maps: &mut Loaded, name: &'static str) -> Result<Option<u32>, ProbeError> {
    let mut ended: Queue<&mut MapData, u32> = maps.typed_mut(name)?;
    match ended.pop(0) {
        Ok(slot) => Ok(Some(slot)),
        Err(MapError::ElementNotFound) => Ok(None),
        Err(e) => Err(map_err(name)(e)),
    }
}

/// Zeroes VM slot `slot`'s row and total and forgets its owner (it is freed after).
fn clear_vm_slot(maps: &mut Loaded, slot: u32) -> Result<(), ProbeError> {
    let mut rows: Array<&mut MapData, CountRow> = maps.typed_mut(maps::VM_ROWS)?;
    rows.set(slot, [0; rows::CELLS as usize], 0)
        .map_err(map_err(maps::VM_ROWS))?;
    let mut totals: Array<&mut MapData, u64> = maps.typed_mut(maps::VM_EXITS)?;
    totals.set(slot, 0, 0).map_err(map_err(maps::VM_EXITS))?;
    let mut owners: HashMap<&mut MapData, u32, u64> = maps.typed_mut(maps::SLOT_OWNERS)?;
    match owners.remove(&slot) {
        Ok(()) | Err(MapError::ElementNotFound) => {}
        Err(e) => return Err(map_err(maps::SLOT_OWNERS)(e)),
    }
    Ok(())
}

/// Removes the `VM_OVERFLOW` entries of the VM slots `slots` (its key's `pid` is the
/// slot), before they are freed.
fn clear_vm_overflow(maps: &mut Loaded, slots: &[u32]) -> Result<(), ProbeError> {
    let mut overflow: HashMap<&mut MapData, PhaseVcpuKey, u64> =
        maps.typed_mut(maps::VM_OVERFLOW)?;
    let keys: Vec<PhaseVcpuKey> = overflow
        .keys()
        .filter_map(Result::ok)
        .filter(|k| slots.contains(&k.pid))
        .collect();
    for key in keys {
        match overflow.remove(&key) {
            Ok(()) | Err(MapError::ElementNotFound) => {}
            Err(e) => return Err(map_err(maps::VM_OVERFLOW)(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tracer_common::{ExitStats, isa, rows};

    #[test]
    fn a_row_names_each_cell_with_exits() {
        let mut cells = [ExitStats::default(); rows::CELLS as usize];
        cells[10].count = 3;
        cells[rows::CELLS as usize - 1].count = 1;
        let vmx = super::row_exits(isa::VMX, cells.into_iter()).expect("cells");
        assert_eq!(vmx.len(), 2);
        assert_eq!((vmx[0].0.reason, vmx[0].1.count), (10, 3));
        assert_eq!(vmx[1].0.reason, 63);
        let svm = super::row_exits(isa::SVM, cells.into_iter()).expect("cells");
        assert_eq!(svm[1].0.reason, u32::MAX, "SVM_EXIT_ERR");
        assert!(
            super::row_exits(3, cells.into_iter()).is_err(),
            "an unknown ISA"
        );
    }
}
