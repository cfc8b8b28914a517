//! The bench's tables: every configuration against stock, kvmtrace's own costs, the
//! crowd against one VM, the floor and the scrape.

use std::fmt::Write as _;

use super::{
    CONFIGS, CROWD, Options, PERF_BIG_BUFFER, Parts, SCRAPES, crowd_cpuids,
    results::{Results, mean},
};
use crate::lab::record::Cost;

impl Results {
    /// The crowd's table: each traced configuration's cost per exit with 256 VMs at
    /// once against one VM, three ways: the VMs' own CPU time, the span from the first
    /// start to the last end (which also holds the tracer's user space and the
    /// scheduling of 256 processes on one CPU), and the eBPF programs' own run time.
    pub(super) fn crowd_markdown(&self, cpuids: u32) -> String {
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
    pub(super) fn floor_markdown(&self, cpuids: u32) -> String {
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

    pub(super) fn markdown(&self, opts: &Options, host: &Cost) -> String {
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
