//! What L1 runs, from the options: the L2 workload (a booted Linux or micro VMs), its
//! time limit, and how kvmtrace records it.

use std::path::{Path, PathBuf};

use super::{
    assets,
    image::{self, L1, Workload as L2Workload},
    inputs::{Inputs, build_micro},
    options::{Options, Scenario, Workload},
};

const L2_MEMORY_MB: u32 = 128;

/// Everything the L1 initrd holds for `opts`; builds the L2 initrd or the micro VMM
/// into `build` on the way.
pub fn l1(
    opts: &Options,
    root: &Path,
    build: &Path,
    inputs: &Inputs,
    kvmtrace: Option<(PathBuf, Vec<PathBuf>)>,
) -> anyhow::Result<L1> {
    let workload = l2_workload(opts, root, build, inputs, kvmtrace.as_ref())?;
    Ok(L1 {
        busybox: inputs.busybox.clone(),
        init: root.join("lab/l1-init.sh"),
        modules: inputs.modules.clone(),
        paging: opts.isa.paging(),
        modes: opts.modes.clone(),
        workload,
        kvmtrace,
        perf: None,
        system_map: l2_system_map(opts, root, inputs)?,
        record_args: opts.l1_record_args(),
        run_timeout: (run_timeout(opts) as f64 * opts.timeout_scale * f64::from(in_turn(opts)))
            as u64,
        vms: in_turn(opts),
        scenario: opts.scenario.name(),
        net_modules: if opts.scenario == Scenario::Export {
            assets::plain_modules(
                &inputs.module_dir,
                opts.isa.net_modules(),
                &inputs.plain_modules,
            )?
        } else {
            Vec::new()
        },
        files: Vec::new(),
        tools: Vec::new(),
        unit_caps: None,
        signals: opts.signals.join(" "),
        signal_after: opts.signal_after,
    })
}

/// The real System.map of the kernel L2 boots (with `nokaslr`), to name `--rip` rows:
/// Debian's linux-image ships a stub, the real one is in its -dbg package (283 MB for
/// 6.1 cloud, of which only System.map is unpacked). Fetched only for a booted L2
/// recorded with `--rip`.
fn l2_system_map(opts: &Options, root: &Path, inputs: &Inputs) -> anyhow::Result<Option<PathBuf>> {
    let rips = opts
        .record_args()
        .split_whitespace()
        .any(|a| a == "--rip" || a.starts_with("--rip="));
    if !rips || !matches!(opts.workload, Workload::Boot) {
        return Ok(None);
    }
    let cache = inputs.cache.clone();
    let deb = crate::apt::download(
        root,
        &cache.join("debs"),
        &format!("linux-image-{}-dbg", inputs.l2_abi),
    )?;
    let member = format!("./usr/lib/debug/boot/System.map-{}", inputs.l2_abi);
    let map = crate::apt::unpack_member(
        &deb,
        &member,
        &cache
            .join("roots")
            .join(format!("linux-image-{}-dbg", inputs.l2_abi)),
    )?;
    Ok(Some(map))
}

/// What runs as L2: QEMU microvm booting Linux (with the L2 initrd built into
/// `build`), or the micro VMM (built into `build`) and its VMs.
fn l2_workload(
    opts: &Options,
    root: &Path,
    build: &Path,
    inputs: &Inputs,
    kvmtrace: Option<&(PathBuf, Vec<PathBuf>)>,
) -> anyhow::Result<L2Workload> {
    Ok(match opts.workload {
        Workload::Boot | Workload::Sweep => {
            let l2 = build.join("l2-initrd.cpio");
            let guest_tool = kvmtrace.map(|(bin, _)| bin.as_path());
            image::l2_initrd(
                &inputs.busybox,
                &root.join("lab/l2-init.sh"),
                guest_tool,
                &opts.guest_args,
                &l2,
            )?;
            let qemu = inputs.qemu_root.join("usr/bin/qemu-system-x86_64-microvm");
            L2Workload::Boot {
                qemu_libs: assets::shared_libraries(&qemu)?,
                qemu,
                firmware: inputs.firmware.clone(),
                kernel: inputs.l2_kernel.clone(),
                l2_initrd: l2,
                memory_mb: L2_MEMORY_MB,
                smp: opts.smp,
                sweep: opts.workload == Workload::Sweep,
            }
        }
        Workload::Micro | Workload::Churn | Workload::Crowd => L2Workload::Micro {
            binary: build_micro(root, build)?,
            vms: match opts.workload {
                Workload::Churn => churn_vms(opts),
                Workload::Crowd => crowd_vms(opts),
                _ => vec![image::MicroVm {
                    cpuids: opts.micro_cpuids,
                    outs: opts.micro_outs,
                    vcpus: opts.micro_vcpus,
                    msrs: opts.micro_msrs,
                }],
            },
            launch: match opts.workload {
                Workload::Churn => image::Launch::Overlap,
                Workload::Crowd => image::Launch::Waves(crowd_wave(opts)),
                _ => image::Launch::InTurn,
            },
        },
    })
}

/// Seconds one run of the workload may take inside L1, before --timeout-scale and
/// --vms.
fn run_timeout(opts: &Options) -> u64 {
    match opts.workload {
        Workload::Boot | Workload::Sweep => 300 * u64::from(opts.smp),
        // Under emulation and tracing a CPUID exit takes ~0.1 ms of host time: give a
        // long micro run (--micro-cpuids 1000000) time in proportion, for every vCPU
        // (they share L1's CPUs, and the host's).
        Workload::Micro | Workload::Churn => {
            120 + u64::from(opts.micro_cpuids) * u64::from(opts.micro_vcpus) / 5_000
        }
        // Each VM's set-up (KVM_CREATE_VM, its memory, its vCPU threads) is most of it.
        Workload::Crowd => 120 + u64::from(opts.vms) * u64::from(opts.micro_vcpus) / 2,
    }
}

/// How many times the workload runs one after the other in each mode: `--vms`, but
/// once for the crowd, whose `--vms` run at once.
fn in_turn(opts: &Options) -> u16 {
    if opts.workload == Workload::Crowd {
        1
    } else {
        opts.vms
    }
}

/// The crowd's VMs at once: --at-once, else all --vms.
fn crowd_wave(opts: &Options) -> u16 {
    opts.at_once.unwrap_or(opts.vms)
}

/// The VMs of the crowd workload: `--vms` of them, with --micro-vcpus vCPUs, in waves
/// of K (--at-once, default all): VM i of the crowd runs 100 + (i mod K) CPUIDs and
/// 1 + (i div K) port writes, so that (CPUIDs, port writes) names each VM, and all
/// VMs at once (one wave) run 100 + i CPUIDs and 1 port write.
fn crowd_vms(opts: &Options) -> Vec<image::MicroVm> {
    let wave = u32::from(crowd_wave(opts));
    (0..u32::from(opts.vms))
        .map(|i| image::MicroVm {
            cpuids: CROWD_CPUIDS + i % wave,
            outs: 1 + i / wave,
            vcpus: opts.micro_vcpus,
            msrs: 0,
        })
        .collect()
}

/// The crowd's first VM's CPUIDs.
pub const CROWD_CPUIDS: u32 = 100;

/// The VMs of the churn workload, from --micro-cpuids C and --micro-outs O: one with
/// 20·C CPUIDs in the background, then (C, O) and (2·C, 2·O) one after the other.
/// Each VM has --micro-vcpus vCPUs.
fn churn_vms(opts: &Options) -> Vec<image::MicroVm> {
    let (c, o) = (opts.micro_cpuids, opts.micro_outs);
    [(20 * c, 0), (c, o), (2 * c, 2 * o)]
        .into_iter()
        .map(|(cpuids, outs)| image::MicroVm {
            cpuids,
            outs,
            vcpus: opts.micro_vcpus,
            msrs: 0,
        })
        .collect()
}
