//! End-to-end runs of `kvmtrace export --web-config` on this machine's kernel, as root,
//! with certificates made by `openssl` and requests made by `curl`: TLS, client
//! certificates and basic auth let the right scraper in and refuse the others; the
//! file is read again on each new connection and on SIGHUP; a bad file at start is one
//! line; and a flood of idle connections stays within bounds while scrapes go on.

mod common;

use std::{
    net::TcpStream,
    path::Path,
    process::Command,
    sync::mpsc::{Receiver, channel},
    time::{Duration, Instant},
};

use common::{
    exporter::{Exporter, free_port, start_with},
    has_kvm_tracepoints, is_root, kvmtrace, run, stderr,
};

const PASSWORD: &str = "correct horse";

/// Runs `program` in `dir`, or fails saying how to get it.
fn tool(dir: &Path, program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): apt-get install {program}"))
}

fn openssl(dir: &Path, args: &str) {
    let out = tool(dir, "openssl", &args.split_whitespace().collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A P-256 key `name`.key and a certificate `name`.crt signed by `ca` (self-signed
/// when `ca` is `None`) with the extensions in `ext`.
fn certificate(dir: &Path, name: &str, ca: Option<&str>, ext: &str) {
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap_or_else(|e| panic!("{e}"));
    match ca {
        None => openssl(
            dir,
            &format!("req -x509 {key} -keyout {name}.key -out {name}.crt -days 2 -subj /CN={name}"),
        ),
        Some(ca) => {
            openssl(
                dir,
                &format!("req {key} -keyout {name}.key -out {name}.csr -subj /CN={name}"),
            );
            openssl(
                dir,
                &format!(
                    "x509 -req -in {name}.csr -CA {ca}.crt -CAkey {ca}.key -CAcreateserial \
                     -out {name}.crt -days 2 -extfile {name}.ext"
                ),
            );
        }
    }
}

/// The CA, the server's and a client's certificates, and a second CA with a client of
/// its own, in a new directory.
fn pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let d = dir.path();
    certificate(d, "ca", None, "");
    let server = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n";
    certificate(d, "server", Some("ca"), server);
    certificate(d, "client", Some("ca"), "extendedKeyUsage=clientAuth\n");
    certificate(d, "other-ca", None, "");
    certificate(
        d,
        "other",
        Some("other-ca"),
        "extendedKeyUsage=clientAuth\n",
    );
    // The server's next certificate, from the second CA.
    certificate(d, "server2", Some("other-ca"), server);
    dir
}

/// [`pki`], when the test can run here (as root, with kvm).
fn pki_as_root() -> Option<tempfile::TempDir> {
    (is_root() && has_kvm_tracepoints()).then(pki)
}

/// A web configuration, with paths relative to it (as the toolkit reads them).
fn web_config(client_auth: &str, users: bool) -> String {
    let mut text =
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n".to_owned();
    if !client_auth.is_empty() {
        text += &format!("  client_auth_type: {client_auth}\n  client_ca_file: ca.crt\n");
    }
    text += "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n";
    if users {
        let hash = bcrypt::hash(PASSWORD, 4).unwrap_or_else(|e| panic!("bcrypt: {e}"));
        text += &format!("basic_auth_users:\n  prometheus: '{hash}'\n");
    }
    text
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// What curl got: the status code (0: no HTTP answer), the head and body, and curl's
/// complaint.
struct Answer {
    code: u16,
    text: String,
    error: String,
}

/// `curl -i` on https://127.0.0.1:`port`/metrics with `args`, from `dir`.
fn curl(dir: &Path, port: u16, args: &[&str]) -> Answer {
    curl_url(dir, &format!("https://127.0.0.1:{port}/metrics"), args)
}

fn curl_url(dir: &Path, url: &str, args: &[&str]) -> Answer {
    let mut all = vec!["-sS", "-i", "--max-time", "10"];
    all.extend(args);
    all.push(url);
    let out = tool(dir, "curl", &all);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Answer {
        code,
        text,
        error: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The CA and client certificate of a good scraper.
const TRUSTED: &[&str] = &[
    "--cacert",
    "ca.crt",
    "--cert",
    "client.crt",
    "--key",
    "client.key",
];

fn with<'a>(base: &[&'a str], more: &[&'a str]) -> Vec<&'a str> {
    base.iter().chain(more).copied().collect()
}

/// Starts the exporter on `dir`/web.yml; its log lines come out of the receiver.
fn serve(dir: &Path, port: u16, extra: &[&str]) -> (Exporter, Receiver<String>) {
    let (tx, rx) = channel();
    let config = dir.join("web.yml");
    let config = config.to_str().unwrap_or_else(|| panic!("path"));
    let exporter = start_with(port, &with(&["--web-config", config], extra), Some(tx));
    (exporter, rx)
}

/// The log lines that came within `wait`.
fn lines(log: &Receiver<String>, wait: Duration) -> Vec<String> {
    let end = Instant::now() + wait;
    let mut lines = Vec::new();
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match log.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    lines
}

#[test]
fn only_the_right_scraper_is_served() {
    let Some(pki) = pki_as_root() else {
        return;
    };
    let d = pki.path();
    write(
        &d.join("web.yml"),
        &web_config("RequireAndVerifyClientCert", true),
    );
    let port = free_port();
    let (mut exporter, _log) = serve(d, port, &[]);
    let user = format!("prometheus:{PASSWORD}");

    let ok = curl(d, port, &with(TRUSTED, &["-u", &user]));
    assert_eq!(ok.code, 200, "{} {}", ok.text, ok.error);
    assert!(ok.text.contains("kvmtrace_build_info"), "{}", ok.text);
    assert!(
        ok.text.contains("x-content-type-options: nosniff"),
        "{}",
        ok.text
    );

    for (why, args) in [
        ("no credentials", vec![]),
        ("a wrong password", vec!["-u", "prometheus:wrong"]),
        ("an unknown user", vec!["-u", "grafana:correct horse"]),
    ] {
        let a = curl(d, port, &with(TRUSTED, &args));
        assert_eq!(a.code, 401, "{why}: {} {}", a.text, a.error);
        assert!(
            a.text.contains("www-authenticate: Basic"),
            "{why}: {}",
            a.text
        );
        assert!(!a.text.contains("kvmtrace_"), "{why}: {}", a.text);
    }

    // Refused in the handshake: no HTTP answer at all.
    for (why, args) in [
        (
            "a client certificate of another CA",
            vec![
                "--cacert",
                "ca.crt",
                "--cert",
                "other.crt",
                "--key",
                "other.key",
            ],
        ),
        ("no client certificate", vec!["--cacert", "ca.crt"]),
    ] {
        let a = curl(d, port, &with(&args, &["-u", &user]));
        assert_eq!(a.code, 0, "{why}: {}", a.text);
        assert!(!a.error.is_empty(), "{why}");
    }

    // Plain HTTP on the TLS port: told so, and the exporter goes on.
    let plain = curl_url(
        d,
        &format!("http://127.0.0.1:{port}/metrics"),
        &["-u", &user],
    );
    assert_eq!(plain.code, 400, "{} {}", plain.text, plain.error);
    assert!(
        plain.text.contains("serves HTTPS on this port"),
        "{}",
        plain.text
    );
    let again = curl(d, port, &with(TRUSTED, &["-u", &user]));
    assert_eq!(again.code, 200, "{} {}", again.text, again.error);
    assert!(
        exporter.0.try_wait().ok().flatten().is_none(),
        "the exporter ended"
    );
}

#[test]
fn the_file_is_read_again_when_it_changes_and_on_sighup() {
    let Some(pki) = pki_as_root() else {
        return;
    };
    let d = pki.path();
    let config = d.join("web.yml");
    write(&config, &web_config("", true));
    let port = free_port();
    let (exporter, log) = serve(d, port, &[]);
    let ca = ["--cacert", "ca.crt"];
    assert_eq!(curl(d, port, &ca).code, 401);

    // No users any more: the next connection is served without credentials.
    write(&config, &web_config("", false));
    assert_eq!(curl(d, port, &ca).code, 200);

    // A bad file: one line, and the last good configuration goes on serving.
    write(
        &config,
        &web_config("", true).replace(
            "  key_file: server.key\n",
            "  key_file: server.key\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
        ),
    );
    for _ in 0..3 {
        assert_eq!(curl(d, port, &ca).code, 200);
    }
    let said: Vec<String> = lines(&log, Duration::from_millis(500))
        .into_iter()
        .filter(|l| l.contains("ERROR"))
        .collect();
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].contains("tls_server_config.cipher_suites is not supported by kvmtrace"),
        "{said:?}"
    );
    assert!(
        said[0].contains("still serving with the last good web configuration"),
        "{said:?}"
    );

    // A new certificate, of another CA, is served without a restart.
    write(&config, &web_config("", false));
    for ext in ["crt", "key"] {
        std::fs::copy(
            d.join(format!("server2.{ext}")),
            d.join(format!("server.{ext}")),
        )
        .unwrap_or_else(|e| panic!("copy: {e}"));
    }
    let rotated = curl(d, port, &["--cacert", "other-ca.crt"]);
    assert_eq!(rotated.code, 200, "{} {}", rotated.text, rotated.error);
    assert_eq!(
        curl(d, port, &ca).code,
        0,
        "the old CA no longer vouches for it"
    );

    // SIGHUP reads it again even when nothing changed.
    let _ = lines(&log, Duration::from_millis(200));
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(exporter.pid(), libc::SIGHUP) }, 0);
    let said = lines(&log, Duration::from_secs(2));
    assert!(
        said.iter().any(|l| l.contains("again: serving https")),
        "{said:?}"
    );
}

#[test]
fn a_missing_certificate_at_start_is_one_line() {
    let Some(pki) = pki_as_root() else {
        return;
    };
    let d = pki.path();
    let config = d.join("web.yml");
    write(
        &config,
        &web_config("", true).replace("server.crt", "missing.crt"),
    );
    let out = run(kvmtrace()
        .args([
            "export",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--web-config",
        ])
        .arg(&config));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "kvmtrace: {}: cannot read {} (tls_server_config.cert_file): No such file or \
             directory (os error 2): check the path and that kvmtrace may read it\n",
            config.display(),
            d.join("missing.crt").display()
        )
    );
}

/// The exporter's resident memory now and at its peak, in KiB (VmRSS and VmHWM).
fn memory(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Lets this process hold `n` more open files.
fn allow_open_files(n: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit), 0);
        limit.rlim_cur = limit.rlim_max.min(limit.rlim_cur.max(n + 256));
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit), 0);
    }
    assert!(
        limit.rlim_cur >= n,
        "this test needs {n} open files: ulimit -n"
    );
}

/// Whether the server has closed `s` (it reads end of file, or a reset, at once).
fn closed(mut s: &TcpStream) -> bool {
    use std::io::Read as _;
    s.set_nonblocking(true).unwrap_or_else(|e| panic!("{e}"));
    !matches!(s.read(&mut [0; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// 2 000 connections that send nothing (default --max-connections 512), then scrapes:
/// 20 on new connections, each answered within 1 s, and 10 000 on one kept-alive
/// connection, each within 1 s and all within 30 s; the exporter's peak RSS stays under
/// 64 MiB, the idle connections beyond the limit are closed at once, and the others
/// when --header-timeout runs out. (About 20 s here.)
#[test]
fn a_flood_of_idle_connections_stays_bounded() {
    const IDLE: usize = 2_000;
    const MAX_CONNECTIONS: usize = 512;
    const SCRAPES: usize = 10_000;
    const RSS_BOUND_KIB: u64 = 64 * 1024;
    const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
    let Some(pki) = pki_as_root() else {
        return;
    };
    let d = pki.path();
    write(
        &d.join("web.yml"),
        &web_config("RequireAndVerifyClientCert", true),
    );
    let port = free_port();
    let (mut exporter, _log) = serve(d, port, &["--header-timeout", "5"]);
    let user = format!("prometheus:{PASSWORD}");
    allow_open_files(u64::try_from(IDLE).unwrap_or(u64::MAX));
    let (rss_before, _) = memory(exporter.pid());

    let flood = Instant::now();
    let idle: Vec<TcpStream> = (0..IDLE)
        .map(|i| {
            TcpStream::connect(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("idle connection {i}: {e}"))
        })
        .collect();
    let opened = flood.elapsed();

    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let a = curl(
            d,
            port,
            &with(TRUSTED, &["-u", &user, "-w", "\n%{time_total}"]),
        );
        assert_eq!(a.code, 200, "during the flood: {} {}", a.text, a.error);
        let took: f64 = a
            .text
            .lines()
            .last()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no time in {}", a.text));
        slowest = slowest.max(Duration::from_secs_f64(took));
    }
    assert!(
        slowest < Duration::from_secs(1),
        "a new connection's scrape took {slowest:?}"
    );
    // Each connection beyond the limit (the scrapes' too) took an idle one's place.
    let displaced = idle.iter().filter(|s| closed(s)).count();
    assert!(
        flood.elapsed() < HEADER_TIMEOUT,
        "too slow to tell displaced connections from timed-out ones: {IDLE} connections \
         opened in {opened:?}, 20 scrapes done at {:?}",
        flood.elapsed()
    );
    assert!(
        displaced >= IDLE - MAX_CONNECTIONS,
        "only {displaced} idle connections closed"
    );

    // Many scrapes on one connection: a curl config file with the URL SCRAPES times.
    let url = format!("url = \"https://127.0.0.1:{port}/metrics\"\noutput = \"/dev/null\"\n");
    write(&d.join("scrapes.curl"), &url.repeat(SCRAPES));
    let started = Instant::now();
    let out = tool(
        d,
        "curl",
        &with(
            TRUSTED,
            &[
                "-sS",
                "-u",
                &user,
                "-w",
                "%{http_code} %{time_total}\n",
                "-K",
                "scrapes.curl",
            ],
        ),
    );
    let all = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    let answers: Vec<(&str, f64)> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(code, t)| (code, t.parse().unwrap_or(f64::INFINITY)))
        .collect();
    assert_eq!(
        answers.len(),
        SCRAPES,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        answers.iter().all(|(code, _)| *code == "200"),
        "not all 200"
    );
    let slowest_kept = answers.iter().map(|(_, t)| *t).fold(0.0, f64::max);
    assert!(
        slowest_kept < 1.0,
        "a kept-alive scrape took {slowest_kept} s"
    );
    assert!(
        all < Duration::from_secs(30),
        "{SCRAPES} scrapes took {all:?}"
    );

    let (rss_after, peak) = memory(exporter.pid());
    println!(
        "flood: {IDLE} idle connections, {displaced} closed for newer ones; slowest new-connection \
         scrape {slowest:?}; {SCRAPES} kept-alive scrapes in {all:?}, slowest {slowest_kept} s; \
         RSS {rss_before} KiB before, {rss_after} KiB after, peak {peak} KiB"
    );
    assert!(peak < RSS_BOUND_KIB, "peak RSS {peak} KiB");

    // The rest go when the handshake time runs out.
    if let Some(left) = (HEADER_TIMEOUT + Duration::from_secs(1)).checked_sub(flood.elapsed()) {
        std::thread::sleep(left);
    }
    let open = idle.iter().filter(|s| !closed(s)).count();
    assert_eq!(
        open, 0,
        "idle connections still open after --header-timeout"
    );
    assert!(
        exporter.0.try_wait().ok().flatten().is_none(),
        "the exporter ended"
    );
}
