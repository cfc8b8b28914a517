//! Builds the eBPF object (tracer-ebpf) with aya-build into OUT_DIR.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "tracer-ebpf")
        .ok_or_else(|| anyhow!("tracer-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    // `cargo xtask setup` prepares "nightly"; AYA_EBPF_TOOLCHAIN picks another one.
    println!("cargo:rerun-if-env-changed=AYA_EBPF_TOOLCHAIN");
    let toolchain = match std::env::var("AYA_EBPF_TOOLCHAIN") {
        Ok(t) => Toolchain::Custom(Box::leak(t.into_boxed_str())),
        Err(_) => Toolchain::Nightly,
    };
    aya_build::build_ebpf([package], toolchain)
}
