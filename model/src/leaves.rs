//! The leaf contract: which CPUID leaves a patched KVM answers with its exit counters,
//! and what the registers of an answer hold (shared/DESIGN.md, kernel/README.md).
//!
//! | leaf (EAX) | ECX | EAX out | EBX out | ECX out | EDX out |
//! | --- | --- | --- | --- | --- | --- |
//! | total | – | exits (low 32) | cycles, high 32 | cycles, low 32 | 0 |
//! | count | n | exits for n, low 32 | exits for n, high 32 | 0 | 0 |
//! | cycles | n | 0 | cycles for n, high 32 | cycles, low 32 | 0 |
//!
//! An undefined reason answers EDX = 0xFFFFFFFF.

use serde::{Deserialize, Serialize};

/// The registers a CPUID returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Something that executes CPUID (the CPU, or a fake in tests).
pub trait Cpuid {
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> Regs;
}

/// The leaf numbers of one patch variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leaves {
    /// Total exits and cycles; `None` when the variant has no total leaf.
    pub total: Option<u32>,
    /// Exits for the reason in ECX.
    pub count: u32,
    /// Cycles for the reason in ECX; `None` when the variant has none.
    pub cycles: Option<u32>,
}

/// Known leaf layouts, by name.
pub const PRESETS: &[(&str, Leaves)] = &[
    (
        "kvmtrace",
        Leaves {
            total: Some(0x4fff_ffff),
            count: 0x4fff_fffe,
            cycles: Some(0x4fff_fffd),
        },
    ),
    (
        "count-fffd",
        Leaves {
            total: None,
            count: 0x4fff_fffd,
            cycles: Some(0x4fff_fffc),
        },
    ),
];

/// The preset named `name`.
pub fn preset(name: &str) -> Result<Leaves, String> {
    PRESETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, l)| l)
        .ok_or_else(|| {
            let names: Vec<_> = PRESETS.iter().map(|(n, _)| *n).collect();
            format!(
                "unknown leaf preset '{name}': use one of {}",
                names.join(", ")
            )
        })
}

/// Parses a CPUID leaf given by a user: decimal, or hex with `0x`.
pub fn parse_leaf(text: &str) -> Result<u32, String> {
    crate::parse::u32_dec_or_hex(text)
        .ok_or_else(|| format!("'{text}' is not a CPUID leaf: write it like 0x4FFFFFFE"))
}

/// EDX of a count or cycles leaf for a reason the SDM/APM does not define.
pub const UNDEFINED_EDX: u32 = 0xffff_ffff;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_parse() {
        assert_eq!(parse_leaf("0x4FFFFFFE"), Ok(0x4fff_fffe));
        assert_eq!(parse_leaf(" 0X4fffffff "), Ok(0x4fff_ffff));
        assert_eq!(parse_leaf("10"), Ok(10));
        for bad in [
            "0x+5",
            "0x-5",
            "0x",
            "0x1ffffffff",
            "4294967296",
            "-1",
            "leaf",
            "",
        ] {
            let err = parse_leaf(bad).err().unwrap_or_default();
            assert!(err.contains(&format!("'{bad}'")), "{bad}: {err}");
        }
    }

    #[test]
    fn presets_and_unknown_names() {
        assert_eq!(preset("count-fffd").map(|l| l.count), Ok(0x4fff_fffd));
        assert_eq!(
            preset("nope"),
            Err("unknown leaf preset 'nope': use one of kvmtrace, count-fffd".to_owned())
        );
    }
}
