//! `cargo xtask dist`: the Debian package, `target/dist/kvmtrace_<version>_amd64.deb`.
//!
//! 1. kvmtrace is built as the lab builds it ([`crate::lab::inputs::build_kvmtrace`]:
//!    release, statically linked), so the package holds the binary the lab tests.
//! 2. The package's tree is laid out in `target/dist/kvmtrace_<version>_amd64/`: the
//!    binary (stripped, as dh_strip would), the man pages and completions that binary
//!    writes from its own clap definitions (`kvmtrace dist-files`, the pages gzipped
//!    with `gzip -9n`), the exporter's unit and `/etc/default/kvmtrace` (a conffile),
//!    the copyright and changelog, and the maintainer scripts. Everything but the
//!    binary comes from `dist/` and `dist/deb/` (see dist/deb/README.md).
//! 3. `dpkg-deb --build --root-owner-group` packs it: every file root's, so no
//!    fakeroot is needed.
//! 4. It checks what it built: `systemd-analyze verify` on the unit in the package's
//!    tree, its `systemd-analyze security` rating (at most [`unit::MAX_EXPOSURE`]), and
//!    lintian (installed if missing), which must report no error.
//!
//! dpkg-deb rather than cargo-deb: the package needs files the build makes (the man
//! pages and completions come from the built binary), maintainer scripts of its own
//! (the unit installed, not enabled), and the lab's static binary; dpkg-deb is on
//! every Debian machine already and takes the tree as it is, while cargo-deb would be
//! one more tool to build and configure around all three.

pub mod unit;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{apt, exec::output, files::write, lab::step::Step, process};

#[derive(Args, Debug, Default)]
pub struct Options {
    /// Skip the checks of the built package (lintian and systemd-analyze).
    #[arg(long)]
    pub no_check: bool,
}

/// The package's name, and its architecture (the static target's).
const PACKAGE: &str = "kvmtrace";
const ARCH: &str = "amd64";
/// The Debian revision of this packaging of the workspace's version.
const DEBIAN_REVISION: &str = "1";
/// The shells' completion files: (what `kvmtrace dist-files` writes, where it goes).
const COMPLETIONS: [(&str, &str); 3] = [
    (
        "kvmtrace.bash",
        "usr/share/bash-completion/completions/kvmtrace",
    ),
    ("_kvmtrace", "usr/share/zsh/vendor-completions/_kvmtrace"),
    (
        "kvmtrace.fish",
        "usr/share/fish/vendor_completions.d/kvmtrace.fish",
    ),
];

pub fn run(opts: &Options, root: &Path) -> anyhow::Result<()> {
    let deb = build(root)?;
    if !opts.no_check {
        check(root, &deb)?;
    }
    println!("{}", deb.display());
    Ok(())
}

/// The package's version: the workspace's, with [`DEBIAN_REVISION`]. The first entry
/// of dist/deb/changelog must name it.
fn version(root: &Path) -> anyhow::Result<String> {
    let version = format!("{}-{DEBIAN_REVISION}", env!("CARGO_PKG_VERSION"));
    let changelog = root.join("dist/deb/changelog");
    let text = std::fs::read_to_string(&changelog)
        .with_context(|| format!("cannot read {}", changelog.display()))?;
    let first = changelog_version(&text);
    if first != Some(version.as_str()) {
        bail!(
            "{}'s first entry is {} but the package is {version} (Cargo.toml's version): \
             add an entry for {version} at its top",
            changelog.display(),
            first.unwrap_or("missing")
        );
    }
    Ok(version)
}

/// The version of a Debian changelog's first entry: `kvmtrace (0.1.0-1) unstable; ...`.
fn changelog_version(text: &str) -> Option<&str> {
    let first = text.lines().find(|l| !l.trim().is_empty())?;
    let (_, rest) = first.split_once('(')?;
    rest.split_once(')').map(|(v, _)| v)
}

/// Builds the package; returns its path.
pub fn build(root: &Path) -> anyhow::Result<PathBuf> {
    let version = version(root)?;
    let (binary, _) = crate::lab::inputs::build_kvmtrace(root)?;
    let s = Step::start("dist");
    let dist = root.join("target/dist");
    let name = format!("{PACKAGE}_{version}_{ARCH}");
    let tree = dist.join(&name);
    if tree.exists() {
        std::fs::remove_dir_all(&tree)
            .with_context(|| format!("cannot remove the old {}", tree.display()))?;
    }
    s.message("laying out the package's tree");
    lay_out(root, &binary, &tree, &version)?;
    let deb = dist.join(format!("{name}.deb"));
    s.message("dpkg-deb --build");
    let mut dpkg = Command::new("dpkg-deb");
    dpkg.args(["--build", "--root-owner-group", "-Zxz"])
        .arg(&tree)
        .arg(&deb);
    if let Some(epoch) = source_date_epoch(root) {
        // Reproducible: dpkg-deb clamps the files' times to it.
        dpkg.env("SOURCE_DATE_EPOCH", epoch);
    }
    output(&mut dpkg).context("dpkg-deb could not build the package")?;
    s.done(format!("{}", deb.display()));
    Ok(deb)
}

/// The last commit's time, for reproducible file times, when git knows it.
fn source_date_epoch(root: &Path) -> Option<String> {
    if let Ok(epoch) = std::env::var("SOURCE_DATE_EPOCH") {
        return Some(epoch);
    }
    output(
        Command::new("git")
            .args(["log", "-1", "--format=%ct"])
            .current_dir(root),
    )
    .ok()
    .map(|t| t.trim().to_owned())
    .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
}

/// Lays the package out in `tree` (which must not exist).
fn lay_out(root: &Path, binary: &Path, tree: &Path, version: &str) -> anyhow::Result<()> {
    let deb_dir = root.join("dist/deb");
    let doc = tree.join("usr/share/doc").join(PACKAGE);
    let kvmtrace = tree.join("usr/bin/kvmtrace");
    install(binary, &kvmtrace, 0o755)?;
    // As dh_strip: the symbols go, the eBPF object embedded in the data stays.
    output(
        Command::new("strip")
            .args(["--remove-section=.comment", "--remove-section=.note"])
            .arg("--strip-unneeded")
            .arg(&kvmtrace),
    )
    .context("cannot strip kvmtrace: install binutils")?;

    // The man pages and completions, from the packaged binary itself.
    let generated = tempfile::tempdir().context("cannot make a temporary directory")?;
    output(
        Command::new(&kvmtrace)
            .arg("dist-files")
            .arg(generated.path()),
    )
    .context("kvmtrace dist-files failed")?;
    let man_dir = generated.path().join("man");
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man_dir)
        .with_context(|| format!("cannot list {}", man_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    if pages.is_empty() {
        bail!("kvmtrace dist-files wrote no man page");
    }
    for page in &pages {
        let name = page
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        gzip(
            page,
            &tree.join("usr/share/man/man1").join(format!("{name}.gz")),
        )?;
    }
    for (made, to) in COMPLETIONS {
        install(
            &generated.path().join("completions").join(made),
            &tree.join(to),
            0o644,
        )?;
    }

    install(
        &root.join("dist").join(unit::UNIT),
        &tree.join(unit::UNIT_DIR).join(unit::UNIT),
        0o644,
    )?;
    install(
        &deb_dir.join("kvmtrace.default"),
        &tree.join("etc/default/kvmtrace"),
        0o644,
    )?;
    // The exporter's web configuration (a conffile: a hash nobody knows until the
    // operator puts theirs), and the recipe that makes its certificates.
    install(
        &root.join("dist/web-config.yml"),
        &tree.join("etc/kvmtrace/web-config.yml"),
        0o644,
    )?;
    install(&root.join("dist/README.md"), &doc.join("README.web"), 0o644)?;
    // What the unit runs with, and the sysctl Debian's kernels need.
    install(
        &deb_dir.join("README.md"),
        &doc.join("README.Debian"),
        0o644,
    )?;
    install(&deb_dir.join("copyright"), &doc.join("copyright"), 0o644)?;
    gzip(&deb_dir.join("changelog"), &doc.join("changelog.Debian.gz"))?;
    install(
        &deb_dir.join("lintian-overrides"),
        &tree.join("usr/share/lintian/overrides").join(PACKAGE),
        0o644,
    )?;

    let control = tree.join("DEBIAN");
    for script in ["postinst", "prerm", "postrm"] {
        install(&deb_dir.join(script), &control.join(script), 0o755)?;
    }
    install(
        &deb_dir.join("conffiles"),
        &control.join("conffiles"),
        0o644,
    )?;
    let template = std::fs::read_to_string(deb_dir.join("control.in"))
        .with_context(|| format!("cannot read {}", deb_dir.join("control.in").display()))?;
    let size = installed_size_kib(tree)?;
    let text = template
        .replace("@VERSION@", version)
        .replace("@INSTALLED_SIZE@", &size.to_string());
    write(&control.join("control"), text)?;
    write(&control.join("md5sums"), md5sums(tree)?)?;
    set_mode(&control.join("control"), 0o644)?;
    set_mode(&control.join("md5sums"), 0o644)?;
    set_dir_modes(tree)
}

/// Copies `from` to `to` (making its directories) with mode `mode`.
fn install(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    make_parent(to)?;
    std::fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    set_mode(to, mode)
}

fn make_parent(path: &Path) -> anyhow::Result<()> {
    match path.parent() {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
        }
        None => Ok(()),
    }
}

/// Every directory of `tree` (itself included) 0755, whatever the umask was.
fn set_dir_modes(tree: &Path) -> anyhow::Result<()> {
    set_mode(tree, 0o755)?;
    for entry in
        std::fs::read_dir(tree).with_context(|| format!("cannot list {}", tree.display()))?
    {
        let path = entry
            .with_context(|| format!("cannot list {}", tree.display()))?
            .path();
        if path.is_dir() {
            set_dir_modes(&path)?;
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

/// `gzip -9n` of `from` into `to` (as Debian policy wants man pages and changelogs:
/// best compression, no name or time stamp inside).
fn gzip(from: &Path, to: &Path) -> anyhow::Result<()> {
    make_parent(to)?;
    let out = process::output(Command::new("gzip").args(["-9n", "-c"]).arg(from))?;
    if !out.status.success() {
        bail!(
            "gzip -9n {} failed: {}",
            from.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    write(to, out.stdout)?;
    set_mode(to, 0o644)
}

/// Every regular file under `tree` but DEBIAN/, as paths relative to it, sorted.
fn package_files(tree: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, tree: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        for entry in
            std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let path = entry
                .with_context(|| format!("cannot list {}", dir.display()))?
                .path();
            let rel = path.strip_prefix(tree).unwrap_or(&path).to_path_buf();
            if rel.starts_with("DEBIAN") {
                continue;
            }
            if path.is_dir() {
                walk(&path, tree, files)?;
            } else {
                files.push(rel);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(tree, tree, &mut files)?;
    files.sort();
    Ok(files)
}

/// `Installed-Size`: the files' sizes in KiB, each rounded up, as dpkg-gencontrol
/// counts them (plus one per directory).
fn installed_size_kib(tree: &Path) -> anyhow::Result<u64> {
    let files = package_files(tree)?;
    let mut dirs = std::collections::BTreeSet::new();
    let mut kib = 0;
    for rel in &files {
        let len = std::fs::metadata(tree.join(rel))
            .with_context(|| format!("cannot read {}", rel.display()))?
            .len();
        kib += len.div_ceil(1024);
        dirs.extend(
            rel.ancestors()
                .skip(1)
                .filter(|a| !a.as_os_str().is_empty()),
        );
    }
    Ok(kib + dirs.len() as u64)
}

/// DEBIAN/md5sums: `md5sum` of every file but the conffiles, paths relative to /.
fn md5sums(tree: &Path) -> anyhow::Result<String> {
    let conffiles = std::fs::read_to_string(tree.join("DEBIAN/conffiles")).unwrap_or_default();
    let files: Vec<PathBuf> = package_files(tree)?
        .into_iter()
        .filter(|rel| {
            !conffiles
                .lines()
                .any(|c| c.trim_start_matches('/') == rel.to_string_lossy())
        })
        .collect();
    let mut cmd = Command::new("md5sum");
    cmd.current_dir(tree).args(&files);
    output(&mut cmd).context("md5sum failed")
}

/// Checks the built package: its unit with systemd-analyze (verify against the
/// package's tree, man pages included; the security rating), then lintian.
pub fn check(root: &Path, deb: &Path) -> anyhow::Result<()> {
    let s = Step::start("dist check");
    let tree = deb.with_extension("");
    s.message("systemd-analyze verify and security");
    unit::verify(&tree, true)?;
    let rated = unit::check_exposure(&tree.join(unit::UNIT_DIR).join(unit::UNIT))?;
    s.message("lintian (installing it if missing)");
    apt::install(root, &["lintian"])?;
    let report = lintian(deb)?;
    s.done(format!(
        "{} exposure {rated}; lintian: {}",
        unit::UNIT,
        report.summary()
    ));
    Ok(())
}

/// What lintian said of a package, by severity letter (E, W, I, P, X, O for
/// overridden).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Lintian {
    pub lines: Vec<String>,
}

impl Lintian {
    fn count(&self, letter: char) -> usize {
        self.lines
            .iter()
            .filter(|l| l.starts_with(letter) && l[1..].starts_with(": "))
            .count()
    }

    pub fn summary(&self) -> String {
        format!(
            "{} errors, {} warnings, {} info, {} overridden",
            self.count('E'),
            self.count('W'),
            self.count('I'),
            self.count('O')
        )
    }
}

/// Runs lintian on `deb` (every tag down to info, the overridden ones shown);
/// prints what it says, and fails when it reports an error.
pub fn lintian(deb: &Path) -> anyhow::Result<Lintian> {
    let mut cmd = Command::new("lintian");
    // The errors are counted from its lines: with --show-overrides, --fail-on error
    // also fails on an overridden one (each override is explained in the file).
    cmd.args(["--display-info", "--show-overrides", "--fail-on", "none"])
        .arg(deb);
    let out = process::output(&mut cmd)
        .context("lintian is missing: install it (apt-get install lintian)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let report = Lintian {
        lines: text.lines().map(str::to_owned).collect(),
    };
    for line in &report.lines {
        eprintln!("lintian: {line}");
    }
    if !out.status.success() || report.count('E') > 0 {
        bail!(
            "lintian reports errors in {} ({}): see its lines above",
            deb.display(),
            report.summary()
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changelog_versions_parse() {
        assert_eq!(
            changelog_version("kvmtrace (0.1.0-1) unstable; urgency=medium\n\n  * x\n"),
            Some("0.1.0-1")
        );
        assert_eq!(changelog_version("\nkvmtrace (2.0-3) x;"), Some("2.0-3"));
        assert_eq!(changelog_version("no entry"), None);
    }

    #[test]
    fn the_changelog_names_the_workspace_version() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or_else(|| panic!("no checkout above xtask"));
        let version = version(root).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(version.starts_with(env!("CARGO_PKG_VERSION")), "{version}");
    }

    #[test]
    fn lintian_lines_are_counted_by_severity() {
        let report = Lintian {
            lines: [
                "E: kvmtrace: bad",
                "W: kvmtrace: meh",
                "W: kvmtrace: meh again",
                "O: kvmtrace: known",
                "N: a note",
                "Error: not a tag",
            ]
            .map(str::to_owned)
            .to_vec(),
        };
        assert_eq!(
            report.summary(),
            "1 errors, 2 warnings, 0 info, 1 overridden"
        );
    }

    /// Every file the package takes from the checkout is there.
    #[test]
    fn the_packaging_files_exist() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for file in [
            "dist/kvmtrace-export.service",
            "dist/deb/control.in",
            "dist/deb/conffiles",
            "dist/deb/copyright",
            "dist/deb/changelog",
            "dist/deb/kvmtrace.default",
            "dist/deb/lintian-overrides",
            "dist/deb/postinst",
            "dist/deb/prerm",
            "dist/deb/postrm",
            "dist/web-config.yml",
            "dist/README.md",
        ] {
            assert!(root.join(file).is_file(), "{file} is missing");
        }
    }
}
