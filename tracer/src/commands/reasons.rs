//! `kvmtrace reasons`: the exit-reason tables.

use std::{io::Write as _, process::ExitCode};

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use kvmtrace_model::exit_reasons::{self, Isa};

use crate::cli::ReasonsArgs;

pub fn run(args: &ReasonsArgs) -> anyhow::Result<ExitCode> {
    let isas = match args.isa {
        Some(isa) => vec![isa],
        None => vec![Isa::Vmx, Isa::Svm],
    };
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(["isa", "reason", "hex", "name"]);
    for isa in isas {
        for (n, name) in exit_reasons::all(isa) {
            t.add_row([
                isa.to_string(),
                n.to_string(),
                format!("{n:#x}"),
                name.into_owned(),
            ]);
        }
    }
    writeln!(std::io::stdout(), "{t}")?;
    Ok(ExitCode::SUCCESS)
}
