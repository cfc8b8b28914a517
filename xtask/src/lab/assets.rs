//! Host-side inputs of the lab taken from Debian packages (downloaded and unpacked by
//! [`crate::apt`]): the kernel ABI of the day, QEMU's source version and libraries.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

use crate::{apt, exec::output};

/// The kernel ABI the `meta` package (e.g. `linux-image-cloud-amd64`) depends on today,
/// e.g. `6.1.0-48-cloud-amd64`. Looked up every run: the mirror moves with security updates.
pub fn kernel_abi(apt: &apt::Apt, meta: &str) -> anyhow::Result<String> {
    apt.cache(&["depends", meta], |deps| {
        deps.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
            .find(|abi| abi.starts_with(|c: char| c.is_ascii_digit()))
            .map(str::to_owned)
    })
    .with_context(|| format!("apt names no linux-image-<abi> for {meta}"))
}

/// The modules `names` (`arch/x86/kvm/kvm.ko`, ...) of the unpacked kernel package
/// whose modules directory is `moddir` (`lib/modules/<release>`), as plain `.ko` files
/// that busybox's insmod loads, in order. Where the kernel ships one compressed
/// (`.ko.xz`, 6.12) it is unpacked once into `plain`; one built into the kernel
/// (`modules.builtin`, e.g. 6.12's virtio) needs no loading and is left out.
pub fn plain_modules(moddir: &Path, names: &[&str], plain: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let builtin_list = moddir.join("modules.builtin");
    let builtin = std::fs::read_to_string(&builtin_list)
        .with_context(|| format!("cannot read {}", builtin_list.display()))?;
    let mut out = Vec::new();
    for name in names {
        if builtin
            .lines()
            .any(|l| l.trim() == format!("kernel/{name}"))
        {
            continue;
        }
        out.push(plain_module(&moddir.join("kernel"), name, plain)?);
    }
    Ok(out)
}

/// One module of [`plain_modules`], from the modules tree `kdir`.
fn plain_module(kdir: &Path, name: &str, plain: &Path) -> anyhow::Result<PathBuf> {
    let ko = kdir.join(name);
    if ko.is_file() {
        return Ok(ko);
    }
    let xz = kdir.join(format!("{name}.xz"));
    if !xz.is_file() {
        bail!(
            "the kernel package has neither {} nor {}, and does not build it in",
            ko.display(),
            xz.display()
        );
    }
    let out = plain.join(name);
    if out.is_file() {
        return Ok(out);
    }
    let dir = out.parent().unwrap_or(plain);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // xz unpacks `<name>.xz` beside itself into `<name>`, and removes the copy.
    let copy = dir.join(format!("{}.xz", file_name_of(&out)?));
    std::fs::copy(&xz, &copy)
        .with_context(|| format!("cannot copy {} to {}", xz.display(), copy.display()))?;
    crate::process::run_bounded(
        Command::new("xz")
            .args(["--decompress", "--force"])
            .arg(&copy),
        std::time::Duration::from_secs(120),
    )
    .with_context(|| {
        format!(
            "cannot decompress {} (is xz-utils installed?)",
            xz.display()
        )
    })?;
    ensure!(out.is_file(), "xz did not write {}", out.display());
    Ok(out)
}

fn file_name_of(p: &Path) -> anyhow::Result<String> {
    p.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .with_context(|| format!("bad file name {}", p.display()))
}

/// The version of the source package a `.deb` was built from: the version of its
/// `Architecture: all` siblings, which binary-only rebuilds (`+bN`) do not touch.
pub fn deb_source_version(deb: &Path) -> anyhow::Result<String> {
    let source = apt::deb_field(deb, "Source")?;
    match source.split_once('(').and_then(|(_, v)| v.split_once(')')) {
        Some((v, _)) => Ok(v.trim().to_owned()),
        None => apt::deb_field(deb, "Version"),
    }
}

/// The names of the `lib*` packages a `.deb` depends on (first of each alternative):
/// the shared libraries its binaries need at run time.
pub fn library_depends(deb: &Path) -> anyhow::Result<Vec<String>> {
    Ok(apt::depends_names(&apt::deb_field(deb, "Depends")?)
        .into_iter()
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
