//! Asks an agent who it is: the `Check` handshake and `GetGuestDetails`, printed as `key=value`
//! lines. For VM tests and by hand.
//!
//!   husk-agent-probe --vsock SOCKET [--wait-s N]   the agent of the VM whose hybrid vsock is SOCKET
//!   husk-agent-probe --unix PATH [--wait-s N]      a host-mode agent (`husk-agent --listen unix:PATH`)
//!
//! It retries until the agent answers or `--wait-s` (default 60) runs out, then prints the last error.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use husk_shim::agent_client::{AgentAddress, AgentClient};

#[derive(Debug, Parser)]
#[command(about = "Check an agent and print its guest details")]
struct Cli {
    #[arg(long, conflicts_with = "unix")]
    vsock: Option<PathBuf>,
    #[arg(long)]
    unix: Option<PathBuf>,
    #[arg(long, default_value_t = 60)]
    wait_s: u64,
}

fn main() -> Result<()> {
    // Before any thread: the agent client's reply thread runs under a seccomp filter.
    husk_vmm::seccomp::prepare_allocator();
    let cli = Cli::parse();
    let address = match (cli.vsock, cli.unix) {
        (Some(socket), None) => AgentAddress::vm(&socket),
        (None, Some(path)) => AgentAddress::Unix(path),
        _ => bail!("give --vsock SOCKET or --unix PATH"),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(probe(address, Duration::from_secs(cli.wait_s)))
}

async fn probe(address: AgentAddress, wait: Duration) -> Result<()> {
    let started = Instant::now();
    let (client, check) = AgentClient::connect_when_ready(address, Duration::from_secs(10), wait)
        .await
        .with_context(|| format!("no answer from the agent within {wait:?}"))?;
    println!("connect_ms={}", started.elapsed().as_millis());
    println!("api_version={}", check.api_version);
    println!("agent_version={}", check.agent_version);
    println!("uptime_ms={}", check.uptime_ms);
    let details = client.guest_details().await?;
    println!("kernel_release={}", details.kernel_release);
    println!("cpus_online={}", details.cpus_online);
    println!("mem_total_kib={}", details.mem_total_kib);
    println!("shared_mounts={}", details.shared_mounts.join(","));
    println!("cgroup_controllers={}", details.cgroup_controllers.join(","));
    Ok(())
}
