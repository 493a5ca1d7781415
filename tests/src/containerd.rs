//! The private containerd that the shim's tests and benchmarks stand on (`tests/containerd-env`,
//! Debian's containerd 2.x from `make containerd`), and the offline images they import.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::batch::{batch_script, BatchCommand, BatchOutput};
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
/// absolute path: busybox sh prefers its own `ip` and `tc` applets); and nft, for the node that
/// a privileged pod builds inside its VM (`tests/nested-node`).
pub const CNI_FILES: &[&str] = &[
    "/usr/lib/cni/bridge",
    "/usr/lib/cni/host-local",
    "/usr/lib/cni/loopback",
    "/usr/sbin/ip",
    "/usr/sbin/tc",
    "/usr/sbin/nft",
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

/// How long one test's steps may run beside a shared containerd before they are stopped (and
/// reported as such), so that one wedged test leaves the others of its session their time.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(600);

/// Nothing of a pod is left: no shim, sandbox directory, /run/husk mount, shim socket, pod
/// cgroup (containerd names `/<namespace>/<id>` when CRI gives no cgroup parent), CRI sandbox
/// mount (a pod's /dev/shm, which a mount held elsewhere would keep busy) or pod network
/// namespace.
pub const NOTHING_LEFT: &str = "left: shims=0 sandboxes=0 mounts=0 sockets=0 cgroups=0 cri-mounts=0 netns=0";

/// One test's shell steps (POSIX sh) for [`beside_one_containerd`], by a name unique in its
/// session.
#[derive(Debug, Clone)]
pub struct Steps {
    pub name: &'static str,
    pub script: String,
}

impl Steps {
    pub fn new(name: &'static str, script: impl Into<String>) -> Steps {
        Steps { name, script: script.into() }
    }
}

/// Runs each test's `steps`, one after another, beside one private containerd (with its CRI
/// plugin, the busybox image in its default namespace and in CRI's `k8s.io`, and the pause image)
/// in one boot of the VM host: a containerd and a test-host boot cost ~12 s under emulation, per
/// test. Each test's steps see:
/// - `$husk`: `ctr run --runtime io.containerd.husk.v2`;
/// - `step_log`: a shell function printing containerd's log (the shims' included) written since
///   its steps began, for what the shims said about this test's pods alone;
/// - `$HUSK_CONFIG` as shipped, whatever an earlier test wrote into it.
///
/// Each test's steps are bounded by [`STEP_TIMEOUT`]; afterwards the pod shims are waited for and
/// what is left of them is reported (see [`step_text`]), with the step's shim warnings and VM
/// ends when it failed. `budget` bounds the whole session.
pub fn beside_one_containerd(tag: &str, steps: &[Steps], budget: Duration) -> BatchOutput {
    let (image, pause) = (ImageTar::busybox(tag), ImageTar::pause(tag));
    let commands: Vec<BatchCommand> = steps
        .iter()
        .map(|step| BatchCommand::new(step.name, &["sh", "-c", &step_script(&step.script)]))
        .collect();
    let script = format!(
        "{} && {} || exit 1
cp \"$HUSK_CONFIG\" \"$HUSK_CONFIG.shipped\"
{}",
        import_command(&[&image], false),
        import_command(&[&image, &pause], true),
        batch_script(&commands)
    );
    BatchOutput::split(run_beside_containerd(true, budget, &["sh", "-c", &script]))
}

/// The shell function printing containerd's log since a test's steps began (the steps and the
/// report after them run in different shells: both define it).
const STEP_LOG: &str = "step_log() { tail -c +$((HUSK_STEP_LOG_START + 1)) \"$CONTAINERD_LOG\"; }";

/// The shell running one test's `steps` for [`beside_one_containerd`].
fn step_script(steps: &str) -> String {
    let timeout = STEP_TIMEOUT.as_secs();
    format!(
        "export HUSK_STEP_LOG_START=$(wc -c < \"$CONTAINERD_LOG\")
cp \"$HUSK_CONFIG.shipped\" \"$HUSK_CONFIG\"
steps=$(mktemp)
cat > \"$steps\" <<'HUSK_STEPS_END'
husk='ctr run --runtime io.containerd.husk.v2'
{STEP_LOG}
{steps}
HUSK_STEPS_END
started=$(cut -d. -f1 /proc/uptime)
timeout {timeout} sh \"$steps\"; status=$?
rm -f \"$steps\"
echo \"steps: status $status after $(( $(cut -d. -f1 /proc/uptime) - started )) s (stopped at {timeout} s)\"
# [c]: the pattern must not match this script's own command line (a step kills shims by it).
shims() {{ ls -l /proc/[0-9]*/exe 2>/dev/null | grep -c '/[c]ontainerd-shim-husk-v2$'; }}
i=0; while [ \"$(shims)\" != 0 ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
left=\"left: shims=$(shims) sandboxes=$(ls /run/husk/sandboxes 2>/dev/null | wc -l) mounts=$(grep -c /run/husk/ /proc/mounts) \
sockets=$(ls /run/containerd/s 2>/dev/null | wc -l) cgroups=$(ls -d /sys/fs/cgroup/default/*/ /sys/fs/cgroup/k8s.io/*/ 2>/dev/null | wc -l) \
cri-mounts=$(grep -c io.containerd.grpc.v1.cri/sandboxes/ /proc/mounts) netns=$(ls /var/run/netns 2>/dev/null | wc -l)\"
echo \"$left\"
if [ $status != 0 ] || [ \"$left\" != '{NOTHING_LEFT}' ]; then
    {STEP_LOG}
    # The shims' warnings and their VMs' ends first: the tail is mostly containerd's cleanup.
    echo '--- shim warnings and VM ends of these steps'
    step_log | grep -E ' (WARN|ERROR) |VM ended' | tail -40
    echo '--- containerd log of these steps (last lines)'
    step_log | tail -30
fi
exit $status"
    )
}

/// The output of one test's steps of a [`beside_one_containerd`] session.
///
/// # Panics
/// When the steps failed or left something of their pods ([`NOTHING_LEFT`]).
pub fn step_text(output: &Output) -> String {
    let text = crate::combined(output);
    assert!(output.status.success(), "{}", describe(output));
    assert!(text.contains(NOTHING_LEFT), "nothing left behind: {text}");
    text
}

/// Runs `steps` as the only test of a [`beside_one_containerd`] session (bounded by [`BUDGET`])
/// and returns their output.
///
/// # Panics
/// When the steps fail or something is left.
pub fn with_containerd(tag: &str, steps: &str) -> String {
    step_text(beside_one_containerd(tag, &[Steps::new("steps", steps)], BUDGET).get("steps"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failing test's steps: their status and output, then what containerd logged since they
    /// began (not before), and the configuration as shipped whatever the previous steps wrote.
    #[test]
    fn a_failing_step_reports_its_status_and_the_log_written_since_it_began() {
        let work = tempfile::tempdir().unwrap();
        let (log, config) = (work.path().join("containerd.log"), work.path().join("husk.toml"));
        std::fs::write(&log, "before the steps ERROR not ours\n").unwrap();
        std::fs::write(config.with_extension("toml.shipped"), "shipped\n").unwrap();
        std::fs::write(&config, "changed by an earlier test\n").unwrap();
        let steps = "echo \"config=$(cat $HUSK_CONFIG)\"; echo 'x ERROR ours' >> $CONTAINERD_LOG
echo \"since=$(step_log | wc -l)\"; exit 3";
        let output = run(Command::new("sh")
            .args(["-c", &step_script(steps)])
            .env("CONTAINERD_LOG", &log)
            .env("HUSK_CONFIG", &config));
        let text = crate::combined(&output);
        assert_eq!(output.status.code(), Some(3), "{text}");
        assert!(text.contains("config=shipped\nsince=1\nsteps: status 3 after "), "{text}");
        let report = text.split("--- shim warnings and VM ends of these steps\n").nth(1).unwrap_or_default();
        assert!(report.starts_with("x ERROR ours\n") && !report.contains("not ours"), "{text}");
    }
}
