//! CSV: one row per reason, or per (VM, vCPU, reason) with `--per-vcpu`. Times in ns.

use super::common::{Options, RenderError, percent};
use crate::{
    exit_reasons::Isa,
    report::{Report, Totals},
};

/// The columns every row ends with, after the row's own key columns.
const REASON_COLUMNS: [&str; 9] = [
    "isa",
    "reason",
    "name",
    "failed_entry",
    "count",
    "percent",
    "timed",
    "time_ns",
    "mean_ns",
];

/// The [`REASON_COLUMNS`] of one row.
fn reason_cells(
    isa: Isa,
    reason: u32,
    name: &str,
    failed_entry: bool,
    t: &Totals,
    all: u64,
) -> [String; 9] {
    [
        isa.to_string(),
        reason.to_string(),
        name.to_owned(),
        failed_entry.to_string(),
        t.count.to_string(),
        percent(t.count, all),
        t.timed.to_string(),
        t.time_ns.to_string(),
        t.mean_ns().map(|m| m.to_string()).unwrap_or_default(),
    ]
}

pub fn render(report: &Report, opts: Options) -> Result<Vec<u8>, RenderError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let all = report.total.count;
    if opts.per_vcpu {
        w.write_record(["pid", "vcpu_id"].into_iter().chain(REASON_COLUMNS))?;
        for r in &report.vcpus {
            let key = [r.vm_id(), r.vcpu_label()];
            let cells = reason_cells(r.isa, r.reason, &r.name, r.failed_entry, &r.totals, all);
            w.write_record(key.into_iter().chain(cells))?;
        }
    } else {
        w.write_record(REASON_COLUMNS)?;
        for r in &report.reasons {
            w.write_record(reason_cells(
                r.isa,
                r.reason,
                &r.name,
                r.failed_entry,
                &r.totals,
                all,
            ))?;
        }
    }
    w.flush().map_err(csv::Error::from)?;
    w.into_inner()
        .map_err(|e| RenderError::Csv(csv::Error::from(e.into_error())))
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    fn text(per_vcpu: bool) -> String {
        let bytes = render(
            &sample_report(),
            Options {
                per_vcpu,
                ..Options::default()
            },
        )
        .unwrap_or_default();
        String::from_utf8(bytes).unwrap_or_default()
    }

    #[test]
    fn per_reason_rows() {
        insta::assert_snapshot!(text(false));
    }

    #[test]
    fn per_vcpu_rows() {
        insta::assert_snapshot!(text(true));
    }
}
