//! `cargo xtask kmod`: builds `kvm.ko`, `kvm-intel.ko` and `kvm-amd.ko` with the
//! exit-counter CPUID leaves (kernel/README.md) out of tree, against the Debian
//! headers of the kernel the lab boots.
//!
//! 1. Look up the kernel release (ABI) behind the flavour's image metapackage, every
//!    time: the mirror moves with security updates.
//! 2. Download the source and the headers (the flavour's, the common ones and kbuild)
//!    and unpack them under `target/kmod/`: never installed, since the headers'
//!    dependencies would put a kernel image on the host. Install only the missing
//!    build tools. Refuse unless image, headers and source are the same Debian
//!    version (otherwise vermagic or struct layouts may not match).
//! 3. Extract only `arch/x86/kvm`, `virt/kvm`, the headers the series patches and
//!    checkpatch into `target/kmod/<kernel>-<flavour>/src` (kept while the source
//!    version and the file list do not change).
//! 4. Copy that to `build-<variant>`, apply the series (and the variant's patches)
//!    with `patch --fuzz=0`, point the kvm Makefile at the copy and put the patched
//!    headers ahead of the installed ones (`NOSTDINC_FLAGS`), then
//!    `make -C <unpacked headers>/usr/src/linux-headers-<release> M=... modules`.
//! 5. Copy the modules to `out` (`out-<variant>` for the test-only variants), strip
//!    them, check their vermagic and write `kmod.json`, whose fingerprint of every input
//!    lets the next run skip all of this.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail, ensure};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{
    apt,
    exec::{exec, output, show},
};

/// Bump when the build recipe changes, so earlier outputs are rebuilt.
const RECIPE: &str = "kmod-recipe-1";
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
/// Source directories the modules are built from; everything else comes from the headers.
const SOURCE_DIRS: [&str; 2] = ["arch/x86/kvm", "virt/kvm"];
/// checkpatch.pl and the data files it reads from its own directory.
const CHECKPATCH_FILES: [&str; 3] = [
    "scripts/checkpatch.pl",
    "scripts/spelling.txt",
    "scripts/const_structs.checkpatch",
];

#[derive(Args, Debug)]
pub struct Options {
    /// Debian kernel line to build for.
    #[arg(long, value_enum, default_value_t = KernelLine::V6_1)]
    pub kernel: KernelLine,
    /// Kernel flavour whose headers the modules are built against.
    #[arg(long, value_enum, default_value_t = Flavour::Cloud)]
    pub flavour: Flavour,
    /// The series, or one of its TEST-ONLY variants in kernel/variants/, applied on
    /// top of it (all deliberately wrong but answers-in-emulate).
    #[arg(long, value_enum, default_value_t = Variant::Good)]
    pub variant: Variant,
    /// Only run `checkpatch.pl --strict` on the series and its variants; fail on any
    /// error, warning or check.
    #[arg(long)]
    pub check: bool,
    /// Rebuild even when no input changed.
    #[arg(long)]
    pub force: bool,
    /// Parallel make jobs.
    #[arg(long, default_value_t = 2)]
    pub jobs: u32,
}

impl Default for Options {
    /// The lab's modules: 6.1, cloud, the good series.
    fn default() -> Self {
        Self {
            kernel: KernelLine::V6_1,
            flavour: Flavour::Cloud,
            variant: Variant::Good,
            check: false,
            force: false,
            jobs: 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KernelLine {
    /// Debian 12's own kernel, the lab's.
    #[value(name = "6.1")]
    V6_1,
    /// Debian 12's newer kernel line (bookworm-security).
    #[value(name = "6.12")]
    V6_12,
}

impl KernelLine {
    fn as_str(self) -> &'static str {
        match self {
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
        }
    }

    /// The metapackage that depends on the current image of this line and flavour.
    fn image_metapackage(self, flavour: Flavour) -> String {
        match self {
            Self::V6_1 => format!("linux-image-{}", flavour.arch_suffix()),
            Self::V6_12 => format!("linux-image-6.12-{}", flavour.arch_suffix()),
        }
    }

    fn source_package(self) -> String {
        format!("linux-source-{}", self.as_str())
    }
}

impl fmt::Display for KernelLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Flavour {
    /// The cloud kernel (the lab boots it: LZ4, fast).
    Cloud,
    /// The generic amd64 kernel.
    Generic,
}

impl Flavour {
    fn as_str(self) -> &'static str {
        match self {
            Self::Cloud => "cloud",
            Self::Generic => "generic",
        }
    }

    /// How Debian's package and release names end for this flavour.
    fn arch_suffix(self) -> &'static str {
        match self {
            Self::Cloud => "cloud-amd64",
            Self::Generic => "amd64",
        }
    }
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Variant {
    /// The series in kernel/<kernel>/.
    Good,
    /// TEST ONLY: counts at the exit-handler dispatch, so fastpath exits are missed.
    SlowpathOnly,
    /// TEST ONLY: counters in a kvm.ko global, shared by all VMs and kept across
    /// kvm_intel/kvm_amd reloads.
    SurvivesReload,
    /// TEST ONLY, but correct: the same counts, with the leaves answered in
    /// kvm_emulate_cpuid() (and the emulator) instead of kvm_cpuid(), so
    /// kvm:kvm_cpuid never fires for them.
    AnswersInEmulate,
    /// TEST ONLY: counts at the top of the vendor exit handler: misses fastpath
    /// exits that re-enter the guest, counts VMX's made-up invalid-state exits.
    HandlerTop,
    /// TEST ONLY: u32 per-vCPU counts: the count leaf's high half is always 0.
    #[value(name = "counters-32bit")]
    Counters32Bit,
    /// TEST ONLY: one plain u64 array per VM, incremented by every vCPU
    /// without atomics (lost updates with several vCPUs).
    RacyShared,
    /// TEST ONLY: a hand-written undefined-reason list that calls some defined
    /// reasons undefined (VMX 65, 69-75; SVM 0xa0-0xa6, 0x401, 0x402).
    WrongUndefined,
    /// TEST ONLY: the total leaf falls through to kvm_cpuid()'s lookup and
    /// answers like stock KVM; the count leaf works.
    TotalFallsThrough,
    /// TEST ONLY: the count leaf writes EAX only: EBX and EDX keep the guest's
    /// values, ECX echoes the reason.
    RegsUnset,
    /// TEST ONLY: no 0x4FFFFFFD cycles leaf: it answers like stock KVM.
    NoCyclesLeaf,
}

impl Variant {
    fn as_str(self) -> &'static str {
        match self {
            Self::Good => "good",
            Self::SlowpathOnly => "slowpath-only",
            Self::SurvivesReload => "survives-reload",
            Self::AnswersInEmulate => "answers-in-emulate",
            Self::HandlerTop => "handler-top",
            Self::Counters32Bit => "counters-32bit",
            Self::RacyShared => "racy-shared",
            Self::WrongUndefined => "wrong-undefined",
            Self::TotalFallsThrough => "total-falls-through",
            Self::RegsUnset => "regs-unset",
            Self::NoCyclesLeaf => "no-cycles-leaf",
        }
    }

    /// Every variant in kernel/variants/, all of them applied on top of the series.
    pub const TEST_ONLY: [Variant; 10] = [
        Self::SlowpathOnly,
        Self::SurvivesReload,
        Self::AnswersInEmulate,
        Self::HandlerTop,
        Self::Counters32Bit,
        Self::RacyShared,
        Self::WrongUndefined,
        Self::TotalFallsThrough,
        Self::RegsUnset,
        Self::NoCyclesLeaf,
    ];
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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

pub fn run(opts: &Options, root: &Path) -> anyhow::Result<()> {
    if opts.check {
        return check(opts, root);
    }
    let built = build(opts, root)?;
    eprintln!(
        "kmod: {} {} {} for {} (Debian {}) in {}:",
        built.info.kernel,
        built.info.flavour,
        built.info.variant,
        built.info.kernel_release,
        built.info.debian_version,
        built.out_dir.display()
    );
    for module in &built.modules {
        println!("{}", module.display());
    }
    Ok(())
}

/// Builds (or finds up to date) the modules `opts` asks for.
pub fn build(opts: &Options, root: &Path) -> anyhow::Result<Built> {
    ensure!(opts.jobs > 0, "--jobs must be at least 1");
    apt::install(&BUILD_DEPS)?;
    let work = root
        .join("target/kmod")
        .join(format!("{}-{}", opts.kernel, opts.flavour));
    let Inputs {
        release,
        image_version,
        source_version,
        tarball,
        headers_dir,
    } = apt::with_fresh_lists(|| inputs(opts, root, &work))?;

    let patches = series(root, opts.kernel, opts.variant)?;
    let out_dir = match opts.variant {
        Variant::Good => work.join("out"),
        v => work.join(format!("out-{v}")),
    };
    let fingerprint = fingerprint(
        &[
            RECIPE,
            &release,
            &image_version,
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

    let src = work.join("src");
    let extract_start = Instant::now();
    extract(opts.kernel, &tarball, &source_version, &patches, &src)?;
    eprintln!(
        "kmod: source ready in {:.1}s",
        extract_start.elapsed().as_secs_f64()
    );

    let tree = work.join(format!("build-{}", opts.variant));
    prepare_tree(&src, &tree, &patches)?;

    let kvm_dir = tree.join("arch/x86/kvm");
    let build_start = Instant::now();
    exec(
        Command::new("make")
            .arg("-C")
            .arg(&headers_dir)
            .arg(format!("M={}", kvm_dir.display()))
            .arg(format!("-j{}", opts.jobs))
            .arg("modules"),
    )?;
    let build_seconds = build_start.elapsed().as_secs();
    eprintln!("kmod: make took {build_seconds}s");

    if out_dir.exists() {
        fs::remove_dir_all(&out_dir)
            .with_context(|| format!("cannot remove {}", out_dir.display()))?;
    }
    fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    for (name, dest) in MODULES.iter().zip(&modules) {
        let built = kvm_dir.join(name);
        fs::copy(&built, dest)
            .with_context(|| format!("cannot copy {} to {}", built.display(), dest.display()))?;
        exec(Command::new("strip").arg("--strip-debug").arg(dest))?;
        let vermagic = output(Command::new("modinfo").args(["-F", "vermagic"]).arg(dest))?;
        ensure!(
            vermagic.split_whitespace().next() == Some(release.as_str()),
            "{} has vermagic '{}', not {release}",
            dest.display(),
            vermagic.trim()
        );
    }

    let info = BuildInfo {
        kernel_release: release,
        debian_version: image_version,
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

/// The Debian inputs of one build, all of the same version.
struct Inputs {
    /// `uname -r` of the image, e.g. `6.1.0-56-cloud-amd64`.
    release: String,
    image_version: String,
    source_version: String,
    /// The source tarball, unpacked from `linux-source-<line>`.
    tarball: PathBuf,
    /// The unpacked `linux-headers-<release>` directory.
    headers_dir: PathBuf,
}

/// Looks up today's release, downloads its source and headers, and refuses unless
/// the image, the headers and the source are one Debian version.
fn inputs(opts: &Options, root: &Path, work: &Path) -> anyhow::Result<Inputs> {
    let release = kernel_release(opts.kernel, opts.flavour)?;
    let image_pkg = format!("linux-image-{release}");
    let image_version = apt::candidate(&image_pkg)?;
    let (source_version, tarball) = source_tarball(opts.kernel, root)?;
    let (headers_version, headers_dir) = headers_tree(&release, root, work)?;
    same_versions(&[
        (&image_pkg, &image_version),
        (&format!("linux-headers-{release}"), &headers_version),
        (&opts.kernel.source_package(), &source_version),
    ])?;
    Ok(Inputs {
        release,
        image_version,
        source_version,
        tarball,
        headers_dir,
    })
}

/// Packages that hold or pull in a kernel, or its headers: never installed by kmod.
fn is_kernel_package(name: &str) -> bool {
    [
        "linux-image-",
        "linux-headers-",
        "linux-kbuild-",
        "linux-modules-",
    ]
    .iter()
    .any(|p| name.starts_with(p))
        || matches!(name, "linux-base" | "initramfs-tools" | "udev")
}

/// Runs `checkpatch.pl --strict` on the series of `opts.kernel` and on every
/// test-only variant of it.
fn check(opts: &Options, root: &Path) -> anyhow::Result<()> {
    apt::install(&["perl", "xz-utils"])?;
    let source_pkg = opts.kernel.source_package();
    let (source_version, tarball) = apt::with_fresh_lists(|| source_tarball(opts.kernel, root))?;

    let mut patches = series(root, opts.kernel, Variant::Good)?;
    for variant in Variant::TEST_ONLY {
        let dir = variant_dir(root, opts.kernel, variant);
        patches.extend(patch_files(&dir)?);
    }
    let work = root
        .join("target/kmod")
        .join(format!("{}-{}", opts.kernel, opts.flavour));
    let src = work.join("src");
    extract(opts.kernel, &tarball, &source_version, &patches, &src)?;

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

/// The kernel release behind the image metapackage, e.g. `6.1.0-56-cloud-amd64`.
fn kernel_release(kernel: KernelLine, flavour: Flavour) -> anyhow::Result<String> {
    let meta = kernel.image_metapackage(flavour);
    apt::cache(&["depends", &meta], |deps| parse_release(deps, flavour))
        .with_context(|| format!("apt names no linux-image package for {meta}"))
}

/// Downloads the kernel source package and unpacks it under `target/kmod/debs`; its
/// version and the path of the tarball it holds.
fn source_tarball(kernel: KernelLine, root: &Path) -> anyhow::Result<(String, PathBuf)> {
    let debs = root.join("target/kmod/debs");
    let deb = apt::download(&debs, &kernel.source_package())?;
    let version = apt::deb_field(&deb, "Version")?;
    let unpacked = apt::unpack(&deb, &debs.join("roots"))?;
    let tarball = unpacked.join(format!("usr/src/{}.tar.xz", kernel.source_package()));
    ensure!(
        tarball.is_file(),
        "{} holds no {}",
        deb.display(),
        tarball.display()
    );
    Ok((version, tarball))
}

/// The headers of `release`, downloaded and unpacked under `work`, never installed:
/// installing `linux-headers-*` would pull a kernel image, initramfs-tools and udev
/// onto the host through its dependencies (6.12 depends on its image). The
/// flavour's headers, the common headers and kbuild are unpacked into one root, and
/// the flavour's one-line Makefile is pointed at the unpacked common tree. Returns
/// the headers' version and their directory (`make -C` it).
fn headers_tree(release: &str, root: &Path, work: &Path) -> anyhow::Result<(String, PathBuf)> {
    let debs = root.join("target/kmod/debs");
    let headers_pkg = format!("linux-headers-{release}");
    let flavour_deb = apt::download(&debs, &headers_pkg)?;
    let version = apt::deb_field(&flavour_deb, "Version")?;
    let mut all = vec![flavour_deb.clone()];
    for dep in apt::depends_names(&apt::deb_field(&flavour_deb, "Depends")?) {
        if dep.starts_with("linux-headers-") || dep.starts_with("linux-kbuild-") {
            all.push(apt::download(&debs, &format!("{dep}={version}"))?);
        }
    }
    ensure!(
        all.len() == 3,
        "{headers_pkg} {version} does not depend on one common headers and one kbuild package"
    );
    // What those packages need to run (compiler, pahole, libraries), but no kernel.
    let mut tools = Vec::new();
    for deb in &all {
        tools.extend(
            apt::depends_names(&apt::deb_field(deb, "Depends")?)
                .into_iter()
                .filter(|d| !is_kernel_package(d)),
        );
    }
    apt::install(&tools.iter().map(String::as_str).collect::<Vec<_>>())?;
    let tree = apt::unpack_into(&all, &work.join(format!("headers-{version}")))?;
    let dir = tree.join(format!("usr/src/{headers_pkg}"));
    let makefile = dir.join("Makefile");
    let text = fs::read_to_string(&makefile)
        .with_context(|| format!("cannot read {}", makefile.display()))?;
    // "include /usr/src/linux-headers-<version>-common/Makefile"
    let rewritten = text.replace(
        "include /usr/src/",
        &format!("include {}/usr/src/", tree.display()),
    );
    if rewritten != text {
        fs::write(&makefile, rewritten)
            .with_context(|| format!("cannot write {}", makefile.display()))?;
    }
    ensure!(
        fs::read_to_string(&makefile).is_ok_and(|t| t.contains(&*tree.to_string_lossy())),
        "{} does not include the unpacked common headers",
        makefile.display()
    );
    Ok((version, dir))
}

/// The release from `apt-cache depends linux-image-...` output.
fn parse_release(deps: &str, flavour: Flavour) -> Option<String> {
    let suffix = format!("-{}", flavour.arch_suffix());
    deps.lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends: "))
        .filter_map(|p| p.strip_prefix("linux-image-"))
        .find(|r| {
            r.ends_with(&suffix)
                && r.starts_with(|c: char| c.is_ascii_digit())
                && (flavour == Flavour::Cloud || (!r.contains("-cloud-") && !r.contains("-rt-")))
        })
        .map(str::to_owned)
}

/// Fails with one line unless every `(package, version)` has the same version.
fn same_versions(pkgs: &[(&str, &str)]) -> anyhow::Result<()> {
    if pkgs.windows(2).all(|w| w[0].1 == w[1].1) {
        return Ok(());
    }
    let list: Vec<String> = pkgs.iter().map(|(p, v)| format!("{p} {v}")).collect();
    bail!(
        "version mismatch, refusing to build: {} (modules built so would not match the \
         image: retry once the mirror carries one version of all three)",
        list.join(", ")
    )
}

/// The patch files to apply for `variant`: the series, then the variant's own.
fn series(root: &Path, kernel: KernelLine, variant: Variant) -> anyhow::Result<Vec<PathBuf>> {
    let mut patches = patch_files(&root.join("kernel").join(kernel.as_str()))?;
    if variant != Variant::Good {
        patches.extend(patch_files(&variant_dir(root, kernel, variant))?);
    }
    Ok(patches)
}

fn variant_dir(root: &Path, kernel: KernelLine, variant: Variant) -> PathBuf {
    root.join("kernel/variants")
        .join(kernel.as_str())
        .join(variant.as_str())
}

/// `*.patch` in `dir`, sorted by name (the `git format-patch` numbering).
fn patch_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "patch") {
            files.push(path);
        }
    }
    files.sort();
    ensure!(
        !files.is_empty(),
        "{} holds no *.patch files",
        dir.display()
    );
    Ok(files)
}

/// Files a patch modifies, from its `+++ b/...` lines.
fn touched_files(patch: &str) -> Vec<String> {
    patch
        .lines()
        .filter_map(|l| l.strip_prefix("+++ b/"))
        .map(|p| p.trim_end().to_owned())
        .collect()
}

/// The headers outside [`SOURCE_DIRS`] that the patches modify: they are extracted
/// too and take precedence over the installed headers. Anything else outside those
/// directories would not be rebuilt, so it is an error.
fn patched_headers(patches: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut headers = Vec::new();
    for patch in patches {
        let text = fs::read_to_string(patch)
            .with_context(|| format!("cannot read {}", patch.display()))?;
        for file in touched_files(&text) {
            if SOURCE_DIRS
                .iter()
                .any(|d| file.starts_with(&format!("{d}/")))
            {
                continue;
            }
            ensure!(
                file.ends_with(".h") && include_root(&file).is_some(),
                "{} changes {file}, which the out-of-tree build cannot rebuild \
                 (only {} and headers under include/ or arch/x86/include/)",
                patch.display(),
                SOURCE_DIRS.join(", ")
            );
            if !headers.contains(&file) {
                headers.push(file);
            }
        }
    }
    headers.sort();
    Ok(headers)
}

/// The include directory a header path is found under (`<asm/x.h>`, `<linux/x.h>`).
fn include_root(header: &str) -> Option<&'static str> {
    ["arch/x86/include", "include"]
        .into_iter()
        .find(|root| header.starts_with(&format!("{root}/")))
}

/// Extracts what the build and checkpatch need from the source tarball into `src`,
/// unless `src` already holds exactly that from the same source version.
fn extract(
    kernel: KernelLine,
    tarball: &Path,
    source_version: &str,
    patches: &[PathBuf],
    src: &Path,
) -> anyhow::Result<()> {
    let mut members: Vec<String> = SOURCE_DIRS.iter().map(|d| (*d).to_owned()).collect();
    members.extend(CHECKPATCH_FILES.iter().map(|f| (*f).to_owned()));
    members.extend(patched_headers(patches)?);
    let stamp_path = src.join(".kmod-extracted");
    let stamp = format!("{RECIPE}\n{source_version}\n{}\n", members.join("\n"));
    if fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(());
    }

    let staging = src.with_extension("tmp");
    for dir in [src, staging.as_path()] {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
    }
    fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let prefix = kernel.source_package();
    exec(
        Command::new("tar")
            .arg("-C")
            .arg(&staging)
            .args(["--strip-components=1", "-xJf"])
            .arg(tarball)
            .args(members.iter().map(|m| format!("{prefix}/{m}"))),
    )?;
    fs::write(staging.join(".kmod-extracted"), stamp)
        .with_context(|| format!("cannot write the stamp in {}", staging.display()))?;
    fs::rename(&staging, src)
        .with_context(|| format!("cannot rename {} to {}", staging.display(), src.display()))
}

/// Copies `src` to `tree`, applies `patches` and adapts the kvm Makefile to an
/// external-module build.
fn prepare_tree(src: &Path, tree: &Path, patches: &[PathBuf]) -> anyhow::Result<()> {
    let tree_str = tree.to_str().context("the build path is not UTF-8")?;
    ensure!(
        !tree_str.contains(char::is_whitespace),
        "make cannot build in {tree_str}: the path contains whitespace"
    );
    if tree.exists() {
        fs::remove_dir_all(tree).with_context(|| format!("cannot remove {}", tree.display()))?;
    }
    exec(Command::new("cp").arg("-a").arg(src).arg(tree))?;
    for patch in patches {
        exec(
            Command::new("patch")
                .arg("-d")
                .arg(tree)
                .args(["-p1", "--forward", "--batch", "--fuzz=0", "--quiet", "-i"])
                .arg(patch),
        )?;
    }

    // The headers the series changes shadow the installed ones; NOSTDINC_FLAGS comes
    // before LINUXINCLUDE on the compiler command line (backports use the same hook).
    let mut overlays: Vec<&str> = patched_headers(patches)?
        .iter()
        .filter_map(|h| include_root(h))
        .collect();
    overlays.dedup();
    let makefile = tree.join("arch/x86/kvm/Makefile");
    let text = fs::read_to_string(&makefile)
        .with_context(|| format!("cannot read {}", makefile.display()))?;
    let mut rules = format!(
        // trace.h includes itself as "../../arch/x86/kvm/trace.h": -I arch/x86 resolves it.
        "ccflags-y += -I {tree_str}/arch/x86/kvm -I {tree_str}/arch/x86\n"
    );
    for dir in overlays {
        rules.push_str(&format!("NOSTDINC_FLAGS += -I {tree_str}/{dir}\n"));
    }
    let text = replace_line(
        &text,
        "ccflags-y += -I $(srctree)/arch/x86/kvm",
        rules.trim_end(),
    )
    .and_then(|t| {
        replace_line(
            &t,
            "include $(srctree)/virt/kvm/Makefile.kvm",
            &format!("include {tree_str}/virt/kvm/Makefile.kvm"),
        )
    })
    .with_context(|| format!("{} is not laid out as expected", makefile.display()))?;
    fs::write(&makefile, text).with_context(|| format!("cannot write {}", makefile.display()))
}

/// `text` with its one line equal to `old` replaced by `new`.
fn replace_line(text: &str, old: &str, new: &str) -> anyhow::Result<String> {
    let hits = text.lines().filter(|l| l.trim_end() == old).count();
    ensure!(hits == 1, "expected one line '{old}', found {hits}");
    Ok(text
        .lines()
        .map(|l| if l.trim_end() == old { new } else { l })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n")
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
    fn release_from_apt_cache_depends() {
        let cloud = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_release(cloud, Flavour::Cloud).as_deref(),
            Some("6.1.0-56-cloud-amd64")
        );
        let generic = "linux-image-6.12-amd64\n |Depends: linux-image-6.12.117+deb12-amd64\n  \
                       Depends: linux-image-6.12.117+deb12-amd64-unsigned\n";
        assert_eq!(
            parse_release(generic, Flavour::Generic).as_deref(),
            Some("6.12.117+deb12-amd64")
        );
        assert_eq!(parse_release(cloud, Flavour::Generic), None);
        assert_eq!(parse_release("linux-image-amd64\n", Flavour::Generic), None);
    }

    #[test]
    fn versions_must_match() {
        let same = [
            ("linux-image-x", "6.1.192-2"),
            ("linux-source-6.1", "6.1.192-2"),
        ];
        assert!(same_versions(&same).is_ok());
        let differ = [
            ("linux-image-x", "6.1.192-2"),
            ("linux-headers-x", "6.1.190-1"),
        ];
        let err = same_versions(&differ).map_err(|e| e.to_string());
        assert_eq!(
            err.err().as_deref().map(|e| e.starts_with(
                "version mismatch, refusing to build: linux-image-x 6.1.192-2, \
                 linux-headers-x 6.1.190-1 ("
            )),
            Some(true)
        );
    }

    #[test]
    fn checkpatch_total_line() {
        let line = "total: 0 errors, 2 warnings, 1 checks, 108 lines checked";
        assert_eq!(checkpatch_totals(line), Some((0, 2, 1)));
        assert_eq!(checkpatch_totals("total: 0 errors"), None);
        assert_eq!(checkpatch_totals("nothing here"), None);
    }

    #[test]
    fn headers_outside_the_kvm_dirs() {
        let patch = "--- a/arch/x86/kvm/x86.c\n+++ b/arch/x86/kvm/x86.c\n\
                     --- a/arch/x86/include/asm/kvm_host.h\n+++ b/arch/x86/include/asm/kvm_host.h\n";
        assert_eq!(
            touched_files(patch),
            ["arch/x86/kvm/x86.c", "arch/x86/include/asm/kvm_host.h"]
        );
        assert_eq!(
            include_root("arch/x86/include/asm/kvm_host.h"),
            Some("arch/x86/include")
        );
        assert_eq!(include_root("include/linux/kvm_host.h"), Some("include"));
        assert_eq!(include_root("kernel/entry/kvm.c"), None);
    }

    #[test]
    fn makefile_rewrite() {
        let text =
            "ccflags-y += -I $(srctree)/arch/x86/kvm\ninclude $(srctree)/virt/kvm/Makefile.kvm\n";
        let out = replace_line(text, "ccflags-y += -I $(srctree)/arch/x86/kvm", "A\nB");
        assert_eq!(
            out.ok().as_deref(),
            Some("A\nB\ninclude $(srctree)/virt/kvm/Makefile.kvm\n")
        );
        assert!(replace_line(text, "missing", "x").is_err());
    }

    #[test]
    fn every_variant_has_patches_for_every_line() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for kernel in [KernelLine::V6_1, KernelLine::V6_12] {
            for variant in std::iter::once(Variant::Good).chain(Variant::TEST_ONLY) {
                let patches = series(&root, kernel, variant);
                assert!(patches.is_ok(), "{kernel} {variant}: {patches:?}");
                let headers = patches.and_then(|p| patched_headers(&p));
                assert!(headers.is_ok(), "{kernel} {variant}: {headers:?}");
            }
        }
    }
}
