//! What the emulated host boots: the L2 initrd, the L1 initrd (busybox, kvm modules,
//! the workload, kvmtrace) and, for Bochs, a FAT disk with syslinux.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::{console::END_MARKER, cpio::Archive};
use crate::{files::write, process::run_bounded};

/// The memory of the L1 host, in MiB (both emulators).
pub const L1_MEMORY_MB: u32 = 1024;

/// The kernel command line of the L1 host.
pub const L1_APPEND: &str =
    "console=ttyS0,115200 rdinit=/init mitigations=off nokaslr cryptomgr.notests quiet";
/// The kernel command line of the L2 test VM.
const L2_APPEND: &str =
    "console=ttyS0 quiet panic=-1 nokaslr mitigations=off cryptomgr.notests rdinit=/init";

/// Where the QEMU microvm binary and its firmware live inside L1.
const QEMU_IN_L1: &str = "/usr/bin/qemu-system-x86_64-microvm";
const QEMU_DATA_IN_L1: &str = "/usr/share/qemu";

/// What runs as L2 inside the emulated host.
pub enum Workload {
    /// QEMU microvm boots the L2 kernel with a busybox initrd that powers off at once.
    Boot {
        qemu: PathBuf,
        qemu_libs: Vec<PathBuf>,
        firmware: Vec<PathBuf>,
        kernel: PathBuf,
        l2_initrd: PathBuf,
        memory_mb: u32,
        smp: u8,
        /// L2 also sweeps ECX over the counter leaves (`kvmtrace guest --sweep`).
        sweep: bool,
    },
    /// The static `micro` VMM, once per VM: per vCPU `cpuids` CPUID exits, `outs` port
    /// writes, one HLT; `launch` says whether they run in turn, overlapping, or all at
    /// once.
    Micro {
        binary: PathBuf,
        vms: Vec<MicroVm>,
        launch: Launch,
    },
}

/// How the micro VMs of one mode are started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// One after the other.
    InTurn,
    /// The first in the background, the others one after the other meanwhile.
    Overlap,
    /// In waves of this many at once (the crowd): each wave starts together, and the
    /// next once it has ended.
    Waves(u16),
}

/// One run of the `micro` VMM: one VM, whose `vcpus` vCPUs (a thread each) each run
/// `cpuids` CPUIDs and `outs` port writes at the same time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MicroVm {
    pub cpuids: u32,
    pub outs: u32,
    pub vcpus: u8,
    /// RDMSR + WRMSR round trips of EFER, per vCPU.
    pub msrs: u32,
}

impl MicroVm {
    /// The command line that runs it inside L1.
    fn command(&self) -> String {
        format!(
            "/bin/micro {} {} {} {}",
            self.cpuids, self.outs, self.vcpus, self.msrs
        )
    }
}

/// Everything the L1 initrd holds.
pub struct L1 {
    pub busybox: PathBuf,
    pub init: PathBuf,
    /// kvm modules in load order; the last one is the vendor module (kvm-intel/kvm-amd).
    pub modules: Vec<PathBuf>,
    /// `ept` or `npt`.
    pub paging: &'static str,
    pub modes: Vec<u8>,
    pub workload: Workload,
    pub kvmtrace: Option<(PathBuf, Vec<PathBuf>)>,
    /// perf and its libraries, to run `perf kvm stat record` beside kvmtrace (`--perf`).
    pub perf: Option<(PathBuf, Vec<PathBuf>)>,
    /// The System.map of the kernel L2 boots (with `nokaslr`), for `--rip` symbols.
    pub system_map: Option<PathBuf>,
    pub record_args: String,
    /// Seconds one workload run may take inside L1.
    pub run_timeout: u64,
    /// How many VMs the workload runs, one after the other.
    pub vms: u16,
    /// How kvmtrace runs (`modes`, `reload`, `signal`; see lab/l1-init.sh).
    pub scenario: &'static str,
    /// Network driver modules, in load order (`--scenario export`).
    pub net_modules: Vec<PathBuf>,
    /// More files, as (path in the initrd, file here): `--scenario export`'s TLS files.
    pub files: Vec<(String, PathBuf)>,
    /// More host programs, as (path in the initrd, program, its libraries): `curl` for
    /// L1's own scrapes over TLS, dpkg and setpriv for `--install deb`.
    pub tools: Vec<(String, PathBuf, Vec<PathBuf>)>,
    /// `--install deb`: the exporter unit's capabilities (`CAP_BPF ...`), which
    /// kvmtrace runs with after installing /lab/kvmtrace.deb.
    pub unit_caps: Option<String>,
    /// `signal`: the signal names, one per mode in turn.
    pub signals: String,
    /// `signal`: L1 seconds from attach to the signal.
    pub signal_after: u32,
}

#[cfg(test)]
impl L1 {
    /// An L1 of tests: `workload` run `vms` times in one nested-paging mode, recorded
    /// with `record_args`, with no files.
    pub fn with_workload(workload: Workload, vms: u16, record_args: &str) -> Self {
        Self {
            busybox: PathBuf::new(),
            init: PathBuf::new(),
            modules: Vec::new(),
            paging: "ept",
            modes: vec![1],
            workload,
            kvmtrace: None,
            perf: None,
            system_map: None,
            record_args: record_args.to_owned(),
            run_timeout: 1,
            vms,
            scenario: "modes",
            net_modules: Vec::new(),
            files: Vec::new(),
            tools: Vec::new(),
            unit_caps: None,
            signals: String::new(),
            signal_after: 0,
        }
    }
}

/// Builds the L2 initrd: busybox and its /init.
pub fn l2_initrd(
    busybox: &Path,
    init: &Path,
    kvmtrace: Option<&Path>,
    guest_args: &str,
    out: &Path,
) -> anyhow::Result<u64> {
    let mut a = Archive::default();
    for d in ["proc", "sys", "dev", "tmp", "etc"] {
        a.dir(d)?;
    }
    // More `kvmtrace guest` options (leaf numbers of another patch), read by /init.
    a.bytes(
        "etc/guest-args",
        format!("{guest_args}\n").into_bytes(),
        0o644,
    )?;
    a.char_dev("dev/console", 5, 1)?;
    a.file("bin/busybox", busybox)?;
    if let Some(k) = kvmtrace {
        // Static: `kvmtrace guest` reads the counter leaves from inside L2.
        a.file("bin/kvmtrace", k)?;
    }
    a.bytes(
        "init",
        std::fs::read(init).with_context(|| format!("cannot read {}", init.display()))?,
        0o755,
    )?;
    a.write_to(out)
}

/// Builds the L1 initrd.
pub fn l1_initrd(l1: &L1, out: &Path) -> anyhow::Result<u64> {
    let mut a = l1_base(&l1.busybox, &l1.init)?;

    let names: Vec<String> = l1
        .modules
        .iter()
        .map(|m| {
            let name = file_name(m)?;
            a.file(&format!("lib/modules/lab/{name}"), m)?;
            Ok(name)
        })
        .collect::<anyhow::Result<_>>()?;
    let Some((vendor, deps)) = names.split_last() else {
        bail!("no kvm modules");
    };
    let vendor = vendor.trim_end_matches(".ko");

    let mut net = Vec::new();
    for m in &l1.net_modules {
        let name = file_name(m)?;
        a.file(&format!("lib/modules/net/{name}"), m)?;
        net.push(name);
    }

    let workload = add_workload(&mut a, &l1.workload)?;
    // `vms` VMs one after the other, each a new VM (its counters start at zero).
    let again = workload.strip_prefix("exec ").unwrap_or(&workload);
    let mut script = String::from("#!/bin/sh\n# The L2 workload (written by cargo xtask lab).\n");
    for _ in 1..l1.vms {
        let _ = writeln!(script, "{again} || exit $?");
    }
    let _ = writeln!(script, "{workload}");
    a.bytes("lab/workload", script, 0o755)?;

    if let Some((kvmtrace, libs)) = &l1.kvmtrace {
        a.file("bin/kvmtrace", kvmtrace)?;
        add_libraries(&mut a, libs)?;
    }
    if let Some((perf, libs)) = &l1.perf {
        a.file("usr/bin/perf", perf)?;
        add_libraries(&mut a, libs)?;
    }
    for (at, file) in &l1.files {
        a.file(at, file)?;
    }
    for (at, program, libs) in &l1.tools {
        a.file(at, program)?;
        add_libraries(&mut a, libs)?;
    }

    let mut env = env(l1, vendor, deps);
    let _ = writeln!(env, "NET_MODULES='{}'", net.join(" "));
    a.bytes("lab/env", env, 0o644)?;
    a.write_to(out)
}

/// Adds what `workload` runs to the L1 initrd; the shell command that runs it.
fn add_workload(a: &mut Archive, workload: &Workload) -> anyhow::Result<String> {
    Ok(match workload {
        Workload::Boot {
            qemu,
            qemu_libs,
            firmware,
            kernel,
            l2_initrd,
            memory_mb,
            smp,
            sweep,
        } => {
            a.file(QEMU_IN_L1, qemu)?;
            add_libraries(a, qemu_libs)?;
            for f in firmware {
                a.file(&format!("{QEMU_DATA_IN_L1}/{}", file_name(f)?), f)?;
            }
            a.file("l2/bzImage", kernel)?;
            a.file("l2/initrd.cpio", l2_initrd)?;
            // -M microvm,rtc=on: without the RTC the L2 kernel polls it for a second.
            format!(
                "exec {QEMU_IN_L1} -L {QEMU_DATA_IN_L1} -name guest=l2-$KVMLAB_TAG \
                 -accel kvm -M microvm,rtc=on -cpu host -m {memory_mb} -smp {smp} -nodefaults -no-user-config -display none -no-reboot \
                 -chardev stdio,id=s0,signal=off -serial chardev:s0 \
                 -kernel /l2/bzImage -initrd /l2/initrd.cpio -append '{L2_APPEND}{}'",
                if *sweep { " kvmlab.sweep" } else { "" }
            )
        }
        Workload::Micro {
            binary,
            vms,
            launch: Launch::Waves(wave),
        } => {
            a.file("bin/micro", binary)?;
            // Every VM of a wave in the background; a VM that fails says so (its counts
            // are then missing, which the checks see too).
            let mut s = String::new();
            for chunk in vms.chunks(usize::from((*wave).max(1))) {
                for vm in chunk {
                    let _ = writeln!(s, "{{ {} || echo \"micro failed: $?\"; }} &", vm.command());
                }
                s.push_str("wait\n");
            }
            s
        }
        Workload::Micro {
            binary,
            vms,
            launch: Launch::Overlap,
        } => {
            a.file("bin/micro", binary)?;
            let Some((first, rest)) = vms.split_first() else {
                bail!("no micro VMs");
            };
            let mut s = format!("{} &\nfirst=$!\n", first.command());
            for vm in rest {
                let _ = writeln!(s, "{} || exit $?", vm.command());
            }
            s.push_str("wait $first");
            s
        }
        Workload::Micro { binary, vms, .. } => {
            a.file("bin/micro", binary)?;
            let runs: Vec<String> = vms.iter().map(MicroVm::command).collect();
            match runs.as_slice() {
                [one] => format!("exec {one}"),
                _ => runs.join(" && "),
            }
        }
    })
}

/// `lab/env`, which the L1 init sources: the modes, the modules, the limits and how
/// kvmtrace runs.
fn env(l1: &L1, vendor: &str, deps: &[String]) -> String {
    let modes: Vec<String> = l1.modes.iter().map(u8::to_string).collect();
    let mut env = String::from("# Written by cargo xtask lab; sourced by /init.\n");
    let module = vendor.replace('-', "_");
    let _ = writeln!(env, "MODES='{}'", modes.join(" "));
    let _ = writeln!(env, "PAGING={}", l1.paging);
    let _ = writeln!(env, "KVM_DEPS='{}'", deps.join(" "));
    let _ = writeln!(env, "KVM_VENDOR={vendor}");
    let _ = writeln!(env, "KVM_MODULE={module}");
    let _ = writeln!(env, "RUN_TIMEOUT={}", l1.run_timeout);
    let _ = writeln!(env, "RUN_BUDGET={}", l1.run_timeout + 60);
    let _ = writeln!(env, "RECORD_ARGS='{}'", l1.record_args);
    if let Some(caps) = &l1.unit_caps {
        let _ = writeln!(env, "INSTALL=deb\nUNIT_CAPS='{caps}'");
    }
    // The crowd's reference is per thread, too: a thread's CPUID count names its VM.
    let crowd = matches!(
        l1.workload,
        Workload::Micro {
            launch: Launch::Waves(_),
            ..
        }
    );
    let _ = writeln!(env, "CROWD={}", u8::from(crowd));
    // Arm the kernel's triggers keyed as kvmtrace's --detail and --rip rows are.
    let has = |flag: &str| {
        l1.record_args
            .split_whitespace()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    let _ = writeln!(env, "DETAIL={}", u8::from(has("--detail")));
    // The exits the detail triggers key by a kvm_exit field, as `--detail` does.
    let _ = writeln!(
        env,
        "DETAIL_INFO1_IF='{}'",
        kvmtrace_model::detail::info1_trigger_filter()
    );
    let _ = writeln!(
        env,
        "DETAIL_VECTOR_IF='{}'",
        kvmtrace_model::detail::intr_info_trigger_filter()
    );
    let _ = writeln!(env, "RIPS={}", u8::from(has("--rip")));
    let _ = writeln!(env, "PERF={}", u8::from(l1.perf.is_some()));
    let _ = writeln!(env, "END_MARKER='{END_MARKER}'");
    let _ = writeln!(env, "SCENARIO={}", l1.scenario);
    let _ = writeln!(env, "SIGNALS='{}'", l1.signals);
    let _ = writeln!(env, "SIGNAL_AFTER={}", l1.signal_after);
    let _ = writeln!(env, "EXPORT_PORT={}", super::options::EXPORT_PORT);
    let _ = writeln!(
        env,
        "EXPORT_RETENTION={}",
        if crowd {
            super::options::EXPORT_RETENTION_CROWD_SECS
        } else {
            super::options::EXPORT_RETENTION_SECS
        }
    );
    env
}

/// What every L1 initrd holds: the mount points, the console, busybox, the init script
/// `init` as /init, and lab/l1-lib.sh (beside it), which it sources, as /lab/lib.sh.
pub fn l1_base(busybox: &Path, init: &Path) -> anyhow::Result<Archive> {
    let mut a = Archive::default();
    for d in ["proc", "sys", "dev", "tmp", "sys/kernel/tracing"] {
        a.dir(d)?;
    }
    a.char_dev("dev/console", 5, 1)?;
    a.file("bin/busybox", busybox)?;
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    a.bytes("init", read(init)?, 0o755)?;
    a.bytes(
        "lab/lib.sh",
        read(&init.with_file_name("l1-lib.sh"))?,
        0o644,
    )?;
    Ok(a)
}

/// Copies shared libraries to the same absolute paths inside the initrd, so binaries
/// run there as they do on the host.
pub fn add_libraries(a: &mut Archive, libs: &[PathBuf]) -> anyhow::Result<()> {
    for lib in libs {
        let inside = lib
            .to_str()
            .with_context(|| format!("non-UTF-8 library path {}", lib.display()))?;
        if !a.contains(inside) {
            a.file(inside, lib)?;
        }
    }
    Ok(())
}

pub fn file_name(p: &Path) -> anyhow::Result<String> {
    p.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .with_context(|| format!("bad file name {}", p.display()))
}

/// Bytes per cylinder of the Bochs disk geometry (16 heads, 63 sectors of 512 bytes).
const CYLINDER: u64 = 16 * 63 * 512;

/// A FAT16 "superfloppy" that syslinux boots: kernel + initrd. Returns its cylinders.
pub fn boot_disk(dir: &Path, kernel: &Path, initrd: &Path) -> anyhow::Result<(PathBuf, u64)> {
    let disk = dir.join("disk.img");
    let size = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.len())
            .with_context(|| format!("cannot stat {}", p.display()))
    };
    let payload = size(kernel)? + size(initrd)?;
    // FAT overhead and syslinux, plus room: 10% and 4 MiB.
    let cylinders = (payload + payload / 10 + (4 << 20)).div_ceil(CYLINDER);
    if cylinders > 1024 {
        bail!("the boot disk would need {cylinders} cylinders (max 1024)");
    }
    let _ = std::fs::remove_file(&disk);
    let f = std::fs::File::create(&disk)
        .with_context(|| format!("cannot create {}", disk.display()))?;
    f.set_len(cylinders * CYLINDER)
        .with_context(|| format!("cannot size {}", disk.display()))?;
    drop(f);

    let t = Duration::from_secs(120);
    run_bounded(
        Command::new("mkfs.fat")
            .args(["-F", "16", "-g", "16/63", "-n", "KVMLAB"])
            .arg(&disk),
        t,
    )?;
    run_bounded(Command::new("syslinux").arg("--install").arg(&disk), t)?;
    let cfg = dir.join("syslinux.cfg");
    write(
        &cfg,
        format!(
            "SERIAL 0 115200\nDEFAULT lab\nPROMPT 0\nTIMEOUT 0\nLABEL lab\n  KERNEL vmlinuz\n  INITRD initrd\n  APPEND {L1_APPEND}\n"
        ),
    )?;
    for (src, name) in [
        (cfg.as_path(), "syslinux.cfg"),
        (kernel, "vmlinuz"),
        (initrd, "initrd"),
    ] {
        run_bounded(
            Command::new("mcopy")
                .arg("-i")
                .arg(&disk)
                .arg(src)
                .arg(format!("::{name}")),
            t,
        )?;
    }
    Ok((disk, cylinders))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_runs_with_its_vcpus() {
        let vm = MicroVm {
            cpuids: 100_000,
            outs: 100,
            vcpus: 2,
            msrs: 5,
        };
        assert_eq!(vm.command(), "/bin/micro 100000 100 2 5");
    }

    #[test]
    fn the_detail_triggers_filter_as_the_detail_plan_keys() {
        let workload = Workload::Micro {
            binary: PathBuf::new(),
            vms: Vec::new(),
            launch: Launch::InTurn,
        };
        let l1 = L1::with_workload(workload, 1, "--detail");
        let env = env(&l1, "kvm-intel", &[]);
        let lines: Vec<&str> = env.lines().filter(|l| l.starts_with("DETAIL")).collect();
        assert_eq!(
            lines,
            [
                "DETAIL=1",
                "DETAIL_INFO1_IF='exit_reason == 28 || exit_reason == 30 || exit_reason == 123'",
                "DETAIL_VECTOR_IF='isa == 1 && exit_reason == 0'",
            ]
        );
        // The init script reads them, and keeps no copy of its own.
        let init = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../lab/l1-init.sh"),
        )
        .unwrap_or_else(|e| panic!("lab/l1-init.sh: {e}"));
        assert!(init.contains(" if $DETAIL_INFO1_IF\""));
        assert!(init.contains(" if $DETAIL_VECTOR_IF\""));
        assert!(!init.contains("exit_reason =="), "a filter of its own");
    }
}
