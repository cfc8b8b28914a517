//! The CPU's own CPUID instruction, for `kvmtrace guest` inside a guest.

use kvmtrace_model::leaves::{Cpuid, Regs};

/// The real instruction.
pub struct Cpu;

impl Cpuid for Cpu {
    #[cfg(target_arch = "x86_64")]
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> Regs {
        #[allow(unused_unsafe, reason = "__cpuid_count is safe only on newer Rust")]
        // SAFETY: CPUID exists on every x86_64 CPU.
        let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, subleaf) };
        Regs {
            eax: r.eax,
            ebx: r.ebx,
            ecx: r.ecx,
            edx: r.edx,
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn cpuid(&mut self, _leaf: u32, _subleaf: u32) -> Regs {
        Regs::default()
    }
}
