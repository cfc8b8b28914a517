//! Copying the maps into a [`Snapshot`]: one reader per kind of map, each summed
//! over CPUs.

use std::collections::BTreeSet;

use aya::{
    Pod,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
};
use kvmtrace_model::snapshot::{Drops, Overflow, Snapshot, sum_stats, sum_u64};
use tracer_common::{ExitStats, PendingExit, drop_kind, limits, maps, rows};

use super::{
    error::{ProbeError, map_err},
    loaded::Loaded,
};

/// The current phase: how many times kvm_intel or kvm_amd was loaded since attach.
pub(super) fn phase(loaded: &Loaded) -> Result<u32, ProbeError> {
    let phase: Array<&MapData, u32> = loaded.typed(maps::PHASE)?;
    phase.get(&0, 0).map_err(map_err(maps::PHASE))
}

/// Every entry of the per-CPU hash `name`, its values summed over CPUs by `sum`.
fn per_cpu<K: Pod, V: Pod>(
    loaded: &Loaded,
    name: &'static str,
    sum: impl Fn(&PerCpuValues<V>) -> Result<V, Overflow>,
) -> Result<Vec<(K, V)>, ProbeError> {
    let map: PerCpuHashMap<&MapData, K, V> = loaded.typed(name)?;
    let mut out = Vec::new();
    for item in map.iter() {
        let (key, per_cpu) = item.map_err(map_err(name))?;
        out.push((key, sum(&per_cpu)?));
    }
    Ok(out)
}

/// Every entry of the per-CPU hash `name` of [`ExitStats`], summed over CPUs.
pub(super) fn per_cpu_stats<K: Pod>(
    loaded: &Loaded,
    name: &'static str,
) -> Result<Vec<(K, ExitStats)>, ProbeError> {
    per_cpu(loaded, name, |v| sum_stats(v.iter()))
}

/// Every entry of the per-CPU hash `name` of counts (of `what`), summed over CPUs.
fn per_cpu_counts<K: Pod>(
    loaded: &Loaded,
    name: &'static str,
    what: &'static str,
) -> Result<Vec<(K, u64)>, ProbeError> {
    per_cpu(loaded, name, |v| sum_u64(v.iter().copied(), what))
}

/// The per-vCPU rows of the timing path, into both the vCPU and the reason counts.
pub(super) fn vcpu_rows(loaded: &Loaded, snap: &mut Snapshot) -> Result<(), ProbeError> {
    for (key, stats) in per_cpu_stats::<tracer_common::PhaseVcpuKey>(loaded, maps::VCPU_EXITS)? {
        snap.add_vcpu(key.vcpu(), stats)?;
        snap.add_exits(key.phase(), key.exit(), stats)?;
    }
    Ok(())
}

/// Exits still waiting for their entry (counted there): parked per CPU, or per
/// thread once the thread left its CPU. The per-VM timing path parks exits in per-VM
/// rows (vcpu_id: all).
pub(super) fn parked(loaded: &Loaded, snap: &mut Snapshot) -> Result<(), ProbeError> {
    let one = ExitStats {
        count: 1,
        ..ExitStats::default()
    };
    let mut parked = Vec::new();
    let slots: PerCpuArray<&MapData, PendingExit> = loaded.typed(maps::CPU_PENDING)?;
    let per_cpu = slots.get(&0, 0).map_err(map_err(maps::CPU_PENDING))?;
    parked.extend(per_cpu.iter().filter(|p| p.start_ns != 0).map(|p| p.row));
    let threads: HashMap<&MapData, u32, PendingExit> = loaded.typed(maps::PENDING)?;
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
    Ok(())
}

/// The per-reason overflow map: exits that found the per-vCPU map full.
pub(super) fn overflow(loaded: &Loaded, snap: &mut Snapshot) -> Result<(), ProbeError> {
    for (key, stats) in per_cpu_stats::<tracer_common::PhaseExitKey>(loaded, maps::OVERFLOW_EXITS)?
    {
        snap.add_exits(key.phase, key.exit, stats)?;
    }
    Ok(())
}

/// The latency histograms of the reasons with a cell (`cell_isa`'s).
pub(super) fn latency_cells(
    loaded: &Loaded,
    cell_isa: u32,
    snap: &mut Snapshot,
) -> Result<(), ProbeError> {
    let cells: PerCpuArray<&MapData, [u64; limits::HIST_BUCKETS as usize]> =
        loaded.typed(maps::LATENCY_CELLS)?;
    for cell in 0..rows::CELLS {
        let Some(exit) = rows::exit_of(cell_isa, cell) else {
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
    Ok(())
}

/// The latency histograms of the reasons without a cell.
pub(super) fn latency_hist(loaded: &Loaded, snap: &mut Snapshot) -> Result<(), ProbeError> {
    for (key, n) in
        per_cpu_counts::<tracer_common::HistKey>(loaded, maps::LATENCY_HIST, "histogram")?
    {
        snap.add_hist(key.exit(), key.bucket(), n)?;
    }
    Ok(())
}

/// `--detail`'s rows.
pub(super) fn detail(loaded: &Loaded, snap: &mut Snapshot) -> Result<(), ProbeError> {
    snap.detail
        .extend(per_cpu_stats::<tracer_common::DetailKey>(
            loaded,
            maps::DETAIL_EXITS,
        )?);
    Ok(())
}

/// `--rip`'s rows.
pub(super) fn rips(loaded: &Loaded, snap: &mut Snapshot) -> Result<(), ProbeError> {
    snap.rips.extend(per_cpu_counts::<tracer_common::RipKey>(
        loaded,
        maps::RIP_EXITS,
        "rip count",
    )?);
    Ok(())
}

/// What the eBPF side could not record in full, by kind.
pub(super) fn drops(loaded: &Loaded) -> Result<Drops, ProbeError> {
    let drops: PerCpuArray<&MapData, u64> = loaded.typed(maps::DROPS)?;
    let mut counts = Drops::default();
    for kind in 0..drop_kind::COUNT {
        let per_cpu = drops.get(&kind, 0).map_err(map_err(maps::DROPS))?;
        counts.kinds[kind as usize] = sum_u64(per_cpu.iter().copied(), "dropped")?;
    }
    counts.recursion_misses = recursion_misses(loaded)?;
    Ok(counts)
}

/// Runs of kvmtrace's programs the kernel skipped because another eBPF program was
/// running on that CPU, summed over the programs (0 on kernels before 5.12, which do
/// not report them; classic tracepoint programs count them since 6.7).
fn recursion_misses(loaded: &Loaded) -> Result<u64, ProbeError> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let mut misses = Vec::new();
    for (name, prog) in loaded.ebpf().programs() {
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
pub(super) fn filter_pids(loaded: &Loaded, enabled: bool) -> Result<Option<u64>, ProbeError> {
    let filter: HashMap<&MapData, u32, u32> = loaded.typed(maps::FILTER_PIDS)?;
    // The eBPF side adds and deletes keys while we walk, and a walk whose key was
    // just deleted starts over: distinct keys only, and a bounded walk.
    let walk = 2 * limits::MAX_FILTER_PIDS as usize;
    let pids: BTreeSet<u32> = filter.keys().take(walk).map_while(Result::ok).collect();
    Ok(enabled.then_some(pids.len() as u64))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prog_info_head_reaches_recursion_misses() {
        // uapi linux/bpf.h: recursion_misses follows run_cnt at offset 200.
        assert_eq!(std::mem::offset_of!(ProgInfoHead, recursion_misses), 208);
        assert_eq!(size_of::<InfoByFdAttr>(), 16);
        assert!(has_recursion_misses(216));
        assert!(has_recursion_misses(232), "a newer, longer bpf_prog_info");
        assert!(!has_recursion_misses(208), "5.11 ends before it");
    }
}
