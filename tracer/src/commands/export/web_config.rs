//! The web configuration file of `kvmtrace export --web-config`: the Prometheus exporter
//! toolkit's format (`--web.config.file` of node_exporter and the other official
//! exporters), so an operator reuses the file they have.
//!
//! This module only parses and checks the file's text; [`super::tls`] reads the
//! certificates it names, and [`super::site`] re-reads it. Every field of the toolkit's
//! format is known here: the ones kvmtrace does not implement are refused by name (never
//! ignored), and so is any key the format does not have.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use hyper::header::{HeaderName, HeaderValue};
use serde::{Deserialize, de::IgnoredAny};

/// A checked web configuration.
#[derive(Debug, Default)]
pub struct WebConfig {
    /// Serve HTTPS with this; `None`: plain HTTP.
    pub tls: Option<TlsSettings>,
    /// Basic auth: each user's bcrypt hash (checked to be one). Empty: no basic auth.
    pub users: BTreeMap<String, String>,
    /// Headers added to every response.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// `tls_server_config`, with its paths made absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_auth: ClientAuth,
    pub client_ca_file: Option<PathBuf>,
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
}

/// `client_auth_type`: Go's `tls.ClientAuthType`, which the toolkit names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `NoClientCert`: no client certificate is asked for.
    None,
    /// `RequestClientCert`: asked for, neither required nor verified.
    Request,
    /// `RequireAnyClientCert` (or its old name `RequireClientCert`): required, not
    /// verified.
    RequireAny,
    /// `VerifyClientCertIfGiven`: not required, verified against `client_ca_file` when
    /// given.
    VerifyIfGiven,
    /// `RequireAndVerifyClientCert`: required and verified against `client_ca_file`.
    RequireAndVerify,
}

impl ClientAuth {
    /// Whether a certificate the client sends is checked against `client_ca_file`.
    pub fn verifies(self) -> bool {
        matches!(self, Self::VerifyIfGiven | Self::RequireAndVerify)
    }

    /// Whether a client without a certificate is refused.
    pub fn mandatory(self) -> bool {
        matches!(self, Self::RequireAny | Self::RequireAndVerify)
    }
}

/// The TLS versions rustls speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// The file as written; every field of the toolkit's format, so that the ones kvmtrace
/// does not implement can be named when refused.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    tls_server_config: Option<RawTls>,
    http_server_config: Option<RawHttp>,
    basic_auth_users: Option<BTreeMap<String, Option<String>>>,
    rate_limit: Option<IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<String>,
    key_file: Option<String>,
    client_auth_type: Option<String>,
    client_ca_file: Option<String>,
    min_version: Option<String>,
    max_version: Option<String>,
    cert: Option<IgnoredAny>,
    key: Option<IgnoredAny>,
    client_ca: Option<IgnoredAny>,
    client_allowed_sans: Option<IgnoredAny>,
    cipher_suites: Option<IgnoredAny>,
    prefer_server_cipher_suites: Option<IgnoredAny>,
    curve_preferences: Option<IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    http2: Option<bool>,
    headers: Option<BTreeMap<String, Option<String>>>,
}

/// The headers the toolkit lets a file set, with the values it accepts (`None`: any).
/// The names are matched exactly, as the toolkit does.
const HEADERS: &[(&str, Option<&[&str]>)] = &[
    ("Strict-Transport-Security", None),
    ("X-Content-Type-Options", Some(&["nosniff"])),
    ("X-Frame-Options", Some(&["deny", "sameorigin"])),
    ("X-XSS-Protection", None),
    ("Content-Security-Policy", None),
];

/// Why a field the toolkit has is refused, and what to do instead.
fn unsupported(field: &str, why: &str) -> String {
    format!("{field} is not supported by kvmtrace: {why}")
}

impl WebConfig {
    /// Parses and checks `text`, the file's contents; relative paths are taken from
    /// `dir`, the file's directory, as the toolkit does. The error is one line (without
    /// the file's name) that says what is wrong and what to do.
    pub fn parse(text: &str, dir: &Path) -> Result<Self, String> {
        // An empty file (or one with only comments) is the toolkit's "nothing set".
        let raw: Option<RawConfig> = yaml_serde::from_str(text).map_err(|e| {
            let msg = e.to_string().replace('\n', " ");
            format!("not a web configuration: {msg}")
        })?;
        let raw = raw.unwrap_or_default();
        if raw.rate_limit.is_some() {
            return Err(unsupported(
                "rate_limit",
                "remove it (--max-connections and --header-timeout bound what a client may take)",
            ));
        }
        let tls = raw
            .tls_server_config
            .map(|t| tls_settings(t, dir))
            .transpose()?
            .flatten();
        let http = raw.http_server_config.unwrap_or_default();
        if http.http2 == Some(true) {
            return Err(unsupported(
                "http_server_config.http2: true",
                "kvmtrace serves HTTP/1.1 only: remove http2 or set it to false",
            ));
        }
        let headers = http
            .headers
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(name, value)| value.map(|v| (name, v)))
            // Unset if blank, as the toolkit does.
            .filter(|(_, value)| !value.is_empty())
            .map(|(name, value)| header(&name, &value))
            .collect::<Result<_, _>>()?;
        let users = raw
            .basic_auth_users
            .unwrap_or_default()
            .into_iter()
            .map(|(user, hash)| user_hash(user, hash))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            tls,
            users,
            headers,
        })
    }

    /// The files this configuration names (certificates, key, CA), for the re-reader
    /// to watch.
    pub fn files(&self) -> Vec<&Path> {
        self.tls.iter().flat_map(TlsSettings::files).collect()
    }
}

impl TlsSettings {
    /// The files these settings name.
    pub fn files(&self) -> Vec<&Path> {
        let mut files = vec![self.cert_file.as_path(), self.key_file.as_path()];
        files.extend(self.client_ca_file.as_deref());
        files
    }
}

/// `tls_server_config`; `None` when it sets nothing.
fn tls_settings(raw: RawTls, dir: &Path) -> Result<Option<TlsSettings>, String> {
    let inline = "give the PEM in a file and name it with the _file field instead";
    for (field, set, why) in [
        ("cert", raw.cert.is_some(), inline),
        ("key", raw.key.is_some(), inline),
        ("client_ca", raw.client_ca.is_some(), inline),
        (
            "client_allowed_sans",
            raw.client_allowed_sans.is_some(),
            "remove it (client certificates are checked against client_ca_file only: give \
             the clients a CA of their own)",
        ),
        (
            "cipher_suites",
            raw.cipher_suites.is_some(),
            "remove it (rustls offers only its own safe cipher suites)",
        ),
        (
            "prefer_server_cipher_suites",
            raw.prefer_server_cipher_suites.is_some(),
            "remove it (rustls offers only its own safe cipher suites)",
        ),
        (
            "curve_preferences",
            raw.curve_preferences.is_some(),
            "remove it (rustls offers only its own safe key exchange groups)",
        ),
    ] {
        if set {
            return Err(unsupported(&format!("tls_server_config.{field}"), why));
        }
    }
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let cert_file = nonempty(raw.cert_file);
    let key_file = nonempty(raw.key_file);
    let client_auth_type = nonempty(raw.client_auth_type);
    let client_ca_file = nonempty(raw.client_ca_file);
    let min_version = nonempty(raw.min_version);
    let max_version = nonempty(raw.max_version);
    if cert_file.is_none()
        && key_file.is_none()
        && client_auth_type.is_none()
        && client_ca_file.is_none()
        && min_version.is_none()
        && max_version.is_none()
    {
        return Ok(None);
    }
    let (Some(cert_file), Some(key_file)) = (cert_file, key_file) else {
        return Err(
            "tls_server_config needs both cert_file and key_file: give the server's \
             certificate and its private key (PEM files)"
                .to_owned(),
        );
    };
    let client_auth = match client_auth_type.as_deref() {
        None | Some("NoClientCert") => ClientAuth::None,
        Some("RequestClientCert") => ClientAuth::Request,
        Some("RequireAnyClientCert" | "RequireClientCert") => ClientAuth::RequireAny,
        Some("VerifyClientCertIfGiven") => ClientAuth::VerifyIfGiven,
        Some("RequireAndVerifyClientCert") => ClientAuth::RequireAndVerify,
        Some(other) => {
            return Err(format!(
                "tls_server_config.client_auth_type '{other}' is not one of NoClientCert, \
                 RequestClientCert, RequireAnyClientCert, VerifyClientCertIfGiven, \
                 RequireAndVerifyClientCert"
            ));
        }
    };
    if client_auth.verifies() && client_ca_file.is_none() {
        return Err(format!(
            "tls_server_config.client_auth_type {} verifies client certificates: give \
             client_ca_file, the CA that signs them",
            client_auth_type.as_deref().unwrap_or_default()
        ));
    }
    if client_ca_file.is_some() && !client_auth.verifies() {
        return Err(
            "tls_server_config.client_ca_file is given but client_auth_type does not verify \
             client certificates: set client_auth_type to RequireAndVerifyClientCert"
                .to_owned(),
        );
    }
    let min_version = tls_version("min_version", min_version.as_deref(), TlsVersion::Tls12)?;
    let max_version = tls_version("max_version", max_version.as_deref(), TlsVersion::Tls13)?;
    if min_version > max_version {
        return Err(
            "tls_server_config.min_version is above max_version: give TLS12 and TLS13, or \
             one of them for both"
                .to_owned(),
        );
    }
    Ok(Some(TlsSettings {
        cert_file: dir.join(cert_file),
        key_file: dir.join(key_file),
        client_auth,
        client_ca_file: client_ca_file.map(|f| dir.join(f)),
        min_version,
        max_version,
    }))
}

fn tls_version(field: &str, text: Option<&str>, default: TlsVersion) -> Result<TlsVersion, String> {
    match text {
        None => Ok(default),
        Some("TLS12") => Ok(TlsVersion::Tls12),
        Some("TLS13") => Ok(TlsVersion::Tls13),
        Some("TLS10" | "TLS11") => Err(format!(
            "tls_server_config.{field} {}: TLS 1.0 and 1.1 are not supported by kvmtrace \
             (rustls speaks TLS 1.2 and 1.3): give TLS12 or TLS13",
            text.unwrap_or_default()
        )),
        Some(other) => Err(format!(
            "tls_server_config.{field} '{other}' is not a TLS version: give TLS12 or TLS13"
        )),
    }
}

/// One `http_server_config.headers` entry.
fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let allowed = HEADERS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
        let names: Vec<&str> = HEADERS.iter().map(|(n, _)| *n).collect();
        format!(
            "http_server_config.headers: {name} cannot be set: the toolkit allows only {}",
            names.join(", ")
        )
    })?;
    if let Some(values) = allowed.1.filter(|values| !values.contains(&value)) {
        return Err(format!(
            "http_server_config.headers: {name} '{value}' is not allowed: give {}",
            values.join(" or ")
        ));
    }
    let header_name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|e| format!("http_server_config.headers: {name}: {e}"))?;
    let header_value = HeaderValue::from_str(value).map_err(|_| {
        format!("http_server_config.headers: {name}: the value holds a character a header cannot")
    })?;
    Ok((header_name, header_value))
}

/// One `basic_auth_users` entry: the hash must be bcrypt's, with a cost bcrypt takes.
fn user_hash(user: String, hash: Option<String>) -> Result<(String, String), String> {
    let what = format!("basic_auth_users: user '{user}'");
    if user.is_empty() || user.contains(':') {
        return Err(format!(
            "{what}: a basic-auth user name cannot be empty or hold ':': rename it"
        ));
    }
    let hint = "give a bcrypt hash, e.g. from `htpasswd -nBC 10 \"\" | tr -d ':\\n'`";
    let hash = hash
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{what} has no password hash: {hint}"))?;
    let parts: bcrypt::HashParts = hash
        .parse()
        .map_err(|e: bcrypt::BcryptError| format!("{what}: not a bcrypt hash ({e}): {hint}"))?;
    let cost = parts.get_cost();
    if !(4..=31).contains(&cost) {
        return Err(format!(
            "{what}: the bcrypt cost {cost} is outside 4 to 31: {hint}"
        ));
    }
    Ok((user, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed bcrypt hash, of cost 4.
    const HASH: &str = "$2b$04$9b8Qs8EX8UMdMIVyC/rXVOSbGqgtQ0H6iFOXLNuxbgqVJ3LwtjX0S";

    fn parse(text: &str) -> Result<WebConfig, String> {
        WebConfig::parse(text, Path::new("/etc/kvmtrace"))
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(c) => panic!("accepted {text:?}: {c:?}"),
            Err(e) => {
                assert!(!e.contains('\n'), "not one line: {e}");
                e
            }
        }
    }

    #[test]
    fn an_empty_file_sets_nothing() {
        for text in ["", "# nothing\n", "---\n"] {
            let c = parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(c.tls.is_none() && c.users.is_empty() && c.headers.is_empty());
        }
    }

    #[test]
    fn a_full_file_parses_with_paths_from_its_directory() {
        let c = parse(&format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: /keys/server.key\n  \
             client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n  \
             min_version: TLS13\n\
             http_server_config:\n  http2: false\n  headers:\n    X-Frame-Options: deny\n    \
             Strict-Transport-Security: max-age=31536000\n    X-XSS-Protection: ''\n\
             basic_auth_users:\n  prometheus: '{HASH}'\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let tls = c.tls.unwrap_or_else(|| panic!("no tls"));
        assert_eq!(
            tls,
            TlsSettings {
                cert_file: "/etc/kvmtrace/server.crt".into(),
                key_file: "/keys/server.key".into(),
                client_auth: ClientAuth::RequireAndVerify,
                client_ca_file: Some("/etc/kvmtrace/ca.crt".into()),
                min_version: TlsVersion::Tls13,
                max_version: TlsVersion::Tls13,
            }
        );
        assert_eq!(c.users.get("prometheus").map(String::as_str), Some(HASH));
        let names: Vec<&str> = c.headers.iter().map(|(n, _)| n.as_str()).collect();
        // The blank header is left unset.
        assert_eq!(names, ["strict-transport-security", "x-frame-options"]);
    }

    #[test]
    fn dist_web_config_parses() {
        let c = parse(include_str!("../../../../dist/web-config.yml"))
            .unwrap_or_else(|e| panic!("dist/web-config.yml: {e}"));
        let tls = c.tls.unwrap_or_else(|| panic!("no tls"));
        assert_eq!(tls.client_auth, ClientAuth::RequireAndVerify);
        assert_eq!(tls.key_file, Path::new("/etc/kvmtrace/server.key"));
        assert_eq!(c.users.len(), 1);
        assert_eq!(c.headers.len(), 2);
    }

    #[test]
    fn every_client_auth_type_is_known() {
        for (name, auth, ca) in [
            ("NoClientCert", ClientAuth::None, false),
            ("RequestClientCert", ClientAuth::Request, false),
            ("RequireAnyClientCert", ClientAuth::RequireAny, false),
            ("RequireClientCert", ClientAuth::RequireAny, false),
            ("VerifyClientCertIfGiven", ClientAuth::VerifyIfGiven, true),
            (
                "RequireAndVerifyClientCert",
                ClientAuth::RequireAndVerify,
                true,
            ),
        ] {
            let ca = if ca { "  client_ca_file: ca.crt\n" } else { "" };
            let c = parse(&format!(
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: {name}\n{ca}"
            ))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(c.tls.map(|t| t.client_auth), Some(auth), "{name}");
        }
    }

    #[test]
    fn unsupported_fields_are_named() {
        for (text, field) in [
            (
                "tls_server_config:\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
                "tls_server_config.cipher_suites",
            ),
            (
                "tls_server_config:\n  curve_preferences: [X25519]\n",
                "tls_server_config.curve_preferences",
            ),
            (
                "tls_server_config:\n  prefer_server_cipher_suites: true\n",
                "tls_server_config.prefer_server_cipher_suites",
            ),
            (
                "tls_server_config:\n  client_allowed_sans: [a]\n",
                "tls_server_config.client_allowed_sans",
            ),
            (
                "tls_server_config:\n  cert: |\n    PEM\n",
                "tls_server_config.cert",
            ),
            ("tls_server_config:\n  key: PEM\n", "tls_server_config.key"),
            (
                "tls_server_config:\n  client_ca: PEM\n",
                "tls_server_config.client_ca",
            ),
            (
                "http_server_config:\n  http2: true\n",
                "http_server_config.http2",
            ),
            ("rate_limit:\n  interval: 1s\n  burst: 5\n", "rate_limit"),
        ] {
            let e = error(text);
            assert!(e.starts_with(field), "{e}");
            assert!(e.contains("not supported by kvmtrace"), "{e}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        for (text, key) in [
            ("tls_config:\n  cert_file: a\n", "tls_config"),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  ca_file: c\n",
                "ca_file",
            ),
            (
                "http_server_config:\n  header:\n    X-Frame-Options: deny\n",
                "header",
            ),
        ] {
            let e = error(text);
            assert!(e.contains(&format!("unknown field `{key}`")), "{e}");
        }
    }

    #[test]
    fn tls_needs_a_certificate_and_a_key() {
        for text in [
            "tls_server_config:\n  cert_file: a\n",
            "tls_server_config:\n  key_file: a\n",
            "tls_server_config:\n  min_version: TLS13\n",
            "tls_server_config:\n  client_auth_type: RequireAnyClientCert\n",
        ] {
            assert!(
                error(text).contains("needs both cert_file and key_file"),
                "{text}"
            );
        }
    }

    #[test]
    fn client_certificates_need_a_ca_to_be_verified() {
        let tls = "tls_server_config:\n  cert_file: a\n  key_file: b\n";
        let e = error(&format!(
            "{tls}  client_auth_type: RequireAndVerifyClientCert\n"
        ));
        assert!(e.contains("give client_ca_file"), "{e}");
        let e = error(&format!("{tls}  client_ca_file: ca.crt\n"));
        assert!(
            e.contains("set client_auth_type to RequireAndVerifyClientCert"),
            "{e}"
        );
        let e = error(&format!("{tls}  client_auth_type: Always\n"));
        assert!(e.contains("'Always' is not one of"), "{e}");
    }

    #[test]
    fn tls_versions_are_those_rustls_speaks() {
        let tls = "tls_server_config:\n  cert_file: a\n  key_file: b\n";
        assert!(error(&format!("{tls}  min_version: TLS11\n")).contains("TLS 1.0 and 1.1"));
        assert!(error(&format!("{tls}  max_version: TLS10\n")).contains("TLS 1.0 and 1.1"));
        assert!(error(&format!("{tls}  min_version: SSL3\n")).contains("not a TLS version"));
        assert!(
            error(&format!(
                "{tls}  min_version: TLS13\n  max_version: TLS12\n"
            ))
            .contains("above max_version")
        );
        let c = parse(&format!("{tls}  max_version: TLS12\n")).unwrap_or_else(|e| panic!("{e}"));
        let t = c.tls.unwrap_or_else(|| panic!("no tls"));
        assert_eq!(
            (t.min_version, t.max_version),
            (TlsVersion::Tls12, TlsVersion::Tls12)
        );
    }

    #[test]
    fn bad_hashes_are_refused_at_load() {
        for (hash, why) in [
            ("secret", "not a bcrypt hash"),
            ("''", "has no password hash"),
            ("", "has no password hash"),
            ("$1$abcdefgh$abcdefghijklmnopqrstuv", "not a bcrypt hash"),
            (
                "$2b$04$9b8Qs8EX8UMdMIVyC/rXVOSbGqgtQ0H6iFOXLNuxbgqVJ3LwtjX0",
                "not a bcrypt hash",
            ),
            (
                "$2b$03$9b8Qs8EX8UMdMIVyC/rXVOSbGqgtQ0H6iFOXLNuxbgqVJ3LwtjX0S",
                "outside 4 to 31",
            ),
            (
                "$2b$32$9b8Qs8EX8UMdMIVyC/rXVOSbGqgtQ0H6iFOXLNuxbgqVJ3LwtjX0S",
                "outside 4 to 31",
            ),
        ] {
            let quoted = if hash.starts_with('$') {
                format!("'{hash}'")
            } else {
                hash.to_owned()
            };
            let e = error(&format!("basic_auth_users:\n  prometheus: {quoted}\n"));
            assert!(
                e.contains("user 'prometheus'") && e.contains(why),
                "{hash}: {e}"
            );
            assert!(e.contains("htpasswd -nBC 10"), "{e}");
        }
        let e = error(&format!("basic_auth_users:\n  'a:b': '{HASH}'\n"));
        assert!(e.contains("cannot be empty or hold ':'"), "{e}");
    }

    #[test]
    fn only_the_toolkits_headers_with_their_values() {
        let e = error("http_server_config:\n  headers:\n    Server: kvmtrace\n");
        assert!(e.contains("Server cannot be set"), "{e}");
        // Names are exact, as the toolkit matches them.
        let e = error("http_server_config:\n  headers:\n    x-frame-options: deny\n");
        assert!(e.contains("x-frame-options cannot be set"), "{e}");
        let e = error("http_server_config:\n  headers:\n    X-Frame-Options: allow\n");
        assert!(
            e.contains("'allow' is not allowed: give deny or sameorigin"),
            "{e}"
        );
        let e = error("http_server_config:\n  headers:\n    X-Content-Type-Options: sniff\n");
        assert!(e.contains("give nosniff"), "{e}");
    }

    #[test]
    fn yaml_that_is_not_a_web_config_is_one_line() {
        for text in [
            "tls_server_config: [a, b]\n",
            "- a\n- b\n",
            "a: [\n",
            "basic_auth_users: 3\n",
        ] {
            assert!(
                error(text).starts_with("not a web configuration: "),
                "{text}"
            );
        }
    }
}
