//! The private containerd that the shim's tests and benchmarks stand on (`tests/containerd-env`,
//! Debian's containerd 2.x from `make containerd`), and the offline images they import.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::{describe, run, workspace_root, VmHost};

/// The busybox image (`scripts/busybox-oci-image`).
pub const BUSYBOX: &str = "docker.io/library/busybox:husk";
/// The pause image of CRI pods, as `tests/containerd-env --cri` pins it: busybox sleeping.
pub const PAUSE: &str = "docker.io/library/pause:husk";
const PAUSE_CMD: &str = r#"["sleep","2147483647"]"#;

/// An offline OCI image archive in `build/test-scratch` (visible in the test host), removed on
/// drop.
#[derive(Debug)]
pub struct ImageTar(PathBuf);

impl ImageTar {
    /// The busybox image, in a file named after `tag`.
    pub fn busybox(tag: &str) -> ImageTar {
        ImageTar::build(&format!("busybox-oci-{tag}.tar"), &[])
    }

    /// The pause image, in a file named after `tag`.
    pub fn pause(tag: &str) -> ImageTar {
        ImageTar::build(&format!("pause-oci-{tag}.tar"), &[PAUSE, PAUSE_CMD])
    }

    fn build(file: &str, args: &[&str]) -> ImageTar {
        let root = workspace_root();
        let path = root.join("build/test-scratch").join(file);
        std::fs::create_dir_all(path.parent().unwrap_or(&root)).unwrap_or_default();
        let made = run(Command::new(root.join("scripts/busybox-oci-image")).arg(&path).args(args));
        assert!(made.status.success(), "{}", describe(&made));
        ImageTar(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ImageTar {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A shell command importing `images` (into CRI's namespace `k8s.io` with `cri`).
pub fn import_command(images: &[&ImageTar], cri: bool) -> String {
    let namespace = if cri { "-n k8s.io " } else { "" };
    let imports: Vec<String> = images
        .iter()
        .map(|image| format!("ctr {namespace}images import {} >/dev/null", image.path().display()))
        .collect();
    imports.join(" && ")
}

/// What the CRI pods' network needs on the VM host: the CNI plugins of `tests/containerd-env`'s
/// network (Debian's containernetworking-plugins) and iproute2 for the leftover checks (called by
/// absolute path: busybox sh prefers its own `ip` and `tc` applets).
pub const CNI_FILES: &[&str] = &[
    "/usr/lib/cni/bridge",
    "/usr/lib/cni/host-local",
    "/usr/lib/cni/loopback",
    "/usr/sbin/ip",
    "/usr/sbin/tc",
];

/// Runs `args` beside a private containerd (with its CRI plugin and the `husk` handler when
/// `cri`) on the VM host, with runc available for baselines; returns the output.
pub fn run_beside_containerd(cri: bool, timeout: Duration, args: &[&str]) -> Output {
    let root = workspace_root();
    let (env, containerd) = (root.join("tests/containerd-env"), root.join("build/containerd"));
    let mut all = vec![env.to_str().unwrap_or_default()];
    if cri {
        all.push("--cri");
    }
    all.extend([containerd.to_str().unwrap_or_default(), "--"]);
    all.extend(args);
    let mut files = vec![Path::new("/usr/sbin/runc")];
    if cri {
        files.extend(CNI_FILES.iter().map(Path::new));
    }
    run(&mut VmHost::detect().command_with(timeout, &files, &all))
}
