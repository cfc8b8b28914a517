//! Names of VMX basic exit reasons (Intel SDM Vol. 3D, Appendix C) and SVM exit codes
//! (AMD APM Vol. 2, Appendix C), including the ones KVM does not handle.
//!
//! Names follow the kernel's `EXIT_REASON_*` / `SVM_EXIT_*` spellings without the
//! prefix, so they match what `perf kvm stat` and the `kvm:kvm_exit` format print.
//! A value missing from the tables is shown as `UNKNOWN(n)`, never dropped.

use std::{borrow::Cow, fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use tracer_common::isa;

/// The virtualization extension an exit came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isa {
    /// Intel VMX.
    Vmx,
    /// AMD SVM.
    Svm,
    /// An `isa` value the kernel does not define.
    #[serde(untagged)]
    Other(u32),
}

impl Isa {
    /// From the `isa` field of `kvm:kvm_exit`.
    pub fn from_raw(raw: u32) -> Self {
        match raw {
            isa::VMX => Self::Vmx,
            isa::SVM => Self::Svm,
            other => Self::Other(other),
        }
    }

    /// The `isa` field value.
    pub fn raw(self) -> u32 {
        match self {
            Self::Vmx => isa::VMX,
            Self::Svm => isa::SVM,
            Self::Other(raw) => raw,
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vmx => f.write_str("vmx"),
            Self::Svm => f.write_str("svm"),
            Self::Other(raw) => write!(f, "isa{raw}"),
        }
    }
}

impl FromStr for Isa {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "vmx" | "intel" => Ok(Self::Vmx),
            "svm" | "amd" => Ok(Self::Svm),
            _ => Err(format!("unknown isa '{s}': use vmx (intel) or svm (amd)")),
        }
    }
}

/// VMX basic exit reasons, SDM Vol. 3D Table C-1. Numbers 35, 38 and 42 are unused.
const VMX: &[(u32, &str)] = &[
    (0, "EXCEPTION_NMI"),
    (1, "EXTERNAL_INTERRUPT"),
    (2, "TRIPLE_FAULT"),
    (3, "INIT_SIGNAL"),
    (4, "SIPI_SIGNAL"),
    (5, "IO_SMI"),
    (6, "OTHER_SMI"),
    (7, "INTERRUPT_WINDOW"),
    (8, "NMI_WINDOW"),
    (9, "TASK_SWITCH"),
    (10, "CPUID"),
    (11, "GETSEC"),
    (12, "HLT"),
    (13, "INVD"),
    (14, "INVLPG"),
    (15, "RDPMC"),
    (16, "RDTSC"),
    (17, "RSM"),
    (18, "VMCALL"),
    (19, "VMCLEAR"),
    (20, "VMLAUNCH"),
    (21, "VMPTRLD"),
    (22, "VMPTRST"),
    (23, "VMREAD"),
    (24, "VMRESUME"),
    (25, "VMWRITE"),
    (26, "VMOFF"),
    (27, "VMON"),
    (28, "CR_ACCESS"),
    (29, "DR_ACCESS"),
    (30, "IO_INSTRUCTION"),
    (31, "MSR_READ"),
    (32, "MSR_WRITE"),
    (33, "INVALID_STATE"),
    (34, "MSR_LOAD_FAIL"),
    (36, "MWAIT_INSTRUCTION"),
    (37, "MONITOR_TRAP_FLAG"),
    (39, "MONITOR_INSTRUCTION"),
    (40, "PAUSE_INSTRUCTION"),
    (41, "MCE_DURING_VMENTRY"),
    (43, "TPR_BELOW_THRESHOLD"),
    (44, "APIC_ACCESS"),
    (45, "EOI_INDUCED"),
    (46, "GDTR_IDTR"),
    (47, "LDTR_TR"),
    (48, "EPT_VIOLATION"),
    (49, "EPT_MISCONFIG"),
    (50, "INVEPT"),
    (51, "RDTSCP"),
    (52, "PREEMPTION_TIMER"),
    (53, "INVVPID"),
    (54, "WBINVD"),
    (55, "XSETBV"),
    (56, "APIC_WRITE"),
    (57, "RDRAND"),
    (58, "INVPCID"),
    (59, "VMFUNC"),
    (60, "ENCLS"),
    (61, "RDSEED"),
    (62, "PML_FULL"),
    (63, "XSAVES"),
    (64, "XRSTORS"),
    (65, "PCONFIG"),
    (66, "SPP_EVENT"),
    (67, "UMWAIT"),
    (68, "TPAUSE"),
    (69, "LOADIWKEY"),
    (70, "ENCLV"),
    (71, "SGX_CONFLICT"),
    (72, "ENQCMD_PASID_FAIL"),
    (73, "ENQCMDS_PASID_FAIL"),
    (74, "BUS_LOCK"),
    (75, "NOTIFY"),
    (76, "SEAMCALL"),
    (77, "TDCALL"),
    (78, "RDMSRLIST"),
    (79, "WRMSRLIST"),
    (80, "URDMSR"),
    (81, "UWRMSR"),
    (84, "MSR_READ_IMM"),
    (85, "MSR_WRITE_IMM"),
];

/// SVM exit codes that are not part of a numbered range (APM Vol. 2, Table C-1, and
/// the GHCB's software-defined VMGEXIT codes the kernel traces).
const SVM: &[(u32, &str)] = &[
    (0x60, "INTR"),
    (0x61, "NMI"),
    (0x62, "SMI"),
    (0x63, "INIT"),
    (0x64, "VINTR"),
    (0x65, "CR0_SEL_WRITE"),
    (0x66, "IDTR_READ"),
    (0x67, "GDTR_READ"),
    (0x68, "LDTR_READ"),
    (0x69, "TR_READ"),
    (0x6a, "IDTR_WRITE"),
    (0x6b, "GDTR_WRITE"),
    (0x6c, "LDTR_WRITE"),
    (0x6d, "TR_WRITE"),
    (0x6e, "RDTSC"),
    (0x6f, "RDPMC"),
    (0x70, "PUSHF"),
    (0x71, "POPF"),
    (0x72, "CPUID"),
    (0x73, "RSM"),
    (0x74, "IRET"),
    (0x75, "SWINT"),
    (0x76, "INVD"),
    (0x77, "PAUSE"),
    (0x78, "HLT"),
    (0x79, "INVLPG"),
    (0x7a, "INVLPGA"),
    (0x7b, "IOIO"),
    (0x7c, "MSR"),
    (0x7d, "TASK_SWITCH"),
    (0x7e, "FERR_FREEZE"),
    (0x7f, "SHUTDOWN"),
    (0x80, "VMRUN"),
    (0x81, "VMMCALL"),
    (0x82, "VMLOAD"),
    (0x83, "VMSAVE"),
    (0x84, "STGI"),
    (0x85, "CLGI"),
    (0x86, "SKINIT"),
    (0x87, "RDTSCP"),
    (0x88, "ICEBP"),
    (0x89, "WBINVD"),
    (0x8a, "MONITOR"),
    (0x8b, "MWAIT"),
    (0x8c, "MWAIT_COND"),
    (0x8d, "XSETBV"),
    (0x8e, "RDPRU"),
    (0x8f, "EFER_WRITE_TRAP"),
    (0xa0, "INVLPGB"),
    (0xa1, "INVLPGB_ILLEGAL"),
    (0xa2, "INVPCID"),
    (0xa3, "MCOMMIT"),
    (0xa4, "TLBSYNC"),
    (0xa5, "BUS_LOCK"),
    (0xa6, "IDLE_HLT"),
    (0x400, "NPF"),
    (0x401, "AVIC_INCOMPLETE_IPI"),
    (0x402, "AVIC_UNACCELERATED_ACCESS"),
    (0x403, "VMGEXIT"),
    (0x8000_0001, "VMGEXIT_MMIO_READ"),
    (0x8000_0002, "VMGEXIT_MMIO_WRITE"),
    (0x8000_0003, "VMGEXIT_NMI_COMPLETE"),
    (0x8000_0004, "VMGEXIT_AP_HLT_LOOP"),
    (0x8000_0005, "VMGEXIT_AP_JUMP_TABLE"),
    (0x8000_0010, "VMGEXIT_PSC"),
    (0x8000_0011, "VMGEXIT_GUEST_REQUEST"),
    (0x8000_0012, "VMGEXIT_EXT_GUEST_REQUEST"),
    (0x8000_0013, "VMGEXIT_AP_CREATION"),
    (0x8000_fffd, "VMGEXIT_HV_FEATURES"),
    (0x8000_fffe, "VMGEXIT_TERM_REQUEST"),
    (0x8000_ffff, "VMGEXIT_UNSUPPORTED"),
    (0xffff_ffff, "INVALID"),
];

/// Exception mnemonics by vector, for the SVM 0x40..=0x5f range.
const EXCEPTIONS: [&str; 32] = [
    "DE", "DB", "NMI", "BP", "OF", "BR", "UD", "NM", "DF", "09", "TS", "NP", "SS", "GP", "PF",
    "15", "MF", "AC", "MC", "XM", "VE", "CP", "22", "23", "24", "25", "26", "27", "HV", "VC", "SX",
    "31",
];

fn lookup(table: &[(u32, &'static str)], reason: u32) -> Option<&'static str> {
    table
        .binary_search_by_key(&reason, |&(n, _)| n)
        .ok()
        .map(|i| table[i].1)
}

/// The name of an SVM code from one of the numbered ranges (CR/DR accesses,
/// exceptions, CR write traps).
fn svm_range_name(code: u32) -> Option<String> {
    let n = code & 0xf;
    match code {
        0x00..=0x0f => Some(format!("READ_CR{n}")),
        0x10..=0x1f => Some(format!("WRITE_CR{n}")),
        0x20..=0x2f => Some(format!("READ_DR{n}")),
        0x30..=0x3f => Some(format!("WRITE_DR{n}")),
        0x40..=0x5f => Some(format!("EXCP_{}", EXCEPTIONS[(code - 0x40) as usize])),
        0x90..=0x9f => Some(format!("CR{n}_WRITE_TRAP")),
        _ => None,
    }
}

/// The name of `reason` for `isa`, or `None` when no specification defines it.
pub fn known_name(isa: Isa, reason: u32) -> Option<Cow<'static, str>> {
    match isa {
        Isa::Vmx => lookup(VMX, reason).map(Cow::Borrowed),
        Isa::Svm => lookup(SVM, reason)
            .map(Cow::Borrowed)
            .or_else(|| svm_range_name(reason).map(Cow::Owned)),
        Isa::Other(_) => None,
    }
}

/// The name of `reason` for `isa`; `UNKNOWN(n)` when no specification defines it.
pub fn name(isa: Isa, reason: u32) -> Cow<'static, str> {
    known_name(isa, reason).unwrap_or_else(|| Cow::Owned(format!("UNKNOWN({reason})")))
}

/// Every defined (reason, name) of `isa`, in numeric order.
pub fn all(isa: Isa) -> Vec<(u32, Cow<'static, str>)> {
    match isa {
        Isa::Vmx => VMX.iter().map(|&(n, s)| (n, Cow::Borrowed(s))).collect(),
        Isa::Svm => {
            let ranges = (0x00..=0x5f)
                .chain(0x90..=0x9f)
                .filter_map(|n| svm_range_name(n).map(|s| (n, Cow::Owned(s))));
            let mut all: Vec<_> = ranges
                .chain(SVM.iter().map(|&(n, s)| (n, Cow::Borrowed(s))))
                .collect();
            all.sort_by_key(|&(n, _)| n);
            all
        }
        Isa::Other(_) => Vec::new(),
    }
}

/// Parses a reason given by a user: a number (decimal or 0x hex) or a name of `isa`
/// (case-insensitive).
pub fn parse(isa: Isa, text: &str) -> Result<u32, String> {
    let t = text.trim();
    let number = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    };
    if let Some(n) = number {
        return Ok(n);
    }
    all(isa)
        .into_iter()
        .find(|(_, name)| name.eq_ignore_ascii_case(t))
        .map(|(n, _)| n)
        .ok_or_else(|| {
            format!("'{text}' is not a {isa} exit reason: give a number or a name from `kvmtrace reasons --isa {isa}`")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_sorted_and_unique() {
        for table in [VMX, SVM] {
            assert!(
                table.windows(2).all(|w| w[0].0 < w[1].0),
                "table not sorted"
            );
        }
        for isa in [Isa::Vmx, Isa::Svm] {
            let all = all(isa);
            assert!(
                all.windows(2).all(|w| w[0].0 < w[1].0),
                "{isa} has duplicates"
            );
        }
    }

    /// Spot checks against arch/x86/include/uapi/asm/vmx.h (Linux 6.1).
    #[test]
    fn vmx_matches_uapi_header() {
        for (n, s) in [
            (0, "EXCEPTION_NMI"),
            (10, "CPUID"),
            (12, "HLT"),
            (28, "CR_ACCESS"),
            (30, "IO_INSTRUCTION"),
            (32, "MSR_WRITE"),
            (48, "EPT_VIOLATION"),
            (49, "EPT_MISCONFIG"),
            (52, "PREEMPTION_TIMER"),
            (58, "INVPCID"),
            (62, "PML_FULL"),
            (74, "BUS_LOCK"),
            (75, "NOTIFY"),
        ] {
            assert_eq!(name(Isa::Vmx, n), s, "VMX reason {n}");
        }
        // Defined by the SDM, not handled by KVM: still named.
        assert_eq!(name(Isa::Vmx, 11), "GETSEC");
        assert_eq!(name(Isa::Vmx, 17), "RSM");
        assert_eq!(name(Isa::Vmx, 5), "IO_SMI");
        assert_eq!(name(Isa::Vmx, 35), "UNKNOWN(35)");
        assert_eq!(name(Isa::Vmx, 0xffff), "UNKNOWN(65535)");
    }

    /// Spot checks against arch/x86/include/uapi/asm/svm.h (Linux 6.1).
    #[test]
    fn svm_matches_uapi_header() {
        for (n, s) in [
            (0x000, "READ_CR0"),
            (0x003, "READ_CR3"),
            (0x013, "WRITE_CR3"),
            (0x027, "READ_DR7"),
            (0x037, "WRITE_DR7"),
            (0x04e, "EXCP_PF"),
            (0x041, "EXCP_DB"),
            (0x060, "INTR"),
            (0x072, "CPUID"),
            (0x078, "HLT"),
            (0x07b, "IOIO"),
            (0x07c, "MSR"),
            (0x081, "VMMCALL"),
            (0x08f, "EFER_WRITE_TRAP"),
            (0x090, "CR0_WRITE_TRAP"),
            (0x098, "CR8_WRITE_TRAP"),
            (0x0a2, "INVPCID"),
            (0x400, "NPF"),
            (0x403, "VMGEXIT"),
            (0xffff_ffff, "INVALID"),
        ] {
            assert_eq!(name(Isa::Svm, n), s, "SVM code {n:#x}");
        }
        assert_eq!(name(Isa::Svm, 0x404), "UNKNOWN(1028)");
        assert_eq!(all(Isa::Svm).len(), 96 + 16 + SVM.len());
    }

    #[test]
    fn parse_accepts_numbers_and_names() {
        assert_eq!(parse(Isa::Vmx, "48"), Ok(48));
        assert_eq!(parse(Isa::Svm, "0x400"), Ok(0x400));
        assert_eq!(parse(Isa::Svm, "npf"), Ok(0x400));
        assert_eq!(parse(Isa::Vmx, "ept_violation"), Ok(48));
        assert!(parse(Isa::Vmx, "bogus").is_err());
    }

    #[test]
    fn isa_round_trips() {
        for raw in [1, 2, 7] {
            assert_eq!(Isa::from_raw(raw).raw(), raw);
        }
        assert_eq!("intel".parse::<Isa>(), Ok(Isa::Vmx));
        assert!("arm".parse::<Isa>().is_err());
    }
}
