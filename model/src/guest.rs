//! The guest's readout: a patched KVM's exit counters read from inside the guest
//! through CPUID ([`crate::leaves`] is the contract), over any [`Cpuid`], and the
//! `kvmtrace.guest.v1` / `kvmtrace.sweep.v1` JSON it is written as. Every query is
//! itself a CPUID exit, so the readings record how many queries came before each one.
//!
//! An unpatched KVM answers an unknown leaf with the highest basic leaf's data on
//! Intel (leaf 0xD for the same ECX) and with zeros on AMD; both are recognised.

use serde::{Deserialize, Serialize};

use crate::{
    exit_reasons::{self, Isa},
    leaves::{Cpuid, Leaves, Regs, UNDEFINED_EDX},
};

/// One reason's counters as the guest reads them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestReason {
    pub reason: u32,
    pub name: String,
    pub count: u64,
    pub cycles: Option<u64>,
    /// The KVM answered "not defined" (EDX = 0xFFFFFFFF).
    pub undefined: bool,
    /// CPUID instructions this tool ran before the count query of this reason.
    pub queries_before: u64,
}

/// The `schema` of `kvmtrace guest --format json`.
pub const GUEST_SCHEMA: &str = "kvmtrace.guest.v1";

/// Everything the guest read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestReadout {
    pub schema: String,
    /// `vmx` (GenuineIntel) or `svm` (AuthenticAMD).
    pub isa: Isa,
    pub leaves: Leaves,
    /// false: the KVM answered with its fallback, not exit counters.
    pub patched: bool,
    /// Why `patched` is what it is.
    pub detection: String,
    pub total_exits: Option<u64>,
    pub total_cycles: Option<u64>,
    pub reasons: Vec<GuestReason>,
    /// CPUID instructions run in all.
    pub queries: u64,
    /// Each leaf judged on its own (absent in older readouts).
    #[serde(default)]
    pub leaf_status: Option<LeafStatuses>,
}

/// Whether a counter leaf answers with counters, judged by its answer about CPUID
/// exits (this very query is one, so a working leaf cannot answer 0) against what
/// an unpatched KVM answers for the same ECX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeafStatus {
    Works,
    /// Zeros, or the highest basic leaf's data (Intel's out-of-range fallback).
    LikeUnpatched,
}

/// [`LeafStatus`] of each leaf asked (`None`: the leaf is not configured).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeafStatuses {
    pub count: LeafStatus,
    pub total: Option<LeafStatus>,
    pub cycles: Option<LeafStatus>,
}

/// Why a JSON text is not a guest readout this version can read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("not a kvmtrace guest readout: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported schema '{found}': this kvmtrace reads {GUEST_SCHEMA}")]
    Schema { found: String },
}

impl GuestReadout {
    /// Parses `kvmtrace guest --format json` output, checking the schema first.
    pub fn from_json(text: &str) -> Result<Self, ParseError> {
        crate::parse::versioned_json(text, GUEST_SCHEMA, |found| ParseError::Schema { found })
    }
}

/// Counts the CPUID instructions it passes on.
struct Counted<'a, C: Cpuid> {
    cpu: &'a mut C,
    n: u64,
}

impl<C: Cpuid> Counted<'_, C> {
    fn q(&mut self, leaf: u32, sub: u32) -> Regs {
        self.n += 1;
        self.cpu.cpuid(leaf, sub)
    }
}

fn vendor(r: Regs) -> Option<Isa> {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.edx.to_le_bytes());
    v[8..].copy_from_slice(&r.ecx.to_le_bytes());
    match &v {
        b"GenuineIntel" => Some(Isa::Vmx),
        b"AuthenticAMD" | b"HygonGenuine" => Some(Isa::Svm),
        _ => None,
    }
}

/// The reason numbering of this CPU's vendor (CPUID leaf 0).
pub fn vendor_isa(cpu: &mut impl Cpuid) -> Option<Isa> {
    vendor(cpu.cpuid(0, 0))
}

/// Reads every counter. `isa` overrides the vendor detection.
pub fn read(
    cpu: &mut impl Cpuid,
    leaves: Leaves,
    isa: Option<Isa>,
) -> Result<GuestReadout, String> {
    let mut c = Counted { cpu, n: 0 };
    let leaf0 = c.q(0, 0);
    let isa = match isa.or_else(|| vendor(leaf0)) {
        Some(i) => i,
        None => return Err("unknown CPU vendor: give --isa vmx or --isa svm".to_owned()),
    };
    // Intel's fallback for an out-of-range leaf: the highest basic leaf, same ECX.
    let max_basic = leaf0.eax;
    let probe = c.q(leaves.count, 0);
    let fallback = c.q(max_basic, 0);
    let total = leaves.total.map(|t| c.q(t, 0));
    // Each leaf on its own, asked about CPUID exits.
    let cpuid = exit_reasons::cpuid_reason(isa);
    let count_cpuid = c.q(leaves.count, cpuid);
    let fallback_cpuid = c.q(max_basic, cpuid);
    let cycles_cpuid = leaves.cycles.map(|l| c.q(l, cpuid));
    // Intel's out-of-range fallback: the highest basic leaf's data, same ECX.
    let like_basic = |a: Regs, b: Regs| a == b && a != Regs::default();
    let judge = |works: bool| {
        if works {
            LeafStatus::Works
        } else {
            LeafStatus::LikeUnpatched
        }
    };
    let status = LeafStatuses {
        count: judge(
            count_cpuid != fallback_cpuid
                && (count_cpuid.eax, count_cpuid.ebx) != (0, 0)
                && !like_basic(probe, fallback),
        ),
        total: total.map(|t| judge(t != fallback && t.eax != 0)),
        cycles: cycles_cpuid.map(|y| judge(y != fallback_cpuid && (y.ebx, y.ecx) != (0, 0))),
    };
    let patched = status.count == LeafStatus::Works;
    let unpatched_like: Vec<&str> = [
        (Some(status.count), "count"),
        (status.total, "total"),
        (status.cycles, "cycles"),
    ]
    .into_iter()
    .filter(|(s, _)| *s == Some(LeafStatus::LikeUnpatched))
    .map(|(_, name)| name)
    .collect();
    let detection = if !patched
        && (like_basic(probe, fallback) || like_basic(count_cpuid, fallback_cpuid))
    {
        format!(
            "leaf {:#x} answers like basic leaf {max_basic:#x}: this KVM is not patched",
            leaves.count
        )
    } else if !patched {
        format!(
            "leaf {:#x} answers zeros even about CPUID exits, one of which this query is: this KVM is not patched",
            leaves.count
        )
    } else if unpatched_like.is_empty() {
        "counter leaves answer".to_owned()
    } else {
        format!(
            "the count leaf answers; the {} leaf answers like an unpatched KVM",
            unpatched_like.join(" and ")
        )
    };
    let total_works = status.total == Some(LeafStatus::Works);
    let cycles_work = status.cycles == Some(LeafStatus::Works);
    let mut reasons = Vec::new();
    if patched {
        for (reason, name) in exit_reasons::hardware(isa) {
            let queries_before = c.n;
            let r = c.q(leaves.count, reason);
            let cycles = leaves.cycles.filter(|_| cycles_work).map(|l| {
                let y = c.q(l, reason);
                (u64::from(y.ebx) << 32) | u64::from(y.ecx)
            });
            reasons.push(GuestReason {
                reason,
                name: name.into_owned(),
                count: (u64::from(r.ebx) << 32) | u64::from(r.eax),
                cycles,
                undefined: r.edx == UNDEFINED_EDX,
                queries_before,
            });
        }
    }
    Ok(GuestReadout {
        schema: GUEST_SCHEMA.to_owned(),
        isa,
        leaves,
        patched,
        detection,
        total_exits: total.filter(|_| total_works).map(|t| u64::from(t.eax)),
        total_cycles: total
            .filter(|_| total_works)
            .map(|t| (u64::from(t.ebx) << 32) | u64::from(t.ecx)),
        reasons,
        queries: c.n,
        leaf_status: Some(status),
    })
}

/// The `schema` of `kvmtrace guest --sweep --format json`.
pub const SWEEP_SCHEMA: &str = "kvmtrace.sweep.v1";

/// ECX values a sweep tries beyond `0..=0xFFFF`: the edges of the 32-bit range.
pub const SWEEP_EXTRA: [u32; 3] = [0x7fff_ffff, 0x8000_0000, 0xffff_ffff];

/// A sweep that disagreed with the tables.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepMismatch {
    pub leaf: u32,
    pub ecx: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx_out: u32,
    pub edx: u32,
    /// What the tables say: the SDM/APM defines this reason.
    pub defined: bool,
}

/// The result of asking the count and cycles leaves about every ECX in
/// `0..=0xFFFF` and [`SWEEP_EXTRA`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sweep {
    pub schema: String,
    pub isa: Isa,
    pub leaves: Leaves,
    pub queried: u64,
    /// Answers with EDX = 0xFFFFFFFF (undefined reason).
    pub undefined: u64,
    /// Answers for reasons the SDM/APM defines.
    pub defined: u64,
    /// Answers that disagree with the tables (at most the first 100 are kept).
    pub mismatches: u64,
    pub first_mismatches: Vec<SweepMismatch>,
}

/// Asks the count (and cycles) leaf about every ECX of the sweep and checks each answer
/// against the tables: an undefined reason must answer EAX=EBX=ECX=0, EDX=0xFFFFFFFF;
/// a defined one must not say undefined.
pub fn sweep(cpu: &mut impl Cpuid, leaves: Leaves, isa: Isa) -> Sweep {
    let mut out = Sweep {
        schema: SWEEP_SCHEMA.to_owned(),
        isa,
        leaves,
        queried: 0,
        undefined: 0,
        defined: 0,
        mismatches: 0,
        first_mismatches: Vec::new(),
    };
    let leaf_list: Vec<u32> = std::iter::once(leaves.count).chain(leaves.cycles).collect();
    for ecx in (0..=0xffff).chain(SWEEP_EXTRA) {
        let defined = tracer_common::exit_reasons::defined_by_spec(isa.raw(), ecx);
        for &leaf in &leaf_list {
            let r = cpu.cpuid(leaf, ecx);
            out.queried += 1;
            let says_undefined = r.edx == UNDEFINED_EDX;
            if says_undefined {
                out.undefined += 1;
            } else {
                out.defined += 1;
            }
            let clean_undefined = r.eax == 0 && r.ebx == 0 && r.ecx == 0;
            let ok = if defined {
                !says_undefined
            } else {
                says_undefined && clean_undefined
            };
            if !ok {
                out.mismatches += 1;
                if out.first_mismatches.len() < 100 {
                    out.first_mismatches.push(SweepMismatch {
                        leaf,
                        ecx,
                        eax: r.eax,
                        ebx: r.ebx,
                        ecx_out: r.ecx,
                        edx: r.edx,
                        defined,
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: Regs = Regs {
        eax: 0xd,
        ebx: u32::from_le_bytes(*b"Genu"),
        edx: u32::from_le_bytes(*b"ineI"),
        ecx: u32::from_le_bytes(*b"ntel"),
    };

    /// A KVM: patched (counts per reason = reason + 1, cycles = 1000 * that), or not.
    struct FakeKvm {
        patched: bool,
        vendor: Regs,
        exits: u64,
    }

    impl Cpuid for FakeKvm {
        fn cpuid(&mut self, leaf: u32, sub: u32) -> Regs {
            self.exits += 1;
            let xsave = Regs {
                eax: 7,
                ebx: 0x340,
                ecx: 0x340,
                edx: 0,
            };
            match (leaf, self.patched) {
                (0, _) => self.vendor,
                (0xd, _) => xsave,
                (0x4fff_ffff, true) => Regs {
                    eax: self.exits as u32,
                    ebx: 1,
                    ecx: 2,
                    edx: 0,
                },
                (0x4fff_fffe, true) if sub == 35 => Regs {
                    edx: UNDEFINED_EDX,
                    ..Regs::default()
                },
                (0x4fff_fffe, true) => Regs {
                    eax: sub.wrapping_add(1),
                    ebx: u32::from(sub == 48),
                    ..Regs::default()
                },
                (0x4fff_fffd, true) => Regs {
                    ebx: 0,
                    ecx: sub.wrapping_add(1).wrapping_mul(1000),
                    ..Regs::default()
                },
                (l, false) if l > 0x4000_0001 && self.vendor == INTEL => xsave,
                _ => Regs::default(),
            }
        }
    }

    fn leaves() -> Leaves {
        crate::leaves::preset("kvmtrace").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn reads_a_patched_kvm() {
        let mut kvm = FakeKvm {
            patched: true,
            vendor: INTEL,
            exits: 0,
        };
        let r = read(&mut kvm, leaves(), None).unwrap_or_else(|e| panic!("{e}"));
        assert!(r.patched, "{}", r.detection);
        assert_eq!(r.isa, Isa::Vmx);
        assert_eq!(r.total_exits, Some(4), "leaf 0, probe, fallback, total");
        assert_eq!(r.total_cycles, Some((1 << 32) | 2));
        let ept = r
            .reasons
            .iter()
            .find(|x| x.reason == 48)
            .unwrap_or_else(|| panic!("no 48"));
        assert_eq!(ept.count, (1 << 32) | 49, "EBX holds the high 32 bits");
        assert_eq!(ept.cycles, Some(49_000));
        assert!(!ept.undefined);
        // 35 is not in our VMX table, so it is not queried; queries are counted.
        assert!(r.reasons.iter().all(|x| x.reason != 35));
        assert_eq!(r.queries, 7 + 2 * r.reasons.len() as u64);
        assert_eq!(r.reasons[0].queries_before, 7);
        assert_eq!(r.reasons[1].queries_before, 9);
        assert_eq!(
            r.leaf_status,
            Some(LeafStatuses {
                count: LeafStatus::Works,
                total: Some(LeafStatus::Works),
                cycles: Some(LeafStatus::Works)
            })
        );
    }

    #[test]
    fn recognises_unpatched_intel_and_amd() {
        let mut intel = FakeKvm {
            patched: false,
            vendor: INTEL,
            exits: 0,
        };
        let r = read(&mut intel, leaves(), None).unwrap_or_else(|e| panic!("{e}"));
        assert!(!r.patched);
        assert!(r.detection.contains("basic leaf 0xd"), "{}", r.detection);
        assert_eq!(
            r.leaf_status.map(|s| (s.count, s.total, s.cycles)),
            Some((
                LeafStatus::LikeUnpatched,
                Some(LeafStatus::LikeUnpatched),
                Some(LeafStatus::LikeUnpatched)
            ))
        );
        assert!(r.reasons.is_empty() && r.total_exits.is_none());

        let amd_vendor = Regs {
            eax: 0x10,
            ebx: u32::from_le_bytes(*b"Auth"),
            edx: u32::from_le_bytes(*b"enti"),
            ecx: u32::from_le_bytes(*b"cAMD"),
        };
        let mut amd = FakeKvm {
            patched: false,
            vendor: amd_vendor,
            exits: 0,
        };
        let r = read(&mut amd, leaves(), None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.isa, Isa::Svm);
        assert!(!r.patched, "{}", r.detection);
    }

    #[test]
    fn sweep_checks_every_answer_against_the_tables() {
        let mut kvm = FakeKvm {
            patched: true,
            vendor: INTEL,
            exits: 0,
        };
        let s = sweep(&mut kvm, leaves(), Isa::Vmx);
        assert_eq!(s.queried, 2 * (0x10000 + 3));
        // The fake answers "undefined" only for 35 on the count leaf: every other
        // undefined VMX reason (and 35 on the cycles leaf) is a mismatch.
        let defined = crate::exit_reasons::hardware(Isa::Vmx).len() as u64;
        assert_eq!(s.undefined, 1);
        assert_eq!(s.mismatches, s.queried - 2 * defined - 1);
        assert_eq!(s.first_mismatches.len(), 100);
        assert!(s.first_mismatches.iter().all(|m| !m.defined));
    }

    #[test]
    fn readout_json_checks_the_schema_first() {
        let mut kvm = FakeKvm {
            patched: true,
            vendor: INTEL,
            exits: 0,
        };
        let r = read(&mut kvm, leaves(), None).unwrap_or_else(|e| panic!("{e}"));
        let text = serde_json::to_string(&r).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(GuestReadout::from_json(&text).ok(), Some(r));
        let v2 = text.replace(GUEST_SCHEMA, "kvmtrace.guest.v2");
        assert!(matches!(
            GuestReadout::from_json(&v2),
            Err(ParseError::Schema { found }) if found == "kvmtrace.guest.v2"
        ));
        for bad in ["", "[]", "{\"schema\":", &text[..text.len() / 2]] {
            assert!(
                matches!(GuestReadout::from_json(bad), Err(ParseError::Json(_))),
                "{bad}"
            );
        }
    }
}
