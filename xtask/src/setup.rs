//! `cargo xtask setup`: installs what building kvmtrace needs on a fresh Debian 12.
//!
//! The eBPF crate builds with the nightly toolchain (`-Z build-std=core` needs its
//! rust-src) and links with bpf-linker, which must use the same LLVM major version as
//! that nightly. bpf-linker is built against the nightly's own libLLVM, so no LLVM
//! package is needed and the two can never drift apart.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::exec::{exec, output};

/// Where the nightly that builds the eBPF crate is pinned (tracer/build.rs reads it too).
const TOOLCHAIN_PIN: &str = "tracer-ebpf/rust-toolchain.toml";
/// bpf-linker release known to work with aya-ebpf 0.2.1 (shared/LAB-NOTES.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Args, Debug, Default)]
pub struct Options {
    /// Rebuild bpf-linker even if a matching one is installed.
    #[arg(long)]
    pub force: bool,
}

/// The toolchain the eBPF crate is built with: `AYA_EBPF_TOOLCHAIN`, else the pinned
/// nightly.
pub fn ebpf_toolchain(root: &Path) -> anyhow::Result<String> {
    if let Ok(t) = std::env::var("AYA_EBPF_TOOLCHAIN") {
        return Ok(t);
    }
    let pin = root.join(TOOLCHAIN_PIN);
    let text =
        std::fs::read_to_string(&pin).with_context(|| format!("cannot read {}", pin.display()))?;
    // channel = "nightly-YYYY-MM-DD"
    text.lines()
        .find(|l| l.trim_start().starts_with("channel"))
        .and_then(|l| l.split('"').nth(1))
        .map(str::to_owned)
        .with_context(|| format!("{} has no channel = \"...\" line", pin.display()))
}

pub fn run(opts: &Options, root: &Path) -> anyhow::Result<()> {
    // rustup's toolchains and cargo's installed binaries are the machine's.
    let _setup = crate::lock::exclusive(&crate::lock::machine("setup"), "the set-up")?;
    let toolchain = ebpf_toolchain(root)?;
    ensure_toolchain(&toolchain)?;
    let llvm_major = llvm_major(&toolchain)?;
    ensure_bpf_linker(&toolchain, llvm_major, opts.force)?;
    eprintln!(
        "setup: {toolchain} (LLVM {llvm_major}) with rust-src and clippy, bpf-linker {BPF_LINKER_VERSION}: ready"
    );
    Ok(())
}

fn ensure_toolchain(toolchain: &str) -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !installed.lines().any(|l| l.starts_with(toolchain)) {
        exec(Command::new("rustup").args([
            "toolchain",
            "install",
            toolchain,
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))?;
    // rust-src for `-Z build-std=core`; clippy to lint the eBPF crate on its target.
    for component in ["rust-src", "clippy"] {
        if !components.lines().any(|l| l.starts_with(component)) {
            exec(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                toolchain,
            ]))?;
        }
    }
    Ok(())
}

/// The LLVM major version of `toolchain`'s rustc.
fn llvm_major(toolchain: &str) -> anyhow::Result<u32> {
    let vv = output(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .arg("-vV"),
    )?;
    vv.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("rustc +{toolchain} -vV shows no LLVM version"))
}

fn ensure_bpf_linker(toolchain: &str, llvm_major: u32, force: bool) -> anyhow::Result<()> {
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .args(["--print", "sysroot"]),
    )?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let installed = output(Command::new("bpf-linker").arg("--version")).ok();
    match installed {
        // Built for this release and against this toolchain's own libLLVM.
        Some(version)
            if !force && version.contains(BPF_LINKER_VERSION) && links_llvm_from(&libdir) =>
        {
            return Ok(());
        }
        Some(version) => eprintln!(
            "setup: replacing {} (built for another release or toolchain)",
            version.trim()
        ),
        None => {}
    }
    // libLLVM-22-rust-1.97.0-nightly.so -> link as LLVM-22-rust-1.97.0-nightly
    let llvm_lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("cannot list {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
        .map(|n| {
            n.trim_start_matches("lib")
                .trim_end_matches(".so")
                .to_owned()
        });
    let Some(llvm_lib) = llvm_lib else {
        bail!(
            "{toolchain} has no libLLVM-*.so in {}: install the llvm-tools component or another nightly",
            libdir.display()
        );
    };
    let rustflags = format!(
        "-L native={dir} -l dylib={llvm_lib} -C link-arg=-Wl,-rpath,{dir}",
        dir = libdir.display()
    );
    exec(
        Command::new("cargo")
            .arg(format!("+{toolchain}"))
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
            ])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{llvm_major},no-llvm-linking"))
            .env("RUSTFLAGS", rustflags),
    )
}

/// Whether the installed bpf-linker loads its libLLVM from `libdir` (the pinned
/// toolchain's), as `ldd` resolves it.
fn links_llvm_from(libdir: &Path) -> bool {
    let Ok(path) = which("bpf-linker") else {
        return false;
    };
    output(Command::new("ldd").arg(path)).is_ok_and(|ldd| {
        ldd.lines()
            .filter(|l| l.contains("libLLVM"))
            .any(|l| l.contains(&*libdir.to_string_lossy()))
    })
}

/// The first `name` on PATH.
fn which(name: &str) -> anyhow::Result<std::path::PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} is not on PATH"))
}
