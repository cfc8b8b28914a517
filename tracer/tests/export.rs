//! End-to-end runs of `kvmtrace export` on this machine's kernel, as root: it serves
//! both text formats, answers other paths and methods, stops cleanly on SIGTERM, and
//! says in one line what is wrong with a busy port or missing privileges. The values it
//! serves are checked against the kernel's hist trigger in the lab (a real Prometheus
//! scraping L1: `cargo xtask lab --isa amd --scenario export`).

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
};

use common::{
    exporter::{free_port, start},
    has_kvm_tracepoints, is_root, kvmtrace, run, run_unprivileged, stderr,
};

/// An HTTP/1.0 request: (status line, headers and body).
fn get(port: u16, method: &str, path: &str, accept: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect: {e}"));
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nAccept: {accept}\r\n\r\n"
    )
    .unwrap_or_else(|e| panic!("send: {e}"));
    let mut text = String::new();
    s.read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("read: {e}"));
    let (status, rest) = text.split_once("\r\n").unwrap_or((&text, ""));
    (status.to_owned(), rest.to_owned())
}

#[test]
fn serves_both_formats_and_stops_on_sigterm() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    let port = free_port();
    let mut exporter = start(port);

    let (status, body) = get(port, "GET", "/metrics", "text/plain");
    assert_eq!(status, "HTTP/1.0 200 OK", "{body}");
    assert!(
        body.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{body}"
    );
    // (No exit fires here, so no histogram: the lab checks that one.)
    for family in [
        "# TYPE kvmtrace_exits_total counter",
        "kvmtrace_dropped_events_total{kind=\"vcpu_map_full\"} 0",
        "kvmtrace_series_over_cap 0",
        "kvmtrace_build_info{version=\"",
    ] {
        assert!(body.contains(family), "no {family}: {body}");
    }

    let (status, body) = get(
        port,
        "GET",
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    );
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert!(
        body.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{body}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");

    assert_eq!(get(port, "GET", "/nope", "*/*").0, "HTTP/1.0 404 Not Found");
    assert_eq!(
        get(port, "POST", "/metrics", "*/*").0,
        "HTTP/1.0 405 Method Not Allowed"
    );

    let pid = i32::try_from(exporter.0.id()).unwrap_or_else(|e| panic!("pid: {e}"));
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = exporter.0.wait().unwrap_or_else(|e| panic!("wait: {e}"));
    assert!(status.success(), "SIGTERM: {status:?}");
}

#[test]
fn a_busy_port_is_one_clear_line() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    let busy = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = busy.local_addr().unwrap_or_else(|e| panic!("addr: {e}"));
    let out = run(kvmtrace()
        .args(["export", "--listen"])
        .arg(addr.to_string()));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "kvmtrace: cannot listen on {addr}: the port is in use (another exporter?): pick another with --listen"
        )
    );
}

#[test]
fn without_privileges_it_is_one_clear_line() {
    if !is_root() {
        return;
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let out = run_unprivileged(&["export", "--listen", &listen]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).trim(),
        "kvmtrace: root (or CAP_BPF and CAP_PERFMON) is needed to load eBPF programs: run kvmtrace with sudo"
    );
}
