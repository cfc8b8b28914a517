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
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::json;

use self::results::Results;
use crate::{
    files::write_in as write,
    lab::{
        console::Line,
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
        CONFIGS.iter().filter(|(c, _)| opts.only.runs(c)).count(),
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
    let timed = Results::timed(lines);
    write(
        &out,
        "runs.json",
        &serde_json::to_string_pretty(&json!({ "result": result, "timed": timed }))?,
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

mod markdown;
mod results;
#[cfg(test)]
mod tests;
