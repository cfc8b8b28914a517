//! Writing files, with the path in every error.

use std::path::Path;

use anyhow::Context as _;

/// Writes `contents` to `path`.
pub fn write(path: &Path, contents: impl AsRef<[u8]>) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `contents` to `dir/name`.
pub fn write_in(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> anyhow::Result<()> {
    write(&dir.join(name), contents)
}
