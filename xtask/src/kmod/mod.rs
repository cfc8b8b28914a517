//! `cargo xtask kmod`: builds `kvm.ko`, `kvm-intel.ko` and `kvm-amd.ko` with the
//! exit-counter CPUID leaves (kernel/README.md) out of tree, against the Debian
//! headers of the kernel the lab boots.
//!
//! 1. Look up the kernel release (ABI) behind the flavour's image metapackage, every
//!    time: the mirror moves with security updates. Each line's packages come from its
//!    own Debian release: bookworm(-security) for 6.1 and 6.12, bullseye(-security)
//!    for 5.10 through a private apt configuration in `target/apt/bullseye`.
//! 2. Download the source and the headers (the flavour's, the common ones and kbuild)
//!    and unpack them under `target/kmod/`: never installed, since the headers'
//!    dependencies would put a kernel image on the host. Install only the missing
//!    build tools. Refuse unless image, headers and source are the same Debian
//!    version (otherwise vermagic or struct layouts may not match).
//! 3. Extract only `arch/x86/kvm`, `virt/kvm`, the headers the series patches and
//!    checkpatch into `target/kmod/<kernel>-<flavour>/src` (kept while the source
//!    version and the file list do not change).
//! 4. Copy that to `build-<variant>`, apply the series (and the variant's patches)
//!    with `patch --fuzz=0`, point the kvm Makefile at the copy and put the patched
//!    headers ahead of the installed ones (`NOSTDINC_FLAGS`), then
//!    `make -C <unpacked headers>/usr/src/linux-headers-<release> M=... modules`
//!    (5.10: with `CC=gcc-12`, as bookworm has no gcc-10).
//! 5. Copy the modules to `out` (`out-<variant>` for the test-only variants), strip
//!    them, check their vermagic and write `kmod.json`, whose fingerprint of every input
//!    lets the next run skip all of this.

mod build;
mod checkpatch;
mod debian;
mod options;
mod source;

use std::path::Path;

pub use self::{
    build::{Built, build},
    options::{Flavour, KernelLine, Options, Variant},
};

pub fn run(opts: &Options, root: &Path) -> anyhow::Result<()> {
    if opts.check {
        return checkpatch::check(opts, root);
    }
    let built = build(opts, root)?;
    eprintln!(
        "kmod: {} {} {} for {} (Debian {}) in {}:",
        built.info.kernel,
        built.info.flavour,
        built.info.variant,
        built.info.kernel_release,
        built.info.debian_version,
        built.out_dir.display()
    );
    for module in &built.modules {
        println!("{}", module.display());
    }
    Ok(())
}
