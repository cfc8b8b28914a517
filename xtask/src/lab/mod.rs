//! `cargo xtask lab`: the emulated lab (placeholder until the lab lands).

use std::path::Path;

use clap::Args;

#[derive(Args, Debug)]
pub struct Options {}

pub fn run(_opts: &Options, _root: &Path) -> anyhow::Result<()> {
    anyhow::bail!("the lab is not built yet")
}
