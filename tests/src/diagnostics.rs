//! What the node says about stalled pods, for probes whose wait ran out: the shims' dumps of
//! their VMs' virtio rings (SIGUSR1, into containerd's log), and the pod networks' links, tc
//! statistics and guest consoles.

use std::path::Path;
use std::time::{Duration, Instant};

/// The line a shim logs after each device of its VM (see `Pod::log_virtio_state`).
const DEVICE_LINE: &str = "virtio state";
/// The line that ends one shim's dump.
const END_LINE: &str = "virtio state dumped";

/// Signals every serving Husk shim with SIGUSR1 and returns the virtio state lines they log to
/// `containerd_log`, waiting up to `deadline` for one dump per shim signalled. When a shim does not
/// answer in time, says so with what did arrive.
pub fn shim_virtio_state(containerd_log: &Path, deadline: Duration) -> String {
    let before = std::fs::metadata(containerd_log).map(|meta| meta.len() as usize).unwrap_or(0);
    let shims = husk_shims();
    for pid in &shims {
        // SAFETY: kill(2) with a pid read from /proc and a valid signal; at worst the process has
        // gone (ESRCH) or was reused by an unrelated one of ours (it ignores or logs SIGUSR1).
        unsafe { libc::kill(*pid, libc::SIGUSR1) };
    }
    let started = Instant::now();
    loop {
        let log = std::fs::read(containerd_log).unwrap_or_default();
        let new = String::from_utf8_lossy(log.get(before..).unwrap_or_default()).into_owned();
        let lines: Vec<&str> = new.lines().filter(|line| line.contains(DEVICE_LINE)).collect();
        let ended = lines.iter().filter(|line| line.contains(END_LINE)).count();
        if ended >= shims.len() {
            return format!("{} shims (pids {shims:?}):\n{}", shims.len(), lines.join("\n"));
        }
        if started.elapsed() >= deadline {
            return format!(
                "{ended} of {} shims (pids {shims:?}) dumped their virtio state within {deadline:?} of SIGUSR1:\n{}",
                shims.len(),
                lines.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// PIDs of the processes running `containerd-shim-husk-v2`.
fn husk_shims() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let arg0 = cmdline.split(|byte| *byte == 0).next().unwrap_or_default();
            arg0.ends_with(b"containerd-shim-husk-v2")
        })
        .collect()
}

/// The node's view of the pod networks: addresses and counters of every link, and per network
/// namespace its links (veth and tap), the tc redirection's filter statistics and qdiscs; then the
/// last lines of each Husk guest's console.
pub fn node_network_state() -> String {
    // Absolute paths: busybox sh runs its own `ip` and `tc` applets before any on PATH.
    let script = "/usr/bin/ip -br addr; /usr/bin/ip -s link; \
        for ns in $(ls /var/run/netns 2>/dev/null); do ns=$(basename $ns); echo \"netns $ns:\"; \
        n=/var/run/netns/$ns; nsenter --net=$n /usr/bin/ip -s -d link; nsenter --net=$n /usr/bin/ip addr; \
        for dev in $(nsenter --net=$n /usr/bin/ip -o link | cut -d: -f2 | cut -d@ -f1); do \
        echo \"tc ingress of $dev:\"; nsenter --net=$n /usr/sbin/tc -s filter show dev $dev ingress; done; \
        nsenter --net=$n /usr/sbin/tc -s qdisc; done; \
        for log in /run/husk/sandboxes/*/console.log; do echo \"--- $log\"; tail -40 $log; done";
    match std::process::Command::new("sh").args(["-c", script]).output() {
        Ok(out) => {
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        }
        Err(err) => format!("running the node's network report: {err}"),
    }
}
