//! The crowd workload: many micro VMs at once (or in waves of `--at-once`), each VM
//! with its own (CPUIDs, port writes) per vCPU. The kernel's own hist keyed by thread
//! (`common_pid`) and reason is the reference: a thread's (CPUID, I/O) counts name its
//! VM, the VM's threads summed are its row, and kvmtrace's row of the VM with those
//! counts must equal it reason by reason. Nothing may be dropped.

use std::collections::BTreeMap;

use kvmtrace_model::kernel_hist;
use tracer_common::ExitKey;

use crate::lab::{
    console::Line,
    image::MicroVm,
    reason::{Counts, Reason},
    record::Record,
};

/// What a crowd VM takes of L1's memory: from the `KVMLAB memory TAG
/// available_before_kb=B least_available_kb=L` line, (B - L) / VMs at once, with the
/// line's numbers; `None` when L1 printed no such line.
pub fn memory_per_vm(lines: &[Line], tag: &str, at_once: usize) -> Option<String> {
    let rest = lines
        .iter()
        .find_map(|l| l.text.strip_prefix(&format!("KVMLAB memory {tag} ")))?;
    let field = |name: &str| -> Option<u64> {
        rest.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    let (before, least) = (field("available_before_kb")?, field("least_available_kb")?);
    let per_vm = before.saturating_sub(least) / at_once.max(1) as u64;
    Some(format!(
        "L1 memory: {} MiB available before the crowd, {} MiB at the least while it ran: about {per_vm} KiB per VM ({at_once} at once)",
        before >> 10,
        least >> 10
    ))
}

/// The micro guest's own counter-leaf reads (CPUIDs) at its end, per vCPU.
const LEAF_READS: u64 = super::micro::MICRO_LEAF_READS;

/// Each thread's exits per reason, from the `common_pid,exit_reason` hist, whose
/// reasons are raw (`isa` is the host's: `isa`).
pub fn by_thread(hist: &str, isa: u32) -> anyhow::Result<BTreeMap<u64, Counts>> {
    let mut out: BTreeMap<u64, Counts> = BTreeMap::new();
    for (keys, n) in kernel_hist::rows(hist)? {
        let (Some(&tid), Some(&raw), 2) =
            (keys.get("common_pid"), keys.get("exit_reason"), keys.len())
        else {
            continue;
        };
        let raw = u32::try_from(raw)?;
        let reason = Reason::from(ExitKey::from_raw(isa, raw));
        *out.entry(tid).or_default().entry(reason).or_default() += n;
    }
    Ok(out)
}

/// The CPUID and I/O reasons that name a crowd VM.
#[derive(Clone, Copy, Debug)]
pub struct Names {
    pub cpuid: Reason,
    pub io: Reason,
}

impl Names {
    /// A row's (CPUID, I/O) counts.
    fn of(self, counts: &Counts) -> (u64, u64) {
        let n = |r| counts.get(&r).copied().unwrap_or(0);
        (n(self.cpuid), n(self.io))
    }
}

/// Each VM's reference row, by its (CPUID, I/O) counts per vCPU: its threads' rows
/// summed.
fn by_vm(threads: &BTreeMap<u64, Counts>, names: Names) -> BTreeMap<(u64, u64), (u32, Counts)> {
    let mut out: BTreeMap<(u64, u64), (u32, Counts)> = BTreeMap::new();
    for counts in threads.values() {
        if !counts.contains_key(&names.cpuid) {
            continue;
        }
        let vm = out.entry(names.of(counts)).or_default();
        vm.0 += 1;
        for (&r, &c) in counts {
            *vm.1.entry(r).or_default() += c;
        }
    }
    out
}

/// What is wrong with the crowd's record against the hist by thread: each VM must
/// have one row in each, equal reason by reason, and nothing dropped.
pub fn problems(
    tag: &str,
    vms: &[MicroVm],
    threads: &BTreeMap<u64, Counts>,
    record: Option<&Record>,
    names: Names,
) -> Vec<String> {
    let Some(rec) = record else {
        return vec![format!("{tag}: the crowd has no record")];
    };
    let rows: Vec<&Counts> = rec.by_vm.values().collect();
    let mut problems = rows_problems(tag, "kvmtrace", vms, threads, &rows, names);
    let d = &rec.dropped;
    if d.any() {
        problems.push(format!("{tag}: kvmtrace dropped something: {d:?}"));
    }
    println!("  crowd: count_slots_full {}", d.count_slots_full);
    problems
}

/// What is wrong with the crowd's rows per VM (`rows`, from `source`: the record, or
/// what Prometheus scraped) against the hist by thread: each VM must have one row in
/// each, equal reason by reason.
pub fn rows_problems(
    tag: &str,
    source: &str,
    vms: &[MicroVm],
    threads: &BTreeMap<u64, Counts>,
    rows: &[&Counts],
    names: Names,
) -> Vec<String> {
    let mut problems = Vec::new();
    let reference = by_vm(threads, names);
    // The rows, by the VM's (CPUID, I/O) counts.
    let mut mine: BTreeMap<(u64, u64), Vec<&Counts>> = BTreeMap::new();
    for &counts in rows {
        mine.entry(names.of(counts)).or_default().push(counts);
    }
    let mut exact = 0;
    for vm in vms {
        let vcpus = u64::from(vm.vcpus);
        let per_vcpu = (u64::from(vm.cpuids) + LEAF_READS, u64::from(vm.outs));
        let want = (per_vcpu.0 * vcpus, per_vcpu.1 * vcpus);
        let hist = reference.get(&per_vcpu);
        let kvmtrace = mine.get(&want).map(Vec::as_slice).unwrap_or_default();
        match (hist, kvmtrace) {
            (Some((threads, h)), [k]) if u64::from(*threads) == vcpus && h == *k => exact += 1,
            (Some((threads, h)), [k]) => problems.push(format!(
                "{tag}: VM with {} CPUIDs, {} port writes: hist ({threads} threads) {h:?}, {source} {k:?}",
                vm.cpuids, vm.outs
            )),
            (None, _) => problems.push(format!(
                "{tag}: VM with {} CPUIDs, {} port writes: no thread in the hist ran {per_vcpu:?}",
                vm.cpuids, vm.outs
            )),
            (Some(_), rows) => problems.push(format!(
                "{tag}: VM with {} CPUIDs, {} port writes: {} {source} rows with {want:?}, want 1",
                vm.cpuids,
                vm.outs,
                rows.len()
            )),
        }
    }
    println!(
        "  crowd: {exact} of {} VMs exact against the hist by thread; {} {source} VM rows",
        vms.len(),
        rows.len(),
    );
    if rows.len() != vms.len() {
        problems.push(format!(
            "{tag}: {source} has {} VM rows, the crowd had {} VMs",
            rows.len(),
            vms.len()
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::reason::ISA_SVM;

    const HIST: &str = "\
{ common_pid:        101, exit_reason:        114 } hitcount:        103
{ common_pid:        101, exit_reason:        120 } hitcount:          1
{ common_pid:        202, exit_reason:        114 } hitcount:        104
{ common_pid:        202, exit_reason:        123 } hitcount:          1
{ isa:          2, exit_reason:        114 } hitcount:        207
Dropped: 0
";

    #[test]
    fn memory_per_vm_is_what_the_crowd_took_over_its_vms() {
        let lines = [Line {
            at: 0.0,
            text: "KVMLAB memory npt1 available_before_kb=800000 least_available_kb=544000"
                .to_owned(),
        }];
        let said = memory_per_vm(&lines, "npt1", 256).expect("a line");
        assert!(
            said.contains("about 1000 KiB per VM (256 at once)"),
            "{said}"
        );
        assert_eq!(memory_per_vm(&lines, "npt0", 256), None);
    }

    #[test]
    fn threads_are_read_and_named_by_their_cpuids() {
        let threads = by_thread(HIST, ISA_SVM).expect("parses");
        assert_eq!(threads.len(), 2, "the isa-keyed line is not a thread");
        let names = Names {
            cpuid: Reason::from(ExitKey::from_raw(ISA_SVM, 0x72)),
            io: Reason::from(ExitKey::from_raw(ISA_SVM, 0x7b)),
        };
        let vms = by_vm(&threads, names);
        assert_eq!(
            vms.keys().copied().collect::<Vec<_>>(),
            [(103, 0), (104, 1)]
        );
        assert_eq!(vms[&(104, 1)].0, 1);
        assert_eq!(vms[&(104, 1)].1.values().sum::<u64>(), 105);
    }
}
