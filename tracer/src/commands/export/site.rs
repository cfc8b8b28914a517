//! The web configuration in force: read at start (a failure stops kvmtrace with one
//! line), then read again when the file or a file it names has changed (looked at on
//! each new connection: a `stat` of each, cheap) or on SIGHUP, so certificates rotate
//! without a restart. A read that fails logs one line and leaves the last good
//! configuration serving; the same bad files are not read again until they change.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    rc::Rc,
    sync::Arc,
};

use hyper::header::{HeaderName, HeaderValue};
use tokio_rustls::TlsAcceptor;

use super::{
    auth::Users,
    tls,
    web_config::{ClientAuth, WebConfig},
};

/// One configuration, as connections use it: a connection keeps the one it started
/// with.
pub struct Site {
    /// HTTPS with this; `None`: plain HTTP.
    pub tls: Option<TlsAcceptor>,
    pub users: Users,
    /// Added to every response.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// What it serves, for the log: `https (basic auth)`.
    pub description: String,
}

impl Site {
    /// Plain HTTP, no auth: no `--web-config`.
    fn open() -> Self {
        Self {
            tls: None,
            users: Arc::default(),
            headers: Vec::new(),
            description: "http".to_owned(),
        }
    }
}

/// What a configuration serves, for the log: `https (client certificates required and
/// verified, basic auth)`.
fn describe(config: &WebConfig) -> String {
    let mut what = Vec::new();
    match config.tls.as_ref().map(|t| t.client_auth) {
        None | Some(ClientAuth::None) => {}
        Some(ClientAuth::Request) => what.push("client certificates asked for, not verified"),
        Some(ClientAuth::RequireAny) => what.push("client certificates required, not verified"),
        Some(ClientAuth::VerifyIfGiven) => what.push("client certificates verified if given"),
        Some(ClientAuth::RequireAndVerify) => {
            what.push("client certificates required and verified");
        }
    }
    if !config.users.is_empty() {
        what.push("basic auth");
    }
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    if what.is_empty() {
        scheme.to_owned()
    } else {
        format!("{scheme} ({})", what.join(", "))
    }
}

/// The web configuration file, and what it was when last read.
struct Watched {
    path: PathBuf,
    /// The file and the files its last readable version named.
    files: Vec<PathBuf>,
    /// Their state when last read.
    stamp: Stamp,
}

/// What `stat` says of each watched file (`None`: it cannot be stat'ed).
type Stamp = Vec<Option<(u64, u64, i64, i64, i64, i64, u64)>>;

fn stamp(files: &[PathBuf]) -> Stamp {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f).ok().map(|m| {
                (
                    m.dev(),
                    m.ino(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                    m.size(),
                )
            })
        })
        .collect()
}

/// The configuration in force, and the file it comes from.
pub struct Live {
    current: Rc<Site>,
    file: Option<Watched>,
}

/// A read of the file: the configuration, or why not; and the files it named, when it
/// got that far.
fn read(path: &Path) -> (Result<Site, String>, Vec<PathBuf>) {
    let mut files = vec![path.to_owned()];
    let text = match std::fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(_) => {
                return (
                    Err(format!(
                        "{}: not a web configuration: not UTF-8 text",
                        path.display()
                    )),
                    files,
                );
            }
        },
        Err(e) => {
            return (Err(format!("cannot read {}: {e}", path.display())), files);
        }
    };
    // "" for a bare file name: its relative paths stay relative, as the toolkit's do.
    let dir = path.parent().unwrap_or_else(|| Path::new(""));
    let config = match WebConfig::parse(&text, dir) {
        Ok(c) => c,
        Err(e) => return (Err(format!("{}: {e}", path.display())), files),
    };
    files.extend(config.files().into_iter().map(Path::to_owned));
    let tls = match config.tls.as_ref().map(tls::server_config).transpose() {
        Ok(t) => t,
        Err(e) => return (Err(format!("{}: {e}", path.display())), files),
    };
    if let Some(t) = &config.tls {
        if matches!(t.client_auth, ClientAuth::Request | ClientAuth::RequireAny) {
            log::warn!(
                "{}: client certificates are asked for but not verified (client_auth_type); \
                 RequireAndVerifyClientCert checks them against client_ca_file",
                path.display()
            );
        }
    } else if !config.users.is_empty() {
        log::warn!(
            "{}: basic auth without tls_server_config sends passwords in clear text",
            path.display()
        );
    }
    let site = Site {
        description: describe(&config),
        tls: tls.map(TlsAcceptor::from),
        users: Arc::new(config.users),
        headers: config.headers,
    };
    (Ok(site), files)
}

impl Live {
    /// Reads `path` (or, without one, serves plain HTTP). The error is one line.
    pub fn load(path: Option<&Path>) -> Result<Self, String> {
        let Some(path) = path else {
            return Ok(Self {
                current: Rc::new(Site::open()),
                file: None,
            });
        };
        let before = stamp(&[path.to_owned()]);
        let (site, files) = read(path);
        let site = site?;
        let stamp = if files.len() == 1 {
            before
        } else {
            stamp(&files)
        };
        Ok(Self {
            current: Rc::new(site),
            file: Some(Watched {
                path: path.to_owned(),
                files,
                stamp,
            }),
        })
    }

    /// The configuration for a new connection, read again first if its files changed.
    pub fn current(&mut self) -> Rc<Site> {
        self.refresh(false);
        Rc::clone(&self.current)
    }

    /// Reads the file again even if nothing seems changed (SIGHUP).
    pub fn reload(&mut self) {
        self.refresh(true);
    }

    fn refresh(&mut self, forced: bool) {
        let Some(watched) = &mut self.file else {
            if forced {
                log::info!("SIGHUP: no --web-config to read again");
            }
            return;
        };
        let before = stamp(&watched.files);
        if !forced && before == watched.stamp {
            return;
        }
        let (site, files) = read(&watched.path);
        // Stamped as read: a file changed since is seen at the next connection.
        watched.stamp = if files == watched.files {
            before
        } else {
            stamp(&files)
        };
        watched.files = files;
        let site = site.and_then(|site| {
            if site.tls.is_some() == self.current.tls.is_some() {
                Ok(site)
            } else {
                Err(format!(
                    "{}: turning TLS on or off needs a restart of kvmtrace export",
                    watched.path.display()
                ))
            }
        });
        match site {
            Ok(site) => {
                log::info!(
                    "read {} again: serving {}",
                    watched.path.display(),
                    site.description
                );
                self.current = Rc::new(site);
            }
            Err(e) => log::error!("{e}; still serving with the last good web configuration"),
        }
    }
}
