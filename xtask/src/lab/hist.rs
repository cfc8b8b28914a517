//! The ground truth: the kernel's hist triggers on kvm:kvm_exit, as `cat hist` prints
//! them, read by the model crate's parser.

use std::collections::BTreeMap;

use kvmtrace_model::kernel_hist::KernelHist;

use super::reason::Counts;

/// The kernel's two hist triggers on kvm:kvm_exit, as printed by `cat hist` (or the
/// same counts from the trace buffer: see [`Hist::source`]).
#[derive(Default)]
pub struct Hist {
    pub by_reason: Counts,
    /// Keyed by vcpu_id and the raw exit_reason; the hist has no isa in this key.
    pub by_vcpu: BTreeMap<(u32, u64), u64>,
    pub dropped: u64,
    /// Where the counts came from, named in every verdict against them.
    pub source: Source,
}

/// Where the lab's ground truth came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Source {
    /// The kernel's hist triggers on kvm:kvm_exit.
    #[default]
    Hist,
    /// Every kvm_exit record in the trace buffer, where the kernel has no hist
    /// triggers (Debian's 5.10).
    TraceBuffer,
}

impl Source {
    /// Its name in the lab's lines: `kvmtrace == hist`, `kvmtrace == trace buffer`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hist => "hist",
            Self::TraceBuffer => "trace buffer",
        }
    }
}

/// Parses the hist file.
pub fn parse_hist(text: &str) -> anyhow::Result<Hist> {
    Ok(Hist {
        source: Source::Hist,
        ..KernelHist::parse(text)?.into()
    })
}

/// The counts of the trace buffer, where the kernel has no hist triggers (see
/// [`kvmtrace_model::kernel_trace`]).
pub fn from_trace(
    format: &str,
    counts: &str,
    exit_isa: u32,
) -> Result<Hist, kvmtrace_model::kernel_trace::TraceError> {
    kvmtrace_model::kernel_trace::parse(format, counts, exit_isa).map(|kernel| Hist {
        source: Source::TraceBuffer,
        ..kernel.into()
    })
}

impl From<KernelHist> for Hist {
    fn from(kernel: KernelHist) -> Self {
        Hist {
            by_reason: kernel
                .by_reason
                .into_iter()
                .map(|(k, n)| (k.into(), n))
                .collect(),
            by_vcpu: kernel.by_vcpu,
            dropped: kernel.dropped,
            source: Source::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::reason::{ISA_SVM, ISA_VMX, Reason};

    #[test]
    fn hist_lines_parse_and_vmx_reasons_are_masked() -> anyhow::Result<()> {
        let text = "# event histogram\n\
            { isa:          1, exit_reason:         10 } hitcount:        651\n\
            { isa:          1, exit_reason: 2147483681 } hitcount:          2\n\
            { vcpu_id:          1, exit_reason:         12 } hitcount:          3\n\
            \nTotals:\n    Hits: 656\n    Entries: 3\n    Dropped: 0\n";
        let h = parse_hist(text)?;
        let cpuid = Reason {
            isa: ISA_VMX,
            reason: 10,
            failed_entry: false,
        };
        let failed = Reason {
            isa: ISA_VMX,
            reason: 33,
            failed_entry: true,
        };
        assert_eq!(h.by_reason.get(&cpuid), Some(&651));
        assert_eq!(h.by_reason.get(&failed), Some(&2));
        assert_eq!(h.by_vcpu.get(&(1, 12)), Some(&3));
        assert_eq!(h.dropped, 0);
        assert_eq!(h.source, Source::Hist);
        assert_eq!(failed.name(), "INVALID_STATE (failed entry)");
        let svm = |reason| Reason {
            isa: ISA_SVM,
            reason,
            failed_entry: false,
        };
        assert_eq!(svm(0x13).name(), "WRITE_CR3");
        assert_eq!(svm(0x4e).name(), "EXCP_PF");
        assert_eq!(svm(0x400).name(), "NPF");
        Ok(())
    }
}
