//! The output of the kernel's hist trigger on `kvm:kvm_exit` (`cat .../hist`): the
//! reference counts the lab compares kvmtrace with. (Not kvmtrace's own latency
//! histogram, which is [`crate::latency`].)
//!
//! ```text
//! { isa:          1, exit_reason:         10 } hitcount:        651
//! { vcpu_id:          0, exit_reason:         10 } hitcount:        651
//! Dropped: 0
//! ```

use std::collections::BTreeMap;

use thiserror::Error;
use tracer_common::ExitKey;

/// What one `cat hist` printed, over every trigger in it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelHist {
    /// `keys=isa,exit_reason` lines, split like kvmtrace splits reasons (VMX: basic
    /// reason and failed-entry bit).
    pub by_reason: BTreeMap<ExitKey, u64>,
    /// `keys=vcpu_id,exit_reason` lines, by vCPU and raw exit_reason (that key has no
    /// isa).
    pub by_vcpu: BTreeMap<(u32, u64), u64>,
    /// The sum of the triggers' `Dropped:` lines.
    pub dropped: u64,
}

/// A line of hist output that does not read as one.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("hist line {line:?}: {what}")]
pub struct ParseError {
    pub line: String,
    pub what: &'static str,
}

impl KernelHist {
    /// Parses hist output. Lines of other keys are skipped; a key line without a
    /// hitcount or exit_reason, or with a number out of range, is an error.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut hist = Self::default();
        for line in text.lines().map(str::trim) {
            let bad = |what| ParseError {
                line: line.to_owned(),
                what,
            };
            if let Some(d) = line.strip_prefix("Dropped:") {
                hist.dropped += d.trim().parse::<u64>().map_err(|_| bad("bad Dropped"))?;
                continue;
            }
            let Some((keys, count)) = key_line(line) else {
                continue;
            };
            let count = count.ok_or_else(|| bad("no hitcount"))?;
            let field = |name: &str| keys.iter().find(|(k, _)| *k == name).map(|&(_, v)| v);
            // Only the two count triggers; the lab's `--detail` triggers key more.
            if keys.len() != 2 {
                continue;
            }
            let raw = field("exit_reason").ok_or_else(|| bad("no exit_reason"))?;
            let raw32 = u32::try_from(raw).map_err(|_| bad("exit_reason out of range"))?;
            if let Some(isa) = field("isa") {
                let isa = u32::try_from(isa).map_err(|_| bad("isa out of range"))?;
                *hist
                    .by_reason
                    .entry(ExitKey::from_raw(isa, raw32))
                    .or_default() += count;
            } else if let Some(vcpu) = field("vcpu_id") {
                let vcpu = u32::try_from(vcpu).map_err(|_| bad("vcpu_id out of range"))?;
                *hist.by_vcpu.entry((vcpu, raw)).or_default() += count;
            }
        }
        Ok(hist)
    }
}

/// The sum of every trigger's `Dropped:` line in hist output of any keys.
pub fn dropped(text: &str) -> Result<u64, ParseError> {
    let mut n = 0;
    for line in text.lines().map(str::trim) {
        if let Some(d) = line.strip_prefix("Dropped:") {
            n += d.trim().parse::<u64>().map_err(|_| ParseError {
                line: line.to_owned(),
                what: "bad Dropped",
            })?;
        }
    }
    Ok(n)
}

/// One key line: its numeric keys by name, and its hitcount.
pub type HistRow = (BTreeMap<String, u64>, u64);

/// Every key line of hist output: its numeric keys by name, and its hitcount. A key
/// printed as a bucket (`.buckets=N`: `~ FROM-TO`) reads as FROM.
pub fn rows(text: &str) -> Result<Vec<HistRow>, ParseError> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        let Some((keys, count)) = key_line(line) else {
            continue;
        };
        let count = count.ok_or_else(|| ParseError {
            line: line.to_owned(),
            what: "no hitcount",
        })?;
        out.push((
            keys.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            count,
        ));
    }
    Ok(out)
}

/// The numeric `key: value` pairs of a key line.
type Keys<'a> = Vec<(&'a str, u64)>;

/// A key's value: decimal, or the start of a bucket (`~ FROM-TO`).
fn key_value(v: &str) -> Option<u64> {
    let v = v.trim();
    match v.strip_prefix('~') {
        Some(bucket) => bucket.trim().split('-').next()?.trim().parse().ok(),
        None => v.parse().ok(),
    }
}

/// `{ k: v, ... } hitcount: n` → the numeric keys and the hitcount (`None` when the
/// line has none); `None` for a line that is not a key line.
fn key_line(line: &str) -> Option<(Keys<'_>, Option<u64>)> {
    let (keys, vals) = line.strip_prefix('{')?.split_once('}')?;
    let keys = keys
        .split(',')
        .filter_map(|kv| kv.split_once(':'))
        .filter_map(|(k, v)| Some((k.trim(), key_value(v)?)))
        .collect();
    let count = vals
        .trim()
        .strip_prefix("hitcount:")
        .and_then(|c| c.trim().parse().ok());
    Some((keys, count))
}

#[cfg(test)]
mod tests {
    use tracer_common::isa;

    use super::*;

    #[test]
    fn reasons_vcpus_and_drops_parse_and_vmx_reasons_are_split() {
        let text = "\
# event histogram
{ isa:          1, exit_reason:         10 } hitcount:        651
{ isa:          1, exit_reason: 2147483681 } hitcount:          2
{ isa:          2, exit_reason:        124 } hitcount:          7

Totals:
    Hits: 660
    Entries: 3
    Dropped: 0
{ vcpu_id:          1, exit_reason:         10 } hitcount:         5
    Dropped: 3
";
        let h = KernelHist::parse(text).expect("parses");
        assert_eq!(h.by_reason[&ExitKey::from_raw(isa::VMX, 10)], 651);
        let failed = ExitKey {
            isa: isa::VMX,
            reason: 33,
            failed_entry: 1,
        };
        assert_eq!(h.by_reason[&failed], 2);
        assert_eq!(h.by_reason[&ExitKey::from_raw(isa::SVM, 124)], 7);
        assert_eq!(h.by_vcpu[&(1, 10)], 5);
        assert_eq!(h.dropped, 3);
    }

    #[test]
    fn detail_triggers_are_not_counts_and_parse_as_rows() {
        let text = "\
{ isa:          1, exit_reason:         30, info1:   66584640 } hitcount:         12
{ fault_address: ~ 4276092928-4277141503 } hitcount:          4
{ isa:          1, exit_reason:         30 } hitcount:         12
";
        let h = KernelHist::parse(text).expect("parses");
        assert_eq!(h.by_reason.len(), 1, "only the count trigger's line");
        assert_eq!(h.by_reason[&ExitKey::from_raw(isa::VMX, 30)], 12);
        let r = rows(text).expect("parses");
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].0["info1"], 66_584_640);
        assert_eq!(
            r[1].0["fault_address"], 0xfee0_0000,
            "a bucket reads as its start"
        );
        assert_eq!(r[1].1, 4);
        let msr = "{ ecx: 3221225600, write: 1 } hitcount: 50\n    Dropped: 2\n";
        assert_eq!(
            dropped(msr),
            Ok(2),
            "any keys: only the Dropped lines count"
        );
    }

    #[test]
    fn a_key_line_without_hitcount_is_an_error() {
        let err = KernelHist::parse("{ isa: 1, exit_reason: 10 }").expect_err("no hitcount");
        assert_eq!(err.what, "no hitcount");
    }
}
