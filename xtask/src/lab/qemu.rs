//! QEMU 7.2 TCG as L1 for the AMD lab (SVM + NPT).

use std::{path::Path, process::Command};

use super::{
    image::{self, L1_MEMORY_MB},
    inputs::Inputs,
};

/// QEMU TCG as L1 with `cpus` CPUs. With more than one and `parallel`, each runs in a
/// host thread of its own (multi-threaded TCG), so L1's CPUs run truly in parallel;
/// without `parallel` they take turns in one host thread.
/// With `forward` (guest port, host port): a virtio network card on QEMU's user
/// network with `restrict=on` (L1 reaches nothing outside), and only that guest port
/// forwarded, to the host's loopback address only.
pub fn command(
    build: &Path,
    inputs: &Inputs,
    initrd: &Path,
    cpus: u8,
    parallel: bool,
    forward: Option<(u16, u16)>,
) -> anyhow::Result<Command> {
    let qemu = inputs.qemu_root.join("usr/bin/qemu-system-x86_64");
    let mut cmd = Command::new(qemu);
    if let Some(dir) = &inputs.qemu_module_dir {
        cmd.env("QEMU_MODULE_DIR", dir);
    }
    for d in &inputs.qemu_data_dirs {
        cmd.arg("-L").arg(d);
    }
    let accel = if cpus > 1 && parallel {
        "tcg,thread=multi"
    } else {
        "tcg,thread=single"
    };
    cmd.args(["-accel", accel])
        .args(["-cpu", "max", "-smp"])
        .arg(cpus.to_string())
        .args(["-no-reboot", "-nodefaults"])
        .args(["-display", "none", "-monitor", "none"]);
    match forward {
        Some((guest, host)) => cmd
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{host}-:{guest}"
            ))
            // No option ROM: L1 boots its kernel directly.
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="]),
        None => cmd.args(["-net", "none"]),
    };
    cmd.arg("-m")
        .arg(format!("{L1_MEMORY_MB}M"))
        .arg("-serial")
        .arg(format!("file:{}", build.join("serial.out").display()))
        .arg("-kernel")
        .arg(&inputs.kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(image::L1_APPEND)
        .current_dir(build);
    Ok(cmd)
}
