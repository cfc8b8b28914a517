//! What `cargo xtask kmod` builds: the options, the kernel line, the flavour and the
//! variant of the series.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use clap::{Args, ValueEnum};

use crate::apt::Apt;

#[derive(Args, Debug)]
pub struct Options {
    /// Debian kernel line to build for.
    #[arg(long, value_enum, default_value_t = KernelLine::V6_1)]
    pub kernel: KernelLine,
    /// Kernel flavour whose headers the modules are built against.
    #[arg(long, value_enum, default_value_t = Flavour::Cloud)]
    pub flavour: Flavour,
    /// The series, or one of its variants in kernel/variants/ applied on top of it:
    /// TEST-ONLY ones (all deliberately wrong but answers-in-emulate) or the BENCH-ONLY
    /// no-cycles; or unpatched, the same build without the series.
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

impl Options {
    /// Where the builds of this kernel line and flavour are kept:
    /// `target/kmod/<kernel>-<flavour>` in the checkout `root`.
    pub fn work_dir(&self, root: &Path) -> PathBuf {
        root.join("target/kmod")
            .join(format!("{}-{}", self.kernel, self.flavour))
    }
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
    /// Debian 11's kernel (bullseye, through a private apt configuration in
    /// target/apt/bullseye; built with bookworm's gcc-12).
    #[value(name = "5.10")]
    V5_10,
    /// Debian 12's own kernel, the lab's.
    #[value(name = "6.1")]
    V6_1,
    /// Debian 12's newer kernel line (bookworm-security).
    #[value(name = "6.12")]
    V6_12,
}

impl KernelLine {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V5_10 => "5.10",
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
        }
    }

    /// The metapackage that depends on the current image of this line and flavour
    /// (in the line's own Debian release, see [`KernelLine::apt`]).
    pub fn image_metapackage(self, flavour: Flavour) -> String {
        match self {
            Self::V5_10 | Self::V6_1 => format!("linux-image-{}", flavour.arch_suffix()),
            Self::V6_12 => format!("linux-image-6.12-{}", flavour.arch_suffix()),
        }
    }

    /// Where this line's packages come from: the host's apt sources (bookworm and
    /// bookworm-security) for 6.1 and 6.12, a private configuration under
    /// `target/apt/` for bullseye's 5.10. Never used to install anything.
    pub fn apt(self, root: &Path) -> anyhow::Result<Apt> {
        match self {
            Self::V5_10 => Apt::bullseye(root),
            Self::V6_1 | Self::V6_12 => Ok(Apt::host(root)),
        }
    }

    /// The compiler to build with instead of the one the headers name, when that one
    /// is not in bookworm: bullseye's headers ask for gcc-10, and bookworm's gcc-12
    /// builds their modules without a warning.
    pub fn compiler_override(self) -> Option<&'static str> {
        match self {
            Self::V5_10 => Some("gcc-12"),
            Self::V6_1 | Self::V6_12 => None,
        }
    }

    /// Whether Debian builds this line with `CONFIG_HIST_TRIGGERS` (5.10 is built
    /// without: the lab then counts the trace buffer's `kvm_exit` records instead).
    pub fn has_hist_triggers(self) -> bool {
        match self {
            Self::V5_10 => false,
            Self::V6_1 | Self::V6_12 => true,
        }
    }

    pub fn source_package(self) -> String {
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
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cloud => "cloud",
            Self::Generic => "generic",
        }
    }

    /// How Debian's package and release names end for this flavour.
    pub fn arch_suffix(self) -> &'static str {
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
    /// BENCH ONLY (6.1): the series without its cycles: no TSC read at VM-exit or
    /// VM-entry, only the count (`cargo xtask bench` tells the count's cost from the
    /// cycles').
    NoCycles,
    /// No patch at all: Debian's source built the same way, the baseline that tells
    /// the series' own cost from the out-of-tree build's (`cargo xtask bench`).
    Unpatched,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
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
            Self::NoCycles => "no-cycles",
            Self::Unpatched => "unpatched",
        }
    }

    /// The TEST-ONLY variants in kernel/variants/, each applied on top of the series:
    /// every variant there but the BENCH-ONLY ones ([`Variant::BENCH_ONLY`]).
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

    /// Variants that only the bench builds, for the lines that have them.
    pub const BENCH_ONLY: [Variant; 1] = [Self::NoCycles];
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
