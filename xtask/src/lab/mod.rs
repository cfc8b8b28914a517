//! `cargo xtask lab`: the emulated lab. A real KVM runs inside an emulated host (L1):
//! Bochs with VMX+EPT for kvm_intel, QEMU 7.2 TCG with SVM+NPT for kvm_amd. For each
//! paging mode L1 runs an L2 workload under `kvmtrace record`, with the kernel's own
//! hist trigger on kvm:kvm_exit as the ground truth, and ships both back over the serial
//! console. Results land in `target/lab/<isa>/<mode>/`.
//!
//! Guest-side pieces (init scripts, the `micro` VMM, the Bochs config) live in `lab/`.

mod assets;
pub mod bench;
mod cpio;
mod emulator;
mod image;
mod report;
mod step;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::{apt, process::run_bounded};

use self::{
    image::{L1, Workload as L2Workload},
    report::{ISA_SVM, ISA_VMX},
    step::Step,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Isa {
    /// kvm_intel under Bochs (VMX + EPT).
    Intel,
    /// kvm_amd under QEMU 7.2 TCG (SVM + NPT).
    Amd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// QEMU microvm boots a Linux L2 (Debian's kernel, busybox initrd) to its end marker.
    Boot,
    /// A tiny static VMM whose exits are known: N CPUID, M port writes, 1 HLT.
    Micro,
    /// The boot, then L2 asks the counter leaves about every ECX in 0..=0xFFFF and the
    /// 32-bit edges (`kvmtrace guest --sweep`); L1's dmesg is kept.
    Sweep,
    /// VMs that start and stop while others run: a long micro VM in the background,
    /// two short ones after each other meanwhile (see [`churn_vms`]).
    Churn,
}

/// How kvmtrace runs inside L1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// One `kvmtrace record -- workload` per paging mode.
    Modes,
    /// One `kvmtrace record` for all modes: the vendor module is removed and loaded
    /// again with the next mode while it runs.
    Reload,
    /// Each mode's record gets a signal (--signals) while the workload still runs.
    Signal,
}

/// Which kvm modules L1 loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Modules {
    /// Debian's kvm modules, unpatched.
    Stock,
    /// Built by `cargo xtask kmod`: the series (`patched`), or one of its TEST-ONLY
    /// variants (kernel/variants/).
    Build(crate::kmod::Variant),
}

impl Modules {
    fn variant(self) -> Option<crate::kmod::Variant> {
        match self {
            Self::Stock => None,
            Self::Build(v) => Some(v),
        }
    }

    /// Modules whose counters must reconcile exactly: the series, and the variant that
    /// only answers elsewhere.
    fn correct(self) -> bool {
        matches!(
            self,
            Self::Build(crate::kmod::Variant::Good | crate::kmod::Variant::AnswersInEmulate)
        )
    }

    /// `stock`, `patched`, or a variant's name (`cargo xtask kmod --variant`).
    fn parse(text: &str) -> Result<Self, String> {
        match text {
            "stock" => Ok(Self::Stock),
            "patched" => Ok(Self::Build(crate::kmod::Variant::Good)),
            other => crate::kmod::Variant::from_str(other, false)
                .map(Self::Build)
                .map_err(|_| {
                    let names: Vec<String> = crate::kmod::Variant::TEST_ONLY
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    format!("stock, patched, or one of {}", names.join(", "))
                }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kvmtrace {
    /// Fail, naming the step, unless kvmtrace builds, runs, and equals the hist.
    Required,
    /// Only the kernel hist: a run of the lab itself, which proves nothing of kvmtrace.
    Off,
}

#[derive(Args, Debug)]
pub struct Options {
    /// Which KVM to run: kvm_intel (Bochs) or kvm_amd (QEMU TCG).
    #[arg(long, value_enum, default_value_t = Isa::Intel)]
    pub isa: Isa,
    /// Paging modes, in order: 1 = nested paging (ept/npt=1), 0 = shadow paging.
    #[arg(long, value_delimiter = ',', default_values_t = [1u8, 0u8],
          value_parser = clap::value_parser!(u8).range(0..=1))]
    pub modes: Vec<u8>,
    /// What runs as L2.
    #[arg(long, value_enum, default_value_t = Workload::Boot)]
    pub workload: Workload,
    /// vCPUs of the L2 VM (boot workload).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    pub smp: u8,
    /// Whether to run kvmtrace next to the kernel hist.
    #[arg(long, value_enum, default_value_t = Kvmtrace::Required)]
    pub kvmtrace: Kvmtrace,
    /// More `kvmtrace guest` options for the guest's counter readout inside L2 (boot and
    /// sweep workloads), e.g. `--count-leaf 0x4ffffffd --total-leaf none` for a patch
    /// with another leaf layout; give the record the same leaves with --record-args.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub guest_args: String,
    /// Extra arguments for `kvmtrace record` inside L1.
    #[arg(
        long,
        default_value = "--per-vcpu --snapshots",
        allow_hyphen_values = true
    )]
    pub record_args: String,
    /// Which kvm modules L1 loads: the patched ones (built by `cargo xtask kmod`),
    /// Debian's stock ones, or a TEST-ONLY variant of the patch (kernel/README.md).
    #[arg(long, value_parser = Modules::parse, default_value = "patched")]
    pub modules: Modules,
    /// Short for `--modules stock`: Debian's unpatched kvm modules.
    #[arg(long, conflicts_with = "modules")]
    pub stock: bool,
    /// How many VMs run one after the other in each mode (each must start from zero).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=4))]
    pub vms: u8,
    /// Where the results go (default: target/lab/<isa>, with .micro/.smpN suffixes).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// micro workload: how many CPUID instructions the guest runs.
    #[arg(long, default_value_t = 1000)]
    pub micro_cpuids: u32,
    /// micro workload: how many port writes the guest does.
    #[arg(long, default_value_t = 100)]
    pub micro_outs: u32,
    /// micro and churn workloads: vCPUs of each micro VM, one thread each, all running
    /// the CPUIDs and port writes at the same time (with --l1-cpus 2, truly in
    /// parallel).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=MAX_MICRO_VCPUS))]
    pub micro_vcpus: u8,
    /// CPUs of the emulated host L1. More than 1 only with --isa amd: QEMU then runs
    /// L1's CPUs in threads of their own (-accel tcg,thread=multi), truly in parallel.
    /// Bochs runs all its CPUs in one thread, one instruction at a time, so it cannot
    /// show races: --isa intel takes 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub l1_cpus: u8,
    /// Directory with kvm.ko and the vendor module (e.g. patched ones) to load instead of
    /// Debian's; their vermagic must match the L1 kernel.
    #[arg(long)]
    pub kvm_modules: Option<PathBuf>,
    /// Multiplies every time limit (for slow machines).
    #[arg(long, default_value_t = 1.0)]
    pub timeout_scale: f64,
    /// How kvmtrace runs: per mode, across module reloads, or stopped by a signal.
    #[arg(long, value_enum, default_value_t = Scenario::Modes)]
    pub scenario: Scenario,
    /// --scenario signal: the signal each mode's record gets, in mode order.
    #[arg(long, value_delimiter = ',', default_values_t = ["INT".to_owned(), "TERM".to_owned()],
          value_parser = ["INT", "TERM"])]
    pub signals: Vec<String>,
    /// --scenario signal: L1 seconds after kvmtrace attached.
    #[arg(long, default_value_t = 3)]
    pub signal_after: u32,
}

/// Debian's kernel for L1 and L2: the cloud flavour boots fastest under emulation (LZ4).
const KERNEL_META: &str = "linux-image-cloud-amd64";
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
const L2_MEMORY_MB: u32 = 128;
/// The target kvmtrace is built for, statically linked, for L1 and L2.
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";
const L1_MEMORY_MB: u32 = 1024;
/// vCPUs a micro VM may have (lab/micro.c's MAX_VCPUS).
const MAX_MICRO_VCPUS: i64 = 8;
/// `kvmtrace reconcile`'s exit status for a difference with no known cause
/// (tracer/src/exit_status.rs).
const RECONCILE_UNEXPLAINED: i32 = 5;

impl Options {
    /// The modules to load, with `--stock` applied.
    fn module_set(&self) -> Modules {
        if self.stock {
            Modules::Stock
        } else {
            self.modules
        }
    }

    /// What clap cannot check alone: combinations of options.
    fn validate(&self) -> anyhow::Result<()> {
        if self.modes.is_empty() {
            bail!("--modes needs at least one mode");
        }
        if self.timeout_scale <= 0.0 {
            bail!("--timeout-scale must be positive");
        }
        if self.isa == Isa::Intel && self.l1_cpus > 1 {
            bail!(
                "--l1-cpus {} needs --isa amd: Bochs runs its CPUs in one thread, one instruction at a time, so it cannot show races",
                self.l1_cpus
            );
        }
        if self.micro_vcpus > 1 && !matches!(self.workload, Workload::Micro | Workload::Churn) {
            bail!("--micro-vcpus is for the micro and churn workloads (the boot VM takes --smp)");
        }
        Ok(())
    }
}

impl Isa {
    fn name(self) -> &'static str {
        match self {
            Isa::Intel => "intel",
            Isa::Amd => "amd",
        }
    }

    fn paging(self) -> &'static str {
        match self {
            Isa::Intel => "ept",
            Isa::Amd => "npt",
        }
    }

    fn trace_isa(self) -> u32 {
        match self {
            Isa::Intel => ISA_VMX,
            Isa::Amd => ISA_SVM,
        }
    }

    /// kvm modules (paths under lib/modules/<abi>/kernel) in load order, vendor last.
    fn modules(self) -> &'static [&'static str] {
        match self {
            Isa::Intel => &[
                "virt/lib/irqbypass.ko",
                "arch/x86/kvm/kvm.ko",
                "arch/x86/kvm/kvm-intel.ko",
            ],
            // The cloud kernel has no ccp (SEV) driver, so kvm-amd does not need it.
            Isa::Amd => &[
                "virt/lib/irqbypass.ko",
                "arch/x86/kvm/kvm.ko",
                "arch/x86/kvm/kvm-amd.ko",
            ],
        }
    }

    fn host_packages(self) -> &'static [&'static str] {
        match self {
            Isa::Intel => &[
                "bochs",
                "bochsbios",
                "vgabios",
                "syslinux",
                "syslinux-common",
                "mtools",
                "dosfstools",
                "util-linux",
                "gcc",
                "libc6-dev",
            ],
            Isa::Amd => &["gcc", "libc6-dev"],
        }
    }
}

/// The unpacked Debian packages the lab is built from.
struct Inputs {
    abi: String,
    /// `qemu-system-x86_64-microvm --version`'s first line.
    qemu_version: String,
    kernel: PathBuf,
    modules: Vec<PathBuf>,
    busybox: PathBuf,
    /// The unpacked qemu-system-x86 7.2 tree, and its firmware files.
    qemu_root: PathBuf,
    firmware: Vec<PathBuf>,
    qemu_data_dirs: Vec<PathBuf>,
    /// QEMU's loadable modules (TCG lives there), for the AMD lab's L1 emulator.
    qemu_module_dir: Option<PathBuf>,
}

pub fn run(opts: &Options, root: &Path) -> anyhow::Result<()> {
    opts.validate()?;
    let started = Instant::now();
    let lab = root.join("target/lab");
    let cache = lab.join("cache");
    // Absolute: the emulators run in a directory of their own.
    let out = opts
        .out
        .as_ref()
        .map_or_else(|| lab.join(opts.isa.name()), |o| root.join(o));
    let build = out.join("build");
    std::fs::create_dir_all(&build)
        .with_context(|| format!("cannot create {}", build.display()))?;
    let inputs = prepare_inputs(opts, root, &cache)?;
    let kvmtrace = build_kvmtrace(opts, root)?;
    let setup = started.elapsed();

    let s = Step::start("initrd");
    let workload = match opts.workload {
        Workload::Boot | Workload::Sweep => {
            let l2 = build.join("l2-initrd.cpio");
            let guest_tool = kvmtrace.as_ref().map(|(bin, _)| bin.as_path());
            image::l2_initrd(
                &inputs.busybox,
                &root.join("lab/l2-init.sh"),
                guest_tool,
                &opts.guest_args,
                &l2,
            )?;
            let qemu = inputs.qemu_root.join("usr/bin/qemu-system-x86_64-microvm");
            L2Workload::Boot {
                qemu_libs: assets::shared_libraries(&qemu)?,
                qemu,
                firmware: inputs.firmware.clone(),
                kernel: inputs.kernel.clone(),
                l2_initrd: l2,
                memory_mb: L2_MEMORY_MB,
                smp: opts.smp,
                sweep: opts.workload == Workload::Sweep,
            }
        }
        Workload::Micro | Workload::Churn => L2Workload::Micro {
            binary: build_micro(root, &build)?,
            vms: if opts.workload == Workload::Churn {
                churn_vms(opts)
            } else {
                vec![image::MicroVm {
                    cpuids: opts.micro_cpuids,
                    outs: opts.micro_outs,
                    vcpus: opts.micro_vcpus,
                }]
            },
            overlap: opts.workload == Workload::Churn,
        },
    };
    let run_timeout = match opts.workload {
        Workload::Boot | Workload::Sweep => 300 * u64::from(opts.smp),
        // Under emulation and tracing a CPUID exit takes ~0.1 ms of host time: give a
        // long micro run (--micro-cpuids 1000000) time in proportion, for every vCPU
        // (they share L1's CPUs, and the host's).
        Workload::Micro | Workload::Churn => {
            120 + u64::from(opts.micro_cpuids) * u64::from(opts.micro_vcpus) / 5_000
        }
    };
    let l1 = L1 {
        busybox: inputs.busybox.clone(),
        init: root.join("lab/l1-init.sh"),
        modules: inputs.modules.clone(),
        paging: opts.isa.paging(),
        modes: opts.modes.clone(),
        workload,
        kvmtrace,
        record_args: record_args(opts),
        run_timeout: (run_timeout as f64 * opts.timeout_scale * f64::from(opts.vms)) as u64,
        vms: opts.vms,
        scenario: match opts.scenario {
            Scenario::Modes => "modes",
            Scenario::Reload => "reload",
            Scenario::Signal => "signal",
        },
        signals: opts.signals.join(" "),
        signal_after: opts.signal_after,
    };
    let initrd = build.join("l1-initrd.cpio");
    let size = image::l1_initrd(&l1, &initrd)?;
    s.done(format!("{} ({} MiB)", initrd.display(), size >> 20));

    let mut cmd = match opts.isa {
        Isa::Intel => bochs_command(root, &build, &inputs.kernel, &initrd)?,
        Isa::Amd => qemu_command(&build, &inputs, &initrd, opts.l1_cpus)?,
    };
    let s = Step::start(match opts.isa {
        Isa::Intel => "bochs",
        Isa::Amd => "qemu-tcg",
    });
    s.note(format!(
        "L1 {} ({} CPU{}) with {} modes {:?}",
        inputs.abi,
        opts.l1_cpus,
        if opts.l1_cpus == 1 { "" } else { "s" },
        opts.isa.paging(),
        opts.modes
    ));
    let serial_log = out.join("serial.log");
    let (run, result, emu_time) =
        emulator::boot(&mut cmd, &build, s, opts.timeout_scale, &serial_log)?;

    let outcome = summarize(opts, &out, &run, &l1);
    if let Some((kvmtrace, _)) = &l1.kvmtrace {
        ab_report(opts, &out, kvmtrace)?;
    }
    eprintln!(
        "lab: setup {:.1} s, {} {:.1} s, total {:.1} s",
        setup.as_secs_f64(),
        match opts.isa {
            Isa::Intel => "bochs",
            Isa::Amd => "qemu",
        },
        emu_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if run.result.as_deref() != Some("pass") {
        bail!(
            "the L1 run did not pass: {result} (console in {})",
            serial_log.display()
        );
    }
    outcome
}

fn prepare_inputs(opts: &Options, root: &Path, cache: &Path) -> anyhow::Result<Inputs> {
    let s = Step::start("host packages");
    apt::install(opts.isa.host_packages())?;
    s.done("installed");

    let s = Step::start("downloads");
    let mut inputs = apt::with_fresh_lists(|| download_inputs(opts, cache))?;
    s.done(format!("kernel {}, {}", inputs.abi, inputs.qemu_version));
    let patched_dir = match (&opts.kvm_modules, opts.module_set().variant()) {
        (Some(dir), _) => Some(dir.clone()),
        (None, Some(variant)) => {
            let s = Step::start("kmod");
            let kmod = crate::kmod::Options {
                variant,
                ..crate::kmod::Options::default()
            };
            let dir = crate::kmod::build(&kmod, root)?.out_dir;
            s.done(format!("{variant} modules in {}", dir.display()));
            Some(dir)
        }
        (None, None) => None,
    };
    if let Some(dir) = &patched_dir {
        use_patched_modules(&mut inputs.modules, dir)?;
    }
    Ok(inputs)
}

/// Downloads and unpacks L1's kernel and modules, busybox and QEMU 7.2, and installs
/// QEMU's libraries on the host.
fn download_inputs(opts: &Options, cache: &Path) -> anyhow::Result<Inputs> {
    let debs = cache.join("debs");
    let roots = cache.join("roots");
    let abi = assets::kernel_abi(KERNEL_META)?;
    let image_pkg = format!("linux-image-{abi}");
    let kroot = apt::unpack(&apt::download(&debs, &image_pkg)?, &roots)?;
    let kernel = kroot.join(format!("boot/vmlinuz-{abi}"));
    let kdir = kroot.join(format!("lib/modules/{abi}/kernel"));
    let modules: Vec<PathBuf> = opts.isa.modules().iter().map(|m| kdir.join(m)).collect();
    let bbroot = apt::unpack(&apt::download(&debs, "busybox-static")?, &roots)?;
    let busybox = bbroot.join("bin/busybox");

    let qemu_deb = apt::download(&debs, &format!("qemu-system-x86/{QEMU_RELEASE}"))?;
    let qemu_version = apt::deb_field(&qemu_deb, "Version")?;
    if !qemu_version.starts_with(QEMU_VERSION_PREFIX) {
        bail!("apt offers qemu-system-x86 {qemu_version}, the lab needs {QEMU_VERSION_PREFIX}");
    }
    let qemu_root = apt::unpack(&qemu_deb, &roots)?;
    // The firmware and common packages must come from the same QEMU source.
    let source_version = assets::deb_source_version(&qemu_deb)?;
    let data_deb = apt::download(&debs, &format!("qemu-system-data={source_version}"))?;
    let data_root = apt::unpack(&data_deb, &roots)?;
    let seabios_root = apt::unpack(&apt::download(&debs, "seabios")?, &roots)?;
    let mut data_dirs = vec![
        data_root.join("usr/share/qemu"),
        seabios_root.join("usr/share/seabios"),
    ];
    // The libraries QEMU 7.2 links against, installed on the host so ldd finds them.
    let mut libs = assets::library_depends(&qemu_deb)?;
    let mut qemu_module_dir = None;
    if opts.isa == Isa::Amd {
        let common = apt::download(&debs, &format!("qemu-system-common={qemu_version}"))?;
        let common_root = apt::unpack(&common, &roots)?;
        data_dirs.push(common_root.join("usr/share/qemu"));
        qemu_module_dir = Some(common_root.join("usr/lib/x86_64-linux-gnu/qemu"));
        libs.extend(assets::library_depends(&common)?);
    }
    let libs: Vec<&str> = libs.iter().map(String::as_str).collect();
    apt::install(&libs)?;
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
        modules,
        busybox,
        qemu_root,
        firmware,
        qemu_data_dirs: data_dirs,
        qemu_module_dir,
    })
}

/// Builds the static `micro` VMM (lab/micro.c) into `build`: a thread per vCPU.
fn build_micro(root: &Path, build: &Path) -> anyhow::Result<PathBuf> {
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

/// Builds `kvmtrace` (release) unless told not to; returns it with its libraries.
fn build_kvmtrace(opts: &Options, root: &Path) -> anyhow::Result<Option<(PathBuf, Vec<PathBuf>)>> {
    if opts.kvmtrace == Kvmtrace::Off {
        return Ok(None);
    }
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
    Ok(Some((bin, Vec::new())))
}

fn bochs_command(
    root: &Path,
    build: &Path,
    kernel: &Path,
    initrd: &Path,
) -> anyhow::Result<Command> {
    let (disk, cylinders) = image::boot_disk(build, kernel, initrd)?;
    let template = root.join("lab/bochsrc.in");
    let template = std::fs::read_to_string(&template)
        .with_context(|| format!("cannot read {}", template.display()))?;
    let text = |p: &Path| p.to_string_lossy().into_owned();
    let rc = template
        .replace("@MEMORY_MB@", &L1_MEMORY_MB.to_string())
        .replace("@DISK@", &text(&disk))
        .replace("@CYLINDERS@", &cylinders.to_string())
        .replace("@SERIAL@", &text(&build.join("serial.out")))
        .replace("@LOG@", &text(&build.join("bochs.log")));
    let bochsrc = build.join("bochsrc");
    std::fs::write(&bochsrc, rc).with_context(|| format!("cannot write {}", bochsrc.display()))?;
    // The debugger is compiled in: this script just says "continue".
    let dbg = build.join("bochs-debugger.rc");
    std::fs::write(&dbg, "c\n").with_context(|| format!("cannot write {}", dbg.display()))?;
    let _ = std::fs::remove_file(build.join("disk.img.lock"));
    let mut cmd = Command::new("unshare");
    cmd.args(["-n", "bochs-bin", "-q", "-f"])
        .arg(&bochsrc)
        .arg("-rc")
        .arg(&dbg)
        .current_dir(build);
    Ok(cmd)
}

/// QEMU TCG as L1 with `cpus` CPUs; with more than one, each runs in a host thread of
/// its own (multi-threaded TCG), so L1's CPUs run truly in parallel.
fn qemu_command(build: &Path, inputs: &Inputs, initrd: &Path, cpus: u8) -> anyhow::Result<Command> {
    let qemu = inputs.qemu_root.join("usr/bin/qemu-system-x86_64");
    let mut cmd = Command::new(qemu);
    if let Some(dir) = &inputs.qemu_module_dir {
        cmd.env("QEMU_MODULE_DIR", dir);
    }
    for d in &inputs.qemu_data_dirs {
        cmd.arg("-L").arg(d);
    }
    cmd.args(["-accel", if cpus > 1 { "tcg,thread=multi" } else { "tcg" }])
        .args(["-cpu", "max", "-smp"])
        .arg(cpus.to_string())
        .args(["-no-reboot", "-nodefaults"])
        .args(["-display", "none", "-monitor", "none", "-net", "none"])
        .arg("-m")
        .arg(format!("{L1_MEMORY_MB}M"))
        .arg("-serial")
        .arg(format!("file:{}", build.join("serial.out").display()))
        .arg("-kernel")
        .arg(&inputs.kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(image::L1_APPEND)
        .current_dir(build);
    Ok(cmd)
}

/// The results directory of one mode: `ept1`, `npt0.micro`, `ept1.smp2`,
/// `npt1.micro.vcpus2.l1cpus2`, ... (the bare tag with an explicit --out).
fn mode_dir_name(opts: &Options, mode: u8) -> String {
    let mut name = format!("{}{mode}", opts.isa.paging());
    if opts.out.is_some() {
        return name;
    }
    match opts.workload {
        Workload::Micro | Workload::Churn => {
            name.push_str(if opts.workload == Workload::Micro {
                ".micro"
            } else {
                ".churn"
            });
            if opts.micro_vcpus > 1 {
                name.push_str(&format!(".vcpus{}", opts.micro_vcpus));
            }
        }
        _ if opts.vms > 1 => name.push_str(&format!(".vms{}", opts.vms)),
        Workload::Sweep => name.push_str(".sweep"),
        Workload::Boot if opts.smp > 1 => name.push_str(&format!(".smp{}", opts.smp)),
        Workload::Boot => {}
    }
    if opts.l1_cpus > 1 {
        name.push_str(&format!(".l1cpus{}", opts.l1_cpus));
    }
    name
}

/// The workload's label on the console: `micro`, `boot, 2 vCPUs`, `micro, 2 vCPUs,
/// L1 2 CPUs`, ...
fn workload_label(opts: &Options) -> String {
    let mut label = format!("{:?}", opts.workload).to_lowercase();
    let vcpus = match opts.workload {
        Workload::Boot | Workload::Sweep => opts.smp,
        Workload::Micro | Workload::Churn => opts.micro_vcpus,
    };
    if vcpus > 1 {
        label.push_str(&format!(", {vcpus} vCPUs"));
    }
    if opts.l1_cpus > 1 {
        label.push_str(&format!(", L1 {} CPUs", opts.l1_cpus));
    }
    label
}

/// Writes the nested-vs-shadow A/B report, `report.md` and `report.svg`, with the
/// same kvmtrace binary that recorded (`kvmtrace diff`), plus each mode's
/// reconciliation. Needs both modes and their records.
fn ab_report(opts: &Options, out: &Path, kvmtrace: &Path) -> anyhow::Result<()> {
    let nested = out.join(mode_dir_name(opts, 1)).join("record.json");
    let shadow = out.join(mode_dir_name(opts, 0)).join("record.json");
    if !nested.is_file() || !shadow.is_file() {
        return Ok(());
    }
    let diff = |format: &str, file: &str| {
        crate::exec::output(
            Command::new(kvmtrace)
                .arg("diff")
                .args([&nested, &shadow])
                .args(["--format", format, "-o"])
                .arg(out.join(file)),
        )
    };
    diff("md", "report.md.tmp")?;
    diff("svg", "report.svg")?;
    let mut md = format!("# {} lab: nested vs shadow paging\n\n", opts.isa.name());
    md.push_str(&std::fs::read_to_string(out.join("report.md.tmp"))?);
    std::fs::remove_file(out.join("report.md.tmp"))?;
    md.push_str("\n![chart](report.svg)\n\n## Guest counters vs host\n\n");
    for mode in [1, 0] {
        let name = mode_dir_name(opts, mode);
        if let Ok(text) = std::fs::read_to_string(out.join(&name).join("reconcile.txt")) {
            let first = text.lines().next().unwrap_or_default();
            md.push_str(&format!("- {name}: {first}\n"));
        }
    }
    report::write(out, "report.md", &md)?;
    println!(
        "\nA/B report: {} and report.svg",
        out.join("report.md").display()
    );
    Ok(())
}

/// `kvmtrace record` arguments inside L1. A sweep makes 131 078 counter reads: their
/// snapshots would be tens of MB of JSON on a serial console, so it records without.
fn record_args(opts: &Options) -> String {
    if opts.workload == Workload::Sweep {
        opts.record_args
            .split_whitespace()
            .filter(|a| *a != "--snapshots")
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        opts.record_args.clone()
    }
}

/// What L2 printed between `MARKER begin` and `MARKER end`.
fn l2_section(lines: &[emulator::Line], marker: &str) -> Option<String> {
    let text: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.text.strip_prefix("L2| "))
        .skip_while(|t| !t.starts_with(&format!("{marker} begin")))
        .skip(1)
        .take_while(|t| !t.starts_with(&format!("{marker} end")))
        .collect();
    (!text.is_empty()).then(|| text.join("\n"))
}

/// Saves what `kvmtrace guest` printed in L2 (`guest.json`) and, with patched modules,
/// reconciles it with the record's snapshots using the same kvmtrace binary
/// (`reconcile.txt`). Returns a problem when the patched KVM's counters do not
/// reconcile; the TEST-ONLY variants are expected not to, and are only reported.
fn guest_readout(
    opts: &Options,
    dir: &Path,
    lines: &[emulator::Line],
    l1: &L1,
) -> anyhow::Result<Option<String>> {
    if let Some(sweep) = l2_section(lines, "KVMLAB-SWEEP") {
        report::write(dir, "sweep.json", &sweep)?;
        println!("  ECX sweep: {}", sweep.trim());
    }
    let Some(text) = l2_section(lines, "KVMLAB-GUEST") else {
        return Ok(None);
    };
    let guest = dir.join("guest.json");
    report::write(dir, "guest.json", &text)?;
    // Every module set but Debian's stock one has the leaves.
    let (Some((kvmtrace, _)), Some(_)) = (&l1.kvmtrace, opts.module_set().variant()) else {
        return Ok(None);
    };
    if opts.workload == Workload::Sweep {
        // Recorded without snapshots (see record_args): nothing to reconcile.
        return Ok(None);
    };
    let reconciled = reconcile(kvmtrace, dir, Some(&guest), opts.module_set())?;
    println!("  guest counters vs host (kvmtrace reconcile):");
    for line in reconciled.table.lines().take(40) {
        println!("    {line}");
    }
    Ok(reconciled.problem)
}

/// What `kvmtrace reconcile` of a mode's record said.
struct Reconciled {
    table: String,
    /// Reads it reconciled (the first number of its first line).
    reads: u64,
    /// Its exit status, when that is a problem for `modules`: every failure, but an
    /// unexplained difference of a deliberately wrong variant.
    problem: Option<String>,
}

/// Runs `kvmtrace reconcile` (the same binary that recorded) on `dir/record.json`,
/// with the guest's readout when there is one, and keeps its table in
/// `reconcile.txt`.
fn reconcile(
    kvmtrace: &Path,
    dir: &Path,
    guest: Option<&Path>,
    modules: Modules,
) -> anyhow::Result<Reconciled> {
    let mut cmd = Command::new(kvmtrace);
    cmd.arg("reconcile").arg(dir.join("record.json"));
    if let Some(g) = guest {
        cmd.arg("--guest").arg(g);
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", kvmtrace.display()))?;
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    report::write(dir, "reconcile.txt", &table)?;
    let reads = table
        .split_whitespace()
        .next()
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    let problem = match out.status.code() {
        Some(0) => None,
        // The deliberately wrong variants may differ; the correct modules must not.
        Some(RECONCILE_UNEXPLAINED) if !modules.correct() => None,
        code => Some(format!(
            "kvmtrace reconcile exited {code:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    };
    Ok(Reconciled {
        table,
        reads,
        problem,
    })
}

/// The micro workload with patched modules (any variant): what each VM's guest
/// received from the leaves (`micro: leaves cpuid=C io=I total=T` on L2's console)
/// against the VM's known exits (C = CPUIDs + the query itself, I = port writes), and
/// `kvmtrace reconcile` of the record (when it took snapshots), which must have seen
/// every read (3 per VM).
/// Correct modules must match and reconcile exactly; for the deliberately wrong
/// variants the result is printed, and the lab tests check their verdicts.
fn micro_readout(
    opts: &Options,
    dir: &Path,
    lines: &[emulator::Line],
    l1: &L1,
) -> anyhow::Result<Vec<String>> {
    let (L2Workload::Micro { .. }, Some((kvmtrace, _))) = (&l1.workload, &l1.kvmtrace) else {
        return Ok(Vec::new());
    };
    let vms = micro_runs(l1);
    let modules = opts.module_set();
    if modules == Modules::Stock {
        return Ok(Vec::new());
    }
    let correct = modules.correct();
    let mut problems = Vec::new();
    let received: Vec<(u64, u64)> = lines
        .iter()
        .filter_map(|l| l.text.strip_prefix("L2| micro: leaves "))
        .filter_map(|t| {
            let field = |name: &str| {
                t.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            Some((field("cpuid=")?, field("io=")?))
        })
        .collect();
    let ranges = micro_leaf_ranges(&vms);
    let known = micro_leaves_fit(&received, &ranges);
    if ranges
        .iter()
        .all(|(c, i)| c.start() == c.end() && i.start() == i.end())
    {
        // One vCPU per VM: each VM's own exits, exactly.
        let mut expected: Vec<(u64, u64)> = ranges
            .iter()
            .map(|(c, i)| (*c.start(), *i.start()))
            .collect();
        expected.sort_unstable();
        println!(
            "  micro leaves received {received:?}, known exits {expected:?}: {}",
            if known { "equal" } else { "DIFFERENT" }
        );
        if !known && correct {
            problems.push(format!(
                "the guest received {received:?} from the leaves, its known exits are {expected:?}"
            ));
        }
    } else {
        // Several vCPUs: what each reads depends on the others' progress.
        let bounds: Vec<String> = ranges
            .iter()
            .map(|(c, i)| format!("cpuid {c:?} io {i:?}"))
            .collect();
        println!(
            "  micro leaves received {received:?} ({} vCPUs), each within one of [{}]: {}",
            ranges.len(),
            bounds.join(", "),
            if known { "yes" } else { "NO" }
        );
        if !known && correct {
            problems.push(format!(
                "the {} vCPUs received {received:?} from the leaves, outside their bounds [{}]",
                ranges.len(),
                bounds.join(", ")
            ));
        }
    }
    if !l1
        .record_args
        .split_whitespace()
        .any(|a| a == "--snapshots")
    {
        // Recorded without snapshots (e.g. the full-maps scenario): nothing to reconcile.
        return Ok(problems);
    }
    let reconciled = reconcile(kvmtrace, dir, None, modules)?;
    println!(
        "  kvmtrace reconcile: {}",
        reconciled.table.lines().next().unwrap_or_default()
    );
    let want_reads = MICRO_LEAF_READS * micro_vcpus(&vms);
    if reconciled.reads != want_reads {
        problems.push(format!(
            "kvmtrace saw {} guest counter reads, the guest made {want_reads}",
            reconciled.reads
        ));
    }
    problems.extend(reconciled.problem);
    Ok(problems)
}

/// Parses the console, writes `target/lab/<isa>/<mode>/`, prints the tables; fails if
/// kvmtrace ran and disagrees with the hist, or the micro workload's counts are off.
fn summarize(opts: &Options, out: &Path, run: &emulator::Run, l1: &L1) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    match l1_cpus_up(&run.lines) {
        Some(n) if n == u64::from(opts.l1_cpus) => println!("L1 brought up {n} CPU(s)"),
        Some(n) => problems.push(format!(
            "L1 brought up {n} CPU(s), --l1-cpus asked for {}",
            opts.l1_cpus
        )),
        None => problems.push("L1 did not say how many CPUs it has".to_owned()),
    }
    // --scenario reload: one record for the whole run, split into phases.
    let whole = report::section(&run.lines, "record", "all");
    if let Some(text) = &whole {
        report::write(out, "record.json", text)?;
        problems.extend(timing_check("the whole record", text)?);
    }
    if let Some(err) = report::section(&run.lines, "kvmtrace-stderr", "all") {
        report::write(out, "kvmtrace.stderr", &err)?;
    }
    if opts.scenario == Scenario::Reload && whole.is_none() && l1.kvmtrace.is_some() {
        problems.push("kvmtrace wrote no record across the reloads".to_owned());
    }
    for mode in &opts.modes {
        let tag = format!("{}{mode}", opts.isa.paging());
        let dir_name = mode_dir_name(opts, *mode);
        let dir = out.join(&dir_name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let lines = report::mode_lines(&run.lines, &tag);
        let console: String = lines
            .iter()
            .map(|l| format!("[{:8.2}] {}\n", l.at, l.text))
            .collect();
        report::write(&dir, "serial.log", &console)?;

        let Some(hist_text) = report::section(&run.lines, "hist", &tag) else {
            problems.push(format!("{tag}: no hist on the console"));
            continue;
        };
        report::write(&dir, "hist.txt", &hist_text)?;
        let hist = report::parse_hist(&hist_text)?;
        if hist.dropped != 0 {
            problems.push(format!("{tag}: the hist dropped {} entries", hist.dropped));
        }
        let record = match (report::section(&run.lines, "record", &tag), &whole) {
            (Some(text), _) => {
                report::write(&dir, "record.json", &text)?;
                problems.extend(timing_check(&tag, &text)?);
                Some(report::parse_record(&text)?)
            }
            (None, Some(all)) => match report::phase_record(all, &tag)? {
                Some((rec, text)) => {
                    report::write(&dir, "phase.json", &text)?;
                    Some(rec)
                }
                None => {
                    problems.push(format!("{tag}: the record has no phase with {tag}"));
                    None
                }
            },
            (None, None) => None,
        };
        if let Some(bad) = report::section(&run.lines, "dmesg-bad", &tag) {
            report::write(&dir, "dmesg-bad.txt", &bad)?;
            // The first line counts dmesg's lines; anything after it is a complaint.
            let complaints: Vec<&str> = bad
                .lines()
                .skip(1)
                .filter(|l| !l.trim().is_empty())
                .collect();
            if !complaints.is_empty() {
                problems.push(format!(
                    "{tag}: L1's kernel complained:\n{}",
                    complaints.join("\n")
                ));
            }
        }
        let kvmtrace_err = report::section(&run.lines, "kvmtrace-stderr", &tag).unwrap_or_default();
        if !kvmtrace_err.trim().is_empty() {
            report::write(&dir, "kvmtrace.stderr", &kvmtrace_err)?;
        }
        let rows = report::compare(&hist.by_reason, record.as_ref().map(|r| &r.by_reason));
        let run_time = run_seconds(lines, &tag);
        let reached_end = lines
            .iter()
            .any(|l| l.text.starts_with(&format!("L2| {}", image::END_MARKER)));

        println!(
            "\n== {} {tag} ({}): L2 {} in {run_time:.1} s, {} exits",
            opts.isa.name(),
            workload_label(opts),
            if reached_end {
                "reached its end"
            } else {
                "did NOT reach its end"
            },
            hist.by_reason.values().sum::<u64>()
        );
        print!("{}", report::table(&rows));
        match (&record, &l1.kvmtrace) {
            (Some(rec), _) => {
                let diffs: Vec<&report::Row> =
                    rows.iter().filter(|r| r.kvmtrace != Some(r.hist)).collect();
                // A full per-reason map: the reasons that got in are exact, the
                // others are all in dropped.exit_map_full.
                let full = rec.dropped("exit_map_full");
                let uncounted: u64 = diffs
                    .iter()
                    .filter(|r| r.kvmtrace == Some(0))
                    .map(|r| r.hist)
                    .sum();
                if diffs.is_empty() {
                    println!("  kvmtrace == hist for all {} reasons", rows.len());
                } else if full > 0
                    && diffs.iter().all(|r| r.kvmtrace == Some(0))
                    && uncounted == full
                {
                    println!(
                        "  kvmtrace == hist for the {} reasons it had room for; the other {} reasons' {full} exits are in dropped.exit_map_full",
                        rows.len() - diffs.len(),
                        diffs.len()
                    );
                } else {
                    problems.push(format!(
                        "{tag}: kvmtrace differs from the hist in {} reasons",
                        diffs.len()
                    ));
                }
                println!(
                    "  kvmtrace paging: {}, dropped: {}",
                    rec.paging, rec.dropped
                );
            }
            (None, Some(_)) => {
                let why = kvmtrace_err
                    .lines()
                    .last()
                    .unwrap_or("no output")
                    .to_owned();
                println!("  kvmtrace produced no record: {why}");
                problems.push(format!("{tag}: kvmtrace produced no record ({why})"));
            }
            (None, None) => println!("  (kvmtrace not run: hist only)"),
        }
        if let Some(problem) = guest_readout(opts, &dir, lines, l1)? {
            problems.push(format!("{tag}: {problem}"));
        }
        if reached_end && opts.scenario == Scenario::Modes {
            problems.extend(
                micro_readout(opts, &dir, lines, l1)?
                    .into_iter()
                    .map(|p| format!("{tag}: {p}")),
            );
        }
        let vcpu_rows = per_vcpu(&hist, record.as_ref());
        if let Some(rec) = record.as_ref().filter(|_| whole.is_none()) {
            let vcpu_problems = per_vcpu_problems(&tag, &hist, rec);
            if vcpu_problems.is_empty() {
                println!(
                    "  per (vCPU, reason): kvmtrace == hist, and its vCPU rows sum to its totals"
                );
            }
            problems.extend(vcpu_problems);
        }
        if opts.smp > 1 || opts.micro_vcpus > 1 {
            println!("  per vCPU (hist / kvmtrace):");
            for (vcpu, h, k) in &vcpu_rows {
                println!(
                    "    vcpu {vcpu}: {h} / {}",
                    k.map_or("-".into(), |k| k.to_string())
                );
            }
        }
        if let L2Workload::Micro { .. } = &l1.workload
            && opts.scenario != Scenario::Signal
        {
            let expect = micro_expectations(opts.isa, &micro_runs(l1));
            for (reason, want) in expect {
                let have = hist.by_reason.get(&reason).copied().unwrap_or(0);
                let rec_have = record
                    .as_ref()
                    .map(|r| r.by_reason.get(&reason).copied().unwrap_or(0));
                // With a full per-reason map a reason may be only in the drops.
                let full = record.as_ref().map_or(0, |r| r.dropped("exit_map_full"));
                let ok = have == want && rec_have.is_none_or(|k| k == want || (k == 0 && full > 0));
                println!(
                    "  micro {}: expected {want}, hist {have}{} {}",
                    reason.name(),
                    rec_have.map_or(String::new(), |k| format!(", kvmtrace {k}")),
                    if ok { "ok" } else { "WRONG" }
                );
                if !ok {
                    problems.push(format!("{tag}: micro {} count is off", reason.name()));
                }
            }
        }
        match (opts.scenario, reached_end) {
            (Scenario::Signal, true) => {
                problems.push(format!("{tag}: L2 ended before kvmtrace got its signal"));
            }
            (Scenario::Signal, false) | (_, true) => {}
            (_, false) => problems.push(format!("{tag}: L2 did not reach its end marker")),
        }
        let summary = json!({
            "isa": opts.isa.name(),
            "mode": tag,
            "workload": format!("{:?}", opts.workload).to_lowercase(),
            "smp": opts.smp,
            "micro_vcpus": opts.micro_vcpus,
            "l1_cpus": opts.l1_cpus,
            "l2_reached_end": reached_end,
            "l2_seconds": run_time,
            "l1_steps": run.steps.iter().map(|(n, t)| json!({"step": n, "seconds": t})).collect::<Vec<_>>(),
            "hist_total": hist.by_reason.values().sum::<u64>(),
            "kvmtrace_total": record.as_ref().and_then(|r| r.total),
            "reasons": rows,
            "vcpus": vcpu_rows.iter().map(|(v, h, k)| json!({"vcpu_id": v, "hist": h, "kvmtrace": k})).collect::<Vec<_>>(),
        });
        report::write(
            &dir,
            "summary.json",
            &serde_json::to_string_pretty(&summary)?,
        )?;
        println!("  -> {}", dir.display());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("; "))
    }
}

/// The CPUs L1 has online, from its init's `KVMLAB l1 up ... cpus=N` line.
fn l1_cpus_up(lines: &[emulator::Line]) -> Option<u64> {
    lines
        .iter()
        .find_map(|l| l.text.strip_prefix("KVMLAB l1 up "))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("cpus="))?
        .parse()
        .ok()
}

/// The timing invariants of one record (see [`report::timing_problems`]), printed;
/// what breaks them, as problems of `what`.
fn timing_check(what: &str, record: &str) -> anyhow::Result<Vec<String>> {
    let problems = report::timing_problems(record)?;
    if problems.is_empty() {
        println!("  {what}: timing invariants hold (timed <= count, histogram sums to timed)");
    }
    Ok(problems
        .into_iter()
        .map(|p| format!("{what}: timing: {p}"))
        .collect())
}

/// Host seconds between `run MODE start` and `run MODE end` on the console.
fn run_seconds(lines: &[emulator::Line], tag: &str) -> f64 {
    let start = lines
        .iter()
        .find(|l| l.text.starts_with(&format!("KVMLAB run {tag} start")));
    let end = lines
        .iter()
        .find(|l| l.text.starts_with(&format!("KVMLAB run {tag} end")));
    match (start, end) {
        (Some(s), Some(e)) => e.at - s.at,
        _ => f64::NAN,
    }
}

/// Per-vCPU exit totals: (vcpu_id, hist, kvmtrace).
fn per_vcpu(hist: &report::Hist, record: Option<&report::Record>) -> Vec<(u32, u64, Option<u64>)> {
    let mut out: std::collections::BTreeMap<u32, (u64, Option<u64>)> = Default::default();
    for (&(vcpu, _), &n) in &hist.by_vcpu {
        out.entry(vcpu).or_default().0 += n;
    }
    if let Some(rec) = record {
        for (&(vcpu, _), &n) in &rec.by_vcpu {
            *out.entry(vcpu).or_default().1.get_or_insert(0) += n;
        }
    }
    out.into_iter().map(|(v, (h, k))| (v, h, k)).collect()
}

/// Per-vCPU problems: (vcpu, reason) counts that differ between the hist and kvmtrace,
/// and kvmtrace vCPU rows that do not sum to its per-reason totals.
fn per_vcpu_problems(tag: &str, hist: &report::Hist, rec: &report::Record) -> Vec<String> {
    let mut problems = Vec::new();
    let mut rec_raw: std::collections::BTreeMap<(u32, u64), u64> = Default::default();
    let mut sums = report::Counts::new();
    for (&(vcpu, reason), &n) in &rec.by_vcpu {
        *rec_raw.entry((vcpu, reason.raw())).or_default() += n;
        *sums.entry(reason).or_default() += n;
    }
    let full = rec.dropped("vcpu_map_full");
    if full > 0 {
        // A full per-vCPU map: the rows that got in are exact, the rest is in
        // dropped.vcpu_map_full.
        let exact = rec_raw.iter().all(|(k, n)| hist.by_vcpu.get(k) == Some(n));
        let rows: u64 = rec_raw.values().sum();
        let all: u64 = hist.by_vcpu.values().sum();
        if !exact || rows + full != all {
            problems.push(format!(
                "{tag}: vCPU rows ({rows}) + dropped.vcpu_map_full ({full}) != all exits ({all}), or a row differs from the hist"
            ));
        }
        return problems;
    }
    if rec_raw != hist.by_vcpu {
        let keys: std::collections::BTreeSet<_> =
            rec_raw.keys().chain(hist.by_vcpu.keys()).collect();
        let bad = keys
            .into_iter()
            .filter(|k| rec_raw.get(k) != hist.by_vcpu.get(k))
            .count();
        problems.push(format!(
            "{tag}: {bad} (vCPU, reason) counts differ between kvmtrace and the hist"
        ));
    }
    if sums != rec.by_reason {
        problems.push(format!(
            "{tag}: kvmtrace's vCPU rows do not sum to its per-reason totals"
        ));
    }
    problems
}

/// The micro VMM's exits that are fixed in advance.
/// The micro guest's own counter-leaf reads at the end (CPUID count, I/O count, total).
pub const MICRO_LEAF_READS: u64 = 3;

/// The VMs of the churn workload, from --micro-cpuids C and --micro-outs O: one with
/// 20·C CPUIDs in the background, then (C, O) and (2·C, 2·O) one after the other.
/// Each VM has --micro-vcpus vCPUs.
fn churn_vms(opts: &Options) -> Vec<image::MicroVm> {
    let (c, o) = (opts.micro_cpuids, opts.micro_outs);
    [(20 * c, 0), (c, o), (2 * c, 2 * o)]
        .into_iter()
        .map(|(cpuids, outs)| image::MicroVm {
            cpuids,
            outs,
            vcpus: opts.micro_vcpus,
        })
        .collect()
}

/// Every micro VM one mode runs: the workload's VMs, `l1.vms` times over.
fn micro_runs(l1: &L1) -> Vec<image::MicroVm> {
    match &l1.workload {
        L2Workload::Micro { vms, .. } => {
            let times = usize::from(l1.vms.max(1));
            vms.iter()
                .cycle()
                .take(vms.len() * times)
                .copied()
                .collect()
        }
        L2Workload::Boot { .. } => Vec::new(),
    }
}

/// All the vCPUs of `vms`.
fn micro_vcpus(vms: &[image::MicroVm]) -> u64 {
    vms.iter().map(|v| u64::from(v.vcpus)).sum()
}

/// What each vCPU of `vms` may receive from the counter leaves, with correct modules:
/// a (CPUID count, I/O count) range per vCPU. One vCPU reads its VM's exact exits:
/// its CPUIDs and the query itself, its port writes. With several, a vCPU's read
/// also counts what the others did so far: at least its own, at most all of theirs
/// (each vCPU's CPUIDs and its three queries).
fn micro_leaf_ranges(
    vms: &[image::MicroVm],
) -> Vec<(std::ops::RangeInclusive<u64>, std::ops::RangeInclusive<u64>)> {
    let mut ranges = Vec::new();
    for vm in vms {
        let (c, o, n) = (
            u64::from(vm.cpuids),
            u64::from(vm.outs),
            u64::from(vm.vcpus),
        );
        for _ in 0..vm.vcpus {
            ranges.push(if n == 1 {
                (c + 1..=c + 1, o..=o)
            } else {
                (c + 1..=n * (c + MICRO_LEAF_READS), o..=n * o)
            });
        }
    }
    ranges
}

/// Whether the readout lines fit the vCPUs' ranges one to one: as many lines as
/// vCPUs, and each vCPU's line within its range (a bipartite matching, since lines do
/// not say which VM printed them).
fn micro_leaves_fit(
    received: &[(u64, u64)],
    ranges: &[(std::ops::RangeInclusive<u64>, std::ops::RangeInclusive<u64>)],
) -> bool {
    if received.len() != ranges.len() {
        return false;
    }
    let fits = |line: usize, slot: usize| {
        let ((c, i), (cr, ir)) = (received[line], &ranges[slot]);
        cr.contains(&c) && ir.contains(&i)
    };
    // Kuhn's augmenting paths: owner[slot] is the line that has it.
    fn augment(
        line: usize,
        slots: usize,
        fits: &dyn Fn(usize, usize) -> bool,
        seen: &mut [bool],
        owner: &mut [Option<usize>],
    ) -> bool {
        for slot in 0..slots {
            if seen[slot] || !fits(line, slot) {
                continue;
            }
            seen[slot] = true;
            if owner[slot].is_none_or(|other| augment(other, slots, fits, seen, owner)) {
                owner[slot] = Some(line);
                return true;
            }
        }
        false
    }
    let mut owner = vec![None; ranges.len()];
    (0..received.len()).all(|line| {
        let mut seen = vec![false; ranges.len()];
        augment(line, ranges.len(), &fits, &mut seen, &mut owner)
    })
}

/// The exits of `vms` known in advance, per reason: every vCPU's CPUIDs and its three
/// leaf reads, its port writes and its HLT.
fn micro_expectations(isa: Isa, vms: &[image::MicroVm]) -> Vec<(report::Reason, u64)> {
    let n = micro_vcpus(vms);
    let each = |f: fn(&image::MicroVm) -> u32| -> u64 {
        vms.iter()
            .map(|v| u64::from(v.vcpus) * u64::from(f(v)))
            .sum()
    };
    let cpuids = each(|v| v.cpuids);
    let outs = each(|v| v.outs);
    let r = |reason| report::Reason {
        isa: isa.trace_isa(),
        reason,
        failed_entry: false,
    };
    let (cpuid, io, hlt) = match isa {
        Isa::Intel => (10, 30, 12),
        Isa::Amd => (0x72, 0x7b, 0x78),
    };
    vec![
        (r(cpuid), cpuids + n * MICRO_LEAF_READS),
        (r(io), outs),
        (r(hlt), n),
    ]
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        lab: Options,
    }

    fn parse(args: &[&str]) -> anyhow::Result<Options> {
        Ok(Cli::try_parse_from(std::iter::once("lab").chain(args.iter().copied()))?.lab)
    }

    /// Why `validate` refuses the options `args`.
    fn refused(args: &[&str]) -> anyhow::Result<String> {
        match parse(args)?.validate() {
            Ok(()) => bail!("{args:?} passed validation"),
            Err(e) => Ok(e.to_string()),
        }
    }

    fn vm(cpuids: u32, outs: u32, vcpus: u8) -> image::MicroVm {
        image::MicroVm {
            cpuids,
            outs,
            vcpus,
        }
    }

    fn raw(expect: &[(report::Reason, u64)]) -> Vec<(u64, u64)> {
        expect.iter().map(|(r, n)| (r.reason.into(), *n)).collect()
    }

    #[test]
    fn one_vcpu_expectations_are_unchanged() {
        let e = micro_expectations(Isa::Intel, &[vm(1000, 100, 1)]);
        assert_eq!(raw(&e), [(10, 1003), (30, 100), (12, 1)]);
        let e = micro_expectations(Isa::Amd, &[vm(1000, 100, 1), vm(10, 1, 1)]);
        assert_eq!(raw(&e), [(0x72, 1016), (0x7b, 101), (0x78, 2)]);
    }

    #[test]
    fn expectations_multiply_by_vcpus() {
        let e = micro_expectations(Isa::Amd, &[vm(100_000, 100, 2)]);
        assert_eq!(raw(&e), [(0x72, 200_006), (0x7b, 200), (0x78, 2)]);
        // A churn: VMs of several vCPUs each.
        let e = micro_expectations(Isa::Intel, &[vm(20, 0, 3), vm(1, 2, 3)]);
        assert_eq!(raw(&e), [(10, 3 * 23 + 3 * 4), (30, 6), (12, 6)]);
    }

    #[test]
    fn leaf_ranges_are_exact_for_one_vcpu() {
        let r = micro_leaf_ranges(&[vm(1000, 100, 1)]);
        assert_eq!(r, [(1001..=1001, 100..=100)]);
        assert!(micro_leaves_fit(&[(1001, 100)], &r));
        assert!(!micro_leaves_fit(&[(1000, 100)], &r));
        assert!(!micro_leaves_fit(&[(1001, 100), (1001, 100)], &r));
        assert!(!micro_leaves_fit(&[], &r));
    }

    #[test]
    fn leaf_ranges_of_several_vcpus_bound_what_each_sees() {
        let r = micro_leaf_ranges(&[vm(1000, 100, 2)]);
        assert_eq!(r, [(1001..=2006, 100..=200), (1001..=2006, 100..=200)]);
        // The first vCPU to read sees part of the other's exits, the last all of them.
        assert!(micro_leaves_fit(&[(1500, 150), (2004, 200)], &r));
        assert!(micro_leaves_fit(&[(1001, 100), (1001, 100)], &r));
        // A lost update: less than the vCPU's own CPUIDs and query.
        assert!(!micro_leaves_fit(&[(999, 100), (2004, 200)], &r));
        assert!(!micro_leaves_fit(&[(1500, 201), (2004, 200)], &r));
        // One line per vCPU.
        assert!(!micro_leaves_fit(&[(1500, 150)], &r));
    }

    #[test]
    fn leaves_are_matched_to_vms_one_to_one() {
        // Two VMs; the lines in any order.
        let r = micro_leaf_ranges(&[vm(10, 0, 2), vm(1000, 5, 2)]);
        assert!(micro_leaves_fit(
            &[(1500, 7), (15, 0), (1003, 10), (11, 0)],
            &r
        ));
        // Three lines fit the big VM, one of them only there: no one-to-one fit.
        assert!(!micro_leaves_fit(
            &[(1500, 7), (1003, 10), (1001, 5), (11, 0)],
            &r
        ));
        // The first line fits both VMs; the matching must move it to make room.
        let r = [(1..=100, 0..=0), (1..=10, 0..=0)];
        assert!(micro_leaves_fit(&[(5, 0), (50, 0)], &r));
    }

    #[test]
    fn micro_runs_repeat_the_vms() {
        let l1 = L1 {
            busybox: PathBuf::new(),
            init: PathBuf::new(),
            modules: Vec::new(),
            paging: "npt",
            modes: vec![1],
            workload: L2Workload::Micro {
                binary: PathBuf::new(),
                vms: vec![vm(1, 2, 2), vm(3, 4, 2)],
                overlap: false,
            },
            kvmtrace: None,
            record_args: String::new(),
            run_timeout: 1,
            vms: 2,
            scenario: "modes",
            signals: String::new(),
            signal_after: 0,
        };
        let runs = micro_runs(&l1);
        assert_eq!(runs, [vm(1, 2, 2), vm(3, 4, 2), vm(1, 2, 2), vm(3, 4, 2)]);
        assert_eq!(micro_vcpus(&runs) * MICRO_LEAF_READS, 24);
    }

    #[test]
    fn vcpus_and_l1_cpus_are_checked() -> anyhow::Result<()> {
        let o = parse(&["--isa", "amd", "--workload", "micro"])?;
        assert_eq!((o.micro_vcpus, o.l1_cpus), (1, 1));
        o.validate()?;
        parse(&[
            "--isa",
            "amd",
            "--workload",
            "micro",
            "--micro-vcpus",
            "8",
            "--l1-cpus",
            "2",
        ])?
        .validate()?;
        for bad in [
            ["--micro-vcpus", "9"],
            ["--micro-vcpus", "0"],
            ["--l1-cpus", "3"],
            ["--l1-cpus", "0"],
        ] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
        let err = refused(&["--isa", "intel", "--l1-cpus", "2"])?;
        assert!(err.contains("--isa amd") && err.contains("Bochs"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
        // Bochs with one L1 CPU still runs micro VMs of several vCPUs.
        parse(&[
            "--isa",
            "intel",
            "--workload",
            "micro",
            "--micro-vcpus",
            "2",
        ])?
        .validate()?;
        let err = refused(&["--workload", "boot", "--micro-vcpus", "2"])?;
        assert!(err.contains("--smp"), "{err}");
        parse(&["--workload", "churn", "--micro-vcpus", "2"])?.validate()?;
        Ok(())
    }

    #[test]
    fn l1_says_how_many_cpus_it_has() {
        let line = |text: &str| emulator::Line {
            at: 0.0,
            text: text.to_owned(),
        };
        let lines = [
            line("KVMLAB step l1-modules 120"),
            line("KVMLAB l1 up uptime=1.5 kernel=6.1.0-41-cloud-amd64 cpus=2 cpu= AMD EPYC"),
        ];
        assert_eq!(l1_cpus_up(&lines), Some(2));
        assert_eq!(l1_cpus_up(&lines[..1]), None);
    }

    #[test]
    fn results_directories_name_vcpus_and_l1_cpus() -> anyhow::Result<()> {
        let opts = |args: &str| parse(&args.split_whitespace().collect::<Vec<_>>());
        for (args, mode, want) in [
            ("--workload micro", 1, "ept1.micro"),
            (
                "--isa amd --workload micro --micro-vcpus 2",
                0,
                "npt0.micro.vcpus2",
            ),
            (
                "--isa amd --workload churn --micro-vcpus 2 --l1-cpus 2",
                1,
                "npt1.churn.vcpus2.l1cpus2",
            ),
            ("--isa amd --smp 2 --l1-cpus 2", 1, "npt1.smp2.l1cpus2"),
            ("--isa amd --micro-vcpus 2 --l1-cpus 2 --out x", 1, "npt1"),
        ] {
            assert_eq!(mode_dir_name(&opts(args)?, mode), want, "{args}");
        }
        for (args, want) in [
            ("--workload micro", "micro"),
            (
                "--workload micro --micro-vcpus 2 --l1-cpus 2",
                "micro, 2 vCPUs, L1 2 CPUs",
            ),
            ("--smp 2", "boot, 2 vCPUs"),
        ] {
            assert_eq!(workload_label(&opts(args)?), want, "{args}");
        }
        Ok(())
    }
}
