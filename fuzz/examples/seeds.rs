//! Writes the seed corpus of every fuzz target: `cargo run --example seeds -- CORPUS_DIR`
//! fills `CORPUS_DIR/<target>/seed-*` (`cargo xtask fuzz` runs it before fuzzing).
//!
//! The seeds are real inputs: records and guest readouts made by the library itself and
//! rendered as `record --format json` and `guest --format json` write them, the
//! tracepoint `format` files of this host's tracefs (a stored 6.1 `kvm_exit` when
//! tracefs is not readable), and the reasons, presets and leaves users type.

use std::{
    fs,
    path::{Path, PathBuf},
};

use chrono::{TimeZone as _, Utc};
use kvmtrace_model::{
    exit_reasons::{self, Isa},
    guest::{self, GuestReadout},
    leaves::{self, Cpuid, Regs},
    paging::Paging,
    render::{self, Format, Options},
    report::{CpuidRead, Filter, LeafKind, ReadSource, Report, RunInfo},
    snapshot::Snapshot,
    tracefs_format::{DEBUGFS_TRACING, TRACEFS},
};
use tracer_common::{ExitKey, ExitStats, VcpuKey};

/// `kvm:kvm_exit` of Linux 6.1, for a host whose tracefs cannot be read.
const KVM_EXIT_6_1: &str = "name: kvm_exit
ID: 1234
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned int exit_reason;\toffset:8;\tsize:4;\tsigned:0;
\tfield:unsigned long guest_rip;\toffset:16;\tsize:8;\tsigned:0;
\tfield:u32 isa;\toffset:24;\tsize:4;\tsigned:0;
\tfield:u64 info1;\toffset:32;\tsize:8;\tsigned:0;
\tfield:u64 info2;\toffset:40;\tsize:8;\tsigned:0;
\tfield:u32 intr_info;\toffset:48;\tsize:4;\tsigned:0;
\tfield:u32 error_code;\toffset:52;\tsize:4;\tsigned:0;
\tfield:unsigned int vcpu_id;\toffset:56;\tsize:4;\tsigned:0;

print fmt: \"vcpu %u reason %s%s%s rip 0x%lx info1 0x%016llx info2 0x%016llx intr_info 0x%08x error_code 0x%08x\", REC->vcpu_id, __print_symbolic(REC->exit_reason, { 0, \"EXCEPTION_NMI\" }), REC->guest_rip, REC->info1, REC->info2, REC->intr_info, REC->error_code
";

/// The tracepoints whose `format` files kvmtrace reads.
const TRACEPOINTS: [&str; 5] = [
    "kvm/kvm_exit",
    "kvm/kvm_entry",
    "kvm/kvm_cpuid",
    "task/task_newtask",
    "sched/sched_process_exit",
];

fn stats(count: u64, time_ns: u64) -> ExitStats {
    ExitStats {
        count,
        timed: count.saturating_sub(1),
        time_ns,
        max_ns: time_ns,
    }
}

fn leaves() -> leaves::Leaves {
    leaves::preset("kvmtrace").expect("the kvmtrace preset exists")
}

/// A record of `isa` with two vCPUs, a failed entry, an unknown reason, histograms,
/// two phases, and (with `reads`) guest counter reads.
fn record(isa: Isa, reasons: &[(u32, u64)], reads: bool) -> Report {
    let raw_isa = isa.raw();
    let mut snap = Snapshot::default();
    for (i, &(raw, count)) in reasons.iter().enumerate() {
        let exit = ExitKey::from_raw(raw_isa, raw);
        let phase = u32::from(i % 3 == 2);
        snap.add_exits(phase, exit, stats(count, count * 1500))
            .expect("no overflow");
        snap.add_hist(exit, 10 + (i as u32 % 8), count)
            .expect("no overflow");
        for vcpu_id in 0..2 {
            snap.vcpus.insert(
                VcpuKey {
                    pid: 4242,
                    reuse: 0,
                    vcpu_id,
                    exit,
                },
                stats(count / 2 + u64::from(vcpu_id) * (count % 2), count * 750),
            );
        }
    }
    let (module, parameter) = match isa {
        Isa::Svm => ("kvm_amd", "npt"),
        _ => ("kvm_intel", "ept"),
    };
    let paging = Paging {
        module: module.to_owned(),
        parameter: parameter.to_owned(),
        nested: true,
    };
    let info = RunInfo {
        kernel_release: "6.1.0-27-amd64".to_owned(),
        paging: Some(paging),
        started_at: Utc
            .timestamp_opt(1_764_000_000, 0)
            .single()
            .unwrap_or_default(),
        ended_at: Utc
            .timestamp_opt(1_764_000_009, 500_000_000)
            .single()
            .unwrap_or_default(),
        filter: Filter {
            pids: vec![4242],
            vcpu: None,
        },
        comms: [(4242, "qemu-system-x86".to_owned())].into(),
        leaves: reads.then(leaves),
        ..RunInfo::default()
    };
    let mut report = Report::build(&snap, info).expect("no overflow");
    if reads {
        let total = report.total.count;
        for (i, &(raw, count)) in reasons.iter().enumerate() {
            report.cpuid_reads.push(CpuidRead {
                ts_ns: 1_000_000 * i as u64,
                pid: 4242,
                tid: 4243,
                kind: Some(LeafKind::Count),
                leaf: 0x4fff_fffe,
                index: raw,
                eax: count as u32,
                ebx: (count >> 32) as u32,
                ecx: 0,
                edx: 0,
                isa,
                host_reason_count: count + u64::from(i == 0),
                host_total: total,
                host_all_vms: Some(total),
                host_reason_count_at_entry: None,
                host_total_at_entry: None,
                host_all_vms_at_entry: None,
                host_ended_vms: None,
                host_synthetic: None,
                seen_by: vec![ReadSource::Registers, ReadSource::KvmCpuid],
                kvm_cpuid_differs: None,
            });
        }
    }
    report
}

/// A KVM as the guest sees it through CPUID: patched (count per reason = reason + 1)
/// or not, on Intel or AMD.
struct FakeKvm {
    patched: bool,
    vendor: [u8; 12],
}

impl Cpuid for FakeKvm {
    fn cpuid(&mut self, leaf: u32, sub: u32) -> Regs {
        let word = |i: usize| {
            u32::from_le_bytes([
                self.vendor[i],
                self.vendor[i + 1],
                self.vendor[i + 2],
                self.vendor[i + 3],
            ])
        };
        match (leaf, self.patched) {
            (0, _) => Regs {
                eax: 0xd,
                ebx: word(0),
                edx: word(4),
                ecx: word(8),
            },
            (0x4fff_ffff, true) => Regs {
                eax: 12_345,
                ebx: 1,
                ecx: 2,
                edx: 0,
            },
            (0x4fff_fffe, true) => Regs {
                eax: sub.wrapping_add(1),
                ..Regs::default()
            },
            (0x4fff_fffd, true) => Regs {
                ecx: sub.wrapping_mul(1000),
                ..Regs::default()
            },
            _ => Regs::default(),
        }
    }
}

fn readout(patched: bool, vendor: &[u8; 12]) -> GuestReadout {
    let mut kvm = FakeKvm {
        patched,
        vendor: *vendor,
    };
    guest::read(&mut kvm, leaves(), None).expect("a known vendor")
}

/// The `format` files of this host's tracepoints, where tracefs can be read.
fn host_formats() -> Vec<(String, String)> {
    [TRACEFS, DEBUGFS_TRACING]
        .iter()
        .flat_map(|root| {
            TRACEPOINTS.iter().filter_map(move |tp| {
                let path = Path::new(root).join("events").join(tp).join("format");
                let text = fs::read_to_string(path).ok()?;
                Some((tp.replace('/', "-"), text))
            })
        })
        .collect()
}

fn write(corpus: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = corpus.join(target);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let path = dir.join(format!("seed-{name}"));
    fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn main() {
    let corpus = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .expect("usage: seeds CORPUS_DIR");

    let vmx = [(30, 1387), (48, 426), (10, 737), (0x8000_0021, 1), (99, 3)];
    let svm = [
        (0x7b, 4854),
        (0x400, 1457),
        (0x72, 732),
        (0x403, 2),
        (0xffff_ffff, 1),
    ];
    let reports = [
        (
            "record-empty",
            Report::build(&Snapshot::default(), RunInfo::default()),
        ),
        ("record-vmx", Ok(record(Isa::Vmx, &vmx, false))),
        ("record-svm", Ok(record(Isa::Svm, &svm, false))),
        ("record-vmx-snapshots", Ok(record(Isa::Vmx, &vmx, true))),
    ];
    for (name, report) in reports {
        let report = report.expect("no overflow");
        let json = render::render(&report, Format::Json, Options::default())
            .expect("a record renders as JSON");
        write(&corpus, "report_json", name, &json);
    }

    for (name, patched, vendor) in [
        ("guest-intel", true, b"GenuineIntel"),
        ("guest-amd", true, b"AuthenticAMD"),
        ("guest-intel-stock", false, b"GenuineIntel"),
    ] {
        let json =
            serde_json::to_vec_pretty(&readout(patched, vendor)).expect("a readout serializes");
        write(&corpus, "guest_json", name, &json);
    }

    for isa in [Isa::Vmx, Isa::Svm] {
        for (n, name) in exit_reasons::all(isa).into_iter().step_by(7) {
            write(
                &corpus,
                "reason",
                &format!("{isa}-{n}"),
                n.to_string().as_bytes(),
            );
            write(
                &corpus,
                "reason",
                &format!("{isa}-{n}-hex"),
                format!("{n:#x}").as_bytes(),
            );
            write(
                &corpus,
                "reason",
                &format!("{isa}-{n}-name"),
                name.as_bytes(),
            );
        }
    }
    write(&corpus, "reason", "intel", b"intel");

    for (name, _) in leaves::PRESETS {
        write(&corpus, "leaves", name, name.as_bytes());
    }
    for leaf in ["0x4FFFFFFE", "0x4fffffff", "1342177277", "0xd"] {
        write(&corpus, "leaves", leaf, leaf.as_bytes());
    }

    let host = host_formats();
    let from_host = host.len();
    for (name, text) in host {
        write(&corpus, "tracefs_format", &name, text.as_bytes());
    }
    write(
        &corpus,
        "tracefs_format",
        "kvm_exit-6.1",
        KVM_EXIT_6_1.as_bytes(),
    );
    write(
        &corpus,
        "tracefs_format",
        "tracepoint-name",
        b"kvm:kvm_exit",
    );

    println!(
        "seeds: written to {} ({from_host} format files from this host's tracefs)",
        corpus.display()
    );
}
