//! A pod's cgroup on the node, made as the kubelet makes one with the cgroupfs driver: a
//! directory under `/sys/fs/cgroup/kubepods`, with the pod's memory limit (the containers' limits
//! plus the RuntimeClass overhead), named to containerd's CRI as the pod's `cgroup_parent`. The
//! runtime puts the pod's sandbox in `<parent>/<pod id>`; this module reads what it costs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

const ROOT: &str = "/sys/fs/cgroup";
/// The controllers the kubelet delegates down to its pods.
const CONTROLLERS: &[&str] = &["+cpu", "+memory", "+pids"];

/// See the module documentation. Removed by [`PodCgroup::remove`] (which fails while the
/// runtime has left something in it).
#[derive(Debug)]
pub struct PodCgroup {
    /// `/kubepods/<name>`, as CRI's `cgroup_parent` names it.
    parent: String,
    dir: PathBuf,
}

impl PodCgroup {
    /// `/kubepods/<name>`, limited to `memory_max` bytes when given.
    pub fn create(name: &str, memory_max: Option<u64>) -> Result<PodCgroup> {
        let parent = format!("/kubepods/{name}");
        let dir = Path::new(ROOT).join(parent.trim_start_matches('/'));
        for delegating in [Path::new(ROOT), &Path::new(ROOT).join("kubepods")] {
            std::fs::create_dir_all(delegating).with_context(|| delegating.display().to_string())?;
            for controller in CONTROLLERS {
                let control = delegating.join("cgroup.subtree_control");
                std::fs::write(&control, controller)
                    .with_context(|| format!("{controller} in {}", control.display()))?;
            }
        }
        std::fs::create_dir(&dir).with_context(|| dir.display().to_string())?;
        if let Some(bytes) = memory_max {
            write(&dir, "memory.max", &bytes.to_string())?;
        }
        Ok(PodCgroup { parent, dir })
    }

    /// What CRI's `LinuxPodSandboxConfig.cgroup_parent` says.
    pub fn cgroup_parent(&self) -> &str {
        &self.parent
    }

    /// The cgroup the runtime gives the pod's sandbox (containerd's `<parent>/<pod id>`).
    pub fn sandbox(&self, pod_id: &str) -> PathBuf {
        self.dir.join(pod_id)
    }

    /// The commands (`comm`) of the processes in the pod's sandbox cgroup.
    pub fn sandbox_commands(&self, pod_id: &str) -> Result<Vec<String>> {
        let procs = read(&self.sandbox(pod_id), "cgroup.procs")?;
        Ok(procs
            .lines()
            .map(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_owned()
            })
            .collect())
    }

    /// The most memory the pod's cgroup has been charged for, in MiB.
    pub fn peak_mib(&self) -> Result<f64> {
        let bytes: u64 = read(&self.dir, "memory.peak")?.trim().parse().context("memory.peak")?;
        Ok(bytes as f64 / f64::from(1 << 20))
    }

    /// How many processes of the pod the node's OOM killer killed (`memory.events`).
    pub fn oom_kills(&self) -> Result<u64> {
        let events = read(&self.dir, "memory.events")?;
        let count = events.lines().find_map(|line| line.strip_prefix("oom_kill ")).unwrap_or("0");
        count.trim().parse().context("memory.events oom_kill")
    }

    /// Removes the pod's cgroup, as the kubelet does once the runtime has removed the pod.
    pub fn remove(self) -> Result<()> {
        std::fs::remove_dir(&self.dir).with_context(|| format!("removing {}", self.dir.display()))
    }
}

fn read(dir: &Path, file: &str) -> Result<String> {
    let path = dir.join(file);
    std::fs::read_to_string(&path).with_context(|| path.display().to_string())
}

fn write(dir: &Path, file: &str, value: &str) -> Result<()> {
    let path = dir.join(file);
    std::fs::write(&path, value).with_context(|| format!("{value} > {}", path.display()))
}

/// The memory overhead `configs/runtimeclass.yaml` declares for a Husk pod, in bytes.
///
/// # Panics
/// When the file or its `memory: "<n>Mi"` line is missing.
pub fn runtimeclass_memory_overhead() -> u64 {
    let path = crate::workspace_root().join("configs/runtimeclass.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    text.lines()
        .find_map(|line| line.trim().strip_prefix("memory: \"")?.strip_suffix("Mi\"")?.parse::<u64>().ok())
        .map(|mib| mib << 20)
        .unwrap_or_else(|| panic!("{}: no `memory: \"<n>Mi\"` line", path.display()))
}
