//! Host-side inputs of the lab taken from Debian packages (downloaded and unpacked by
//! [`crate::apt`]): the kernel ABI of the day, QEMU's source version and libraries.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{apt, exec::output};

/// The kernel ABI the `meta` package (e.g. `linux-image-cloud-amd64`) depends on today,
/// e.g. `6.1.0-48-cloud-amd64`. Looked up every run: the mirror moves with security updates.
pub fn kernel_abi(meta: &str) -> anyhow::Result<String> {
    apt::cache(&["depends", meta], |deps| {
        deps.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
            .find(|abi| abi.starts_with(|c: char| c.is_ascii_digit()))
            .map(str::to_owned)
    })
    .with_context(|| format!("apt names no linux-image-<abi> for {meta}"))
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
