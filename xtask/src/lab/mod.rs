//! `cargo xtask lab`: the emulated lab. A real KVM runs inside an emulated host (L1):
//! Bochs with VMX+EPT for kvm_intel, QEMU 7.2 TCG with SVM+NPT for kvm_amd. For each
//! paging mode L1 runs an L2 workload under `kvmtrace record`, with the kernel's own
//! hist trigger on kvm:kvm_exit as the ground truth, and ships both back over the serial
//! console. Results land in `target/lab/<isa>/<mode>/`.
//!
//! Guest-side pieces (init scripts, the `micro` VMM, the Bochs config) live in `lab/`.
//!
//! The steps, one module each: [`options`], [`inputs`] (Debian packages via
//! [`assets`], kvm modules, kvmtrace and the micro VMM), [`workload`] and [`image`]
//! (the initrds, written by [`cpio`]), [`emulator`] ([`bochs`] or [`qemu`]) following
//! the serial [`console`], then [`results`]: the kernel [`hist`] and the kvmtrace
//! [`record`] per mode, the [`checks`], and the [`ab_report`]. `cargo xtask bench`
//! boots the same machine through [`inputs`], [`image`] and [`emulator::Machine`].

mod ab_report;
pub mod assets;
mod bochs;
mod checks;
pub mod console;
mod cpio;
mod deb;
pub mod emulator;
mod hist;
pub mod image;
pub mod inputs;
pub mod options;
mod prometheus;
mod qemu;
mod reason;
pub mod record;
pub mod results;
pub mod step;
mod tls;
mod workload;

use std::{path::Path, time::Instant};

use anyhow::{Context as _, bail};

pub use self::options::Options;
use self::{
    emulator::Machine,
    inputs::KvmModules,
    options::{Isa, Kvmtrace},
    step::Step,
};

pub fn run(opts: &Options, root: &Path) -> anyhow::Result<()> {
    opts.validate()?;
    let started = Instant::now();
    let lab = root.join("target/lab");
    let cache = lab.join("cache");
    // Absolute: the emulators run in a directory of their own.
    let out = opts
        .out
        .as_ref()
        .map_or_else(|| lab.join(opts.isa.name()), |o| root.join(o));
    let build = out.join("build");
    std::fs::create_dir_all(&build)
        .with_context(|| format!("cannot create {}", build.display()))?;
    let kvm = match (&opts.kvm_modules, opts.module_set().variant()) {
        (Some(dir), _) => KvmModules::Dir(dir),
        (None, Some(variant)) => KvmModules::Build(variant),
        (None, None) => KvmModules::Debian,
    };
    let inputs = inputs::prepare(opts.isa, opts.kernel, &kvm, root, &cache)?;
    let kvmtrace = match opts.kvmtrace {
        Kvmtrace::Required => Some(inputs::build_kvmtrace(root)?),
        Kvmtrace::Off => None,
    };
    let setup = started.elapsed();

    let s = Step::start("initrd");
    let mut l1 = workload::l1(opts, root, &build, &inputs, kvmtrace)?;
    if opts.perf {
        l1.perf = Some(inputs::perf_tool(root)?);
    }
    // --scenario export serves over TLS, with a client certificate and a password.
    let pki = match opts.scenario {
        options::Scenario::Export => {
            let pki = tls::Pki::make(&build.join("tls"))?;
            l1.files.extend(pki.l1_files());
            let (curl, libs) = inputs::curl_tool(root)?;
            l1.tools.push(("usr/bin/curl".to_owned(), curl, libs));
            Some(pki)
        }
        _ => None,
    };
    if opts.install == options::Install::Deb {
        deb::add(root, &mut l1)?;
    }
    let initrd = build.join("l1-initrd.cpio");
    let size = image::l1_initrd(&l1, &initrd)?;
    s.done(format!("{} ({} MiB)", initrd.display(), size >> 20));

    // --scenario export: Prometheus scrapes L1's exporter through a forwarded port.
    let prometheus = match &pki {
        Some(pki) => {
            let host_port = prometheus::free_port()?;
            let p = prometheus::Prometheus::start(root, &cache, &build, host_port, pki)?;
            Some((p, host_port))
        }
        None => None,
    };
    let machine = Machine {
        isa: opts.isa,
        cpus: opts.l1_cpus,
        // A crowd's L1 CPUs take turns (see `Machine::parallel`); the other
        // workloads need them truly parallel (a racy counter must race).
        parallel: opts.workload != options::Workload::Crowd,
        inputs: &inputs,
        initrd: &initrd,
        build: &build,
        forward: prometheus
            .as_ref()
            .map(|(_, host)| (options::EXPORT_PORT, *host)),
    };
    let what = format!(
        "L1 {} ({} CPU{}) with {} modes {:?}",
        inputs.abi,
        opts.l1_cpus,
        if opts.l1_cpus == 1 { "" } else { "s" },
        opts.isa.paging(),
        opts.modes
    );
    let serial_log = out.join("serial.log");
    let (run, result, emu_time) = machine.boot(root, what, opts.timeout_scale, &serial_log)?;

    let tags: Vec<String> = opts
        .modes
        .iter()
        .map(|m| format!("{}{m}", opts.isa.paging()))
        .collect();
    let exported = prometheus
        .map(|(p, _)| {
            let crowd = opts.workload == options::Workload::Crowd;
            prometheus::collect(&p, &run.lines, &tags, &root.join("dist"), crowd)
        })
        .transpose()?;
    let outcome = results::summarize(opts, &out, &run, &l1, exported.as_ref());
    if let Some((kvmtrace, _)) = &l1.kvmtrace {
        ab_report::ab_report(opts, &out, kvmtrace, l1.system_map.as_deref())?;
    }
    eprintln!(
        "lab: setup {:.1} s, {} {:.1} s, total {:.1} s",
        setup.as_secs_f64(),
        match opts.isa {
            Isa::Intel => "bochs",
            Isa::Amd => "qemu",
        },
        emu_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if run.result.as_deref() != Some("pass") {
        bail!(
            "the L1 run did not pass: {result} (console in {})",
            serial_log.display()
        );
    }
    outcome
}
