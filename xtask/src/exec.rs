//! Running commands, with the command line in every error. Every child is started
//! through [`crate::process`], so a signal to xtask ends it too.

use std::process::{Command, Output};

use anyhow::bail;

use crate::process::{self, show};

/// Runs `cmd` with inherited stdio; fails unless it exits 0.
pub fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {}", show(cmd));
    let status = process::status(cmd)?;
    if !status.success() {
        bail!("{} failed: {status}", show(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails unless it exits 0.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let Output {
        status,
        stdout,
        stderr,
    } = process::output(cmd)?;
    if !status.success() {
        bail!(
            "{} failed: {status}: {}",
            show(cmd),
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}
