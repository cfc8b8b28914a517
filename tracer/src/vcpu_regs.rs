//! Where KVM keeps a vCPU's general-purpose registers, so that `record --snapshots` can
//! read what a guest asked at a CPUID exit (EAX, ECX) and what it received at the next
//! VM entry (EAX, EBX, ECX, EDX), wherever and however a patch answers the leaves.
//!
//! KVM keeps them in `struct kvm_vcpu` → `arch` (`struct kvm_vcpu_arch`) → `regs[17]`
//! (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8–R15, RIP). On VMX the exit path saves
//! every GPR there; on SVM `svm_vcpu_run()` copies RAX, RSP and RIP from the VMCB right
//! after the exit. Two ways to find `regs`, in this order:
//!
//! 1. **BTF**: the running kvm module's split BTF (`/sys/kernel/btf/kvm` on the base
//!    `/sys/kernel/btf/vmlinux`) gives `offsetof(kvm_vcpu, arch) +
//!    offsetof(kvm_vcpu_arch, regs)`. Debian's 6.1 and 6.12 modules have it; modules
//!    built out of tree against headers, and Debian 5.10's, have none.
//! 2. **Learned and verified**: `kvm:kvm_exit` records `guest_rip` with
//!    `kvm_rip_read()`, which leaves the value in `regs[RIP]`, and the eBPF program on
//!    that tracepoint runs right after the record is filled. So for every exit, the
//!    vCPU's memory holds `guest_rip` at `regs + 16 * 8`. The eBPF side sends, for the
//!    first exits, the exit's `guest_rip` and the first [`WINDOW`] bytes of the vCPU;
//!    [`Learner`] keeps the offsets that hold `guest_rip` in every sample. It is taken
//!    only when exactly one offset is left after at least [`MIN_SAMPLES`] exits at
//!    [`MIN_RIPS`] different addresses. Otherwise `record` fails and says why.

use std::{collections::BTreeSet, path::Path};

use kvmtrace_model::regs_layout::{Layout, MIN_RIPS, MIN_SAMPLES, Method};
use thiserror::Error;

/// Bytes of `struct kvm_vcpu` searched (and sent per learning sample).
pub const WINDOW: usize = 4096;
/// `regs[]` indices.
pub const RAX: usize = 0;
pub const RCX: usize = 1;
pub const RDX: usize = 2;
pub const RBX: usize = 3;
pub const RIP: usize = 16;
/// Samples after which learning gives up.
pub const MAX_SAMPLES: u32 = 512;

#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot read BTF {path}: {reason}")]
    Btf { path: String, reason: String },
    #[error("the kvm BTF has no {what}")]
    Missing { what: String },
    #[error(
        "no offset in the first {WINDOW} bytes of struct kvm_vcpu holds the guest RIP at \
         every exit: cannot find the vCPU registers on this kernel"
    )]
    NoCandidate,
    #[error(
        "{candidates} offsets in struct kvm_vcpu still hold the guest RIP after {samples} \
         exits: cannot tell which is regs[]"
    )]
    Ambiguous { candidates: usize, samples: u32 },
}

/// The layout from the kvm module's BTF under `btf_dir` (`/sys/kernel/btf`): `None`
/// when the module has none.
pub fn from_btf(btf_dir: &Path) -> Result<Option<Layout>, Error> {
    let module = btf_dir.join("kvm");
    if !module.is_file() {
        return Ok(None);
    }
    let err = |path: &Path, e: &dyn std::fmt::Display| Error::Btf {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let base_path = btf_dir.join("vmlinux");
    let base = crate::btf_base::open(btf_dir).map_err(|e| err(&base_path, &e))?;
    let btf = btf_rs::Btf::from_split_file(&module, &base).map_err(|e| err(&module, &e))?;
    let arch = member_offset(&btf, "kvm_vcpu", "arch")?;
    let regs = member_offset(&btf, "kvm_vcpu_arch", "regs")?;
    Ok(Some(Layout {
        regs_offset: arch + regs,
        method: Method::Btf {
            file: module.display().to_string(),
        },
    }))
}

/// Byte offset of `member` in `struct name`.
fn member_offset(btf: &btf_rs::Btf, name: &str, member: &str) -> Result<u32, Error> {
    let missing = || Error::Missing {
        what: format!("struct {name} with a member {member}"),
    };
    let types = btf.resolve_types_by_name(name).map_err(|_| missing())?;
    for ty in types {
        let btf_rs::Type::Struct(st) = ty else {
            continue;
        };
        for m in &st.members {
            if btf.resolve_name(m).is_ok_and(|n| n == member) {
                return Ok(m.bit_offset() / 8);
            }
        }
    }
    Err(missing())
}

/// The u64 at byte `at` of `window`, if it is there.
pub fn u64_at(window: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = window.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_ne_bytes(bytes))
}

/// Learns where `regs[]` is from exits, see the module doc.
#[derive(Debug, Default)]
pub struct Learner {
    /// Offsets of `regs[0]` still possible; `None` before the first sample.
    candidates: Option<Vec<u32>>,
    samples: u32,
    rips: BTreeSet<u64>,
}

/// Where learning stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Learning {
    Found(Layout),
    NeedMore,
}

impl Learner {
    /// Adds one exit: its `guest_rip` and the vCPU's first bytes at that moment.
    pub fn add(&mut self, guest_rip: u64, window: &[u8]) {
        let rip_at = RIP * 8;
        let holds = |o: u32| u64_at(window, o as usize + rip_at) == Some(guest_rip);
        let kept: Vec<u32> = match self.candidates.take() {
            None => (0..window.len().saturating_sub(rip_at + 7))
                .step_by(8)
                .filter_map(|o| u32::try_from(o).ok())
                .filter(|&o| holds(o))
                .collect(),
            Some(c) => c.into_iter().filter(|&o| holds(o)).collect(),
        };
        self.candidates = Some(kept);
        self.samples += 1;
        self.rips.insert(guest_rip);
    }

    /// Found, not yet, or an error once it cannot succeed.
    pub fn state(&self) -> Result<Learning, Error> {
        let Some(candidates) = &self.candidates else {
            return Ok(Learning::NeedMore);
        };
        match candidates.as_slice() {
            [] => Err(Error::NoCandidate),
            [only] if self.samples >= MIN_SAMPLES && self.rips.len() >= MIN_RIPS => {
                Ok(Learning::Found(Layout {
                    regs_offset: *only,
                    method: Method::Learned {
                        samples: self.samples,
                        distinct_rips: u32::try_from(self.rips.len()).unwrap_or(u32::MAX),
                    },
                }))
            }
            _ if self.samples >= MAX_SAMPLES => Err(Error::Ambiguous {
                candidates: candidates.len(),
                samples: self.samples,
            }),
            _ => Ok(Learning::NeedMore),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake vCPU with `regs` at `regs_at`, RIP = `rip`, and `decoy` (a field that
    /// holds the same value as RIP once) at `decoy_at`.
    fn vcpu(regs_at: usize, rip: u64, decoy_at: usize, decoy: u64) -> Vec<u8> {
        let mut w = vec![0u8; WINDOW];
        w[regs_at + RIP * 8..regs_at + RIP * 8 + 8].copy_from_slice(&rip.to_ne_bytes());
        w[decoy_at..decoy_at + 8].copy_from_slice(&decoy.to_ne_bytes());
        w
    }

    #[test]
    fn learns_the_one_offset_that_follows_the_rip() {
        let mut l = Learner::default();
        // The decoy equals the first RIP, then stays put: ruled out by the second.
        for (i, rip) in [
            0x10000u64, 0x10007, 0x10007, 0x10007, 0x10007, 0x10007, 0x10007,
        ]
        .into_iter()
        .enumerate()
        {
            l.add(rip, &vcpu(296, rip, 1000, 0x10000));
            assert_eq!(l.state().ok(), Some(Learning::NeedMore), "sample {i}");
        }
        l.add(0x10007, &vcpu(296, 0x10007, 1000, 0x10000));
        assert_eq!(
            l.state().ok(),
            Some(Learning::Found(Layout {
                regs_offset: 296,
                method: Method::Learned {
                    samples: 8,
                    distinct_rips: 2
                }
            }))
        );
    }

    #[test]
    fn one_rip_is_never_enough() {
        let mut l = Learner::default();
        for _ in 0..20 {
            l.add(
                0xffff_ffff_8100_0000,
                &vcpu(296, 0xffff_ffff_8100_0000, 8, 0),
            );
        }
        assert_eq!(l.state().ok(), Some(Learning::NeedMore));
    }

    #[test]
    fn gives_up_loudly() {
        let mut l = Learner::default();
        l.add(5, &vcpu(296, 6, 8, 0));
        assert!(matches!(l.state(), Err(Error::NoCandidate)));
        let mut l = Learner::default();
        for i in 0..MAX_SAMPLES {
            let rip = 0x1000 + u64::from(i % 2);
            // Two offsets that always hold the RIP.
            let mut w = vcpu(296, rip, 8, 0);
            w[2000 + RIP * 8..2000 + RIP * 8 + 8].copy_from_slice(&rip.to_ne_bytes());
            l.add(rip, &w);
        }
        assert!(matches!(
            l.state(),
            Err(Error::Ambiguous {
                candidates: 2,
                samples: MAX_SAMPLES
            })
        ));
    }

    #[test]
    fn no_btf_for_kvm_is_none() {
        let dir = std::env::temp_dir().join(format!("kvmtrace-btf-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        assert!(matches!(from_btf(&dir), Ok(None)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
