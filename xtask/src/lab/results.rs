//! Each mode's results: read from the console, written under
//! `target/lab/<isa>/<mode>/`, checked and printed.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::{
    checks::{crowd, detail, guest, micro, reasons, vcpus},
    console::{self, Line},
    emulator::Run,
    hist::{self, Hist, Source},
    image::{self, L1, Workload as L2Workload},
    options::{Options, Scenario, mode_dir_name, workload_label},
    prometheus::Exported,
    reason::{Counts, Reason},
    record::{self, Record},
};
use crate::files::write_in as write;

/// What every step of [`summarize`] reads: the options, where results go, the run's
/// console and what L1 ran.
struct Lab<'a> {
    opts: &'a Options,
    out: &'a Path,
    run: &'a Run,
    l1: &'a L1,
    /// `--scenario export`: what Prometheus and L1's scrapes showed.
    exported: Option<&'a Exported>,
}

/// One mode's results, read from the console (and written as they are read).
struct ModeResults<'a> {
    /// `ept1`, `npt0`, ...
    tag: String,
    dir: PathBuf,
    lines: &'a [Line],
    hist: Hist,
    /// The `kvm:kvm_exit` hist file as printed (every trigger on it).
    hist_text: String,
    /// Nested paging (`ept=1`, `npt=1`).
    nested: bool,
    record: Option<Record>,
    kvmtrace_err: String,
    rows: Vec<reasons::Row>,
    run_time: f64,
    reached_end: bool,
}

/// Parses the console, writes `target/lab/<isa>/<mode>/`, prints the tables; fails if
/// kvmtrace ran and disagrees with the hist, or the micro workload's counts are off.
pub fn summarize(
    opts: &Options,
    out: &Path,
    run: &Run,
    l1: &L1,
    exported: Option<&Exported>,
) -> anyhow::Result<()> {
    let lab = Lab {
        opts,
        out,
        run,
        l1,
        exported,
    };
    let mut problems = Vec::new();
    if let Some(e) = exported {
        println!(
            "Prometheus {} scraped L1's kvmtrace export every second",
            e.prometheus_version
        );
        if e.dist_problems.is_empty() {
            println!(
                "dist/ and the lab's TLS files pass promtool, and no counter went back across the module reloads"
            );
        }
        problems.extend(e.dist_problems.iter().cloned());
        // SIGTERM stops the exporter cleanly: status 0.
        let stopped = run
            .lines
            .iter()
            .find_map(|l| l.text.split("KVMLAB export kvmtrace rc=").nth(1))
            .and_then(|rest| rest.split_whitespace().next());
        match stopped {
            Some("0") => println!("kvmtrace export stopped on SIGTERM with status 0"),
            Some(rc) => problems.push(format!("kvmtrace export exited {rc} on SIGTERM")),
            None => problems.push("kvmtrace export's end is not on the console".to_owned()),
        }
    }
    match console::l1_cpus_up(&run.lines) {
        Some(n) if n == u64::from(opts.l1_cpus) => println!("L1 brought up {n} CPU(s)"),
        Some(n) => problems.push(format!(
            "L1 brought up {n} CPU(s), --l1-cpus asked for {}",
            opts.l1_cpus
        )),
        None => problems.push("L1 did not say how many CPUs it has".to_owned()),
    }
    let whole = whole_record(&lab, &mut problems)?;
    for mode in &opts.modes {
        let Some(results) = read_mode(&lab, *mode, whole.as_deref(), &mut problems)? else {
            continue;
        };
        check_mode(&lab, &results, whole.is_some(), &mut problems)?;
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("; "))
    }
}

/// `--scenario reload`: one record for the whole run, split into phases. Writes it
/// and kvmtrace's stderr of the whole run, and returns it.
fn whole_record(lab: &Lab<'_>, problems: &mut Vec<String>) -> anyhow::Result<Option<String>> {
    let whole = console::section(&lab.run.lines, "record", "all");
    if let Some(text) = &whole {
        write(lab.out, "record.json", text)?;
        problems.extend(reasons::timing_check("the whole record", text)?);
    }
    if let Some(err) = console::section(&lab.run.lines, "kvmtrace-stderr", "all") {
        write(lab.out, "kvmtrace.stderr", &err)?;
    }
    if lab.opts.scenario == Scenario::Reload && whole.is_none() && lab.l1.kvmtrace.is_some() {
        problems.push("kvmtrace wrote no record across the reloads".to_owned());
    }
    Ok(whole)
}

/// Reads mode `mode` from the console and writes what it found to its directory:
/// `serial.log`, `hist.txt`, `record.json` or `phase.json`, `dmesg-bad.txt`,
/// `kvmtrace.stderr`. `None` when the console has no hist for it.
fn read_mode<'a>(
    lab: &Lab<'a>,
    mode: u8,
    whole: Option<&str>,
    problems: &mut Vec<String>,
) -> anyhow::Result<Option<ModeResults<'a>>> {
    let (opts, all_lines) = (lab.opts, &lab.run.lines);
    let tag = format!("{}{mode}", opts.isa.paging());
    let dir_name = mode_dir_name(opts, mode);
    let dir = lab.out.join(&dir_name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let lines = console::mode_lines(all_lines, &tag);
    write(&dir, "serial.log", console::transcript(lines))?;

    let Some((hist, hist_text)) = reference(all_lines, &tag, &dir, opts.isa, problems)? else {
        return Ok(None);
    };
    if hist.dropped != 0 {
        problems.push(format!("{tag}: the hist dropped {} entries", hist.dropped));
    }
    let record = read_record(all_lines, &tag, &dir, whole, problems)?;
    if let Some(bad) = console::section(all_lines, "dmesg-bad", &tag) {
        write(&dir, "dmesg-bad.txt", &bad)?;
        let complaints = console::dmesg_complaints(&bad, lab.opts.allowed_warning());
        if !complaints.is_empty() {
            problems.push(format!(
                "{tag}: L1's kernel complained:\n{}",
                complaints.join("\n")
            ));
        }
    }
    for report in ["perf-ioport", "perf-vmexit"] {
        if let Some(text) = console::section(all_lines, report, &tag) {
            write(&dir, &format!("{report}.txt"), &text)?;
        }
    }
    let kvmtrace_err = console::section(all_lines, "kvmtrace-stderr", &tag).unwrap_or_default();
    if !kvmtrace_err.trim().is_empty() {
        write(&dir, "kvmtrace.stderr", &kvmtrace_err)?;
    }
    // Under `--scenario export` kvmtrace's column is what Prometheus scraped.
    let scraped = lab.exported.and_then(|e| e.by_mode.get(&tag));
    if let Some(counts) = scraped {
        let rows: Vec<_> = counts
            .iter()
            .map(|(r, n)| json!({"isa": r.isa, "reason": r.reason, "failed_entry": r.failed_entry, "count": n}))
            .collect();
        write(
            &dir,
            "prometheus.json",
            &serde_json::to_string_pretty(&rows)?,
        )?;
    }
    if let Some(vms) = lab.exported.and_then(|e| e.vms_by_mode.get(&tag)) {
        let rows: serde_json::Map<String, serde_json::Value> = vms
            .iter()
            .map(|(vm, counts)| {
                let reasons: Vec<_> = counts
                    .iter()
                    .map(|(r, n)| json!({"isa": r.isa, "reason": r.reason, "failed_entry": r.failed_entry, "count": n}))
                    .collect();
                (vm.clone(), serde_json::Value::from(reasons))
            })
            .collect();
        write(
            &dir,
            "prometheus-vms.json",
            &serde_json::to_string_pretty(&rows)?,
        )?;
    }
    let rows = reasons::compare(
        &hist.by_reason,
        scraped.or(record.as_ref().map(|r| &r.by_reason)),
    );
    Ok(Some(ModeResults {
        run_time: console::run_seconds(lines, &tag),
        reached_end: console::reached_end(lines),
        tag,
        dir,
        lines,
        hist,
        hist_text,
        nested: mode == 1,
        record,
        kvmtrace_err,
        rows,
    }))
}

/// The record of mode `tag`: its own (`record.json`, whose timing is checked), or its
/// phase of the whole run's record (`phase.json`).
/// The mode's ground truth: the hist triggers' output (`hist.txt`), or where the
/// kernel has none, the trace buffer's counts (`trace-counts.txt`, with the event's
/// format in `kvm_exit-format.txt`), with the hist's text (empty for the trace
/// buffer). `None`, with the problem said, when neither is there or the trace
/// buffer's counts cannot stand as the reference.
fn reference(
    all_lines: &[Line],
    tag: &str,
    dir: &Path,
    isa: super::options::Isa,
    problems: &mut Vec<String>,
) -> anyhow::Result<Option<(hist::Hist, String)>> {
    if let Some(text) = console::section(all_lines, "hist", tag) {
        write(dir, "hist.txt", &text)?;
        return Ok(Some((hist::parse_hist(&text)?, text)));
    }
    let counts = console::section(all_lines, "trace-counts", tag);
    let format = console::section(all_lines, "kvm-exit-format", tag);
    let (Some(counts), Some(format)) = (counts, format) else {
        problems.push(format!(
            "{tag}: neither a hist nor the trace buffer's counts on the console"
        ));
        return Ok(None);
    };
    write(dir, "trace-counts.txt", &counts)?;
    write(dir, "kvm_exit-format.txt", &format)?;
    match hist::from_trace(&format, &counts, isa.trace_isa()) {
        Ok(h) => Ok(Some((h, String::new()))),
        Err(e) => {
            problems.push(format!("{tag}: the trace buffer's counts: {e}"));
            Ok(None)
        }
    }
}

fn read_record(
    lines: &[Line],
    tag: &str,
    dir: &Path,
    whole: Option<&str>,
    problems: &mut Vec<String>,
) -> anyhow::Result<Option<Record>> {
    Ok(match (console::section(lines, "record", tag), whole) {
        (Some(text), _) => {
            write(dir, "record.json", &text)?;
            problems.extend(reasons::timing_check(tag, &text)?);
            Some(record::parse_record(&text)?)
        }
        (None, Some(all)) => match record::phase_record(all, tag)? {
            Some((rec, text)) => {
                write(dir, "phase.json", &text)?;
                Some(rec)
            }
            None => {
                problems.push(format!("{tag}: the record has no phase with {tag}"));
                None
            }
        },
        (None, None) => None,
    })
}

/// Prints mode `m`'s tables and checks it: kvmtrace against the hist, the guest's
/// readouts, the vCPUs, the micro workload's known exits, the end marker; then
/// writes its `summary.json`.
fn check_mode(
    lab: &Lab<'_>,
    m: &ModeResults<'_>,
    whole: bool,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let (opts, l1, tag) = (lab.opts, lab.l1, &m.tag);
    println!(
        "\n== {} {tag} ({}): L2 {} in {:.1} s, {} exits",
        opts.isa.name(),
        workload_label(opts),
        if m.reached_end {
            "reached its end"
        } else {
            "did NOT reach its end"
        },
        m.run_time,
        m.hist.by_reason.values().sum::<u64>()
    );
    print!("{}", reasons::table(&m.rows, m.hist.source));
    match lab.exported {
        Some(e) => problems.extend(export_problems(tag, &m.rows, m.hist.source, e)),
        None => problems.extend(reasons::check_record(
            tag,
            &m.rows,
            m.hist.source,
            m.record.as_ref(),
            l1.kvmtrace.is_some(),
            &m.kvmtrace_err,
        )),
    }
    if let Some(rec) = m.record.as_ref()
        && lab.exported.is_none()
        && !whole
    {
        let exact = opts.kernel == crate::kmod::KernelLine::V6_1;
        problems.extend(reasons::memory_problems(tag, rec, exact));
    }
    if let Some(problem) = guest::guest_readout(opts, &m.dir, m.lines, l1)? {
        problems.push(format!("{tag}: {problem}"));
    }
    if m.reached_end && opts.scenario == Scenario::Modes {
        problems.extend(
            micro::micro_readout(opts, &m.dir, m.lines, l1)?
                .into_iter()
                .map(|p| format!("{tag}: {p}")),
        );
    }
    let vcpu_rows = vcpus::per_vcpu(&m.hist, m.record.as_ref());
    if let Some(rec) = m.record.as_ref().filter(|_| !whole) {
        let vcpu_problems = vcpus::per_vcpu_problems(tag, &m.hist, rec);
        if vcpu_problems.is_empty() {
            println!(
                "  per (vCPU, reason): kvmtrace == {}, and its vCPU rows sum to its totals",
                m.hist.source.name()
            );
        }
        problems.extend(vcpu_problems);
    }
    if opts.smp > 1 || opts.micro_vcpus > 1 {
        println!("  per vCPU (hist / kvmtrace):");
        for (vcpu, h, k) in &vcpu_rows {
            println!(
                "    vcpu {vcpu}: {h} / {}",
                k.map_or("-".into(), |k| k.to_string())
            );
        }
    }
    if let L2Workload::Micro {
        vms,
        launch: image::Launch::Waves(wave),
        ..
    } = &l1.workload
    {
        if let Some(line) = crowd::memory_per_vm(m.lines, tag, usize::from(*wave)) {
            println!("  {line}");
        }
        let isa = opts.isa.trace_isa();
        let text = std::fs::read_to_string(m.dir.join("hist.txt")).unwrap_or_default();
        let threads = crowd::by_thread(&text, isa)?;
        let names = crowd::Names {
            cpuid: Reason::from(tracer_common::ExitKey::from_raw(
                isa,
                micro::cpuid_reason(isa),
            )),
            io: Reason::from(tracer_common::ExitKey::from_raw(isa, micro::io_reason(isa))),
        };
        match lab.exported.and_then(|e| e.vms_by_mode.get(tag)) {
            Some(scraped) => {
                let rows: Vec<&Counts> = scraped.values().collect();
                problems.extend(crowd::rows_problems(
                    tag,
                    "Prometheus",
                    vms,
                    &threads,
                    &rows,
                    names,
                ));
            }
            None => problems.extend(crowd::problems(
                tag,
                vms,
                &threads,
                m.record.as_ref(),
                names,
            )),
        }
    }
    if let L2Workload::Micro { .. } = &l1.workload
        && opts.scenario != Scenario::Signal
    {
        problems.extend(micro::check_counts(
            opts.isa,
            l1,
            tag,
            &m.hist,
            m.record.as_ref(),
        ));
    }
    problems.extend(detail_problems(lab, m)?);
    match (opts.scenario, m.reached_end) {
        (Scenario::Signal, true) => {
            problems.push(format!("{tag}: L2 ended before kvmtrace got its signal"));
        }
        (Scenario::Signal, false) | (_, true) => {}
        (_, false) => problems.push(format!("{tag}: L2 did not reach its end marker")),
    }
    write_summary(lab, m, &vcpu_rows)?;
    println!("  -> {}", m.dir.display());
    Ok(())
}

/// `--scenario export`: Prometheus's values of the mode's VM equal the reference
/// (`source`) for every reason (and there are some), and the scrapes' own problems.
fn export_problems(tag: &str, rows: &[reasons::Row], source: Source, e: &Exported) -> Vec<String> {
    let reference = source.name();
    let mut problems: Vec<String> = e
        .problems
        .get(tag)
        .into_iter()
        .flatten()
        .map(|p| format!("{tag}: {p}"))
        .collect();
    let total: u64 = rows.iter().map(|r| r.hist).sum();
    let differ = rows.iter().filter(|r| r.kvmtrace != Some(r.hist)).count();
    if total == 0 {
        problems.push(format!(
            "{tag}: the {reference} counted no exits: nothing was compared"
        ));
    } else if differ > 0 {
        problems.push(format!(
            "{tag}: Prometheus differs from the {reference} in {differ} of {} reasons",
            rows.len()
        ));
    } else {
        println!(
            "  Prometheus == {reference} for all {} reasons ({total} exits)",
            rows.len()
        );
    }
    problems
}

/// With `--detail` or `--rip` in the record arguments: mode `m`'s detail and RIP rows
/// against the kernel's triggers ([`detail::check`]).
fn detail_problems(lab: &Lab<'_>, m: &ModeResults<'_>) -> anyhow::Result<Vec<String>> {
    let (opts, l1) = (lab.opts, lab.l1);
    let traced_with = |flag: &str| l1.record_args.split_whitespace().any(|a| a == flag);
    if m.record.is_none()
        || opts.scenario != Scenario::Modes
        || !(traced_with("--detail") || traced_with("--rip"))
    {
        return Ok(Vec::new());
    }
    let micro = matches!(l1.workload, L2Workload::Micro { .. })
        .then(|| micro::micro_detail_expectations(&micro::micro_runs(l1)));
    detail::check(&detail::Inputs {
        tag: &m.tag,
        nested: m.nested,
        trace_isa: opts.isa.trace_isa(),
        exit_hist: &m.hist_text,
        lines: m.lines,
        dir: &m.dir,
        micro,
        kvmtrace: l1
            .kvmtrace
            .as_ref()
            .map_or(Path::new("kvmtrace"), |(k, _)| k),
        system_map: l1.system_map.as_deref(),
    })
}

/// Writes mode `m`'s `summary.json`.
fn write_summary(
    lab: &Lab<'_>,
    m: &ModeResults<'_>,
    vcpu_rows: &[(u32, u64, Option<u64>)],
) -> anyhow::Result<()> {
    let opts = lab.opts;
    let summary = json!({
        "isa": opts.isa.name(),
        "mode": m.tag,
        "workload": format!("{:?}", opts.workload).to_lowercase(),
        "smp": opts.smp,
        "micro_vcpus": opts.micro_vcpus,
        "l1_cpus": opts.l1_cpus,
        "l2_reached_end": m.reached_end,
        "l2_seconds": m.run_time,
        "l1_steps": lab.run.steps.iter().map(|(n, t)| json!({"step": n, "seconds": t})).collect::<Vec<_>>(),
        "hist_total": m.hist.by_reason.values().sum::<u64>(),
        "kvmtrace_total": m.record.as_ref().and_then(|r| r.total),
        "reasons": m.rows,
        "vcpus": vcpu_rows.iter().map(|(v, h, k)| json!({"vcpu_id": v, "hist": h, "kvmtrace": k})).collect::<Vec<_>>(),
    });
    write(
        &m.dir,
        "summary.json",
        &serde_json::to_string_pretty(&summary)?,
    )
}
