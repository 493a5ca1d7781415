//! Facts about the guest the agent reports: uptime, kernel, CPUs, memory, shares, cgroups.

use std::fs;

use anyhow::{Context, Result};
use husk_protocols::agent::GuestDetails;

/// Milliseconds since the kernel started (`/proc/uptime`).
pub fn uptime_ms() -> Result<u64> {
    let uptime = read_trimmed("/proc/uptime")?;
    let seconds: f64 = uptime
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("unexpected /proc/uptime: {uptime:?}"))?;
    Ok((seconds * 1000.0) as u64)
}

/// The guest's boot clock (`CLOCK_BOOTTIME`: from the kernel's start), microseconds.
pub fn boottime_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map_or(0, |t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
}

static AGENT_STARTED_US: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Notes when the agent started: `first`, the first process's moment handed over when it
/// re-executed itself, or now.
pub fn note_agent_started(first: Option<u64>) {
    AGENT_STARTED_US.get_or_init(|| first.unwrap_or_else(boottime_us));
}

/// When the agent started ([`note_agent_started`]), microseconds of the boot clock; 0 if unknown.
pub fn agent_started_us() -> u64 {
    AGENT_STARTED_US.get().copied().unwrap_or(0)
}

static AGENT_READY_US: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Notes that the agent is about to report ready.
pub fn note_agent_ready() {
    AGENT_READY_US.get_or_init(boottime_us);
}

/// When the agent reported ready ([`note_agent_ready`]), microseconds of the boot clock; 0 if not
/// yet.
pub fn agent_ready_us() -> u64 {
    AGENT_READY_US.get().copied().unwrap_or(0)
}

/// Online CPUs as the kernel lists them, e.g. `0-1`.
pub fn cpus_online() -> Result<String> {
    read_trimmed("/sys/devices/system/cpu/online")
}

/// What [`husk_protocols::agent_ttrpc::Agent::get_guest_details`] answers.
pub fn details() -> Result<GuestDetails> {
    let meminfo = read_trimmed("/proc/meminfo")?;
    let mem_total_kib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .context("/proc/meminfo has no MemTotal")?;
    let mounts = read_trimmed("/proc/self/mounts")?;
    let shared_mounts =
        mounts.lines().filter_map(|line| virtiofs_mount_point(line).map(str::to_owned)).collect();
    // Absent when cgroup2 is not mounted (host mode on a cgroup v1 host): report none.
    let cgroup_controllers = fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .map(|text| text.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    Ok(GuestDetails {
        kernel_release: read_trimmed("/proc/sys/kernel/osrelease")?,
        cpus_online: cpus_online()?,
        mem_total_kib,
        shared_mounts,
        cgroup_controllers,
        ..Default::default()
    })
}

/// The mount point of a `/proc/self/mounts` line if it is a virtio-fs mount.
fn virtiofs_mount_point(line: &str) -> Option<&str> {
    let mut fields = line.split_whitespace();
    let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
    (fstype == "virtiofs").then_some(target)
}

pub fn read_trimmed(path: &str) -> Result<String> {
    Ok(fs::read_to_string(path).with_context(|| format!("reading {path}"))?.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtiofs_mounts_are_picked_from_the_mount_table() {
        assert_eq!(
            virtiofs_mount_point("share /run/husk/shared virtiofs rw,relatime 0 0"),
            Some("/run/husk/shared")
        );
        assert_eq!(virtiofs_mount_point("proc /proc proc rw 0 0"), None);
        assert_eq!(virtiofs_mount_point("garbage"), None);
    }

    #[test]
    fn details_describe_this_machine() {
        let details = details().unwrap();
        assert!(details.mem_total_kib > 0);
        assert!(!details.kernel_release.is_empty());
        assert!(!details.cpus_online.is_empty());
    }
}
