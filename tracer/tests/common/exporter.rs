//! A running `kvmtrace export` for the tests that serve.

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    l.local_addr()
        .unwrap_or_else(|e| panic!("addr: {e}"))
        .port()
}

/// A running exporter, killed if the test fails before it stops it.
pub struct Exporter(pub Child);

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Exporter {
    /// Its pid, for signals and /proc.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.0.id()).unwrap_or_else(|e| panic!("pid: {e}"))
    }
}

/// Starts `kvmtrace export` on 127.0.0.1:`port` with `args` and waits until it serves.
/// Its log lines go to `log` (to look at them), each as it comes.
pub fn start_with(
    port: u16,
    args: &[&str],
    log: Option<std::sync::mpsc::Sender<String>>,
) -> Exporter {
    let mut child = super::kvmtrace()
        .arg("export")
        .args(args)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn: {e}"));
    let err = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
    let mut lines = BufReader::new(err).lines();
    let started = Instant::now();
    let mut said = Vec::new();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("kvmtrace export ended before serving: {said:?}"))
            .unwrap_or_else(|e| panic!("stderr: {e}"));
        if line.contains("serving KVM exit metrics on ")
            && line.contains(&format!("127.0.0.1:{port}/metrics"))
        {
            break;
        }
        said.push(line);
        assert!(started.elapsed() < Duration::from_secs(60), "not serving");
    }
    // Keep reading its log so it never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Some(log) = &log {
                let _ = log.send(line);
            }
        }
    });
    Exporter(child)
}

/// Starts `kvmtrace export --time` on `port` and waits until it serves.
pub fn start(port: u16) -> Exporter {
    start_with(port, &["--time"], None)
}
