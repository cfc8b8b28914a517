//! kvmtrace's `kvmtrace.record.v1` JSON, read through the model crate's [`Report`]:
//! the parts the lab compares ([`parse_record`], [`phase_record`]), its timing
//! invariants ([`timing_problems`]) and kvmtrace's own costs for the bench ([`Cost`]).

use anyhow::{Context as _, bail};
use kvmtrace_model::{
    exit_reasons::Isa,
    report::{Dropped, PhaseRow, ReasonRow, Report, Totals},
};

use super::reason::{Counts, Reason, VcpuCounts};

/// kvmtrace's `kvmtrace.record.v1` JSON, the parts the lab compares.
pub struct Record {
    pub by_reason: Counts,
    pub by_vcpu: VcpuCounts,
    /// VM (pid) -> its exits per reason.
    pub by_vm: std::collections::BTreeMap<u32, Counts>,
    /// Each eBPF map's kernel bytes (`cost.maps`), as the kernel and the plan say.
    pub maps: Vec<kvmtrace_model::snapshot::MapCost>,
    pub total: Option<u64>,
    pub dropped: Dropped,
    /// The record's paging mode, as JSON (`null` when unknown), for the console.
    pub paging: String,
}

fn reason(isa: Isa, reason: u32, failed_entry: bool) -> Reason {
    Reason {
        isa: isa.raw(),
        reason,
        failed_entry,
    }
}

fn by_reason(rows: &[ReasonRow]) -> Counts {
    let mut counts = Counts::new();
    for r in rows {
        *counts
            .entry(reason(r.isa, r.reason, r.failed_entry))
            .or_default() += r.totals.count;
    }
    counts
}

fn report(text: &str) -> anyhow::Result<Report> {
    Report::from_json(text).context("kvmtrace's JSON is not a record this lab reads")
}

pub fn parse_record(text: &str) -> anyhow::Result<Record> {
    let rep = report(text)?;
    let mut by_vcpu = VcpuCounts::new();
    let mut by_vm = std::collections::BTreeMap::<u32, Counts>::new();
    for r in &rep.vcpus {
        let key = reason(r.isa, r.reason, r.failed_entry);
        *by_vcpu.entry((r.vcpu_id, key)).or_default() += r.totals.count;
        *by_vm.entry(r.pid).or_default().entry(key).or_default() += r.totals.count;
    }
    Ok(Record {
        by_reason: by_reason(&rep.reasons),
        by_vcpu,
        by_vm,
        maps: rep.cost.map(|c| c.maps).unwrap_or_default(),
        total: Some(rep.total.count),
        paging: serde_json::to_string(&rep.paging)?,
        dropped: rep.dropped,
    })
}

/// The phase of a whole-run record (`--scenario reload`) whose paging mode is `tag`
/// (`ept1`, `npt0`), as a record of its own: its reasons, total and paging, and the
/// whole run's `dropped`; and that phase as JSON. `None` when no phase had that mode.
pub fn phase_record(all: &str, tag: &str) -> anyhow::Result<Option<(Record, String)>> {
    let rep = report(all)?;
    let label = |p: &PhaseRow| {
        p.paging
            .as_ref()
            .map(|g| format!("{}{}", g.parameter, u8::from(g.nested)))
    };
    let Some(phase) = rep.phases.iter().find(|p| label(p).as_deref() == Some(tag)) else {
        return Ok(None);
    };
    let text = serde_json::to_string_pretty(&serde_json::json!({
        "schema": rep.schema,
        "phase": phase.phase,
        "paging": phase.paging,
        "total": phase.total,
        "reasons": phase.reasons,
        "dropped": rep.dropped,
    }))?;
    let rec = Record {
        by_reason: by_reason(&phase.reasons),
        by_vcpu: VcpuCounts::new(),
        by_vm: std::collections::BTreeMap::new(),
        maps: Vec::new(),
        total: Some(phase.total.count),
        paging: serde_json::to_string(&phase.paging)?,
        dropped: rep.dropped,
    };
    Ok(Some((rec, text)))
}

/// What breaks the timing invariants in a `kvmtrace.record.v1` JSON: in every row
/// (reasons, VMs, vCPU rows, phases and their reasons, the total) `timed <= count`,
/// and every reason's histogram buckets add up to its `timed` (unless the histogram
/// map was full, which `dropped.hist_map_full` says); phases keep no histograms.
/// Empty when all hold; an error when the record has no rows to check at all.
pub fn timing_problems(text: &str) -> anyhow::Result<Vec<String>> {
    let rep = report(text)?;
    let mut checked: Vec<(String, &Totals)> = Vec::new();
    for (i, r) in rep.reasons.iter().enumerate() {
        checked.push((format!("reasons[{i}]"), &r.totals));
    }
    for (i, r) in rep.vms.iter().enumerate() {
        checked.push((format!("vms[{i}]"), &r.totals));
    }
    for (i, r) in rep.vcpus.iter().enumerate() {
        checked.push((format!("vcpus[{i}]"), &r.totals));
    }
    for (p, phase) in rep.phases.iter().enumerate() {
        checked.push((format!("phases[{p}].total"), &phase.total));
        for (i, r) in phase.reasons.iter().enumerate() {
            checked.push((format!("phases[{p}].reasons[{i}]"), &r.totals));
        }
    }
    if checked.is_empty() {
        bail!("the record has no rows: nothing to check the timing of");
    }
    checked.push(("total".to_owned(), &rep.total));
    let mut problems: Vec<String> = checked
        .iter()
        .filter(|(_, t)| t.timed > t.count)
        .map(|(name, t)| format!("{name}: timed {} > count {}", t.timed, t.count))
        .collect();
    // Only the record's own reason rows keep a histogram (phases' are empty).
    let hist_full = rep.dropped.hist_map_full;
    for (i, r) in rep.reasons.iter().enumerate() {
        let sum: u64 = r.histogram.iter().map(|b| b.count).sum();
        let timed = r.totals.timed;
        if sum != timed && !(hist_full > 0 && sum < timed) {
            problems.push(format!(
                "reasons[{i}]: histogram buckets sum to {sum}, timed is {timed}"
            ));
        }
    }
    Ok(problems)
}

/// kvmtrace's own costs from one record: start to attached, peak RSS, and the eBPF
/// run time per exit when bpf stats were on.
#[derive(Clone, Debug, Default)]
pub struct Cost {
    pub attach_ms: f64,
    pub peak_rss_mib: f64,
    pub exits: u64,
    /// Every program's run time over the exits counted (with `bpf_stats` only).
    pub ns_per_exit: Option<f64>,
    /// Each program that ran: (name, runs, ns per run), with `bpf_stats` only.
    pub programs: Vec<(String, u64, f64)>,
}

impl Cost {
    pub fn from_record(text: &str) -> anyhow::Result<Self> {
        let rep = report(text)?;
        let cost = rep.cost.unwrap_or_default();
        let exits = rep.total.count;
        let ran: Vec<_> = cost.programs.iter().filter(|p| p.run_count > 0).collect();
        let total_ns: u64 = ran.iter().map(|p| p.run_time_ns).sum();
        Ok(Self {
            attach_ms: cost.attach_ns as f64 / 1e6,
            peak_rss_mib: cost.peak_rss_kib as f64 / 1024.0,
            exits,
            ns_per_exit: (cost.bpf_stats && exits > 0).then(|| total_ns as f64 / exits as f64),
            programs: if cost.bpf_stats {
                ran.iter()
                    .map(|p| {
                        (
                            p.name.clone(),
                            p.run_count,
                            p.run_time_ns as f64 / p.run_count as f64,
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use kvmtrace_model::{
        latency::Bucket,
        report::{Filter, PhaseRow, VcpuRow},
    };

    use super::*;

    fn totals(count: u64, timed: u64) -> Totals {
        Totals {
            count,
            timed,
            time_ns: 9,
            max_ns: 9,
        }
    }

    fn row(count: u64, timed: u64, buckets: &[u64]) -> ReasonRow {
        ReasonRow {
            isa: Isa::Vmx,
            reason: 10,
            failed_entry: false,
            name: "CPUID".to_owned(),
            totals: totals(count, timed),
            mean_ns: None,
            p50_ns: None,
            p99_ns: None,
            detail: Vec::new(),
            rips: Vec::new(),
            rips_rest: 0,
            histogram: buckets
                .iter()
                .map(|&count| Bucket {
                    from_ns: 0,
                    to_ns: None,
                    count,
                })
                .collect(),
        }
    }

    fn text(total: Totals, reasons: Vec<ReasonRow>, hist_full: u64) -> String {
        let at = chrono::DateTime::UNIX_EPOCH;
        let vcpus = reasons
            .iter()
            .map(|r| VcpuRow {
                pid: 1,
                reuse: 0,
                vcpu_id: 0,
                isa: r.isa,
                reason: r.reason,
                failed_entry: false,
                name: r.name.clone(),
                totals: r.totals,
            })
            .collect();
        let report = Report {
            schema: kvmtrace_model::report::SCHEMA.to_owned(),
            kvmtrace_version: "0".to_owned(),
            kernel_release: "6.1".to_owned(),
            paging: None,
            started_at: at,
            ended_at: at,
            duration_ns: 0,
            filter: Filter::default(),
            total,
            phases: (!reasons.is_empty())
                .then(|| PhaseRow {
                    phase: 0,
                    paging: None,
                    since: None,
                    total,
                    reasons: reasons
                        .iter()
                        .map(|r| row(r.totals.count, r.totals.timed, &[]))
                        .collect(),
                })
                .into_iter()
                .collect(),
            reasons,
            vms: Vec::new(),
            vcpus,
            dropped: Dropped {
                hist_map_full: hist_full,
                ..Dropped::default()
            },
            cost: None,
            leaves: None,
            cpuid_reads: Vec::new(),
            registers: None,
        };
        serde_json::to_string(&report).unwrap_or_default()
    }

    #[test]
    fn timing_invariants() {
        let good = text(totals(5, 4), vec![row(5, 4, &[3, 1])], 0);
        assert_eq!(timing_problems(&good).ok(), Some(Vec::new()));
        let bad = text(totals(5, 6), vec![row(5, 4, &[3])], 0);
        assert_eq!(
            timing_problems(&bad).ok(),
            Some(vec![
                "phases[0].total: timed 6 > count 5".to_owned(),
                "total: timed 6 > count 5".to_owned(),
                "reasons[0]: histogram buckets sum to 3, timed is 4".to_owned(),
            ])
        );
        let full = text(totals(5, 4), vec![row(5, 4, &[3])], 1);
        assert_eq!(timing_problems(&full).ok(), Some(Vec::new()));
        let empty = text(totals(0, 0), Vec::new(), 0);
        assert!(timing_problems(&empty).is_err());
    }
}
