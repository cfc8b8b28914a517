//! The Debian side of a build: the kernel release of the day, its source and
//! headers (downloaded and unpacked, never installed), all of one version. Each
//! kernel line's packages come from its own Debian release ([`KernelLine::apt`]):
//! the host's sources for 6.1 and 6.12, a private configuration for bullseye's 5.10.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};

use super::options::{Flavour, KernelLine, Options};
use crate::{
    apt::{self, Apt},
    files::write,
};

/// The Debian inputs of one build, all of the same version.
pub struct Inputs {
    /// `uname -r` of the image, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    pub image_version: String,
    pub source_version: String,
    /// The source tarball, unpacked from `linux-source-<line>`.
    pub tarball: PathBuf,
    /// The unpacked `linux-headers-<release>` directory.
    pub headers_dir: PathBuf,
}

/// Looks up today's release in `apt` (the line's own Debian release), downloads its
/// source and headers, and refuses unless the image, the headers and the source are
/// one Debian version.
pub fn inputs(opts: &Options, apt: &Apt, root: &Path, work: &Path) -> anyhow::Result<Inputs> {
    let release = kernel_release(apt, opts.kernel, opts.flavour)?;
    let image_pkg = format!("linux-image-{release}");
    let image_version = apt.candidate(&image_pkg)?;
    let (source_version, tarball) = source_tarball(apt, opts.kernel, root)?;
    let (headers_version, headers_dir) = headers_tree(apt, &release, root, work)?;
    same_versions(&[
        (&image_pkg, &image_version),
        (&format!("linux-headers-{release}"), &headers_version),
        (&opts.kernel.source_package(), &source_version),
    ])?;
    Ok(Inputs {
        release,
        image_version,
        source_version,
        tarball,
        headers_dir,
    })
}

/// Packages that hold or pull in a kernel, or its headers: never installed by kmod.
fn is_kernel_package(name: &str) -> bool {
    [
        "linux-image-",
        "linux-headers-",
        "linux-kbuild-",
        "linux-modules-",
    ]
    .iter()
    .any(|p| name.starts_with(p))
        || matches!(name, "linux-base" | "initramfs-tools" | "udev")
}

/// The kernel release behind the image metapackage, e.g. `6.1.0-56-cloud-amd64`.
fn kernel_release(apt: &Apt, kernel: KernelLine, flavour: Flavour) -> anyhow::Result<String> {
    let meta = kernel.image_metapackage(flavour);
    apt.cache(&["depends", &meta], |deps| parse_release(deps, flavour))
        .with_context(|| format!("apt names no linux-image package for {meta}"))
}

/// Downloads the kernel source package from `apt` and unpacks it under
/// `target/kmod/debs`; its version and the path of the tarball it holds.
pub fn source_tarball(
    apt: &Apt,
    kernel: KernelLine,
    root: &Path,
) -> anyhow::Result<(String, PathBuf)> {
    let debs = root.join("target/kmod/debs");
    let deb = apt.download(&debs, &kernel.source_package())?;
    let version = apt::deb_field(&deb, "Version")?;
    let unpacked = apt::unpack(&deb, &debs.join("roots"))?;
    let tarball = unpacked.join(format!("usr/src/{}.tar.xz", kernel.source_package()));
    ensure!(
        tarball.is_file(),
        "{} holds no {}",
        deb.display(),
        tarball.display()
    );
    Ok((version, tarball))
}

/// The headers of `release`, downloaded and unpacked under `work`, never installed:
/// installing `linux-headers-*` would pull a kernel image, initramfs-tools and udev
/// onto the host through its dependencies (6.12 depends on its image). The
/// flavour's headers, the common headers and kbuild are unpacked into one root, and
/// the flavour's one-line Makefile is pointed at the unpacked common tree. Returns
/// the headers' version and their directory (`make -C` it).
///
/// What the packages need to run (compiler, pahole, libraries) is installed from the
/// host's sources when they come from there. From another release (bullseye) nothing
/// is installed: its kbuild tools run on bookworm's libraries, and the compiler it
/// names is replaced ([`KernelLine::compiler_override`]).
fn headers_tree(
    apt: &Apt,
    release: &str,
    root: &Path,
    work: &Path,
) -> anyhow::Result<(String, PathBuf)> {
    let debs = root.join("target/kmod/debs");
    let headers_pkg = format!("linux-headers-{release}");
    let flavour_deb = apt.download(&debs, &headers_pkg)?;
    let version = apt::deb_field(&flavour_deb, "Version")?;
    let mut all = vec![flavour_deb.clone()];
    for dep in apt::depends_names(&apt::deb_field(&flavour_deb, "Depends")?) {
        if dep.starts_with("linux-headers-") || dep.starts_with("linux-kbuild-") {
            all.push(apt.download(&debs, &format!("{dep}={version}"))?);
        }
    }
    ensure!(
        all.len() == 3,
        "{headers_pkg} {version} does not depend on one common headers and one kbuild package"
    );
    if apt.is_host() {
        // What those packages need to run (compiler, pahole, libraries), but no kernel.
        let mut tools = Vec::new();
        for deb in &all {
            tools.extend(
                apt::depends_names(&apt::deb_field(deb, "Depends")?)
                    .into_iter()
                    .filter(|d| !is_kernel_package(d)),
            );
        }
        apt::install(root, &tools.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    let tree = apt::unpack_into(&all, &work.join(format!("headers-{version}")))?;
    let dir = tree.join(format!("usr/src/{headers_pkg}"));
    let makefile = dir.join("Makefile");
    let text = fs::read_to_string(&makefile)
        .with_context(|| format!("cannot read {}", makefile.display()))?;
    let rewritten = point_at_common_headers(&text, &tree);
    if rewritten != text {
        write(&makefile, rewritten)?;
    }
    let include = format!("include {}/usr/src/", tree.display());
    ensure!(
        fs::read_to_string(&makefile).is_ok_and(|t| t.contains(&include)),
        "{} does not include the unpacked common headers",
        makefile.display()
    );
    Ok((version, dir))
}

/// The flavour's Makefile with its `include <dir>/usr/src/<common headers>/Makefile`
/// line pointed at the common headers unpacked in `tree`, wherever it pointed before:
/// Debian's `/usr/src/`, or a tree unpacked in a checkout since moved or renamed.
fn point_at_common_headers(text: &str, tree: &Path) -> String {
    text.split_inclusive('\n')
        .map(|line| {
            // The last `/usr/src/`: the tree's own path may hold one too.
            let common = line
                .strip_prefix("include ")
                .and_then(|path| path.rfind("/usr/src/").map(|at| &path[at..]));
            match common {
                Some(common) => format!("include {}{common}", tree.display()),
                None => line.to_owned(),
            }
        })
        .collect()
}

/// The release from `apt-cache depends linux-image-...` output.
fn parse_release(deps: &str, flavour: Flavour) -> Option<String> {
    let suffix = format!("-{}", flavour.arch_suffix());
    deps.lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends: "))
        .filter_map(|p| p.strip_prefix("linux-image-"))
        .find(|r| {
            r.ends_with(&suffix)
                && r.starts_with(|c: char| c.is_ascii_digit())
                && (flavour == Flavour::Cloud || (!r.contains("-cloud-") && !r.contains("-rt-")))
        })
        .map(str::to_owned)
}

/// Fails with one line unless every `(package, version)` has the same version.
fn same_versions(pkgs: &[(&str, &str)]) -> anyhow::Result<()> {
    if pkgs.windows(2).all(|w| w[0].1 == w[1].1) {
        return Ok(());
    }
    let list: Vec<String> = pkgs.iter().map(|(p, v)| format!("{p} {v}")).collect();
    bail!(
        "version mismatch, refusing to build: {} (modules built so would not match the \
         image: retry once the mirror carries one version of all three)",
        list.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_from_apt_cache_depends() {
        let cloud = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_release(cloud, Flavour::Cloud).as_deref(),
            Some("6.1.0-56-cloud-amd64")
        );
        let generic = "linux-image-6.12-amd64\n |Depends: linux-image-6.12.117+deb12-amd64\n  \
                       Depends: linux-image-6.12.117+deb12-amd64-unsigned\n";
        assert_eq!(
            parse_release(generic, Flavour::Generic).as_deref(),
            Some("6.12.117+deb12-amd64")
        );
        assert_eq!(parse_release(cloud, Flavour::Generic), None);
        assert_eq!(parse_release("linux-image-amd64\n", Flavour::Generic), None);
    }

    #[test]
    fn the_makefile_is_pointed_at_the_tree_wherever_it_pointed() {
        let debian = "# generated\ninclude /usr/src/linux-headers-6.1.0-27-common/Makefile\n";
        let tree = Path::new("/new/place/target/kmod/6.1-cloud/headers-6.1.158-1");
        let want = "# generated\ninclude /new/place/target/kmod/6.1-cloud/headers-6.1.158-1\
                    /usr/src/linux-headers-6.1.0-27-common/Makefile\n";
        assert_eq!(point_at_common_headers(debian, tree), want);
        // Unpacked by a checkout that was then moved: pointed at the new place.
        let moved = "# generated\ninclude /old/place/target/kmod/6.1-cloud/headers-6.1.158-1\
                     /usr/src/linux-headers-6.1.0-27-common/Makefile\n";
        assert_eq!(point_at_common_headers(moved, tree), want);
        assert_eq!(point_at_common_headers(want, tree), want, "already right");
        // A checkout under a /usr/src/ of its own.
        let under = Path::new("/usr/src/kvmtrace/target/kmod/h");
        assert_eq!(
            point_at_common_headers(debian, under),
            "# generated\ninclude /usr/src/kvmtrace/target/kmod/h/usr/src/linux-headers-6.1.0-27-common/Makefile\n"
        );
    }

    #[test]
    fn versions_must_match() {
        let same = [
            ("linux-image-x", "6.1.192-2"),
            ("linux-source-6.1", "6.1.192-2"),
        ];
        assert!(same_versions(&same).is_ok());
        let differ = [
            ("linux-image-x", "6.1.192-2"),
            ("linux-headers-x", "6.1.190-1"),
        ];
        let err = same_versions(&differ).map_err(|e| e.to_string());
        assert_eq!(
            err.err().as_deref().map(|e| e.starts_with(
                "version mismatch, refusing to build: linux-image-x 6.1.192-2, \
                 linux-headers-x 6.1.190-1 ("
            )),
            Some(true)
        );
    }
}
