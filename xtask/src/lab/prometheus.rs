//! `--scenario export`: Debian's real Prometheus server on the host, scraping L1's
//! `kvmtrace export` every second through QEMU's port forward. The `prometheus`
//! package is downloaded and unpacked under the lab cache, never installed: its binary
//! runs with a configuration and data directory of its own under the build directory,
//! not as the packaged service.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use super::reason::{Counts, ISA_SVM, ISA_VMX, Reason};
use crate::{apt, files::write, process::ChildGuard};

/// A running Prometheus server.
pub struct Prometheus {
    _child: ChildGuard,
    api: String,
    promtool: PathBuf,
    pub version: String,
    /// What promtool says of the lab's own files: this server's configuration (its
    /// https scrape, client certificate and password) and L1's web configuration.
    lab_problems: Vec<String>,
}

/// A free TCP port on the host's loopback address (free when this returns).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    data: Option<Data>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    result: Vec<Sample>,
}

#[derive(Deserialize)]
struct Sample {
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

impl Prometheus {
    /// Unpacks Debian's `prometheus` under `cache` (once), and starts it with its data
    /// in `build/prometheus`, scraping https://127.0.0.1:`target` every second with
    /// `tls`'s client certificate and password. `root`: the checkout, for apt.
    pub fn start(
        root: &Path,
        cache: &Path,
        build: &Path,
        target: u16,
        tls: &super::tls::Pki,
    ) -> anyhow::Result<Self> {
        let deb = apt::download(root, &cache.join("debs"), "prometheus")?;
        let root = apt::unpack(&deb, &cache.join("roots"))?;
        let version = apt::deb_field(&deb, "Version")?;
        let (server, promtool) = (
            root.join("usr/bin/prometheus"),
            root.join("usr/bin/promtool"),
        );
        let dir = build.join("prometheus");
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let config = dir.join("prometheus.yml");
        write(
            &config,
            format!(
                "# Written by cargo xtask lab --scenario export.\n\
                 global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: kvmtrace\n{}    static_configs:\n\
                 \x20     - targets: ['127.0.0.1:{target}']\n",
                tls.scrape_config()
            ),
        )?;
        let lab_problems = check_lab(&promtool, &dir, tls)?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.join("prometheus.log"))
            .with_context(|| format!("cannot create {}", dir.join("prometheus.log").display()))?;
        let child = ChildGuard::spawn(
            Command::new(&server)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )?;
        let p = Self {
            _child: child,
            api: format!("http://127.0.0.1:{port}"),
            promtool,
            version,
            lab_problems,
        };
        let started = Instant::now();
        while ureq::get(format!("{}/-/ready", p.api)).call().is_err() {
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "Prometheus did not get ready in 60 s (log: {})",
                    dir.join("prometheus.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("prometheus {} ready on {}", p.version, p.api);
        Ok(p)
    }

    /// An instant query at the current time: each series' labels and value.
    pub fn query(&self, promql: &str) -> anyhow::Result<Vec<(BTreeMap<String, String>, f64)>> {
        let mut response = ureq::get(format!("{}/api/v1/query", self.api))
            .query("query", promql)
            .call()
            .with_context(|| format!("Prometheus query {promql}"))?;
        let text = response.body_mut().read_to_string()?;
        let answer: Answer = serde_json::from_str(&text)
            .with_context(|| format!("Prometheus answered {promql} with {text}"))?;
        if answer.status != "success" {
            bail!(
                "Prometheus query {promql}: {}",
                answer.error.unwrap_or(answer.status)
            );
        }
        let data = answer.data.context("a query answer without data")?;
        data.result
            .into_iter()
            .map(|s| {
                let v: f64 = s
                    .value
                    .1
                    .parse()
                    .with_context(|| format!("value {:?}", s.value.1))?;
                Ok((s.metric, v))
            })
            .collect()
    }

    /// The last value Prometheus scraped of each exit reason of VM `vm` (its series
    /// may have ended since).
    pub fn exits_of(&self, vm: &str) -> anyhow::Result<Counts> {
        let rows = self.query(&format!(
            "last_over_time(kvmtrace_exits_total{{vm=\"{vm}\"}}[1h])"
        ))?;
        let mut counts = Counts::new();
        for (labels, value) in rows {
            let reason = reason_of(&labels)?;
            // Counts are exact integers well below 2^53.
            *counts.entry(reason).or_default() += value as u64;
        }
        Ok(counts)
    }

    /// `promtool` on dist/: the fleet configuration, the alert rules and their tests,
    /// and the exporters' web configuration. Each failure, as promtool printed it.
    ///
    /// The certificates and password files these name live under /etc on the servers,
    /// not here: prometheus.yml is checked for syntax only, and web-config.yml (which
    /// promtool loads the certificates of) on a copy pointing at a throwaway CA's.
    pub fn check_dist(&self, dist: &Path) -> anyhow::Result<Vec<String>> {
        check_dist(&self.promtool, dist)
    }

    /// `promtool check metrics` on one scrape: its complaints, empty when clean.
    pub fn check_metrics(&self, scrape: &str) -> anyhow::Result<String> {
        use std::io::Write as _;
        let mut child = Command::new(&self.promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", self.promtool.display()))?;
        child
            .stdin
            .take()
            .context("promtool's stdin")?
            .write_all(scrape.as_bytes())?;
        let out = child.wait_with_output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(if out.status.success() {
            String::new()
        } else {
            format!("promtool check metrics failed ({}): {said}", out.status)
        })
    }
}

/// The exit reason of a `kvmtrace_exits_total` series.
fn reason_of(labels: &BTreeMap<String, String>) -> anyhow::Result<Reason> {
    let get = |k: &str| {
        labels
            .get(k)
            .with_context(|| format!("a series without {k}: {labels:?}"))
    };
    let isa = match get("isa")?.as_str() {
        "vmx" => ISA_VMX,
        "svm" => ISA_SVM,
        other => other.parse().with_context(|| format!("isa {other}"))?,
    };
    Ok(Reason {
        isa,
        reason: get("reason")?.parse()?,
        failed_entry: get("reason_name")?.ends_with("_FAILED_ENTRY"),
    })
}

/// What the host's Prometheus and L1's own scrapes showed of each mode's VM.
#[derive(Default)]
pub struct Exported {
    pub prometheus_version: String,
    /// Per mode tag: the last values Prometheus scraped of the mode's VM (`l2-TAG`),
    /// or of all its VMs (a crowd).
    pub by_mode: BTreeMap<String, Counts>,
    /// A crowd's: per mode tag, the last values of each of its VMs, by `vm` label.
    pub vms_by_mode: BTreeMap<String, BTreeMap<String, Counts>>,
    /// Per mode tag: what is wrong with the scrapes (lint, a VM that stayed past its
    /// retention, in L1's scrape or in Prometheus at the end).
    pub problems: BTreeMap<String, Vec<String>>,
    /// What is wrong beyond one mode: promtool on dist/, counters that went back.
    pub dist_problems: Vec<String>,
}

/// The VM label of mode `tag`'s L2 (QEMU's `-name guest=l2-TAG`).
pub fn vm_of(tag: &str) -> String {
    format!("l2-{tag}")
}

/// The `vm` labels of `kvmtrace_exits_total` in a scrape.
fn vm_labels(scrape: &str) -> std::collections::BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("kvmtrace_exits_total{"))
        .filter_map(|l| l.split("vm=\"").nth(1))
        .filter_map(|l| l.split('"').next())
        .map(str::to_owned)
        .collect()
}

/// Reads, for each mode in `tags`, Prometheus's last values of its VM (a crowd: of
/// each VM in L1's final scrape of the mode), lints L1's scrape of it (`metrics`
/// section) and checks the scrape after the retention (`metrics-after`) and
/// Prometheus now no longer have it.
pub fn collect(
    prom: &Prometheus,
    lines: &[super::console::Line],
    tags: &[String],
    dist: &Path,
    crowd: bool,
) -> anyhow::Result<Exported> {
    let mut out = Exported {
        prometheus_version: prom.version.clone(),
        dist_problems: [prom.check_dist(dist)?, prom.lab_problems.clone()].concat(),
        ..Exported::default()
    };
    // The vendor module is removed and loaded again between modes while the exporter
    // runs: no counter may go backwards (Prometheus would see a reset).
    for metric in [
        "kvmtrace_exits_total",
        "kvmtrace_dropped_events_total",
        "kvmtrace_exit_handling_seconds_sum",
        "kvmtrace_exit_handling_seconds_count",
    ] {
        let resets = prom.query(&format!("sum(resets({metric}[1h]))"))?;
        match resets.first() {
            Some((_, n)) if *n == 0.0 => {}
            Some((_, n)) => out.dist_problems.push(format!(
                "{metric} went backwards {n} times (module reloads, VMs leaving)"
            )),
            None => out
                .dist_problems
                .push(format!("Prometheus has no {metric} samples at all")),
        }
    }
    for tag in tags {
        if crowd {
            let problems = collect_crowd(prom, lines, tag, &mut out)?;
            out.problems.insert(tag.clone(), problems);
            continue;
        }
        let vm = vm_of(tag);
        let label = format!("vm=\"{vm}\"");
        let mut problems = Vec::new();
        out.by_mode.insert(tag.clone(), prom.exits_of(&vm)?);
        match super::console::section(lines, "metrics", tag) {
            Some(scrape) if scrape.contains(&label) => {
                if !scrape.contains("kvmtrace_exit_handling_seconds_sum{") {
                    problems.push("L1's scrape has no handling-time histogram".to_owned());
                }
                let lint = prom.check_metrics(&scrape)?;
                if !lint.is_empty() {
                    problems.push(lint);
                }
            }
            Some(_) => problems.push(format!("L1's scrape after the VM ended has no {label}")),
            None => problems.push("no scrape of L1's exporter on the console".to_owned()),
        }
        match super::console::section(lines, "metrics-after", tag) {
            Some(scrape) if scrape.contains(&label) => {
                problems.push(format!("{label} is still served after the retention"));
            }
            Some(scrape) if !scrape.contains("kvmtrace_build_info") => {
                problems.push(format!("the scrape after the retention failed: {scrape}"));
            }
            Some(_) => {}
            None => problems.push("no scrape after the retention on the console".to_owned()),
        }
        let live = prom.query(&format!("kvmtrace_exits_total{{{label}}}"))?;
        if !live.is_empty() {
            problems.push(format!(
                "Prometheus still has {} live series of {label} at the end",
                live.len()
            ));
        }
        out.problems.insert(tag.clone(), problems);
    }
    Ok(out)
}

/// A crowd's mode `tag` (its only mode: every VM Prometheus saw is the mode's): each
/// VM as Prometheus last scraped it (into `out`); what is wrong with the scrapes. A VM
/// that ended early may have left L1's exporter (its retention) before the mode's
/// final scrape: Prometheus still has its last values.
fn collect_crowd(
    prom: &Prometheus,
    lines: &[super::console::Line],
    tag: &str,
    out: &mut Exported,
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let Some(scrape) = super::console::section(lines, "metrics", tag) else {
        return Ok(vec!["no scrape of L1's exporter on the console".to_owned()]);
    };
    let lint = prom.check_metrics(&scrape)?;
    if !lint.is_empty() {
        problems.push(lint);
    }
    // Every VM's series at once: one query, grouped by its label.
    let mut by_vm: BTreeMap<String, Counts> = BTreeMap::new();
    for (labels, value) in prom.query("last_over_time(kvmtrace_exits_total[1h])")? {
        let Some(vm) = labels.get("vm") else {
            continue;
        };
        // Counts are exact integers well below 2^53.
        *by_vm
            .entry(vm.clone())
            .or_default()
            .entry(reason_of(&labels)?)
            .or_default() += value as u64;
    }
    let vms: std::collections::BTreeSet<String> = by_vm.keys().cloned().collect();
    if vms.is_empty() {
        problems.push("Prometheus has no VM's series".to_owned());
    }
    let mut all = Counts::new();
    for counts in by_vm.values() {
        for (&r, &n) in counts {
            *all.entry(r).or_default() += n;
        }
    }
    match super::console::section(lines, "metrics-after", tag) {
        Some(after) => {
            let stayed = vm_labels(&after).intersection(&vms).count();
            if stayed > 0 {
                problems.push(format!("{stayed} VMs are still served after the retention"));
            }
            if !after.contains("kvmtrace_build_info") {
                problems.push(format!("the scrape after the retention failed: {after}"));
            }
        }
        None => problems.push("no scrape after the retention on the console".to_owned()),
    }
    let live = prom
        .query("kvmtrace_exits_total")?
        .into_iter()
        .filter(|(labels, _)| labels.get("vm").is_some_and(|vm| vms.contains(vm)))
        .count();
    if live > 0 {
        problems.push(format!(
            "Prometheus still has {live} live series of the crowd's VMs at the end"
        ));
    }
    println!(
        "  {tag}: Prometheus has the last values of {} VMs ({} in L1's final scrape)",
        by_vm.len(),
        vm_labels(&scrape).len()
    );
    out.by_mode.insert(tag.to_owned(), all);
    out.vms_by_mode.insert(tag.to_owned(), by_vm);
    Ok(problems)
}

/// `promtool` on the lab's own files: `check config` on the server's configuration in
/// `dir` (whole: its CA, client certificate and password file exist here), and `check
/// web-config` on L1's, on a copy naming the files where they are on this host.
fn check_lab(promtool: &Path, dir: &Path, tls: &super::tls::Pki) -> anyhow::Result<Vec<String>> {
    let l1 = std::fs::read_to_string(tls.dir.join("web-config.yml"))
        .with_context(|| format!("cannot read {}", tls.dir.join("web-config.yml").display()))?;
    let here = tls.dir.join("web-config.here.yml");
    write(
        &here,
        l1.replace(
            &format!("/{}/", super::tls::L1_DIR),
            &format!("{}/", tls.dir.display()),
        ),
    )?;
    let mut problems = Vec::new();
    for (what, file) in [("config", dir.join("prometheus.yml")), ("web-config", here)] {
        let out = Command::new(promtool)
            .args(["check", what])
            .arg(&file)
            .output()
            .with_context(|| format!("cannot run {}", promtool.display()))?;
        if !out.status.success() {
            problems.push(format!(
                "the lab's {}: promtool check {what} failed: {}{}",
                file.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(problems)
}

/// [`Prometheus::check_dist`] with `promtool`.
fn check_dist(promtool: &Path, dist: &Path) -> anyhow::Result<Vec<String>> {
    let pki = tempfile::tempdir().context("cannot make a temporary directory")?;
    // A throwaway CA and server certificate, under the names dist's file gives them.
    super::tls::Pki::make(pki.path())?;
    std::fs::copy(pki.path().join("ca.crt"), pki.path().join("clients-ca.crt"))
        .context("cannot copy the throwaway CA")?;
    let web_config = std::fs::read_to_string(dist.join("web-config.yml"))
        .with_context(|| format!("cannot read {}", dist.join("web-config.yml").display()))?
        .replace("/etc/kvmtrace/", &format!("{}/", pki.path().display()));
    write(&pki.path().join("web-config.yml"), web_config)?;
    let mut problems = Vec::new();
    for (args, dir) in [
        (
            &["check", "config", "--syntax-only", "prometheus.yml"][..],
            dist,
        ),
        (&["check", "rules", "kvmtrace-alerts.yml"], dist),
        (&["test", "rules", "kvmtrace-alerts.test.yml"], dist),
        (&["check", "web-config", "web-config.yml"], pki.path()),
    ] {
        let out = Command::new(promtool)
            .args(args)
            .current_dir(dir)
            .output()
            .with_context(|| format!("cannot run {}", promtool.display()))?;
        if !out.status.success() {
            problems.push(format!(
                "dist/: promtool {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(problems)
}
