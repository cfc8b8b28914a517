//! `kvmtrace show RECORD.json`: render a saved record in another format.

use std::process::ExitCode;

use kvmtrace_model::render;

use super::{load_report, load_symbols, render_options, write_output};
use crate::cli::ShowArgs;

pub fn run(args: &ShowArgs) -> anyhow::Result<ExitCode> {
    let mut report = load_report(&args.record)?;
    if let Some(symbols) = load_symbols(&args.report.symbols)? {
        report.symbolize(&symbols);
    }
    if args.report.detail && report.reasons.iter().all(|r| r.detail.is_empty()) {
        log::warn!(
            "{} has no detail rows: record with --detail to count them",
            args.record.display()
        );
    }
    let bytes = render::render(&report, args.report.format, render_options(&args.report))?;
    write_output(args.report.output.as_deref(), &bytes)?;
    Ok(ExitCode::SUCCESS)
}
