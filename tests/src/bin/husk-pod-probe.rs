//! Runs a pod through an agent the way the shim will: CreateSandbox with the VM's share, then
//! containers whose rootfs is a busybox image in the share, their stdio on vsock streams, an exec,
//! a kill, a bad spec and an unknown id. Prints what it saw as `key=value` lines for VM tests.
//!
//!   husk-pod-probe --vsock SOCKET --share DIR [--tag TAG] [--wait-s N]
//!
//! DIR is the host directory the VM shares under TAG (default `share`); the busybox image is put
//! there first.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Parser;
use husk_protocols::agent::CreateSandboxRequest;
use husk_shim::agent_client::{AgentAddress, AgentClient};
use husk_tests::host_agent::{
    busybox_spec, install_busybox, process_json, spec_json_with_resources, start_container, stdio,
    terminal_process_json, terminal_stdio, TestStdio, BUSYBOX_IMAGE,
};

#[derive(Debug, Parser)]
#[command(about = "Run a test pod through a VM's agent")]
struct Cli {
    #[arg(long)]
    vsock: PathBuf,
    #[arg(long)]
    share: PathBuf,
    #[arg(long, default_value = "share")]
    tag: String,
    #[arg(long, default_value_t = 120)]
    wait_s: u64,
}

fn main() -> Result<()> {
    // Before any thread: the agent client's reply thread runs under a seccomp filter.
    husk_vmm::seccomp::prepare_allocator();
    let cli = Cli::parse();
    install_busybox(&cli.share.join(BUSYBOX_IMAGE)).context("putting the busybox image into the share")?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(pod(cli))
}

async fn pod(cli: Cli) -> Result<()> {
    let address = AgentAddress::vm(&cli.vsock);
    let (client, _) =
        AgentClient::connect_when_ready(address, Duration::from_secs(60), Duration::from_secs(cli.wait_s))
            .await?;
    let host_time_unix_ns = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as i64;
    let sandbox = CreateSandboxRequest {
        sandbox_id: "vm-pod".into(),
        hostname: "husk-pod".into(),
        shared_fs_tag: cli.tag.clone(),
        dns: vec!["nameserver 192.0.2.53".into()],
        host_time_unix_ns,
        ..Default::default()
    };
    client.create_sandbox(&sandbox).await?;
    println!("sandbox=created");

    // A container that prints and exits with a code.
    let args = ["sh", "-c", "echo hello-from-vm pid=$$; echo on-stderr >&2; exit 7"];
    let mut first = start(&client, "first", &args).await?;
    let (out, err) = first.output().await;
    println!("first-stdout={}", out.trim());
    println!("first-stderr={}", err.trim());
    println!("first-status={}", client.wait_process("first", "").await?.status);
    client.remove_container("first", false).await?;

    // A long-running one: exec into it, then kill it.
    let _sleeper = start(&client, "sleeper", &["sleep", "1000"]).await?;
    let exec_stdio = stdio("sleeper-e1", false);
    let mut exec = TestStdio::open(&client, &exec_stdio).await?;
    let exec_args = ["sh", "-c", "echo exec-sees-init=$(cat /proc/1/comm); exit 4"];
    client.exec_process("sleeper", "e1", process_json(&exec_args), exec_stdio).await?;
    println!("exec-stdout={}", exec.output().await.0.trim());
    println!("exec-status={}", client.wait_process("sleeper", "e1").await?.status);
    // An exec on a terminal, resized while it runs.
    let tty_stdio = terminal_stdio("sleeper-t1");
    let mut tty = TestStdio::open(&client, &tty_stdio).await?;
    let tty_args = ["sh", "-c", "read go; stty size; tty"];
    client.exec_process("sleeper", "t1", terminal_process_json(&tty_args), tty_stdio).await?;
    client.resize_pty("sleeper", "t1", 120, 30).await?;
    tty.write_stdin(b"go\n").await?;
    println!("exec-tty={}", tty.output().await.0.replace("\r\n", "|"));
    println!("exec-tty-status={}", client.wait_process("sleeper", "t1").await?.status);
    client.signal_process("sleeper", "", 9, false).await?;
    println!("sleeper-status={}", client.wait_process("sleeper", "").await?.status);
    client.remove_container("sleeper", false).await?;

    // cgroup v2 limits: a memory limit that OOM-kills, reported as an event; stats of the cgroup.
    let spec = busybox_spec(&["sh", "-c", "head -c 64000000 /dev/zero | sort > /dev/null"]);
    let resources = serde_json::json!({"memory": {"limit": 16 << 20}, "pids": {"limit": 20}});
    let oom_stdio = stdio("oom", false);
    let mut oom = TestStdio::open(&client, &oom_stdio).await?;
    client.create_container("oom", spec_json_with_resources(&spec, resources), oom_stdio).await?;
    client.start_container("oom").await?;
    let _ = oom.output().await;
    println!("oom-status={}", client.wait_process("oom", "").await?.status);
    let event = tokio::time::timeout(Duration::from_secs(30), client.next_oom_event()).await;
    println!("oom-event={}", event.ok().and_then(Result::ok).unwrap_or_default());
    let stats = client.stats_container("oom").await?;
    println!(
        "oom-stats=kills:{} memory_limit:{} pids_limit:{} cpu_usec:{}",
        stats.oom_kills, stats.memory_limit_bytes, stats.pids_limit, stats.cpu_usage_usec
    );
    client.remove_container("oom", false).await?;

    // Errors name what is wrong, and the agent keeps serving.
    let bad = client.create_container("bad", b"{\"ociVersion\": 1}".to_vec(), Default::default()).await;
    println!("bad-spec-error={}", bad.err().map(|e| e.to_string()).unwrap_or_default());
    let unknown = client.start_container("nobody").await;
    println!("unknown-id-error={}", unknown.err().map(|e| e.to_string()).unwrap_or_default());
    println!("still-serving={}", client.check().await.is_ok());
    Ok(())
}

async fn start(client: &AgentClient, id: &str, args: &[&str]) -> Result<TestStdio> {
    Ok(start_container(client, id, &busybox_spec(args), false).await?)
}
