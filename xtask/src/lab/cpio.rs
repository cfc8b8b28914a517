//! A minimal `newc` cpio writer: enough for an initramfs (directories, files, a console
//! device node), built in memory so no root-owned staging tree is needed.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

enum Entry {
    Dir,
    File { source: Source, mode: u32 },
    CharDev { major: u32, minor: u32 },
}

enum Source {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

/// The tree of an initramfs, keyed by its path inside the archive (no leading `/`).
#[derive(Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    fn key(path: &str) -> anyhow::Result<String> {
        let key = path.trim_start_matches('/').trim_end_matches('/');
        if key.is_empty() || key.split('/').any(|c| c.is_empty() || c == "..") {
            bail!("bad archive path {path:?}");
        }
        Ok(key.to_owned())
    }

    fn insert(&mut self, path: &str, entry: Entry) -> anyhow::Result<()> {
        let key = Self::key(path)?;
        let mut parent = key.as_str();
        while let Some((dir, _)) = parent.rsplit_once('/') {
            self.entries.entry(dir.to_owned()).or_insert(Entry::Dir);
            parent = dir;
        }
        self.entries.insert(key, entry);
        Ok(())
    }

    pub fn dir(&mut self, path: &str) -> anyhow::Result<()> {
        self.insert(path, Entry::Dir)
    }

    /// A copy of the host file `source` (symlinks followed), with its permission bits.
    pub fn file(&mut self, path: &str, source: &Path) -> anyhow::Result<()> {
        let meta = std::fs::metadata(source)
            .with_context(|| format!("cannot add {} to the initrd", source.display()))?;
        if !meta.is_file() {
            bail!("{} is not a regular file", source.display());
        }
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
        self.insert(
            path,
            Entry::File {
                source: Source::Path(source.to_owned()),
                mode,
            },
        )
    }

    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> anyhow::Result<()> {
        self.insert(
            path,
            Entry::File {
                source: Source::Bytes(data.into()),
                mode,
            },
        )
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> anyhow::Result<()> {
        self.insert(path, Entry::CharDev { major, minor })
    }

    pub fn contains(&self, path: &str) -> bool {
        Self::key(path).is_ok_and(|k| self.entries.contains_key(&k))
    }

    /// Writes the archive; returns its size in bytes.
    pub fn write_to(&self, out: &Path) -> anyhow::Result<u64> {
        let file = std::fs::File::create(out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        let mut w = CountingWriter {
            inner: std::io::BufWriter::new(file),
            written: 0,
        };
        for (ino, (name, entry)) in self.entries.iter().enumerate() {
            let ino = u32::try_from(ino + 1).context("too many initrd entries")?;
            match entry {
                Entry::Dir => header(&mut w, ino, 0o040_755, name, 0, (0, 0))?,
                Entry::File { source, mode } => {
                    let data = match source {
                        Source::Path(p) => std::fs::read(p)
                            .with_context(|| format!("cannot read {}", p.display()))?,
                        Source::Bytes(b) => b.clone(),
                    };
                    header(&mut w, ino, 0o100_000 | mode, name, data.len(), (0, 0))?;
                    w.write_all(&data)?;
                    pad(&mut w)?;
                }
                Entry::CharDev { major, minor } => {
                    header(&mut w, ino, 0o020_600, name, 0, (*major, *minor))?;
                }
            }
        }
        header(&mut w, 0, 0, "TRAILER!!!", 0, (0, 0))?;
        w.inner
            .flush()
            .with_context(|| format!("cannot write {}", out.display()))?;
        Ok(w.written)
    }
}

struct CountingWriter<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn pad<W: Write>(w: &mut CountingWriter<W>) -> anyhow::Result<()> {
    let rem = (w.written % 4) as usize;
    if rem != 0 {
        w.write_all(&[0u8; 4][..4 - rem])?;
    }
    Ok(())
}

fn header<W: Write>(
    w: &mut CountingWriter<W>,
    ino: u32,
    mode: u32,
    name: &str,
    size: usize,
    (rmajor, rminor): (u32, u32),
) -> anyhow::Result<()> {
    let size = u32::try_from(size).context("initrd file larger than 4 GiB")?;
    let namesize = u32::try_from(name.len() + 1).context("path too long")?;
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    // rdevmajor, rdevminor, namesize, check
    write!(
        w,
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{rmajor:08x}{rminor:08x}{namesize:08x}{:08x}",
        0, 0, 0, 0, 0, 0
    )?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_first_and_records_are_aligned() -> anyhow::Result<()> {
        let mut a = Archive::default();
        a.bytes("/a/b/c", "hello", 0o755)?;
        a.char_dev("dev/console", 5, 1)?;
        let out = std::env::temp_dir().join(format!("cpio-test-{}", std::process::id()));
        let n = a.write_to(&out)?;
        let data = std::fs::read(&out)?;
        std::fs::remove_file(&out)?;
        assert_eq!(n as usize, data.len());
        assert_eq!(n % 4, 0);
        let text = String::from_utf8_lossy(&data);
        let order: Vec<usize> = ["a\0", "a/b\0", "a/b/c\0", "dev/console\0", "TRAILER!!!\0"]
            .iter()
            .map(|n| text.find(n).unwrap_or(usize::MAX))
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        Ok(())
    }
}
