//! `husk check`: can this host run Husk, and if not, why not.
//!
//! Each check is independent and reports a one-line summary plus structured details; the host is
//! ready when every check passes.

use std::fs;
use std::process::Command;

use husk_vmm::host::KvmReport;
use serde::Serialize;
use serde_json::{json, Value};

use crate::guest_image::GuestImage;

/// cgroup v2 controllers the shim relies on to account for and limit a pod's VMM.
const REQUIRED_CGROUP_CONTROLLERS: &[&str] = &["cpu", "memory", "pids"];
/// The oldest containerd major version whose task API (v3) the shim speaks.
const MIN_CONTAINERD_MAJOR: u32 = 2;

/// The checks `husk check` knows, in the order it runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckName {
    /// /dev/kvm is hardware virtualisation and runs a probe VM.
    Kvm,
    /// The guest kernel and initramfs are present and match their manifest.
    GuestImage,
    /// cgroup v2 with the controllers the shim uses.
    Cgroup,
    /// containerd 2.x is installed.
    Containerd,
    /// containerd can start Husk: `containerd-shim-husk-v2` of this version is on PATH.
    Shim,
}

impl CheckName {
    /// Every check, in run order.
    pub const ALL: [CheckName; 5] =
        [CheckName::Kvm, CheckName::GuestImage, CheckName::Cgroup, CheckName::Containerd, CheckName::Shim];
}

/// All checks and the overall verdict.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub ready: bool,
    pub checks: Vec<Check>,
}

/// The outcome of one check.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub summary: String,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub details: Value,
}

impl CheckReport {
    /// Runs every check, or only those named in `only` (all when empty).
    pub fn run(only: &[CheckName]) -> CheckReport {
        let checks: Vec<Check> = CheckName::ALL
            .iter()
            .filter(|name| only.is_empty() || only.contains(name))
            .map(|name| match name {
                CheckName::Kvm => check_kvm(),
                CheckName::GuestImage => check_guest_image(),
                CheckName::Cgroup => check_cgroup2(),
                CheckName::Containerd => check_containerd(),
                CheckName::Shim => check_shim(),
            })
            .collect();
        CheckReport { ready: checks.iter().all(|c| c.ok), checks }
    }

    /// The report as aligned text lines for a terminal.
    pub fn render_text(&self) -> String {
        let mut out = format!("husk check: {}\n", if self.ready { "ready" } else { "NOT READY" });
        for check in &self.checks {
            let mark = if check.ok { "ok" } else { "FAIL" };
            out.push_str(&format!("  [{mark:>4}] {:<12} {}\n", check.name, check.summary));
        }
        out
    }
}

fn check_kvm() -> Check {
    let report = match KvmReport::probe() {
        Ok(report) => report,
        Err(err) => return Check { name: "kvm", ok: false, summary: err.to_string(), details: Value::Null },
    };
    let details = serde_json::to_value(&report).unwrap_or(Value::Null);
    match report.usable() {
        Ok(()) => Check {
            name: "kvm",
            ok: true,
            summary: format!(
                "usable: {}; API {}, up to {} vCPUs per VM; probe VM created and ran",
                report.kind_summary(),
                report.api_version,
                report.max_vcpus
            ),
            details,
        },
        Err(reason) => Check { name: "kvm", ok: false, summary: reason, details },
    }
}

fn check_guest_image() -> Check {
    match GuestImage::locate() {
        Ok(image) => Check {
            name: "guest image",
            ok: true,
            summary: format!(
                "{} (kernel {:.1} MiB, initramfs {:.1} MiB, agent {} API {}); hashes match the manifest",
                image.dir.display(),
                mib(image.manifest.kernel.size),
                mib(image.manifest.initramfs.size),
                image.manifest.agent.version,
                image.manifest.agent.api
            ),
            details: json!({ "dir": image.dir, "manifest": image.manifest }),
        },
        Err(err) => Check { name: "guest image", ok: false, summary: err.to_string(), details: Value::Null },
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn check_cgroup2() -> Check {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let fail = |summary: String| Check { name: "cgroup v2", ok: false, summary, details: Value::Null };
    if !is_cgroup2_mount(&mountinfo, "/sys/fs/cgroup") {
        return fail(
            "/sys/fs/cgroup is not a cgroup v2 (unified) mount; boot the host with cgroup v2 \
                     (systemd.unified_cgroup_hierarchy=1)"
                .to_owned(),
        );
    }
    let controllers = match fs::read_to_string("/sys/fs/cgroup/cgroup.controllers") {
        Ok(text) => text.split_whitespace().map(str::to_owned).collect::<Vec<_>>(),
        Err(err) => return fail(format!("/sys/fs/cgroup/cgroup.controllers: {err}")),
    };
    let missing: Vec<_> =
        REQUIRED_CGROUP_CONTROLLERS.iter().filter(|c| !controllers.iter().any(|have| have == *c)).collect();
    let details = json!({ "controllers": controllers });
    if missing.is_empty() {
        Check {
            name: "cgroup v2",
            ok: true,
            summary: format!("/sys/fs/cgroup ({})", controllers.join(" ")),
            details,
        }
    } else {
        let missing = missing.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ");
        Check {
            name: "cgroup v2",
            ok: false,
            summary: format!("controllers missing at /sys/fs/cgroup: {missing}"),
            details,
        }
    }
}

/// True when `mountinfo` (format of `/proc/self/mountinfo`) has a cgroup2 mount at `target`.
fn is_cgroup2_mount(mountinfo: &str, target: &str) -> bool {
    mountinfo.lines().any(|line| {
        let mut fields = line.split(' ');
        let mount_point = fields.nth(4);
        let fstype = line.split(" - ").nth(1).and_then(|rest| rest.split(' ').next());
        mount_point == Some(target) && fstype == Some("cgroup2")
    })
}

fn check_containerd() -> Check {
    let fail = |summary: String| Check { name: "containerd", ok: false, summary, details: Value::Null };
    let output = match Command::new("containerd").arg("--version").output() {
        Ok(output) if output.status.success() => output,
        Ok(output) => return fail(format!("`containerd --version` failed with {}", output.status)),
        Err(err) => return fail(format!("containerd not found in PATH ({err}); Husk needs containerd 2.x")),
    };
    let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    match containerd_major(&text) {
        Some(major) if major >= MIN_CONTAINERD_MAJOR => {
            Check { name: "containerd", ok: true, summary: text.clone(), details: json!({ "version": text }) }
        }
        Some(_) => fail(format!(
            "{text}: Husk speaks task API v3 and needs containerd {MIN_CONTAINERD_MAJOR}.x or newer"
        )),
        None => fail(format!("cannot read a version in `containerd --version` output: {text:?}")),
    }
}

/// containerd runs `containerd-shim-husk-v2` from its PATH for the runtime io.containerd.husk.v2.
fn check_shim() -> Check {
    const SHIM: &str = "containerd-shim-husk-v2";
    let fail = |summary: String| Check { name: "shim", ok: false, summary, details: Value::Null };
    let output = match Command::new(SHIM).arg("-v").output() {
        Ok(output) if output.status.success() => output,
        Ok(output) => return fail(format!("`{SHIM} -v` failed with {}", output.status)),
        Err(err) => return fail(format!("{SHIM} not found in PATH ({err}); `make install` puts it there")),
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let ours = env!("CARGO_PKG_VERSION");
    let version =
        text.lines().find_map(|l| l.trim().strip_prefix("Version:")).map(str::trim).unwrap_or_default();
    if version != ours {
        return fail(format!("{SHIM} on PATH is version {version:?}, this husk is {ours}"));
    }
    Check {
        name: "shim",
        ok: true,
        summary: format!("{SHIM} {version}"),
        details: json!({ "version": version }),
    }
}

/// Major version from `containerd --version` output such as
/// `containerd github.com/containerd/containerd/v2 2.1.9+ds1 2.1.9+ds1` or
/// `containerd containerd.io v1.6.20 2806fc1`.
fn containerd_major(version_output: &str) -> Option<u32> {
    version_output.split_whitespace().skip(1).find_map(|token| {
        let token = token.strip_prefix('v').unwrap_or(token);
        let (major, rest) = token.split_once('.')?;
        rest.starts_with(|c: char| c.is_ascii_digit()).then(|| major.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_versions_are_parsed_from_packaged_and_upstream_builds() {
        assert_eq!(
            containerd_major("containerd github.com/containerd/containerd/v2 2.1.9+ds1 2.1.9+ds1"),
            Some(2)
        );
        assert_eq!(containerd_major("containerd containerd.io v1.6.20 2806fc1"), Some(1));
        assert_eq!(containerd_major("containerd github.com/containerd/containerd v1.7.24 e8f"), Some(1));
        assert_eq!(containerd_major("nonsense"), None);
    }

    #[test]
    fn only_a_cgroup2_mount_at_the_target_counts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert!(!is_cgroup2_mount(hybrid, "/sys/fs/cgroup"));
        let unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert!(is_cgroup2_mount(unified, "/sys/fs/cgroup"));
    }

    #[test]
    fn the_text_report_names_failures() {
        let report = CheckReport {
            ready: false,
            checks: vec![Check {
                name: "kvm",
                ok: false,
                summary: "KVM here is PVM".into(),
                details: Value::Null,
            }],
        };
        let text = report.render_text();
        assert!(text.contains("NOT READY") && text.contains("[FAIL] kvm") && text.contains("PVM"), "{text}");
    }
}
