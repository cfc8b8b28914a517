//! Parked exits: each exit waits here for its thread's next `kvm_entry`, which counts
//! and times it. The timing path parks them; `--detail`, snapshots and the lifecycle
//! programs read or finish them.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use tracer_common::{PendingExit, limits};

/// vCPU thread id -> its exit being handled. One writer per key: the thread itself,
/// which updates its entry in place. Not LRU: a full map is counted
/// (`PENDING_MAP_FULL`), never a silent eviction; an exiting thread's entry is deleted.
#[map]
pub(crate) static PENDING: HashMap<u32, PendingExit> =
    HashMap::with_max_entries(limits::MAX_PENDING, 0);

/// Slot 0 of each CPU: the exit its vCPU thread is handling, while that thread has not
/// left the CPU. `sched_switch` moves it to `PENDING` when the thread is switched out,
/// so an entry finds its exit here (no hash lookup) unless the thread slept, was
/// preempted or migrated in between.
#[map]
pub(crate) static CPU_PENDING: PerCpuArray<PendingExit> = PerCpuArray::with_max_entries(1, 0);
