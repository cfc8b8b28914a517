//! `kvmtrace export`: an HTTP endpoint serving `/metrics` to Prometheus. Each scrape
//! copies the eBPF maps (between scrapes, only the rows' upkeep runs, once a second:
//! ended threads' slots are freed for new ones), names the VMs, forgets the
//! VMs that ended more than `--retention` ago, and renders the series
//! ([`kvmtrace_model::metrics`], [`kvmtrace_model::render::metrics`]).
//!
//! With `--web-config` it serves HTTPS with basic auth and client certificates as the
//! Prometheus exporter toolkit does ([`web_config`], [`tls`], [`auth`], [`site`]), and
//! every connection is bounded ([`slots`], [`connection`]).

mod auth;
mod connection;
mod site;
mod slots;
mod tls;
mod web_config;

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    process::ExitCode,
    rc::Rc,
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
};
use kvmtrace::{
    host,
    probe::{Probe, ProbeConfig},
    tracefs::Tracefs,
};
use kvmtrace_model::{
    metrics::{Scrape, expose, vm_label},
    render::metrics::{OPENMETRICS_TYPE, PROMETHEUS_TYPE, text},
    report::vm_id,
};
use tokio::{
    net::{TcpListener, TcpSocket},
    signal::unix::{SignalKind, signal},
};

use super::BadInput;
use crate::{cli::ExportArgs, exit_status::Status};

/// How often the rows of ended threads are read and their slots freed between
/// scrapes ([`Probe::tick`]).
const UPKEEP: Duration = Duration::from_secs(1);

/// A VM process seen in the maps, by (pid, reuse) (`VcpuKey::reuse`).
struct Vm {
    label: String,
    /// `starttime` from /proc/PID/stat when first seen: a VM whose pid now has
    /// another start time (or none) has ended.
    started: Option<u64>,
    /// When it was first seen gone.
    gone_at: Option<Instant>,
}

/// What the exporter keeps between scrapes.
struct Exporter {
    probe: Probe,
    vms: BTreeMap<(u32, u32), Vm>,
    args: ExportArgs,
    /// Handling time of the VMs forgotten so far, per reason (see [`Scrape`]).
    forgotten_time_ns: BTreeMap<tracer_common::ExitKey, u64>,
}

/// The process's start time (field 22 of /proc/PID/stat), or `None` if it is gone.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after its end.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Exporter {
    /// Names new VMs, notes ended ones, and forgets those ended longer than the
    /// retention ago. Returns whether it forgot any.
    fn track_vms(&mut self, seen: &BTreeSet<(u32, u32)>, now: Instant) -> anyhow::Result<bool> {
        // The last VM process of each pid: an earlier one with that pid has ended.
        let last: BTreeMap<u32, u32> = seen.iter().copied().collect();
        for &(pid, reuse) in seen {
            let started = start_time(pid);
            let vm = self.vms.entry((pid, reuse)).or_insert_with(|| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let label = vm_label(&cmdline).unwrap_or_else(|| vm_id(pid, reuse));
                log::info!("VM {label} (pid {pid}): exits seen");
                Vm {
                    label,
                    started,
                    gone_at: None,
                }
            });
            let replaced = last.get(&pid).is_some_and(|&l| l > reuse);
            if vm.gone_at.is_none() && (replaced || started.is_none() || started != vm.started) {
                log::info!(
                    "VM {} (pid {pid}) ended: its series stay for {} s",
                    vm.label,
                    self.args.retention.as_secs_f64()
                );
                vm.gone_at = Some(now);
            }
        }
        let expired: Vec<(u32, u32)> = self
            .vms
            .iter()
            .filter(|(_, vm)| {
                vm.gone_at
                    .is_some_and(|t| now.duration_since(t) >= self.args.retention)
            })
            .map(|(&key, _)| key)
            .collect();
        let forgot = !expired.is_empty();
        for (pid, reuse) in expired {
            let rows = self.probe.forget_vm((pid, reuse))?;
            for (exit, stats) in &rows {
                let t = self.forgotten_time_ns.entry(*exit).or_default();
                *t = t.saturating_add(stats.time_ns);
            }
            if let Some(vm) = self.vms.remove(&(pid, reuse)) {
                log::info!("VM {} (pid {pid}): {} rows forgotten", vm.label, rows.len());
            }
        }
        Ok(forgot)
    }

    /// One scrape's text.
    fn scrape(&mut self, openmetrics: bool) -> anyhow::Result<String> {
        let now = Instant::now();
        let mut snapshot = self.probe.snapshot()?;
        let seen: BTreeSet<(u32, u32)> = snapshot.vcpus.keys().map(|k| (k.pid, k.reuse)).collect();
        if self.track_vms(&seen, now)? {
            // The snapshot served holds no forgotten VM.
            snapshot = self.probe.snapshot()?;
        }
        let labels = unique_labels(&self.vms);
        let paging: Vec<_> = host::paging().into_iter().collect();
        let exposition = expose(&Scrape {
            snapshot: &snapshot,
            vms: &labels,
            per_vcpu: self.args.per_vcpu,
            timing: self.args.time,
            paging: &paging,
            version: env!("CARGO_PKG_VERSION"),
            max_series: self.args.max_series,
            forgotten_time_ns: &self.forgotten_time_ns,
        })?;
        Ok(text(&exposition, openmetrics)?)
    }
}

/// Each VM's label; a name two VMs share gets the VM's number after it (`web:4242`,
/// `web:4242#2` for the pid's second process), so no two VMs' series add up.
fn unique_labels(vms: &BTreeMap<(u32, u32), Vm>) -> BTreeMap<(u32, u32), String> {
    let mut uses: BTreeMap<&str, usize> = BTreeMap::new();
    for vm in vms.values() {
        *uses.entry(vm.label.as_str()).or_default() += 1;
    }
    vms.iter()
        .map(|(&(pid, reuse), vm)| {
            let label = if uses.get(vm.label.as_str()).copied().unwrap_or(0) > 1 {
                format!("{}:{}", vm.label, vm_id(pid, reuse))
            } else {
                vm.label.clone()
            };
            ((pid, reuse), label)
        })
        .collect()
}

/// The answer to one request.
fn respond(exporter: &RefCell<Exporter>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, kind: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
        r
    };
    let plain = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            plain,
            "only GET\n".to_owned(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("application/openmetrics-text"));
            match exporter.borrow_mut().scrape(openmetrics) {
                Ok(body) => reply(
                    StatusCode::OK,
                    if openmetrics {
                        OPENMETRICS_TYPE
                    } else {
                        PROMETHEUS_TYPE
                    },
                    body,
                ),
                Err(e) => {
                    log::error!("scrape failed: {e:#}");
                    reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        plain,
                        format!("scrape failed: {e:#}\n"),
                    )
                }
            }
        }
        "/" => reply(
            StatusCode::OK,
            plain,
            "kvmtrace export: KVM exit metrics are at /metrics\n".to_owned(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            plain,
            "not found: try /metrics\n".to_owned(),
        ),
    }
}

/// The listen backlog: room for a burst of connections the accept loop has not taken
/// yet, as Go servers ask for (the kernel caps it at net.core.somaxconn). tokio's
/// `TcpListener::bind` asks for 1 024 but gets 128 on some kernels, and a loopback burst
/// of a few hundred then waits a second for SYN retransmits.
const BACKLOG: u32 = 4096;

/// Binds `addr`, with one clear line for the usual failures.
fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(BACKLOG)
    };
    listen().map_err(|e: std::io::Error| {
        let why = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "the port is in use (another exporter?): pick another with --listen".to_owned()
            }
            std::io::ErrorKind::PermissionDenied => {
                "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)".to_owned()
            }
            std::io::ErrorKind::AddrNotAvailable => {
                "no interface of this host has that address: check --listen".to_owned()
            }
            _ => e.to_string(),
        };
        BadInput(format!("cannot listen on {addr}: {why}")).into()
    })
}

pub fn run(args: &ExportArgs) -> anyhow::Result<ExitCode> {
    super::check_can_trace()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(args))
}

/// Makes sure this process may open the files `--max-connections` asks for: raises
/// its soft limit of open files up to the hard one if needed.
fn allow_open_files(max_connections: usize) -> Result<(), BadInput> {
    // The connections, plus the listener, the eBPF maps and programs, and the files
    // read along the way.
    let needed = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(256);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        log::debug!("getrlimit: {}", std::io::Error::last_os_error());
        return Ok(());
    }
    if limit.rlim_cur >= needed {
        return Ok(());
    }
    if limit.rlim_max < needed {
        return Err(BadInput(format!(
            "--max-connections {max_connections} needs about {needed} open files, but this \
             process may open only {} (RLIMIT_NOFILE): lower --max-connections, or raise the \
             limit (LimitNOFILE= in the unit, ulimit -n)",
            limit.rlim_max
        )));
    }
    limit.rlim_cur = needed;
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) } != 0 {
        log::warn!(
            "cannot raise the open-file limit to {needed}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

async fn serve(args: &ExportArgs) -> anyhow::Result<ExitCode> {
    // The web configuration first: a bad one stops kvmtrace before anything is attached.
    let mut live = site::Live::load(args.web_config.as_deref()).map_err(BadInput)?;
    allow_open_files(args.max_connections)?;
    let listener = bind(args.listen)?;
    let tracefs = Tracefs::find_or_mount()?;
    let choice = super::count_choice(false);
    let counting = !args.time && !args.per_vcpu;
    let config = ProbeConfig {
        pids: args.pids.iter().copied().collect(),
        // Time and vCPU labels need the timing path; counts alone take the cheap one.
        raw_exit: (!counting).then(|| choice.offsets()).flatten(),
        counts: counting.then_some(choice),
        ..ProbeConfig::default()
    };
    // Time without vCPU labels: per-VM rows, no hash lookup per exit.
    let config = ProbeConfig {
        vm_time: config.per_vm_time_fits(),
        vcpu_rows: config.per_vm_time_fits() && args.per_vcpu,
        ..config
    };
    let probe = Probe::attach(&tracefs, &config)?;
    let shared = Rc::new(connection::Shared {
        exporter: RefCell::new(Exporter {
            probe,
            vms: BTreeMap::new(),
            args: args.clone(),
            forgotten_time_ns: BTreeMap::new(),
        }),
        auth: auth::Auth::new().map_err(anyhow::Error::msg)?,
        limits: connection::Limits {
            header_timeout: args.header_timeout,
            max_request_bytes: args.max_request_bytes,
        },
    });
    let slots = slots::Slots::new(args.max_connections);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let site = live.current();
    log::info!(
        "serving KVM exit metrics on {}://{}/metrics{}",
        if site.tls.is_some() { "https" } else { "http" },
        listener.local_addr()?,
        match site.description.split_once(' ') {
            Some((_, what)) => format!(" {what}"),
            None => String::new(),
        }
    );
    // The rows' upkeep between scrapes: ended threads' slots are freed whether or not
    // anyone scrapes (Prometheus may be down for hours while VMs come and go).
    let mut upkeep = tokio::time::interval(UPKEEP);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut upkeep_failed: Option<String> = None;
    loop {
        let (stream, peer) = tokio::select! {
            _ = upkeep.tick() => {
                let now = shared.exporter.borrow_mut().probe.tick().err().map(|e| format!("{e:#}"));
                // Said once, not every second; again when it changes.
                if let Some(why) = &now
                    && now != upkeep_failed
                {
                    log::error!("the maps' upkeep failed: {why}");
                }
                upkeep_failed = now;
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    log::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = hup.recv() => {
                live.reload();
                continue;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let site = live.current();
        let Some(slot) = slots.admit() else {
            // Every place is taken by a client that made an authorised request.
            drop(stream);
            continue;
        };
        tokio::task::spawn_local(connection::serve(
            stream,
            peer,
            site,
            slot,
            Rc::clone(&shared),
        ));
    }
    log::info!("stopped");
    Ok(Status::Success.into())
}
