//! Debian packages for all of xtask: installing the few host tools the build and the
//! lab need, and downloading (never installing) kernels, headers, sources and QEMU,
//! which are unpacked under `target/`.
//!
//! Package lists that are missing or older than the mirror show up as a lookup that
//! finds nothing, an install that fails or a download that 404s. Each of those
//! refreshes the lists (`apt-get update`, at most once per xtask run and apt
//! configuration) and tries once more. `APT_CONFIG` is honoured, so a private apt
//! configuration (e.g. an empty lists directory) applies to every call on the host's
//! sources.
//!
//! Packages of another Debian release (bullseye's 5.10 kernel) are looked up and
//! downloaded through an [`Apt`] of its own ([`Apt::bullseye`]): a private apt
//! configuration under `target/apt/`, with its own sources, lists, cache and an empty
//! dpkg status, passed as `APT_CONFIG` to those calls only. The machine's apt sources
//! are never changed, and nothing is ever installed from such a configuration.

mod private;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{exec::output, files::write, process::run_bounded};

/// The longest an apt or dpkg call may take.
const APT_TIME: Duration = Duration::from_secs(900);
/// The apt configurations whose lists this run refreshed already (`None`: the host's).
static REFRESHED: Mutex<Vec<Option<PathBuf>>> = Mutex::new(Vec::new());

/// Holds the machine-wide lock of xtask's apt and dpkg calls.
fn apt_lock() -> anyhow::Result<crate::lock::Lock> {
    crate::lock::exclusive(&crate::lock::machine("apt"), "apt")
}

/// Where packages are looked up and downloaded from: the host's apt sources, or a
/// private apt configuration for another Debian release. Only the host's can install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Apt {
    /// The private configuration file (`APT_CONFIG`), or `None` for the host's.
    config: Option<PathBuf>,
    /// Where apt keeps its binary package cache for this configuration (see
    /// [`Apt::command`]): under the checkout's target/apt/ for the host's lists, or
    /// beside a private configuration.
    binary_cache: PathBuf,
}

impl Apt {
    /// The machine's own apt sources (and `$APT_CONFIG`, when set), with the binary
    /// package cache in the checkout `root`.
    pub fn host(root: &Path) -> Self {
        Self {
            config: None,
            binary_cache: root.join("target/apt/host-cache"),
        }
    }

    /// Whether this is the host's apt configuration.
    pub fn is_host(&self) -> bool {
        self.config.is_none()
    }

    /// Where the packages come from, for messages: `the host's apt sources` or the
    /// private configuration file.
    pub fn describe(&self) -> String {
        match &self.config {
            None => "the host's apt sources".to_owned(),
            Some(conf) => format!("the private apt configuration {}", conf.display()),
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        if let Some(conf) = &self.config {
            cmd.env("APT_CONFIG", conf);
        }
        if let Some(dir) = self.binary_cache_dir() {
            // Debian's container images switch apt's binary package cache off
            // (`Dir::Cache::pkgcache ""`), so every apt command parses all the lists
            // again (a second here, a few dozen per lab run). Ours, under target/,
            // is rebuilt by apt itself whenever the lists change.
            cmd.arg("-o")
                .arg(format!(
                    "Dir::Cache::pkgcache={}",
                    dir.join("pkgcache.bin").display()
                ))
                .arg("-o")
                .arg(format!(
                    "Dir::Cache::srcpkgcache={}",
                    dir.join("srcpkgcache.bin").display()
                ));
        }
        cmd
    }

    /// [`Apt::binary_cache`], or None when the directory cannot be made: apt then
    /// parses the lists each time, as before.
    fn binary_cache_dir(&self) -> Option<&Path> {
        std::fs::create_dir_all(&self.binary_cache)
            .ok()
            .map(|()| self.binary_cache.as_path())
    }

    fn apt_get(&self) -> Command {
        self.command("apt-get")
    }

    fn refreshed(&self) -> bool {
        REFRESHED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&self.config)
    }

    /// Runs `apt-get update` unless this run did already for this configuration;
    /// whether it ran.
    fn refresh(&self, why: &str) -> anyhow::Result<bool> {
        {
            let mut done = REFRESHED.lock().unwrap_or_else(PoisonError::into_inner);
            if done.contains(&self.config) {
                return Ok(false);
            }
            done.push(self.config.clone());
        }
        let _apt = apt_lock()?;
        eprintln!(
            "apt: {why}: refreshing the package lists (apt-get update{})",
            match &self.config {
                None => String::new(),
                Some(conf) => format!(" with APT_CONFIG={}", conf.display()),
            }
        );
        run_bounded(self.apt_get().args(["update", "-qq"]), APT_TIME).with_context(|| {
            format!(
                "apt-get update failed: check the network and {}",
                self.describe()
            )
        })?;
        Ok(true)
    }

    /// `attempt`, and once more after refreshing the package lists if it failed.
    fn retry_after_refresh<T>(&self, attempt: impl Fn() -> anyhow::Result<T>) -> anyhow::Result<T> {
        match attempt() {
            Ok(v) => Ok(v),
            Err(e) => {
                if self.refresh(&last_line(&e))? {
                    attempt()
                } else {
                    Err(e)
                }
            }
        }
    }

    /// `prepare`, and once more after refreshing the package lists if it failed and
    /// the lists had not been refreshed before it began. For a whole sequence of
    /// look-ups and downloads: a stale list names a package version the mirror no
    /// longer has, so after the refresh the look-ups must be made again, not only the
    /// download.
    pub fn with_fresh_lists<T>(
        &self,
        prepare: impl Fn() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let fresh_before = self.refreshed();
        match prepare() {
            Ok(v) => Ok(v),
            Err(e) if fresh_before => Err(e),
            Err(e) => {
                self.refresh(&last_line(&e))?;
                prepare()
            }
        }
    }

    /// The output of `apt-cache ARGS`, run again after a refresh when `found` says it
    /// holds nothing useful (e.g. no package lists yet).
    pub fn cache<T>(&self, args: &[&str], found: impl Fn(&str) -> Option<T>) -> anyhow::Result<T> {
        let show = match &self.config {
            None => format!("apt-cache {}", args.join(" ")),
            Some(conf) => format!("APT_CONFIG={} apt-cache {}", conf.display(), args.join(" ")),
        };
        self.retry_after_refresh(|| {
            let text = {
                let _apt = apt_lock()?;
                output(self.command("apt-cache").args(args))?
            };
            found(&text).with_context(|| format!("`{show}` does not have it"))
        })
    }

    /// The `.deb` for `spec` (`name`, `name=version` or `name/release`) in `debs`,
    /// downloaded unless a file of the same name and size is already there.
    pub fn download(&self, debs: &Path, spec: &str) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(debs)
            .with_context(|| format!("cannot create {}", debs.display()))?;
        self.retry_after_refresh(|| self.fetch(debs, spec))
    }

    /// The `Candidate:` version of `pkg` in `apt-cache policy` output.
    pub fn candidate(&self, pkg: &str) -> anyhow::Result<String> {
        self.cache(&["policy", pkg], |text| parse_candidate(text, pkg))
    }

    fn fetch(&self, debs: &Path, spec: &str) -> anyhow::Result<PathBuf> {
        let _apt = apt_lock()?;
        let uris = output(self.apt_get().args(["download", "--print-uris", spec]))?;
        // 'http://…/foo_1.2_amd64.deb' foo_1.2_amd64.deb 12345 SHA256:…
        let mut fields = uris
            .lines()
            .find(|l| l.starts_with('\''))
            .with_context(|| format!("apt-get download --print-uris {spec} printed no URI"))?
            .split_whitespace()
            .skip(1);
        let (Some(file), Some(size)) = (fields.next(), fields.next()) else {
            bail!("cannot parse apt-get --print-uris output for {spec}: {uris}");
        };
        let path = debs.join(file);
        let have = std::fs::metadata(&path).map(|m| m.len().to_string()).ok();
        if have.as_deref() != Some(size) {
            eprintln!("apt: downloading {file}");
            run_bounded(
                self.apt_get()
                    .args(["download", "-qq", spec])
                    .current_dir(debs),
                APT_TIME,
            )
            .with_context(|| format!("apt-get download {spec} failed ({})", self.describe()))?;
            if !path.is_file() {
                bail!("apt-get download {spec} did not produce {}", path.display());
            }
        }
        Ok(path)
    }
}

/// The innermost cause of `e`: the line that says what apt could not do.
fn last_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

/// [`Apt::with_fresh_lists`] on the host's apt sources, for the checkout `root`.
pub fn with_fresh_lists<T>(
    root: &Path,
    prepare: impl Fn() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    Apt::host(root).with_fresh_lists(prepare)
}

/// Whether `package` is installed on the host.
fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", package]))
        .is_ok_and(|s| s.trim() == "install ok installed")
}

/// Installs those of `packages` that are not installed yet (host tools only: never a
/// kernel; see [`download`] for those), for the checkout `root`.
pub fn install(root: &Path, packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let _apt = apt_lock()?;
    // Another xtask may have installed them while this one waited for the lock.
    let missing: Vec<&str> = missing.into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("apt: installing {}", missing.join(" "));
    let host = Apt::host(root);
    host.retry_after_refresh(|| {
        run_bounded(
            host.apt_get()
                // Wait for an apt outside xtask (e.g. unattended-upgrades) to finish.
                .args(["-o", "DPkg::Lock::Timeout=300"])
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing),
            APT_TIME,
        )
        .with_context(|| format!("apt-get install {} failed", missing.join(" ")))
    })
}

/// [`Apt::download`] from the host's apt sources, for the checkout `root`.
pub fn download(root: &Path, debs: &Path, spec: &str) -> anyhow::Result<PathBuf> {
    Apt::host(root).download(debs, spec)
}

/// Unpacks each of `debs`, in order, into `root` (once: a stamp naming them marks it
/// done). Returns `root`.
pub fn unpack_into(debs: &[PathBuf], root: &Path) -> anyhow::Result<PathBuf> {
    let _unpack = crate::lock::exclusive(&crate::lock::beside(root), "an unpack")?;
    let stamp = root.join(".unpacked");
    let names: String = debs
        .iter()
        .filter_map(|d| d.file_name())
        .map(|n| format!("{}\n", n.to_string_lossy()))
        .collect();
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == names || s.is_empty()) {
        return Ok(root.to_owned());
    }
    if root.exists() {
        std::fs::remove_dir_all(root)
            .with_context(|| format!("cannot remove {}", root.display()))?;
    }
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    for deb in debs {
        run_bounded(
            Command::new("dpkg-deb").arg("-x").arg(deb).arg(root),
            Duration::from_secs(300),
        )?;
    }
    write(&stamp, names)?;
    Ok(root.to_owned())
}

/// Unpacks `deb` once into `roots/<deb file stem>/` and returns that directory.
pub fn unpack(deb: &Path, roots: &Path) -> anyhow::Result<PathBuf> {
    let stem = deb
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("bad package file name {}", deb.display()))?;
    unpack_into(&[deb.to_owned()], &roots.join(stem))
}

/// Unpacks only `member` (a path in the package, `./usr/...`) of `deb` once into
/// `root`; returns the file. For packages too big to unpack whole (the kernel's -dbg).
pub fn unpack_member(deb: &Path, member: &str, root: &Path) -> anyhow::Result<PathBuf> {
    let file = root.join(member.trim_start_matches("./"));
    let _unpack = crate::lock::exclusive(&crate::lock::beside(root), "an unpack")?;
    if file.is_file() {
        return Ok(file);
    }
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let cmd = format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' '{member}'",
        deb.display(),
        root.display()
    );
    run_bounded(
        Command::new("sh").args(["-c", &cmd]),
        Duration::from_secs(600),
    )?;
    if !file.is_file() {
        bail!("{} has no {member}", deb.display());
    }
    Ok(file)
}

/// A control field of a `.deb` (`Version`, `Depends`, `Source`, ...).
pub fn deb_field(deb: &Path, field: &str) -> anyhow::Result<String> {
    Ok(
        output(Command::new("dpkg-deb").arg("-f").arg(deb).arg(field))?
            .trim()
            .to_owned(),
    )
}

/// The package names a `Depends` field lists (the first of each alternative).
pub fn depends_names(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .filter_map(|alt| alt.split('|').next())
        .filter_map(|d| d.split_whitespace().next())
        .map(|name| name.split(':').next().unwrap_or(name).to_owned())
        .collect()
}

fn parse_candidate(text: &str, pkg: &str) -> Option<String> {
    let header = format!("{pkg}:");
    text.lines()
        .skip_while(|l| l.trim_end() != header)
        .skip(1)
        .take_while(|l| l.starts_with(char::is_whitespace))
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| *v != "(none)")
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_cache_is_in_the_checkout_given() {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let cmd = Apt::host(root.path()).command("apt-cache");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let cache = root.path().join("target/apt/host-cache");
        assert_eq!(
            args,
            [
                "-o".to_owned(),
                format!("Dir::Cache::pkgcache={}/pkgcache.bin", cache.display()),
                "-o".to_owned(),
                format!(
                    "Dir::Cache::srcpkgcache={}/srcpkgcache.bin",
                    cache.display()
                ),
            ]
        );
        assert!(cache.is_dir());
    }

    #[test]
    fn candidate_from_policy() {
        let text = "\
linux-headers-6.1.0-56-cloud-amd64:
  Installed: (none)
  Candidate: 6.1.158-1
  Version table:
linux-source-6.1:
  Installed: 6.1.158-1
  Candidate: (none)
";
        assert_eq!(
            parse_candidate(text, "linux-headers-6.1.0-56-cloud-amd64").as_deref(),
            Some("6.1.158-1")
        );
        assert_eq!(parse_candidate(text, "linux-source-6.1"), None);
        assert_eq!(parse_candidate(text, "absent"), None);
    }

    #[test]
    fn names_from_depends() {
        assert_eq!(
            depends_names(
                "linux-base, linux-headers-6.12.117+deb12-common (= 6.12.117-1~deb12u1), \
                 linux-image-x | linux-image-y, libc6:amd64 (>= 2.34)"
            ),
            [
                "linux-base",
                "linux-headers-6.12.117+deb12-common",
                "linux-image-x",
                "libc6"
            ]
        );
    }
}
