//! The ground truth: the kernel's hist triggers on kvm:kvm_exit, as `cat hist` prints
//! them.

use std::collections::BTreeMap;

use anyhow::Context as _;

use super::reason::{Counts, Reason};

/// The kernel's two hist triggers on kvm:kvm_exit, as printed by `cat hist`.
#[derive(Default)]
pub struct Hist {
    pub by_reason: Counts,
    /// Keyed by vcpu_id and the raw exit_reason; the hist has no isa in this key.
    pub by_vcpu: BTreeMap<(u32, u64), u64>,
    pub dropped: u64,
}

/// Parses the hist file; `isa` is the lab's ISA (for the per-vCPU table).
pub fn parse_hist(text: &str) -> anyhow::Result<Hist> {
    let mut hist = Hist::default();
    for line in text.lines().map(str::trim) {
        if let Some(d) = line.strip_prefix("Dropped:") {
            hist.dropped += d.trim().parse::<u64>().unwrap_or(0);
            continue;
        }
        // { isa:          1, exit_reason:         10 } hitcount:        651
        let Some(keys) = line.strip_prefix('{') else {
            continue;
        };
        let Some((keys, vals)) = keys.split_once('}') else {
            continue;
        };
        let fields: BTreeMap<&str, u64> = keys
            .split(',')
            .filter_map(|kv| kv.split_once(':'))
            .filter_map(|(k, v)| Some((k.trim(), v.trim().parse().ok()?)))
            .collect();
        let count: u64 = vals
            .trim()
            .strip_prefix("hitcount:")
            .and_then(|c| c.trim().parse().ok())
            .with_context(|| format!("hist line without hitcount: {line}"))?;
        let raw = *fields
            .get("exit_reason")
            .with_context(|| format!("hist line without exit_reason: {line}"))?;
        if let Some(&isa) = fields.get("isa") {
            let isa = u32::try_from(isa).context("bad isa")?;
            *hist
                .by_reason
                .entry(Reason::from_raw(isa, raw))
                .or_default() += count;
        } else if let Some(&vcpu) = fields.get("vcpu_id") {
            let vcpu = u32::try_from(vcpu).context("bad vcpu_id")?;
            *hist.by_vcpu.entry((vcpu, raw)).or_default() += count;
        }
    }
    Ok(hist)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::reason::{ISA_SVM, ISA_VMX};

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
