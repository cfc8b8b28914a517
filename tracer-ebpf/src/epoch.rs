//! The cache epoch: every CPU caches the thread slot (and, with snapshots, the VM
//! slot) it counted last; a cache entry of another epoch is not used. Bumped whenever
//! a cached slot may have become wrong (a thread or VM ended, the pid filter grew).

use aya_ebpf::{macros::map, maps::Array};
use core::intrinsics::AtomicOrdering;

/// Slot 0: the epoch.
#[map]
static COUNT_EPOCH: Array<u32> = Array::with_max_entries(1, 0);

/// The epoch of the cached VM slots and thread slots.
#[inline(always)]
pub fn epoch() -> u32 {
    COUNT_EPOCH.get(0).copied().unwrap_or(0)
}

/// Empties every CPU's cache of VM and thread slots.
#[inline(always)]
pub fn bump_epoch() {
    if let Some(epoch) = COUNT_EPOCH.get_ptr_mut(0) {
        // SAFETY: a live map value other CPUs may bump too.
        unsafe { core::intrinsics::atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(epoch, 1) };
    }
}
