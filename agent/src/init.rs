//! PID 1 duties inside the guest.

use std::convert::Infallible;
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use husk_protocols::{GuestEvent, ReadyLine, AGENT_API_VERSION};

use crate::api::server::{self, Endpoint};
use crate::api::AgentService;
use crate::container::ContainerPaths;
use crate::reaper::Reaper;
use crate::sandbox::Place;
use crate::stdio::StdioBroker;
use crate::{guest_events, guest_info, network, signals};
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::termios::tcdrain;
use nix::unistd::sync;

/// Kernel filesystems every guest needs, in mount order: (source, target, fstype, flags, data).
const MOUNTS: &[(&str, &str, &str, MsFlags, &str)] = &[
    ("proc", "/proc", "proc", MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC), ""),
    ("sysfs", "/sys", "sysfs", MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC), ""),
    ("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, "mode=0755"),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        "newinstance,ptmxmode=0666,mode=620",
    ),
    ("shm", "/dev/shm", "tmpfs", MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV), "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV), "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV), "mode=1777"),
    (
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC),
        "nsdelegate",
    ),
];

/// Where CreateSandbox mounts the pod's shared file system.
const SHARED_DIR: &str = husk_protocols::GUEST_SHARED_DIR;
/// Bundles and the container runtime's records (guest memory: /run is a tmpfs).
const STATE_DIR: &str = "/run/husk/containers";

/// Kernel command-line flag that starts a shell on the console (needs busybox in the image).
const DEBUG_CONSOLE_FLAG: &str = "husk.debug_console";
/// Kernel command-line option saying what to do once ready (for boot checks and tests):
/// `poweroff`, `reboot`, or `exit` (PID 1 exits, so the kernel panics).
const AFTER_READY_OPTION: &str = "husk.after_ready=";

/// Brings the guest up and serves as PID 1 until asked to power off.
pub fn run() -> Result<Infallible> {
    // Block the signals PID 1 handles synchronously below, before any thread or child exists.
    signals::block()?;

    mount_kernel_filesystems()?;
    // The kernel leaves lo down and the containers share the guest's network stack. Without lo
    // only 127.0.0.1 is lost, not the pod: say so and boot on.
    if let Err(err) = network::loopback_up() {
        println!("husk-agent: warning: cannot bring the loopback interface up: {err}");
    }
    // Ready means the API answers: bind before announcing.
    let endpoint = Endpoint::guest();
    let stdio = endpoint.stdio();
    let paths = ContainerPaths { shared: PathBuf::from(SHARED_DIR), state: PathBuf::from(STATE_DIR) };
    let api =
        server::start(endpoint, AgentService::new(Place::Guest, paths)?).context("starting the agent API")?;
    StdioBroker::global().listen(&stdio).context("listening for stdio streams")?;
    println!("husk-agent: serving the agent API on {:?}", api.endpoint);
    println!("{}", ready_line()?.render());
    guest_info::note_agent_ready();
    report(GuestEvent::Ready);

    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut args = cmdline.split_whitespace();
    if args.clone().any(|arg| arg == DEBUG_CONSOLE_FLAG) {
        start_debug_console();
    }
    match args.find_map(|arg| arg.strip_prefix(AFTER_READY_OPTION)) {
        None => {}
        Some("poweroff") => power_off(),
        Some("reboot") => restart(),
        Some("exit") => {
            println!("husk-agent: {AFTER_READY_OPTION}exit: PID 1 exits, the kernel will panic");
            std::process::exit(1)
        }
        Some(other) => println!("husk-agent: ignoring unknown {AFTER_READY_OPTION}{other}"),
    }
    signals::serve(|signal| {
        println!("husk-agent: {signal} received, powering off");
        power_off()
    })
}

/// Sends `event` to the VMM, saying so on the console when this kernel forbids port I/O.
fn report(event: GuestEvent) {
    if let Err(err) = guest_events::send(event) {
        println!(
            "husk-agent: cannot report {event:?} to the VMM (ioperm: {err}); is CONFIG_X86_IOPL_IOPERM set?"
        );
    }
}

fn mount_kernel_filesystems() -> Result<()> {
    for &(source, target, fstype, flags, data) in MOUNTS {
        fs::create_dir_all(target).with_context(|| format!("creating mount point {target}"))?;
        let data = (!data.is_empty()).then_some(data);
        match mount(Some(source), target, Some(fstype), flags, data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(err) => return Err(err).with_context(|| format!("mounting {fstype} on {target}")),
        }
    }
    Ok(())
}

fn ready_line() -> Result<ReadyLine> {
    Ok(ReadyLine {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        api: AGENT_API_VERSION,
        cpus_online: guest_info::cpus_online()?,
        uptime_ms: guest_info::uptime_ms()?,
    })
}

fn start_debug_console() {
    let mut shell = Command::new("/bin/sh");
    shell.env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin");
    match Reaper::global().spawn(signals::with_no_signals_blocked(&mut shell)) {
        Ok((child, _)) => println!("husk-agent: debug console started (pid {})", child.id()),
        Err(err) => println!("husk-agent: cannot start the debug console /bin/sh: {err}"),
    }
}

/// Flushes file systems, tells the VMM, and powers the guest off. Never returns.
pub fn power_off() -> ! {
    drain_console();
    sync();
    // Without ACPI the kernel cannot power off by itself: the VMM ends the VM on this event.
    report(GuestEvent::Poweroff);
    end_with(RebootMode::RB_POWER_OFF)
}

/// Flushes file systems and restarts the guest (the VMM sees the i8042 reset). Never returns.
fn restart() -> ! {
    drain_console();
    sync();
    end_with(RebootMode::RB_AUTOBOOT)
}

/// Waits until the console has transmitted everything written so far: the VMM ends the VM as soon
/// as it hears of the poweroff, and the last lines must not be lost.
fn drain_console() {
    let _ = std::io::stdout().flush();
    let _ = tcdrain(std::io::stdout());
}

fn end_with(mode: RebootMode) -> ! {
    let err = match reboot(mode) {
        Ok(never) => match never {},
        Err(err) => err,
    };
    println!("husk-agent: {mode:?} failed: {err}");
    // Nothing else PID 1 can do; idle rather than exit (which would panic the kernel).
    loop {
        std::thread::park();
    }
}
