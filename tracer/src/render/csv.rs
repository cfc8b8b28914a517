//! CSV: one row per reason, or per (VM, vCPU, reason) with `--per-vcpu`. Times in ns.

use super::{Options, RenderError};
use crate::report::Report;

pub fn render(report: &Report, opts: Options) -> Result<Vec<u8>, RenderError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let total = report.total.count;
    if opts.per_vcpu {
        w.write_record([
            "pid",
            "vcpu_id",
            "isa",
            "reason",
            "name",
            "failed_entry",
            "count",
            "percent",
            "timed",
            "time_ns",
            "mean_ns",
        ])?;
        for r in &report.vcpus {
            w.write_record([
                r.pid.to_string(),
                r.vcpu_id.to_string(),
                r.isa.to_string(),
                r.reason.to_string(),
                r.name.clone(),
                r.failed_entry.to_string(),
                r.totals.count.to_string(),
                super::percent(r.totals.count, total),
                r.totals.timed.to_string(),
                r.totals.time_ns.to_string(),
                r.totals
                    .mean_ns()
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
            ])?;
        }
    } else {
        w.write_record([
            "isa",
            "reason",
            "name",
            "failed_entry",
            "count",
            "percent",
            "timed",
            "time_ns",
            "mean_ns",
        ])?;
        for r in &report.reasons {
            w.write_record([
                r.isa.to_string(),
                r.reason.to_string(),
                r.name.clone(),
                r.failed_entry.to_string(),
                r.totals.count.to_string(),
                super::percent(r.totals.count, total),
                r.totals.timed.to_string(),
                r.totals.time_ns.to_string(),
                r.mean_ns.map(|m| m.to_string()).unwrap_or_default(),
            ])?;
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
        let bytes = render(&sample_report(), Options { per_vcpu }).unwrap_or_default();
        String::from_utf8(bytes).unwrap_or_default()
    }

    #[test]
    fn per_reason_rows() {
        let t = text(false);
        let lines: Vec<_> = t.lines().collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[1], "vmx,48,EPT_VIOLATION,false,6,54.5,5,1000,200");
        assert_eq!(lines[4], "vmx,99,UNKNOWN(99),false,1,9.1,1,7,7");
    }

    #[test]
    fn per_vcpu_rows() {
        let t = text(true);
        assert_eq!(t.lines().count(), 6);
        assert!(
            t.lines()
                .any(|l| l == "42,1,vmx,30,IO_INSTRUCTION,false,1,9.1,1,1000,1000"),
            "{t}"
        );
    }
}
