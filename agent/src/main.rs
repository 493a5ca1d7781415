//! `husk-agent`: the guest's `/init`, and the only thing that creates containers in the guest.
//!
//!   husk-agent                       as PID 1 of a Husk guest: mount the kernel file systems,
//!                                    serve the agent API on vsock port 1024, reap orphans, power
//!                                    off on SIGTERM or on a fatal error
//!   husk-agent --listen unix:PATH    host mode: serve the same API on a unix socket (a test seam
//!                                    for container logic; the VM path stays the product)

mod api;
mod container;
mod guest_events;
mod guest_info;
mod host_vsock;
mod init;
mod network;
mod port_forward;
mod reaper;
mod sandbox;
mod signals;
mod stdio;
mod switch_root;
mod tty;

use std::process::ExitCode;

use api::server::{self, Endpoint};

fn main() -> ExitCode {
    guest_info::note_agent_started(switch_root::first_start_us());
    // As PID 1 the arguments are whatever the kernel passed on from its command line: not ours.
    if std::process::id() == 1 {
        return run_as_init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [] => run_as_init(),
        ["--listen", endpoint] => run_host_mode(endpoint, None),
        ["--listen", endpoint, "--shared", shared] => run_host_mode(endpoint, Some(shared)),
        ["runtime", ..] => container::helper::main(&args[1..]),
        ["--version"] => {
            println!(
                "husk-agent {} (agent API {})",
                env!("CARGO_PKG_VERSION"),
                husk_protocols::AGENT_API_VERSION
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "usage: husk-agent            (PID 1 of a Husk guest)\n       husk-agent --listen unix:PATH [--shared DIR]"
            );
            ExitCode::from(2)
        }
    }
}

fn run_as_init() -> ExitCode {
    if std::process::id() != 1 {
        eprintln!(
            "husk-agent: must run as PID 1 of a Husk guest (it mounts filesystems and reaps orphans); \
             for host mode use --listen unix:PATH"
        );
        return ExitCode::from(2);
    }
    if switch_root::needed() {
        // Returns only if the switch failed; carry on from the initramfs then (containers will
        // fail to pivot_root, everything else works) and say why.
        match switch_root::switch_to_tmpfs() {
            Ok(never) => match never {},
            Err(err) => println!("husk-agent: cannot leave the initramfs: {err:#}"),
        }
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

fn run_host_mode(endpoint: &str, shared: Option<&str>) -> ExitCode {
    match host_mode(endpoint, shared) {
        Ok(never) => match never {},
        Err(err) => {
            eprintln!("husk-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Host mode: the API on `unix:PATH`, stdio streams on `PATH_1025`, containers' images under
/// `shared` (default `PATH.shared`), state under `PATH.state`. The agent is the subreaper of what
/// it starts, as PID 1 is in the guest.
fn host_mode(endpoint: &str, shared: Option<&str>) -> anyhow::Result<std::convert::Infallible> {
    use anyhow::Context;
    signals::block()?;
    nix::sys::prctl::set_child_subreaper(true).context("becoming a subreaper")?;
    let endpoint = Endpoint::parse(endpoint)?;
    let server::Endpoint::Unix(path) = &endpoint else { anyhow::bail!("host mode listens on unix:PATH") };
    let paths = container::ContainerPaths {
        shared: shared.map_or_else(|| format!("{path}.shared").into(), Into::into),
        state: format!("{path}.state").into(),
    };
    // An earlier agent on this socket that was killed may have left containers behind.
    container::leftovers::remove(&paths);
    stdio::StdioBroker::global().listen(&endpoint.stdio())?;
    let server = server::start(endpoint, api::AgentService::new(sandbox::Place::Host, paths.clone())?)?;
    eprintln!("husk-agent: host mode, serving the agent API on {:?}", server.endpoint);
    signals::serve(|signal| {
        eprintln!("husk-agent: {signal} received; removing containers and exiting");
        container::leftovers::remove(&paths);
        std::process::exit(0)
    })
}
