//! The pod's guest-wide setup (CreateSandbox): hostname, DNS, hosts, sysctls, the guest clock and
//! the shared file system. In host mode (the test seam) none of it may touch the host: only the
//! request is checked and recorded.

use std::path::Path;

use husk_protocols::agent::CreateSandboxRequest;
use nix::mount::{mount, MsFlags};

use crate::container::CallError;

/// Whether the agent runs as the guest's PID 1 or as the host-mode test seam.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Guest,
    Host,
}

/// Sets the guest up for the pod in `request`; the share is mounted at `shared`.
pub fn create(request: &CreateSandboxRequest, place: Place, shared: &Path) -> Result<(), CallError> {
    check(request)?;
    if place == Place::Host {
        return Ok(());
    }
    let internal =
        |what: String| move |err: &dyn std::fmt::Display| CallError::Internal(format!("{what}: {err}"));
    if request.host_time_unix_ns > 0 {
        let now = nix::sys::time::TimeSpec::from_duration(std::time::Duration::from_nanos(
            request.host_time_unix_ns as u64,
        ));
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, now)
            .map_err(|e| internal("setting the guest clock".into())(&e))?;
    }
    if !request.hostname.is_empty() {
        nix::unistd::sethostname(&request.hostname)
            .map_err(|e| internal("setting the hostname".into())(&e))?;
    }
    std::fs::create_dir_all("/etc").map_err(|e| internal("creating /etc".into())(&e))?;
    let resolv = request.dns.iter().map(|line| format!("{line}\n")).collect::<String>();
    std::fs::write("/etc/resolv.conf", resolv)
        .map_err(|e| internal("writing /etc/resolv.conf".into())(&e))?;
    let hosts = std::iter::once("127.0.0.1 localhost".to_owned())
        .chain(
            std::iter::once(format!("127.0.1.1 {}", request.hostname))
                .filter(|_| !request.hostname.is_empty()),
        )
        .chain(request.hosts.iter().cloned())
        .map(|line| format!("{line}\n"))
        .collect::<String>();
    std::fs::write("/etc/hosts", hosts).map_err(|e| internal("writing /etc/hosts".into())(&e))?;
    for (key, value) in &request.sysctls {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        std::fs::write(&path, value).map_err(|e| internal(format!("sysctls[{key}]"))(&e))?;
    }
    if !request.shared_fs_tag.is_empty() {
        std::fs::create_dir_all(shared)
            .map_err(|e| internal(format!("creating {}", shared.display()))(&e))?;
        mount(
            Some(request.shared_fs_tag.as_str()),
            shared,
            Some("virtiofs"),
            MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(|e| internal(format!("shared_fs_tag {:?}: mounting virtiofs", request.shared_fs_tag))(&e))?;
    }
    Ok(())
}

fn check(request: &CreateSandboxRequest) -> Result<(), CallError> {
    let invalid = |message: String| Err(CallError::InvalidArgument(message));
    if request.sandbox_id.is_empty() {
        return invalid("sandbox_id is empty".into());
    }
    let hostname_ok = request.hostname.len() <= 64
        && request.hostname.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
    if !hostname_ok {
        return invalid(format!("hostname {:?}: at most 64 characters of [A-Za-z0-9.-]", request.hostname));
    }
    for line in request.dns.iter().chain(&request.hosts) {
        if line.contains('\n') {
            return invalid(format!("dns/hosts line {line:?} contains a newline"));
        }
    }
    for key in request.sysctls.keys() {
        let allowed = key.starts_with("net.") || key.starts_with("kernel.");
        let clean = key.split('.').all(|part| {
            !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
        if !allowed || !clean {
            return invalid(format!("sysctls[{key}]: only net.* and kernel.* keys of [A-Za-z0-9_-] parts"));
        }
    }
    Ok(())
}
