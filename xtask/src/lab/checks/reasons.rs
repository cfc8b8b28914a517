//! kvmtrace against the kernel hist, per exit reason.

use std::fmt::Write as _;

use serde::Serialize;

use crate::lab::{
    hist::Source,
    reason::{Counts, Reason},
    record::{self, Record},
};

/// One row of the comparison.
#[derive(Serialize)]
pub struct Row {
    #[serde(flatten)]
    pub reason: Reason,
    pub name: String,
    pub hist: u64,
    pub kvmtrace: Option<u64>,
}

/// Every reason either side saw, with both counts.
pub fn compare(hist: &Counts, rec: Option<&Counts>) -> Vec<Row> {
    let mut keys: Vec<Reason> = hist.keys().copied().collect();
    if let Some(rec) = rec {
        keys.extend(rec.keys().copied());
    }
    keys.sort();
    keys.dedup();
    let mut rows: Vec<Row> = keys
        .into_iter()
        .map(|k| Row {
            name: k.name(),
            hist: hist.get(&k).copied().unwrap_or(0),
            kvmtrace: rec.map(|r| r.get(&k).copied().unwrap_or(0)),
            reason: k,
        })
        .collect();
    rows.sort_by(|a, b| b.hist.cmp(&a.hist).then(a.reason.cmp(&b.reason)));
    rows
}

/// A plain-text table of `rows`, the reference's column named after its `source`.
pub fn table(rows: &[Row], source: Source) -> String {
    let mut out = String::new();
    let has_rec = rows.iter().any(|r| r.kvmtrace.is_some());
    let w = source.name().len().max(9);
    let _ = write!(
        out,
        "  {:>6}  {:<28} {:>w$}",
        "reason",
        "name",
        source.name()
    );
    if has_rec {
        let _ = write!(out, " {:>9}  diff", "kvmtrace");
    }
    out.push('\n');
    let (mut th, mut tk) = (0u64, 0u64);
    for r in rows {
        th += r.hist;
        let _ = write!(
            out,
            "  {:>6}  {:<28} {:>w$}",
            format!("{:#x}", r.reason.reason),
            r.name,
            r.hist
        );
        if let Some(k) = r.kvmtrace {
            tk += k;
            let diff = i128::from(k) - i128::from(r.hist);
            let mark = if diff == 0 {
                "=".to_owned()
            } else {
                format!("{diff:+}")
            };
            let _ = write!(out, " {k:>9}  {mark}");
        }
        out.push('\n');
    }
    let _ = write!(out, "  {:>6}  {:<28} {:>w$}", "", "total", th);
    if has_rec {
        let mark = if th == tk {
            "=".to_owned()
        } else {
            format!("{:+}", i128::from(tk) - i128::from(th))
        };
        let _ = write!(out, " {tk:>9}  {mark}");
    }
    out.push('\n');
    out
}

/// Whether the record `rec` agrees with the reference (`source`) in `rows`: the line
/// that says so, or the problem. A full per-reason map agrees when the reasons that
/// got in are exact and the others are all in `dropped.exit_map_full`.
fn agreement(rows: &[Row], source: Source, rec: &Record) -> Result<String, String> {
    let reference = source.name();
    let diffs: Vec<&Row> = rows.iter().filter(|r| r.kvmtrace != Some(r.hist)).collect();
    let full = rec.dropped.exit_map_full;
    let uncounted: u64 = diffs
        .iter()
        .filter(|r| r.kvmtrace == Some(0))
        .map(|r| r.hist)
        .sum();
    if diffs.is_empty() {
        Ok(format!(
            "kvmtrace == {reference} for all {} reasons",
            rows.len()
        ))
    } else if full > 0 && diffs.iter().all(|r| r.kvmtrace == Some(0)) && uncounted == full {
        Ok(format!(
            "kvmtrace == {reference} for the {} reasons it had room for; the other {} reasons' {full} exits are in dropped.exit_map_full",
            rows.len() - diffs.len(),
            diffs.len()
        ))
    } else {
        Err(format!(
            "kvmtrace differs from the {reference} in {} reasons",
            diffs.len()
        ))
    }
}

/// The timing invariants of one record (see [`record::timing_problems`]), printed;
/// what breaks them, as problems of `what`.
pub fn timing_check(what: &str, record: &str) -> anyhow::Result<Vec<String>> {
    let problems = record::timing_problems(record)?;
    if problems.is_empty() {
        println!("  {what}: timing invariants hold (timed <= count, histogram sums to timed)");
    }
    Ok(problems
        .into_iter()
        .map(|p| format!("{what}: timing: {p}"))
        .collect())
}

/// kvmtrace's verdict against the reference (`source`) in one mode, printed: equal for
/// every reason (or for those its full per-reason map had room for), or no record at
/// all. The problems, as problems of `tag`.
/// kvmtrace's maps' kernel bytes: each as its plan says, where the kernel charges a
/// map its footprint (`exact`: Linux 5.11-6.3, e.g. the lab's 6.1); printed anyway.
/// A record with no map costs checked nothing: a problem.
pub fn memory_problems(tag: &str, rec: &Record, exact: bool) -> Vec<String> {
    if rec.maps.is_empty() {
        return vec![format!("{tag}: the record has no map costs (cost.maps)")];
    }
    let total: u64 = rec.maps.iter().map(|m| m.kernel_bytes).sum();
    let off: Vec<String> = rec
        .maps
        .iter()
        .filter(|m| m.planned_bytes != Some(m.kernel_bytes))
        .map(|m| {
            format!(
                "{} kernel {} planned {:?}",
                m.name, m.kernel_bytes, m.planned_bytes
            )
        })
        .collect();
    println!(
        "  kernel memory: {} maps, {:.1} MiB; {}",
        rec.maps.len(),
        total as f64 / f64::from(1 << 20),
        if off.is_empty() {
            "each as planned".to_owned()
        } else {
            format!("{} not as planned ({})", off.len(), off.join(", "))
        }
    );
    if exact && !off.is_empty() {
        return vec![format!("{tag}: maps not as planned: {}", off.join(", "))];
    }
    Vec::new()
}

pub fn check_record(
    tag: &str,
    rows: &[Row],
    source: Source,
    record: Option<&Record>,
    kvmtrace_ran: bool,
    kvmtrace_err: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    match (record, kvmtrace_ran) {
        (Some(rec), _) => {
            match agreement(rows, source, rec) {
                Ok(line) => println!("  {line}"),
                Err(problem) => problems.push(format!("{tag}: {problem}")),
            }
            let dropped = serde_json::to_string(&rec.dropped).unwrap_or_default();
            println!("  kvmtrace paging: {}, dropped: {dropped}", rec.paging);
        }
        (None, true) => {
            let why = kvmtrace_err
                .lines()
                .last()
                .unwrap_or("no output")
                .to_owned();
            println!("  kvmtrace produced no record: {why}");
            problems.push(format!("{tag}: kvmtrace produced no record ({why})"));
        }
        (None, false) => println!("  (kvmtrace not run: hist only)"),
    }
    problems
}

#[cfg(test)]
mod tests {
    use kvmtrace_model::report::Dropped;

    use super::*;
    use crate::lab::reason::{ISA_VMX, VcpuCounts};

    fn record() -> Record {
        Record {
            by_reason: Counts::new(),
            by_vcpu: VcpuCounts::new(),
            by_vm: std::collections::BTreeMap::new(),
            maps: Vec::new(),
            total: None,
            dropped: Dropped::default(),
            paging: "null".to_owned(),
        }
    }

    fn row(reason: u32, hist: u64, kvmtrace: u64) -> Row {
        let reason = Reason {
            isa: ISA_VMX,
            reason,
            failed_entry: false,
        };
        Row {
            name: reason.name(),
            reason,
            hist,
            kvmtrace: Some(kvmtrace),
        }
    }

    #[test]
    fn the_verdict_names_the_reference_it_was_checked_against() {
        let rows = [row(10, 651, 651), row(30, 12, 12)];
        assert_eq!(
            agreement(&rows, Source::TraceBuffer, &record()).as_deref(),
            Ok("kvmtrace == trace buffer for all 2 reasons")
        );
        assert_eq!(
            agreement(&rows, Source::Hist, &record()).as_deref(),
            Ok("kvmtrace == hist for all 2 reasons")
        );
        let off = [row(10, 651, 650), row(30, 12, 12)];
        assert_eq!(
            agreement(&off, Source::TraceBuffer, &record()),
            Err("kvmtrace differs from the trace buffer in 1 reasons".to_owned())
        );
        let table = table(&rows, Source::TraceBuffer);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines.first().copied(),
            Some("  reason  name                         trace buffer  kvmtrace  diff")
        );
        assert_eq!(
            lines.last().copied(),
            Some("          total                                 663       663  =")
        );
    }
}
