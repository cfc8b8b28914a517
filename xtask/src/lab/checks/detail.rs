//! `record --detail` and `--rip` against the kernel: every detail row equals the hist
//! trigger keyed the same way (decoded by the model's own decoder), every RIP row the
//! `keys=exit_reason,guest_rip` trigger, and the micro workload's known sub-keys are
//! exact.

use std::collections::BTreeMap;

use anyhow::Context as _;
use std::path::Path;

use kvmtrace_model::{
    detail::{self, KernelTriggers, KeyCounts},
    kernel_hist,
    report::Report,
};
use tracer_common::ExitKey;

use crate::{
    files::write_in as write,
    lab::console::{self, Line},
};

/// What one mode's detail check needs.
pub struct Inputs<'a> {
    pub tag: &'a str,
    /// Nested paging: EPT violations / NPFs are keyed by guest-physical region. Under
    /// shadow paging a #PF exit keeps its vector, so `kvm_page_fault` is not compared.
    pub nested: bool,
    /// The isa of `kvm:kvm_exit` records (the RIP trigger's key has none).
    pub trace_isa: u32,
    /// The `kvm:kvm_exit` hist file: the count, detail and RIP triggers together.
    pub exit_hist: &'a str,
    pub lines: &'a [Line],
    pub dir: &'a Path,
    /// The micro workload's known rows (`None` for other workloads).
    pub micro: Option<Vec<((String, String), u64)>>,
    /// The kvmtrace binary, run here to render the record as a user sees it.
    pub kvmtrace: &'a Path,
    /// The L2 kernel's System.map (booted with `nokaslr`), to name the RIPs.
    pub system_map: Option<&'a Path>,
}

/// Checks mode `m`'s record made with `--detail` and/or `--rip`; returns its problems.
pub fn check(m: &Inputs<'_>) -> anyhow::Result<Vec<String>> {
    let tag = m.tag;
    let Ok(text) = std::fs::read_to_string(m.dir.join("record.json")) else {
        return Ok(vec![format!(
            "{tag}: no record.json to check --detail/--rip against"
        )]);
    };
    let report = Report::from_json(&text)?;
    let mut problems = Vec::new();
    let detail_on = report.reasons.iter().any(|r| !r.detail.is_empty());
    let msr = console::section(m.lines, "detail-msr", tag);
    if let Some(msr) = msr {
        let (Some(cpuid), Some(pf)) = (
            console::section(m.lines, "detail-cpuid", tag),
            console::section(m.lines, "detail-pf", tag),
        ) else {
            return Ok(vec![format!("{tag}: a detail trigger's hist is missing")]);
        };
        for (name, text) in [("msr", &msr), ("cpuid", &cpuid), ("pf", &pf)] {
            write(m.dir, &format!("hist-{name}.txt"), text)?;
        }
        let reference = detail::reference(&KernelTriggers {
            exit: m.exit_hist,
            msr: &msr,
            cpuid: &cpuid,
            page_fault: m.nested.then_some(pf.as_str()),
        })?;
        let skip: &[&str] = if m.nested { &[] } else { &["gpa"] };
        let ours = report.detail_totals(skip);
        problems.extend(compare_detail(tag, &reference, &ours, detail_on));
        if let Some(known) = &m.micro {
            problems.extend(micro_detail(tag, known, &reference, &ours));
        }
        print_undecoded(&report);
        let dropped = kernel_hist::dropped(&msr)?
            + kernel_hist::dropped(&cpuid)?
            + kernel_hist::dropped(&pf)?;
        if dropped > 0 {
            problems.push(format!(
                "{tag}: the detail triggers dropped {dropped} entries"
            ));
        }
    } else if detail_on {
        problems.push(format!(
            "{tag}: kvmtrace has detail rows but the lab armed no detail trigger"
        ));
    }
    if report.reasons.iter().any(|r| !r.rips.is_empty()) {
        problems.extend(compare_rips(tag, m.trace_isa, m.exit_hist, &report)?);
    }
    problems.extend(render_table(m)?);
    Ok(problems)
}

/// `kvmtrace show --detail` of the record, as a user runs it, into
/// `detail-table.txt`.
fn render_table(m: &Inputs<'_>) -> anyhow::Result<Option<String>> {
    let mut cmd = std::process::Command::new(m.kvmtrace);
    cmd.arg("show")
        .arg("--detail")
        .arg(m.dir.join("record.json"))
        .arg("-o")
        .arg(m.dir.join("detail-table.txt"));
    if let Some(map) = m.system_map.filter(|p| p.exists()) {
        cmd.arg("--guest-symbols").arg(map);
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", m.kvmtrace.display()))?;
    Ok((!out.status.success()).then(|| {
        format!(
            "{}: kvmtrace show --detail failed: {}",
            m.tag,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }))
}

/// Every (kind, key) in either map must have the same count in both.
fn compare_detail(
    tag: &str,
    reference: &KeyCounts,
    ours: &KeyCounts,
    detail_on: bool,
) -> Vec<String> {
    if reference.is_empty() || !detail_on {
        return vec![format!(
            "{tag}: --detail checked nothing: the kernel's triggers have {} rows, kvmtrace's record {}",
            reference.len(),
            if detail_on {
                "has detail rows"
            } else {
                "has none"
            }
        )];
    }
    let mut wrong = Vec::new();
    let keys: std::collections::BTreeSet<_> = reference.keys().chain(ours.keys()).collect();
    for k in &keys {
        let (want, have) = (reference.get(*k), ours.get(*k));
        if want != have {
            wrong.push(format!(
                "{} {}: hist {}, kvmtrace {}",
                k.0,
                k.1,
                want.map_or("-".into(), u64::to_string),
                have.map_or("-".into(), u64::to_string)
            ));
        }
    }
    let mut kinds: Vec<&str> = reference.keys().map(|k| k.0.as_str()).collect();
    kinds.dedup();
    println!(
        "  detail: {} sub-keys ({}), {} exits: {}",
        keys.len(),
        kinds.join(", "),
        reference.values().sum::<u64>(),
        if wrong.is_empty() {
            "kvmtrace == kernel hist".to_owned()
        } else {
            format!("{} DIFFER", wrong.len())
        }
    );
    for w in wrong.iter().take(12) {
        println!("    {w}");
    }
    if wrong.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "{tag}: {} detail rows differ from the kernel's hist, e.g. {}",
            wrong.len(),
            wrong[0]
        )]
    }
}

/// The micro workload's known sub-keys, in the hist and in kvmtrace's rows.
fn micro_detail(
    tag: &str,
    known: &[((String, String), u64)],
    reference: &KeyCounts,
    ours: &KeyCounts,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (key, want) in known {
        let (hist, have) = (
            reference.get(key).copied().unwrap_or(0),
            ours.get(key).copied().unwrap_or(0),
        );
        let ok = hist == *want && have == *want;
        println!(
            "  micro detail {} {}: expected {want}, hist {hist}, kvmtrace {have} {}",
            key.0,
            key.1,
            if ok { "ok" } else { "WRONG" }
        );
        if !ok {
            problems.push(format!("{tag}: micro detail {} {} is off", key.0, key.1));
        }
    }
    problems
}

/// Prints the exits whose sub-key kvmtrace did not see, per reason (no hist keys them).
fn print_undecoded(report: &Report) {
    for r in &report.reasons {
        for d in r.detail.iter().filter(|d| d.kind == detail::UNDECODED_KEY) {
            println!(
                "  detail: {} has {} exits with no sub-key seen",
                r.name, d.totals.count
            );
        }
    }
}

/// The kernel's `keys=exit_reason,guest_rip` counts: (basic reason, failed entry) ->
/// RIP -> exits.
fn rip_counts(
    trace_isa: u32,
    exit_hist: &str,
) -> anyhow::Result<BTreeMap<(u32, bool), BTreeMap<u64, u64>>> {
    let mut hist: BTreeMap<(u32, bool), BTreeMap<u64, u64>> = BTreeMap::new();
    for (keys, n) in kernel_hist::rows(exit_hist)? {
        if keys.len() != 2 {
            continue;
        }
        let (Some(&raw), Some(&rip)) = (keys.get("exit_reason"), keys.get("guest_rip")) else {
            continue;
        };
        let exit = ExitKey::from_raw(trace_isa, u32::try_from(raw)?);
        *hist
            .entry((exit.reason, exit.failed_entry != 0))
            .or_default()
            .entry(rip)
            .or_default() += n;
    }
    Ok(hist)
}

/// Each RIP row equals the kernel's `keys=exit_reason,guest_rip` count, the rows are
/// the reason's top RIPs, and the rest adds up.
fn compare_rips(
    tag: &str,
    trace_isa: u32,
    exit_hist: &str,
    report: &Report,
) -> anyhow::Result<Vec<String>> {
    let hist = rip_counts(trace_isa, exit_hist)?;
    if hist.is_empty() {
        return Ok(vec![format!(
            "{tag}: --rip checked nothing: the kernel's guest_rip trigger has no rows"
        )]);
    }
    let mut wrong = Vec::new();
    let mut rows = 0;
    for r in report.reasons.iter().filter(|r| !r.rips.is_empty()) {
        let empty = BTreeMap::new();
        let by_rip = hist.get(&(r.reason, r.failed_entry)).unwrap_or(&empty);
        for x in &r.rips {
            rows += 1;
            let want = by_rip.get(&x.rip).copied().unwrap_or(0);
            if want != x.count {
                wrong.push(format!(
                    "{} at {:#x}: hist {want}, kvmtrace {}",
                    r.name, x.rip, x.count
                ));
            }
        }
        let shown: Vec<u64> = r.rips.iter().map(|x| x.rip).collect();
        let least = r.rips.iter().map(|x| x.count).min().unwrap_or(0);
        if let Some((rip, n)) = by_rip
            .iter()
            .find(|(rip, n)| !shown.contains(rip) && **n > least)
        {
            wrong.push(format!(
                "{} at {rip:#x}: {n} exits, more than a RIP shown",
                r.name
            ));
        }
        let total: u64 = by_rip.values().sum();
        let listed: u64 = r.rips.iter().map(|x| x.count).sum();
        if total.saturating_sub(listed) != r.rips_rest {
            wrong.push(format!(
                "{}: the other RIPs have {} exits in the hist, kvmtrace says {}",
                r.name,
                total.saturating_sub(listed),
                r.rips_rest
            ));
        }
    }
    println!(
        "  rip: {rows} rows: {}",
        if wrong.is_empty() {
            "kvmtrace == kernel hist, and they are each reason's top RIPs".to_owned()
        } else {
            format!("{} DIFFER", wrong.len())
        }
    );
    for w in wrong.iter().take(12) {
        println!("    {w}");
    }
    Ok(if wrong.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "{tag}: {} RIP rows differ from the kernel's hist, e.g. {}",
            wrong.len(),
            wrong[0]
        )]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_checked_is_a_failure() {
        let empty = KeyCounts::new();
        assert_eq!(compare_detail("ept1", &empty, &empty, true).len(), 1);
        let mut one = KeyCounts::new();
        one.insert(("port".into(), "0x1e0:out:1".into()), 100);
        assert_eq!(
            compare_detail("ept1", &one, &one, false).len(),
            1,
            "no kvmtrace rows"
        );
        assert!(compare_detail("ept1", &one, &one, true).is_empty());
        let mut other = one.clone();
        other.insert(("msr".into(), "0xc0000080:read".into()), 1);
        assert_eq!(
            compare_detail("ept1", &one, &other, true).len(),
            1,
            "an extra row"
        );
    }
}
