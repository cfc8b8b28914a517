//! `cargo xtask kmod --check`: `checkpatch.pl --strict` on the series and every
//! test-only and bench-only variant.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use super::{
    debian,
    options::{Options, Variant},
    source,
};
use crate::{apt, process::show};

/// Runs `checkpatch.pl --strict` on the series of `opts.kernel` and on every
/// test-only variant of it.
pub fn check(opts: &Options, root: &Path) -> anyhow::Result<()> {
    apt::install(root, &["perl", "xz-utils"])?;
    let source_pkg = opts.kernel.source_package();
    let debian = opts.kernel.apt(root)?;
    let (source_version, tarball) =
        debian.with_fresh_lists(|| debian::source_tarball(&debian, opts.kernel, root))?;

    let mut patches = source::series(root, opts.kernel, Variant::Good)?;
    for variant in Variant::TEST_ONLY {
        let dir = source::variant_dir(root, opts.kernel, variant);
        patches.extend(source::patch_files(&dir)?);
    }
    for variant in Variant::BENCH_ONLY {
        let dir = source::variant_dir(root, opts.kernel, variant);
        if dir.is_dir() {
            patches.extend(source::patch_files(&dir)?);
        }
    }
    let work = opts.work_dir(root);
    // `src` is the builds' too (see `build`).
    let _work = crate::lock::exclusive(&crate::lock::beside(&work), "a kvm module build")?;
    let src = work.join("src");
    source::extract(opts.kernel, &tarball, &source_version, &patches, &src)?;

    let checkpatch = src.join("scripts/checkpatch.pl");
    let mut failed = Vec::new();
    for patch in &patches {
        let mut cmd = Command::new("perl");
        cmd.arg(&checkpatch)
            .args(["--strict", "--no-tree", "--color=never"])
            .arg(patch);
        eprintln!("+ {}", show(&cmd));
        let out = cmd
            .output()
            .with_context(|| format!("cannot start {}", show(&cmd)))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let totals = text
            .lines()
            .find_map(checkpatch_totals)
            .with_context(|| format!("checkpatch printed no totals for {}", patch.display()))?;
        let name = patch
            .strip_prefix(root)
            .unwrap_or(patch)
            .display()
            .to_string();
        if totals == (0, 0, 0) && out.status.success() {
            eprintln!("kmod: {name}: clean");
        } else {
            eprint!("{text}");
            failed.push(format!(
                "{name} ({} errors, {} warnings, {} checks)",
                totals.0, totals.1, totals.2
            ));
        }
    }
    if !failed.is_empty() {
        bail!("checkpatch --strict is not clean: {}", failed.join(", "));
    }
    eprintln!(
        "kmod: checkpatch --strict clean on {} patches ({source_pkg} {source_version})",
        patches.len()
    );
    Ok(())
}

/// `(errors, warnings, checks)` from checkpatch's `total: ...` line.
fn checkpatch_totals(line: &str) -> Option<(u32, u32, u32)> {
    // "total: 0 errors, 0 warnings, 0 checks, 108 lines checked"
    let rest = &line[line.find("total: ")? + "total: ".len()..];
    let mut numbers = rest.split(", ").map(|part| {
        part.split_whitespace()
            .next()
            .and_then(|n| n.parse::<u32>().ok())
    });
    Some((numbers.next()??, numbers.next()??, numbers.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpatch_total_line() {
        let line = "total: 0 errors, 2 warnings, 1 checks, 108 lines checked";
        assert_eq!(checkpatch_totals(line), Some((0, 2, 1)));
        assert_eq!(checkpatch_totals("total: 0 errors"), None);
        assert_eq!(checkpatch_totals("nothing here"), None);
    }
}
