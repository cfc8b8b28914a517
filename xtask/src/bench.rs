//! `cargo xtask bench`: what tracing costs a busy KVM host, measured in the Bochs lab.
//!
//! L1 (lab/l1-bench.sh) runs the `micro` VMM, an exit-bound guest (N CPUID exits), under
//! the configurations of [`CONFIGS`] in interleaved rounds: stock modules untraced,
//! kvmtrace's count path (raw and classic tracepoint), `kvmtrace record` with time,
//! `--per-vcpu`, `--snapshots` and `--detail`, `perf kvm stat record` as users run it
//! and with a buffer that loses nothing, the kernel's hist trigger, Debian's bpftrace
//! with a `count()` one-liner, and our patched modules untraced: the whole series, the
//! series without its cycles (the count alone), and the same build without the patch.
//! Bochs runs with `clock: sync=none`, so L1's clock follows the instruction count:
//! each time is a count of L1 instructions, and ratios repeat.
//! Every configuration is printed as a ratio to the untraced stock run of the same
//! round, with kvmtrace's own numbers (eBPF ns per exit from
//! `kernel.bpf_stats_enabled`, start-to-attached time, peak RSS), in L1 and on this
//! host. The crowd spreads the same exits over 256 VMs at once, measured three ways
//! (the VMs' own CPU time, the span from the first start to the last end, and the
//! programs' run time), with the tracer's user space CPU time beside it.
//! Results: target/bench/bench.md and bench.json; runs.json has the runs timed so far
//! even when a later step fails.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::{
    files::write_in as write,
    lab::{
        console::{self, Line},
        emulator::Machine,
        image,
        inputs::{self, Inputs, KvmModules},
        options::Isa,
        record::Cost,
        step::Step,
    },
};

#[derive(Args, Debug)]
pub struct Options {
    /// CPUID exits the guest makes in each timed run.
    #[arg(long, default_value_t = 200_000)]
    pub cpuids: u32,
    /// Rounds of the configurations (each round times each once).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub rounds: u32,
    /// Where the results go.
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    pub out: PathBuf,
    /// Multiplies every time limit (for slow machines).
    #[arg(long, default_value_t = 1.0)]
    pub timeout_scale: f64,
    /// Which configurations each round runs: all of them, or only what the crowd's
    /// table needs (stock, the two records, and the crowd's three), which takes about a
    /// third of the time. The bpf-stats runs and the export scrape come in both.
    #[arg(long, value_enum, default_value_t = Parts::All)]
    pub only: Parts,
}

/// The configurations a bench runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parts {
    /// Every configuration of [`CONFIGS`].
    All,
    /// [`CROWD_PART`] only.
    Crowd,
}

impl Parts {
    /// Whether this bench runs `config`.
    fn runs(self, config: &str) -> bool {
        self == Self::All || CROWD_PART.contains(&config)
    }

    /// L1's `PARTS`.
    fn env(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Crowd => "crowd",
        }
    }
}

/// The configurations of `--only crowd`: the crowd's and the one-VM runs it is
/// compared with.
const CROWD_PART: [&str; 6] = [
    "stock",
    "kvmtrace-counts",
    "kvmtrace",
    "stock-crowd",
    "kvmtrace-counts-crowd",
    "kvmtrace-crowd",
];

/// VMs at once in the crowd configurations, which spread the same CPUID exits over them.
const CROWD: u32 = 256;
/// VMs whose series `kvmtrace export` serves in the scrape that is timed.
const EXPORT_VMS: u32 = 1024;
/// Scrapes timed together (L1's clock ticks in 10 ms).
const SCRAPES: u32 = 10;

/// The configurations, in the order L1 runs them; the first is the baseline, and
/// `stock-crowd` the crowd configurations'.
const CONFIGS: [(&str, &str); 19] = [
    ("stock", "stock kvm, untraced"),
    (
        "kvmtrace-empty",
        "+ an empty eBPF program on the raw exit tracepoint (the floor)",
    ),
    ("kvmtrace-counts", "+ kvmtrace record --counts-only"),
    (
        "kvmtrace-counts-classic",
        "+ kvmtrace record --counts-only, classic tracepoint",
    ),
    ("kvmtrace", "+ kvmtrace record (with time)"),
    ("kvmtrace-classic", "+ kvmtrace record, classic tracepoint"),
    ("kvmtrace-per-vcpu", "+ kvmtrace record --per-vcpu"),
    ("kvmtrace-snapshots", "+ kvmtrace record --snapshots"),
    ("kvmtrace-detail", "+ kvmtrace record --detail"),
    ("perf", "+ perf kvm stat record"),
    ("perf-big", "+ perf kvm stat record -m 128M, throttling off"),
    ("hist", "+ hist trigger on kvm:kvm_exit"),
    ("bpftrace", "+ bpftrace: kvm:kvm_exit { @ = count() }"),
    ("stock-crowd", "256 VMs at once, stock kvm, untraced"),
    (
        "kvmtrace-counts-crowd",
        "256 VMs at once, + kvmtrace record --counts-only",
    ),
    ("kvmtrace-crowd", "256 VMs at once, + kvmtrace record"),
    ("patched", "patched kvm (counter leaves), untraced"),
    (
        "patched-no-cycles",
        "the patch without its cycles (count only), untraced",
    ),
    ("unpatched", "the same build without the patch, untraced"),
];

/// The kvmtrace records of each round: (console tag prefix, configuration).
const RECORDS: [(&str, &str); 9] = [
    ("c", "kvmtrace-counts"),
    ("k", "kvmtrace-counts-classic"),
    ("r", "kvmtrace"),
    ("t", "kvmtrace-classic"),
    ("v", "kvmtrace-per-vcpu"),
    ("s", "kvmtrace-snapshots"),
    ("d", "kvmtrace-detail"),
    ("cc", "kvmtrace-counts-crowd"),
    ("rc", "kvmtrace-crowd"),
];

/// The CPUIDs a crowd run makes in all: `cpuids` spread over `CROWD` VMs, each
/// `cpuids / CROWD`.
fn crowd_cpuids(cpuids: u32) -> u32 {
    cpuids / CROWD * CROWD
}

/// The untraced run a configuration's ratios are to.
fn baseline(config: &str) -> &'static str {
    if config.ends_with("-crowd") {
        "stock-crowd"
    } else {
        "stock"
    }
}

/// perf's ring buffer for `perf-big`: 200 000 exits make ~45 MB of samples.
const PERF_BIG_BUFFER: &str = "128M";

pub fn run(opts: &Options, root: &Path) -> anyhow::Result<()> {
    if opts.timeout_scale <= 0.0 {
        bail!("--timeout-scale must be positive");
    }
    let out = root.join(&opts.out);
    let build = out.join("build");
    std::fs::create_dir_all(&build)
        .with_context(|| format!("cannot create {}", build.display()))?;
    let cache = root.join("target/lab/cache");

    // The lab's Intel machine with Debian's modules; the patched ones are added beside
    // them, for the last configuration.
    let inputs = inputs::prepare(
        Isa::Intel,
        crate::kmod::KernelLine::V6_1,
        &KvmModules::Debian,
        root,
        &cache,
    )?;
    let perf = inputs::perf_tool(root)?;
    let bpftrace = inputs::bpftrace_tool(root)?;
    let s = Step::start("kmod");
    let patched = crate::kmod::build(&crate::kmod::Options::default(), root)?.out_dir;
    let variant = |variant| -> anyhow::Result<PathBuf> {
        let opts = crate::kmod::Options {
            variant,
            ..crate::kmod::Options::default()
        };
        Ok(crate::kmod::build(&opts, root)?.out_dir)
    };
    let no_cycles = variant(crate::kmod::Variant::NoCycles)?;
    let unpatched = variant(crate::kmod::Variant::Unpatched)?;
    s.done(format!(
        "{}, {} and {}",
        patched.display(),
        no_cycles.display(),
        unpatched.display()
    ));
    let kvmtrace = inputs::build_kvmtrace(root)?;
    let micro = inputs::build_micro(root, &build)?;

    let s = Step::start("initrd");
    let initrd = build.join("l1-initrd.cpio");
    let tools = Tools {
        perf,
        bpftrace,
        kvmtrace: kvmtrace.clone(),
        micro,
    };
    let size = write_initrd(
        opts,
        root,
        &inputs,
        [&patched, &no_cycles, &unpatched],
        &tools,
        &initrd,
    )?;
    s.done(format!("{} ({} MiB)", initrd.display(), size >> 20));

    let host = host_costs(&kvmtrace.0)?;

    let machine = Machine {
        isa: Isa::Intel,
        cpus: 1,
        parallel: false,
        inputs: &inputs,
        initrd: &initrd,
        build: &build,
        forward: None,
    };
    let what = format!(
        "{} rounds of {} configurations, {} CPUID exits each",
        opts.rounds,
        CONFIGS.len(),
        opts.cpuids
    );
    let serial_log = out.join("serial.log");
    let booted = machine.boot(root, what, opts.timeout_scale, &serial_log);
    // What was timed, as far as L1 got: kept even when a later step fails or overruns.
    let read;
    let lines = match &booted {
        Ok((run, ..)) => &run.lines,
        Err(_) => {
            read = console_of(&serial_log);
            &read
        }
    };
    let result = booted
        .as_ref()
        .map_or_else(|e| format!("{e:#}"), |(_, r, _)| r.clone());
    let [runs, cpu, tracer] = Results::timed(lines)?;
    write(
        &out,
        "runs.json",
        &serde_json::to_string_pretty(&json!({
            "result": result,
            "runs_ns": runs,
            "cpu_ns": cpu,
            "tracer_ns": tracer,
        }))?,
    )?;
    let (run, result, _) = booted?;
    if result != "pass" {
        bail!(
            "the bench did not finish: {result} (console in {}; the runs timed so far in {})",
            serial_log.display(),
            out.join("runs.json").display()
        );
    }
    let results = Results::parse(&run.lines, opts.cpuids, opts.rounds, opts.only)?;
    let md = results.markdown(opts, &host);
    write(&out, "bench.md", &md)?;
    write(
        &out,
        "bench.json",
        &serde_json::to_string_pretty(&results.json(opts, &host))?,
    )?;
    println!("\n{md}");
    println!("-> {}", out.join("bench.md").display());
    Ok(())
}

/// The console lines of a serial log ([`console::transcript`]'s `[   12.34] text`); none
/// if it cannot be read.
fn console_of(serial_log: &Path) -> Vec<Line> {
    let text = std::fs::read_to_string(serial_log).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (at, text) = l.strip_prefix('[')?.split_once("] ")?;
            Some(Line {
                at: at.trim().parse().ok()?,
                text: text.to_owned(),
            })
        })
        .collect()
}

/// The programs the bench carries into L1, each with the libraries it loads.
struct Tools {
    perf: (PathBuf, Vec<PathBuf>),
    bpftrace: (PathBuf, Vec<PathBuf>),
    kvmtrace: (PathBuf, Vec<PathBuf>),
    micro: PathBuf,
}

/// Writes the bench's L1 initrd to `initrd`: lab/l1-bench.sh as /init, the stock, the
/// patched, the count-only (no cycles) and the unpatched (same build, no patch) kvm
/// modules, the micro VMM,
/// kvmtrace, perf and bpftrace (each with its libraries), and the rounds' settings.
/// Returns its size.
fn write_initrd(
    opts: &Options,
    root: &Path,
    inputs: &Inputs,
    [patched, no_cycles, unpatched]: [&Path; 3],
    tools: &Tools,
    initrd: &Path,
) -> anyhow::Result<u64> {
    let mut a = image::l1_base(&inputs.busybox, &root.join("lab/l1-bench.sh"))?;
    let mut names = Vec::new();
    for m in &inputs.modules {
        let name = image::file_name(m)?;
        a.file(&format!("lib/modules/stock/{name}"), m)?;
        for (dir, built) in [
            ("patched", patched),
            ("no-cycles", no_cycles),
            ("unpatched", unpatched),
        ] {
            let ours = built.join(&name);
            a.file(
                &format!("lib/modules/{dir}/{name}"),
                if ours.is_file() { &ours } else { m },
            )?;
        }
        names.push(name);
    }
    let Some((vendor, deps)) = names.split_last() else {
        bail!("no kvm modules");
    };
    a.file("bin/micro", &tools.micro)?;
    a.file("bin/kvmtrace", &tools.kvmtrace.0)?;
    let mut libs: Vec<PathBuf> = [&tools.kvmtrace.1, &tools.perf.1, &tools.bpftrace.1]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    libs.sort();
    libs.dedup();
    image::add_libraries(&mut a, &libs)?;
    a.file("usr/bin/perf", &tools.perf.0)?;
    a.file("usr/bin/bpftrace", &tools.bpftrace.0)?;
    // A traced run in Bochs takes ~0.2 ms of host time per exit; bpftrace starts slowly.
    let round_budget =
        (f64::from(opts.cpuids) * CONFIGS.len() as f64 * 0.4e-3 + 900.0) * opts.timeout_scale;
    let env = format!(
        "# Written by cargo xtask bench; sourced by /init.\nCPUIDS={}\nROUNDS={}\nPAGING=ept\n\
         KVM_DEPS='{}'\nKVM_VENDOR={}\nKVM_MODULE={}\nROUND_BUDGET={}\nPERF_PAGES={PERF_BIG_BUFFER}\n\
         CROWD={CROWD}\nEXPORT_VMS={EXPORT_VMS}\nSCRAPES={SCRAPES}\nPARTS={}\n",
        opts.cpuids,
        opts.rounds,
        deps.join(" "),
        vendor.trim_end_matches(".ko"),
        vendor.trim_end_matches(".ko").replace('-', "_"),
        round_budget as u64,
        opts.only.env()
    );
    a.bytes("lab/env", env, 0o644)?;
    a.write_to(initrd)
}

/// kvmtrace started and stopped on this host (real CPU, no VM running): the median of
/// a few start-to-attached times and peak RSS.
fn host_costs(kvmtrace: &Path) -> anyhow::Result<Cost> {
    let mut runs = Vec::new();
    for _ in 0..5 {
        let out = crate::exec::output(Command::new(kvmtrace).args([
            "record",
            "--duration",
            "0.2",
            "--format",
            "json",
        ]))?;
        runs.push(Cost::from_record(&out)?);
    }
    runs.sort_by(|a, b| a.attach_ms.total_cmp(&b.attach_ms));
    Ok(runs.swap_remove(runs.len() / 2))
}

/// config -> round -> ns
type ByRound = BTreeMap<String, BTreeMap<u32, u64>>;

/// One `KVMLAB bench CONFIG ROUND run_ns=N cpu_ns=N [tracer_ns=N]` line.
#[derive(Debug, PartialEq)]
struct BenchLine<'a> {
    config: &'a str,
    round: u32,
    /// L1 time from the (first) VM's start to its (last) HLT exit.
    run_ns: u64,
    /// The vCPU threads' own CPU time.
    cpu_ns: Option<u64>,
    /// The tracer's user space CPU time meanwhile (crowd runs under kvmtrace).
    tracer_ns: Option<u64>,
}

impl<'a> BenchLine<'a> {
    fn parse(text: &'a str) -> anyhow::Result<Option<Self>> {
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
struct Results {
    parts: Parts,
    /// config -> round -> L1 ns
    runs: ByRound,
    /// config -> round -> the vCPU threads' CPU ns
    cpu: ByRound,
    /// config -> round -> the tracer's user space CPU ns (crowd runs)
    tracer: ByRound,
    /// kvmtrace's default record of each round (its start time and memory).
    kvmtrace: Vec<Cost>,
    /// The bpf-stats runs: the default record, and the count path, with one VM and
    /// with the crowd.
    stats: Cost,
    stats_counts: Cost,
    stats_crowd: Cost,
    stats_counts_crowd: Cost,
    /// perf kvm stat report's line for CPUID (what perf counted), as users run it and
    /// with the big buffer.
    perf_cpuid: Option<String>,
    perf_big_cpuid: Option<String>,
    /// What bpftrace counted in round 1.
    bpftrace_count: Option<u64>,
    /// The timed scrapes of `kvmtrace export`.
    scrape: Scrape,
}

/// `SCRAPES` scrapes of `kvmtrace export` serving `EXPORT_VMS` VMs' series.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Scrape {
    vms: u64,
    series: u64,
    bytes: u64,
    /// L1 seconds per scrape.
    seconds: f64,
}

impl Scrape {
    /// The `KVMLAB scrape ...` line.
    fn parse(lines: &[Line]) -> anyhow::Result<Self> {
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
    fn timed(lines: &[Line]) -> anyhow::Result<[ByRound; 3]> {
        let mut by: [ByRound; 3] = Default::default();
        for l in lines {
            let Some(b) = BenchLine::parse(&l.text)? else {
                continue;
            };
            let [runs, cpu, tracer] = &mut by;
            let config = b.config.to_owned();
            runs.entry(config.clone())
                .or_default()
                .insert(b.round, b.run_ns);
            if let Some(ns) = b.cpu_ns {
                cpu.entry(config.clone()).or_default().insert(b.round, ns);
            }
            if let Some(ns) = b.tracer_ns {
                tracer.entry(config).or_default().insert(b.round, ns);
            }
        }
        Ok(by)
    }

    /// Reads the `rounds` rounds L1 was asked for from its console.
    fn parse(lines: &[Line], cpuids: u32, rounds: u32, parts: Parts) -> anyhow::Result<Self> {
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
        let [runs, cpu, tracer] = Self::timed(lines)?;
        // A configuration with no run in a round asked for would print an empty ratio:
        // fail instead.
        for (config, _) in CONFIGS.iter().filter(|(c, _)| parts.runs(c)) {
            for round in 1..=rounds {
                if !runs.get(*config).is_some_and(|r| r.contains_key(&round)) {
                    bail!(
                        "L1 measured no {config} run in round {round}: see the bench's serial log"
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
    fn ratios(&self, config: &str) -> Vec<f64> {
        self.ratio_of(config, baseline(config))
    }

    /// The per-exit cost of `traced` above `untraced` in L1 time (ns per exit, mean
    /// of the rounds).
    fn overhead_ns(&self, traced: &str, untraced: &str, exits: u32) -> Option<f64> {
        self.overhead(&self.runs, traced, untraced, exits)
    }

    /// The per-exit cost of `traced` above `untraced` in `by` (L1 time or the VMs'
    /// CPU time), ns per exit, mean of the rounds.
    fn overhead(&self, by: &ByRound, traced: &str, untraced: &str, exits: u32) -> Option<f64> {
        let d = mean(by.get(traced))? - mean(by.get(untraced))?;
        // No exit (fewer CPUIDs than VMs): no cost per exit, a dash, not NaN.
        (exits > 0).then(|| d / f64::from(exits))
    }

    /// The crowd's table: each traced configuration's cost per exit with 256 VMs at
    /// once against one VM, three ways: the VMs' own CPU time, the span from the first
    /// start to the last end (which also holds the tracer's user space and the
    /// scheduling of 256 processes on one CPU), and the eBPF programs' own run time.
    fn crowd_markdown(&self, cpuids: u32) -> String {
        let crowd_cpuids = crowd_cpuids(cpuids);
        let mut md = format!(
            "\nThe same CPUID exits over {CROWD} VMs at once ({} each), against one VM: what \
             tracing adds per exit.\n\n| configuration | measured as | 1 VM | {CROWD} VMs | change |\n\
             |---|---|---:|---:|---:|\n",
            cpuids / CROWD
        );
        let ns = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0} ns"));
        let change = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if a > 0.0 => format!("{:+.1} %", (b / a - 1.0) * 100.0),
            _ => "-".to_owned(),
        };
        for (one, crowd, label, stats) in [
            (
                "kvmtrace-counts",
                "kvmtrace-counts-crowd",
                "kvmtrace record --counts-only",
                [&self.stats_counts, &self.stats_counts_crowd],
            ),
            (
                "kvmtrace",
                "kvmtrace-crowd",
                "kvmtrace record",
                [&self.stats, &self.stats_crowd],
            ),
        ] {
            let rows = [
                (
                    "the VMs' CPU time",
                    self.overhead(&self.cpu, one, "stock", cpuids),
                    self.overhead(&self.cpu, crowd, "stock-crowd", crowd_cpuids),
                ),
                (
                    "first start to last end",
                    self.overhead(&self.runs, one, "stock", cpuids),
                    self.overhead(&self.runs, crowd, "stock-crowd", crowd_cpuids),
                ),
                (
                    "eBPF run time (bpf_stats)",
                    stats[0].ns_per_exit,
                    stats[1].ns_per_exit,
                ),
            ];
            for (how, a, b) in rows {
                let _ = writeln!(
                    md,
                    "| {label} | {how} | {} | {} | {} |",
                    ns(a),
                    ns(b),
                    change(a, b)
                );
            }
        }
        for (crowd, label) in [
            ("kvmtrace-counts-crowd", "kvmtrace record --counts-only"),
            ("kvmtrace-crowd", "kvmtrace record"),
        ] {
            if let Some(t) = mean(self.tracer.get(crowd)) {
                let _ = writeln!(
                    md,
                    "\n`{label}`'s own user space took {:.1} ms of CPU in the crowd's span: \
                     {:.0} µs per VM.",
                    t / 1e6,
                    t / 1e3 / f64::from(CROWD)
                );
            }
        }
        md.push_str(&self.floor_markdown(cpuids));
        md
    }

    /// How far the count path is from the floor: an empty program on the same raw
    /// tracepoint.
    fn floor_markdown(&self, cpuids: u32) -> String {
        let floor = self.overhead_ns("kvmtrace-empty", "stock", cpuids);
        let counts = self.overhead_ns("kvmtrace-counts", "stock", cpuids);
        match (floor, counts) {
            (Some(f), Some(c)) => format!(
                "\nThe floor, an empty eBPF program on the raw exit tracepoint, adds {f:.0} ns \
                 per exit; the count path adds {c:.0} ns, {:.0} ns above it.\n",
                c - f
            ),
            _ => String::new(),
        }
    }

    /// The ratio of `config` to `base`, per round.
    fn ratio_of(&self, config: &str, base: &str) -> Vec<f64> {
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

    fn mean_ns(&self, config: &str) -> Option<f64> {
        mean(self.runs.get(config))
    }

    fn markdown(&self, opts: &Options, host: &Cost) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "`cargo xtask bench --cpuids {} --rounds {}`: Bochs (Haswell, VMX+EPT, \
             `clock: sync=none`), L1 Debian 6.1, a guest making {} CPUID exits.\n",
            opts.cpuids, opts.rounds, opts.cpuids
        );
        let _ = writeln!(
            md,
            "| configuration | L1 time per exit | vs untraced stock (each round) | overhead |\n|---|---:|---:|---:|"
        );
        for (config, label) in CONFIGS.iter().filter(|(c, _)| self.parts.runs(c)) {
            let per_exit = self.mean_ns(config).map_or("-".into(), |ns| {
                format!("{:.2} µs", ns / f64::from(opts.cpuids) / 1e3)
            });
            let ratios = self.ratios(config);
            let each: Vec<String> = ratios.iter().map(|r| format!("{r:.4}")).collect();
            // No ratio (an untraced stock run of 0 ns): a dash, not NaN.
            let overhead = if ratios.is_empty() {
                "-".to_owned()
            } else {
                let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
                format!("{:+.2} %", (mean - 1.0) * 100.0)
            };
            let _ = writeln!(
                md,
                "| {label} | {per_exit} | {} | {overhead} |",
                each.join(" / ")
            );
        }
        let own = |config: &str| -> String {
            let each: Vec<String> = self
                .ratio_of(config, "unpatched")
                .iter()
                .map(|r| format!("{:+.2} %", (r - 1.0) * 100.0))
                .collect();
            each.join(" / ")
        };
        if self.parts == Parts::All {
            let _ = writeln!(
                md,
                "\nThe patch's own cost (patched against the same build without it, each round): {}",
                own("patched")
            );
            let _ = writeln!(
                md,
                "\nThe count's own cost (the patch without its cycles against the same build without the patch, each round): {}",
                own("patched-no-cycles")
            );
        }
        let attach: Vec<String> = self
            .kvmtrace
            .iter()
            .map(|c| format!("{:.0} ms", c.attach_ms))
            .collect();
        let rss: Vec<String> = self
            .kvmtrace
            .iter()
            .map(|c| format!("{:.1} MiB", c.peak_rss_mib))
            .collect();
        let _ = writeln!(md, "\nkvmtrace itself:\n");
        let _ = writeln!(
            md,
            "| | L1 (Bochs) | this host ({}) |\n|---|---:|---:|",
            host_cpu()
        );
        for (what, cost) in [
            ("with time", &self.stats),
            ("--counts-only", &self.stats_counts),
        ] {
            let _ = writeln!(
                md,
                "| eBPF run time per exit, {what} (every program, bpf_stats) | {} | - |",
                cost.ns_per_exit
                    .map_or("-".into(), |ns| format!("{ns:.0} ns"))
            );
            for (name, runs, ns) in &cost.programs {
                let _ = writeln!(
                    md,
                    "| &nbsp;&nbsp;{name}: {runs} runs | {ns:.0} ns per run | - |"
                );
            }
        }
        let _ = writeln!(
            md,
            "| start → attached | {} | {:.1} ms |",
            attach.join(" / "),
            host.attach_ms
        );
        let _ = writeln!(
            md,
            "| peak RSS | {} | {:.1} MiB |",
            rss.join(" / "),
            host.peak_rss_mib
        );
        if let Some(line) = &self.perf_cpuid {
            let _ = writeln!(md, "\nperf kvm stat report, round 1: `{line}`");
        }
        if let Some(line) = &self.perf_big_cpuid {
            let _ = writeln!(
                md,
                "\nperf kvm stat report with -m {PERF_BIG_BUFFER}, round 1: `{line}`"
            );
        }
        if let Some(n) = self.bpftrace_count {
            let _ = writeln!(md, "\nbpftrace counted {n} exits in round 1.");
        }
        md.push_str(&self.crowd_markdown(opts.cpuids));
        let s = &self.scrape;
        let _ = writeln!(
            md,
            "\n`kvmtrace export --time` serving {} VMs: one scrape is {} bytes, {} series, \
             and takes {:.0} ms of L1 time (mean of {SCRAPES}).",
            s.vms,
            s.bytes,
            s.series,
            s.seconds * 1e3
        );
        md
    }

    fn json(&self, opts: &Options, host: &Cost) -> Value {
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
fn mean(by_round: Option<&BTreeMap<u32, u64>>) -> Option<f64> {
    let runs = by_round?;
    (!runs.is_empty()).then(|| runs.values().sum::<u64>() as f64 / runs.len() as f64)
}

fn host_cpu() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

#[cfg(test)]
mod tests {
    use kvmtrace_model::{
        report::{Report, RunInfo},
        snapshot::Snapshot,
    };

    use super::*;

    const CPUIDS: u32 = 100;

    /// A record of `exits` exits, as L1 prints it in a `kvmtrace` section.
    fn record(exits: u64) -> String {
        let mut snap = Snapshot::default();
        snap.exits.insert(
            tracer_common::ExitKey::from_raw(1, 10),
            tracer_common::ExitStats {
                count: exits,
                ..tracer_common::ExitStats::default()
            },
        );
        let report =
            Report::build(&snap, RunInfo::default()).unwrap_or_else(|e| panic!("build: {e}"));
        serde_json::to_string(&report).unwrap_or_else(|e| panic!("json: {e}"))
    }

    fn section(lines: &mut Vec<Line>, kind: &str, tag: &str, text: &str) {
        lines.push(line(format!("KVMLAB begin {kind} {tag}")));
        lines.extend(text.lines().map(|t| line(t.to_owned())));
        lines.push(line(format!("KVMLAB end {kind} {tag}")));
    }

    fn line(text: String) -> Line {
        Line { at: 0.0, text }
    }

    /// The console of a bench whose L1 ran `rounds` full rounds, each configuration
    /// taking `ns(config)`; without the timed runs when `runs` is false.
    fn console(rounds: u32, runs: bool, ns: &dyn Fn(&str) -> u64) -> Vec<Line> {
        let mut lines = Vec::new();
        for round in 1..=rounds {
            for (config, _) in CONFIGS.iter().filter(|_| runs) {
                lines.push(line(format!(
                    "KVMLAB bench {config} {round} run_ns={} cpu_ns={}",
                    ns(config),
                    ns(config) / 2
                )));
            }
            for (tag, _) in RECORDS {
                section(
                    &mut lines,
                    "kvmtrace",
                    &format!("{tag}{round}"),
                    &record(150),
                );
            }
            section(&mut lines, "bpftrace", &format!("r{round}"), "@exits: 150");
        }
        section(&mut lines, "kvmtrace", "stats", &record(150));
        section(&mut lines, "kvmtrace", "stats-counts", &record(150));
        section(&mut lines, "kvmtrace", "stats-crowd", &record(150));
        section(&mut lines, "kvmtrace", "stats-counts-crowd", &record(150));
        lines.push(line(format!(
            "KVMLAB scrape vms={EXPORT_VMS} series=4100 bytes=900000 scrapes={SCRAPES} from=100.00 to=101.50"
        )));
        lines
    }

    fn opts(rounds: u32) -> Options {
        Options {
            cpuids: CPUIDS,
            rounds,
            out: PathBuf::new(),
            timeout_scale: 1.0,
            only: Parts::All,
        }
    }

    fn err(lines: &[Line], rounds: u32) -> String {
        Results::parse(lines, CPUIDS, rounds, Parts::All)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn the_rounds_asked_for_are_the_rounds_run() {
        // (rounds L1 ran, with timed runs, rounds asked for, the error)
        for (ran, runs, asked, want) in [
            (
                2,
                false,
                2,
                "L1 measured no stock run in round 1: see the bench's serial log",
            ),
            (
                1,
                true,
                2,
                "L1 measured no stock run in round 2: see the bench's serial log",
            ),
            (
                2,
                true,
                1,
                "L1 ran round 2, not one of the 1 asked for: KVMLAB bench stock 2 run_ns=1000 cpu_ns=500",
            ),
            (1, true, 1, ""),
        ] {
            let lines = console(ran, runs, &|_| 1000);
            assert_eq!(err(&lines, asked), want, "{ran} rounds, {asked} asked for");
        }
    }

    #[test]
    fn markdown_has_ratios_and_no_nan() {
        let host = Cost {
            attach_ms: 1.0,
            peak_rss_mib: 2.0,
            exits: 0,
            ns_per_exit: None,
            programs: Vec::new(),
        };
        // (rounds, the stock run's ns, kvmtrace's row); a stock run of 0 ns gives no
        // ratio: a dash, not NaN.
        for (rounds, stock, want) in [
            (
                2,
                1000,
                "| + kvmtrace record (with time) | 0.01 µs | 1.5000 / 1.5000 | +50.00 % |",
            ),
            (1, 0, "| + kvmtrace record (with time) | 0.01 µs |  | - |"),
        ] {
            let ns = move |c: &str| if c == "stock" { stock } else { 1500 };
            let lines = console(rounds, true, &ns);
            let md = Results::parse(&lines, CPUIDS, rounds, Parts::All)
                .unwrap_or_else(|e| panic!("{e}"))
                .markdown(&opts(rounds), &host);
            assert!(!md.contains("NaN"), "{md}");
            let row = md
                .lines()
                .find(|l| l.starts_with("| + kvmtrace record (with time)"));
            assert_eq!(row, Some(want), "stock {stock} ns");
        }
    }

    #[test]
    fn bench_lines_give_their_fields() {
        let l = BenchLine::parse("KVMLAB bench kvmtrace-crowd 2 run_ns=10 cpu_ns=8 tracer_ns=3");
        assert_eq!(
            l.ok().flatten(),
            Some(BenchLine {
                config: "kvmtrace-crowd",
                round: 2,
                run_ns: 10,
                cpu_ns: Some(8),
                tracer_ns: Some(3),
            })
        );
        assert!(matches!(
            BenchLine::parse("KVMLAB step round1 900"),
            Ok(None)
        ));
        for bad in [
            "KVMLAB bench stock 1 cpu_ns=5",
            "KVMLAB bench stock 1 run_ns=",
            "KVMLAB bench stock one run_ns=5",
            "KVMLAB bench stock",
        ] {
            let e = BenchLine::parse(bad).err().map(|e| e.to_string());
            assert_eq!(e, Some(format!("bad bench line: {bad}")));
        }
    }

    #[test]
    fn the_crowd_part_needs_only_its_configurations() {
        let mut lines = console(1, true, &|c| match c {
            "stock" => 1_000_000,
            "kvmtrace-counts" | "kvmtrace" => 1_100_000,
            "stock-crowd" => 2_000_000,
            _ => 2_100_000,
        });
        lines.retain(|l| {
            BenchLine::parse(&l.text)
                .ok()
                .flatten()
                .is_none_or(|b| CROWD_PART.contains(&b.config))
        });
        for l in &mut lines {
            if l.text.starts_with("KVMLAB bench kvmtrace-counts-crowd ") {
                l.text.push_str(" tracer_ns=2560000");
            }
        }
        // The whole bench needs every configuration; the crowd part, its own.
        assert_eq!(
            err(&lines, 1),
            "L1 measured no kvmtrace-empty run in round 1: see the bench's serial log"
        );
        let r = Results::parse(&lines, CPUIDS, 1, Parts::Crowd).unwrap_or_else(|e| panic!("{e}"));
        let md = r.markdown(
            &Options {
                only: Parts::Crowd,
                ..opts(1)
            },
            &Cost::default(),
        );
        assert!(!md.contains("perf kvm stat record"), "{md}");
        assert!(!md.contains("patch's own cost"), "{md}");
        // 100 CPUIDs: 100 000 ns more over 100 exits alone, 100 000 ns more over the
        // crowd's (100 / 256 * 256 = 0): no exit, a dash.
        assert!(
            md.contains(
                "| kvmtrace record --counts-only | first start to last end | 1000 ns | - | - |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| kvmtrace record --counts-only | the VMs' CPU time | 500 ns | - | - |"),
            "{md}"
        );
        assert!(
            md.contains("own user space took 2.6 ms of CPU in the crowd's span: 10 µs per VM."),
            "{md}"
        );
    }

    #[test]
    fn a_console_cut_short_still_gives_its_runs() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let log = dir.path().join("serial.log");
        let lines = vec![
            line("KVMLAB bench stock 1 run_ns=7 cpu_ns=6".to_owned()),
            line("KVMLAB step export-scrape 900".to_owned()),
        ];
        std::fs::write(&log, console::transcript(&lines)).unwrap_or_else(|e| panic!("{e}"));
        let read = console_of(&log);
        let [runs, cpu, tracer] = Results::timed(&read).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(runs["stock"][&1], 7);
        assert_eq!(cpu["stock"][&1], 6);
        assert!(tracer.is_empty());
        assert!(console_of(&dir.path().join("none")).is_empty());
    }
}
