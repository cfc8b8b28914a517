//! The table for people: a header with the run's facts, then one row per reason
//! (or per VM and vCPU with `--per-vcpu`), and a warning line for anything dropped.

use std::fmt::Write as _;

use comfy_table::{CellAlignment, ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};

use super::common::{Options, human_ns, percent};
use crate::report::{PhaseRow, ReasonRow, Report, Totals};

fn new_table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    for (i, title) in header.iter().enumerate() {
        if let Some(col) = t.column_mut(i) {
            col.set_cell_alignment(if matches!(*title, "name" | "VM") {
                CellAlignment::Left
            } else {
                CellAlignment::Right
            });
        }
    }
    t
}

/// The columns every row ends with, after the row's own key columns.
const REASON_HEADER: [&str; 9] = [
    "reason",
    "name",
    "count",
    "% exits",
    "total time",
    "mean",
    "p50 ≤",
    "p99 ≤",
    "max",
];

/// The p50 and p99 columns of [`REASON_HEADER`].
const QUANTILE_COLUMNS: [usize; 2] = [6, 7];

fn or_dash(ns: Option<u64>) -> String {
    ns.map(human_ns).unwrap_or_else(|| "-".to_owned())
}

/// The [`REASON_HEADER`] cells of one row: `reason` and `name` as given, the rest
/// from the totals and the quantiles (when there is a histogram).
fn reason_cells(
    reason: String,
    name: &str,
    t: &Totals,
    all: u64,
    quantiles: (Option<u64>, Option<u64>),
) -> [String; 9] {
    [
        reason,
        name.to_owned(),
        t.count.to_string(),
        percent(t.count, all),
        // Nothing timed (the count path): no time to show, not 0 ns.
        if t.timed == 0 {
            "-".to_owned()
        } else {
            human_ns(t.time_ns)
        },
        or_dash(t.mean_ns()),
        or_dash(quantiles.0),
        or_dash(quantiles.1),
        or_dash((t.max_ns > 0).then_some(t.max_ns)),
    ]
}

fn reason_label(reason: u32, failed_entry: bool) -> String {
    if failed_entry {
        format!("{reason} (failed entry)")
    } else {
        reason.to_string()
    }
}

/// A reason's row, then one row per `--detail` sub-key and per `--rip` RIP.
fn add_reason(t: &mut Table, r: &ReasonRow, all: u64, opts: Options) {
    t.add_row(reason_cells(
        reason_label(r.reason, r.failed_entry),
        &r.name,
        &r.totals,
        all,
        (r.p50_ns, r.p99_ns),
    ));
    for d in r.detail.iter().filter(|_| opts.detail) {
        t.add_row(reason_cells(
            String::new(),
            &format!("  {}", d.label),
            &d.totals,
            all,
            (None, None),
        ));
    }
    let rip = |rip: String, count: u64| {
        let totals = Totals {
            count,
            ..Totals::default()
        };
        let mut cells = reason_cells(String::new(), &rip, &totals, all, (None, None));
        cells[4] = String::new();
        cells
    };
    for x in &r.rips {
        let at = match &x.symbol {
            Some(sym) => format!("  at {:#x} {sym}", x.rip),
            None => format!("  at {:#x}", x.rip),
        };
        t.add_row(rip(at, x.count));
    }
    if r.rips_rest > 0 {
        t.add_row(rip("  at other RIPs".to_owned(), r.rips_rest));
    }
}

fn phase_label(p: &PhaseRow) -> String {
    match &p.paging {
        Some(paging) => format!("phase {} {}", p.phase, paging.label()),
        None => format!("phase {} (mode unknown)", p.phase),
    }
}

/// Counts per reason and phase, when the kvm vendor module was reloaded during the run.
fn phases_table(phases: &[PhaseRow]) -> Table {
    let labels: Vec<String> = phases.iter().map(phase_label).collect();
    let header: Vec<&str> = ["reason", "name"]
        .into_iter()
        .chain(labels.iter().map(String::as_str))
        .collect();
    let mut t = new_table(&header);
    let mut keys: Vec<(crate::exit_reasons::Isa, u32, bool, &str)> = phases
        .iter()
        .flat_map(|p| &p.reasons)
        .map(|r| (r.isa, r.reason, r.failed_entry, r.name.as_str()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut total_row = vec!["".to_owned(), "all".to_owned()];
    total_row.extend(phases.iter().map(|p| p.total.count.to_string()));
    t.add_row(total_row);
    for (isa, reason, failed_entry, name) in keys {
        let mut row = vec![reason.to_string(), name.to_owned()];
        row.extend(phases.iter().map(|p| {
            p.reasons
                .iter()
                .find(|r| (r.isa, r.reason, r.failed_entry) == (isa, reason, failed_entry))
                .map_or_else(|| "-".to_owned(), |r| r.totals.count.to_string())
        }));
        t.add_row(row);
    }
    t
}

pub fn render(report: &Report, opts: Options) -> String {
    let mut out = String::new();
    let paging = report
        .paging
        .as_ref()
        .map(|p| {
            let mode = if p.nested {
                "nested paging"
            } else {
                "shadow paging"
            };
            format!("{} {} ({mode})", p.module, p.label())
        })
        .unwrap_or_else(|| "no kvm vendor module loaded".to_owned());
    let paging = if report.phases.len() > 1 {
        let modes: Vec<String> = report.phases.iter().map(phase_label).collect();
        format!("the kvm vendor module was reloaded: {}", modes.join(", "))
    } else {
        paging
    };
    let _ = writeln!(
        out,
        "kernel {}, {}, {:.2} s, {} exits",
        report.kernel_release,
        paging,
        report.duration_ns as f64 / 1e9,
        report.total.count
    );
    let total = report.total.count;
    let table = if opts.per_vcpu {
        // Per vCPU there is no histogram: no quantile columns.
        let no_quantiles = |i: &usize| !QUANTILE_COLUMNS.contains(i);
        let header: Vec<&str> = ["VM", "vcpu"]
            .into_iter()
            .chain(
                REASON_HEADER
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| no_quantiles(i))
                    .map(|(_, h)| h),
            )
            .collect();
        let mut t = new_table(&header);
        for r in &report.vcpus {
            let comm = report
                .vms
                .iter()
                .find(|v| v.pid == r.pid && v.reuse == r.reuse)
                .and_then(|v| v.comm.clone())
                .unwrap_or_default();
            let key = [
                format!("{} {comm}", r.vm_id()).trim_end().to_owned(),
                r.vcpu_label(),
            ];
            let cells = reason_cells(
                reason_label(r.reason, r.failed_entry),
                &r.name,
                &r.totals,
                total,
                (None, None),
            );
            let cells = cells
                .into_iter()
                .enumerate()
                .filter(|(i, _)| no_quantiles(i))
                .map(|(_, c)| c);
            t.add_row(key.into_iter().chain(cells));
        }
        t
    } else {
        let mut t = new_table(&REASON_HEADER);
        for r in &report.reasons {
            add_reason(&mut t, r, total, opts);
        }
        t
    };
    let rows = if opts.per_vcpu {
        report.vcpus.len()
    } else {
        report.reasons.len()
    };
    if total == 0 {
        out.push_str("no VM exits were recorded\n");
    } else if rows == 0 {
        // Every exit was counted only in `dropped` (or, per vCPU, in no vCPU row).
        let _ = writeln!(
            out,
            "none of the {total} exits has a row here: see the warning below"
        );
    } else {
        let _ = writeln!(out, "{table}");
    }
    if opts.per_vcpu
        && report
            .vcpus
            .iter()
            .any(|r| r.vcpu_id == tracer_common::count::ALL_VCPUS)
    {
        out.push_str(
            "vcpu \"all\": this record kept rows per VM; record with --per-vcpu for rows per vCPU\n",
        );
    }
    if report.phases.len() > 1 {
        let _ = writeln!(out, "{}", phases_table(&report.phases));
    }
    if report.dropped.any() {
        let _ = writeln!(
            out,
            "warning: incomplete data ({}); see `dropped` in --format json",
            report.dropped.summary()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn per_reason_table() {
        insta::assert_snapshot!(render(&sample_report(), Options::default()));
    }

    #[test]
    fn detail_and_rip_rows() {
        let mut r = crate::report::tests::detail_report();
        r.dropped.detail_capped = 3;
        insta::assert_snapshot!(render(
            &r,
            Options {
                detail: true,
                ..Options::default()
            }
        ));
    }

    #[test]
    fn per_vcpu_table_and_drops() {
        let mut r = sample_report();
        r.dropped.vcpu_map_full = 2;
        insta::assert_snapshot!(render(&r, per_vcpu()));
    }

    #[test]
    fn per_vm_rows_say_why_the_vcpu_is_all() {
        let mut r = sample_report();
        assert!(!render(&r, per_vcpu()).contains("kept rows per VM"));
        for row in &mut r.vcpus {
            row.vcpu_id = tracer_common::count::ALL_VCPUS;
        }
        insta::assert_snapshot!(render(&r, per_vcpu()));
    }

    fn per_vcpu() -> Options {
        Options {
            per_vcpu: true,
            ..Options::default()
        }
    }

    #[test]
    fn reloads_show_each_phase() {
        let mut r = sample_report();
        assert!(!render(&r, Options::default()).contains("phase"));
        let row = |phase, nested, count| PhaseRow {
            phase,
            paging: Some(crate::paging::Paging {
                module: "kvm_intel".into(),
                parameter: "ept".into(),
                nested,
            }),
            since: None,
            total: Totals {
                count,
                ..Totals::default()
            },
            reasons: vec![crate::report::ReasonRow {
                isa: crate::exit_reasons::Isa::Vmx,
                reason: 28,
                failed_entry: false,
                name: "CR_ACCESS".into(),
                totals: Totals {
                    count,
                    ..Totals::default()
                },
                mean_ns: None,
                p50_ns: None,
                p99_ns: None,
                histogram: Vec::new(),
                detail: Vec::new(),
                rips: Vec::new(),
                rips_rest: 0,
            }],
        };
        r.phases = vec![row(0, true, 10), row(1, false, 17602)];
        insta::assert_snapshot!(render(&r, Options::default()));
    }

    #[test]
    fn empty_report_says_so() {
        let mut r = sample_report();
        r.reasons.clear();
        r.vms.clear();
        r.vcpus.clear();
        r.total = Totals::default();
        insta::assert_snapshot!(render(&r, Options::default()));
    }

    #[test]
    fn exits_counted_only_as_dropped_are_not_called_none() {
        let mut r = sample_report();
        r.reasons.clear();
        r.vcpus.clear();
        r.dropped.exit_map_full = r.total.count;
        for opts in [Options::default(), per_vcpu()] {
            let text = render(&r, opts);
            assert!(!text.contains("no VM exits"), "{text}");
            assert_eq!(
                text.lines().nth(1),
                Some("none of the 11 exits has a row here: see the warning below"),
                "{text}"
            );
            assert_eq!(
                text.lines().last(),
                Some("warning: incomplete data (exit_map_full 11); see `dropped` in --format json")
            );
        }
    }
}
