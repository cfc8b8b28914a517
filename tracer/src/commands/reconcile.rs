//! `kvmtrace reconcile RECORD.json [--guest GUEST.json] [--accept CAUSE,...]`.

use std::process::ExitCode;

use kvmtrace_model::{
    reconcile::{contradictions, reconcile_judged},
    report::{RegistersInfo, Report},
    verdict::{Judging, Outcome},
};
use tracer_common::cpuid_exit;

use super::{Failure, load_guest_readout, load_report, write_output};
use crate::{
    cli::{ReconcileArgs, TextFormat},
    exit_status::Status,
};

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
    let guest = args.guest.as_deref().map(load_guest_readout).transpose()?;
    let judging = Judging {
        accept: args.accept.iter().copied().collect(),
        guest: guest.as_ref(),
    };
    let rec = reconcile_judged(&report, &judging);
    let bytes = match args.format {
        TextFormat::Json => {
            let mut v = serde_json::to_vec_pretty(&rec)?;
            v.push(b'\n');
            v
        }
        TextFormat::Table => kvmtrace_model::render::reconcile::table(&rec).into_bytes(),
    };
    write_output(args.output.as_deref(), &bytes)?;
    Ok(status(rec.verdict.outcome).into())
}

/// The exit status of the verdict: the same value the summary line and the JSON state.
fn status(outcome: Outcome) -> Status {
    match outcome {
        Outcome::Right => Status::Success,
        Outcome::CausesNamed => Status::CausesNamed,
        Outcome::Unexplained => Status::Unexplained,
    }
}
