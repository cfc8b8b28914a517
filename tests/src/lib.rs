//! Helpers for the lab end-to-end tests: run `cargo xtask lab` once per scenario, then
//! read what it brought back: kvmtrace's JSON record and the kernel's own hist trigger
//! output for each paging mode.
//!
//! Labs of different scenarios may run at once: an Intel (Bochs) and an AMD (QEMU) lab
//! side by side, the labs that need two CPUs by themselves after them (see [`lab`] and
//! [`streams`]). `cargo xtask test` runs the lab tests that way.
//!
//! Tests panic with context instead of returning errors, so a failure shows where.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError},
    time::Instant,
};

use kvmtrace_model::{
    exit_reasons::Isa,
    kernel_hist::KernelHist,
    report::{ReasonRow, Report},
};
use tracer_common::ExitKey;

/// One lab scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scenario {
    /// `intel` or `amd`.
    pub isa: &'static str,
    /// `boot` or `micro`.
    pub workload: &'static str,
    pub smp: u8,
    /// The modules: `stock`, `patched`, or a test-only variant.
    pub modules: &'static str,
    /// VMs run one after the other in each mode.
    pub vms: u16,
    /// More `cargo xtask lab` arguments (scenario, counts, record arguments).
    pub extra: &'static [&'static str],
    /// Names the scenario's results directory when `extra` is not empty.
    pub tag: &'static str,
    /// L1's kernel line (`--kernel`): `5.10`, `6.1` or `6.12`.
    pub kernel: &'static str,
}

impl Scenario {
    /// The patched 6.1 L1 booting the Linux L2 once per mode, with `isa`.
    pub const fn boot(isa: &'static str) -> Self {
        Self {
            isa,
            workload: "boot",
            smp: 1,
            modules: "patched",
            vms: 1,
            extra: &[],
            tag: "",
            kernel: "6.1",
        }
    }

    pub fn name(&self) -> String {
        let mut name = format!(
            "{}-{}-smp{}-vms{}-{}",
            self.isa, self.workload, self.smp, self.vms, self.modules
        );
        if self.kernel != "6.1" {
            name = format!("{name}-linux{}", self.kernel);
        }
        if self.tag.is_empty() {
            name
        } else {
            format!("{name}-{}", self.tag)
        }
    }

    pub fn paging(&self) -> &'static str {
        if self.isa == "intel" { "ept" } else { "npt" }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| panic!("no workspace above {}", env!("CARGO_MANIFEST_DIR")))
}

/// How many labs may run at once: 2 (the default) runs an Intel (Bochs) and an AMD
/// (QEMU TCG) lab side by side, each an emulator in one thread, so each has a core of
/// the two; 1 runs one lab at a time. From `KVMTRACE_LAB_STREAMS`.
///
/// The test threads decide how many tests wait at once: `cargo xtask test` gives
/// libtest a thread per test (`--test-threads`), so every test asks for its scenario at
/// the start and the streams never starve; with `--test-threads=1` labs run one by one
/// whatever this says.
pub fn streams() -> u8 {
    match std::env::var("KVMTRACE_LAB_STREAMS").as_deref() {
        Ok("1") => 1,
        Ok("2") | Err(_) => 2,
        Ok(other) => panic!("KVMTRACE_LAB_STREAMS={other}: 1 or 2"),
    }
}

/// Which labs a scenario may run beside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stream {
    /// One Bochs lab (Intel) or one QEMU lab (AMD) at a time, beside one of the other.
    Intel,
    Amd,
    /// Alone: L1 or L2 with more than one CPU (`--l1-cpus 2` makes QEMU two threads,
    /// and a race needs the CPUs to run truly at once). These run after the streams.
    /// A crowd's two L1 CPUs take turns in one QEMU thread: it runs in the AMD stream.
    Alone,
}

impl Scenario {
    fn stream(&self) -> Stream {
        let l1_cpus = self
            .extra
            .windows(2)
            .find(|w| w[0] == "--l1-cpus")
            .map_or(1, |w| w[1].parse::<u8>().unwrap_or(u8::MAX));
        match self.isa {
            "amd" if self.workload == "crowd" && self.smp == 1 => Stream::Amd,
            _ if l1_cpus > 1 || self.smp > 1 => Stream::Alone,
            "intel" => Stream::Intel,
            _ => Stream::Amd,
        }
    }
}

/// The labs running now and the tests waiting for a stream (see [`Slots::take`]).
#[derive(Default)]
struct Running {
    intel: bool,
    amd: bool,
    alone: bool,
    /// Tests waiting for the Intel or AMD stream: the labs that run alone wait until
    /// none is left, so they run as a phase after the two streams.
    waiting: usize,
}

impl Running {
    /// Whether a lab of `stream` may start now (see [`Slots::take`]).
    fn allows(&self, stream: Stream, streams: u8) -> bool {
        let any = self.intel || self.amd || self.alone;
        match stream {
            _ if streams < 2 => !any,
            Stream::Intel => !self.intel && !self.alone,
            Stream::Amd => !self.amd && !self.alone,
            Stream::Alone => !any && self.waiting == 0,
        }
    }
}

struct Slots {
    running: Mutex<Running>,
    changed: Condvar,
}

/// A stream held while its lab runs; dropping it (also on a panic) frees the stream.
struct Slot<'a> {
    slots: &'a Slots,
    stream: Stream,
}

impl Slots {
    fn get() -> &'static Self {
        static SLOTS: OnceLock<Slots> = OnceLock::new();
        SLOTS.get_or_init(Slots::new)
    }

    fn new() -> Self {
        Slots {
            running: Mutex::new(Running::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `stream` may start a lab: its own stream idle and nothing running
    /// alone (with one stream: nothing running at all); for [`Stream::Alone`], nothing
    /// running and no test waiting for a stream.
    fn take(&self, stream: Stream, streams: u8) -> Slot<'_> {
        let mut r = self.lock();
        let waits = stream != Stream::Alone;
        if waits {
            r.waiting += 1;
        }
        while !r.allows(stream, streams) {
            r = self.changed.wait(r).unwrap_or_else(PoisonError::into_inner);
        }
        if waits {
            r.waiting -= 1;
        }
        *Self::flag(&mut r, stream) = true;
        Slot {
            slots: self,
            stream,
        }
    }

    fn flag(r: &mut Running, stream: Stream) -> &mut bool {
        match stream {
            Stream::Intel => &mut r.intel,
            Stream::Amd => &mut r.amd,
            Stream::Alone => &mut r.alone,
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *Slots::flag(&mut self.slots.lock(), self.stream) = false;
        self.slots.changed.notify_all();
    }
}

/// Said on the test process's stderr at once (libtest captures only `eprintln!`), so
/// that a log shows the streams' labs as they start and end.
fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// What [`lab`] keeps per scenario: its results directory, or why its lab failed (the
/// other tests of a failed scenario fail at once, without booting it again).
type Outcome = Arc<Mutex<Option<Result<PathBuf, String>>>>;

/// The results of a scenario, running the lab the first time it is asked for. Labs of
/// other scenarios may run at the same time (see [`streams`]); each scenario has a
/// results directory of its own, `target/lab-tests/<name>`.
pub fn lab(s: Scenario) -> PathBuf {
    static DONE: OnceLock<Mutex<BTreeMap<Scenario, Outcome>>> = OnceLock::new();
    static NAMES: OnceLock<Mutex<BTreeMap<String, Scenario>>> = OnceLock::new();
    let name = s.name();
    {
        // Two scenarios with one name would write into one directory.
        let mut names = NAMES
            .get_or_init(|| Mutex::new(BTreeMap::new()))
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let first = names.entry(name.clone()).or_insert(s);
        assert_eq!(
            *first, s,
            "two scenarios share the results directory {name}: give one a tag"
        );
    }
    let outcome: Outcome = DONE
        .get_or_init(|| Mutex::new(BTreeMap::new()))
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(s)
        .or_default()
        .clone();
    // Held while the lab runs: another test of the same scenario waits for its result.
    let mut outcome = outcome.lock().unwrap_or_else(PoisonError::into_inner);
    let earlier = outcome.is_some();
    let result = outcome.get_or_insert_with(|| {
        let streams = streams();
        let stream = s.stream();
        let _slot = Slots::get().take(stream, streams);
        run_lab(s, stream, streams)
    });
    match result {
        Ok(dir) => dir.clone(),
        Err(why) if earlier => panic!("(this scenario's lab failed for an earlier test) {why}"),
        Err(why) => panic!("{why}"),
    }
}

/// `cargo xtask lab` for `s` in its results directory; the directory, or why it failed.
fn run_lab(s: Scenario, stream: Stream, streams: u8) -> Result<PathBuf, String> {
    let root = workspace();
    let name = s.name();
    let out = root.join("target/lab-tests").join(&name);
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root)
        .args(["xtask", "lab", "--isa", s.isa, "--workload", s.workload])
        .args(["--smp", &s.smp.to_string(), "--modules", s.modules])
        .args(["--vms", &s.vms.to_string(), "--kernel", s.kernel])
        .args(s.extra)
        .args(["--kvmtrace", "required", "--out"])
        .arg(&out);
    // Two labs share the CPUs with each other's set-up and builds: double every wall
    // time limit (the L1 init's step budgets and L2's run timeout) unless told.
    if !s.extra.contains(&"--timeout-scale") {
        let scale = std::env::var("KVMTRACE_LAB_TIMEOUT_SCALE")
            .unwrap_or_else(|_| if streams > 1 { "2" } else { "1" }.to_owned());
        cmd.args(["--timeout-scale", &scale]);
    }
    let started = Instant::now();
    say(&format!("lab [{stream:?}] {name}: started"));
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Kept beside the results: the lab's steps, each with its time.
    let _ = std::fs::write(out.join("lab.stderr"), stderr.as_bytes());
    let took = started.elapsed().as_secs();
    say(&format!(
        "lab [{stream:?}] {name}: {} in {took} s",
        if output.status.success() {
            "passed"
        } else {
            "FAILED"
        }
    ));
    if output.status.success() {
        return Ok(out);
    }
    let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(format!(
        "{name} failed ({}):\n{}",
        output.status,
        tail.join("\n")
    ))
}

/// The mode directory (`ept1`, `npt0`, ...) of a scenario's results.
pub fn mode_dir(s: Scenario, nested: bool) -> PathBuf {
    lab(s).join(format!("{}{}", s.paging(), u8::from(nested)))
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// kvmtrace's record of a mode.
pub fn record(dir: &Path) -> Report {
    let path = dir.join("record.json");
    Report::from_json(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// kvmtrace's record of the whole run (`--scenario reload`).
pub fn whole_record(s: Scenario) -> Report {
    record(&lab(s))
}

/// Whether L2 printed its end marker in this mode.
pub fn l2_ended(dir: &Path) -> bool {
    read(&dir.join("serial.log")).contains("KVMLAB-L2 end")
}

/// The kernel's `hist:keys=isa,exit_reason` output, split like kvmtrace splits reasons
/// (VMX: basic reason and failed-entry bit).
/// Where the kernel has no hist triggers (5.10), the trace buffer's counts instead
/// (`trace-counts.txt`, mapped through `kvm_exit-format.txt`).
pub fn hist(dir: &Path) -> BTreeMap<ExitKey, u64> {
    let path = dir.join("hist.txt");
    let hist = if path.is_file() {
        KernelHist::parse(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    } else {
        let counts = dir.join("trace-counts.txt");
        // Mode directories are named for the paging: ept (VMX) or npt (SVM).
        let vmx = dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("ept"));
        let exit_isa = if vmx {
            tracer_common::isa::VMX
        } else {
            tracer_common::isa::SVM
        };
        kvmtrace_model::kernel_trace::parse(
            &read(&dir.join("kvm_exit-format.txt")),
            &read(&counts),
            exit_isa,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", counts.display()))
    };
    assert!(
        !hist.by_reason.is_empty(),
        "{} has no hist lines",
        path.display()
    );
    hist.by_reason
}

/// kvmtrace's per-reason counts, keyed like [`hist`].
pub fn counts(report: &Report) -> BTreeMap<ExitKey, u64> {
    reason_counts(&report.reasons)
}

/// The counts of some reason rows (a report's, or one phase's), keyed like [`hist`].
pub fn reason_counts(rows: &[ReasonRow]) -> BTreeMap<ExitKey, u64> {
    rows.iter()
        .map(|r| {
            let key = ExitKey {
                isa: r.isa.raw(),
                reason: r.reason,
                failed_entry: u32::from(r.failed_entry),
            };
            (key, r.totals.count)
        })
        .collect()
}

/// The count of a reason by name in a record (0 when absent).
pub fn count_of(report: &Report, name: &str) -> u64 {
    report
        .reasons
        .iter()
        .filter(|r| r.name == name)
        .map(|r| r.totals.count)
        .sum()
}

/// Every reason where kvmtrace and the hist differ, in both directions.
pub fn differences(
    kvmtrace: &BTreeMap<ExitKey, u64>,
    hist: &BTreeMap<ExitKey, u64>,
) -> Vec<String> {
    let keys: std::collections::BTreeSet<&ExitKey> = kvmtrace.keys().chain(hist.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (a, b) = (
                kvmtrace.get(k).copied().unwrap_or(0),
                hist.get(k).copied().unwrap_or(0),
            );
            (a != b).then(|| {
                let name = kvmtrace_model::exit_reasons::name(Isa::from_raw(k.isa), k.reason);
                format!("{name} ({}): kvmtrace {a}, hist {b}", k.reason)
            })
        })
        .collect()
}

/// Asserts that kvmtrace equals the hist exactly, reason by reason, and that nothing
/// was dropped.
pub fn assert_matches_hist(dir: &Path) {
    let rec = record(dir);
    let hist = hist(dir);
    let diffs = differences(&counts(&rec), &hist);
    assert!(
        diffs.is_empty(),
        "{}: kvmtrace != hist:\n{}",
        dir.display(),
        diffs.join("\n")
    );
    assert!(
        !rec.dropped.any(),
        "{}: dropped {:?}",
        dir.display(),
        rec.dropped
    );
    assert_eq!(rec.total.count, hist.values().sum::<u64>());
}

/// Asserts that L2 reached its end marker in this mode.
pub fn assert_l2_ended(dir: &Path) {
    assert!(
        l2_ended(dir),
        "{}: L2 did not reach its end marker",
        dir.display()
    );
}

/// Asserts that the per-vCPU rows are non-empty for every vCPU and sum exactly to the
/// per-reason totals.
pub fn assert_vcpus_sum(dir: &Path, vcpus: u32) {
    let rec = record(dir);
    let mut sums: BTreeMap<(Isa, u32, bool), u64> = BTreeMap::new();
    let mut per_vcpu: BTreeMap<u32, u64> = BTreeMap::new();
    for v in &rec.vcpus {
        *sums.entry((v.isa, v.reason, v.failed_entry)).or_default() += v.totals.count;
        *per_vcpu.entry(v.vcpu_id).or_default() += v.totals.count;
    }
    for r in &rec.reasons {
        assert_eq!(
            sums.get(&(r.isa, r.reason, r.failed_entry))
                .copied()
                .unwrap_or(0),
            r.totals.count,
            "{}: vCPU rows of {} do not sum to its total",
            dir.display(),
            r.name
        );
    }
    assert_eq!(sums.values().sum::<u64>(), rec.total.count);
    for id in 0..vcpus {
        assert!(
            per_vcpu.get(&id).is_some_and(|&n| n > 0),
            "{}: vCPU {id} has no exits: {per_vcpu:?}",
            dir.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: Scenario = Scenario::boot("amd");

    #[test]
    fn labs_that_need_two_cpus_run_alone() {
        assert_eq!(BOOT.stream(), Stream::Amd);
        let intel = Scenario {
            isa: "intel",
            ..BOOT
        };
        assert_eq!(intel.stream(), Stream::Intel);
        let l1 = Scenario {
            extra: &["--micro-vcpus", "2", "--l1-cpus", "2"],
            ..BOOT
        };
        assert_eq!(l1.stream(), Stream::Alone);
        assert_eq!(Scenario { smp: 2, ..intel }.stream(), Stream::Alone);
        // One QEMU thread for both L1 CPUs.
        let crowd = Scenario {
            workload: "crowd",
            ..l1
        };
        assert_eq!(crowd.stream(), Stream::Amd);
        let one = Scenario {
            extra: &["--l1-cpus", "1"],
            ..BOOT
        };
        assert_eq!(one.stream(), Stream::Amd);
    }

    #[test]
    fn one_lab_per_stream_and_the_alone_ones_after_them() {
        let running = |intel, amd, alone, waiting| Running {
            intel,
            amd,
            alone,
            waiting,
        };
        let idle = running(false, false, false, 0);
        let intel = running(true, false, false, 0);
        for stream in [Stream::Intel, Stream::Amd, Stream::Alone] {
            assert!(idle.allows(stream, 2) && idle.allows(stream, 1));
        }
        assert!(intel.allows(Stream::Amd, 2), "AMD beside Intel");
        assert!(!intel.allows(Stream::Amd, 1), "one stream: one lab");
        assert!(!intel.allows(Stream::Intel, 2));
        assert!(!intel.allows(Stream::Alone, 2));
        assert!(!running(false, false, false, 1).allows(Stream::Alone, 2));
        let alone = running(false, false, true, 0);
        assert!(!alone.allows(Stream::Intel, 2) && !alone.allows(Stream::Amd, 2));
    }

    #[test]
    fn a_waiting_lab_starts_when_its_stream_frees() {
        let slots = Slots::new();
        let first = slots.take(Stream::Intel, 2);
        let _amd = slots.take(Stream::Amd, 2);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _second = slots.take(Stream::Intel, 2);
                let _ = tx.send(());
            });
            let wait = std::time::Duration::from_millis(200);
            assert!(rx.recv_timeout(wait).is_err(), "two Intel labs at once");
            drop(first);
            assert!(
                rx.recv_timeout(wait * 50).is_ok(),
                "the second never started"
            );
        });
    }

    #[test]
    fn differences_go_both_ways() {
        let k = |r| ExitKey::from_raw(1, r);
        let a = BTreeMap::from([(k(10), 5), (k(30), 2)]);
        let b = BTreeMap::from([(k(10), 5), (k(48), 1)]);
        let d = differences(&a, &b);
        assert_eq!(
            d,
            [
                "IO_INSTRUCTION (30): kvmtrace 2, hist 0",
                "EPT_VIOLATION (48): kvmtrace 0, hist 1"
            ]
        );
    }
}
