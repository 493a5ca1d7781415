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

/// How long a test's whole containerd run may take in the test host.
pub const BUDGET: Duration = Duration::from_secs(900);

/// Nothing of a pod is left: no shim, sandbox directory, /run/husk mount, shim socket or pod
/// cgroup (containerd names `/<namespace>/<id>` when CRI gives no cgroup parent).
pub const NOTHING_LEFT: &str = "left: shims=0 sandboxes=0 mounts=0 sockets=0 cgroups=0";

/// Runs `steps` (POSIX sh, with `$husk` = `ctr run --runtime io.containerd.husk.v2`) beside a
/// private containerd that has the busybox image (with `cri`: its CRI plugin too, and the
/// busybox and pause images in CRI's namespace), then waits for the pod shims to go and asserts
/// that what is left of them is [`NOTHING_LEFT`]; returns the output.
///
/// # Panics
/// When the steps fail or something is left.
pub fn with_containerd(name: &str, cri: bool, steps: &str) -> String {
    let (image, pause) = (ImageTar::busybox(name), cri.then(|| ImageTar::pause(name)));
    let mut images = vec![&image];
    images.extend(pause.as_ref());
    let imports = import_command(&images, cri);
    let script = format!(
        "{imports} || exit 1
husk='ctr run --runtime io.containerd.husk.v2'
{steps}
# [c]: the pattern must not match this script's own command line (a step kills shims by it).
shims() {{ ls -l /proc/[0-9]*/exe 2>/dev/null | grep -c '/[c]ontainerd-shim-husk-v2$'; }}
i=0; while [ \"$(shims)\" != 0 ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
echo \"left: shims=$(shims) sandboxes=$(ls /run/husk/sandboxes 2>/dev/null | wc -l) mounts=$(grep -c /run/husk/ /proc/mounts) sockets=$(ls /run/containerd/s 2>/dev/null | wc -l) \
cgroups=$(ls -d /sys/fs/cgroup/default/*/ /sys/fs/cgroup/k8s.io/*/ 2>/dev/null | wc -l)\"",
    );
    let output = run_beside_containerd(cri, BUDGET, &["sh", "-c", &script]);
    let text = crate::combined(&output);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(text.contains(NOTHING_LEFT), "nothing left behind: {text}");
    text
}
