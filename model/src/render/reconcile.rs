//! `kvmtrace reconcile`'s table: each guest counter read against the host's count,
//! with its verdict and causes.

use std::collections::BTreeSet;

use comfy_table::{CellAlignment, Table, presets::UTF8_FULL_CONDENSED};

use crate::{
    cause::Verdict,
    reconcile::{Reconciliation, Row},
    verdict::RecordVerdict,
};

/// The first line: the reads by standing, the reads each cause touches, and the
/// differences with no known cause.
pub fn summary(v: &RecordVerdict) -> String {
    let mut standing = vec![format!("{} exact", v.exact)];
    for (n, what) in [
        (v.undefined, Verdict::Undefined.describe()),
        (v.cpuid_self_exit, Verdict::CpuidSelfExit.describe()),
        (v.accepted, "accepted"),
        (v.wrong, "wrong"),
    ] {
        if n > 0 {
            standing.push(format!("{n} {what}"));
        }
    }
    let mut out = format!("{} guest counter reads: {}", v.reads, standing.join(", "));
    if !v.causes.is_empty() {
        let causes: Vec<String> = v
            .causes
            .iter()
            .map(|c| {
                let accepted = if c.accepted { " (accepted)" } else { "" };
                format!("{} {}{accepted}", c.reads, c.cause.describe())
            })
            .collect();
        out.push_str(&format!("; causes: {}", causes.join(", ")));
    }
    out.push_str(&format!("; {} unexplained", v.unexplained));
    let printout = v.guest_printout_mismatches.len();
    if printout > 0 {
        out.push_str(&format!(" ({printout} in the guest's printout)"));
    }
    out
}

/// A row's verdict column: each cause, the accepted ones marked.
fn verdict_cell(row: &Row, accepted: &BTreeSet<Verdict>) -> String {
    row.every_cause()
        .iter()
        .map(|c| {
            let mark = if accepted.contains(c) {
                " (accepted)"
            } else {
                ""
            };
            format!("{}{mark}", c.describe())
        })
        .collect::<Vec<_>>()
        .join(" + ")
}

/// The summary line and the table of `rec`, then what the guest printed that no read
/// returned.
pub fn table(rec: &Reconciliation) -> String {
    let accepted: BTreeSet<Verdict> = rec
        .verdict
        .causes
        .iter()
        .filter(|c| c.accepted)
        .map(|c| c.cause)
        .collect();
    let mut out = format!("{}\n", summary(&rec.verdict));
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
        .filter(|r| r.host > 0 || r.guest > 0 || r.every_cause().iter().any(|c| !c.is_ok()))
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
            verdict_cell(r, &accepted),
        ]);
    }
    for i in [0, 1, 3, 4, 5] {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    out.push_str(&format!("{t}\n"));
    for m in &rec.verdict.guest_printout_mismatches {
        out.push_str(&format!("guest output mismatch: {m}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        leaves::UNDEFINED_EDX,
        reconcile::{reconcile, reconcile_judged, tests::read},
        report::{CpuidRead, LeafKind, tests::sample_report},
        verdict::{
            Judging,
            tests::{readout, with_tracepoint},
        },
    };

    fn reads(reads: Vec<CpuidRead>) -> crate::report::Report {
        let mut r = sample_report();
        r.cpuid_reads = reads;
        r
    }

    #[test]
    fn right_reads_and_a_printout_mismatch() {
        let r = reads(vec![
            read(LeafKind::Count, 48, 544, 0, 544),
            read(LeafKind::Count, 10, 650, 0, 651),
            read(LeafKind::Count, 35, 0, UNDEFINED_EDX, 0),
            read(LeafKind::Total, 0, 6800, 0, 6801),
            read(LeafKind::Total, 0, 5, 0, (1 << 32) + 5),
        ]);
        let guest = readout(&[(48, "EPT_VIOLATION", 545)]);
        let judging = Judging {
            guest: Some(&guest),
            ..Judging::default()
        };
        insta::assert_snapshot!(table(&reconcile_judged(&r, &judging)));
    }

    /// A patch wrong for several causes, some on the same read; an answer set after
    /// the tracepoint (one of them about an undefined reason, with no exits).
    fn wrong_patch() -> crate::report::Report {
        let mut unset = read(LeafKind::Count, 48, 600, 0, 544);
        unset.edx = 5;
        reads(vec![
            read(LeafKind::Count, 10, 650, 0, 651),
            read(LeafKind::Count, 32, 100, 0, 937),
            unset,
            read(LeafKind::Count, 28, 900, 0, 700),
            read(LeafKind::Count, 30, 5, 0, (1 << 32) + 5),
            with_tracepoint(read(LeafKind::Count, 12, 40, 0, 40), 41),
            with_tracepoint(read(LeafKind::Count, 35, 0, UNDEFINED_EDX, 0), 0xd),
        ])
    }

    #[test]
    fn named_causes_each_counted() {
        insta::assert_snapshot!(table(&reconcile(&wrong_patch())));
    }

    #[test]
    fn accepted_causes_are_marked() {
        let judging = Judging {
            accept: [Verdict::FastpathNotCounted, Verdict::RegistersUnset].into(),
            guest: None,
        };
        insta::assert_snapshot!(table(&reconcile_judged(&wrong_patch(), &judging)));
    }

    #[test]
    fn an_unexplained_difference_beside_named_ones() {
        let r = reads(vec![
            read(LeafKind::Count, 32, 100, 0, 937),
            read(LeafKind::Count, 30, 1000, 0, 1387),
            with_tracepoint(read(LeafKind::Count, 28, 500, 0, 700), 3),
        ]);
        insta::assert_snapshot!(table(&reconcile(&r)));
    }

    #[test]
    fn zero_unexplained_in_the_summary_is_never_the_unexplained_outcome() {
        let guest = readout(&[(48, "EPT_VIOLATION", 545)]);
        let with_guest = Judging {
            guest: Some(&guest),
            ..Judging::default()
        };
        let records = [
            reads(vec![read(LeafKind::Count, 48, 544, 0, 544)]),
            wrong_patch(),
            reads(vec![read(LeafKind::Count, 30, 1000, 0, 1387)]),
        ];
        let mut outcomes = Vec::new();
        for r in &records {
            for judging in [&Judging::default(), &with_guest] {
                let rec = reconcile_judged(r, judging);
                let says_none = summary(&rec.verdict).contains("; 0 unexplained");
                assert_eq!(
                    says_none,
                    rec.verdict.outcome != crate::verdict::Outcome::Unexplained,
                    "{rec:?}"
                );
                outcomes.push(rec.verdict.outcome);
            }
        }
        use crate::verdict::Outcome::{CausesNamed, Right, Unexplained};
        // The guest printed 545 EPT_VIOLATION exits: no read of the three returned it.
        assert_eq!(
            outcomes,
            [
                Right,
                Unexplained,
                CausesNamed,
                Unexplained,
                Unexplained,
                Unexplained
            ]
        );
    }

    #[test]
    fn the_json_states_the_same_verdict() {
        let judging = Judging {
            accept: [Verdict::RegistersUnset].into(),
            guest: None,
        };
        let rec = reconcile_judged(&wrong_patch(), &judging);
        let json = serde_json::to_string_pretty(&rec).unwrap_or_else(|e| panic!("{e}"));
        insta::assert_snapshot!(json);
    }
}
