//! The bench's parsing and tables, on consoles made up here.

use kvmtrace_model::{
    report::{Report, RunInfo},
    snapshot::Snapshot,
};

use std::path::PathBuf;

use super::{
    CONFIGS, CROWD_PART, EXPORT_VMS, Options, Parts, RECORDS, SCRAPES, console_of,
    results::{BenchLine, Results},
};
use crate::lab::{
    console::{self, Line},
    record::Cost,
};

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
    let report = Report::build(&snap, RunInfo::default()).unwrap_or_else(|e| panic!("build: {e}"));
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
        line("KVMLAB bench stock-crowd 1 run_ns=9 cpu_ns=-2147483648".to_owned()),
        line("KVMLAB step export-scrape 900".to_owned()),
    ];
    std::fs::write(&log, console::transcript(&lines)).unwrap_or_else(|e| panic!("{e}"));
    let read = console_of(&log);
    let t = Results::timed(&read);
    assert_eq!(t.runs["stock"][&1], 7);
    assert_eq!(t.cpu["stock"][&1], 6);
    assert!(t.tracer.is_empty());
    assert_eq!(
        t.bad,
        ["KVMLAB bench stock-crowd 1 run_ns=9 cpu_ns=-2147483648"]
    );
    assert!(console_of(&dir.path().join("none")).is_empty());
}

#[test]
fn a_run_without_its_cpu_time_fails_the_bench() {
    let mut lines = console(1, true, &|_| 1000);
    for l in &mut lines {
        if l.text.starts_with("KVMLAB bench stock-crowd 1 ") {
            l.text = "KVMLAB bench stock-crowd 1 run_ns=1000".to_owned();
        }
    }
    assert_eq!(
        err(&lines, 1),
        "L1 measured no CPU time of the stock-crowd run in round 1: see the bench's serial log"
    );
}
