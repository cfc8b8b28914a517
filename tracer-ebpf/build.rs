use which::which;

/// Rebuilds the eBPF object when the bpf-linker binary changes.
///
/// Cargo cannot track a tool outside the package, so this watches the path that `which`
/// finds: it misses an upgrade installed elsewhere on PATH, which is the same trade-off
/// aya-template makes (rust-lang/cargo#9661 asks for something better).
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found on PATH: run `cargo xtask setup`"),
    }
}
