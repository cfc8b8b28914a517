//! `--install deb`: L1 installs the package of `cargo xtask dist` with `dpkg -i` and
//! runs kvmtrace from /usr/bin as the exporter's unit does: an unprivileged user with
//! exactly the unit's capabilities (lab/l1-init.sh, `install_deb`).

use std::path::Path;

use anyhow::Context as _;

use super::{image::L1, inputs, step::Step};

/// Adds the .deb, what installs it (dpkg, dpkg-deb, dpkg-query and GNU tar, which
/// dpkg-deb runs) and setpriv to `l1`, with the unit's capabilities.
pub fn add(root: &Path, l1: &mut L1) -> anyhow::Result<()> {
    let deb = crate::dist::build(root)?;
    let s = Step::start("deb-tools");
    l1.files.push(("lab/kvmtrace.deb".to_owned(), deb));
    for (name, package) in [
        ("dpkg", "dpkg"),
        ("dpkg-deb", "dpkg"),
        ("dpkg-query", "dpkg"),
        ("tar", "tar"),
        ("setpriv", "util-linux"),
    ] {
        let (program, libs) = inputs::host_program(root, name, package)?;
        l1.tools.push((format!("usr/bin/{name}"), program, libs));
    }
    let unit = root.join("dist/kvmtrace-export.service");
    let text = std::fs::read_to_string(&unit)
        .with_context(|| format!("cannot read {}", unit.display()))?;
    let caps = unit_caps(&text)
        .with_context(|| format!("{} has no AmbientCapabilities= line", unit.display()))?;
    s.done(format!("the unit's capabilities: {caps}"));
    l1.unit_caps = Some(caps);
    Ok(())
}

/// The capabilities a unit gives its service (`AmbientCapabilities=`, all lines).
fn unit_caps(unit: &str) -> Option<String> {
    let caps: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix("AmbientCapabilities="))
        .flat_map(str::split_whitespace)
        .collect();
    (!caps.is_empty()).then(|| caps.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_units_capabilities_are_read_from_it() {
        let unit = "[Service]\nAmbientCapabilities=CAP_BPF CAP_PERFMON\n# x\nAmbientCapabilities=CAP_DAC_READ_SEARCH\n";
        assert_eq!(
            unit_caps(unit).as_deref(),
            Some("CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH")
        );
        assert_eq!(unit_caps("[Service]\n"), None);
        let ours = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/kvmtrace-export.service"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            unit_caps(&ours).as_deref(),
            Some("CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH")
        );
    }
}
