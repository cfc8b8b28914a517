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

use super::{Options, RECIPE, Variant, debian, source, work_dir};
use crate::{
    apt,
    exec::{exec, output},
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
    apt::install(&BUILD_DEPS)?;
    let work = work_dir(opts, root);
    let inputs = apt::with_fresh_lists(|| debian::inputs(opts, root, &work))?;

    let patches = source::series(root, opts.kernel, opts.variant)?;
    let out_dir = match opts.variant {
        Variant::Good => work.join("out"),
        v => work.join(format!("out-{v}")),
    };
    let fingerprint = fingerprint(
        &[
            RECIPE,
            &inputs.release,
            &inputs.image_version,
            opts.kernel.as_str(),
            opts.flavour.as_str(),
            opts.variant.as_str(),
        ],
        &patches,
    )?;
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
    fs::write(&info_path, json + "\n")
        .with_context(|| format!("cannot write {}", info_path.display()))?;
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
    let build_start = Instant::now();
    exec(
        Command::new("make")
            .arg("-C")
            .arg(&inputs.headers_dir)
            .arg(format!("M={}", kvm_dir.display()))
            .arg(format!("-j{}", opts.jobs))
            .arg("modules"),
    )?;
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
