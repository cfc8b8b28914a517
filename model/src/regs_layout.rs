//! Where a vCPU's registers were found in `struct kvm_vcpu`, and how: recorded in the
//! report of `record --snapshots` (the finding itself is the tracer's `vcpu_regs`).

use serde::{Deserialize, Serialize};

/// Samples, and distinct guest RIPs among them, before a learned offset is taken.
pub const MIN_SAMPLES: u32 = 8;
pub const MIN_RIPS: usize = 2;

/// How the register offset was found (recorded in the report).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Method {
    /// From the kvm module's BTF.
    Btf {
        /// The split BTF file read, e.g. `/sys/kernel/btf/kvm`.
        file: String,
    },
    /// Learned from exits and verified against `kvm_exit`'s `guest_rip`.
    Learned {
        /// Exits whose vCPU memory was searched.
        samples: u32,
        /// Distinct guest RIPs among them.
        distinct_rips: u32,
    },
}

/// Where `regs[]` is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Byte offset of `regs[0]` (RAX) in `struct kvm_vcpu`.
    pub regs_offset: u32,
    #[serde(flatten)]
    pub method: Method,
}
