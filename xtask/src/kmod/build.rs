//! Building the modules: the source tree, `make` against the unpacked headers, the
//! stripped and vermagic-checked modules, and `kmod.json`, whose fingerprint lets an
//! up-to-date build be skipped.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, ensure};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{
    debian,
    options::{Options, Variant},
    source::{self, RECIPE},
};
use crate::{
    apt,
    exec::{exec, output},
    files::write,
};

/// The modules the KVM build produces.
const MODULES: [&str; 3] = ["kvm.ko", "kvm-intel.ko", "kvm-amd.ko"];
/// Packages the out-of-tree build needs besides the source and the headers.
const BUILD_DEPS: [&str; 11] = [
    "gcc",
    "make",
    "bc",
    "flex",
    "bison",
    "libelf-dev",
    "xz-utils",
    "patch",
    "perl",
    "binutils",
    "kmod",
];

/// What `kmod.json` next to the modules records.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildInfo {
    /// `uname -r` of the kernel the modules load into, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_release: String,
    /// The Debian version shared by the image, the headers and the source.
    pub debian_version: String,
    pub kernel: String,
    pub flavour: String,
    pub variant: String,
    /// Patch files applied, in order, relative to the workspace root.
    pub patches: Vec<String>,
    /// SHA-256 over the recipe, versions and patch contents: equal means up to date.
    pub fingerprint: String,
    /// Wall-clock seconds the `make` step took.
    pub build_seconds: u64,
}

/// Modules ready to load.
#[derive(Debug)]
pub struct Built {
    pub out_dir: PathBuf,
    pub modules: Vec<PathBuf>,
    pub info: BuildInfo,
}

/// Builds (or finds up to date) the modules `opts` asks for.
pub fn build(opts: &Options, root: &Path) -> anyhow::Result<Built> {
    ensure!(opts.jobs > 0, "--jobs must be at least 1");
    let patches = source::series(root, opts.kernel, opts.variant)?;
    apt::install(root, &BUILD_DEPS)?;
    if let Some(cc) = opts.kernel.compiler_override() {
        apt::install(root, &[cc])?;
    }
    let work = opts.work_dir(root);
    // One build per line and flavour at a time: they share `src`, its staging copy and
    // the unpacked headers (two labs may want the same modules at once).
    let _work = crate::lock::exclusive(&crate::lock::beside(&work), "a kvm module build")?;
    let debian = opts.kernel.apt(root)?;
    let inputs = debian.with_fresh_lists(|| debian::inputs(opts, &debian, root, &work))?;

    let out_dir = match opts.variant {
        Variant::Good => work.join("out"),
        v => work.join(format!("out-{v}")),
    };
    let mut fields = vec![
        RECIPE,
        &inputs.release,
        &inputs.image_version,
        opts.kernel.as_str(),
        opts.flavour.as_str(),
        opts.variant.as_str(),
    ];
    // Only where it applies, so the other lines' earlier builds stay up to date.
    fields.extend(opts.kernel.compiler_override());
    let fingerprint = fingerprint(&fields, &patches)?;
    let modules: Vec<PathBuf> = MODULES.iter().map(|m| out_dir.join(m)).collect();
    let info_path = out_dir.join("kmod.json");

    let fresh = read_info(&info_path).filter(|info| {
        !opts.force && info.fingerprint == fingerprint && modules.iter().all(|m| m.is_file())
    });
    if let Some(info) = fresh {
        eprintln!("kmod: up to date ({})", info_path.display());
        return Ok(Built {
            out_dir,
            modules,
            info,
        });
    }

    let (kvm_dir, build_seconds) = make(opts, &work, &inputs, &patches)?;
    install_modules(&kvm_dir, &out_dir, &modules, &inputs.release)?;

    let info = BuildInfo {
        kernel_release: inputs.release,
        debian_version: inputs.image_version,
        kernel: opts.kernel.to_string(),
        flavour: opts.flavour.to_string(),
        variant: opts.variant.to_string(),
        patches: patches
            .iter()
            .map(|p| p.strip_prefix(root).unwrap_or(p).display().to_string())
            .collect(),
        fingerprint,
        build_seconds,
    };
    let json = serde_json::to_string_pretty(&info).context("cannot encode kmod.json")?;
    write(&info_path, json + "\n")?;
    Ok(Built {
        out_dir,
        modules,
        info,
    })
}

/// Extracts the source, prepares `build-<variant>` with `patches` and runs `make`
/// there against the unpacked headers; the kvm directory that holds the modules,
/// and how many seconds `make` took.
fn make(
    opts: &Options,
    work: &Path,
    inputs: &debian::Inputs,
    patches: &[PathBuf],
) -> anyhow::Result<(PathBuf, u64)> {
    let src = work.join("src");
    let extract_start = Instant::now();
    source::extract(
        opts.kernel,
        &inputs.tarball,
        &inputs.source_version,
        patches,
        &src,
    )?;
    eprintln!(
        "kmod: source ready in {:.1}s",
        extract_start.elapsed().as_secs_f64()
    );

    let tree = work.join(format!("build-{}", opts.variant));
    source::prepare_tree(&src, &tree, patches)?;

    let kvm_dir = tree.join("arch/x86/kvm");
    let mut make = Command::new("make");
    make.arg("-C")
        .arg(&inputs.headers_dir)
        .arg(format!("M={}", kvm_dir.display()))
        .arg(format!("-j{}", opts.jobs));
    if let Some(cc) = opts.kernel.compiler_override() {
        eprintln!(
            "kmod: building with {cc}: {} names {}, which this host's Debian lacks",
            inputs.headers_dir.display(),
            expected_compiler(&inputs.headers_dir)
                .as_deref()
                .unwrap_or("another compiler")
        );
        make.arg(format!("CC={cc}"));
    }
    let build_start = Instant::now();
    exec(make.arg("modules"))?;
    let build_seconds = build_start.elapsed().as_secs();
    eprintln!("kmod: make took {build_seconds}s");
    Ok((kvm_dir, build_seconds))
}

/// Replaces `out_dir` with the modules built in `kvm_dir`, copied to `modules`,
/// stripped, and checked to be built for `release` (vermagic).
fn install_modules(
    kvm_dir: &Path,
    out_dir: &Path,
    modules: &[PathBuf],
    release: &str,
) -> anyhow::Result<()> {
    if out_dir.exists() {
        fs::remove_dir_all(out_dir)
            .with_context(|| format!("cannot remove {}", out_dir.display()))?;
    }
    fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    for (name, dest) in MODULES.iter().zip(modules) {
        let built = kvm_dir.join(name);
        fs::copy(&built, dest)
            .with_context(|| format!("cannot copy {} to {}", built.display(), dest.display()))?;
        exec(Command::new("strip").arg("--strip-debug").arg(dest))?;
        let vermagic = output(Command::new("modinfo").args(["-F", "vermagic"]).arg(dest))?;
        ensure!(
            vermagic.split_whitespace().next() == Some(release),
            "{} has vermagic '{}', not {release}",
            dest.display(),
            vermagic.trim()
        );
    }
    Ok(())
}

/// The compiler a Debian headers directory builds with, from its `.kernelvariables`
/// (`CC = $(if ...) $(CROSS_COMPILE)gcc-10`), if it names one.
fn expected_compiler(headers_dir: &Path) -> Option<String> {
    parse_compiler(&fs::read_to_string(headers_dir.join(".kernelvariables")).ok()?)
}

fn parse_compiler(kernelvariables: &str) -> Option<String> {
    kernelvariables
        .lines()
        .filter_map(|l| l.trim().strip_prefix("CC"))
        .filter_map(|l| l.trim_start().strip_prefix('='))
        .filter_map(|value| value.split_whitespace().last())
        .map(|word| word.rsplit(')').next().unwrap_or(word))
        .find(|cc| !cc.is_empty())
        .map(str::to_owned)
}

/// SHA-256 over `fields` and the name and contents of each patch.
fn fingerprint(fields: &[&str], patches: &[PathBuf]) -> anyhow::Result<String> {
    let mut hash = Sha256::new();
    for field in fields {
        hash.update(field.as_bytes());
        hash.update([0]);
    }
    for patch in patches {
        let name = patch.file_name().map(|n| n.to_string_lossy().into_owned());
        hash.update(name.unwrap_or_default().as_bytes());
        hash.update([0]);
        hash.update(fs::read(patch).with_context(|| format!("cannot read {}", patch.display()))?);
        hash.update([0]);
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn read_info(path: &Path) -> Option<BuildInfo> {
    serde_json::from_str(&fs::read_to_string(path).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiler_from_kernelvariables() {
        let bullseye = "override ARCH = x86\n\
                        override KERNELRELEASE = 5.10.0-46-cloud-amd64\n\
                        CCACHE = ccache\n\
                        CC = $(if $(DEBIAN_KERNEL_USE_CCACHE),$(CCACHE)) $(CROSS_COMPILE)gcc-10\n\
                        ifneq ($(DEB_BUILD_ARCH),$(DEB_HOST_ARCH))\n";
        assert_eq!(parse_compiler(bullseye).as_deref(), Some("gcc-10"));
        assert_eq!(parse_compiler("CC=gcc-12\n").as_deref(), Some("gcc-12"));
        assert_eq!(parse_compiler("CCACHE = ccache\n"), None);
        assert_eq!(parse_compiler("CC =\n"), None);
    }

    #[test]
    fn fingerprint_changes_with_each_field() {
        let a = fingerprint(&["kmod-recipe-1", "5.10", "gcc-12"], &[]).ok();
        let b = fingerprint(&["kmod-recipe-1", "5.10", ""], &[]).ok();
        assert!(a.is_some());
        assert_ne!(a, b);
    }
}
