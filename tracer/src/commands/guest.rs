//! `kvmtrace guest`: read a patched KVM's exit counters from inside the guest.

use std::process::ExitCode;

use kvmtrace::cpu::Cpu;
use kvmtrace_model::guest;

use super::{BadInput, write_output};
use crate::{
    cli::{GuestArgs, TextFormat},
    exit_status::Status,
};

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
        TextFormat::Table => kvmtrace_model::render::guest::table(&readout).into_bytes(),
    };
    write_output(args.output.as_deref(), &bytes)?;
    Ok(if readout.patched {
        Status::Success
    } else {
        Status::NotPatched
    }
    .into())
}
