//! `kvmtrace reconcile`'s table: each guest counter read against the host's count,
//! with its verdict and causes.

use std::collections::BTreeMap;

use comfy_table::{CellAlignment, Table, presets::UTF8_FULL_CONDENSED};

use crate::reconcile::Reconciliation;

/// The summary line and the table of `rec`, then the guest printout's `mismatches`.
pub fn table(rec: &Reconciliation, mismatches: &[String]) -> String {
    let mut by_verdict: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &rec.rows {
        *by_verdict.entry(r.verdict.describe()).or_default() += 1;
    }
    let summary: Vec<String> = by_verdict.iter().map(|(v, n)| format!("{n} {v}")).collect();
    let mut out = format!(
        "{} guest counter reads: {}; {} unexplained\n",
        rec.reads,
        summary.join(", "),
        rec.unexplained
    );
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "VM",
        "reason",
        "name",
        "host",
        "guest",
        "difference",
        "verdict",
    ]);
    // Reads of reasons with no exits on either side and an expected answer say nothing.
    for r in rec
        .rows
        .iter()
        .filter(|r| r.host > 0 || r.guest > 0 || !r.verdict.is_ok())
    {
        t.add_row([
            r.pid.to_string(),
            r.reason
                .map(|x| x.to_string())
                .unwrap_or_else(|| "-".into()),
            r.name.clone(),
            r.host.to_string(),
            r.guest.to_string(),
            format!("{:+}", r.difference),
            if r.causes.is_empty() {
                r.verdict.describe().to_owned()
            } else {
                r.causes
                    .iter()
                    .map(|c| c.describe())
                    .collect::<Vec<_>>()
                    .join(" + ")
            },
        ]);
    }
    for i in [0, 1, 3, 4, 5] {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    out.push_str(&format!("{t}\n"));
    for m in mismatches {
        out.push_str(&format!("guest output mismatch: {m}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        reconcile::{reconcile, tests::read},
        report::{LeafKind, tests::sample_report},
    };

    #[test]
    fn reads_verdicts_and_mismatches() {
        let mut r = sample_report();
        r.cpuid_reads = vec![
            read(LeafKind::Count, 48, 544, 0, 544),
            read(LeafKind::Count, 10, 650, 0, 651),
            read(LeafKind::Count, 32, 100, 0, 937),
            read(LeafKind::Total, 0, 6800, 0, 6801),
            read(LeafKind::Count, 30, 5, 0, (1 << 32) + 5),
        ];
        let mismatches = ["reason 48: printed 545, read 544".to_owned()];
        insta::assert_snapshot!(table(&reconcile(&r), &mismatches));
    }
}
