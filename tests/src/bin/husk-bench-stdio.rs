//! Container stdio and exec benchmark: a pod in a VM (husk-vmm, the guest agent, the busybox image
//! over virtio-fs, stdio on vsock streams) side by side with a host-mode agent on this host (the
//! same agent code, the same image, stdio on unix sockets) measured in the same run. Run it where
//! guests can run (`make bench` uses `tests/vm-host-run`).
//!
//! Figures, each the median over the runs with its spread (min..max), the VM and the host-mode
//! agent interleaved run by run after one warm-up round that is not counted (MB = 10^6 bytes):
//! - `stdio_mb_per_s`: container stdout to the host. A started container waits for one line on
//!   stdin, then writes `--mib` MiB of zeros to stdout in 64 KiB write(2)s (`dd`; `--writer
//!   sendfile` uses busybox `head -c`, which sendfile(2)s); from the host's write of that
//!   line to its reading EOF on the stdout stream after the last byte.
//! - `exec_ms`: from opening the exec's stdout stream (the host's first step of an exec) through
//!   ExecProcess of `true` to WaitProcess returning its status and the stream's EOF.
//!
//! Each figure is printed as `name=median unit (min..max) host_mode=median unit (min..max)
//! ratio=vm/host_mode`; `--verbose` prints every sample.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use husk_protocols::agent::CreateSandboxRequest;
use husk_shim::agent_client::{AgentAddress, AgentClient};
use husk_tests::bench::{spread, vm_host_description, Figure};
use husk_tests::host_agent::{
    busybox_spec, install_busybox, process_json, start_container, stdio, HostAgent, TestStdio, BUSYBOX_IMAGE,
};
use tokio::io::AsyncReadExt;

#[derive(Debug, Parser)]
#[command(about = "Husk container stdio and exec benchmark, VM beside a host-mode agent")]
struct Cli {
    #[arg(long)]
    vmm: PathBuf,
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: PathBuf,
    /// The host-mode agent (default: husk-agent beside this binary).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// MiB each stdout transfer moves.
    #[arg(long, default_value_t = 64)]
    mib: u64,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 10)]
    execs: usize,
    /// How the container writes: `write` (64 KiB write(2)s, `dd`) or `sendfile` (busybox `head -c`
    /// from /dev/zero; see `Writer::Sendfile`).
    #[arg(long, value_enum, default_value_t = Writer::Write)]
    writer: Writer,
    #[arg(long)]
    verbose: bool,
}

/// The container's writer of a stdout transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Writer {
    /// write(2)s of 64 KiB, as programs write their output.
    Write,
    /// busybox `head -c` from /dev/zero, which moves the bytes with sendfile(2). A guest doing so
    /// into a vsock stream triple-faults within a minute in the nested test host (emulated SVM),
    /// where the same bytes by write(2), in 4 or 64 KiB, never did (docs/performance.md, "Known
    /// limits"); this is the check to make on hardware KVM.
    Sendfile,
}

impl Writer {
    /// The shell command that writes `bytes` (a multiple of 64 KiB) of zeros to stdout.
    fn command(self, bytes: u64) -> String {
        match self {
            Writer::Write => format!("dd if=/dev/zero bs=65536 count={} 2>/dev/null", bytes / 65536),
            Writer::Sendfile => format!("head -c {bytes} /dev/zero"),
        }
    }
}

/// husk-vmm running a pod's VM; killed on drop.
struct PodVm {
    child: Child,
    console: PathBuf,
}

impl Drop for PodVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() -> Result<()> {
    // Before any thread: the agent client's reply thread runs under a seccomp filter.
    husk_vmm::seccomp::prepare_allocator();
    let cli = Cli::parse();
    let work = tempfile::tempdir()?;
    let share = work.path().join("share");
    install_busybox(&share.join(BUSYBOX_IMAGE))?;
    let socket = work.path().join("vsock.sock");
    let mut vm = boot(&cli, &share, &socket, work.path())?;
    let agent_bin = match &cli.agent {
        Some(agent) => agent.clone(),
        None => std::env::current_exe()?.with_file_name("husk-agent"),
    };
    let host = HostAgent::binary_with_busybox(&agent_bin).context("starting the host-mode agent")?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = runtime.block_on(measure(&cli, &socket, &host));
    if let Err(err) = &result {
        // A VM that went away may still be on its way out: give it a moment to say how it ended.
        let deadline = Instant::now() + Duration::from_secs(5);
        while vm.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let console = std::fs::read_to_string(&vm.console).unwrap_or_default();
        eprintln!("husk-bench-stdio: {err:#}\n--- guest console ---\n{console}");
        match vm.child.try_wait() {
            Ok(Some(status)) => eprintln!("husk-vmm exited early: {status}"),
            _ => eprintln!("husk-vmm is still running"),
        }
    }
    result
}

fn boot(cli: &Cli, share: &Path, socket: &Path, work: &Path) -> Result<PodVm> {
    let console = work.join("console.log");
    let child = Command::new(&cli.vmm)
        .arg("--kernel")
        .arg(&cli.kernel)
        .arg("--initrd")
        .arg(&cli.initrd)
        .args(["--vcpus", "1", "--mem", "512", "--vsock"])
        .arg(socket)
        .arg("--fs")
        .arg(format!("share={}", share.display()))
        .arg("--console")
        .arg(&console)
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", cli.vmm.display()))?;
    Ok(PodVm { child, console })
}

async fn measure(cli: &Cli, socket: &Path, host: &HostAgent) -> Result<()> {
    let wait = Duration::from_secs(180);
    let (vm, _) =
        AgentClient::connect_when_ready(AgentAddress::vm(socket), Duration::from_secs(120), wait).await?;
    let sandbox = CreateSandboxRequest {
        sandbox_id: "bench".into(),
        shared_fs_tag: "share".into(),
        ..Default::default()
    };
    vm.create_sandbox(&sandbox).await?;
    let host = host.client().await?;
    let clients = [("vm", &vm), ("host_mode", &host)];

    println!("# husk-bench-stdio on {}", vm_host_description());
    let bytes = cli.mib << 20;
    let mut rates: [Vec<f64>; 2] = Default::default();
    let mut execs: [Vec<f64>; 2] = Default::default();
    for run in 0..=cli.runs {
        for (column, (name, client)) in clients.iter().enumerate() {
            let id = format!("stdout-{run}");
            let rate = stdout_transfer(client, &id, bytes, cli.writer)
                .await
                .with_context(|| format!("{name}: {id}"))?;
            if cli.verbose {
                println!("sample {name} stdio_mb_per_s={rate:.1}");
            }
            if run > 0 {
                rates[column].push(rate);
            }
        }
    }
    for (_, client) in &clients {
        start(client, "exec-target", &["sleep", "100000"], false).await?;
    }
    for run in 0..=cli.execs {
        for (column, (name, client)) in clients.iter().enumerate() {
            let ms =
                exec_true(client, &format!("e{run}")).await.with_context(|| format!("{name}: exec {run}"))?;
            if cli.verbose {
                println!("sample {name} exec_ms={ms:.2}");
            }
            if run > 0 {
                execs[column].push(ms);
            }
        }
    }
    for (_, client) in &clients {
        client.remove_container("exec-target", true).await?;
    }
    report("stdio_mb_per_s", "MB/s", &rates);
    report("exec_ms", "ms", &execs);
    let stdio_start = format!(
        "the host writes the line a started container waits for on stdin before writing {} MiB of zeros \
         to stdout (MB = 10^6 bytes)",
        cli.mib
    );
    let figures = [
        (
            "stdio_mb_per_s",
            "MB/s",
            stdio_start.as_str(),
            "the host reads EOF on the container's stdout stream after the last byte",
            &rates,
        ),
        (
            "exec_ms",
            "ms",
            "the host opens the exec's stdout stream (its first step of an exec of `true`)",
            "WaitProcess returned the exec's status and its stdout stream reached EOF",
            &execs,
        ),
    ];
    for (name, unit, start, end, [vm, host_mode]) in figures {
        Figure::new(name, unit, start, end)
            .samples(vm)
            .beside(&format!("host_mode_{name}"), "host-mode agent", host_mode)
            .emit();
    }
    Ok(())
}

fn report(figure: &str, unit: &str, columns: &[Vec<f64>; 2]) {
    let (vm, vm_min, vm_max) = spread(&columns[0]);
    let (host, host_min, host_max) = spread(&columns[1]);
    println!(
        "{figure}={vm:.2} {unit} ({vm_min:.2}..{vm_max:.2}) host_mode={host:.2} {unit} ({host_min:.2}..{host_max:.2}) ratio={:.3}",
        vm / host
    );
}

async fn start(client: &AgentClient, id: &str, args: &[&str], stdin: bool) -> Result<TestStdio> {
    Ok(start_container(client, id, &busybox_spec(args), stdin).await?)
}

/// One stdout transfer of `bytes`; returns MB/s.
async fn stdout_transfer(client: &AgentClient, id: &str, bytes: u64, writer: Writer) -> Result<f64> {
    let script = format!("read go; {}", writer.command(bytes));
    let mut streams = start(client, id, &["sh", "-c", &script], true).await?;
    let started = Instant::now();
    streams.write_stdin(b"go\n").await?;
    let stdout = streams.stdout.as_mut().context("no stdout stream")?;
    let mut buffer = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    loop {
        let read = stdout.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        received += read as u64;
    }
    let elapsed = started.elapsed();
    if received != bytes {
        let (_, stderr) =
            tokio::time::timeout(Duration::from_secs(5), streams.output()).await.unwrap_or_default();
        let status = tokio::time::timeout(Duration::from_secs(10), client.wait_process(id, "")).await;
        let status = match status {
            Ok(Ok(reply)) => format!("exited {}", reply.status),
            Ok(Err(err)) => format!("WaitProcess failed: {err}"),
            Err(_) => "still running after 10 s".into(),
        };
        bail!("received {received} of {bytes} bytes; the writer {status}; its stderr: {stderr:?}");
    }
    let status = client.wait_process(id, "").await?.status;
    ensure!(status == 0, "the writer exited with {status}");
    client.remove_container(id, false).await?;
    Ok(bytes as f64 / 1e6 / elapsed.as_secs_f64())
}

/// One exec of `true` in the running `exec-target`; returns milliseconds.
async fn exec_true(client: &AgentClient, exec_id: &str) -> Result<f64> {
    let started = Instant::now();
    let stdio = stdio(&format!("exec-target-{exec_id}"), false);
    let mut streams = TestStdio::open(client, &stdio).await?;
    client.exec_process("exec-target", exec_id, process_json(&["true"]), stdio).await?;
    let status = client.wait_process("exec-target", exec_id).await?.status;
    streams.output().await;
    let elapsed = started.elapsed();
    ensure!(status == 0, "true exited with {status}");
    Ok(elapsed.as_secs_f64() * 1e3)
}
