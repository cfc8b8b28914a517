//! The command line, as clap parses it. Checked and turned into work in `record.rs`.

use std::path::PathBuf;

use clap::{
    Args, Parser, Subcommand,
    builder::{PossibleValue, PossibleValuesParser, TypedValueParser},
};
use kvmtrace_model::tracefs_format::Tracepoint;
use kvmtrace_model::{
    cause::Verdict,
    exit_reasons::Isa,
    leaves::{self, Leaves},
    render::{Format, diff::DiffFormat},
};

use crate::exit_status::{self, Status};

/// Count KVM VM exits by reason, per VM and per vCPU, with the time KVM spends on each.
///
/// kvmtrace attaches eBPF programs to the kvm:kvm_exit and kvm:kvm_entry tracepoints of
/// this host (the L1 hypervisor). Run it as root while guests run.
#[derive(Debug, Parser)]
#[command(name = "kvmtrace", version, max_term_width = 100,
          after_help = exit_status::help(&Status::ALL))]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Count VM exits until Ctrl-C, a duration, or the end of a command.
    ///
    /// Examples:
    ///   kvmtrace record -d 10
    ///   kvmtrace record -p 4242 --per-vcpu
    ///   kvmtrace record -d 10 --detail --rip 5 --guest-symbols guest-kallsyms.txt
    ///   kvmtrace record --format json -o boot.json -- qemu-system-x86_64 -accel kvm ...
    #[command(verbatim_doc_comment, after_help = exit_status::help(&[Status::CommandFailed]))]
    Record(Box<RecordArgs>),
    /// Show a saved record (`record --format json`) as a table, CSV or JSON.
    #[command(after_help = exit_status::help(&[]))]
    Show(ShowArgs),
    /// List the exit reasons kvmtrace knows, with their numbers.
    #[command(after_help = exit_status::help(&[]))]
    Reasons(ReasonsArgs),
    /// Compare two records reason by reason (e.g. ept=1 against ept=0).
    ///
    /// Example:
    ///   kvmtrace diff ept1.json ept0.json --format md
    #[command(verbatim_doc_comment, after_help = exit_status::help(&[]))]
    Diff(DiffArgs),
    /// Inside a guest: read a patched KVM's exit counters through CPUID.
    #[command(after_help = exit_status::help(&[Status::NotPatched, Status::Unexplained]))]
    Guest(GuestArgs),
    /// Compare the guest's counter reads with the host's count at the same instant.
    ///
    /// Needs a record made with `record --snapshots`. Each read is exact, or wrong for
    /// the causes named in its row; the exit status says which (below).
    ///
    /// Examples:
    ///   kvmtrace reconcile boot.json --guest guest.json
    ///   kvmtrace reconcile boot.json --accept registers_unset,fastpath_not_counted
    #[command(verbatim_doc_comment,
              after_help = exit_status::help(&[Status::Unexplained, Status::NoCounterReads,
                                               Status::CausesNamed]))]
    Reconcile(ReconcileArgs),
    /// A live view of exit rates per reason and per VM, like kvm_stat (q quits).
    #[command(after_help = exit_status::help(&[]))]
    Top(TopArgs),
    /// Serve exit metrics to Prometheus on /metrics, read from the eBPF maps at each
    /// scrape.
    ///
    /// Binds to localhost unless told otherwise. Stops cleanly on SIGTERM or Ctrl-C;
    /// logs go to standard error. Scrapes never overlap: one that comes during another
    /// waits for it, then reads the maps itself. With --web-config it serves HTTPS and
    /// asks for what that file says (a client certificate, a password); it reads the file
    /// again, with the certificates it names, when they change and on SIGHUP.
    ///
    /// Examples:
    ///   kvmtrace export
    ///   kvmtrace export --listen 0.0.0.0:10470 --web-config /etc/kvmtrace/web-config.yml
    ///   kvmtrace export --listen 0.0.0.0:10470 --time --retention 600
    #[command(verbatim_doc_comment, after_help = exit_status::help(&[]))]
    Export(ExportArgs),
}

#[derive(Clone, Debug, Args)]
pub struct ExportArgs {
    /// Address and port to serve on; 0.0.0.0:PORT serves every interface. The default
    /// port, 10470, is outside 9100-9999, the range Prometheus's list of default port
    /// allocations has given out in full.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:10470")]
    pub listen: std::net::SocketAddr,
    /// Count only the VM process with this pid (repeatable).
    #[arg(short, long = "pid", value_name = "PID", value_parser = parse_pid, allow_negative_numbers = true)]
    pub pids: Vec<u32>,
    /// Label exits by vCPU too: a series per VM, vCPU and reason.
    #[arg(long)]
    pub per_vcpu: bool,
    /// Serve the exit handling time histogram (kvmtrace_exit_handling_seconds).
    #[arg(long)]
    pub time: bool,
    /// Seconds an exited VM's series stay, so the last scrape sees its final counts;
    /// then they leave the maps and the scrape.
    #[arg(long, value_name = "SECONDS", default_value = "300", value_parser = parse_seconds,
          allow_negative_numbers = true)]
    pub retention: std::time::Duration,
    /// The most exit series served; the VMs with the fewest exits beyond it are summed
    /// into vm="_other" (kvmtrace_series_over_cap says how many).
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = parse_series,
          allow_negative_numbers = true)]
    pub max_series: usize,
    /// TLS, client certificates, basic auth and response headers, in the Prometheus
    /// exporter toolkit's web configuration format (the file node_exporter takes with
    /// --web.config.file). A field kvmtrace does not support is an error. Relative paths
    /// in it are relative to its directory.
    #[arg(long, value_name = "FILE")]
    pub web_config: Option<PathBuf>,
    /// The most connections served at once. Beyond it a new connection takes the place
    /// of the oldest one that has not yet made an authorised request (a client that
    /// connects and sends nothing); when there is none, it is closed at once.
    #[arg(long, value_name = "N", default_value_t = 512, value_parser = parse_connections,
          allow_negative_numbers = true)]
    pub max_connections: usize,
    /// Seconds a client has to finish the TLS handshake after it connects, and then to
    /// send each request's headers (an idle kept-alive connection is closed after it).
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds,
          allow_negative_numbers = true)]
    pub header_timeout: std::time::Duration,
    /// The largest request head (request line and headers) accepted, in bytes; a larger
    /// one is answered 431. A scrape's head is well under 1 KiB.
    #[arg(long, value_name = "BYTES", default_value_t = 8192, value_parser = parse_request_bytes,
          allow_negative_numbers = true)]
    pub max_request_bytes: usize,
}

fn parse_connections(text: &str) -> Result<usize, String> {
    text.trim()
        .parse()
        .ok()
        .filter(|n| (1..=1_000_000).contains(n))
        .ok_or_else(|| format!("'{text}' is not a number of connections: give 1 to 1000000"))
}

fn parse_request_bytes(text: &str) -> Result<usize, String> {
    text.trim()
        .parse()
        .ok()
        .filter(|n| (1024..=1 << 20).contains(n))
        .ok_or_else(|| format!("'{text}' is not a request size: give 1024 to 1048576 bytes"))
}

fn parse_series(text: &str) -> Result<usize, String> {
    text.trim()
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("'{text}' is not a number of series: give 1 or more"))
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Count only the VM process with this pid (repeatable).
    #[arg(short, long = "pid", value_name = "PID", value_parser = parse_pid, allow_negative_numbers = true)]
    pub pids: Vec<u32>,
    /// Seconds between refreshes.
    #[arg(short, long, value_name = "SECONDS", default_value = "1", value_parser = parse_seconds,
          allow_negative_numbers = true)]
    pub interval: std::time::Duration,
    /// Stop after this many refreshes.
    #[arg(short = 'n', long, value_name = "N", value_parser = parse_refreshes, allow_negative_numbers = true)]
    pub iterations: Option<u64>,
    /// Rows per table.
    #[arg(long, default_value_t = 20, allow_negative_numbers = true)]
    pub rows: usize,
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// A record made with `kvmtrace record --snapshots --format json`.
    pub record: PathBuf,
    /// The guest's `kvmtrace guest --format json` output, checked against what the
    /// host saw it read.
    #[arg(long, value_name = "FILE")]
    pub guest: Option<PathBuf>,
    /// Causes to accept on purpose (e.g. a course whose contract leaves EBX/EDX
    /// unspecified): reads wrong only for these are shown as accepted, not exact, and
    /// do not change the exit status. The causes: truncated32, fastpath_not_counted,
    /// synthetic_counted, shared_across_vms, carried_over, lost_updates,
    /// total_leaf_wrong, registers_unset, cycles_not_implemented,
    /// wrong_undefined_answer, answer_after_tracepoint.
    #[arg(long, value_name = "CAUSE[,CAUSE...]", value_delimiter = ',',
          value_parser = parse_cause)]
    pub accept: Vec<Verdict>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = TextFormat::Table)]
    pub format: TextFormat,
    /// Write to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

fn parse_cause(text: &str) -> Result<Verdict, String> {
    Verdict::parse_fault(text)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TextFormat {
    Table,
    Json,
}

/// Which CPUID leaves hold the patched KVM's counters.
#[derive(Debug, Args)]
pub struct LeafArgs {
    /// Leaf layout: kvmtrace (count 0x4FFFFFFE, total 0x4FFFFFFF, cycles 0x4FFFFFFD) or
    /// count-fffd (count 0x4FFFFFFD, cycles 0x4FFFFFFC).
    #[arg(long, default_value = "kvmtrace", value_parser = parse_preset)]
    pub preset: String,
    /// Leaf of the per-reason exit count (overrides the preset).
    #[arg(long, value_parser = leaves::parse_leaf, allow_negative_numbers = true)]
    pub count_leaf: Option<u32>,
    /// Leaf of the totals (overrides the preset).
    #[arg(long, value_parser = leaves::parse_leaf, allow_negative_numbers = true)]
    pub total_leaf: Option<u32>,
    /// Leaf of the per-reason cycles (overrides the preset).
    #[arg(long, value_parser = leaves::parse_leaf, allow_negative_numbers = true)]
    pub cycles_leaf: Option<u32>,
}

impl LeafArgs {
    /// The preset with the overrides applied.
    pub fn leaves(&self) -> Result<Leaves, String> {
        let mut l = leaves::preset(&self.preset)?;
        if let Some(c) = self.count_leaf {
            l.count = c;
        }
        if self.total_leaf.is_some() {
            l.total = self.total_leaf;
        }
        if self.cycles_leaf.is_some() {
            l.cycles = self.cycles_leaf;
        }
        Ok(l)
    }
}

#[derive(Debug, Args)]
pub struct GuestArgs {
    #[command(flatten)]
    pub leaves: LeafArgs,
    /// Reason numbering: vmx or svm; default: from the CPU vendor.
    #[arg(long, value_parser = parse_isa)]
    pub isa: Option<Isa>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = TextFormat::Table)]
    pub format: TextFormat,
    /// Show every reason (table and JSON), also those with no exits.
    #[arg(long)]
    pub all: bool,
    /// Ask the count and cycles leaves about every ECX in 0..=0xFFFF and the 32-bit
    /// edges, and check each answer against the tables (exit status 5 on any
    /// disagreement).
    #[arg(long)]
    pub sweep: bool,
    /// Write to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// How a record is rendered, for `record` and `show`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Output format.
    #[arg(short, long, value_parser = choice::<Format>(), default_value = "table")]
    pub format: Format,
    /// Rows per VM and vCPU instead of per reason. A record keeps rows per vCPU only
    /// with it (or --vcpu, --detail, --rip, --snapshots); without, rows per VM. Both
    /// come from each vCPU thread's own row, at the same cost per exit; --vcpu,
    /// --detail, --rip and --snapshots keep hash rows, which cost more.
    #[arg(long)]
    pub per_vcpu: bool,
    /// Split each reason by what caused it: exception vector, control register and
    /// access, I/O port, MSR, CPUID leaf, guest-physical region (record: count them).
    #[arg(long)]
    pub detail: bool,
    #[command(flatten)]
    pub symbols: SymbolArgs,
    /// Write the report to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Guest kernel symbols for `--rip` rows.
#[derive(Debug, Args)]
pub struct SymbolArgs {
    /// Name the guest kernel RIPs of `--rip` rows from this file: the guest's
    /// /proc/kallsyms (read as root), or its System.map with --kaslr-offset.
    #[arg(long, value_name = "FILE")]
    pub guest_symbols: Option<PathBuf>,
    /// How far the guest kernel was moved from its System.map addresses (hex), as its
    /// `_stext` in /proc/kallsyms minus the one in System.map; 0 with `nokaslr`.
    #[arg(long, value_name = "HEX", default_value = "0", value_parser = parse_hex_u64,
          requires = "guest_symbols")]
    pub kaslr_offset: u64,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// A record written by `kvmtrace record --format json`.
    pub record: PathBuf,
    #[command(flatten)]
    pub report: ReportArgs,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The first record (JSON from `kvmtrace record --format json`).
    pub a: PathBuf,
    /// The second record.
    pub b: PathBuf,
    /// Output format.
    #[arg(short, long, value_parser = choice::<DiffFormat>(), default_value = "table")]
    pub format: DiffFormat,
    /// Under each reason, the sub-keys that moved (records made with `record --detail`;
    /// JSON always has them).
    #[arg(long)]
    pub detail: bool,
    #[command(flatten)]
    pub symbols: SymbolArgs,
    /// Write to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// Count only the VM process with this pid (repeatable); default: every VM.
    #[arg(short, long = "pid", value_name = "PID", conflicts_with = "command", value_parser = parse_pid,
          allow_negative_numbers = true)]
    pub pids: Vec<u32>,

    /// Count only exits of this vCPU id (not with --snapshots: the guest reads the
    /// whole VM's counters).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub vcpu: Option<u32>,

    /// Stop after this many seconds (fractions allowed).
    #[arg(short, long, value_name = "SECONDS", value_parser = parse_seconds, allow_negative_numbers = true)]
    pub duration: Option<std::time::Duration>,

    #[command(flatten)]
    pub report: ReportArgs,

    /// Record every guest read of the counter leaves with the host's count for that VM
    /// at that instant (for `kvmtrace reconcile`).
    #[arg(long)]
    pub snapshots: bool,

    /// Count exits per VM and reason only, at the least cost per exit: no handling
    /// time, no vCPU rows, no snapshots. One short eBPF program and one per-CPU add per
    /// exit, reading the reason from the vCPU where the kvm module's BTF shows where.
    #[arg(long, conflicts_with_all = ["snapshots", "rip", "vcpu", "per_vcpu", "detail"])]
    pub counts_only: bool,

    /// Read exits through the classic tracepoint even where the raw one would do (to
    /// compare the two).
    #[arg(long, hide = true)]
    pub classic_tracepoint: bool,

    /// With --counts-only: attach an empty program to the raw exit tracepoint instead
    /// of the count path's, and count nothing: the floor that any eBPF counter on that
    /// tracepoint pays (for `cargo xtask bench`).
    #[arg(
        long,
        hide = true,
        requires = "counts_only",
        conflicts_with = "classic_tracepoint"
    )]
    pub empty_program: bool,

    /// With --snapshots: keep each VM's counts for the reads in cells shared by all
    /// CPUs, as on kernels before 5.19, even where per-CPU cells would do (to test
    /// that path here).
    #[arg(long, hide = true, requires = "snapshots")]
    pub shared_cells: bool,

    /// Count exits per guest instruction pointer and show the N RIPs with the most
    /// exits per reason (name them with --guest-symbols).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1000),
          allow_negative_numbers = true)]
    pub rip: Option<u16>,

    #[command(flatten)]
    pub leaves: LeafArgs,

    /// Room for this many (reason, phase) rows of the overflow map, which counts the
    /// exits the per-vCPU map had no room for; exits beyond both are still in the total,
    /// counted as `dropped.exit_map_full`.
    #[arg(long, alias = "max-reasons", value_name = "N", default_value_t = tracer_common::limits::MAX_OVERFLOW_ROWS,
          value_parser = clap::value_parser!(u32).range(1..=MAX_MAP_ROWS), allow_negative_numbers = true)]
    pub max_overflow_rows: u32,

    /// Room for this many (VM, vCPU, reason) rows; exits beyond it are in the per-reason
    /// rows only, counted as `dropped.vcpu_map_full`.
    #[arg(long, value_name = "N", default_value_t = tracer_common::limits::MAX_VCPU_ROWS,
          value_parser = clap::value_parser!(u32).range(1..=MAX_MAP_ROWS), allow_negative_numbers = true)]
    pub max_vcpu_rows: u32,

    /// The exit tracepoint (for tests and patched kernels).
    #[arg(long, hide = true, default_value = "kvm:kvm_exit", value_parser = Tracepoint::parse)]
    pub exit_tracepoint: Tracepoint,

    /// The entry tracepoint (for tests and patched kernels).
    #[arg(long, hide = true, default_value = "kvm:kvm_entry", value_parser = Tracepoint::parse)]
    pub entry_tracepoint: Tracepoint,

    /// Run this command and count the VMs it (or any process it forks) runs; the record
    /// ends when it exits.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ReasonsArgs {
    /// vmx (Intel) or svm (AMD); default: both.
    #[arg(long, value_parser = parse_isa)]
    pub isa: Option<Isa>,
}

/// The largest map kvmtrace asks for (each row is a few dozen bytes per CPU).
const MAX_MAP_ROWS: i64 = 1 << 20;

fn parse_seconds(text: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("'{text}' is not a positive number of seconds"));
    }
    std::time::Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            format!(
                "'{text}' seconds is out of range: give at least 1e-9 and at most a few centuries"
            )
        })
}

/// A 64-bit number in hex, with or without `0x`.
fn parse_hex_u64(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    u64::from_str_radix(digits, 16)
        .map_err(|_| format!("'{text}' is not a hex number: give one like 0x1e00000"))
}

/// A number of refreshes: 1 or more.
fn parse_refreshes(text: &str) -> Result<u64, String> {
    text.trim()
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("'{text}' is not a number of refreshes: give 1 or more"))
}

/// Linux hands out pids below this (`PID_MAX_LIMIT` on 64-bit).
const PID_MAX_LIMIT: u32 = 1 << 22;

/// A pid of a process that exists now: checked while parsing, so a typo is a usage
/// error (exit 2) before kvmtrace asks for privileges or attaches anything.
fn parse_pid(text: &str) -> Result<u32, String> {
    let pid: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a process id: give a number like 4242"))?;
    if pid == 0 || pid >= PID_MAX_LIMIT {
        return Err(format!(
            "'{text}' is not a process id: pids go from 1 to {}",
            PID_MAX_LIMIT - 1
        ));
    }
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(format!(
            "no process with pid {pid}: check it with `ps -p {pid}`"
        ));
    }
    Ok(pid)
}

/// A leaf preset name, checked while parsing so that `record` rejects it even without
/// `--snapshots`.
fn parse_preset(text: &str) -> Result<String, String> {
    leaves::preset(text).map(|_| text.to_owned())
}

fn parse_isa(text: &str) -> Result<Isa, String> {
    text.parse()
}

/// An enum of the model offered as an option's values: the model has no clap, so the
/// command line names its values here.
trait Choice: Copy + Send + Sync + 'static {
    /// Each value with its name and its `--help` line, in the order help lists them.
    const VALUES: &'static [(Self, &'static str, &'static str)];
}

impl Choice for Format {
    const VALUES: &'static [(Self, &'static str, &'static str)] = &[
        (Self::Table, "table", "A table for people"),
        (
            Self::Json,
            "json",
            "The versioned JSON report (schema kvmtrace.record.v1)",
        ),
        (
            Self::Csv,
            "csv",
            "One row per reason (or per VM, vCPU and reason with --per-vcpu)",
        ),
    ];
}

impl Choice for DiffFormat {
    const VALUES: &'static [(Self, &'static str, &'static str)] = &[
        (Self::Table, "table", "A table for people"),
        (Self::Json, "json", "JSON (schema kvmtrace.diff.v1)"),
        (Self::Md, "md", "A Markdown table, for reports"),
        (Self::Svg, "svg", "An SVG grouped bar chart on a log axis"),
    ];
}

/// clap's parser of a [`Choice`]: one of its names, with the possible values (and
/// their help) that clap lists.
fn choice<T: Choice>() -> impl TypedValueParser<Value = T> {
    let values = T::VALUES
        .iter()
        .map(|&(_, name, help)| PossibleValue::new(name).help(help));
    PossibleValuesParser::new(values).try_map(|name: String| {
        T::VALUES
            .iter()
            .find(|&&(_, n, _)| n == name)
            .map(|&(value, _, _)| value)
            .ok_or_else(|| format!("'{name}' is not a possible value"))
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn seconds_parse() {
        assert_eq!(
            parse_seconds("1.5"),
            Ok(std::time::Duration::from_millis(1500))
        );
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("ten").is_err());
        assert!(parse_seconds("NaN").is_err());
        assert!(parse_seconds("inf").is_err());
        assert!(parse_seconds("1e30").is_err_and(|e| e.contains("out of range")));
    }

    #[test]
    fn pids_and_presets_parse() {
        assert_eq!(parse_pid("1"), Ok(1));
        assert_eq!(
            parse_pid(&std::process::id().to_string()),
            Ok(std::process::id())
        );
        for bad in ["0", "-1", "pid", "", "4194304", "99999999999"] {
            assert!(parse_pid(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_preset("count-fffd").as_deref(), Ok("count-fffd"));
        assert!(parse_preset("nope").is_err());
    }

    #[test]
    fn model_formats_are_offered_by_name() {
        let show = |format: &str| match Cli::try_parse_from([
            "kvmtrace", "show", "-f", format, "r.json",
        ]) {
            Ok(Cli {
                command: Command::Show(args),
            }) => Ok(args.report.format),
            other => Err(format!("{other:?}")),
        };
        assert_eq!(show("table"), Ok(Format::Table));
        assert_eq!(show("json"), Ok(Format::Json));
        assert_eq!(show("csv"), Ok(Format::Csv));
        assert!(show("xml").is_err());
        let diff = |format: &str| match Cli::try_parse_from([
            "kvmtrace", "diff", "-f", format, "a.json", "b.json",
        ]) {
            Ok(Cli {
                command: Command::Diff(args),
            }) => Ok(args.format),
            other => Err(format!("{other:?}")),
        };
        for (value, name, _) in DiffFormat::VALUES {
            assert_eq!(diff(name), Ok(*value), "{name}");
        }
        assert_eq!(diff("md"), Ok(DiffFormat::Md));
        let help = Cli::command()
            .find_subcommand_mut("diff")
            .map(|c| c.render_long_help().to_string())
            .unwrap_or_default();
        assert!(
            help.lines()
                .any(|l| l.trim() == "- svg:   An SVG grouped bar chart on a log axis"),
            "{help}"
        );
        let Ok(Cli {
            command: Command::Show(args),
        }) = Cli::try_parse_from(["kvmtrace", "show", "r.json"])
        else {
            panic!("show without -f");
        };
        assert_eq!(args.report.format, Format::Table, "the default");
    }

    #[test]
    fn record_takes_a_command() {
        let cli = Cli::try_parse_from([
            "kvmtrace", "record", "-f", "json", "--", "qemu", "-m", "128",
        ]);
        let Ok(Cli {
            command: Command::Record(args),
        }) = cli
        else {
            panic!("parse failed: {cli:?}");
        };
        assert_eq!(args.command, ["qemu", "-m", "128"]);
        assert_eq!(args.report.format, Format::Json);
        assert!(Cli::try_parse_from(["kvmtrace", "record", "-p", "1", "--", "qemu"]).is_err());
    }
}
