//! `kvmtrace diff A.json B.json`.

use std::process::ExitCode;

use kvmtrace_model::{
    diff::{diff, label},
    render::diff::render,
};

use super::{load_report, load_symbols, write_output};
use crate::cli::DiffArgs;

pub fn run(args: &DiffArgs) -> anyhow::Result<ExitCode> {
    let mut a = load_report(&args.a)?;
    let mut b = load_report(&args.b)?;
    if let Some(symbols) = load_symbols(&args.symbols)? {
        a.symbolize(&symbols);
        b.symbolize(&symbols);
    }
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
