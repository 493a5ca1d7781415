//! Husk's configuration (`/etc/husk/configuration.toml`, defaults in `configs/`) and the per-pod
//! sizing it allows through `io.husk.*` annotations. Errors name the file and key (with the line
//! the TOML parser reports) or the annotation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The installed configuration file.
pub const DEFAULT_PATH: &str = "/etc/husk/configuration.toml";
/// Environment variable naming another configuration file.
pub const PATH_ENV: &str = "HUSK_CONFIG";
/// Prefix of the pod annotations the runtime section may allow.
pub const ANNOTATION_PREFIX: &str = "io.husk.";
/// Annotations that can be allowed.
const KNOWN_ANNOTATIONS: &[&str] = &["vcpus", "memory_mib"];
/// CRI's annotations on a pod's sandbox container: the pod's summed memory limit (bytes) and CPU
/// quota and period (microseconds), when its containers set limits.
const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// The smallest guest the image boots in.
const MIN_MEMORY_MIB: u64 = 64;
/// Bounds of `hypervisor.virtio_fs_max_fds`: enough for a container to start, and no more than
/// the shim's own open-file limit leaves for the rest of the process.
const MIN_FS_MAX_FDS: usize = 256;
const MAX_FS_MAX_FDS: usize = (husk_vmm::host::WANTED_FD_LIMIT * 7 / 8) as usize;

/// Why the configuration or a pod's request cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: {key} {message}", path.display())]
    Invalid { path: PathBuf, key: &'static str, message: String },
    #[error("annotation {annotation}: {message}")]
    Annotation { annotation: String, message: String },
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub hypervisor: HypervisorConfig,
    pub agent: AgentConfig,
    pub runtime: RuntimeConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HypervisorConfig {
    /// Guest image directory; empty: located (see [`crate::guest_image::GuestImage::locate`]).
    pub image_dir: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub max_vcpus: u8,
    pub max_memory_mib: u64,
    pub kernel_params: String,
    /// vCPU and device threads under their seccomp filters (husk_vmm::seccomp).
    pub seccomp: bool,
    /// The most host files (inodes and open handles) a pod's share holds for its guest.
    pub virtio_fs_max_fds: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub boot_timeout_s: u64,
    /// Seconds a running agent may leave a health check unanswered before its VM is stopped
    /// (0: not checked).
    pub health_timeout_s: u64,
}

impl AgentConfig {
    /// The health check's timeout, if the agent is checked.
    pub fn health_timeout(&self) -> Option<std::time::Duration> {
        (self.health_timeout_s > 0).then(|| std::time::Duration::from_secs(self.health_timeout_s))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    pub sandbox_dir: PathBuf,
    pub enable_annotations: Vec<String>,
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        HypervisorConfig {
            image_dir: PathBuf::new(),
            vcpus: 1,
            memory_mib: 256,
            max_vcpus: 8,
            max_memory_mib: 16384,
            kernel_params: String::new(),
            seccomp: true,
            virtio_fs_max_fds: husk_vmm::devices::virtio::fs::DEFAULT_MAX_FDS,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig { boot_timeout_s: 120, health_timeout_s: 30 }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            sandbox_dir: PathBuf::from("/run/husk/sandboxes"),
            // Off: a pod that sizes its own VM could outgrow what its cgroup is charged for.
            enable_annotations: Vec::new(),
        }
    }
}

/// A configuration and where it came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: Config,
    /// The file read, or `None` when none exists at the default path (defaults apply).
    pub source: Option<PathBuf>,
}

/// How big a pod's VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodSizing {
    pub vcpus: u8,
    pub memory_mib: u64,
}

impl Config {
    /// Loads `explicit`, else `$HUSK_CONFIG`, else the default path if it exists (a missing file
    /// there means the defaults; an explicitly named file must exist).
    pub fn load(explicit: Option<&Path>) -> Result<LoadedConfig, ConfigError> {
        let named = explicit.map(Path::to_path_buf).or_else(|| std::env::var_os(PATH_ENV).map(PathBuf::from));
        let path = match named {
            Some(path) => path,
            None if Path::new(DEFAULT_PATH).exists() => PathBuf::from(DEFAULT_PATH),
            None => return Ok(LoadedConfig { config: Config::default(), source: None }),
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        let config = Config::parse(&text, &path)?;
        Ok(LoadedConfig { config, source: Some(path) })
    }

    /// Parses and checks `text` (read from `path`, named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text)
            .map_err(|err| ConfigError::Parse { path: path.to_path_buf(), message: err.to_string() })?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid =
            |key, message: String| Err(ConfigError::Invalid { path: path.to_path_buf(), key, message });
        let h = &self.hypervisor;
        if h.vcpus == 0 || h.vcpus > h.max_vcpus {
            return invalid(
                "hypervisor.vcpus",
                format!("= {}: must be 1 to max_vcpus ({})", h.vcpus, h.max_vcpus),
            );
        }
        if h.memory_mib < MIN_MEMORY_MIB || h.memory_mib > h.max_memory_mib {
            return invalid(
                "hypervisor.memory_mib",
                format!(
                    "= {}: must be {MIN_MEMORY_MIB} to max_memory_mib ({})",
                    h.memory_mib, h.max_memory_mib
                ),
            );
        }
        if !(MIN_FS_MAX_FDS..=MAX_FS_MAX_FDS).contains(&h.virtio_fs_max_fds) {
            return invalid(
                "hypervisor.virtio_fs_max_fds",
                format!("= {}: must be {MIN_FS_MAX_FDS} to {MAX_FS_MAX_FDS}", h.virtio_fs_max_fds),
            );
        }
        if self.agent.boot_timeout_s == 0 {
            return invalid("agent.boot_timeout_s", "= 0: must be at least 1".into());
        }
        if let Some(unknown) =
            self.runtime.enable_annotations.iter().find(|a| !KNOWN_ANNOTATIONS.contains(&a.as_str()))
        {
            return invalid(
                "runtime.enable_annotations",
                format!("names {unknown:?}; allowed are {}", KNOWN_ANNOTATIONS.join(", ")),
            );
        }
        Ok(())
    }

    /// The VM size for a pod with `annotations`: the defaults, plus the pod's limits where CRI
    /// gives them (its memory limit on top of the default memory, its CPU quota rounded up on top
    /// of the default vCPUs, so the guest's own kernel and agent keep their share, as Kata does),
    /// overridden by allowed `io.husk.*` annotations. An annotation that is not allowed, not a
    /// number or out of bounds is an error naming it.
    pub fn pod_sizing(&self, annotations: &HashMap<String, String>) -> Result<PodSizing, ConfigError> {
        let h = &self.hypervisor;
        let mut sizing = PodSizing { vcpus: h.vcpus, memory_mib: h.memory_mib };
        self.add_cri_limits(annotations, &mut sizing)?;
        self.apply_husk_annotations(annotations, &mut sizing)?;
        Ok(sizing)
    }

    fn add_cri_limits(
        &self,
        annotations: &HashMap<String, String>,
        sizing: &mut PodSizing,
    ) -> Result<(), ConfigError> {
        let h = &self.hypervisor;
        let number = |key: &str| -> Result<Option<u64>, ConfigError> {
            let Some(value) = annotations.get(key) else { return Ok(None) };
            let parsed = value.parse::<i64>().map_err(|_| ConfigError::Annotation {
                annotation: key.to_owned(),
                message: format!("{value:?} is not a whole number"),
            })?;
            Ok(u64::try_from(parsed).ok().filter(|n| *n > 0))
        };
        if let Some(bytes) = number(CRI_SANDBOX_MEMORY)? {
            sizing.memory_mib = sizing.memory_mib.saturating_add(bytes.div_ceil(1 << 20));
            if sizing.memory_mib > h.max_memory_mib {
                return Err(ConfigError::Annotation {
                    annotation: CRI_SANDBOX_MEMORY.into(),
                    message: format!(
                        "the pod's memory limit ({bytes} bytes) and the default {} MiB exceed hypervisor.max_memory_mib ({})",
                        h.memory_mib, h.max_memory_mib
                    ),
                });
            }
        }
        if let (Some(quota), Some(period)) = (number(CRI_SANDBOX_CPU_QUOTA)?, number(CRI_SANDBOX_CPU_PERIOD)?)
        {
            let cpus = quota.div_ceil(period);
            let total = u64::from(h.vcpus).saturating_add(cpus);
            sizing.vcpus = u8::try_from(total).ok().filter(|n| *n <= h.max_vcpus).ok_or_else(|| {
                ConfigError::Annotation {
                    annotation: CRI_SANDBOX_CPU_QUOTA.into(),
                    message: format!(
                        "the pod's CPU limit ({cpus} CPUs) and the default {} vCPUs exceed hypervisor.max_vcpus ({})",
                        h.vcpus, h.max_vcpus
                    ),
                }
            })?;
        }
        Ok(())
    }

    fn apply_husk_annotations(
        &self,
        annotations: &HashMap<String, String>,
        sizing: &mut PodSizing,
    ) -> Result<(), ConfigError> {
        let h = &self.hypervisor;
        for (key, value) in annotations {
            let Some(name) = key.strip_prefix(ANNOTATION_PREFIX) else { continue };
            let refuse = |message: String| ConfigError::Annotation { annotation: key.clone(), message };
            if !self.runtime.enable_annotations.iter().any(|allowed| allowed == name) {
                return Err(refuse(match self.runtime.enable_annotations.is_empty() {
                    true => format!(
                        "not allowed by runtime.enable_annotations (empty, the default: the node's \
                         operator may allow {})",
                        KNOWN_ANNOTATIONS.join(", ")
                    ),
                    false => format!(
                        "not allowed by runtime.enable_annotations ({})",
                        self.runtime.enable_annotations.join(", ")
                    ),
                }));
            }
            let number: u64 =
                value.parse().map_err(|_| refuse(format!("{value:?} is not a whole number")))?;
            match name {
                "vcpus" => {
                    sizing.vcpus = u8::try_from(number)
                        .ok()
                        .filter(|n| (1..=h.max_vcpus).contains(n))
                        .ok_or_else(|| refuse(format!("{number}: must be 1 to {}", h.max_vcpus)))?;
                }
                "memory_mib" => {
                    if !(MIN_MEMORY_MIB..=h.max_memory_mib).contains(&number) {
                        return Err(refuse(format!(
                            "{number}: must be {MIN_MEMORY_MIB} to {}",
                            h.max_memory_mib
                        )));
                    }
                    sizing.memory_mib = number;
                }
                _ => return Err(refuse("unknown Husk annotation".into())),
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML.
    pub fn render(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/husk/configuration.toml"))
    }

    #[test]
    fn the_shipped_file_is_exactly_the_defaults() {
        let shipped = include_str!("../../configs/configuration.toml");
        assert_eq!(parse(shipped).unwrap(), Config::default());
        assert_eq!(parse("").unwrap(), Config::default(), "every key is optional");
        let rendered = Config::default().render();
        assert_eq!(parse(&rendered).unwrap(), Config::default(), "husk env's output reads back");
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let err = parse("[hypervisor]\nvcpu = 2\n").unwrap_err().to_string();
        assert!(err.contains("/etc/husk/configuration.toml") && err.contains("vcpu"), "{err}");
        let err = parse("[hypervisor]\nmemory_mib = \"lots\"\n").unwrap_err().to_string();
        assert!(err.contains("memory_mib") && err.contains("line 2"), "{err}");
        let err = parse("[hypervisor]\nvcpus = 9\n").unwrap_err().to_string();
        assert!(err.contains("hypervisor.vcpus = 9"), "{err}");
        let err = parse("[hypervisor]\nvirtio_fs_max_fds = 10\n").unwrap_err().to_string();
        assert!(err.contains("hypervisor.virtio_fs_max_fds = 10: must be 256 to"), "{err}");
        let err = parse("[runtime]\nenable_annotations = [\"kernel\"]\n").unwrap_err().to_string();
        assert!(err.contains("runtime.enable_annotations") && err.contains("\"kernel\""), "{err}");
        let err = Config::load(Some(Path::new("/nonexistent/husk.toml"))).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/husk.toml"), "{err}");
    }

    /// The defaults with every sizing annotation allowed.
    fn open_config() -> Config {
        let mut config = Config::default();
        config.runtime.enable_annotations = KNOWN_ANNOTATIONS.iter().map(|a| (*a).to_owned()).collect();
        config
    }

    #[test]
    fn allowed_annotations_size_the_pod_and_bad_ones_are_named() {
        let config = open_config();
        let annotations = |pairs: &[(&str, &str)]| {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<HashMap<_, _>>()
        };
        let sizing =
            config.pod_sizing(&annotations(&[("io.husk.vcpus", "2"), ("io.husk.memory_mib", "512")]));
        assert_eq!(sizing.unwrap(), PodSizing { vcpus: 2, memory_mib: 512 });
        let other = annotations(&[("io.kubernetes.cri.sandbox-id", "x")]);
        assert_eq!(config.pod_sizing(&other).unwrap(), PodSizing { vcpus: 1, memory_mib: 256 });
        for (key, value, expect) in [
            ("io.husk.vcpus", "0", "must be 1 to 8"),
            ("io.husk.vcpus", "two", "not a whole number"),
            ("io.husk.memory_mib", "99999", "must be 64 to 16384"),
            ("io.husk.kernel", "x", "not allowed"),
        ] {
            let err = config.pod_sizing(&annotations(&[(key, value)])).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(expect), "{key}={value}: {err}");
        }
        // Off by default: a pod does not size its own VM unless the operator allows it.
        let err =
            Config::default().pod_sizing(&annotations(&[("io.husk.vcpus", "2")])).unwrap_err().to_string();
        assert!(err.contains("io.husk.vcpus") && err.contains("not allowed"), "{err}");
        assert!(err.contains("the default") && err.contains("vcpus, memory_mib"), "{err}");
    }

    #[test]
    fn a_cri_pods_limits_add_to_the_default_size() {
        let config = Config::default();
        let annotations = |pairs: &[(&str, &str)]| {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<HashMap<_, _>>()
        };
        // 1.5 CPUs and 128 MiB + 1 byte of limits: 2 more vCPUs, 129 more MiB.
        let limited = annotations(&[
            (CRI_SANDBOX_CPU_QUOTA, "150000"),
            (CRI_SANDBOX_CPU_PERIOD, "100000"),
            (CRI_SANDBOX_MEMORY, &((128u64 << 20) + 1).to_string()),
        ]);
        assert_eq!(config.pod_sizing(&limited).unwrap(), PodSizing { vcpus: 3, memory_mib: 256 + 129 });
        // No limits (CRI writes 0 or -1): the defaults.
        let unlimited = annotations(&[
            (CRI_SANDBOX_CPU_QUOTA, "-1"),
            (CRI_SANDBOX_CPU_PERIOD, "100000"),
            (CRI_SANDBOX_MEMORY, "0"),
        ]);
        assert_eq!(config.pod_sizing(&unlimited).unwrap(), PodSizing { vcpus: 1, memory_mib: 256 });
        let huge = annotations(&[(CRI_SANDBOX_CPU_QUOTA, "6400000"), (CRI_SANDBOX_CPU_PERIOD, "100000")]);
        let err = config.pod_sizing(&huge).unwrap_err().to_string();
        assert!(err.contains(CRI_SANDBOX_CPU_QUOTA) && err.contains("max_vcpus"), "{err}");
        let err = config.pod_sizing(&annotations(&[(CRI_SANDBOX_MEMORY, "lots")])).unwrap_err().to_string();
        assert!(err.contains(CRI_SANDBOX_MEMORY) && err.contains("not a whole number"), "{err}");
        // An allowed io.husk annotation still has the last word.
        let config = open_config();
        let both = annotations(&[(CRI_SANDBOX_MEMORY, "1048576"), ("io.husk.memory_mib", "300")]);
        assert_eq!(config.pod_sizing(&both).unwrap().memory_mib, 300);
    }
}
