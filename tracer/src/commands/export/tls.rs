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
