//! A pod's start and teardown, phase by phase. The shim logs one line per phase as it is reached,
//! stamped with the wall clock, so that a benchmark (or an operator reading containerd's log) can
//! place every phase on one time line with its own start point (`ctr run` invoked, the kubelet's
//! RunPodSandbox). Phases the VMM or the guest observe (the kernel's entry, the agent's start
//! and ready report) are stamped with the moment they happened, not when the shim learnt of them.
//!
//! A line reads `... husk::phases: pod phase sandbox=<id> container=<id> phase=<name>
//! unix_us=<microseconds>`; [`PhaseLine::parse`] reads it back.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The phases, in the order a pod's first container goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The pod's shim server (spawned by `containerd-shim-husk-v2 start`) serves containerd.
    ShimServing,
    /// containerd's Create of the task reached the shim.
    TaskCreate,
    /// The configuration read, the pod sized and the guest image checked.
    GuestImageChecked,
    /// The pod's network namespace attached (tap devices, redirection).
    NetworkAttached,
    /// The VM created: memory, kernel and initramfs loaded, devices made; its vCPUs start.
    VmCreated,
    /// The boot vCPU's first `KVM_RUN`.
    KernelEntered,
    /// The agent's first process started in the guest (the kernel's boot is over).
    AgentStarted,
    /// The agent reported ready on the guest event port.
    AgentReady,
    /// The shim's client connected and the API versions agreed.
    AgentConnected,
    /// CreateSandbox answered: the share mounted, hostname, clock and sysctls set.
    SandboxCreated,
    /// The guest's interfaces and routes configured from the pod's.
    GuestNetworkConfigured,
    /// The container's rootfs and volumes bound into the pod's share.
    ContainerShared,
    /// The agent created the container.
    ContainerCreated,
    /// The agent started the container's process.
    ContainerStarted,
    /// The shim heard the container's process exit.
    ExitSeen,
    /// The pod's VM ended and its threads were joined (its last container's Delete stops it).
    VmGone,
    /// containerd's Delete of the task done.
    ContainerDeleted,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 17] = [
        Phase::ShimServing,
        Phase::TaskCreate,
        Phase::GuestImageChecked,
        Phase::NetworkAttached,
        Phase::VmCreated,
        Phase::KernelEntered,
        Phase::AgentStarted,
        Phase::AgentReady,
        Phase::AgentConnected,
        Phase::SandboxCreated,
        Phase::GuestNetworkConfigured,
        Phase::ContainerShared,
        Phase::ContainerCreated,
        Phase::ContainerStarted,
        Phase::ExitSeen,
        Phase::VmGone,
        Phase::ContainerDeleted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::ShimServing => "shim_serving",
            Phase::TaskCreate => "task_create",
            Phase::GuestImageChecked => "guest_image_checked",
            Phase::NetworkAttached => "network_attached",
            Phase::VmCreated => "vm_created",
            Phase::KernelEntered => "kernel_entered",
            Phase::AgentStarted => "agent_started",
            Phase::AgentReady => "agent_ready",
            Phase::AgentConnected => "agent_connected",
            Phase::SandboxCreated => "sandbox_created",
            Phase::GuestNetworkConfigured => "guest_network_configured",
            Phase::ContainerShared => "container_shared",
            Phase::ContainerCreated => "container_created",
            Phase::ContainerStarted => "container_started",
            Phase::ExitSeen => "exit_seen",
            Phase::ContainerDeleted => "container_deleted",
            Phase::VmGone => "vm_gone",
        }
    }

    pub fn from_name(name: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|phase| phase.name() == name)
    }
}

/// Logs that the pod `sandbox` (and `container`, empty for the pod's own phases) reached `phase`
/// now.
pub fn mark(sandbox: &str, container: &str, phase: Phase) {
    mark_at(sandbox, container, phase, SystemTime::now());
}

/// Logs that `phase` was reached at the monotonic instant `at` (a moment recorded by the VMM).
pub fn mark_instant(sandbox: &str, container: &str, phase: Phase, at: Instant) {
    mark_at(sandbox, container, phase, wall_clock_of(at));
}

fn mark_at(sandbox: &str, container: &str, phase: Phase, at: SystemTime) {
    let unix_us = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros());
    tracing::info!(target: "husk::phases", %sandbox, %container, phase = %phase.name(), unix_us, "pod phase");
}

/// The wall clock at the monotonic instant `at`, past or future.
pub fn wall_clock_of(at: Instant) -> SystemTime {
    let (now, wall) = (Instant::now(), SystemTime::now());
    match now.checked_duration_since(at) {
        Some(ago) => wall.checked_sub(ago).unwrap_or(wall),
        None => wall + at.duration_since(now),
    }
}

/// One phase line of a log, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseLine {
    pub sandbox: String,
    pub container: String,
    pub phase: Phase,
    /// Since the Unix epoch.
    pub at: Duration,
}

impl PhaseLine {
    /// The phase line in `line` (a log line of any prefix), if it is one.
    pub fn parse(line: &str) -> Option<PhaseLine> {
        let rest = &line[line.find(" pod phase ")? + " pod phase ".len()..];
        let field = |key: &str| {
            rest.split_whitespace()
                .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        Some(PhaseLine {
            sandbox: field("sandbox")?,
            container: field("container").unwrap_or_default(),
            phase: Phase::from_name(&field("phase")?)?,
            at: Duration::from_micros(field("unix_us")?.parse().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_phase_has_a_name_that_reads_back() {
        for phase in Phase::ALL {
            assert_eq!(Phase::from_name(phase.name()), Some(phase));
        }
        assert_eq!(Phase::from_name("kernel"), None);
    }

    /// The line tracing's formatter writes (a container field empty for a pod's phases) parses
    /// back; other lines and damaged ones do not.
    #[test]
    fn phase_lines_are_read_back_from_the_log() {
        let line = "2026-12-07T20:00:00.000000Z  INFO husk::phases: pod phase sandbox=default-p1 container=c1 phase=vm_created unix_us=1765137600123456";
        let read = PhaseLine::parse(line).unwrap();
        assert_eq!((read.sandbox.as_str(), read.container.as_str()), ("default-p1", "c1"));
        assert_eq!(read.phase, Phase::VmCreated);
        assert_eq!(read.at, Duration::from_micros(1_765_137_600_123_456));
        let pod = "x INFO husk::phases: pod phase sandbox=default-p1 container= phase=vm_gone unix_us=5";
        assert_eq!(PhaseLine::parse(pod).unwrap().container, "");
        for other in [
            "INFO husk_shim: booting the pod's VM sandbox=p1",
            "pod phase sandbox=p1 phase=teleported unix_us=5",
            "pod phase sandbox=p1 phase=vm_gone unix_us=soon",
        ] {
            assert_eq!(PhaseLine::parse(other), None, "{other}");
        }
    }

    #[test]
    fn instants_map_to_the_wall_clock_they_happened_at() {
        let earlier = Instant::now() - Duration::from_millis(250);
        let ago = SystemTime::now().duration_since(wall_clock_of(earlier)).unwrap();
        assert!(ago >= Duration::from_millis(250) && ago < Duration::from_secs(5), "{ago:?}");
    }
}
