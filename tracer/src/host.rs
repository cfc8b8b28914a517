//! Facts about the host a report records: kernel release, KVM paging mode, and the
//! names of the processes that own the VMs.

use std::{fs, io, os::unix::fs::MetadataExt as _, path::Path};

use kvmtrace_model::paging::Paging;

/// Reads the paging mode from `/sys/module/{kvm_intel,kvm_amd}/parameters`; `None`
/// when neither module is loaded.
pub fn paging() -> Option<Paging> {
    paging_at(Path::new("/sys/module"))
}

/// [`paging`] under another sysfs root (tests).
pub fn paging_at(sys_module: &Path) -> Option<Paging> {
    [("kvm_intel", "ept"), ("kvm_amd", "npt")]
        .into_iter()
        .find_map(|(module, parameter)| {
            let text =
                fs::read_to_string(sys_module.join(module).join("parameters").join(parameter))
                    .ok()?;
            let nested = matches!(text.trim(), "Y" | "y" | "1");
            Some(Paging {
                module: module.to_owned(),
                parameter: parameter.to_owned(),
                nested,
            })
        })
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The command name of process `pid`, if it still exists.
pub fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Peak resident memory of this process, KiB (`VmHWM`); 0 if unknown. Not `getrusage`:
/// its `ru_maxrss` keeps the high-water mark from before `exec`, i.e. of the parent's
/// forked copy.
pub fn peak_rss_kib() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The inode number of the initial pid namespace, fixed since Linux 3.8
/// (`PROC_PID_INIT_INO` in
/// [include/linux/proc_ns.h](https://elixir.bootlin.com/linux/v6.1/source/include/linux/proc_ns.h)).
const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;

/// One line saying why kvmtrace cannot trace from here, or `None` when it runs in the
/// host's (the initial) pid namespace with a /proc that shows it. The eBPF side sees
/// pids as the host numbers them, and kvmtrace looks them up in /proc (`-p`, a VM's
/// process reaped): in a container without the host's pid namespace, /proc is
/// another namespace's.
pub fn pid_namespace_problem() -> Option<String> {
    pid_namespace_verdict(fs::metadata("/proc/self/ns/pid").map(|m| m.ino()))
}

/// [`pid_namespace_problem`] from the inode of `/proc/self/ns/pid`, or from why it
/// could not be read (a /proc of another pid namespace has no `self` for kvmtrace).
fn pid_namespace_verdict(ino: io::Result<u64>) -> Option<String> {
    match ino {
        Ok(PROC_PID_INIT_INO) => None,
        Ok(ino) => Some(format!(
            "kvmtrace is in pid namespace pid:[{ino}], not the host's: its /proc would not \
             show the traced processes; run it in the host's pid namespace \
             (a container needs --pid=host)"
        )),
        Err(e) => Some(format!(
            "cannot read /proc/self/ns/pid ({e}): kvmtrace needs the host's pid namespace \
             and its /proc (a container needs --pid=host)"
        )),
    }
}

/// Whether the kernel measures eBPF run times (`sysctl kernel.bpf_stats_enabled`).
pub fn bpf_stats_enabled() -> bool {
    fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_pid_namespace_may_trace() {
        assert_eq!(pid_namespace_verdict(Ok(0xEFFF_FFFC)), None);
        assert_eq!(
            pid_namespace_verdict(Ok(4_026_532_247)).as_deref(),
            Some(
                "kvmtrace is in pid namespace pid:[4026532247], not the host's: its /proc \
                 would not show the traced processes; run it in the host's pid namespace \
                 (a container needs --pid=host)"
            )
        );
        let gone = io::Error::from(io::ErrorKind::NotFound);
        let line = pid_namespace_verdict(Err(gone)).unwrap_or_default();
        assert!(
            line.starts_with("cannot read /proc/self/ns/pid (entity not found): "),
            "{line}"
        );
        assert!(!line.contains('\n'), "one line: {line}");
    }

    #[test]
    fn this_process_has_a_peak_rss() {
        assert!(peak_rss_kib() > 0);
    }

    #[test]
    fn reads_ept_and_npt() {
        let root = std::env::temp_dir().join(format!("kvmtrace-sysmod-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        assert_eq!(paging_at(&root), None);
        fs::create_dir_all(root.join("kvm_amd/parameters")).ok();
        fs::write(root.join("kvm_amd/parameters/npt"), "0\n").ok();
        let p = paging_at(&root);
        assert_eq!(
            p.as_ref().map(|p| (p.nested, p.label())),
            Some((false, "npt=0".into()))
        );
        fs::create_dir_all(root.join("kvm_intel/parameters")).ok();
        fs::write(root.join("kvm_intel/parameters/ept"), "Y\n").ok();
        let p = paging_at(&root);
        assert_eq!(p.map(|p| p.label()), Some("ept=1".into()));
        let _ = fs::remove_dir_all(&root);
    }
}
