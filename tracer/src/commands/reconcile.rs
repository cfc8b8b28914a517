//! `kvmtrace reconcile RECORD.json [--guest GUEST.json]`.

use std::process::ExitCode;

use kvmtrace_model::{
    guest::GuestReadout,
    reconcile::{Reconciliation, contradictions, reconcile},
    report::{RegistersInfo, Report},
};
use tracer_common::cpuid_exit;

use super::{Failure, load_guest_readout, load_report, write_output};
use crate::{
    cli::{ReconcileArgs, TextFormat},
    exit_status::Status,
};

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

/// What a record without counter reads saw, and what to check.
fn no_reads_why(report: &Report) -> String {
    let Some(leaves) = report.leaves else {
        return "it was recorded without --snapshots: record with `kvmtrace record --snapshots` while the guest reads its counters (`kvmtrace guest`)".to_owned();
    };
    let cpuid_exits: u64 = report
        .reasons
        .iter()
        .filter(|r| cpuid_exit(r.isa.raw(), r.reason) && !r.failed_entry)
        .map(|r| r.totals.count)
        .sum();
    let asked = format!(
        "count leaf {:#x}, total leaf {}, cycles leaf {}",
        leaves.count,
        leaves
            .total
            .map_or("none".to_owned(), |l| format!("{l:#x}")),
        leaves
            .cycles
            .map_or("none".to_owned(), |l| format!("{l:#x}")),
    );
    let registers = match &report.registers {
        Some(RegistersInfo { error: Some(e), .. }) => {
            format!("; the vCPU registers could not be read ({e})")
        }
        Some(RegistersInfo { layout: None, .. }) => {
            "; no exit of a traced VM was seen, so the vCPU registers were never found".to_owned()
        }
        Some(RegistersInfo {
            cpuid_exits_before_layout: n @ 1..,
            ..
        }) => format!("; {n} CPUID exits came before the vCPU registers were found"),
        _ => String::new(),
    };
    format!(
        "{cpuid_exits} CPUID exits were traced, none asking the {asked}{registers}: check that the guest reads these leaves while the record runs (e.g. `kvmtrace guest` with the same leaf options) and that -p / -- names its VMM"
    )
}

pub fn run(args: &ReconcileArgs) -> anyhow::Result<ExitCode> {
    let report = load_report(&args.record)?;
    if report.cpuid_reads.is_empty() {
        return Err(Failure {
            status: Status::NoCounterReads,
            message: format!(
                "{} has no guest counter reads: {}",
                args.record.display(),
                no_reads_why(&report)
            ),
        }
        .into());
    }
    if let Some(first) = contradictions(&report).first() {
        return Err(Failure {
            status: Status::Error,
            message: format!(
                "{}: the host's counts contradict themselves, so nothing can be judged \
                 against them ({first}); this is a kvmtrace bug: please report it with \
                 the record",
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
        TextFormat::Table => {
            kvmtrace_model::render::reconcile::table(&rec, &mismatches).into_bytes()
        }
    };
    write_output(args.output.as_deref(), &bytes)?;
    Ok(if rec.unexplained > 0 || !mismatches.is_empty() {
        Status::Unexplained
    } else {
        Status::Success
    }
    .into())
}
