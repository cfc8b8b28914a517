//! Bochs as L1 for the Intel lab (VMX + EPT): the config, the boot disk, the command.

use std::{path::Path, process::Command};

use anyhow::Context as _;

use super::image::{self, L1_MEMORY_MB};
use crate::files::write;

/// The Bochs command that boots `kernel` and `initrd` from a disk in `build`, with the
/// config written from lab/bochsrc.in.
pub fn command(root: &Path, build: &Path, kernel: &Path, initrd: &Path) -> anyhow::Result<Command> {
    let (disk, cylinders) = image::boot_disk(build, kernel, initrd)?;
    let template = root.join("lab/bochsrc.in");
    let template = std::fs::read_to_string(&template)
        .with_context(|| format!("cannot read {}", template.display()))?;
    let text = |p: &Path| p.to_string_lossy().into_owned();
    let rc = template
        .replace("@MEMORY_MB@", &L1_MEMORY_MB.to_string())
        .replace("@DISK@", &text(&disk))
        .replace("@CYLINDERS@", &cylinders.to_string())
        .replace("@SERIAL@", &text(&build.join("serial.out")))
        .replace("@LOG@", &text(&build.join("bochs.log")));
    let bochsrc = build.join("bochsrc");
    write(&bochsrc, rc)?;
    // The debugger is compiled in: this script just says "continue".
    let dbg = build.join("bochs-debugger.rc");
    write(&dbg, "c\n")?;
    let _ = std::fs::remove_file(build.join("disk.img.lock"));
    let mut cmd = Command::new("unshare");
    cmd.args(["-n", "bochs-bin", "-q", "-f"])
        .arg(&bochsrc)
        .arg("-rc")
        .arg(&dbg)
        .current_dir(build);
    Ok(cmd)
}
