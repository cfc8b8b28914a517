//! `cargo xtask kmod`: builds the patched KVM modules (placeholder until it lands).

use std::path::Path;

use clap::Args;

#[derive(Args, Debug)]
pub struct Options {}

pub fn run(_opts: &Options, _root: &Path) -> anyhow::Result<()> {
    anyhow::bail!("kmod is not built yet")
}
