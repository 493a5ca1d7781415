//! PID 1 duties inside the guest.

use std::convert::Infallible;
use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{Context, Result};
use husk_protocols::{GuestEvent, ReadyLine, AGENT_API_VERSION};

use crate::api::server::{self, Endpoint};
use crate::{guest_events, guest_info};
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::termios::tcdrain;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{sync, Pid};

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

/// Kernel command-line flag that starts a shell on the console (needs busybox in the image).
const DEBUG_CONSOLE_FLAG: &str = "husk.debug_console";
/// Kernel command-line option saying what to do once ready (for boot checks and tests):
/// `poweroff`, `reboot`, or `exit` (PID 1 exits, so the kernel panics).
const AFTER_READY_OPTION: &str = "husk.after_ready=";

/// Brings the guest up and serves as PID 1 until asked to power off.
pub fn run() -> Result<Infallible> {
    // Block the signals PID 1 handles synchronously below, before any child can exist.
    let signals = handled_signals();
    signals.thread_block().context("blocking signals")?;

    mount_kernel_filesystems()?;
    // Ready means the API answers: bind before announcing.
    let api = server::start(Endpoint::guest()).context("starting the agent API")?;
    println!("husk-agent: serving the agent API on {:?}", api.endpoint);
    println!("{}", ready_line()?.render());
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
    serve_signals(&signals)
}

/// Sends `event` to the VMM, saying so on the console when this kernel forbids port I/O.
fn report(event: GuestEvent) {
    if let Err(err) = guest_events::send(event) {
        println!(
            "husk-agent: cannot report {event:?} to the VMM (ioperm: {err}); is CONFIG_X86_IOPL_IOPERM set?"
        );
    }
}

fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGPWR] {
        set.add(signal);
    }
    set
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
    match with_no_signals_blocked(&mut shell).spawn() {
        Ok(child) => println!("husk-agent: debug console started (pid {})", child.id()),
        Err(err) => println!("husk-agent: cannot start the debug console /bin/sh: {err}"),
    }
}

/// Makes `command`'s process start with an empty signal mask. PID 1 blocks the signals it waits
/// for, and a blocked mask survives fork and exec: a child would never see SIGCHLD or SIGTERM
/// (a shell's `wait` then sleeps forever next to its exited child).
fn with_no_signals_blocked(command: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec and only calls sigprocmask, which
    // is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        command.pre_exec(|| {
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None).map_err(std::io::Error::from)
        })
    }
}

/// Reaps children on SIGCHLD; powers off on SIGTERM/SIGINT/SIGPWR.
fn serve_signals(signals: &SigSet) -> Result<Infallible> {
    loop {
        match signals.wait().context("waiting for signals")? {
            Signal::SIGCHLD => reap_children(),
            other => {
                println!("husk-agent: {other} received, powering off");
                power_off()
            }
        }
    }
}

fn reap_children() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
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
