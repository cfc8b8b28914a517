//! One module per `kvmtrace` subcommand.

pub mod diff;
pub mod guest;
pub mod reasons;
pub mod reconcile;
pub mod record;
pub mod show;
pub mod top;

use std::path::Path;

use kvmtrace::{guest::GuestReadout, report::Report};
use thiserror::Error;

/// Input the user gave that kvmtrace cannot use; `main` exits with status 2 for it.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Reads a text file the user named; every failure is [`BadInput`] naming the file.
pub fn read_input(path: &Path, what: &str) -> Result<String, BadInput> {
    let bytes = std::fs::read(path)
        .map_err(|e| BadInput(format!("cannot read {}: {e}", path.display())))?;
    String::from_utf8(bytes).map_err(|e| {
        BadInput(format!(
            "{}: not {what}: not UTF-8 text (byte {} is invalid)",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

/// Reads a record written by `kvmtrace record --format json`.
pub fn load_report(path: &Path) -> anyhow::Result<Report> {
    let text = read_input(path, "a kvmtrace record")?;
    Report::from_json(&text).map_err(|e| BadInput(format!("{}: {e}", path.display())).into())
}

/// Reads the output of `kvmtrace guest --format json`.
pub fn load_guest_readout(path: &Path) -> anyhow::Result<GuestReadout> {
    let text = read_input(path, "a kvmtrace guest readout")?;
    GuestReadout::from_json(&text).map_err(|e| BadInput(format!("{}: {e}", path.display())).into())
}

/// Writes `bytes` to `output`, or to standard output.
pub fn write_output(output: Option<&Path>, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write as _;
    match output {
        Some(path) => {
            std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
        }
        None => Ok(std::io::stdout().write_all(bytes)?),
    }
}
