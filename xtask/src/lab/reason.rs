//! The key both sides count by: an exit reason of the kvm_exit tracepoint.

use std::collections::BTreeMap;

use serde::Serialize;

/// `isa` of the kvm_exit tracepoint (KVM_ISA_VMX / KVM_ISA_SVM).
pub use tracer_common::isa::{SVM as ISA_SVM, VMX as ISA_VMX};

/// An exit reason as both sides report it: VMX basic reason (low 16 bits) plus the
/// failed-VM-entry bit, or the whole SVM exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Reason {
    pub isa: u32,
    pub reason: u32,
    pub failed_entry: bool,
}

impl Reason {
    pub fn from_raw(isa: u32, raw: u64) -> Self {
        if isa == ISA_VMX {
            Self {
                isa,
                reason: (raw & 0xffff) as u32,
                failed_entry: raw & (1 << 31) != 0,
            }
        } else {
            Self {
                isa,
                reason: raw as u32,
                failed_entry: false,
            }
        }
    }

    /// The tracepoint's raw exit_reason (VMX: failed entry in bit 31).
    pub fn raw(&self) -> u64 {
        u64::from(self.reason) | if self.failed_entry { 1 << 31 } else { 0 }
    }

    pub fn name(&self) -> String {
        // The same table kvmtrace prints (tracer-common), so the two columns agree.
        let name = tracer_common::exit_reasons::name(self.isa, self.reason)
            .map_or_else(|| format!("UNKNOWN({})", self.reason), |n| n.to_string());
        if self.failed_entry {
            format!("{name} (failed entry)")
        } else {
            name
        }
    }
}

pub type Counts = BTreeMap<Reason, u64>;
/// (vcpu_id, reason) -> count.
pub type VcpuCounts = BTreeMap<(u32, Reason), u64>;
