//! One module per `kvmtrace` subcommand.

pub mod diff;
pub mod guest;
pub mod reasons;
pub mod reconcile;
pub mod record;
pub mod show;
pub mod top;

use std::path::Path;

use kvmtrace::report::Report;
use thiserror::Error;

/// Input the user gave that kvmtrace cannot use; `main` exits with status 2 for it.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Reads a record written by `kvmtrace record --format json`.
pub fn load_report(path: &Path) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadInput(format!("cannot read {}: {e}", path.display())))?;
    Report::from_json(&text).map_err(|e| BadInput(format!("{}: {e}", path.display())).into())
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
