//! The fixtures the model's tests share, and the check of the schema doc.

use chrono::{TimeZone, Utc};
use tracer_common::{ExitKey, ExitStats, VcpuKey};

use super::{Dropped, Filter, Report, RunInfo};
use crate::{paging::Paging, snapshot::Snapshot};

pub(crate) fn stats(count: u64, timed: u64, time_ns: u64) -> ExitStats {
    ExitStats {
        count,
        timed,
        time_ns,
        max_ns: 0,
    }
}

/// A two-vCPU VMX run with an unknown reason and a failed entry.
pub(crate) fn sample_report() -> Report {
    let mut snap = Snapshot::default();
    let io = ExitKey::from_raw(1, 30);
    let ept = ExitKey::from_raw(1, 48);
    let odd = ExitKey::from_raw(1, 0x8000_0021);
    let unknown = ExitKey::from_raw(1, 99);
    for (key, s) in [
        (io, stats(3, 3, 3000)),
        (ept, stats(6, 5, 1000)),
        (odd, stats(1, 0, 0)),
        (unknown, stats(1, 1, 7)),
    ] {
        snap.exits.insert(key, s);
    }
    for (vcpu_id, key, s) in [
        (0, io, stats(2, 2, 2000)),
        (1, io, stats(1, 1, 1000)),
        (0, ept, stats(6, 5, 1000)),
        (1, odd, stats(1, 0, 0)),
        (1, unknown, stats(1, 1, 7)),
    ] {
        snap.vcpus.insert(
            VcpuKey {
                pid: 42,
                reuse: 0,
                vcpu_id,
                exit: key,
            },
            s,
        );
    }
    snap.add_hist(io, 9, 3).ok();
    snap.add_hist(ept, 7, 5).ok();
    let t0 = Utc
        .with_ymd_and_hms(2026, 11, 24, 12, 0, 0)
        .single()
        .unwrap_or_default();
    let info = RunInfo {
        kernel_release: "6.1.0-test".into(),
        paging: Some(Paging {
            module: "kvm_intel".into(),
            parameter: "ept".into(),
            nested: true,
        }),
        started_at: t0,
        ended_at: t0 + chrono::Duration::milliseconds(1500),
        filter: Filter::default(),
        comms: [(42, "qemu".to_owned())].into(),
        ..RunInfo::default()
    };
    Report::build(&snap, info).unwrap_or_else(|e| panic!("build: {e}"))
}

/// `sample_report` recorded with `--detail --rip 1`: IO by port, EPT by region.
pub(crate) fn detail_report() -> Report {
    let base = sample_report();
    let mut snap = Snapshot::default();
    let io = ExitKey::from_raw(1, 30);
    let ept = ExitKey::from_raw(1, 48);
    let io_stats = ExitStats {
        max_ns: 1500,
        ..stats(3, 3, 3000)
    };
    snap.add_exits(0, io, io_stats).ok();
    snap.add_exits(0, ept, stats(6, 5, 1000)).ok();
    snap.add_hist(io, 9, 3).ok();
    let row = |exit: ExitKey| {
        tracer_common::PhaseVcpuKey::new(
            0,
            &VcpuKey {
                pid: 42,
                reuse: 0,
                vcpu_id: 0,
                exit,
            },
        )
    };
    let detail = |exit, kind, sub| tracer_common::DetailKey::new(&row(exit), kind, sub);
    snap.detail.insert(
        detail(io, tracer_common::detail_kind::PORT, 0x03f8_0000),
        ExitStats {
            max_ns: 1500,
            ..stats(2, 2, 2000)
        },
    );
    snap.detail.insert(
        detail(ept, tracer_common::detail_kind::GPA, 0xfee),
        stats(4, 4, 400),
    );
    let rip = |exit, rip| tracer_common::RipKey {
        pid: 42,
        reason: row(exit).reason,
        meta: row(exit).meta,
        _pad: 0,
        rip,
    };
    snap.rips.insert(rip(io, 0xffff_ffff_8107_1b2f), 2);
    snap.rips.insert(rip(io, 0x7f00_0000_1000), 1);
    let info = RunInfo {
        kernel_release: base.kernel_release.clone(),
        paging: base.paging.clone(),
        started_at: base.started_at,
        ended_at: base.ended_at,
        comms: [(42, "qemu".to_owned())].into(),
        detail: true,
        rip_top: Some(1),
        ..RunInfo::default()
    };
    Report::build(&snap, info).unwrap_or_else(|e| panic!("build: {e}"))
}

#[test]
fn the_schema_doc_names_every_dropped_field() {
    let doc: String = include_str!("mod.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    for (field, _) in Dropped::default().by_kind() {
        assert!(doc.contains(&format!("`{field}`")), "{field} has no bullet");
        assert!(
            doc.contains(&format!("\"{field}\": 0")),
            "{field} is not in the example"
        );
    }
}
