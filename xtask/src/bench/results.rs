//! The bench's results, read from L1's console: the timed runs, the records' costs,
//! the bpf-stats runs and the scrape; their ratios and per-exit costs, and the JSON.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{CONFIGS, CROWD, EXPORT_VMS, Options, Parts, RECORDS, baseline, crowd_cpuids};
use crate::lab::{
    console::{self, Line},
    record::Cost,
};

/// config -> round -> ns
pub(super) type ByRound = BTreeMap<String, BTreeMap<u32, u64>>;

/// The timed runs of a console, as far as they go, by configuration and round.
#[derive(Default, serde::Serialize)]
pub(super) struct Timed {
    /// L1 ns
    #[serde(rename = "runs_ns")]
    pub(super) runs: ByRound,
    /// the vCPU threads' CPU ns
    #[serde(rename = "cpu_ns")]
    pub(super) cpu: ByRound,
    /// the tracer's user space CPU ns (crowd runs)
    #[serde(rename = "tracer_ns")]
    pub(super) tracer: ByRound,
    /// Bench lines that could not be read.
    pub(super) bad: Vec<String>,
}

/// One `KVMLAB bench CONFIG ROUND run_ns=N cpu_ns=N [tracer_ns=N]` line.
#[derive(Debug, PartialEq)]
pub(super) struct BenchLine<'a> {
    pub(super) config: &'a str,
    pub(super) round: u32,
    /// L1 time from the (first) VM's start to its (last) HLT exit.
    pub(super) run_ns: u64,
    /// The vCPU threads' own CPU time.
    pub(super) cpu_ns: Option<u64>,
    /// The tracer's user space CPU time meanwhile (crowd runs under kvmtrace).
    pub(super) tracer_ns: Option<u64>,
}

impl<'a> BenchLine<'a> {
    pub(super) fn parse(text: &'a str) -> anyhow::Result<Option<Self>> {
        let Some(rest) = text.strip_prefix("KVMLAB bench ") else {
            return Ok(None);
        };
        let bad = || anyhow::anyhow!("bad bench line: {text}");
        let mut it = rest.split_whitespace();
        let (Some(config), Some(round)) = (it.next(), it.next()) else {
            return Err(bad());
        };
        let mut fields = BTreeMap::new();
        for kv in it {
            let (k, v) = kv.split_once('=').ok_or_else(bad)?;
            fields.insert(k, v.parse::<u64>().map_err(|_| bad())?);
        }
        Ok(Some(Self {
            config,
            round: round.parse().map_err(|_| bad())?,
            run_ns: *fields.get("run_ns").ok_or_else(bad)?,
            cpu_ns: fields.get("cpu_ns").copied(),
            tracer_ns: fields.get("tracer_ns").copied(),
        }))
    }
}

/// The timed runs, by configuration and round.
pub(super) struct Results {
    pub(super) parts: Parts,
    /// config -> round -> L1 ns
    pub(super) runs: ByRound,
    /// config -> round -> the vCPU threads' CPU ns
    pub(super) cpu: ByRound,
    /// config -> round -> the tracer's user space CPU ns (crowd runs)
    pub(super) tracer: ByRound,
    /// kvmtrace's default record of each round (its start time and memory).
    pub(super) kvmtrace: Vec<Cost>,
    /// The bpf-stats runs: the default record, and the count path, with one VM and
    /// with the crowd.
    pub(super) stats: Cost,
    pub(super) stats_counts: Cost,
    pub(super) stats_crowd: Cost,
    pub(super) stats_counts_crowd: Cost,
    /// perf kvm stat report's line for CPUID (what perf counted), as users run it and
    /// with the big buffer.
    pub(super) perf_cpuid: Option<String>,
    pub(super) perf_big_cpuid: Option<String>,
    /// What bpftrace counted in round 1.
    pub(super) bpftrace_count: Option<u64>,
    /// The timed scrapes of `kvmtrace export`.
    pub(super) scrape: Scrape,
}

/// `SCRAPES` scrapes of `kvmtrace export` serving `EXPORT_VMS` VMs' series.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Scrape {
    pub(super) vms: u64,
    pub(super) series: u64,
    pub(super) bytes: u64,
    /// L1 seconds per scrape.
    pub(super) seconds: f64,
}

impl Scrape {
    /// The `KVMLAB scrape ...` line.
    pub(super) fn parse(lines: &[Line]) -> anyhow::Result<Self> {
        let line = lines
            .iter()
            .find_map(|l| l.text.strip_prefix("KVMLAB scrape "))
            .context("L1 printed no scrape line: see the bench's serial log")?;
        let field = |name: &str| -> anyhow::Result<f64> {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {name} in the scrape line: {line}"))
        };
        let scrapes = field("scrapes")?;
        if scrapes < 1.0 {
            bail!("the scrape line timed no scrape: {line}");
        }
        let scrape = Self {
            vms: field("vms")? as u64,
            series: field("series")? as u64,
            bytes: field("bytes")? as u64,
            seconds: (field("to")? - field("from")?) / scrapes,
        };
        if scrape.vms < u64::from(EXPORT_VMS) {
            bail!(
                "the scrape served {} VMs, not the {EXPORT_VMS} that ran: {line}",
                scrape.vms
            );
        }
        Ok(scrape)
    }
}

/// What bpftrace counted in `round`: at least the `cpuids` CPUIDs.
fn bpftrace_counted(lines: &[Line], round: u32, cpuids: u32) -> anyhow::Result<u64> {
    let text = console::section(lines, "bpftrace", &format!("r{round}"))
        .with_context(|| format!("no bpftrace output of round {round}"))?;
    let counted = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("@exits:"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .with_context(|| format!("bpftrace printed no count in round {round}: {text}"))?;
    if counted < u64::from(cpuids) {
        bail!("bpftrace counted {counted} exits in round {round}, fewer than the {cpuids} CPUIDs");
    }
    Ok(counted)
}

/// The CPUID line of a `perf kvm stat report` section.
fn perf_line(lines: &[Line], config: &str) -> Option<String> {
    console::section(lines, &format!("{config}-report"), "r1").and_then(|t| {
        t.lines()
            .find(|l| l.trim_start().starts_with("CPUID"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
    })
}

impl Results {
    /// The timed runs L1 printed, whatever else is missing (for a bench that did not
    /// finish): runs, CPU and tracer ns by configuration and round.
    pub(super) fn timed(lines: &[Line]) -> Timed {
        let mut t = Timed::default();
        for l in lines {
            let b = match BenchLine::parse(&l.text) {
                Ok(Some(b)) => b,
                Ok(None) => continue,
                Err(_) => {
                    t.bad.push(l.text.clone());
                    continue;
                }
            };
            let config = b.config.to_owned();
            t.runs
                .entry(config.clone())
                .or_default()
                .insert(b.round, b.run_ns);
            if let Some(ns) = b.cpu_ns {
                t.cpu.entry(config.clone()).or_default().insert(b.round, ns);
            }
            if let Some(ns) = b.tracer_ns {
                t.tracer.entry(config).or_default().insert(b.round, ns);
            }
        }
        t
    }

    /// Reads the `rounds` rounds L1 was asked for from its console.
    pub(super) fn parse(
        lines: &[Line],
        cpuids: u32,
        rounds: u32,
        parts: Parts,
    ) -> anyhow::Result<Self> {
        for l in lines {
            if let Some(b) = BenchLine::parse(&l.text)?
                && !(1..=rounds).contains(&b.round)
            {
                bail!(
                    "L1 ran round {}, not one of the {rounds} asked for: {}",
                    b.round,
                    l.text
                );
            }
        }
        let Timed {
            runs, cpu, tracer, ..
        } = Self::timed(lines);
        // A configuration with no run in a round asked for would print an empty ratio:
        // fail instead.
        for (config, _) in CONFIGS.iter().filter(|(c, _)| parts.runs(c)) {
            for round in 1..=rounds {
                if !runs.get(*config).is_some_and(|r| r.contains_key(&round)) {
                    bail!(
                        "L1 measured no {config} run in round {round}: see the bench's serial log"
                    );
                }
                // The crowd's table compares the VMs' CPU time: a run without it would
                // print a dash where a number belongs.
                if !cpu.get(*config).is_some_and(|r| r.contains_key(&round)) {
                    bail!(
                        "L1 measured no CPU time of the {config} run in round {round}: see the bench's serial log"
                    );
                }
            }
        }
        let mut kvmtrace = Vec::new();
        let mut bpftrace_count = None;
        for round in 1..=rounds {
            for (tag, config) in RECORDS.iter().filter(|(_, c)| parts.runs(c)) {
                let text = console::section(lines, "kvmtrace", &format!("{tag}{round}"))
                    .with_context(|| format!("no {config} record of round {round}"))?;
                let cost = Cost::from_record(&text)?;
                if cost.exits < u64::from(cpuids) {
                    bail!(
                        "{config} counted {} exits in round {round}, fewer than the {cpuids} CPUIDs",
                        cost.exits
                    );
                }
                if *tag == "r" {
                    kvmtrace.push(cost);
                }
            }
            if parts == Parts::All {
                bpftrace_count.get_or_insert(bpftrace_counted(lines, round, cpuids)?);
            }
        }
        let stats = |tag: &str| -> anyhow::Result<Cost> {
            Cost::from_record(
                &console::section(lines, "kvmtrace", tag)
                    .with_context(|| format!("no bpf-stats record {tag}"))?,
            )
        };
        Ok(Self {
            parts,
            runs,
            cpu,
            tracer,
            kvmtrace,
            stats: stats("stats")?,
            stats_counts: stats("stats-counts")?,
            stats_crowd: stats("stats-crowd")?,
            stats_counts_crowd: stats("stats-counts-crowd")?,
            perf_cpuid: perf_line(lines, "perf"),
            perf_big_cpuid: perf_line(lines, "perf-big"),
            bpftrace_count,
            scrape: Scrape::parse(lines)?,
        })
    }

    /// The ratio of `config` to its untraced baseline ([`baseline`]), per round.
    pub(super) fn ratios(&self, config: &str) -> Vec<f64> {
        self.ratio_of(config, baseline(config))
    }

    /// The per-exit cost of `traced` above `untraced` in L1 time (ns per exit, mean
    /// of the rounds).
    pub(super) fn overhead_ns(&self, traced: &str, untraced: &str, exits: u32) -> Option<f64> {
        self.overhead(&self.runs, traced, untraced, exits)
    }

    /// The per-exit cost of `traced` above `untraced` in `by` (L1 time or the VMs'
    /// CPU time), ns per exit, mean of the rounds.
    pub(super) fn overhead(
        &self,
        by: &ByRound,
        traced: &str,
        untraced: &str,
        exits: u32,
    ) -> Option<f64> {
        let d = mean(by.get(traced))? - mean(by.get(untraced))?;
        // No exit (fewer CPUIDs than VMs): no cost per exit, a dash, not NaN.
        (exits > 0).then(|| d / f64::from(exits))
    }

    /// The ratio of `config` to `base`, per round.
    pub(super) fn ratio_of(&self, config: &str, base: &str) -> Vec<f64> {
        let (Some(base), Some(runs)) = (self.runs.get(base), self.runs.get(config)) else {
            return Vec::new();
        };
        runs.iter()
            .filter_map(|(round, &ns)| {
                let b = *base.get(round)?;
                (b > 0).then(|| ns as f64 / b as f64)
            })
            .collect()
    }

    pub(super) fn mean_ns(&self, config: &str) -> Option<f64> {
        mean(self.runs.get(config))
    }

    pub(super) fn json(&self, opts: &Options, host: &Cost) -> Value {
        json!({
            "cpuids": opts.cpuids,
            "rounds": opts.rounds,
            "only": opts.only.env(),
            "runs_ns": self.runs,
            "ratios": CONFIGS.iter().map(|(c, _)| (c.to_string(), json!(self.ratios(c)))).collect::<serde_json::Map<_, _>>(),
            "kvmtrace": self.kvmtrace.iter().map(|c| json!({"attach_ms": c.attach_ms, "peak_rss_mib": c.peak_rss_mib, "exits": c.exits})).collect::<Vec<_>>(),
            "ebpf_ns_per_exit": self.stats.ns_per_exit,
            "ebpf_ns_per_exit_counts": self.stats_counts.ns_per_exit,
            "ebpf_programs": self.stats.programs.iter().chain(&self.stats_counts.programs).map(|(n, runs, ns)| json!({"name": n, "runs": runs, "ns_per_run": ns})).collect::<Vec<_>>(),
            "bpftrace_count": self.bpftrace_count,
            "perf_big_cpuid": self.perf_big_cpuid,
            "patch_own": self.ratio_of("patched", "unpatched"),
            "count_own": self.ratio_of("patched-no-cycles", "unpatched"),
            "host": {"attach_ms": host.attach_ms, "peak_rss_mib": host.peak_rss_mib},
            "cpu_ns": self.cpu,
            "tracer_ns": self.tracer,
            "crowd": {
                "vms": CROWD,
                "counts_ns_per_exit": [self.overhead_ns("kvmtrace-counts", "stock", opts.cpuids), self.overhead_ns("kvmtrace-counts-crowd", "stock-crowd", crowd_cpuids(opts.cpuids))],
                "record_ns_per_exit": [self.overhead_ns("kvmtrace", "stock", opts.cpuids), self.overhead_ns("kvmtrace-crowd", "stock-crowd", crowd_cpuids(opts.cpuids))],
                "counts_cpu_ns_per_exit": [self.overhead(&self.cpu, "kvmtrace-counts", "stock", opts.cpuids), self.overhead(&self.cpu, "kvmtrace-counts-crowd", "stock-crowd", crowd_cpuids(opts.cpuids))],
                "record_cpu_ns_per_exit": [self.overhead(&self.cpu, "kvmtrace", "stock", opts.cpuids), self.overhead(&self.cpu, "kvmtrace-crowd", "stock-crowd", crowd_cpuids(opts.cpuids))],
                "counts_ebpf_ns_per_exit": [self.stats_counts.ns_per_exit, self.stats_counts_crowd.ns_per_exit],
                "record_ebpf_ns_per_exit": [self.stats.ns_per_exit, self.stats_crowd.ns_per_exit],
            },
            "scrape": {"vms": self.scrape.vms, "series": self.scrape.series, "bytes": self.scrape.bytes, "seconds": self.scrape.seconds},
            "perf_cpuid": self.perf_cpuid,
        })
    }
}

/// The mean of a configuration's rounds.
pub(super) fn mean(by_round: Option<&BTreeMap<u32, u64>>) -> Option<f64> {
    let runs = by_round?;
    (!runs.is_empty()).then(|| runs.values().sum::<u64>() as f64 / runs.len() as f64)
}
