//! Private apt configurations for packages of another Debian release, kept entirely
//! under `target/apt/<name>/`: their own sources, package lists, cache and an empty
//! dpkg status, so neither the machine's apt sources nor its installed packages are
//! read or changed. Used only for look-ups and downloads (`APT_CONFIG` on those calls).

use std::{fs, path::Path};

use anyhow::{Context as _, ensure};

use super::Apt;
use crate::files::write;

/// The keyring that signs Debian's archives, bullseye's included (debian-archive-keyring).
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Debian's mirror and its security archive.
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
const DEBIAN_SECURITY: &str = "http://deb.debian.org/debian-security";

impl Apt {
    /// Debian 11 (bullseye) and its security updates, `main` only: where the 5.10
    /// kernel, its headers and its source come from.
    pub fn bullseye(root: &Path) -> anyhow::Result<Self> {
        Self::private(
            &root.join("target/apt/bullseye"),
            &[
                (DEBIAN_MIRROR, "bullseye"),
                (DEBIAN_SECURITY, "bullseye-security"),
            ],
        )
    }

    /// A private configuration in `dir` for the `(mirror, suite)` pairs, written (or
    /// rewritten, when it differs) on every call; its lists start empty and are filled
    /// by the first look-up that finds nothing.
    fn private(dir: &Path, suites: &[(&str, &str)]) -> anyhow::Result<Self> {
        ensure!(
            Path::new(DEBIAN_KEYRING).is_file(),
            "{DEBIAN_KEYRING} is missing: install debian-archive-keyring \
             (apt-get install debian-archive-keyring)"
        );
        let dir_str = dir.to_str().context("the target directory is not UTF-8")?;
        ensure!(
            !dir_str.contains(['"', ';', '\n']),
            "apt cannot use {dir_str}: the path contains a quote, ';' or a newline"
        );
        for sub in [
            "lists/partial",
            "cache/archives/partial",
            "sources.list.d",
            "preferences.d",
        ] {
            let path = dir.join(sub);
            fs::create_dir_all(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
        }
        let status = dir.join("status");
        if !status.is_file() {
            write(&status, "")?;
        }
        write_if_changed(&dir.join("sources.list"), &sources_list(suites))?;
        let config = dir.join("apt.conf");
        write_if_changed(&config, &apt_conf(dir_str))?;
        Ok(Self {
            config: Some(config),
            binary_cache: dir.join("binary-cache"),
        })
    }
}

/// `sources.list` lines for the `(mirror, suite)` pairs, `main` only, signed by
/// Debian's archive keyring.
fn sources_list(suites: &[(&str, &str)]) -> String {
    suites
        .iter()
        .map(|(mirror, suite)| format!("deb [signed-by={DEBIAN_KEYRING}] {mirror} {suite} main\n"))
        .collect()
}

/// The configuration file: every directory apt reads or writes, except
/// `/etc/apt/apt.conf.d` (proxies and such still apply), points into `dir`.
fn apt_conf(dir: &str) -> String {
    [
        ("Dir::Etc::sourcelist", "sources.list"),
        ("Dir::Etc::sourceparts", "sources.list.d"),
        ("Dir::Etc::preferences", "preferences"),
        ("Dir::Etc::preferencesparts", "preferences.d"),
        ("Dir::State", ""),
        ("Dir::State::Lists", "lists"),
        ("Dir::State::status", "status"),
        ("Dir::Cache", "cache"),
    ]
    .iter()
    .map(|(key, rel)| {
        let path = if rel.is_empty() {
            dir.to_owned()
        } else {
            format!("{dir}/{rel}")
        };
        format!("{key} \"{path}\";\n")
    })
    .chain(std::iter::once("Acquire::Languages \"none\";\n".to_owned()))
    .collect()
}

fn write_if_changed(path: &Path, text: &str) -> anyhow::Result<()> {
    if fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_main_only_and_signed() {
        assert_eq!(
            sources_list(&[
                (DEBIAN_MIRROR, "bullseye"),
                (DEBIAN_SECURITY, "bullseye-security")
            ]),
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
             http://deb.debian.org/debian bullseye main\n\
             deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
             http://deb.debian.org/debian-security bullseye-security main\n"
        );
    }

    #[test]
    fn config_keeps_everything_in_its_directory() {
        let conf = apt_conf("/w/target/apt/bullseye");
        for line in conf.lines().filter(|l| l.starts_with("Dir::")) {
            assert!(line.contains("\"/w/target/apt/bullseye"), "{line}");
        }
        assert!(conf.contains("Dir::Etc::sourcelist \"/w/target/apt/bullseye/sources.list\";\n"));
        assert!(conf.contains("Dir::State::status \"/w/target/apt/bullseye/status\";\n"));
        assert!(!conf.contains("/etc/apt"));
    }

    #[test]
    fn bullseye_writes_its_files_under_target() {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let apt = Apt::bullseye(root.path()).unwrap_or_else(|e| panic!("{e:#}"));
        let dir = root.path().join("target/apt/bullseye");
        assert_eq!(apt.config.as_deref(), Some(dir.join("apt.conf").as_path()));
        assert!(!apt.is_host());
        for file in ["apt.conf", "sources.list", "status"] {
            assert!(dir.join(file).is_file(), "{file}");
        }
        assert!(dir.join("lists/partial").is_dir());
        // A second call keeps the lists and rewrites nothing.
        let again = Apt::bullseye(root.path()).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(again, apt);
    }
}
