//! `kvmtrace reconcile RECORD.json [--guest GUEST.json]`.

use std::{collections::BTreeMap, process::ExitCode};

use comfy_table::{CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use kvmtrace::{
    guest::GuestReadout,
    reconcile::{Reconciliation, reconcile},
};

use super::{Failure, load_guest_readout, load_report, write_output};
use crate::{
    cli::{ReconcileArgs, TextFormat},
    exit_status::Status,
};

fn table(rec: &Reconciliation, mismatches: &[String]) -> String {
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
            r.verdict.describe().to_owned(),
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

/// Checks the guest's own printout against the registers the host saw it read: every
/// value it printed must be one that a read of that reason returned (a record may hold
/// several VMs, each with its readout).
fn guest_mismatches(rec: &Reconciliation, guest: &GuestReadout) -> Vec<String> {
    guest
        .reasons
        .iter()
        .filter(|g| {
            let mut reads = rec
                .rows
                .iter()
                .filter(|r| r.reason == Some(g.reason))
                .peekable();
            reads.peek().is_some() && !reads.any(|r| r.guest == g.count)
        })
        .map(|g| {
            format!(
                "{} ({}): the guest printed {}, which no read of it returned",
                g.name, g.reason, g.count
            )
        })
        .collect()
}

pub fn run(args: &ReconcileArgs) -> anyhow::Result<ExitCode> {
    let report = load_report(&args.record)?;
    if report.cpuid_reads.is_empty() {
        return Err(Failure {
            status: Status::NoCounterReads,
            message: format!(
                "{} has no guest counter reads: record with `kvmtrace record --snapshots` while the guest runs `kvmtrace guest`",
                args.record.display()
            ),
        }
        .into());
    }
    let rec = reconcile(&report);
    let mismatches = match &args.guest {
        Some(path) => guest_mismatches(&rec, &load_guest_readout(path)?),
        None => Vec::new(),
    };
    let bytes = match args.format {
        TextFormat::Json => {
            let mut v = serde_json::to_vec_pretty(&rec)?;
            v.push(b'\n');
            v
        }
        TextFormat::Table => table(&rec, &mismatches).into_bytes(),
    };
    write_output(args.output.as_deref(), &bytes)?;
    Ok(if rec.unexplained > 0 || !mismatches.is_empty() {
        Status::Unexplained
    } else {
        Status::Success
    }
    .into())
}
