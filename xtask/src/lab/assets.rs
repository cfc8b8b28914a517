//! Host-side inputs of the lab: apt packages, Debian packages downloaded (not installed)
//! and unpacked under `target/lab/cache/`, the kernel ABI of the day.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::step::{Step, run_bounded};
use crate::exec::output;

const APT_TIME: Duration = Duration::from_secs(600);

/// `apt-get update` runs at most once per lab run, and only when something is missing.
#[derive(Default)]
pub struct Apt {
    updated: bool,
}

impl Apt {
    fn update(&mut self, step: &Step) -> anyhow::Result<()> {
        if !self.updated {
            step.message("apt-get update");
            run_bounded(Command::new("apt-get").args(["update", "-qq"]), APT_TIME)?;
            self.updated = true;
        }
        Ok(())
    }

    /// Installs the packages that are not installed yet.
    pub fn install(&mut self, step: &Step, packages: &[&str]) -> anyhow::Result<()> {
        let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        step.message(format!("apt-get install {}", missing.join(" ")));
        let install = |missing: &[&str]| {
            run_bounded(
                Command::new("apt-get")
                    .args(["install", "-y", "-qq", "--no-install-recommends"])
                    .args(missing)
                    .env("DEBIAN_FRONTEND", "noninteractive"),
                APT_TIME,
            )
        };
        if install(&missing).is_err() {
            self.update(step)?;
            install(&missing)?;
        }
        step.note(format!("installed {}", missing.join(" ")));
        Ok(())
    }

    /// The `.deb` for `spec` (`name`, `name=version` or `name/release`) in `debs`,
    /// downloaded unless a file of the same name is already there.
    pub fn download(&mut self, step: &Step, debs: &Path, spec: &str) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(debs)
            .with_context(|| format!("cannot create {}", debs.display()))?;
        // Package lists go stale when the mirror moves: refresh once and retry.
        match self.fetch(step, debs, spec) {
            Ok(path) => Ok(path),
            Err(e) if !self.updated => {
                step.note(format!("{e:#}; retrying after apt-get update"));
                self.update(step)?;
                self.fetch(step, debs, spec)
            }
            Err(e) => Err(e),
        }
    }

    fn fetch(&mut self, step: &Step, debs: &Path, spec: &str) -> anyhow::Result<PathBuf> {
        let uris = output(Command::new("apt-get").args(["download", "--print-uris", spec]))?;
        // 'http://…/foo_1.2_amd64.deb' foo_1.2_amd64.deb 12345 SHA256:…
        let mut fields = uris
            .lines()
            .find(|l| l.starts_with('\''))
            .with_context(|| format!("apt-get download --print-uris {spec} printed no URI"))?
            .split_whitespace()
            .skip(1);
        let (Some(file), Some(size)) = (fields.next(), fields.next()) else {
            bail!("cannot parse apt-get --print-uris output for {spec}: {uris}");
        };
        let path = debs.join(file);
        let have = std::fs::metadata(&path).map(|m| m.len().to_string()).ok();
        if have.as_deref() != Some(size) {
            step.message(format!("apt-get download {spec}"));
            run_bounded(
                Command::new("apt-get")
                    .args(["download", "-qq", spec])
                    .current_dir(debs),
                APT_TIME,
            )?;
            if !path.is_file() {
                bail!("apt-get download {spec} did not produce {}", path.display());
            }
            step.note(format!("downloaded {file}"));
        }
        Ok(path)
    }
}

fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", package]))
        .is_ok_and(|s| s.trim() == "install ok installed")
}

/// Unpacks `deb` once into `roots/<deb file stem>/` and returns that directory.
pub fn unpack(deb: &Path, roots: &Path) -> anyhow::Result<PathBuf> {
    let stem = deb
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("bad package file name {}", deb.display()))?;
    let root = roots.join(stem);
    let stamp = root.join(".unpacked");
    if !stamp.exists() {
        if root.exists() {
            std::fs::remove_dir_all(&root)
                .with_context(|| format!("cannot remove {}", root.display()))?;
        }
        std::fs::create_dir_all(&root)
            .with_context(|| format!("cannot create {}", root.display()))?;
        run_bounded(
            Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root),
            Duration::from_secs(300),
        )?;
        std::fs::write(&stamp, b"").with_context(|| format!("cannot write {}", stamp.display()))?;
    }
    Ok(root)
}

/// The kernel ABI the `meta` package (e.g. `linux-image-cloud-amd64`) depends on today,
/// e.g. `6.1.0-48-cloud-amd64`. Looked up every run: the mirror moves with security updates.
pub fn kernel_abi(meta: &str) -> anyhow::Result<String> {
    let deps = output(Command::new("apt-cache").args(["depends", meta]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
        .find(|abi| abi.starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_owned)
        .with_context(|| format!("apt-cache depends {meta} names no linux-image-<abi>"))
}

/// The version of the source package a `.deb` was built from: the version of its
/// `Architecture: all` siblings, which binary-only rebuilds (`+bN`) do not touch.
pub fn deb_source_version(deb: &Path) -> anyhow::Result<String> {
    let source = output(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Source"))?;
    match source.split_once('(').and_then(|(_, v)| v.split_once(')')) {
        Some((v, _)) => Ok(v.trim().to_owned()),
        None => deb_version(deb),
    }
}

/// The version recorded in a `.deb`.
pub fn deb_version(deb: &Path) -> anyhow::Result<String> {
    Ok(
        output(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Version"))?
            .trim()
            .to_owned(),
    )
}

/// The names of the `lib*` packages a `.deb` depends on (first of each alternative):
/// the shared libraries its binaries need at run time.
pub fn library_depends(deb: &Path) -> anyhow::Result<Vec<String>> {
    let depends = output(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Depends"))?;
    Ok(depends
        .split(',')
        .filter_map(|alt| alt.split('|').next())
        .filter_map(|d| d.split_whitespace().next())
        .map(|name| name.split(':').next().unwrap_or(name).to_owned())
        .filter(|name| name.starts_with("lib"))
        .collect())
}

/// Every shared library `binary` loads, as `ldd` resolves them on this host, including
/// the dynamic loader. Fails if one is missing.
pub fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let ldd = output(Command::new("ldd").arg(binary))?;
    let mut libs = Vec::new();
    for line in ldd.lines().map(str::trim) {
        if line.contains("not found") {
            bail!("{}: {line}", binary.display());
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}
