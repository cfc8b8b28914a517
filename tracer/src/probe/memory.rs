//! What each eBPF map costs in kernel memory, from one function ([`plan`]) of the
//! options and the CPU count, and what the kernel says it costs ([`charged`]).
//!
//! The plan takes each map's kind, key and value sizes from the built object, and
//! its entries from [`setup::map_sizes`](super::setup::map_sizes). Two figures per map:
//! - `footprint`: the kernel's own figure before 6.4 (`memlock` in the map's fdinfo,
//!   `bpf_map_memory_footprint()`): `round_up(key + value, 8) × entries`, the value
//!   times the possible CPUs in a per-CPU map, rounded up to a page. `cost` in a
//!   record reads it back from the kernel, and the lab checks the two are equal.
//! - `bytes`: what the map holds: the footprint, plus for a hash map each element's
//!   header and a bucket per entry (which that figure leaves out), and a ring
//!   buffer's data pages (which it counts as 0).
//!
//! Per-CPU maps multiply by the CPU count; thread rows grow with the vCPU threads
//! traced, and none of them is per CPU.

use aya_obj::generated::bpf_map_type as t;

use super::{config::ProbeConfig, error::ProbeError, setup};

/// A page, as the kernel rounds a map's footprint.
const PAGE: u64 = 4096;
/// A hash map element's header (`struct htab_elem`, 6.1 x86-64) and a bucket
/// (`struct bucket`), which the footprint leaves out.
const HASH_ELEM_HEADER: u64 = 48;
const HASH_BUCKET: u64 = 16;

/// One map's cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapBytes {
    pub name: String,
    pub kind: &'static str,
    pub entries: u32,
    pub key: u32,
    pub value: u32,
    /// The kernel's figure before 6.4 (see the module doc).
    pub footprint: u64,
    /// What the map holds (see the module doc).
    pub bytes: u64,
}

/// The built eBPF object.
pub(super) fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"))
}

fn kind_name(map_type: u32) -> &'static str {
    match map_type {
        x if x == t::BPF_MAP_TYPE_ARRAY as u32 => "array",
        x if x == t::BPF_MAP_TYPE_PERCPU_ARRAY as u32 => "per-CPU array",
        x if x == t::BPF_MAP_TYPE_HASH as u32 => "hash",
        x if x == t::BPF_MAP_TYPE_PERCPU_HASH as u32 => "per-CPU hash",
        x if x == t::BPF_MAP_TYPE_QUEUE as u32 => "queue",
        x if x == t::BPF_MAP_TYPE_STACK as u32 => "stack",
        x if x == t::BPF_MAP_TYPE_RINGBUF as u32 => "ring buffer",
        _ => "other",
    }
}

/// One map's cost with `entries` entries on `nr_cpus` possible CPUs.
pub fn map_bytes(map_type: u32, key: u32, value: u32, entries: u32, nr_cpus: u32) -> (u64, u64) {
    let round8 = |n: u64| n.div_ceil(8) * 8;
    let per_cpu = map_type == t::BPF_MAP_TYPE_PERCPU_ARRAY as u32
        || map_type == t::BPF_MAP_TYPE_PERCPU_HASH as u32;
    let value_bytes = if per_cpu {
        round8(u64::from(value)) * u64::from(nr_cpus)
    } else {
        u64::from(value)
    };
    let entries64 = u64::from(entries);
    let footprint = (round8(u64::from(key) + value_bytes) * entries64).div_ceil(PAGE) * PAGE;
    let hash =
        map_type == t::BPF_MAP_TYPE_HASH as u32 || map_type == t::BPF_MAP_TYPE_PERCPU_HASH as u32;
    let extra = if hash {
        entries64 * (HASH_ELEM_HEADER + HASH_BUCKET)
    } else if map_type == t::BPF_MAP_TYPE_RINGBUF as u32 {
        entries64
    } else {
        0
    };
    (footprint, footprint + extra)
}

/// Every map's cost for `config` on `nr_cpus` possible CPUs.
pub fn plan(config: &ProbeConfig, nr_cpus: u32) -> Result<Vec<MapBytes>, ProbeError> {
    let obj =
        aya_obj::Object::parse(object()).map_err(|e| ProbeError::ObjectMaps(e.to_string()))?;
    let sizes = setup::map_sizes(config);
    let mut out: Vec<MapBytes> = obj
        .maps
        .iter()
        .map(|(name, map)| {
            let entries = sizes
                .iter()
                .find(|(n, _)| n == name)
                .map_or(map.max_entries(), |&(_, e)| e);
            let (footprint, bytes) = map_bytes(
                map.map_type(),
                map.key_size(),
                map.value_size(),
                entries,
                nr_cpus,
            );
            MapBytes {
                name: name.clone(),
                kind: kind_name(map.map_type()),
                entries,
                key: map.key_size(),
                value: map.value_size(),
                footprint,
                bytes,
            }
        })
        .collect();
    out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name)));
    Ok(out)
}

/// The kernel's `memlock` figure for the map behind `fd`, from `/proc/self/fdinfo`.
pub fn charged(fd: std::os::fd::RawFd) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// MiB, for tables.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit_layout::Choice;

    fn total(config: &ProbeConfig, cpus: u32) -> u64 {
        plan(config, cpus)
            .expect("the object parses")
            .iter()
            .map(|m| m.bytes)
            .sum()
    }

    fn modes() -> Vec<(&'static str, ProbeConfig)> {
        let base = ProbeConfig {
            cell_isa: tracer_common::isa::VMX,
            ..ProbeConfig::default()
        };
        let counts = ProbeConfig {
            counts: Some(Choice::Classic {
                reason: "a test".into(),
            }),
            ..base.clone()
        };
        let record = ProbeConfig {
            vm_time: true,
            ..base.clone()
        };
        let per_vcpu = ProbeConfig {
            vcpu_rows: true,
            ..record.clone()
        };
        let snapshots = ProbeConfig {
            snapshots: Some(kvmtrace_model::leaves::PRESETS[0].1),
            ..record.clone()
        };
        vec![
            (
                "record (time, rows per VM: the default), export --time",
                record,
            ),
            ("record --counts-only, top, export", counts),
            ("record --per-vcpu", per_vcpu),
            ("record --snapshots", snapshots),
            ("record --detail, --rip or --vcpu", base),
        ]
    }

    /// README's memory table: run with `--nocapture` to print it.
    #[test]
    fn memory_table_meets_the_targets() {
        println!("| mode | 2 CPUs | 64 CPUs | 384 CPUs |\n|---|---:|---:|---:|");
        for (name, config) in modes() {
            let cells: Vec<String> = [2, 64, 384]
                .iter()
                .map(|&n| format!("{:.1} MiB", mib(total(&config, n))))
                .collect();
            println!("| {name} | {} |", cells.join(" | "));
        }
        let modes = modes();
        assert!(
            total(&modes[0].1, 384) <= 64 << 20,
            "default record at 384 CPUs"
        );
        assert!(
            total(&modes[1].1, 384) <= 32 << 20,
            "count path at 384 CPUs"
        );
        // Snapshots' rows per VM are not per CPU: at most the default's target more.
        assert!(
            total(&modes[3].1, 384) <= 2 * (64 << 20),
            "snapshots at 384 CPUs"
        );
    }

    #[test]
    fn thread_rows_do_not_grow_with_cpus() {
        let (_, record) = &modes()[0];
        let rows = |cpus| {
            plan(record, cpus)
                .expect("plan")
                .into_iter()
                .find(|m| m.name == tracer_common::maps::TIME_ROWS)
                .expect("TIME_ROWS")
        };
        assert_eq!(rows(2).bytes, rows(384).bytes);
        assert_eq!(rows(2).entries, tracer_common::limits::MAX_THREADS + 1);
    }

    #[test]
    fn footprint_is_the_kernels_formula() {
        // A per-CPU array of 64 × 8-byte values on 4 CPUs: (4 + 8 × 4 → 40) × 64.
        let pa = t::BPF_MAP_TYPE_PERCPU_ARRAY as u32;
        assert_eq!(map_bytes(pa, 4, 8, 64, 4), (4096, 4096));
        let hash = t::BPF_MAP_TYPE_HASH as u32;
        assert_eq!(map_bytes(hash, 4, 16, 1024, 2).0, 24 * 1024);
        assert_eq!(map_bytes(hash, 4, 16, 1024, 2).1, 24 * 1024 + 64 * 1024);
    }
}
