//! `kvmtrace show RECORD.json`: render a saved record in another format.

use std::process::ExitCode;

use kvmtrace_model::render::{self, Options};

use super::{load_report, write_output};
use crate::cli::ShowArgs;

pub fn run(args: &ShowArgs) -> anyhow::Result<ExitCode> {
    let report = load_report(&args.record)?;
    let bytes = render::render(
        &report,
        args.report.format,
        Options {
            per_vcpu: args.report.per_vcpu,
        },
    )?;
    write_output(args.report.output.as_deref(), &bytes)?;
    Ok(ExitCode::SUCCESS)
}
