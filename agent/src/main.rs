//! `husk-agent`: the guest's `/init`.
//!
//! For now it does PID 1's duties (mount the kernel filesystems, announce readiness on the console,
//! reap orphans, power off on SIGTERM or on a fatal error) and offers a debug shell. The agent API
//! (ttrpc over vsock) and container creation build on this.

mod guest_events;
mod init;

use std::process::ExitCode;

fn main() -> ExitCode {
    if std::process::id() != 1 {
        eprintln!("husk-agent: must run as PID 1 of a Husk guest (it mounts filesystems and reaps orphans)");
        return ExitCode::from(2);
    }
    match init::run() {
        Ok(never) => match never {},
        Err(err) => {
            // PID 1 must not exit (the kernel would panic with a less useful message): report and
            // power the guest off so the host sees the reason on the console.
            println!("husk-agent: fatal: {err:#}");
            init::power_off()
        }
    }
}
