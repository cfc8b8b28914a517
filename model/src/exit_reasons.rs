//! Exit-reason names for people: the tables live in `tracer_common::exit_reasons`
//! (Intel SDM Vol. 3D Appendix C, AMD APM Vol. 2 Appendix C). A value missing from the
//! tables is shown as `UNKNOWN(n)`, never dropped.

use std::{borrow::Cow, fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use tracer_common::{
    exit_reasons::{self as names, ReasonName},
    isa,
};

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

/// The name of `reason` for `isa`, or `None` when no specification defines it.
pub fn known_name(isa: Isa, reason: u32) -> Option<Cow<'static, str>> {
    let name = names::name(isa.raw(), reason)?;
    Some(match name {
        ReasonName::Fixed(s) => Cow::Borrowed(s),
        other => Cow::Owned(other.to_string()),
    })
}

/// The name of `reason` for `isa`; `UNKNOWN(n)` when no specification defines it.
pub fn name(isa: Isa, reason: u32) -> Cow<'static, str> {
    known_name(isa, reason).unwrap_or_else(|| Cow::Owned(format!("UNKNOWN({reason})")))
}

/// Every defined (reason, name) of `isa`, in numeric order.
pub fn all(isa: Isa) -> Vec<(u32, Cow<'static, str>)> {
    let mut codes: Vec<u32> = match isa {
        Isa::Vmx => names::VMX.iter().map(|&(n, _)| n).collect(),
        Isa::Svm => names::svm_range_codes()
            .chain(names::SVM.iter().map(|&(n, _)| n))
            .collect(),
        Isa::Other(_) => Vec::new(),
    };
    codes.sort_unstable();
    codes
        .into_iter()
        .filter_map(|n| known_name(isa, n).map(|s| (n, s)))
        .collect()
}

/// Every (reason, name) of `isa` that the SDM/APM defines as a hardware exit reason:
/// [`all`] without the GHCB's software VMGEXIT codes.
pub fn hardware(isa: Isa) -> Vec<(u32, Cow<'static, str>)> {
    all(isa)
        .into_iter()
        .filter(|&(n, _)| names::defined_by_spec(isa.raw(), n))
        .collect()
}

/// The CPUID exit reason of `isa` (VMX 10, SVM 0x72; 0 for an unknown isa).
pub fn cpuid_reason(isa: Isa) -> u32 {
    match isa {
        Isa::Vmx => tracer_common::exit_reasons::VMX_CPUID,
        Isa::Svm => tracer_common::exit_reasons::SVM_CPUID,
        Isa::Other(_) => 0,
    }
}

/// Parses a reason given by a user: a number (decimal or 0x hex) or a name of `isa`
/// (case-insensitive).
pub fn parse(isa: Isa, text: &str) -> Result<u32, String> {
    let t = text.trim();
    if let Some(n) = crate::parse::u32_dec_or_hex(t) {
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
        for table in [names::VMX, names::SVM] {
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
        assert_eq!(all(Isa::Svm).len(), 96 + 16 + names::SVM.len());
    }

    #[test]
    fn ghcb_codes_are_not_hardware_reasons() {
        let hw = hardware(Isa::Svm);
        assert!(hw.iter().any(|&(n, _)| n == 0x403));
        assert!(hw.iter().all(|&(n, _)| n < 0x8000_0000 || n == 0xffff_ffff));
        assert_eq!(all(Isa::Svm).len() - hw.len(), 12);
        assert_eq!(hardware(Isa::Vmx).len(), all(Isa::Vmx).len());
    }

    #[test]
    fn parse_accepts_numbers_and_names() {
        assert_eq!(parse(Isa::Vmx, "48"), Ok(48));
        assert_eq!(parse(Isa::Svm, "0x400"), Ok(0x400));
        assert_eq!(parse(Isa::Svm, "npf"), Ok(0x400));
        assert_eq!(parse(Isa::Vmx, "ept_violation"), Ok(48));
        assert!(parse(Isa::Vmx, "bogus").is_err());
        for bad in ["0x+5", "0x-5", "-1", "0x1ffffffff", "4294967296", "", "0x"] {
            let err = parse(Isa::Vmx, bad).err().unwrap_or_default();
            assert!(err.contains(&format!("'{bad}'")), "{bad}: {err}");
        }
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
