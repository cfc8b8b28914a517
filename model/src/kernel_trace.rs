//! The reference counts where the kernel has no hist triggers (Debian's 5.10 cloud
//! kernel is built without `CONFIG_HIST_TRIGGERS`): every `kvm:kvm_exit` record of
//! the trace buffer, counted per vCPU and printed reason inside the lab's L1, then
//! mapped back to exit codes through the reason tables of the event's own `print fmt`.
//!
//! The counts, as the lab's L1 prints them (awk over `trace`, then the buffer's
//! statistics):
//!
//! ```text
//! 1003 vcpu 0 reason CPUID
//! 2 vcpu 0 reason INVALID_STATE FAILED_VMENTRY
//! # counted 1005 unmatched 0
//! # entries-in-buffer/entries-written: 1005/1005   #P:1
//! overrun: 0
//! dropped events: 0
//! ```

use std::collections::BTreeMap;

use thiserror::Error;
use tracer_common::{ExitKey, isa};

use crate::kernel_hist::KernelHist;

/// Why the trace buffer's counts cannot stand as the reference.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TraceError {
    #[error("the kvm_exit format has no {0} reason table in its print fmt")]
    NoTable(&'static str),
    #[error("bad entry in the kvm_exit format's reason table: {0:?}")]
    BadTable(String),
    #[error("trace count line {0:?} does not read as `N vcpu V reason NAME`")]
    BadLine(String),
    #[error("reason {name:?} (vcpu {vcpu}) is in no reason table of the kvm_exit format")]
    UnknownName { name: String, vcpu: u32 },
    #[error("{0} trace lines were not kvm_exit records (the first: {1:?})")]
    Unmatched(u64, String),
    #[error("the trace buffer lost events: {0}")]
    Lost(String),
    #[error(
        "the counts sum to {counted}, but the trace buffer holds {entries} entries of {written} written"
    )]
    Incomplete {
        counted: u64,
        entries: u64,
        written: u64,
    },
    #[error("the trace counts have no `{0}` line")]
    Missing(&'static str),
    #[error("the trace buffer holds no kvm_exit record: kvm_exit was not enabled, or no VM ran")]
    Empty,
}

/// One vendor's exit codes by the names `kvm_exit` prints for them.
type Table = BTreeMap<String, u32>;

/// The VMX and SVM reason tables of `kvm_exit`'s format file: the two
/// `__print_symbolic(...)` lists of its `print fmt`, VMX's first (the kernel's
/// `kvm_print_exit_reason`).
pub fn reason_tables(format: &str) -> Result<(Table, Table), TraceError> {
    let fmt = format
        .lines()
        .find_map(|l| l.trim().strip_prefix("print fmt:"))
        .ok_or(TraceError::NoTable("VMX"))?;
    let mut lists = fmt.split("__print_symbolic(").skip(1);
    let vmx = table(lists.next().ok_or(TraceError::NoTable("VMX"))?)?;
    let svm = table(lists.next().ok_or(TraceError::NoTable("SVM"))?)?;
    if vmx.get("CPUID") != Some(&10) {
        return Err(TraceError::NoTable("VMX"));
    }
    if svm.get("cpuid") != Some(&0x72) {
        return Err(TraceError::NoTable("SVM"));
    }
    Ok((vmx, svm))
}

/// The `{ value, "name" }` entries at the start of one `__print_symbolic(` list, up
/// to the `)` that closes it.
fn table(list: &str) -> Result<Table, TraceError> {
    let mut out = Table::new();
    let mut rest = list;
    loop {
        let open = rest.find('{');
        let close = rest.find(')');
        let Some(open) = open.filter(|&o| close.is_none_or(|c| o < c)) else {
            return Ok(out);
        };
        let end = rest[open..]
            .find('}')
            .ok_or_else(|| TraceError::BadTable(rest[open..].chars().take(40).collect()))?;
        let entry = &rest[open + 1..open + end];
        let bad = || TraceError::BadTable(entry.trim().to_owned());
        let (value, name) = entry.split_once(',').ok_or_else(bad)?;
        let name = name.trim().trim_matches('"');
        out.insert(name.to_owned(), number(value.trim()).ok_or_else(bad)?);
        rest = &rest[open + end + 1..];
    }
}

/// A C integer as the preprocessor left it: decimal, `0x` hex, negative (SVM's `-1`,
/// as the `u32` the field holds), or a sum of those (SVM's `0x040 + 0`).
fn number(text: &str) -> Option<u32> {
    let text = text
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .trim();
    if text.contains('+') {
        return text
            .split('+')
            .try_fold(0u32, |sum, term| sum.checked_add(number(term)?));
    }
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        return u32::from_str_radix(hex, 16).ok();
    }
    if let Some(neg) = text.strip_prefix('-') {
        return neg
            .parse::<i64>()
            .ok()
            .and_then(|n| i32::try_from(-n).ok())
            .map(|n| n as u32);
    }
    text.parse().ok()
}

/// The counts of `exit_isa`'s exits ([`isa::VMX`] or [`isa::SVM`]) from the lab's
/// trace counts, with the names mapped through `format`'s tables. Lost events, lines
/// that were not `kvm_exit` records, or counts that do not add up to the buffer's
/// entries are errors: the reference must hold every exit.
pub fn parse(format: &str, counts: &str, exit_isa: u32) -> Result<KernelHist, TraceError> {
    let (vmx, svm) = reason_tables(format)?;
    let names = if exit_isa == isa::VMX { &vmx } else { &svm };
    let mut hist = KernelHist::default();
    let (mut summed, mut counted, mut unmatched) = (0u64, None, None);
    let (mut entries, mut lost) = (None, Vec::new());
    let mut first_unmatched = String::new();
    for line in counts.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(meta) = line.strip_prefix("# unmatched-line ") {
            if first_unmatched.is_empty() {
                meta.clone_into(&mut first_unmatched);
            }
            continue;
        }
        if let Some(meta) = line.strip_prefix("# counted ") {
            let mut words = meta.split_whitespace();
            counted = words.next().and_then(|n| n.parse::<u64>().ok());
            unmatched = words
                .skip_while(|w| *w != "unmatched")
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok());
            continue;
        }
        if let Some(meta) = line.strip_prefix("# entries-in-buffer/entries-written:") {
            let pair = meta.split_whitespace().next().unwrap_or_default();
            let parsed = pair
                .split_once('/')
                .and_then(|(e, w)| Some((e.parse::<u64>().ok()?, w.parse::<u64>().ok()?)));
            entries = Some(parsed.ok_or_else(|| TraceError::BadLine(line.to_owned()))?);
            continue;
        }
        if let Some((what, n)) = line
            .split_once(':')
            .filter(|(w, _)| matches!(*w, "overrun" | "commit overrun" | "dropped events"))
        {
            let n: u64 = n
                .trim()
                .parse()
                .map_err(|_| TraceError::BadLine(line.to_owned()))?;
            if n != 0 {
                lost.push(format!("{what} {n}"));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (n, vcpu, name) =
            count_line(line).ok_or_else(|| TraceError::BadLine(line.to_owned()))?;
        let raw = raw_reason(name, names, exit_isa).ok_or_else(|| TraceError::UnknownName {
            name: name.to_owned(),
            vcpu,
        })?;
        *hist
            .by_reason
            .entry(ExitKey::from_raw(exit_isa, raw))
            .or_default() += n;
        *hist.by_vcpu.entry((vcpu, u64::from(raw))).or_default() += n;
        summed += n;
    }
    if !lost.is_empty() {
        return Err(TraceError::Lost(lost.join(", ")));
    }
    let counted = counted.ok_or(TraceError::Missing("# counted"))?;
    match unmatched.ok_or(TraceError::Missing("# counted N unmatched M"))? {
        0 => {}
        n => return Err(TraceError::Unmatched(n, first_unmatched)),
    }
    let (entries, written) = entries.ok_or(TraceError::Missing("# entries-in-buffer"))?;
    if summed == 0 {
        return Err(TraceError::Empty);
    }
    if summed != counted || counted != entries || entries != written {
        return Err(TraceError::Incomplete {
            counted: summed,
            entries,
            written,
        });
    }
    Ok(hist)
}

/// `N vcpu V reason NAME...`: the count, the vCPU and the printed reason.
fn count_line(line: &str) -> Option<(u64, u32, &str)> {
    let (n, rest) = line.split_once(' ')?;
    let rest = rest.strip_prefix("vcpu ")?;
    let (vcpu, rest) = rest.split_once(' ')?;
    let name = rest.strip_prefix("reason ")?.trim();
    Some((n.parse().ok()?, vcpu.parse().ok()?, name))
}

/// The raw exit_reason a printed reason stands for: a table name (SVM's may hold
/// spaces: `DE excp`), or the `0x..` the kernel prints for a code without one; on
/// VMX, a trailing ` FAILED_VMENTRY` sets bit 31.
fn raw_reason(printed: &str, names: &Table, exit_isa: u32) -> Option<u32> {
    let (name, flag) = match printed.strip_suffix(" FAILED_VMENTRY") {
        Some(name) if exit_isa == isa::VMX => (name, 0x8000_0000),
        _ => (printed, 0),
    };
    let code = names.get(name).copied().or_else(|| {
        name.strip_prefix("0x")
            .and_then(|h| u32::from_str_radix(h, 16).ok())
    })?;
    Some(code | flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shortened from Debian 5.10.262's `events/kvm/kvm_exit/format`.
    const FORMAT: &str = "name: kvm_exit\nID: 1234\nformat:\n\
        \tfield:unsigned int exit_reason;\toffset:8;\tsize:4;\tsigned:0;\n\n\
        print fmt: \"vcpu %u reason %s%s%s rip 0x%lx info1 0x%016llx\", REC->vcpu_id, \
        (REC->isa == 1) ? __print_symbolic(REC->exit_reason & 0xffff, { 0, \"EXCEPTION_NMI\" }, \
        { 10, \"CPUID\" }, { 30, \"IO_INSTRUCTION\" }, { 33, \"INVALID_STATE\" }) : \
        __print_symbolic(REC->exit_reason, { 0x000, \"read_cr0\" }, { 0x072, \"cpuid\" }, \
        { 0x07b, \"io\" }, { 0x040 + 14, \"PF excp\" }, { 0x400, \"npf\" }, \
        { -1, \"invalid_guest_state\" }), \
        (REC->isa == 1 && REC->exit_reason & ~0xffff) ? \" \" : \"\", (REC->isa == 1) ? \
        __print_flags(REC->exit_reason & ~0xffff, \" \", { 0x80000000, \"FAILED_VMENTRY\" }) : \"\", \
        REC->guest_rip, REC->info1\n";

    fn tail(counted: u64) -> String {
        format!(
            "# counted {counted} unmatched 0\n\
             # entries-in-buffer/entries-written: {counted}/{counted}   #P:1\n\
             overrun: 0\ndropped events: 0\n"
        )
    }

    #[test]
    fn tables_come_from_the_print_fmt() -> Result<(), TraceError> {
        let (vmx, svm) = reason_tables(FORMAT)?;
        assert_eq!(vmx.get("IO_INSTRUCTION"), Some(&30));
        assert_eq!(svm.get("npf"), Some(&0x400));
        assert_eq!(svm.get("invalid_guest_state"), Some(&u32::MAX));
        assert_eq!(svm.get("PF excp"), Some(&0x4e));
        assert_eq!(vmx.len(), 4);
        assert_eq!(svm.len(), 6);
        assert_eq!(
            reason_tables("print fmt: \"x\", REC->vcpu_id"),
            Err(TraceError::NoTable("VMX"))
        );
        Ok(())
    }

    #[test]
    fn vmx_counts_map_names_flags_and_unknown_codes() -> Result<(), TraceError> {
        let counts = format!(
            "1003 vcpu 0 reason CPUID\n100 vcpu 1 reason IO_INSTRUCTION\n\
             2 vcpu 0 reason INVALID_STATE FAILED_VMENTRY\n5 vcpu 0 reason 0x45\n{}",
            tail(1110)
        );
        let h = parse(FORMAT, &counts, isa::VMX)?;
        assert_eq!(
            h.by_reason.get(&ExitKey::from_raw(isa::VMX, 10)),
            Some(&1003)
        );
        assert_eq!(
            h.by_reason.get(&ExitKey::from_raw(isa::VMX, 0x8000_0021)),
            Some(&2)
        );
        assert_eq!(
            h.by_reason.get(&ExitKey::from_raw(isa::VMX, 0x45)),
            Some(&5)
        );
        assert_eq!(h.by_vcpu.get(&(1, 30)), Some(&100));
        assert_eq!(h.dropped, 0);
        Ok(())
    }

    #[test]
    fn svm_names_are_the_svm_table() -> Result<(), TraceError> {
        let counts = format!(
            "7 vcpu 0 reason cpuid\n3 vcpu 0 reason npf\n2 vcpu 0 reason PF excp\n{}",
            tail(12)
        );
        let h = parse(FORMAT, &counts, isa::SVM)?;
        assert_eq!(
            h.by_reason.get(&ExitKey::from_raw(isa::SVM, 0x4e)),
            Some(&2)
        );
        assert_eq!(
            h.by_reason.get(&ExitKey::from_raw(isa::SVM, 0x72)),
            Some(&7)
        );
        assert_eq!(
            h.by_reason.get(&ExitKey::from_raw(isa::SVM, 0x400)),
            Some(&3)
        );
        // A VMX name on an SVM host is no SVM reason.
        let wrong = format!("7 vcpu 0 reason CPUID\n{}", tail(7));
        assert!(matches!(
            parse(FORMAT, &wrong, isa::SVM),
            Err(TraceError::UnknownName { .. })
        ));
        Ok(())
    }

    #[test]
    fn anything_lost_or_unread_fails() {
        let lost = "7 vcpu 0 reason CPUID\n# counted 7 unmatched 0\n\
            # entries-in-buffer/entries-written: 7/9   #P:1\noverrun: 2\ndropped events: 0\n";
        assert_eq!(
            parse(FORMAT, lost, isa::VMX),
            Err(TraceError::Lost("overrun 2".into()))
        );
        let short = "7 vcpu 0 reason CPUID\n# counted 7 unmatched 0\n\
            # entries-in-buffer/entries-written: 7/9   #P:1\noverrun: 0\n";
        assert!(matches!(
            parse(FORMAT, short, isa::VMX),
            Err(TraceError::Incomplete { .. })
        ));
        let odd = "7 vcpu 0 reason CPUID\n# unmatched-line  <idle>-0 [000] foo: bar\n\
            # counted 7 unmatched 1\n# entries-in-buffer/entries-written: 8/8   #P:1\n";
        assert!(matches!(
            parse(FORMAT, odd, isa::VMX),
            Err(TraceError::Unmatched(1, _))
        ));
        assert_eq!(
            parse(FORMAT, "7 vcpu 0 reason CPUID\n", isa::VMX),
            Err(TraceError::Missing("# counted"))
        );
        // A reference that counted nothing checks nothing.
        assert_eq!(parse(FORMAT, &tail(0), isa::VMX), Err(TraceError::Empty));
        assert!(matches!(
            parse(
                FORMAT,
                &format!("seven vcpu 0 reason CPUID\n{}", tail(0)),
                isa::VMX
            ),
            Err(TraceError::BadLine(_))
        ));
    }
}
