//! What the lab is built from: Debian's kernel, modules, busybox and QEMU 7.2
//! (downloaded and unpacked, see [`super::assets`]), the kvm modules to load, and the
//! binaries built on the host (kvmtrace, the micro VMM).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

use super::{assets, options::Isa, step::Step};
use crate::{
    apt,
    kmod::{Flavour, KernelLine},
    process::run_bounded,
};

/// The kernels are Debian's cloud flavour: it boots fastest under emulation.
const FLAVOUR: Flavour = Flavour::Cloud;
/// L2's kernel line, the same whatever L1 runs (`--kernel`), so only the host changes.
const L2_KERNEL: KernelLine = KernelLine::V6_1;
/// bookworm's QEMU: 10.x breaks shadow paging under nested SVM (shared/LAB-NOTES.md).
const QEMU_RELEASE: &str = "bookworm";
const QEMU_VERSION_PREFIX: &str = "1:7.2";
/// Firmware QEMU may look for when it boots a microvm or a PC with -kernel.
const QEMU_FIRMWARE: &[&str] = &[
    "bios-microvm.bin",
    "qboot.rom",
    "linuxboot_dma.bin",
    "linuxboot.bin",
    "pvh.bin",
    "kvmvapic.bin",
    "bios-256k.bin",
];

/// The target kvmtrace is built for, statically linked, for L1 and L2.
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The unpacked Debian packages the lab is built from.
pub struct Inputs {
    /// L1's kernel release (`uname -r`).
    pub abi: String,
    /// `qemu-system-x86_64-microvm --version`'s first line.
    pub qemu_version: String,
    /// L1's kernel image.
    pub kernel: PathBuf,
    /// L2's kernel release and image (6.1 whatever L1 runs).
    pub l2_abi: String,
    pub l2_kernel: PathBuf,
    /// L1's `lib/modules/<release>`, and where its compressed modules are unpacked
    /// (see [`assets::plain_modules`]): for modules only some scenarios load.
    pub module_dir: PathBuf,
    pub plain_modules: PathBuf,
    pub modules: Vec<PathBuf>,
    pub busybox: PathBuf,
    /// The unpacked qemu-system-x86 7.2 tree, and its firmware files.
    pub qemu_root: PathBuf,
    pub firmware: Vec<PathBuf>,
    pub qemu_data_dirs: Vec<PathBuf>,
    /// QEMU's loadable modules (TCG lives there), for the AMD lab's L1 emulator.
    pub qemu_module_dir: Option<PathBuf>,
    /// The lab's download cache (`target/lab/cache`).
    pub cache: PathBuf,
}

/// Where L1's kvm modules come from.
pub enum KvmModules<'a> {
    /// Debian's, from the kernel's package.
    Debian,
    /// The ones in a directory (`--kvm-modules`).
    Dir(&'a Path),
    /// Built by `cargo xtask kmod` (the series or one of its variants).
    Build(crate::kmod::Variant),
}

/// Installs the host packages `isa`'s lab needs, downloads its inputs (L1 runs `kernel`)
/// into `cache`, and puts the kvm modules `kvm` names in place of Debian's.
pub fn prepare(
    isa: Isa,
    kernel: KernelLine,
    kvm: &KvmModules<'_>,
    root: &Path,
    cache: &Path,
) -> anyhow::Result<Inputs> {
    let s = Step::start("host packages");
    apt::install(root, isa.host_packages())?;
    s.done("installed");

    // The modules first: installing their build tools may refresh the package lists,
    // and L1's kernel must be looked up in the same lists as the headers they were
    // built against (a stale list once gave 6.1.0-48 to L1 and 6.1.0-57 to kmod).
    let build = |variant: crate::kmod::Variant| -> anyhow::Result<crate::kmod::Built> {
        let s = Step::start("kmod");
        let kmod = crate::kmod::Options {
            kernel,
            flavour: FLAVOUR,
            variant,
            ..crate::kmod::Options::default()
        };
        let built = crate::kmod::build(&kmod, root)?;
        s.done(format!("{variant} modules in {}", built.out_dir.display()));
        Ok(built)
    };
    let mut built = match kvm {
        KvmModules::Build(variant) => {
            let variant: crate::kmod::Variant = *variant;
            Some(build(variant)?)
        }
        _ => None,
    };
    let s = Step::start("downloads");
    let mut inputs = {
        // Labs running side by side share the cache (the unpacked modules too).
        let _cache = crate::lock::exclusive(&crate::lock::beside(cache), "the lab cache")?;
        apt::with_fresh_lists(root, || download_inputs(isa, kernel, root, cache))?
    };
    s.done(format!("kernel {}, {}", inputs.abi, inputs.qemu_version));
    let stale = built
        .as_ref()
        .is_some_and(|b| b.info.kernel_release != inputs.abi);
    if let (KvmModules::Build(variant), true) = (kvm, stale) {
        // The lists moved between the two look-ups: build again from the new ones.
        let variant: crate::kmod::Variant = *variant;
        built = Some(build(variant)?);
    }
    if let Some(b) = &built {
        ensure!(
            b.info.kernel_release == inputs.abi,
            "the kvm modules were built for {} but L1 boots {}: run again (the package lists moved meanwhile)",
            b.info.kernel_release,
            inputs.abi
        );
    }
    let patched_dir = match kvm {
        KvmModules::Dir(dir) => Some(dir.to_path_buf()),
        KvmModules::Build(_) => built.map(|b| b.out_dir),
        KvmModules::Debian => None,
    };
    if let Some(dir) = &patched_dir {
        use_patched_modules(&mut inputs.modules, dir)?;
    }
    Ok(inputs)
}

/// Downloads and unpacks L1's kernel (of line `line`) and modules, L2's kernel,
/// busybox and QEMU 7.2, and installs QEMU's libraries on the host.
fn download_inputs(
    isa: Isa,
    line: KernelLine,
    root: &Path,
    cache: &Path,
) -> anyhow::Result<Inputs> {
    let debs = cache.join("debs");
    let roots = cache.join("roots");
    // Each line's image from its own Debian release (5.10: bullseye, privately).
    let image = |line: KernelLine| -> anyhow::Result<(String, PathBuf)> {
        let apt = line.apt(root)?;
        let abi = assets::kernel_abi(&apt, &line.image_metapackage(FLAVOUR))?;
        let deb = apt.download(&debs, &format!("linux-image-{abi}"))?;
        Ok((abi, apt::unpack(&deb, &roots)?))
    };
    let (abi, kroot) = image(line)?;
    let kernel = kroot.join(format!("boot/vmlinuz-{abi}"));
    let (l2_abi, l2_root) = image(L2_KERNEL)?;
    let l2_kernel = l2_root.join(format!("boot/vmlinuz-{l2_abi}"));
    let moddir = kroot.join(format!("lib/modules/{abi}"));
    let plain = cache.join("modules").join(&abi);
    let modules = assets::plain_modules(&moddir, isa.modules(), &plain)?;
    if modules.len() != isa.modules().len() {
        bail!("L1's kernel {abi} has kvm built in: the lab must load and reload it as modules");
    }
    let bbroot = apt::unpack(&apt::download(root, &debs, "busybox-static")?, &roots)?;
    let busybox = bbroot.join("bin/busybox");

    let qemu_deb = apt::download(root, &debs, &format!("qemu-system-x86/{QEMU_RELEASE}"))?;
    let qemu_version = apt::deb_field(&qemu_deb, "Version")?;
    if !qemu_version.starts_with(QEMU_VERSION_PREFIX) {
        bail!("apt offers qemu-system-x86 {qemu_version}, the lab needs {QEMU_VERSION_PREFIX}");
    }
    let qemu_root = apt::unpack(&qemu_deb, &roots)?;
    // The firmware and common packages must come from the same QEMU source.
    let source_version = assets::deb_source_version(&qemu_deb)?;
    let data_deb = apt::download(root, &debs, &format!("qemu-system-data={source_version}"))?;
    let data_root = apt::unpack(&data_deb, &roots)?;
    let seabios_root = apt::unpack(&apt::download(root, &debs, "seabios")?, &roots)?;
    let mut data_dirs = vec![
        data_root.join("usr/share/qemu"),
        seabios_root.join("usr/share/seabios"),
    ];
    // The libraries QEMU 7.2 links against, installed on the host so ldd finds them.
    let mut libs = assets::library_depends(&qemu_deb)?;
    let mut qemu_module_dir = None;
    if isa == Isa::Amd {
        let common = apt::download(root, &debs, &format!("qemu-system-common={qemu_version}"))?;
        let common_root = apt::unpack(&common, &roots)?;
        data_dirs.push(common_root.join("usr/share/qemu"));
        qemu_module_dir = Some(common_root.join("usr/lib/x86_64-linux-gnu/qemu"));
        libs.extend(assets::library_depends(&common)?);
    }
    let libs: Vec<&str> = libs.iter().map(String::as_str).collect();
    apt::install(root, &libs)?;
    let microvm = qemu_root.join("usr/bin/qemu-system-x86_64-microvm");
    let version = crate::exec::output(Command::new(&microvm).arg("--version"))?;
    let version = version.lines().next().unwrap_or("").to_owned();
    if !version.contains("version 7.2") {
        bail!("{} is {version}, not 7.2", microvm.display());
    }
    let firmware = QEMU_FIRMWARE
        .iter()
        .filter_map(|name| data_dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()))
        .collect();
    Ok(Inputs {
        abi,
        qemu_version: version,
        kernel,
        l2_abi,
        l2_kernel,
        modules,
        module_dir: moddir,
        plain_modules: plain,
        busybox,
        qemu_root,
        firmware,
        qemu_data_dirs: data_dirs,
        qemu_module_dir,
        cache: cache.to_owned(),
    })
}

/// Builds the static `micro` VMM (lab/micro.c) into `build`: a thread per vCPU.
pub fn build_micro(root: &Path, build: &Path) -> anyhow::Result<PathBuf> {
    let binary = build.join("micro");
    run_bounded(
        Command::new("gcc")
            .args([
                "-O2", "-static", "-pthread", "-Wall", "-Wextra", "-Werror", "-o",
            ])
            .arg(&binary)
            .arg(root.join("lab/micro.c")),
        Duration::from_secs(120),
    )?;
    Ok(binary)
}

/// Replaces Debian's kvm.ko and vendor module by the ones in `dir`, after checking that
/// they were built for the same kernel (vermagic).
fn use_patched_modules(modules: &mut [PathBuf], dir: &Path) -> anyhow::Result<()> {
    let vermagic = |p: &Path| {
        crate::exec::output(Command::new("modinfo").args(["-F", "vermagic"]).arg(p))
            .map(|v| v.trim().to_owned())
    };
    for m in modules.iter_mut() {
        let Some(name) = m.file_name() else { continue };
        let patched = dir.join(name);
        if name == "irqbypass.ko" || !patched.is_file() {
            continue;
        }
        let (want, have) = (vermagic(m)?, vermagic(&patched)?);
        if want != have {
            bail!(
                "{} was built for {have:?}, the L1 kernel is {want:?}",
                patched.display()
            );
        }
        *m = patched;
    }
    Ok(())
}

/// Builds `kvmtrace` (release); returns it with its libraries.
pub fn build_kvmtrace(root: &Path) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let s = Step::start("kvmtrace");
    // Static, so the same binary runs in L1 and in the L2 guest (`kvmtrace guest`).
    s.message(format!(
        "cargo build --release -p tracer --target {STATIC_TARGET} (static)"
    ));
    crate::setup::run(&crate::setup::Options::default(), root)
        .context("step kvmtrace: the eBPF toolchain set-up failed")?;
    run_bounded(
        Command::new("cargo")
            .args([
                "build",
                "--release",
                "-p",
                "tracer",
                "--target",
                STATIC_TARGET,
            ])
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            )
            .current_dir(root),
        Duration::from_secs(900),
    )
    .context(
        "step kvmtrace: kvmtrace does not build (or use --kvmtrace off for a hist-only lab run)",
    )?;
    let bin = root.join(format!("target/{STATIC_TARGET}/release/kvmtrace"));
    s.done(format!("{}", bin.display()));
    Ok((bin, Vec::new()))
}

/// perf, installed on the host (`linux-perf`), with the libraries it loads.
pub fn perf_tool(root: &Path) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    host_tool(root, "perf", "linux-perf", "version")
}

/// Debian's bpftrace, installed on the host (`bpftrace`), with the libraries it loads.
pub fn bpftrace_tool(root: &Path) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    host_tool(root, "bpftrace", "bpftrace", "--version")
}

/// Debian's curl, installed on the host, with the libraries it loads: L1's own scrapes
/// of an exporter that wants a client certificate and a password.
pub fn curl_tool(root: &Path) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    host_tool(root, "curl", "curl", "--version")
}

/// `/usr/bin/NAME` from Debian package `package` (installed on the host), with the
/// libraries it loads.
pub fn host_program(
    root: &Path,
    name: &str,
    package: &str,
) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    host_tool(root, name, package, "--version")
}

/// `/usr/bin/NAME` from Debian package `package`, installed on the host (apt in the
/// checkout `root`), with the libraries it loads; the step line shows what `NAME
/// VERSION_ARG` prints.
fn host_tool(
    root: &Path,
    name: &str,
    package: &str,
    version_arg: &str,
) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let s = Step::start(name);
    apt::install(root, &[package])?;
    let binary = PathBuf::from("/usr/bin").join(name);
    let libs = assets::shared_libraries(&binary)?;
    s.done(format!(
        "{} ({} libraries)",
        crate::exec::output(Command::new(&binary).arg(version_arg))?.trim(),
        libs.len()
    ));
    Ok((binary, libs))
}
