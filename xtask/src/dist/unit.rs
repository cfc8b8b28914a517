//! The checks of the exporter's unit (`dist/kvmtrace-export.service`) with systemd's
//! own tools: `systemd-analyze security --offline=yes` rates it, `systemd-analyze
//! verify` checks it against a root that holds what the package installs.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::process;

/// The unit, in the checkout and in the package.
pub const UNIT: &str = "kvmtrace-export.service";
/// Where Debian 12's packages install system units (dh_installsystemd's choice in
/// bookworm: the /usr merge of unit files waits for trixie).
pub const UNIT_DIR: &str = "lib/systemd/system";
/// The most exposure `systemd-analyze security` may rate the unit (issue 31).
pub const MAX_EXPOSURE: f64 = 3.0;

/// `systemd-analyze ARGS`, or one line saying how to get it.
fn analyze(args: &[&std::ffi::OsStr], env: &[(&str, &Path)]) -> anyhow::Result<(bool, String)> {
    let mut cmd = Command::new("systemd-analyze");
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = process::output(&mut cmd).with_context(|| {
        "systemd-analyze is missing: install systemd (apt-get install systemd)".to_owned()
    })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// The overall exposure `systemd-analyze security --offline=yes` gives `unit` (a file).
pub fn exposure(unit: &Path) -> anyhow::Result<f64> {
    let (_, text) = analyze(
        &[
            "security".as_ref(),
            "--offline=yes".as_ref(),
            unit.as_os_str(),
        ],
        &[],
    )?;
    parse_exposure(&text).with_context(|| {
        format!(
            "systemd-analyze security --offline=yes {} gave no overall exposure:\n{text}",
            unit.display()
        )
    })
}

/// The number of `→ Overall exposure level for UNIT: 1.8 OK`.
fn parse_exposure(text: &str) -> Option<f64> {
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let (_, rest) = line.rsplit_once(": ")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Fails unless `unit` rates [`MAX_EXPOSURE`] or less; returns its rating.
pub fn check_exposure(unit: &Path) -> anyhow::Result<f64> {
    let rated = exposure(unit)?;
    if rated > MAX_EXPOSURE {
        bail!(
            "systemd-analyze security --offline=yes {} rates it {rated}, more than {MAX_EXPOSURE}: \
             run it to see which settings cost most",
            unit.display()
        );
    }
    Ok(rated)
}

/// `systemd-analyze verify` of the unit in `tree` (a package's root: the unit under
/// [`UNIT_DIR`], its ExecStart binary, and man pages under usr/share/man unless
/// `man` is false), against the host's own system units for its dependencies. Fails
/// on any complaint, warnings included.
pub fn verify(tree: &Path, man: bool) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir().context("cannot make a temporary directory")?;
    let root = scratch.path();
    let units = root.join(UNIT_DIR);
    copy_dir(Path::new("/").join(UNIT_DIR).as_path(), &units)?;
    copy_dir(tree, root)?;
    // ExecReload's kill(1) is the host's (procps, a dependency of the package).
    let kill = root.join("bin/kill");
    std::fs::create_dir_all(root.join("bin")).context("cannot make the root's /bin")?;
    std::fs::copy("/bin/kill", &kill)
        .context("cannot copy /bin/kill for the unit's ExecReload: install procps")?;
    let man_flag = if man { "--man=yes" } else { "--man=no" };
    let root_flag = format!("--root={}", root.display());
    let man_path: PathBuf = tree.join("usr/share/man");
    let (ok, text) = analyze(
        &[
            "verify".as_ref(),
            man_flag.as_ref(),
            root_flag.as_ref(),
            UNIT.as_ref(),
        ],
        &[("MANPATH", &man_path)],
    )?;
    if !ok || !text.trim().is_empty() {
        bail!(
            "systemd-analyze verify {UNIT} (root {}) is not clean:\n{}",
            tree.display(),
            text.trim()
        );
    }
    Ok(())
}

/// Copies the tree `from` into `to` (`cp -a from/. to`).
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    crate::exec::output(Command::new("cp").arg("-a").arg(from.join(".")).arg(to)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkout_unit() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../dist")
            .join(UNIT)
    }

    #[test]
    fn exposure_lines_parse() {
        assert_eq!(
            parse_exposure("x\n→ Overall exposure level for a.service: 1.8 OK 🙂\n"),
            Some(1.8)
        );
        assert_eq!(
            parse_exposure("→ Overall exposure level for a.service: 8.9 EXPOSED 🙁"),
            Some(8.9)
        );
        assert_eq!(parse_exposure("nothing"), None);
    }

    /// The shipped unit rates 3.0 or less (`systemd-analyze` must be installed: the
    /// test fails without it).
    #[test]
    fn the_unit_is_rated_at_most_3() {
        let rated = check_exposure(&checkout_unit()).unwrap_or_else(|e| panic!("{e:#}"));
        eprintln!("{UNIT}: exposure {rated}");
    }

    /// `systemd-analyze verify` is clean for the unit as the package lays it out (an
    /// empty stand-in for the binary; the man pages are checked on the built package,
    /// by the xtask tests).
    #[test]
    fn the_unit_verifies() {
        let tree = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let units = tree.path().join(UNIT_DIR);
        let bin = tree.path().join("usr/bin");
        for dir in [&units, &bin] {
            std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::copy(checkout_unit(), units.join(UNIT)).unwrap_or_else(|e| panic!("{e}"));
        std::fs::copy("/bin/true", bin.join("kvmtrace")).unwrap_or_else(|e| panic!("{e}"));
        verify(tree.path(), false).unwrap_or_else(|e| panic!("{e:#}"));
    }

    #[test]
    fn verify_fails_on_a_warning() {
        let tree = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let units = tree.path().join(UNIT_DIR);
        std::fs::create_dir_all(&units).unwrap_or_else(|e| panic!("{e}"));
        let unit = std::fs::read_to_string(checkout_unit()).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(units.join(UNIT), format!("{unit}\nNoSuchKey=1\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        // No binary either: both complaints are errors here.
        let err = verify(tree.path(), false)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("NoSuchKey"), "{err}");
        assert!(err.contains("/usr/bin/kvmtrace"), "{err}");
    }
}
