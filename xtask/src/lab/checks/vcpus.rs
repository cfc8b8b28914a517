//! kvmtrace against the kernel hist, per (vCPU, reason).

use crate::lab::{hist::Hist, reason::Counts, record::Record};

/// Per-vCPU exit totals: (vcpu_id, hist, kvmtrace).
pub fn per_vcpu(hist: &Hist, record: Option<&Record>) -> Vec<(u32, u64, Option<u64>)> {
    let mut out: std::collections::BTreeMap<u32, (u64, Option<u64>)> = Default::default();
    for (&(vcpu, _), &n) in &hist.by_vcpu {
        out.entry(vcpu).or_default().0 += n;
    }
    if let Some(rec) = record {
        for (&(vcpu, _), &n) in &rec.by_vcpu {
            *out.entry(vcpu).or_default().1.get_or_insert(0) += n;
        }
    }
    out.into_iter().map(|(v, (h, k))| (v, h, k)).collect()
}

/// Per-vCPU problems: (vcpu, reason) counts that differ between the hist and kvmtrace,
/// and kvmtrace vCPU rows that do not sum to its per-reason totals.
pub fn per_vcpu_problems(tag: &str, hist: &Hist, rec: &Record) -> Vec<String> {
    let mut problems = Vec::new();
    let mut rec_raw: std::collections::BTreeMap<(u32, u64), u64> = Default::default();
    let mut sums = Counts::new();
    for (&(vcpu, reason), &n) in &rec.by_vcpu {
        *rec_raw.entry((vcpu, reason.raw())).or_default() += n;
        *sums.entry(reason).or_default() += n;
    }
    // The count path does not tell vCPUs apart: its rows are per VM, so the hist's
    // vCPUs are added up to compare.
    let all_vcpus = tracer_common::count::ALL_VCPUS;
    let by_vcpu = if !rec_raw.is_empty() && rec_raw.keys().all(|&(v, _)| v == all_vcpus) {
        let mut summed: std::collections::BTreeMap<(u32, u64), u64> = Default::default();
        for (&(_, reason), &n) in &hist.by_vcpu {
            *summed.entry((all_vcpus, reason)).or_default() += n;
        }
        summed
    } else {
        hist.by_vcpu.clone()
    };
    let hist_by_vcpu = &by_vcpu;
    let full = rec.dropped.vcpu_map_full;
    if full > 0 {
        // A full per-vCPU map: the rows that got in are exact, the rest is in
        // dropped.vcpu_map_full.
        let exact = rec_raw.iter().all(|(k, n)| hist_by_vcpu.get(k) == Some(n));
        let rows: u64 = rec_raw.values().sum();
        let all: u64 = hist_by_vcpu.values().sum();
        if !exact || rows + full != all {
            problems.push(format!(
                "{tag}: vCPU rows ({rows}) + dropped.vcpu_map_full ({full}) != all exits ({all}), or a row differs from the hist"
            ));
        }
        return problems;
    }
    if rec_raw != *hist_by_vcpu {
        let keys: std::collections::BTreeSet<_> =
            rec_raw.keys().chain(hist_by_vcpu.keys()).collect();
        let bad = keys
            .into_iter()
            .filter(|k| rec_raw.get(k) != hist_by_vcpu.get(k))
            .count();
        problems.push(format!(
            "{tag}: {bad} (vCPU, reason) counts differ between kvmtrace and the hist"
        ));
    }
    if sums != rec.by_reason {
        problems.push(format!(
            "{tag}: kvmtrace's vCPU rows do not sum to its per-reason totals"
        ));
    }
    problems
}
