//! The TLS half of `--web-config`: a rustls server configuration (ring provider) made
//! from `tls_server_config`. The certificate, key and CA files are read here, so each
//! new configuration picks up rotated files; a key that is not the certificate's is
//! refused (rustls checks the pair when the configuration is built).

use std::{path::Path, sync::Arc};

use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    SupportedProtocolVersion,
    client::danger::HandshakeSignatureValid,
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject as _};

use super::web_config::{ClientAuth, TlsSettings, TlsVersion};

/// The server configuration `settings` describe, with its files read now. The error is
/// one line naming the file and the field, and saying what to do.
pub fn server_config(settings: &TlsSettings) -> Result<Arc<ServerConfig>, String> {
    #[expect(
        deprecated,
        reason = "ring has no post-quantum key exchange; aws-lc-rs, which has, needs cmake \
                  and a long build (see the workspace Cargo.toml)"
    )]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&settings.cert_file, "cert_file", "the server's certificate")?;
    let key = private_key(&settings.key_file)?;
    let verifier = client_verifier(settings, &provider)?;
    let versions: Vec<&'static SupportedProtocolVersion> = [
        (TlsVersion::Tls12, &rustls::version::TLS12),
        (TlsVersion::Tls13, &rustls::version::TLS13),
    ]
    .into_iter()
    .filter(|(v, _)| (settings.min_version..=settings.max_version).contains(v))
    .map(|(_, version)| version)
    .collect();
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|e| format!("tls_server_config: the TLS versions asked for cannot be used: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "{} (tls_server_config.key_file) is not the private key of {} \
                 (tls_server_config.cert_file): give the key the certificate was made for",
                settings.key_file.display(),
                settings.cert_file.display()
            ),
            // webpki's error has no other way out of rustls' `Other`.
            other if format!("{other:?}").contains("UnsupportedCertVersion") => format!(
                "{} (tls_server_config.cert_file) is an X.509 v1 certificate, which rustls \
                 refuses: make it with extensions (openssl x509 -extfile with a subjectAltName)",
                settings.cert_file.display()
            ),
            other => format!(
                "{} and {} (tls_server_config.cert_file and key_file) cannot be used: {other}",
                settings.cert_file.display(),
                settings.key_file.display()
            ),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads `path`, a file the configuration names in `field`.
fn read(path: &Path, field: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        format!(
            "cannot read {} (tls_server_config.{field}): {e}: check the path and that \
             kvmtrace may read it",
            path.display()
        )
    })
}

/// The certificates in the PEM file `path` (named in `field`): at least one.
fn certificates(
    path: &Path,
    field: &str,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path, field)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "{} (tls_server_config.{field}): not PEM: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{} (tls_server_config.{field}) holds no certificate ('-----BEGIN CERTIFICATE-----'): \
             give {what} in PEM",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key in the PEM file `path`.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path, "key_file")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => format!(
            "{} (tls_server_config.key_file) holds no private key (PEM 'PRIVATE KEY', \
             'RSA PRIVATE KEY' or 'EC PRIVATE KEY'): give the server's key",
            path.display()
        ),
        other => format!(
            "{} (tls_server_config.key_file): not PEM: {other}",
            path.display()
        ),
    })
}

/// How client certificates are asked for and checked.
fn client_verifier(
    settings: &TlsSettings,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let auth = settings.client_auth;
    match (auth, &settings.client_ca_file) {
        (ClientAuth::None, _) => Ok(WebPkiClientVerifier::no_client_auth()),
        (ClientAuth::Request | ClientAuth::RequireAny, _) => Ok(Arc::new(AnyClientCert {
            mandatory: auth.mandatory(),
            algorithms: provider.signature_verification_algorithms,
        })),
        (ClientAuth::VerifyIfGiven | ClientAuth::RequireAndVerify, Some(ca_file)) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(
                ca_file,
                "client_ca_file",
                "the CA of the clients' certificates",
            )? {
                roots.add(cert).map_err(|e| {
                    format!(
                        "{} (tls_server_config.client_ca_file) holds a certificate that is \
                         not a usable CA: {e}",
                        ca_file.display()
                    )
                })?;
            }
            let builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider));
            let builder = if auth.mandatory() {
                builder
            } else {
                builder.allow_unauthenticated()
            };
            builder.build().map_err(|e| {
                format!(
                    "{} (tls_server_config.client_ca_file): {e}",
                    ca_file.display()
                )
            })
        }
        // web_config refuses a verifying client_auth_type without a CA.
        (ClientAuth::VerifyIfGiven | ClientAuth::RequireAndVerify, None) => Err(
            "tls_server_config.client_auth_type verifies client certificates: give client_ca_file"
                .to_owned(),
        ),
    }
}

/// `RequestClientCert` and `RequireAnyClientCert`: a client certificate is asked for
/// (and with `mandatory`, required) but not checked against any CA, as Go does for
/// these types. The client must still prove it holds the certificate's key.
#[derive(Debug)]
struct AnyClientCert {
    mandatory: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCert {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Parsed only: no CA to check it against.
        ParsedCertificate::try_from(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Runs openssl in `dir`, or fails saying how to get it.
    fn openssl(dir: &Path, args: &str) {
        let out = Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run openssl ({e}): apt-get install openssl"));
        assert!(
            out.status.success(),
            "openssl {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A CA (ca.crt), a server certificate it signed (server.crt, server.key) and a
    /// second key (other.key).
    fn pki() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let d = dir.path();
        let key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        openssl(
            d,
            &format!("req -x509 {key} -keyout ca.key -out ca.crt -days 2 -subj /CN=ca"),
        );
        openssl(
            d,
            &format!("req {key} -keyout server.key -out server.csr -subj /CN=localhost"),
        );
        let sign = "x509 -req -CA ca.crt -CAkey ca.key -CAcreateserial -days 2";
        std::fs::write(d.join("san.ext"), "subjectAltName=DNS:localhost\n")
            .unwrap_or_else(|e| panic!("write: {e}"));
        openssl(
            d,
            &format!("{sign} -in server.csr -out server.crt -extfile san.ext"),
        );
        // Without extensions openssl makes an X.509 v1 certificate, which rustls refuses.
        openssl(d, &format!("{sign} -in server.csr -out v1.crt"));
        openssl(d, "genpkey -algorithm ed25519 -out other.key");
        dir
    }

    fn settings(dir: &Path, cert: &str, key: &str) -> TlsSettings {
        TlsSettings {
            cert_file: dir.join(cert),
            key_file: dir.join(key),
            client_auth: ClientAuth::None,
            client_ca_file: None,
            min_version: TlsVersion::Tls12,
            max_version: TlsVersion::Tls13,
        }
    }

    fn error(s: &TlsSettings) -> String {
        match server_config(s) {
            Ok(_) => panic!("accepted {s:?}"),
            Err(e) => {
                assert!(!e.contains('\n'), "not one line: {e}");
                e
            }
        }
    }

    #[test]
    fn every_client_auth_type_builds() {
        let dir = pki();
        for auth in [
            ClientAuth::None,
            ClientAuth::Request,
            ClientAuth::RequireAny,
            ClientAuth::VerifyIfGiven,
            ClientAuth::RequireAndVerify,
        ] {
            let s = TlsSettings {
                client_auth: auth,
                client_ca_file: auth.verifies().then(|| dir.path().join("ca.crt")),
                ..settings(dir.path(), "server.crt", "server.key")
            };
            let config = server_config(&s).unwrap_or_else(|e| panic!("{auth:?}: {e}"));
            assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
        }
    }

    #[test]
    fn a_missing_certificate_is_named() {
        let dir = pki();
        let e = error(&settings(dir.path(), "nope.crt", "server.key"));
        assert!(
            e.starts_with(&format!(
                "cannot read {} (tls_server_config.cert_file): No such file",
                dir.path().join("nope.crt").display()
            )),
            "{e}"
        );
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let dir = pki();
        let e = error(&settings(dir.path(), "server.crt", "other.key"));
        assert!(
            e.contains("other.key (tls_server_config.key_file) is not the private key of"),
            "{e}"
        );
        let e = error(&settings(dir.path(), "server.crt", "ca.key"));
        assert!(e.contains("is not the private key of"), "{e}");
    }

    #[test]
    fn files_without_the_pem_they_need_are_named() {
        let dir = pki();
        let e = error(&settings(dir.path(), "server.key", "server.key"));
        assert!(
            e.contains("server.key (tls_server_config.cert_file) holds no certificate"),
            "{e}"
        );
        let e = error(&settings(dir.path(), "server.crt", "server.crt"));
        assert!(
            e.contains("server.crt (tls_server_config.key_file) holds no private key"),
            "{e}"
        );
        let e = error(&TlsSettings {
            client_auth: ClientAuth::RequireAndVerify,
            client_ca_file: Some(dir.path().join("server.key")),
            ..settings(dir.path(), "server.crt", "server.key")
        });
        assert!(
            e.contains("(tls_server_config.client_ca_file) holds no certificate"),
            "{e}"
        );
    }

    #[test]
    fn a_v1_certificate_is_explained() {
        let dir = pki();
        let e = error(&settings(dir.path(), "v1.crt", "server.key"));
        assert!(
            e.contains("v1.crt (tls_server_config.cert_file) is an X.509 v1 certificate"),
            "{e}"
        );
    }
}
