//! Turns the L1 console into per-mode results: the kernel hist (ground truth), the
//! kvmtrace JSON, the comparison, and the files under `target/lab/<isa>/<mode>/`.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde_json::Value;

use super::emulator::Line;

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
    fn from_raw(isa: u32, raw: u64) -> Self {
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

/// kvmtrace's `kvmtrace.record.v1` JSON, the parts the lab compares.
#[derive(Default)]
pub struct Record {
    pub by_reason: Counts,
    pub by_vcpu: VcpuCounts,
    pub total: Option<u64>,
    pub dropped: Value,
    pub paging: Value,
}

pub fn parse_record(text: &str) -> anyhow::Result<Record> {
    let v: Value = serde_json::from_str(text).context("kvmtrace's JSON does not parse")?;
    let schema = v.get("schema").and_then(Value::as_str).unwrap_or("?");
    if schema != "kvmtrace.record.v1" {
        bail!("unexpected kvmtrace JSON schema {schema:?}");
    }
    let reason = |r: &Value| -> anyhow::Result<(Reason, u64)> {
        let isa = match r.get("isa") {
            Some(Value::String(s)) if s == "vmx" => ISA_VMX,
            Some(Value::String(s)) if s == "svm" => ISA_SVM,
            Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
            other => bail!("bad isa {other:?} in {r}"),
        };
        let code = r
            .get("reason")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .with_context(|| format!("no reason in {r}"))?;
        let failed_entry = r
            .get("failed_entry")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let count = r
            .get("count")
            .and_then(Value::as_u64)
            .with_context(|| format!("no count in {r}"))?;
        Ok((
            Reason {
                isa,
                reason: code,
                failed_entry,
            },
            count,
        ))
    };
    let mut rec = Record::default();
    for r in v
        .get("reasons")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (key, count) = reason(r)?;
        *rec.by_reason.entry(key).or_default() += count;
    }
    for r in v
        .get("vcpus")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (key, count) = reason(r)?;
        let vcpu = r
            .get("vcpu_id")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .with_context(|| format!("no vcpu_id in {r}"))?;
        *rec.by_vcpu.entry((vcpu, key)).or_default() += count;
    }
    rec.total = v.pointer("/total/count").and_then(Value::as_u64);
    rec.dropped = v.get("dropped").cloned().unwrap_or(Value::Null);
    rec.paging = v.get("paging").cloned().unwrap_or(Value::Null);
    Ok(rec)
}

impl Record {
    /// A `dropped` counter of the record (0 when absent).
    pub fn dropped(&self, field: &str) -> u64 {
        self.dropped.get(field).and_then(Value::as_u64).unwrap_or(0)
    }
}

/// The phase of a whole-run record (`--scenario reload`) whose paging mode is `tag`
/// (`ept1`, `npt0`), as a record of its own: its reasons, total and paging, and the
/// whole run's `dropped`. `None` when no phase had that mode.
pub fn phase_record(all: &str, tag: &str) -> anyhow::Result<Option<(Record, String)>> {
    let v: Value = serde_json::from_str(all).context("kvmtrace's JSON does not parse")?;
    let label = |p: &Value| {
        let param = p.pointer("/paging/parameter")?.as_str()?;
        let nested = p.pointer("/paging/nested")?.as_bool()?;
        Some(format!("{param}{}", u8::from(nested)))
    };
    let Some(phase) = v
        .get("phases")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|p| label(p).as_deref() == Some(tag))
    else {
        return Ok(None);
    };
    let text = serde_json::to_string_pretty(&serde_json::json!({
        "schema": v.get("schema"),
        "phase": phase.get("phase"),
        "paging": phase.get("paging"),
        "total": phase.get("total"),
        "reasons": phase.get("reasons"),
        "dropped": v.get("dropped"),
    }))?;
    Ok(Some((parse_record(&text)?, text)))
}

/// The text between `KVMLAB begin KIND MODE` and `KVMLAB end KIND MODE`.
pub fn section(lines: &[Line], kind: &str, mode: &str) -> Option<String> {
    let begin = format!("KVMLAB begin {kind} {mode}");
    let end = format!("KVMLAB end {kind} {mode}");
    let start = lines.iter().position(|l| l.text == begin)?;
    let len = lines[start + 1..].iter().position(|l| l.text == end)?;
    let mut text = String::new();
    for l in &lines[start + 1..start + 1 + len] {
        text.push_str(&l.text);
        text.push('\n');
    }
    Some(text)
}

/// The console lines of one mode: from its `load` step to the next mode's.
pub fn mode_lines<'a>(lines: &'a [Line], mode: &str) -> &'a [Line] {
    let first = format!("KVMLAB step {mode}:load ");
    let Some(start) = lines.iter().position(|l| l.text.starts_with(&first)) else {
        return &[];
    };
    let len = lines[start + 1..]
        .iter()
        .position(|l| l.text.starts_with("KVMLAB step ") && !l.text.contains(&format!(" {mode}:")))
        .map_or(lines.len() - start, |n| n + 1);
    &lines[start..start + len]
}

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

/// A plain-text table of `rows`.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let has_rec = rows.iter().any(|r| r.kvmtrace.is_some());
    let _ = write!(out, "  {:>6}  {:<28} {:>9}", "reason", "name", "hist");
    if has_rec {
        let _ = write!(out, " {:>9}  diff", "kvmtrace");
    }
    out.push('\n');
    let (mut th, mut tk) = (0u64, 0u64);
    for r in rows {
        th += r.hist;
        let _ = write!(
            out,
            "  {:>6}  {:<28} {:>9}",
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
    let _ = write!(out, "  {:>6}  {:<28} {:>9}", "", "total", th);
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

/// Writes `text` to `dir/name`.
pub fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))
}

/// What breaks the timing invariants in a `kvmtrace.record.v1` JSON: in every row
/// (reasons, VMs, vCPU rows, phases and their reasons, the total) `timed <= count`,
/// and every reason's histogram buckets add up to its `timed` (unless the histogram
/// map was full, which `dropped.hist_map_full` says); phases keep no histograms. Empty when all hold; an error
/// when the JSON has no rows to check at all.
pub fn timing_problems(text: &str) -> anyhow::Result<Vec<String>> {
    let v: Value = serde_json::from_str(text).context("kvmtrace's JSON does not parse")?;
    let hist_full = v
        .pointer("/dropped/hist_map_full")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let rows = |key: &str| -> Vec<(String, &Value)> {
        v.get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| (format!("{key}[{i}]"), r))
            .collect()
    };
    let mut checked: Vec<(String, &Value)> = ["reasons", "vms", "vcpus"]
        .into_iter()
        .flat_map(rows)
        .collect();
    for (name, phase) in rows("phases") {
        checked.push((format!("{name}.total"), &phase["total"]));
        for (i, r) in phase["reasons"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            checked.push((format!("{name}.reasons[{i}]"), r));
        }
    }
    if checked.is_empty() {
        bail!("the record has no rows: nothing to check the timing of");
    }
    checked.push(("total".to_owned(), &v["total"]));
    let mut problems = Vec::new();
    for (name, row) in checked {
        let field = |f: &str| row.get(f).and_then(Value::as_u64);
        let (Some(count), Some(timed)) = (field("count"), field("timed")) else {
            problems.push(format!("{name} has no count or timed"));
            continue;
        };
        if timed > count {
            problems.push(format!("{name}: timed {timed} > count {count}"));
        }
        // Only the record's own reason rows keep a histogram (phases' are empty).
        let histogram = row
            .get("histogram")
            .and_then(Value::as_array)
            .filter(|_| name.starts_with("reasons["));
        if let Some(buckets) = histogram {
            let sum: u64 = buckets
                .iter()
                .filter_map(|b| b.get("count").and_then(Value::as_u64))
                .sum();
            if sum != timed && !(hist_full > 0 && sum < timed) {
                problems.push(format!(
                    "{name}: histogram buckets sum to {sum}, timed is {timed}"
                ));
            }
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn timing_invariants() {
        let good = r#"{"total":{"count":5,"timed":4,"time_ns":9},
            "reasons":[{"count":5,"timed":4,"histogram":[{"count":3},{"count":1}]}],
            "vcpus":[{"count":5,"timed":4}],
            "phases":[{"total":{"count":5,"timed":4},
                       "reasons":[{"count":5,"timed":4,"histogram":[]}]}]}"#;
        assert_eq!(timing_problems(good).ok(), Some(Vec::new()));
        let bad = r#"{"total":{"count":5,"timed":6},
            "reasons":[{"count":5,"timed":4,"histogram":[{"count":3}]}],
            "vms":[{"count":1}]}"#;
        assert_eq!(
            timing_problems(bad).ok(),
            Some(vec![
                "reasons[0]: histogram buckets sum to 3, timed is 4".to_owned(),
                "vms[0] has no count or timed".to_owned(),
                "total: timed 6 > count 5".to_owned(),
            ])
        );
        let full = r#"{"dropped":{"hist_map_full":1},"total":{"count":5,"timed":4},
            "reasons":[{"count":5,"timed":4,"histogram":[{"count":3}]}]}"#;
        assert_eq!(timing_problems(full).ok(), Some(Vec::new()));
        assert!(timing_problems(r#"{"total":{"count":0,"timed":0}}"#).is_err());
    }
}
