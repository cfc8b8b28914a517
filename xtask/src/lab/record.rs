//! kvmtrace's `kvmtrace.record.v1` JSON, read as a `serde_json::Value`: the parts the
//! lab compares ([`parse_record`], [`phase_record`]), its timing invariants
//! ([`timing_problems`]) and kvmtrace's own costs for the bench ([`Cost`]). Every
//! reading of the record's JSON is here, so a shared model crate can replace it in
//! one place.

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::reason::{Counts, ISA_SVM, ISA_VMX, Reason, VcpuCounts};

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

/// kvmtrace's own costs from one record: start to attached, peak RSS, and the eBPF
/// run time per exit when bpf stats were on.
#[derive(Clone, Debug, Default)]
pub struct Cost {
    pub attach_ms: f64,
    pub peak_rss_mib: f64,
    pub exits: u64,
    pub ns_per_exit: Option<f64>,
}

impl Cost {
    pub fn from_record(text: &str) -> anyhow::Result<Self> {
        let v: Value = serde_json::from_str(text).context("kvmtrace's JSON does not parse")?;
        let num = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
        let programs = v
            .pointer("/cost/programs")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let program = |name: &str| {
            programs
                .iter()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
                .map(|p| {
                    (
                        p.get("run_count").and_then(Value::as_u64).unwrap_or(0),
                        p.get("run_time_ns").and_then(Value::as_u64).unwrap_or(0),
                    )
                })
                .unwrap_or_default()
        };
        let (exit_runs, exit_ns) = program("kvm_exit");
        let (_, entry_ns) = program("kvm_entry");
        let stats = v.pointer("/cost/bpf_stats").and_then(Value::as_bool) == Some(true);
        Ok(Self {
            attach_ms: num("/cost/attach_ns") as f64 / 1e6,
            peak_rss_mib: num("/cost/peak_rss_kib") as f64 / 1024.0,
            exits: num("/total/count"),
            // Both programs run once per exit: their time together is the cost of one.
            ns_per_exit: (stats && exit_runs > 0)
                .then(|| (exit_ns + entry_ns) as f64 / exit_runs as f64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
