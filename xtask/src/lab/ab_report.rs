//! The nested-vs-shadow A/B report: `report.md` and `report.svg`.

use std::{path::Path, process::Command};

use super::options::{Options, mode_dir_name};
use crate::files::write_in as write;

/// Writes the nested-vs-shadow A/B report, `report.md` and `report.svg`, with the
/// same kvmtrace binary that recorded (`kvmtrace diff`, with `--detail` and L2's
/// symbols: records made with `--detail`/`--rip` cite the sub-keys and functions that
/// moved), plus each mode's reconciliation. Needs both modes and their records.
pub fn ab_report(
    opts: &Options,
    out: &Path,
    kvmtrace: &Path,
    system_map: Option<&Path>,
) -> anyhow::Result<()> {
    let nested = out.join(mode_dir_name(opts, 1)).join("record.json");
    let shadow = out.join(mode_dir_name(opts, 0)).join("record.json");
    if !nested.is_file() || !shadow.is_file() {
        return Ok(());
    }
    let diff = |format: &str, file: &str| {
        let mut cmd = Command::new(kvmtrace);
        cmd.arg("diff")
            .args([&nested, &shadow])
            .args(["--detail", "--format", format, "-o"])
            .arg(out.join(file));
        if let Some(map) = system_map.filter(|p| p.is_file()) {
            cmd.arg("--guest-symbols").arg(map);
        }
        crate::exec::output(&mut cmd)
    };
    diff("md", "report.md.tmp")?;
    diff("svg", "report.svg")?;
    let mut md = format!("# {} lab: nested vs shadow paging\n\n", opts.isa.name());
    md.push_str(&std::fs::read_to_string(out.join("report.md.tmp"))?);
    std::fs::remove_file(out.join("report.md.tmp"))?;
    md.push_str("\n![chart](report.svg)\n\n## Guest counters vs host\n\n");
    for mode in [1, 0] {
        let name = mode_dir_name(opts, mode);
        if let Ok(text) = std::fs::read_to_string(out.join(&name).join("reconcile.txt")) {
            let first = text.lines().next().unwrap_or_default();
            md.push_str(&format!("- {name}: {first}\n"));
        }
    }
    write(out, "report.md", &md)?;
    println!(
        "\nA/B report: {} and report.svg",
        out.join("report.md").display()
    );
    Ok(())
}
