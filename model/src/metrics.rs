//! What `kvmtrace export` serves at each scrape: a snapshot of the maps, the VMs' names
//! and the host's paging modes in, the series of each metric family out (rendered in
//! [`crate::render::metrics`]). Pure, so every label and value is unit-tested.

use std::collections::BTreeMap;

use tracer_common::ExitKey;

use crate::{
    exit_reasons::{self, Isa},
    latency,
    paging::Paging,
    report::Dropped,
    snapshot::{Overflow, Snapshot, sum_u64},
};

/// The `vm` label of exits counted without their VM: the per-vCPU map was full, or
/// the VM's rows were beyond `--max-series`.
pub const OTHER_VM: &str = "_other";

/// One scrape's inputs.
pub struct Scrape<'a> {
    pub snapshot: &'a Snapshot,
    /// The `vm` label of each traced VM process, by (pid, reuse) (see [`vm_label`]
    /// and `VcpuKey::reuse`); a VM missing here is labelled with its number
    /// ([`crate::report::vm_id`]).
    pub vms: &'a BTreeMap<(u32, u32), String>,
    /// A `vcpu` label on the exit counters.
    pub per_vcpu: bool,
    /// Whether exit handling is timed (the histogram is only served then).
    pub timing: bool,
    /// The loaded KVM vendor modules' paging modes.
    pub paging: &'a [Paging],
    /// kvmtrace's version, for the build info.
    pub version: &'a str,
    /// The most exit series served; the rest are summed into `vm="_other"`.
    pub max_series: usize,
    /// Handling time of VMs whose rows left the maps (`--retention`), per reason: the
    /// histogram is not per VM, so its `_sum` keeps their share and never goes back.
    pub forgotten_time_ns: &'a BTreeMap<ExitKey, u64>,
}

/// The labels an exit series is keyed by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExitLabels {
    pub isa: String,
    pub reason: u32,
    pub reason_name: String,
    pub vm: String,
    pub vcpu: Option<u32>,
}

/// The time histogram of one reason, in seconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Handling {
    pub isa: String,
    pub reason: u32,
    pub reason_name: String,
    /// Exact: the sum of every timed exit's handling time.
    pub sum_seconds: f64,
    pub count: u64,
    /// (upper bound in seconds, exits at or below it), cumulative; the last bound is
    /// the end of the last finite bucket (`+Inf` is `count`).
    pub buckets: Vec<(f64, u64)>,
}

/// Everything one scrape serves.
#[derive(Clone, Debug, PartialEq)]
pub struct Exposition {
    pub exits: BTreeMap<ExitLabels, u64>,
    /// Exit series summed into `vm="_other"` because of `--max-series`.
    pub series_over_cap: u64,
    pub handling: Vec<Handling>,
    /// Lost events, by the record JSON's `dropped` names.
    pub dropped: Vec<(String, u64)>,
    /// (module, parameter, nested): `("kvm_intel", "ept", true)`.
    pub paging: Vec<(String, String, bool)>,
    /// (vm label, pid) of each VM with series.
    pub vms: Vec<(String, u32)>,
    pub version: String,
}

fn isa_label(isa: Isa) -> String {
    match isa {
        Isa::Vmx => "vmx".to_owned(),
        Isa::Svm => "svm".to_owned(),
        Isa::Other(raw) => raw.to_string(),
    }
}

/// A reason's name, marked when VMX said the VM entry failed (bit 31).
fn reason_name(exit: &ExitKey) -> String {
    let name = exit_reasons::name(Isa::from_raw(exit.isa), exit.reason);
    if exit.failed_entry != 0 {
        format!("{name}_FAILED_ENTRY")
    } else {
        name.into_owned()
    }
}

/// The series of one scrape.
pub fn expose(scrape: &Scrape) -> Result<Exposition, Overflow> {
    let snap = scrape.snapshot;
    let vm_of = |pid: u32, reuse: u32| {
        scrape
            .vms
            .get(&(pid, reuse))
            .cloned()
            .unwrap_or_else(|| crate::report::vm_id(pid, reuse))
    };
    // Per (isa, reason) with the VM (and vCPU) of each per-vCPU row.
    let mut rows: BTreeMap<(ExitKey, String, Option<u32>), u64> = BTreeMap::new();
    let mut per_reason: BTreeMap<ExitKey, u64> = BTreeMap::new();
    for (key, stats) in &snap.vcpus {
        let vcpu = scrape.per_vcpu.then_some(key.vcpu_id);
        let vm = vm_of(key.pid, key.reuse);
        add(&mut rows, (key.exit, vm, vcpu), stats.count)?;
        add(&mut per_reason, key.exit, stats.count)?;
    }
    // The cap: the series with the most exits stay, the rest go to `_other`.
    let mut series_over_cap = 0;
    if rows.len() > scrape.max_series {
        let mut by_count: Vec<_> = std::mem::take(&mut rows).into_iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        for (i, ((exit, vm, vcpu), n)) in by_count.into_iter().enumerate() {
            if i < scrape.max_series {
                rows.insert((exit, vm, vcpu), n);
            } else {
                series_over_cap += 1;
                add(&mut rows, (exit, OTHER_VM.to_owned(), None), n)?;
            }
        }
    }
    // Exits in the per-reason overflow map (the per-vCPU map was full): each reason's
    // count less what the per-vCPU rows hold.
    for (exit, stats) in &snap.exits {
        let in_rows = per_reason.get(exit).copied().unwrap_or(0);
        let rest = stats.count.saturating_sub(in_rows);
        if rest > 0 {
            add(&mut rows, (*exit, OTHER_VM.to_owned(), None), rest)?;
        }
    }
    let exits = rows
        .into_iter()
        .map(|((exit, vm, vcpu), n)| {
            let labels = ExitLabels {
                isa: isa_label(Isa::from_raw(exit.isa)),
                reason: exit.reason,
                reason_name: reason_name(&exit),
                vm,
                vcpu,
            };
            (labels, n)
        })
        .collect();

    let mut vms: BTreeMap<String, u32> = BTreeMap::new();
    for key in snap.vcpus.keys() {
        vms.insert(vm_of(key.pid, key.reuse), key.pid);
    }
    let handling = if scrape.timing {
        snap.latency
            .iter()
            .map(|(exit, counts)| {
                let gone = scrape.forgotten_time_ns.get(exit).copied().unwrap_or(0);
                handling(exit, counts, snap, gone)
            })
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    Ok(Exposition {
        exits,
        series_over_cap,
        handling,
        dropped: Dropped::from(&snap.drops).by_kind(),
        paging: scrape
            .paging
            .iter()
            .map(|p| (p.module.clone(), p.parameter.clone(), p.nested))
            .collect(),
        vms: vms.into_iter().collect(),
        version: scrape.version.to_owned(),
    })
}

fn add<K: Ord>(map: &mut BTreeMap<K, u64>, key: K, n: u64) -> Result<(), Overflow> {
    let slot = map.entry(key).or_default();
    *slot = sum_u64([*slot, n], "exits")?;
    Ok(())
}

/// The histogram's first and last finite bounds: 128 ns (below any exit's handling)
/// to 134 ms (a vCPU thread preempted mid-exit), doubling: 21 buckets per reason
/// instead of the maps' 48.
const FIRST_BOUND_NS: u64 = 1 << 7;
const LAST_BOUND_NS: u64 = 1 << 27;

/// One reason's histogram: the log2 buckets as cumulative counts at their ends.
fn handling(
    exit: &ExitKey,
    counts: &[u64],
    snap: &Snapshot,
    forgotten_ns: u64,
) -> Result<Handling, Overflow> {
    let mut buckets = Vec::new();
    let mut below = 0u64;
    for (b, &n) in counts.iter().enumerate() {
        below = sum_u64([below, n], "histogram")?;
        // A fixed set of bounds, the same at every scrape; the open-ended last bucket
        // is `+Inf`, which the count is.
        if let (_, Some(to_ns)) = latency::bounds(b as u32)
            && (FIRST_BOUND_NS..=LAST_BOUND_NS).contains(&to_ns)
        {
            buckets.push((to_ns as f64 / 1e9, below));
        }
    }
    let time_ns = sum_u64(
        [snap.exits.get(exit).map_or(0, |s| s.time_ns), forgotten_ns],
        "handling time",
    )?;
    Ok(Handling {
        isa: isa_label(Isa::from_raw(exit.isa)),
        reason: exit.reason,
        reason_name: reason_name(exit),
        sum_seconds: time_ns as f64 / 1e9,
        count: below,
        buckets,
    })
}

/// The `vm` label of a VMM process from its command line (NUL-separated, as in
/// `/proc/PID/cmdline`): QEMU's `-name guest=NAME,...` or `-name NAME[,...]` (libvirt
/// passes its domain name so), else `None` (the pid is used).
pub fn vm_label(cmdline: &[u8]) -> Option<String> {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let at = args
        .iter()
        .position(|a| *a == b"-name" || *a == b"--name")?;
    let value = std::str::from_utf8(args.get(at + 1)?).ok()?;
    // QEMU option syntax: `,,` is a literal comma.
    let mut parts = Vec::new();
    let mut part = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                part.push(',');
            } else {
                parts.push(std::mem::take(&mut part));
            }
        } else {
            part.push(c);
        }
    }
    parts.push(part);
    let name = parts
        .iter()
        .find_map(|p| p.strip_prefix("guest="))
        .or_else(|| {
            parts
                .first()
                .map(String::as_str)
                .filter(|p| !p.contains('='))
        })?;
    (!name.is_empty()).then(|| name.to_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use tracer_common::{ExitStats, VcpuKey, exit_reasons as r, isa};

    use super::*;

    fn vmx(reason: u32) -> ExitKey {
        ExitKey {
            isa: isa::VMX,
            reason,
            failed_entry: 0,
        }
    }

    fn stats(count: u64, time_ns: u64) -> ExitStats {
        ExitStats {
            count,
            timed: count,
            time_ns,
            ..ExitStats::default()
        }
    }

    /// Two VMs, one with two vCPUs; 5 exits only in the overflow map.
    pub(crate) fn snapshot() -> Snapshot {
        let mut s = Snapshot::default();
        let rows = [
            (100, 0, r::VMX_CPUID, 1000, 40_000),
            (100, 1, r::VMX_CPUID, 500, 20_000),
            (100, 0, r::VMX_IO_INSTRUCTION, 100, 90_000),
            (200, 0, r::VMX_HLT, 3, 3_000_000),
        ];
        for (pid, vcpu_id, reason, n, t) in rows {
            let exit = vmx(reason);
            s.add_vcpu(
                VcpuKey {
                    pid,
                    reuse: 0,
                    vcpu_id,
                    exit,
                },
                stats(n, t),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            s.add_exits(0, exit, stats(n, t))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        s.add_exits(0, vmx(r::VMX_HLT), stats(5, 0))
            .unwrap_or_else(|e| panic!("{e}"));
        for (bucket, n) in [(5, 1000), (6, 500)] {
            s.add_hist(vmx(r::VMX_CPUID), bucket, n)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        s.drops.kinds[tracer_common::drop_kind::VCPU_MAP_FULL as usize] = 5;
        s
    }

    static NONE_FORGOTTEN: BTreeMap<ExitKey, u64> = BTreeMap::new();

    pub(crate) fn scrape_of<'a>(
        snap: &'a Snapshot,
        vms: &'a BTreeMap<(u32, u32), String>,
        paging: &'a [Paging],
    ) -> Scrape<'a> {
        Scrape {
            snapshot: snap,
            vms,
            per_vcpu: false,
            timing: true,
            paging,
            version: "0.1.0",
            max_series: 100,
            forgotten_time_ns: &NONE_FORGOTTEN,
        }
    }

    fn count(e: &Exposition, vm: &str, reason: u32) -> Option<u64> {
        e.exits
            .iter()
            .find(|(l, _)| l.vm == vm && l.reason == reason)
            .map(|(_, &n)| n)
    }

    #[test]
    fn exits_by_vm_and_reason_add_up_to_the_maps() {
        let snap = snapshot();
        let vms = BTreeMap::from([((100, 0), "web".to_owned())]);
        let e = expose(&scrape_of(&snap, &vms, &[])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(count(&e, "web", r::VMX_CPUID), Some(1500));
        assert_eq!(count(&e, "web", r::VMX_IO_INSTRUCTION), Some(100));
        assert_eq!(count(&e, "200", r::VMX_HLT), Some(3), "no name: the pid");
        assert_eq!(count(&e, OTHER_VM, r::VMX_HLT), Some(5), "overflow map");
        let total: u64 = e.exits.values().sum();
        assert_eq!(Some(total), snap.total_exits().ok());
        assert_eq!(e.vms, [("200".to_owned(), 200), ("web".to_owned(), 100)]);
        assert!(e.dropped.contains(&("vcpu_map_full".to_owned(), 5)));
    }

    #[test]
    fn a_pid_used_again_is_a_series_of_its_own() {
        let mut snap = snapshot();
        let key = VcpuKey {
            pid: 200,
            reuse: 1,
            vcpu_id: 0,
            exit: vmx(r::VMX_HLT),
        };
        snap.add_vcpu(key, stats(4, 0))
            .unwrap_or_else(|e| panic!("{e}"));
        snap.add_exits(0, key.exit, stats(4, 0))
            .unwrap_or_else(|e| panic!("{e}"));
        let vms = BTreeMap::new();
        let e = expose(&scrape_of(&snap, &vms, &[])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(count(&e, "200", r::VMX_HLT), Some(3), "the first process");
        assert_eq!(count(&e, "200#2", r::VMX_HLT), Some(4), "the second");
    }

    #[test]
    fn per_vcpu_splits_and_the_cap_folds_the_smallest() {
        let snap = snapshot();
        let vms = BTreeMap::new();
        let mut s = scrape_of(&snap, &vms, &[]);
        s.per_vcpu = true;
        let e = expose(&s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.exits.len(), 5, "4 vCPU rows and the overflow");
        s.max_series = 2;
        let e = expose(&s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.series_over_cap, 2);
        assert_eq!(count(&e, OTHER_VM, r::VMX_HLT), Some(8), "5 + VM 200's 3");
        assert_eq!(count(&e, OTHER_VM, r::VMX_IO_INSTRUCTION), Some(100));
        let total: u64 = e.exits.values().sum();
        assert_eq!(Some(total), snap.total_exits().ok(), "nothing lost");
    }

    #[test]
    fn the_histogram_is_cumulative_in_seconds_with_the_exact_sum() {
        let snap = snapshot();
        let vms = BTreeMap::new();
        let e = expose(&scrape_of(&snap, &vms, &[])).unwrap_or_else(|e| panic!("{e}"));
        let h = &e.handling[0];
        assert_eq!((h.reason, h.count), (r::VMX_CPUID, 1500));
        assert!((h.sum_seconds - 60e-6).abs() < 1e-12);
        // Buckets 5 and 6 hold [32, 128) ns: all 1500 are at or below 128 ns.
        assert_eq!(h.buckets[0], (128e-9, 1500));
        assert_eq!(h.buckets.len(), 21);
        assert_eq!(h.buckets.last().map(|b| b.1), Some(1500));
        // A forgotten VM's time stays in the sum.
        let forgotten = BTreeMap::from([(vmx(r::VMX_CPUID), 40_000)]);
        let mut s = scrape_of(&snap, &vms, &[]);
        s.forgotten_time_ns = &forgotten;
        let e = expose(&s).unwrap_or_else(|e| panic!("{e}"));
        assert!((e.handling[0].sum_seconds - 100e-6).abs() < 1e-12);
        s.timing = false;
        assert!(expose(&s).map(|e| e.handling.is_empty()).unwrap_or(false));
    }

    #[test]
    fn vm_names_come_from_qemu_and_libvirt_command_lines() {
        let cases: [(&[u8], Option<&str>); 6] = [
            (
                b"qemu-system-x86_64\0-name\0guest=web-1,debug-threads=on\0-m\x001024\0",
                Some("web-1"),
            ),
            (
                b"qemu-system-x86_64\0-name\0db,process=qemu:db\0",
                Some("db"),
            ),
            (b"qemu\0-name\0guest=a,,b\0", Some("a,b")),
            (b"qemu-system-x86_64\0-m\x00512\0", None),
            (b"qemu\0-name\0", None),
            (b"qemu\0-name\0debug-threads=on\0", None),
        ];
        for (cmdline, want) in cases {
            assert_eq!(vm_label(cmdline).as_deref(), want, "{cmdline:?}");
        }
    }
}
