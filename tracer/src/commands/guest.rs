//! `kvmtrace guest`: read a patched KVM's exit counters from inside the guest.

use std::process::ExitCode;

use comfy_table::{CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use kvmtrace::cpu::Cpu;
use kvmtrace_model::guest::{self, GuestReadout};

use super::{BadInput, write_output};
use crate::{
    cli::{GuestArgs, TextFormat},
    exit_status::Status,
};

fn table(r: &GuestReadout) -> String {
    let mut out = format!(
        "{} guest, leaves count {:#x} total {} cycles {}: {}\n",
        r.isa,
        r.leaves.count,
        r.leaves
            .total
            .map(|t| format!("{t:#x}"))
            .unwrap_or_else(|| "-".into()),
        r.leaves
            .cycles
            .map(|t| format!("{t:#x}"))
            .unwrap_or_else(|| "-".into()),
        r.detection
    );
    if !r.patched {
        return out;
    }
    if let (Some(e), Some(c)) = (r.total_exits, r.total_cycles) {
        out.push_str(&format!("total: {e} exits (low 32 bits), {c} cycles\n"));
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(["reason", "name", "exits", "cycles", "note"]);
    for x in &r.reasons {
        t.add_row([
            x.reason.to_string(),
            x.name.clone(),
            x.count.to_string(),
            x.cycles
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            if x.undefined {
                "KVM says: undefined".into()
            } else {
                String::new()
            },
        ]);
    }
    for i in [0, 2, 3] {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    out.push_str(&format!("{t}\n"));
    out
}

fn run_sweep(args: &GuestArgs, leaves: kvmtrace_model::leaves::Leaves) -> anyhow::Result<ExitCode> {
    let isa = args
        .isa
        .or_else(|| guest::vendor_isa(&mut Cpu))
        .ok_or_else(|| BadInput("unknown CPU vendor: give --isa vmx or --isa svm".into()))?;
    let s = guest::sweep(&mut Cpu, leaves, isa);
    let bytes = match args.format {
        TextFormat::Json => {
            let mut v = serde_json::to_vec(&s)?;
            v.push(b'\n');
            v
        }
        TextFormat::Table => format!(
            "{isa} sweep of ECX 0..=0xFFFF and 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF: {} answers, {} defined, {} undefined, {} disagree with the tables\n",
            s.queried, s.defined, s.undefined, s.mismatches
        )
        .into_bytes(),
    };
    write_output(args.output.as_deref(), &bytes)?;
    Ok(if s.mismatches == 0 {
        Status::Success
    } else {
        Status::Unexplained
    }
    .into())
}

pub fn run(args: &GuestArgs) -> anyhow::Result<ExitCode> {
    let leaves = args.leaves.leaves().map_err(BadInput)?;
    if args.sweep {
        return run_sweep(args, leaves);
    }
    let mut readout = guest::read(&mut Cpu, leaves, args.isa).map_err(BadInput)?;
    if !args.all {
        // Reasons with no exits say nothing; a serial console pays for every byte.
        readout.reasons.retain(|x| x.count > 0 || x.undefined);
    }
    let bytes = match args.format {
        TextFormat::Json => {
            let mut v = serde_json::to_vec_pretty(&readout)?;
            v.push(b'\n');
            v
        }
        TextFormat::Table => table(&readout).into_bytes(),
    };
    write_output(args.output.as_deref(), &bytes)?;
    Ok(if readout.patched {
        Status::Success
    } else {
        Status::NotPatched
    }
    .into())
}
