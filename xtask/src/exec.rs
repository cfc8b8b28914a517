//! Running commands, with the command line in every error. Every child is started
//! through [`crate::process`], so a signal to xtask ends it too.

use std::{
    io::BufRead as _,
    process::{Command, ExitStatus, Output, Stdio},
};

use anyhow::{Context as _, bail};

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

/// Runs `cmd` with stderr inherited and stdout read line by line: each line is printed
/// and handed to `line`. Returns the exit status, whatever it is.
pub fn exec_lines(cmd: &mut Command, mut line: impl FnMut(&str)) -> anyhow::Result<ExitStatus> {
    eprintln!("+ {}", show(cmd));
    cmd.stdout(Stdio::piped());
    let mut child = process::ChildGuard::spawn(cmd)?;
    if let Some(out) = child.take_stdout() {
        let mut reader = std::io::BufReader::new(out);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .with_context(|| format!("cannot read the output of {}", show(cmd)))?;
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&buf);
            let text = text.trim_end_matches(['\n', '\r']);
            println!("{text}");
            line(text);
        }
    }
    Ok(child.wait_with_output()?.status)
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
