//! `--scenario export` over TLS, as dist/ sets it up: the lab's own CA, the exporter's
//! certificate (for 127.0.0.1, where both L1's `curl` and the host's Prometheus reach
//! it), Prometheus's client certificate, and a random password with its bcrypt hash.
//! L1 serves with `--web-config` requiring both; every scrape shows both.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::files::write;

/// The user Prometheus and L1's `curl` log in as.
pub const USER: &str = "prometheus";

/// Where L1 finds the files of [`Pki`] (`/lab/tls/NAME`).
pub const L1_DIR: &str = "lab/tls";

/// The bcrypt cost of the lab's hash: the least the format allows is 4; 6 keeps the
/// first login short under TCG (later scrapes hit the exporter's cache).
const COST: u32 = 6;

/// The files, in one directory: `ca.crt`, `server.crt`/`.key`, `client.crt`/`.key`,
/// `password` and `web-config.yml` (the exporter's, with paths as L1 sees them).
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// Makes a new CA, certificates and password in `dir` (emptied first).
    pub fn make(dir: &Path) -> anyhow::Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write(
            &dir.join("server.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )?;
        write(
            &dir.join("client.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        )?;
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        openssl(
            dir,
            &["req", "-x509", "-keyout", "ca.key", "-out", "ca.crt"],
            &key,
            "/CN=kvmtrace lab CA",
        )?;
        for who in ["server", "client"] {
            let (k, csr) = (format!("{who}.key"), format!("{who}.csr"));
            openssl(
                dir,
                &["req", "-keyout", &k, "-out", &csr],
                &key,
                &format!("/CN=kvmtrace lab {who}"),
            )?;
            crate::exec::output(
                Command::new("openssl")
                    .args(["x509", "-req", "-in", &csr, "-CA", "ca.crt", "-CAkey"])
                    .args(["ca.key", "-CAcreateserial", "-days", "2", "-out"])
                    .arg(format!("{who}.crt"))
                    .args(["-extfile", &format!("{who}.ext")])
                    .current_dir(dir),
            )?;
        }
        let password = random_password()?;
        let hash = bcrypt::hash(&password, COST).context("cannot hash the lab's password")?;
        write(&dir.join("password"), &password)?;
        let at = |name: &str| format!("/{L1_DIR}/{name}");
        write(
            &dir.join("web-config.yml"),
            format!(
                "# Written by cargo xtask lab --scenario export.\n\
                 tls_server_config:\n  cert_file: {}\n  key_file: {}\n\
                 \x20 client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n\
                 \x20 min_version: TLS12\nbasic_auth_users:\n  {USER}: {hash}\n",
                at("server.crt"),
                at("server.key"),
                at("ca.crt")
            ),
        )?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The files L1 needs, as (name in [`L1_DIR`], path here).
    pub fn l1_files(&self) -> Vec<(String, PathBuf)> {
        [
            "ca.crt",
            "server.crt",
            "server.key",
            "client.crt",
            "client.key",
            "password",
            "web-config.yml",
        ]
        .into_iter()
        .map(|n| (format!("{L1_DIR}/{n}"), self.dir.join(n)))
        .collect()
    }

    /// Prometheus's scrape settings for it (YAML, indented for a scrape config).
    pub fn scrape_config(&self) -> String {
        let p = |n: &str| self.dir.join(n).display().to_string();
        format!(
            "    scheme: https\n    tls_config:\n      ca_file: {}\n      cert_file: {}\n\
             \x20     key_file: {}\n    basic_auth:\n      username: {USER}\n\
             \x20     password_file: {}\n",
            p("ca.crt"),
            p("client.crt"),
            p("client.key"),
            p("password")
        )
    }
}

/// `openssl ARGS KEY -days 2 -subj SUBJECT` in `dir`.
fn openssl(dir: &Path, args: &[&str], key: &[&str], subject: &str) -> anyhow::Result<()> {
    crate::exec::output(
        Command::new("openssl")
            .args(args)
            .args(key)
            .args(["-days", "2", "-subj", subject])
            .current_dir(dir),
    )?;
    Ok(())
}

/// 16 random bytes from the kernel, in hex.
fn random_password() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lab_pki_verifies_and_its_hash_is_the_password() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let pki = Pki::make(&dir.path().join("tls")).unwrap_or_else(|e| panic!("{e:#}"));
        for who in ["server", "client"] {
            let out = crate::exec::output(
                Command::new("openssl")
                    .args(["verify", "-CAfile", "ca.crt"])
                    .arg(format!("{who}.crt"))
                    .current_dir(&pki.dir),
            )
            .unwrap_or_else(|e| panic!("{e:#}"));
            assert!(out.contains(": OK"), "{out}");
        }
        let password =
            std::fs::read_to_string(pki.dir.join("password")).unwrap_or_else(|e| panic!("{e}"));
        let config = std::fs::read_to_string(pki.dir.join("web-config.yml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let hash = config
            .lines()
            .find_map(|l| l.trim().strip_prefix("prometheus: "))
            .unwrap_or_else(|| panic!("no hash in {config}"));
        assert_eq!(bcrypt::verify(&password, hash).ok(), Some(true));
        assert!(
            config.contains("cert_file: /lab/tls/server.crt"),
            "{config}"
        );
        assert_eq!(pki.l1_files().len(), 7);
        assert!(pki.scrape_config().contains("scheme: https"));
    }
}
