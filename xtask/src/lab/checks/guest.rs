//! The guest's own counter reads (`kvmtrace guest` in L2) and `kvmtrace reconcile`
//! of the record against them.

use std::{path::Path, process::Command};

use anyhow::Context as _;

use crate::{
    files::write_in as write,
    lab::{
        console::{self, Line},
        image::L1,
        options::{Modules, Options, Workload},
    },
};

/// `kvmtrace reconcile`'s exit status for a difference with no known cause
/// (tracer/src/exit_status.rs).
const RECONCILE_UNEXPLAINED: i32 = 5;

/// Saves what `kvmtrace guest` printed in L2 (`guest.json`) and, with patched modules,
/// reconciles it with the record's snapshots using the same kvmtrace binary
/// (`reconcile.txt`). Returns a problem when the patched KVM's counters do not
/// reconcile; the TEST-ONLY variants are expected not to, and are only reported.
pub fn guest_readout(
    opts: &Options,
    dir: &Path,
    lines: &[Line],
    l1: &L1,
) -> anyhow::Result<Option<String>> {
    if let Some(sweep) = console::l2_section(lines, "KVMLAB-SWEEP") {
        write(dir, "sweep.json", &sweep)?;
        println!("  ECX sweep: {}", sweep.trim());
    }
    let Some(text) = console::l2_section(lines, "KVMLAB-GUEST") else {
        return Ok(None);
    };
    let guest = dir.join("guest.json");
    write(dir, "guest.json", &text)?;
    // Every module set but Debian's stock one has the leaves.
    let (Some((kvmtrace, _)), Some(_)) = (&l1.kvmtrace, opts.module_set().variant()) else {
        return Ok(None);
    };
    if opts.workload == Workload::Sweep {
        // Recorded without snapshots (see record_args): nothing to reconcile.
        return Ok(None);
    };
    let reconciled = reconcile(kvmtrace, dir, Some(&guest), opts.module_set())?;
    println!("  guest counters vs host (kvmtrace reconcile):");
    for line in reconciled.table.lines().take(40) {
        println!("    {line}");
    }
    Ok(reconciled.problem)
}

/// What `kvmtrace reconcile` of a mode's record said.
pub struct Reconciled {
    pub table: String,
    /// Reads it reconciled (the first number of its first line).
    pub reads: u64,
    /// Its exit status, when that is a problem for `modules`: every failure, but an
    /// unexplained difference of a deliberately wrong variant.
    pub problem: Option<String>,
}

/// Runs `kvmtrace reconcile` (the same binary that recorded) on `dir/record.json`,
/// with the guest's readout when there is one, and keeps its table in
/// `reconcile.txt`.
pub fn reconcile(
    kvmtrace: &Path,
    dir: &Path,
    guest: Option<&Path>,
    modules: Modules,
) -> anyhow::Result<Reconciled> {
    let mut cmd = Command::new(kvmtrace);
    cmd.arg("reconcile").arg(dir.join("record.json"));
    if let Some(g) = guest {
        cmd.arg("--guest").arg(g);
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", kvmtrace.display()))?;
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    write(dir, "reconcile.txt", &table)?;
    let reads = table
        .split_whitespace()
        .next()
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    let problem = match out.status.code() {
        Some(0) => None,
        // The deliberately wrong variants may differ; the correct modules must not.
        Some(RECONCILE_UNEXPLAINED) if !modules.correct() => None,
        code => Some(format!(
            "kvmtrace reconcile exited {code:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    };
    Ok(Reconciled {
        table,
        reads,
        problem,
    })
}
