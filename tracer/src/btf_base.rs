//! The kernel's base BTF (`/sys/kernel/btf/vmlinux`), opened without parsing all of it.
//!
//! The kvm modules' BTF is split on it, so reading one of their structs needs it, but
//! parsing every vmlinux type (btf-rs's default) costs about 24 MB and, in the Bochs
//! lab, three seconds of start. btf-rs's mmap backend reads types only when asked.
//! Kernels before 6.16 cannot map the sysfs file itself; then its bytes are copied
//! into a sealed memory file, which can be.

use std::{io::Write as _, os::fd::FromRawFd as _, path::Path};

/// The base BTF in `btf_dir`, mapped.
pub fn open(btf_dir: &Path) -> Result<btf_rs::Btf, String> {
    let path = btf_dir.join("vmlinux");
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    if let Ok(btf) = btf_rs::Btf::from_file_with_backend(&path, btf_rs::Backend::Mmap) {
        return Ok(btf);
    }
    let bytes = std::fs::read(&path).map_err(|e| fail(&e))?;
    // SAFETY: a plain syscall with a NUL-terminated name; the fd it returns is owned
    // by the File below.
    let fd = unsafe { libc::memfd_create(c"kvmtrace-btf".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(fail(&std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(&bytes).map_err(|e| fail(&e))?;
    drop(bytes);
    let copy = format!("/proc/self/fd/{fd}");
    let btf = btf_rs::Btf::from_file_with_backend(&copy, btf_rs::Backend::Mmap)
        .or_else(|_| btf_rs::Btf::from_file(&path))
        .map_err(|e| fail(&e));
    drop(file);
    btf
}
