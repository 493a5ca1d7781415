//! `husk-vmm`: boot a guest with Husk's VMM, for development, tests and benchmarks.
//!
//! Exit status: 0 when the guest powers off, 3 when it asks for a reboot (the VM is not restarted),
//! 1 when it panics, triple-faults or the VMM fails (with the console tail), 2 for bad arguments.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use husk_vmm::devices::legacy::Console;
use husk_vmm::devices::virtio::net::{MacAddr, NetConfig, Tap};
use husk_vmm::devices::virtio::vsock::HostPorts;
use husk_vmm::{DeviceConfig, ExitReason, VmConfig, VmHandle, DEFAULT_CMDLINE};

const EXIT_REBOOT: u8 = 3;

#[derive(Debug, Parser)]
#[command(name = "husk-vmm", version, about = "Boot a Linux guest with Husk's VMM")]
struct Cli {
    /// Guest kernel: ELF vmlinux or bzImage.
    #[arg(long, required_unless_present = "restore")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (uncompressed cpio for Husk's guest kernel).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Extra kernel command-line arguments, appended to --cmdline (e.g. `husk.after_ready=poweroff`).
    #[arg(long)]
    append: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// Feed stdin into the serial console (for the guest's debug console: `--append husk.debug_console`).
    #[arg(long)]
    console_input: bool,
    /// Give the guest a vsock device whose host side is this unix socket (hybrid vsock: connect,
    /// write `CONNECT <port>\n`; guest connections to host port P reach `<socket>_P`).
    #[arg(long)]
    vsock: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = 3)]
    vsock_cid: u64,
    /// Run vCPU and device threads without their seccomp filters (to tell whether a filter is
    /// what stops a guest).
    #[arg(long)]
    no_seccomp: bool,
    /// A host port the guest may connect to (repeatable); without any, every `<socket>_P`
    /// listener is reachable.
    #[arg(long, value_name = "PORT")]
    vsock_host_port: Vec<u32>,
    /// Share a host directory with the guest over virtio-fs, as TAG=DIR (repeatable); the guest
    /// mounts it with `mount -t virtiofs TAG <dir>`.
    #[arg(long, value_name = "TAG=DIR", value_parser = parse_share)]
    fs: Vec<(String, PathBuf)>,
    /// The most host files (looked-up inodes and open handles) each share holds for the guest;
    /// beyond it the guest's opens and lookups fail with ENFILE.
    #[arg(long, default_value_t = husk_vmm::devices::virtio::fs::DEFAULT_MAX_FDS, value_name = "N")]
    fs_max_fds: usize,
    /// Give the guest a virtio-net NIC on this tap (opened, or created, in the VMM's network
    /// namespace; a created tap disappears with the VMM).
    #[arg(long, value_name = "NAME")]
    net_tap: Option<String>,
    /// The guest NIC's MAC address.
    #[arg(long, default_value = "02:68:75:73:6b:01", value_name = "MAC")]
    net_mac: MacAddr,
    /// The guest NIC's MTU (68 to 65535).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(68..))]
    net_mtu: u16,
    /// Do not give the guest a virtio-rng device.
    #[arg(long)]
    no_rng: bool,
    /// Where the guest's serial console goes: a file path, or `-` for stdout (repeatable).
    #[arg(long, default_value = "-")]
    console: Vec<String>,
    /// Once the guest's agent reports ready, save the VM into this directory and exit (of the
    /// virtio devices, only virtio-rng is saved yet: without --vsock, --fs, --net-tap).
    #[arg(long, value_name = "DIR", conflicts_with = "restore")]
    snapshot_on_ready: Option<PathBuf>,
    /// Restore the VM saved in this directory (by --snapshot-on-ready) instead of booting one;
    /// its size comes from the snapshot.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "vsock", "fs", "net_tap"])]
    restore: Option<PathBuf>,
}

/// How long --snapshot-on-ready waits for the agent.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// `TAG=DIR` of `--fs`.
fn parse_share(value: &str) -> Result<(String, PathBuf), String> {
    match value.split_once('=') {
        Some((tag, dir)) if !tag.is_empty() && !dir.is_empty() => Ok((tag.to_owned(), PathBuf::from(dir))),
        _ => Err(format!("expected TAG=DIR, got {value:?}")),
    }
}

fn main() -> ExitCode {
    husk_vmm::seccomp::prepare_allocator();
    let started = Instant::now();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(cli, started) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("husk-vmm: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Blocks SIGINT and SIGTERM in this thread (and every thread it starts later) and returns the set.
fn block_stop_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; the calls only write to it and to this
    // thread's signal mask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        anyhow::bail!("blocking SIGINT/SIGTERM: {}", std::io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

/// Waits for one of the blocked `signals`; `None` if sigwait fails.
fn wait_for(signals: &libc::sigset_t) -> Option<i32> {
    let mut signal = 0;
    // SAFETY: `signals` is an initialised set and `signal` a valid out-pointer.
    (unsafe { libc::sigwait(signals, &mut signal) } == 0).then_some(signal)
}

fn run(cli: Cli, started: Instant) -> Result<ExitCode> {
    if let Err(err) = husk_vmm::host::raise_fd_limit() {
        tracing::warn!(%err, "could not raise the open-file limit; virtio-fs inodes and vsock connections are capped by it");
    }
    let mut log = None;
    let mut stdout = false;
    for target in &cli.console {
        if target == "-" {
            stdout = true;
        } else {
            log = Some(File::create(target).with_context(|| format!("--console {target}"))?);
        }
    }
    let console = Console::new(log, stdout);
    let console_input = if cli.console_input {
        Some(std::io::stdin().as_fd().try_clone_to_owned().context("duplicating stdin")?)
    } else {
        None
    };
    if let Some(snapshot) = cli.restore {
        let config = husk_vmm::RestoreConfig {
            snapshot,
            console,
            setup_started: Some(started),
            console_input,
            seccomp: !cli.no_seccomp,
        };
        let signals = block_stop_signals()?;
        let handle = VmHandle::restore(config)?;
        eprintln!("husk-vmm: restored; restore_ms={:.2}", started.elapsed().as_secs_f64() * 1000.0);
        return wait_for_end(handle, signals);
    }
    let snapshot_on_ready = cli.snapshot_on_ready.clone();
    let config = vm_config(cli, console, console_input, started)?;
    let signals = block_stop_signals()?;
    let handle = VmHandle::start(config)?;
    if let Some(dir) = snapshot_on_ready {
        return snapshot_when_ready(handle, &dir);
    }
    wait_for_end(handle, signals)
}

/// Waits for the agent's ready report, then saves the VM into `dir`.
fn snapshot_when_ready(handle: VmHandle, dir: &std::path::Path) -> Result<ExitCode> {
    let clock = handle.boot_clock();
    match clock.wait_ready(READY_TIMEOUT) {
        husk_vmm::ReadyWait::Ready(_) => {}
        other => {
            let exit = handle.wait();
            anyhow::bail!(
                "the guest's agent never reported ready ({other:?}); the VM ended: {}\n--- guest console (last lines) ---\n{}",
                exit.reason,
                exit.console_tail
            );
        }
    }
    let ready = Instant::now();
    handle.snapshot(dir)?;
    eprintln!(
        "husk-vmm: snapshot saved to {}; boot_to_init_ms={:.2} snapshot_ms={:.2}",
        dir.display(),
        clock.timings().boot_to_init.map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        ready.elapsed().as_secs_f64() * 1000.0
    );
    Ok(ExitCode::SUCCESS)
}

/// The VM the command line describes.
fn vm_config(
    cli: Cli,
    console: Console,
    console_input: Option<std::os::fd::OwnedFd>,
    started: Instant,
) -> Result<VmConfig> {
    Ok(VmConfig {
        vcpus: cli.vcpus,
        mem_mib: cli.mem,
        kernel: cli.kernel.context("--kernel is required")?,
        initrd: cli.initrd,
        cmdline: match cli.append {
            Some(extra) => format!("{} {extra}", cli.cmdline),
            None => cli.cmdline,
        },
        console,
        setup_started: Some(started),
        console_input,
        seccomp: !cli.no_seccomp,
        devices: {
            let mut devices = Vec::new();
            if !cli.no_rng {
                devices.push(DeviceConfig::Rng);
            }
            if let Some(socket) = cli.vsock {
                let host_ports = if cli.vsock_host_port.is_empty() {
                    HostPorts::Any
                } else {
                    HostPorts::Only(cli.vsock_host_port.clone())
                };
                devices.push(DeviceConfig::Vsock { guest_cid: cli.vsock_cid, socket, host_ports });
            }
            for (tag, shared_dir) in cli.fs {
                devices.push(DeviceConfig::Fs { tag, shared_dir, max_fds: cli.fs_max_fds });
            }
            if let Some(name) = &cli.net_tap {
                let tap = Tap::open(name).with_context(|| format!("--net-tap {name}"))?;
                devices.push(DeviceConfig::Net(NetConfig {
                    backend: Arc::new(tap),
                    mac: cli.net_mac,
                    mtu: cli.net_mtu,
                }));
            }
            devices
        },
    })
}

/// Runs the VM until it ends (SIGINT/SIGTERM stop it), and reports how.
fn wait_for_end(handle: VmHandle, signals: libc::sigset_t) -> Result<ExitCode> {
    // SIGINT/SIGTERM stop the VM cleanly: blocked before any thread exists (threads inherit the
    // mask), waited for on a thread of their own.
    let stopper = handle.stopper();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = wait_for(&signals) {
                tracing::info!(signal, "stopping the VM");
                stopper.stop();
            }
        })
        .context("starting the signal thread")?;
    let exit = handle.wait();
    let ms = |d: Option<Duration>| d.map_or("n/a".to_owned(), |d| format!("{:.2}", d.as_secs_f64() * 1000.0));
    let overhead = exit.memory.map_or("n/a".to_owned(), |m| format!("{:.2}", m.overhead_mib()));
    eprintln!(
        "husk-vmm: {}; vmm_setup_ms={} boot_to_init_ms={} vmm_rss_overhead_mib={overhead}",
        exit.reason,
        ms(exit.timings.vmm_setup),
        ms(exit.timings.boot_to_init)
    );
    match exit.reason {
        ExitReason::Poweroff | ExitReason::Stopped => Ok(ExitCode::SUCCESS),
        ExitReason::Reboot => Ok(ExitCode::from(EXIT_REBOOT)),
        other => {
            anyhow::bail!("the VM ended: {other}\n--- guest console (last lines) ---\n{}", exit.console_tail)
        }
    }
}
