//! The KVM paging mode a report was recorded under: nested (EPT/NPT) or shadow.

use serde::{Deserialize, Serialize};

/// Whether the loaded KVM vendor module uses nested paging (EPT / NPT) or shadow paging.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paging {
    /// `kvm_intel` or `kvm_amd`.
    pub module: String,
    /// `ept` or `npt`.
    pub parameter: String,
    /// true: nested paging (EPT/NPT); false: shadow paging.
    pub nested: bool,
}

impl Paging {
    /// `ept=1`, `npt=0`, ... as the module parameter would be written.
    pub fn label(&self) -> String {
        format!("{}={}", self.parameter, u8::from(self.nested))
    }
}
