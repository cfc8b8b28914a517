//! The key both sides count by: an exit reason of the kvm_exit tracepoint.

use std::collections::BTreeMap;

use serde::Serialize;
use tracer_common::ExitKey;

/// `isa` of the kvm_exit tracepoint (KVM_ISA_VMX / KVM_ISA_SVM).
pub use tracer_common::isa::{SVM as ISA_SVM, VMX as ISA_VMX};

/// An exit reason as both sides report it ([`ExitKey`], split the same way), as the
/// lab's summary.json writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Reason {
    pub isa: u32,
    pub reason: u32,
    pub failed_entry: bool,
}

impl From<ExitKey> for Reason {
    fn from(k: ExitKey) -> Self {
        Self {
            isa: k.isa,
            reason: k.reason,
            failed_entry: k.failed_entry != 0,
        }
    }
}

impl Reason {
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
