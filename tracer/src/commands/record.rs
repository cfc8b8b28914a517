//! `kvmtrace record`: attach, wait for the end of the run, snapshot, report.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    io::Write as _,
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use chrono::Utc;
use kvmtrace::{
    host,
    probe::{Probe, ProbeConfig},
    tracefs::Tracefs,
    vcpu_regs,
};
use kvmtrace_model::{
    render::{self, Format},
    report::{Cost, Filter, PhaseInfo, RegistersInfo, Report, RunInfo},
};
use log::warn;
use tokio::{
    process::{Child, Command},
    signal::unix::{SignalKind, signal},
};

use super::{BadInput, OutputFile, count_choice, load_symbols, render_options};
use crate::{cli::RecordArgs, exit_status::Status};

/// How long a command is given to exit after kvmtrace forwards SIGTERM to it.
const CHILD_GRACE: Duration = Duration::from_secs(5);

/// How often guest counter-leaf reads are taken from the ring buffer.
const CPUID_DRAIN: Duration = Duration::from_millis(100);
/// How often register-learning samples are looked at, while learning.
const LEARN_DRAIN: Duration = Duration::from_millis(10);
use kvmtrace::probe::BTF_DIR;

/// Why the record ended.
enum End {
    Signal(&'static str),
    Duration,
    CommandExited(std::process::ExitStatus),
}

pub fn run(args: RecordArgs) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    if args.vcpu.is_some() && args.snapshots {
        return Err(BadInput(
            "--vcpu cannot be used with --snapshots: the host would count one vCPU while the guest reads the whole VM's counters; drop --vcpu".to_owned(),
        )
        .into());
    }
    // Fail before tracing, not after a long run; an existing file is replaced only
    // once the report is complete.
    let output = args
        .report
        .output
        .as_deref()
        .map(OutputFile::prepare)
        .transpose()?;
    // Before anything is attached: a bad file is a usage error.
    let symbols = load_symbols(&args.report.symbols)?;
    super::check_can_trace()?;
    for pid in &args.pids {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("no process with pid {pid}: check it with `ps -p {pid}`");
        }
    }
    let tracefs = Tracefs::find_or_mount()?;
    let traced = trace(&args, &tracefs, start)?;
    let end = traced.end;
    let mut report = Report::build(&traced.snapshot, traced.info)?;
    if let Some(symbols) = &symbols {
        report.symbolize(symbols);
    }
    let bytes = render::render(&report, args.report.format, render_options(&args.report))?;
    match output {
        Some(file) => file.commit(&bytes)?,
        None => std::io::stdout().write_all(&bytes)?,
    }
    if let Some(err) = report.registers.as_ref().and_then(|r| r.error.as_ref()) {
        bail!("the report is written, but no guest counter read could be seen: {err}");
    }
    if report.dropped.any() {
        warn!(
            "some exits were not recorded in full: {}",
            report.dropped.summary()
        );
    }
    if args.report.format != Format::Table && args.report.output.is_some() {
        eprintln_status(&format!("{} exits recorded", report.total.count));
    }
    Ok(match end {
        End::CommandExited(status) if !status.success() => {
            eprintln_status(&format!("the command exited with {status}"));
            Status::CommandFailed
        }
        End::Signal(_) | End::Duration | End::CommandExited(_) => Status::Success,
    }
    .into())
}

/// What the programs are attached with, from the arguments.
fn probe_config(args: &RecordArgs) -> anyhow::Result<ProbeConfig> {
    let mut pids: BTreeSet<u32> = args.pids.iter().copied().collect();
    if !args.command.is_empty() {
        // Trace our own process: the fork program then adds the command (and whatever
        // it forks) before it can run a vCPU. kvmtrace itself runs no VM.
        pids.insert(std::process::id());
    }
    Ok(ProbeConfig {
        exit_tracepoint: args.exit_tracepoint.clone(),
        entry_tracepoint: args.entry_tracepoint.clone(),
        pids,
        vcpu: args.vcpu,
        snapshots: if args.snapshots {
            Some(args.leaves.leaves().map_err(BadInput)?)
        } else {
            None
        },
        regs: None,
        detail: args.report.detail,
        rips: args.rip.is_some(),
        max_overflow_rows: args.max_overflow_rows,
        max_vcpu_rows: args.max_vcpu_rows,
        counts: None,
        raw_exit: None,
        sum_per_cpu: !args.shared_cells && kvmtrace::probe::sums_per_cpu(),
        vm_time: false,
        cell_isa: kvmtrace::probe::host_isa(),
        vcpu_rows: false,
        empty_exit: false,
    })
    .map(|config| with_exit_source(config, args))
}

/// How exits are read: the count path (`--counts-only`), or the timing path from the
/// vCPU itself where the BTF allows and nothing needs the record's other fields
/// (`--detail`, `--rip`; with `--snapshots`, the registers must come from BTF too,
/// which [`trace`] checks).
fn with_exit_source(config: ProbeConfig, args: &RecordArgs) -> ProbeConfig {
    let choice = count_choice(args.classic_tracepoint);
    let record_free = !args.report.detail && args.rip.is_none();
    let config = ProbeConfig {
        raw_exit: (!args.counts_only && record_free)
            .then(|| choice.offsets())
            .flatten(),
        counts: args.counts_only.then_some(choice),
        empty_exit: args.empty_program,
        ..config
    };
    ProbeConfig {
        vm_time: config.per_vm_time_fits(),
        vcpu_rows: config.per_vm_time_fits() && args.report.per_vcpu,
        ..config
    }
}

/// A finished trace: the maps' contents, the facts of the run, and why it ended.
struct Traced {
    snapshot: kvmtrace_model::snapshot::Snapshot,
    info: RunInfo,
    end: End,
}

/// What the wait for the end of the run gathered besides the maps.
struct Waited {
    end: End,
    comms: BTreeMap<u32, String>,
    filter_pids: Vec<u32>,
    cpuid_reads: Vec<tracer_common::CpuidEvent>,
}

/// Attaches, waits for the end of the run, and takes the snapshot.
fn trace(args: &RecordArgs, tracefs: &Tracefs, start: Instant) -> anyhow::Result<Traced> {
    let config = probe_config(args)?;
    let mut regs = Registers::new(config.snapshots.is_some());
    let config = ProbeConfig {
        // Register learning needs the record's guest_rip: the classic tracepoint.
        raw_exit: config
            .raw_exit
            .filter(|_| config.snapshots.is_none() || regs.layout.is_some()),
        regs: regs.layout.clone(),
        ..config
    };
    let mut probe = Probe::attach(tracefs, &config)?;
    // Said after the line that the record is on, so that a failure before it (a
    // command that cannot run) stays one line.
    let source = match (probe.count_path(), &config.raw_exit) {
        (Some(choice), _) => format!("counting exits through the {}", choice.describe()),
        (None, Some(_)) => "timing exits through the raw tracepoint kvm_exit".to_owned(),
        (None, None) => "timing exits through the classic tracepoint kvm:kvm_exit".to_owned(),
    };
    let source = if probe.per_vm_time() {
        format!("{source}, in rows per VM (--per-vcpu keeps rows per vCPU)")
    } else {
        source
    };
    let source = if config.snapshots.is_some() && !config.sum_per_cpu {
        format!(
            "{source}; the all-VMs count the reads are compared with is kept in one cell shared by all CPUs (per-CPU ones need Linux 5.19)"
        )
    } else {
        source
    };
    let attach_ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let started_at = Utc::now();
    let paging = host::paging();
    let mut phases = Phases::new(&probe, paging.clone(), started_at)?;
    let mut waited = wait(args, &mut probe, &mut regs, &mut phases, &source)?;
    if regs.learning() {
        regs.learn(&mut probe)?;
    }
    probe.drain_cpuid(&mut waited.cpuid_reads);
    phases.look(&probe)?;
    let registers = regs.info(&mut probe)?;
    if let End::Signal(name) = waited.end {
        eprintln_status(&format!("stopped by {name}"));
    }
    probe.flush_logs();
    let mut snapshot = probe.snapshot()?;
    snapshot.cpuid = std::mem::take(&mut waited.cpuid_reads);
    let ended_at = Utc::now();
    let maps = probe.map_costs();
    let cost = Cost {
        attach_ns,
        peak_rss_kib: host::peak_rss_kib(),
        bpf_stats: host::bpf_stats_enabled(),
        filter_pids: snapshot.filter_pids,
        programs: probe.costs(),
        map_bytes: maps.iter().map(|m| m.kernel_bytes).sum(),
        maps,
    };
    drop(probe);

    for pid in snapshot.vcpus.keys().map(|k| k.pid) {
        if let Some(comm) = host::comm(pid) {
            waited.comms.entry(pid).or_insert(comm);
        }
    }
    let info = RunInfo {
        kernel_release: host::kernel_release(),
        paging: paging.or_else(host::paging),
        started_at,
        ended_at,
        filter: Filter {
            pids: waited.filter_pids,
            vcpu: args.vcpu,
        },
        comms: waited.comms,
        leaves: config.snapshots,
        phases: phases.seen,
        cost: Some(cost),
        registers,
        detail: args.report.detail,
        rip_top: args.rip.map(usize::from),
    };
    Ok(Traced {
        snapshot,
        info,
        end: waited.end,
    })
}

/// Runs the command (if any), says the record is on, and waits for its end: the
/// command's exit, the duration, or a signal; meanwhile drains the guest counter reads,
/// looks for module reloads, and learns the register layout.
fn wait(
    args: &RecordArgs,
    probe: &mut Probe,
    regs: &mut Registers,
    phases: &mut Phases,
    source: &str,
) -> anyhow::Result<Waited> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut comms = BTreeMap::new();
    let mut filter_pids = args.pids.clone();
    let mut cpuid_reads = Vec::new();
    let end = runtime.block_on(async {
        // Before the command starts and before the line below: a script may signal as
        // soon as it reads it.
        let mut signals = Signals::install()?;
        let mut child = match args.command.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest);
                // The command (a VMM) gets none of kvmtrace's ambient capabilities (the
                // .deb's service user holds CAP_BPF, CAP_PERFMON and
                // CAP_DAC_READ_SEARCH that way): a VMM has no use for them.
                // SAFETY: prctl is async-signal-safe, and nothing else runs between
                // fork and exec here.
                unsafe {
                    command.pre_exec(|| {
                        // Before 4.3 there are no ambient capabilities: EINVAL, nothing
                        // to clear.
                        let _ = libc::prctl(
                            libc::PR_CAP_AMBIENT,
                            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                            0,
                            0,
                            0,
                        );
                        Ok(())
                    });
                }
                let child = command.spawn().map_err(|e| {
                    BadInput(format!(
                        "cannot run {program}: {e}: check the command after --"
                    ))
                })?;
                if let Some(pid) = child.id() {
                    filter_pids.push(pid);
                    let base = Path::new(program)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned());
                    comms.insert(pid, base.unwrap_or_else(|| program.clone()));
                }
                Some(child)
            }
            None => None,
        };
        // Once attached, say so: scripts wait for this line before starting VMs.
        eprintln_status(&match (&args.command.first(), args.duration) {
            (Some(program), _) => format!("recording VM exits until {program} exits"),
            (None, Some(d)) => format!("recording VM exits for {:.1} s", d.as_secs_f64()),
            (None, None) => "recording VM exits; press Ctrl-C to stop".to_owned(),
        });
        eprintln_status(source);
        let ending = wait_for_end(&mut signals, child.as_mut(), args.duration);
        tokio::pin!(ending);
        let mut drain = tokio::time::interval(CPUID_DRAIN);
        let mut learn = tokio::time::interval(LEARN_DRAIN);
        loop {
            tokio::select! {
                end = &mut ending => break end,
                _ = drain.tick() => {
                    probe.drain_cpuid(&mut cpuid_reads);
                    probe.tick()?;
                    phases.look(probe)?;
                }
                _ = learn.tick(), if regs.learning() => regs.learn(probe)?,
            }
        }
    })?;
    Ok(Waited {
        end,
        comms,
        filter_pids,
        cpuid_reads,
    })
}

/// Where the vCPU registers are (`--snapshots`): from the kvm module's BTF before
/// attach, or learned from the first exits while the record runs.
struct Registers {
    /// Whether snapshots are taken at all.
    on: bool,
    layout: Option<kvmtrace_model::regs_layout::Layout>,
    learner: vcpu_regs::Learner,
    error: Option<String>,
}

impl Registers {
    fn new(on: bool) -> Self {
        let mut regs = Self {
            on,
            layout: None,
            learner: vcpu_regs::Learner::default(),
            error: None,
        };
        if on {
            match vcpu_regs::from_btf(Path::new(BTF_DIR)) {
                Ok(found) => regs.layout = found,
                Err(e) => log::info!("{e}: the vCPU registers will be learned from exits"),
            }
        }
        regs
    }

    fn learning(&self) -> bool {
        self.on && self.layout.is_none() && self.error.is_none()
    }

    /// Takes the samples sent so far; once they single out the layout, the programs
    /// start reading registers.
    fn learn(&mut self, probe: &mut Probe) -> anyhow::Result<()> {
        probe.drain_regs_samples(&mut self.learner);
        match self.learner.state() {
            Ok(vcpu_regs::Learning::Found(layout)) => {
                probe.set_regs_layout(&layout)?;
                eprintln_status(&format!(
                    "vCPU registers found at offset {} of struct kvm_vcpu (learned from {} exits)",
                    layout.regs_offset,
                    match &layout.method {
                        kvmtrace_model::regs_layout::Method::Learned { samples, .. } => *samples,
                        kvmtrace_model::regs_layout::Method::Btf { .. } => 0,
                    }
                ));
                self.layout = Some(layout);
            }
            Ok(vcpu_regs::Learning::NeedMore) => {}
            Err(e) => {
                eprintln_status(&format!("cannot read guest counter reads: {e}"));
                self.error = Some(e.to_string());
            }
        }
        Ok(())
    }

    fn info(self, probe: &mut Probe) -> anyhow::Result<Option<RegistersInfo>> {
        if !self.on {
            return Ok(None);
        }
        // Neither a layout nor an error: no exit of a traced VM was seen to learn from.
        Ok(Some(RegistersInfo {
            layout: self.layout,
            error: self.error,
            cpuid_exits_before_layout: probe.cpuid_exits_before_layout()?,
        }))
    }
}

/// The phases seen so far, each with the paging mode its module load had.
struct Phases {
    seen: BTreeMap<u32, PhaseInfo>,
}

impl Phases {
    fn new(
        probe: &Probe,
        paging: Option<kvmtrace_model::paging::Paging>,
        since: chrono::DateTime<Utc>,
    ) -> anyhow::Result<Self> {
        let mut seen = BTreeMap::new();
        seen.insert(probe.phase()?, PhaseInfo { paging, since });
        Ok(Self { seen })
    }

    /// Notes a new phase. Called every 100 ms: a module reloaded twice within that
    /// leaves the phase in between without a known paging mode.
    fn look(&mut self, probe: &Probe) -> anyhow::Result<()> {
        let phase = probe.phase()?;
        if let Entry::Vacant(e) = self.seen.entry(phase) {
            let paging = host::paging();
            eprintln_status(&format!(
                "kvm module reloaded ({}): phase {phase} begins",
                paging.as_ref().map_or_else(
                    || "now unloaded".to_owned(),
                    |p| format!("{} {}", p.module, p.label())
                )
            ));
            e.insert(PhaseInfo {
                paging,
                since: Utc::now(),
            });
        }
        Ok(())
    }
}

fn eprintln_status(msg: &str) {
    let _ = writeln!(std::io::stderr(), "kvmtrace: {msg}");
}

async fn sleep_or_forever(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

async fn wait_child(child: Option<&mut Child>) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(c) => c.wait().await,
        None => std::future::pending().await,
    }
}

/// The handlers of SIGINT and SIGTERM. A signal that arrives once they are installed
/// ends the record, however soon after.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; must run inside the tokio runtime.
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }
}

/// Waits for Ctrl-C, SIGTERM, the duration, or the command's exit. On a signal the
/// command gets SIGTERM and a few seconds to end, so its VM's last exits are counted.
async fn wait_for_end(
    signals: &mut Signals,
    mut child: Option<&mut Child>,
    duration: Option<Duration>,
) -> anyhow::Result<End> {
    let end = tokio::select! {
        _ = signals.int.recv() => End::Signal("SIGINT"),
        _ = signals.term.recv() => End::Signal("SIGTERM"),
        () = sleep_or_forever(duration) => End::Duration,
        status = wait_child(child.as_deref_mut()) => {
            End::CommandExited(status.context("cannot wait for the command")?)
        }
    };
    if let (End::Signal(_) | End::Duration, Some(c)) = (&end, child) {
        if let Some(pid) = c.id().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if tokio::time::timeout(CHILD_GRACE, c.wait()).await.is_err() {
            let _ = c.kill().await;
        }
    }
    Ok(end)
}
