//! Helpers for the lab end-to-end tests: run `cargo xtask lab` once per scenario, then
//! read what it brought back: kvmtrace's JSON record and the kernel's own hist trigger
//! output for each paging mode.
//!
//! Tests panic with context instead of returning errors, so a failure shows where.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, OnceLock},
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
    pub vms: u8,
    /// More `cargo xtask lab` arguments (scenario, counts, record arguments).
    pub extra: &'static [&'static str],
    /// Names the scenario's results directory when `extra` is not empty.
    pub tag: &'static str,
    /// L1's kernel line (`--kernel`): `5.10`, `6.1` or `6.12`.
    pub kernel: &'static str,
}

impl Scenario {
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

/// The results of a scenario, running the lab the first time it is asked for.
pub fn lab(s: Scenario) -> PathBuf {
    static DONE: OnceLock<Mutex<BTreeMap<Scenario, PathBuf>>> = OnceLock::new();
    let done = DONE.get_or_init(|| Mutex::new(BTreeMap::new()));
    let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = done.get(&s) {
        return dir.clone();
    }
    let root = workspace();
    let out = root.join("target/lab-tests").join(s.name());
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root)
        .args(["xtask", "lab", "--isa", s.isa, "--workload", s.workload])
        .args(["--smp", &s.smp.to_string(), "--modules", s.modules])
        .args(["--vms", &s.vms.to_string(), "--kernel", s.kernel])
        .args(s.extra)
        .args(["--kvmtrace", "required", "--out"])
        .arg(&out);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Kept beside the results: the lab's steps, each with its time.
    let _ = std::fs::write(out.join("lab.stderr"), stderr.as_bytes());
    let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    assert!(
        output.status.success(),
        "{} failed ({}):\n{}",
        s.name(),
        output.status,
        tail.join("\n")
    );
    done.insert(s, out.clone());
    out
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
