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

/// `kvmtrace reconcile`'s exit status for counters that are wrong, every difference
/// with a named cause (tracer/src/exit_status.rs). A difference with no known cause
/// (5) is a problem for every module set.
const RECONCILE_CAUSES_NAMED: i32 = 7;

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
    /// Its exit status, when that is a problem for `modules`: anything but 0 (every
    /// read right) for the correct modules; anything but 0 or 7 (wrong, every cause
    /// named) for a deliberately wrong variant.
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
    let code = out.status.code();
    let problem = (!status_fits(code, modules)).then(|| {
        format!(
            "kvmtrace reconcile exited {code:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    });
    Ok(Reconciled {
        table,
        reads,
        problem,
    })
}

/// Whether `kvmtrace reconcile` exiting with `code` is what `modules` should give: 0
/// (every read right) for the correct modules; 0 or [`RECONCILE_CAUSES_NAMED`] for a
/// deliberately wrong variant, which may be wrong, but only for causes kvmtrace names.
fn status_fits(code: Option<i32>, modules: Modules) -> bool {
    match code {
        Some(0) => true,
        Some(RECONCILE_CAUSES_NAMED) => !modules.correct(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kmod::Variant;

    #[test]
    fn wrong_variants_may_only_be_wrong_for_named_causes() {
        let correct = [Variant::Good, Variant::AnswersInEmulate].map(Modules::Build);
        let wrong = [Variant::HandlerTop, Variant::RegsUnset].map(Modules::Build);
        for m in correct {
            assert!(status_fits(Some(0), m));
            for bad in [Some(1), Some(5), Some(6), Some(7), None] {
                assert!(!status_fits(bad, m), "{bad:?}");
            }
        }
        for m in wrong {
            assert!(status_fits(Some(0), m) && status_fits(Some(7), m));
            for bad in [Some(1), Some(5), Some(6), None] {
                assert!(!status_fits(bad, m), "{bad:?}");
            }
        }
    }
}
