//! `kvmtrace diff A.json B.json`.

use std::process::ExitCode;

use kvmtrace_model::{
    diff::{diff, label},
    render::diff::render,
};

use super::{load_report, write_output};
use crate::cli::DiffArgs;

pub fn run(args: &DiffArgs) -> anyhow::Result<ExitCode> {
    let a = load_report(&args.a)?;
    let b = load_report(&args.b)?;
    let file_label = |p: &std::path::Path| p.display().to_string();
    let mut a_label = label(&a, &file_label(&args.a));
    let mut b_label = label(&b, &file_label(&args.b));
    if a_label == b_label {
        a_label = format!("A ({a_label})");
        b_label = format!("B ({b_label})");
    }
    let d = diff(&a, a_label, &b, b_label);
    write_output(
        args.output.as_deref(),
        &render(&d, args.format, args.detail)?,
    )?;
    Ok(ExitCode::SUCCESS)
}
