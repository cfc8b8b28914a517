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
    // The pinned nightly (`cargo xtask setup` installs it); AYA_EBPF_TOOLCHAIN picks
    // another one.
    println!("cargo:rerun-if-env-changed=AYA_EBPF_TOOLCHAIN");
    let pin = root_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={pin}");
    let toolchain = match std::env::var("AYA_EBPF_TOOLCHAIN") {
        Ok(t) => t,
        Err(_) => pinned_channel(pin.as_std_path())?,
    };
    aya_build::build_ebpf(
        [package],
        Toolchain::Custom(Box::leak(toolchain.into_boxed_str())),
    )
}

/// The `channel = "..."` of a rust-toolchain.toml.
fn pinned_channel(path: &std::path::Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .next()
        .with_context(|| format!("{} names no channel", path.display()))
}
