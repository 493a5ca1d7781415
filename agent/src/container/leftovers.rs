//! Taking down what containers leave in the agent's state directory when the agent itself ends
//! (host mode on SIGTERM) or finds an earlier run's state at start: the runtime deletes each
//! container it has a record of (killing its processes, removing its cgroup), then every bundle's
//! rootfs overlay is unmounted and the bundles removed.
//!
//! Runs with nothing else of the agent active (before serving, or from the signal loop as it
//! exits), so it may wait for its runtime children directly.

use std::path::Path;
use std::process::{Command, Stdio};

use nix::mount::{umount2, MntFlags};

use super::ContainerPaths;
use crate::signals;

/// Removes every container recorded under `paths.state`; reports what it could not remove.
pub fn remove(paths: &ContainerPaths) {
    let runtime = paths.state.join("runtime");
    for id in entries(&runtime) {
        let mut delete = Command::new("/proc/self/exe");
        delete.arg("runtime").arg(&runtime).args(["delete", &id]).stdin(Stdio::null()).stdout(Stdio::null());
        match signals::with_no_signals_blocked(&mut delete).status() {
            Ok(status) if status.success() => {}
            Ok(status) => {
                eprintln!("husk-agent: deleting leftover container {id}: runtime exited with {status}")
            }
            Err(err) => eprintln!("husk-agent: deleting leftover container {id}: {err}"),
        }
    }
    let bundles = paths.state.join("bundles");
    for id in entries(&bundles) {
        let bundle = bundles.join(&id);
        let _ = umount2(&bundle.join("rootfs"), MntFlags::MNT_DETACH);
        if let Err(err) = std::fs::remove_dir_all(&bundle) {
            eprintln!("husk-agent: removing leftover bundle {}: {err}", bundle.display());
        }
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let Ok(read) = std::fs::read_dir(dir) else { return Vec::new() };
    read.filter_map(Result::ok).filter_map(|entry| entry.file_name().into_string().ok()).collect()
}
