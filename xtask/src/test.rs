//! `cargo xtask test`: the one command that checks everything, as CI runs it.

use std::{path::Path, process::Command};

use clap::Args;

use crate::{exec::exec, setup};

#[derive(Args, Debug)]
pub struct Options {
    /// Skip the lab end-to-end tests (they boot emulated machines).
    #[arg(long)]
    pub no_lab: bool,
}

pub fn run(opts: &Options, root: &Path) -> anyhow::Result<()> {
    setup::run(&setup::Options::default(), root)?;
    let cargo = || {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.current_dir(root);
        c
    };
    exec(cargo().args(["fmt", "--all", "--", "--check"]))?;
    exec(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // Unit tests, and the integration tests that load the eBPF programs (as root).
    // One thread: the tests attach to the same kernel tracepoints.
    exec(cargo().args(["test", "--", "--test-threads=1"]))?;
    if !opts.no_lab {
        eprintln!("test: the lab end-to-end tests are not part of this build yet");
    }
    Ok(())
}
