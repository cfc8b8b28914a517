//! `cargo xtask lab`'s options, and the names they give results.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, ValueEnum};

use super::reason::{ISA_SVM, ISA_VMX};
use crate::kmod::KernelLine;

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
    /// --vms micro VMs at once, VM i running 100 + i CPUIDs (so no two can swap rows
    /// unnoticed); each VM's row must equal the kernel's count for its threads.
    Crowd,
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
    /// `kvmtrace export` serves L1's metrics across all modes, forwarded to the host's
    /// 127.0.0.1 only, where a real Prometheus scrapes them every second (AMD lab:
    /// QEMU's user networking, `restrict=on`).
    Export,
}

/// `--scenario export`: the port `kvmtrace export` listens on in L1, and how long an
/// ended VM's series stay (each mode waits that long after its VM ends, and checks
/// they are gone).
pub const EXPORT_PORT: u16 = 10470;

/// How kvmtrace gets into L1 (`--install`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Install {
    /// The static binary at /bin/kvmtrace, run as root.
    Bin,
    /// The .deb of `cargo xtask dist`, installed with `dpkg -i`: kvmtrace runs from
    /// /usr/bin as an unprivileged user (uid 65534) with exactly the capabilities of
    /// the exporter's unit (dist/kvmtrace-export.service), after failing, with each
    /// of them missing in turn, with one line that names it.
    Deb,
}
pub const EXPORT_RETENTION_SECS: u64 = 4;
/// The same for a crowd: long enough that every VM's final values are still served
/// when the crowd has ended (L1's scrapes of hundreds of VMs can take longer than
/// Prometheus's 1 s timeout, so a VM's last values may come in a later scrape).
pub const EXPORT_RETENTION_CROWD_SECS: u64 = 60;

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Self::Modes => "modes",
            Self::Reload => "reload",
            Self::Signal => "signal",
            Self::Export => "export",
        }
    }
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
    pub fn variant(self) -> Option<crate::kmod::Variant> {
        match self {
            Self::Stock => None,
            Self::Build(v) => Some(v),
        }
    }

    /// Modules whose counters must reconcile exactly: the series, and the variant that
    /// only answers elsewhere.
    pub fn correct(self) -> bool {
        matches!(
            self,
            Self::Build(crate::kmod::Variant::Good | crate::kmod::Variant::AnswersInEmulate)
        )
    }

    /// `stock`, `patched`, or a variant's name (`cargo xtask kmod --variant`).
    pub fn parse(text: &str) -> Result<Self, String> {
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
    /// L1's kernel: Debian's cloud kernel of this line, with its own kvm modules (and
    /// with --modules patched, the series built for it). L2 boots the same 6.1 guest
    /// whatever L1 runs, so only the host changes.
    #[arg(long, value_enum, default_value_t = KernelLine::V6_1)]
    pub kernel: KernelLine,
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
    /// Extra arguments for `kvmtrace record` inside L1. With `--detail` and `--rip` the
    /// lab also arms the kernel's triggers keyed the same way and fails unless every
    /// detail and RIP row equals them. Default: `--per-vcpu --snapshots --detail --rip
    /// 5`; with --kernel 5.10, which has no hist triggers to check them against,
    /// `--per-vcpu --snapshots`.
    #[arg(long, allow_hyphen_values = true)]
    pub record_args: Option<String>,
    /// Which kvm modules L1 loads: the patched ones (built by `cargo xtask kmod`),
    /// Debian's stock ones, or a TEST-ONLY variant of the patch (kernel/README.md).
    #[arg(long, value_parser = Modules::parse, default_value = "patched")]
    pub modules: Modules,
    /// Short for `--modules stock`: Debian's unpatched kvm modules.
    #[arg(long, conflicts_with = "modules")]
    pub stock: bool,
    /// How many VMs run one after the other in each mode (1..=4; each must start from
    /// zero), or with --workload crowd, at once (1..=4096).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub vms: u16,
    /// --workload crowd: at most this many VMs at once, in waves (each wave's VMs all
    /// start together, and the next wave once they have all ended), so that rows are
    /// freed and taken again. Default: all --vms at once.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub at_once: Option<u16>,
    /// Where the results go (default: target/lab/<isa>, with .micro/.smpN suffixes).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// micro workload: how many CPUID instructions the guest runs.
    #[arg(long, default_value_t = 1000)]
    pub micro_cpuids: u32,
    /// micro workload: how many port writes the guest does.
    #[arg(long, default_value_t = 100)]
    pub micro_outs: u32,
    /// Also run Debian's `perf kvm stat record -a` (installed on this host with apt,
    /// copied into L1) beside kvmtrace in each mode, and keep its `report
    /// --event=ioport` and `--event=vmexit` as perf-ioport.txt and perf-vmexit.txt.
    #[arg(long)]
    pub perf: bool,
    /// micro workload: how many RDMSR + WRMSR round trips (of EFER) the guest does.
    #[arg(long, default_value_t = 0)]
    pub micro_msrs: u32,
    /// micro and churn workloads: vCPUs of each micro VM, one thread each, all running
    /// the CPUIDs and port writes at the same time (with --l1-cpus 2, truly in
    /// parallel).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=MAX_MICRO_VCPUS))]
    pub micro_vcpus: u8,
    /// CPUs of the emulated host L1. More than 1 only with --isa amd: QEMU then runs
    /// L1's CPUs in threads of their own (-accel tcg,thread=multi), truly in parallel,
    /// except with --workload crowd, whose hundreds of nested VMs QEMU 7.2's
    /// multi-threaded TCG corrupts: its CPUs take turns in one thread. Bochs runs all
    /// its CPUs in one thread, one instruction at a time, so it cannot show races:
    /// --isa intel takes 1.
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
    /// How kvmtrace gets into L1: its static binary, run as root, or the .deb of
    /// `cargo xtask dist`, installed and run as the package's service runs it.
    #[arg(long, value_enum, default_value_t = Install::Bin)]
    pub install: Install,
    /// --scenario signal: the signal each mode's record gets, in mode order.
    #[arg(long, value_delimiter = ',', default_values_t = ["INT".to_owned(), "TERM".to_owned()],
          value_parser = ["INT", "TERM"])]
    pub signals: Vec<String>,
    /// --scenario signal: L1 seconds after kvmtrace attached.
    #[arg(long, default_value_t = 3)]
    pub signal_after: u32,
}

/// VMs that may run one after the other (`--vms` without `--workload crowd`).
const MAX_VMS_IN_TURN: u16 = 4;

/// vCPUs a micro VM may have (lab/micro.c's MAX_VCPUS).
const MAX_MICRO_VCPUS: i64 = 8;

/// `kvmtrace record`'s arguments when `--record-args` is not given.
const DEFAULT_RECORD_ARGS: &str = "--per-vcpu --snapshots --detail --rip 5";
/// The same on a kernel whose hist triggers cannot check `--detail` and `--rip`
/// (see [`KernelLine::has_hist_triggers`]).
const DEFAULT_RECORD_ARGS_UNKEYED: &str = "--per-vcpu --snapshots";

impl Options {
    /// The modules to load, with `--stock` applied.
    pub fn module_set(&self) -> Modules {
        if self.stock {
            Modules::Stock
        } else {
            self.modules
        }
    }

    /// `--record-args`, or the default that fits `--kernel`.
    pub fn record_args(&self) -> &str {
        match &self.record_args {
            Some(given) => given,
            // The crowd checks the default record's rows per VM.
            None if self.workload == Workload::Crowd => "",
            None if self.kernel.has_hist_triggers() => DEFAULT_RECORD_ARGS,
            None => DEFAULT_RECORD_ARGS_UNKEYED,
        }
    }

    /// `kvmtrace record`'s arguments inside L1. A sweep makes 131 078 counter reads:
    /// their snapshots would be tens of MB of JSON on a serial console, so it records
    /// without.
    pub fn l1_record_args(&self) -> String {
        let args = self.record_args().split_whitespace();
        if self.workload == Workload::Sweep {
            args.filter(|a| *a != "--snapshots")
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            args.collect::<Vec<_>>().join(" ")
        }
    }

    /// The one kernel warning L1 may log (6.12 under Bochs), if any.
    pub fn allowed_warning(&self) -> Option<&'static str> {
        (self.isa == Isa::Intel && self.kernel == KernelLine::V6_12)
            .then_some(super::console::BOCHS_TOPOLOGY_WARNING)
    }

    /// What clap cannot check alone: combinations of options.
    pub fn validate(&self) -> anyhow::Result<()> {
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
        if self.install == Install::Deb && self.kvmtrace == Kvmtrace::Off {
            bail!("--install deb installs kvmtrace: it cannot go with --kvmtrace off");
        }
        if self.scenario == Scenario::Export && self.isa != Isa::Amd {
            bail!(
                "--scenario export needs --isa amd: L1's network is QEMU's (Bochs has none here)"
            );
        }
        let keyed = self
            .record_args()
            .split_whitespace()
            .any(|a| ["--detail", "--rip"].contains(&a) || a.starts_with("--rip="));
        if !self.kernel.has_hist_triggers() && keyed {
            bail!(
                "--kernel {} has no hist triggers to check --detail and --rip against: \
                 give --record-args without them (e.g. --record-args '{DEFAULT_RECORD_ARGS_UNKEYED}')",
                self.kernel
            );
        }
        if self.micro_vcpus > 1
            && !matches!(
                self.workload,
                Workload::Micro | Workload::Churn | Workload::Crowd
            )
        {
            bail!(
                "--micro-vcpus is for the micro, churn and crowd workloads (the boot VM takes --smp)"
            );
        }
        if self.scenario == Scenario::Export
            && self.workload == Workload::Crowd
            && self.modes.len() != 1
        {
            bail!(
                "--scenario export with --workload crowd takes one mode (e.g. --modes 1): the crowd's VMs are told apart by their counts, not by their mode"
            );
        }
        if let Some(k) = self.at_once {
            if self.workload != Workload::Crowd {
                bail!("--at-once is for --workload crowd (the VMs of one wave run at once)");
            }
            if k > self.vms {
                bail!(
                    "--at-once {k} is more than --vms {}: give at most --vms",
                    self.vms
                );
            }
        }
        if self.workload != Workload::Crowd && self.vms > MAX_VMS_IN_TURN {
            bail!(
                "--vms {} runs that many VMs one after the other: at most {MAX_VMS_IN_TURN} (--workload crowd runs up to 4096 at once)",
                self.vms
            );
        }
        Ok(())
    }
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Intel => "intel",
            Isa::Amd => "amd",
        }
    }

    pub fn paging(self) -> &'static str {
        match self {
            Isa::Intel => "ept",
            Isa::Amd => "npt",
        }
    }

    pub fn trace_isa(self) -> u32 {
        match self {
            Isa::Intel => ISA_VMX,
            Isa::Amd => ISA_SVM,
        }
    }

    /// kvm modules (paths under lib/modules/<abi>/kernel) in load order, vendor last.
    pub fn modules(self) -> &'static [&'static str] {
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

    /// L1's network driver for `--scenario export` (virtio-net over PCI), in load
    /// order: the cloud kernel builds them all as modules.
    pub fn net_modules(self) -> &'static [&'static str] {
        &[
            "drivers/virtio/virtio_ring.ko",
            "drivers/virtio/virtio.ko",
            "drivers/virtio/virtio_pci_modern_dev.ko",
            "drivers/virtio/virtio_pci_legacy_dev.ko",
            "drivers/virtio/virtio_pci.ko",
            "net/core/failover.ko",
            "drivers/net/net_failover.ko",
            "drivers/net/virtio_net.ko",
        ]
    }

    pub fn host_packages(self) -> &'static [&'static str] {
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
                "xz-utils",
            ],
            Isa::Amd => &["gcc", "libc6-dev", "xz-utils"],
        }
    }
}

/// The results directory of one mode: `ept1`, `npt0.micro`, `ept1.smp2`,
/// `npt1.micro.vcpus2.l1cpus2`, ... (the bare tag with an explicit --out).
pub fn mode_dir_name(opts: &Options, mode: u8) -> String {
    let mut name = format!("{}{mode}", opts.isa.paging());
    if opts.out.is_some() {
        return name;
    }
    match opts.workload {
        Workload::Micro | Workload::Churn | Workload::Crowd => {
            name.push_str(match opts.workload {
                Workload::Micro => ".micro",
                Workload::Churn => ".churn",
                _ => ".crowd",
            });
            if opts.workload == Workload::Crowd {
                name.push_str(&format!("{}", opts.vms));
                if let Some(k) = opts.at_once.filter(|&k| k < opts.vms) {
                    name.push_str(&format!(".waves{k}"));
                }
            }
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
    if opts.kernel != KernelLine::V6_1 {
        name.push_str(&format!(".linux{}", opts.kernel));
    }
    name
}

/// The workload's label on the console: `micro`, `boot, 2 vCPUs`, `micro, 2 vCPUs,
/// L1 2 CPUs`, ...
pub fn workload_label(opts: &Options) -> String {
    let mut label = format!("{:?}", opts.workload).to_lowercase();
    let vcpus = match opts.workload {
        Workload::Boot | Workload::Sweep => opts.smp,
        Workload::Micro | Workload::Churn | Workload::Crowd => opts.micro_vcpus,
    };
    if vcpus > 1 {
        label.push_str(&format!(", {vcpus} vCPUs"));
    }
    if opts.l1_cpus > 1 {
        label.push_str(&format!(", L1 {} CPUs", opts.l1_cpus));
    }
    label
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
    fn kernel_lines_and_what_they_allow() -> anyhow::Result<()> {
        assert_eq!(parse(&[])?.kernel, KernelLine::V6_1);
        assert!(parse(&["--kernel", "4.19"]).is_err());
        // 5.10 has no hist triggers to check --detail and --rip against: as typed, it
        // records without them; given them, it refuses.
        let o = parse(&["--kernel", "5.10"])?;
        o.validate()?;
        assert_eq!(o.l1_record_args(), "--per-vcpu --snapshots");
        let err = refused(&["--kernel", "5.10", "--record-args", "--per-vcpu --rip 3"])?;
        assert!(
            err.contains("--record-args") && !err.contains('\n'),
            "{err}"
        );
        let o = parse(&["--kernel", "5.10", "--record-args", "--snapshots"])?;
        o.validate()?;
        assert_eq!(o.l1_record_args(), "--snapshots");
        for line in ["6.1", "6.12"] {
            assert_eq!(
                parse(&["--kernel", line])?.l1_record_args(),
                "--per-vcpu --snapshots --detail --rip 5",
                "{line}"
            );
        }
        assert_eq!(
            parse(&["--workload", "sweep"])?.l1_record_args(),
            "--per-vcpu --detail --rip 5",
            "a sweep records without snapshots"
        );
        let o = parse(&["--kernel", "6.12", "--isa", "intel"])?;
        assert!(o.allowed_warning().is_some());
        assert!(
            parse(&["--kernel", "6.12", "--isa", "amd"])?
                .allowed_warning()
                .is_none()
        );
        assert!(parse(&["--isa", "intel"])?.allowed_warning().is_none());
        Ok(())
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
            ("--kernel 6.12 --workload micro", 0, "ept0.micro.linux6.12"),
            ("--kernel 6.1", 1, "ept1"),
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
