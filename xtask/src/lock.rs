//! Lock files shared by every xtask on the machine: `cargo xtask test` runs two labs at
//! once (an Intel and an AMD stream), and both may want to download, unpack or build
//! the same thing under `target/`. Whoever holds a lock does the work; the other waits
//! and then finds it done.
//!
//! A lock is `flock(2)` on a file beside what it guards, so the kernel drops it when
//! its holder ends, however it ends: a killed xtask leaves no stale lock behind.
//! Within one xtask a lock is re-entrant (a nested request for a lock this process
//! holds returns at once), since flock would otherwise wait on itself.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use anyhow::Context as _;

/// The lock files this process holds now: each open file (the flock lives as long as
/// it stays open) with how many guards hold it.
static HELD: Mutex<Vec<Held>> = Mutex::new(Vec::new());

struct Held {
    path: PathBuf,
    guards: usize,
    _file: File,
}

/// Held until dropped (the last guard of a path releases it).
#[must_use = "the lock is released when the guard is dropped"]
pub struct Lock {
    path: PathBuf,
}

/// Takes the lock file `path` (created, with its directory, if missing), waiting while
/// another process holds it; `what` names what it guards in the message said while
/// waiting.
pub fn exclusive(path: &Path, what: &str) -> anyhow::Result<Lock> {
    {
        let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = held.iter_mut().find(|h| h.path == path) {
            h.guards += 1;
            return Ok(Lock {
                path: path.to_owned(),
            });
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    if !flock(&file, libc::LOCK_EX | libc::LOCK_NB)
        .with_context(|| format!("cannot lock {}", path.display()))?
    {
        eprintln!(
            "xtask: waiting for {what}: another xtask holds {}",
            path.display()
        );
        flock(&file, libc::LOCK_EX).with_context(|| format!("cannot lock {}", path.display()))?;
    }
    HELD.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Held {
            path: path.to_owned(),
            guards: 1,
            _file: file,
        });
    Ok(Lock {
        path: path.to_owned(),
    })
}

/// The lock file guarding `path` (a file or directory): `path` with `.lock` appended.
pub fn beside(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// The lock file of something the whole machine shares (apt and dpkg, rustup): in
/// `/run/lock`, so xtasks of different checkouts take turns too.
pub fn machine(name: &str) -> PathBuf {
    let dir = Path::new("/run/lock");
    let dir = if dir.is_dir() {
        dir.to_owned()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("kvmtrace-xtask-{name}.lock"))
}

/// `flock(file, op)`, again after a signal interrupts it. False when `op` has
/// `LOCK_NB` and another process holds the lock.
fn flock(file: &File, op: i32) -> std::io::Result<bool> {
    loop {
        // SAFETY: flock(2) on a file descriptor that `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EWOULDBLOCK) if op & libc::LOCK_NB != 0 => return Ok(false),
            _ => return Err(err),
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = held.iter().position(|h| h.path == self.path) {
            held[i].guards -= 1;
            if held[i].guards == 0 {
                // Closing the file releases the flock.
                held.swap_remove(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_process_waits_and_a_nested_request_does_not() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("sub/x.lock");
        let outer = exclusive(&path, "x").unwrap_or_else(|e| panic!("{e:#}"));
        // Re-entrant in this process.
        let inner = exclusive(&path, "x").unwrap_or_else(|e| panic!("{e:#}"));
        // Another open file description (as another process has) is refused while
        // any guard holds the lock, in whatever order they go, and gets it after.
        let other = File::options()
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{e}"));
        let try_lock =
            || flock(&other, libc::LOCK_EX | libc::LOCK_NB).unwrap_or_else(|e| panic!("{e}"));
        assert!(!try_lock());
        drop(outer);
        assert!(!try_lock());
        drop(inner);
        assert!(try_lock());
    }

    #[test]
    fn lock_files_keep_the_whole_name() {
        assert_eq!(
            beside(Path::new("/c/roots/linux-image-6.1.0-9-dbg")),
            Path::new("/c/roots/linux-image-6.1.0-9-dbg.lock")
        );
        assert!(machine("apt").ends_with("kvmtrace-xtask-apt.lock"));
    }
}
