//! Boot benchmark: Husk's VMM against QEMU's microvm machine booting the same guest image on the
//! same KVM, in the same run. Run it where guests can run (`make bench` uses `tests/vm-host-run`).
//!
//! Figures (medians over the runs), with their start and end points:
//! - `vmm_setup_ms`: husk-vmm process start to the boot vCPU's first KVM_RUN (husk-vmm's timer).
//! - `boot_to_init_ms`: first KVM_RUN to the agent's boot-timer write on the guest event port.
//! - `start_to_ready_ms`: VMM process spawn to the agent's ready line in the console file, measured
//!   the same way for both VMMs (the side-by-side figure).
//! - `vmm_rss_overhead_mib`: VMM resident memory minus the resident part of the guest RAM mapping,
//!   read from /proc/<pid>/smaps when the agent is ready, the same way for both VMMs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use husk_protocols::ReadyLine;
use husk_tests::bench::Figure;

#[derive(Debug, Parser)]
#[command(about = "Husk boot benchmark, side by side with QEMU microvm")]
struct Cli {
    #[arg(long)]
    vmm: PathBuf,
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: PathBuf,
    /// QEMU binary for the baseline (skipped when absent).
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    qemu: PathBuf,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// Give up on one boot after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    start_to_ready_ms: f64,
    rss_overhead_mib: f64,
    vmm_setup_ms: Option<f64>,
    boot_to_init_ms: Option<f64>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let work = tempfile::tempdir()?;
    let cmdline = format!("{} husk.after_ready=poweroff", husk_vmm::DEFAULT_CMDLINE);
    let mut husk = Vec::new();
    let mut qemu = Vec::new();
    for run in 0..cli.runs {
        let console = work.path().join(format!("husk-{run}.log"));
        let mut command = Command::new(&cli.vmm);
        command.args([
            "--kernel".as_ref(),
            cli.kernel.as_os_str(),
            "--initrd".as_ref(),
            cli.initrd.as_os_str(),
        ]);
        command.args(["--mem", &cli.mem_mib.to_string(), "--cmdline", &cmdline, "--console"]).arg(&console);
        let (mut sample, child) = boot_once(command, &console, cli.mem_mib, &cli)?;
        let output = child.wait_with_output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            bail!("husk-vmm failed: {stderr}");
        }
        sample.vmm_setup_ms = figure(&stderr, "vmm_setup_ms");
        sample.boot_to_init_ms = figure(&stderr, "boot_to_init_ms");
        husk.push(sample);

        if cli.qemu.exists() {
            let console = work.path().join(format!("qemu-{run}.log"));
            let mut command = Command::new(&cli.qemu);
            command.args(["-enable-kvm", "-M", "microvm,isa-serial=on,rtc=off", "-cpu", "host", "-smp", "1"]);
            command.args([
                "-m",
                &cli.mem_mib.to_string(),
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
            ]);
            command.args(["-no-reboot", "-serial"]).arg(format!("file:{}", console.display()));
            command.args([
                "-kernel".as_ref(),
                cli.kernel.as_os_str(),
                "-initrd".as_ref(),
                cli.initrd.as_os_str(),
            ]);
            command.args(["-append", &cmdline]);
            let (sample, mut child) = boot_once(command, &console, cli.mem_mib, &cli)?;
            // QEMU cannot see the agent's poweroff (no ACPI in the guest): stop it here.
            let _ = child.kill();
            let _ = child.wait();
            qemu.push(sample);
        }
    }
    report(&cli, &husk, &qemu);
    emit_figures(&husk, &qemu);
    Ok(())
}

/// Spawns `command`, waits for the ready line in `console`, samples memory, returns the child.
fn boot_once(mut command: Command, console: &Path, mem_mib: u64, cli: &Cli) -> Result<(Sample, Child)> {
    let _ = fs::remove_file(console);
    let started = Instant::now();
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{command:?}"))?;
    let deadline = started + Duration::from_secs(cli.timeout_s);
    loop {
        if fs::read_to_string(console).is_ok_and(|text| ReadyLine::find_in(&text).is_some()) {
            break;
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{command:?} exited with {status} before the agent was ready; console: {}",
                console.display()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{command:?}: no ready line within {} s", cli.timeout_s);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let start_to_ready_ms = started.elapsed().as_secs_f64() * 1000.0;
    let rss_overhead_mib = rss_overhead_mib(child.id(), mem_mib).unwrap_or(f64::NAN);
    Ok((Sample { start_to_ready_ms, rss_overhead_mib, ..Sample::default() }, child))
}

/// Process RSS minus the resident part of the mapping of exactly `mem_mib` (the guest RAM).
fn rss_overhead_mib(pid: u32, mem_mib: u64) -> Option<f64> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut guest, mut in_guest) = (0u64, 0u64, false);
    for line in smaps.lines() {
        let value = || line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok());
        if line.starts_with("Size:") {
            in_guest = value() == Some(mem_mib * 1024);
        } else if line.starts_with("Rss:") {
            let kib = value()?;
            total += kib;
            if in_guest {
                guest += kib;
            }
        }
    }
    Some(total.saturating_sub(guest) as f64 / 1024.0)
}

fn figure(stderr: &str, name: &str) -> Option<f64> {
    stderr.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}="))?.parse().ok())
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// Picks one figure out of a sample.
type Pick = fn(&Sample) -> Option<f64>;

fn report(cli: &Cli, husk: &[Sample], qemu: &[Sample]) {
    let host = if std::env::var_os("HUSK_IN_TESTHOST").is_some() {
        "nested test host (QEMU TCG + kvm-amd): compare ratios, not absolute times"
    } else {
        "this machine's KVM"
    };
    println!("boot benchmark: {} runs, medians, {} MiB guest, VM host: {host}", cli.runs, cli.mem_mib);
    println!("{:<24} {:>12} {:>14} {:>8}", "figure", "husk", "qemu-microvm", "ratio");
    let column = |samples: &[Sample], pick: Pick| median(samples.iter().filter_map(pick).collect());
    let rows: [(&str, Pick); 4] = [
        ("vmm_setup_ms", |s| s.vmm_setup_ms),
        ("boot_to_init_ms", |s| s.boot_to_init_ms),
        ("start_to_ready_ms", |s| Some(s.start_to_ready_ms)),
        ("vmm_rss_overhead_mib", |s| Some(s.rss_overhead_mib)),
    ];
    for (name, pick) in rows {
        let (h, q) = (column(husk, pick), column(qemu, pick));
        let show = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        let ratio = h.zip(q).map_or("-".to_owned(), |(h, q)| format!("{:.2}", h / q));
        println!("{name:<24} {:>12} {:>14} {:>8}", show(h), show(q), ratio);
    }
}

/// Emits every figure's record ([`Figure`]) with all its samples, beside QEMU microvm's where QEMU
/// has the same measurement and ran.
fn emit_figures(husk: &[Sample], qemu: &[Sample]) {
    let column = |samples: &[Sample], pick: Pick| samples.iter().filter_map(pick).collect::<Vec<f64>>();
    // husk-vmm's own timer: QEMU reports nothing like it, so these have no baseline.
    let timers: [(&str, &str, &str, Pick); 2] = [
        (
            "vmm_setup_ms",
            "husk-vmm process start (husk-vmm's own timer; QEMU microvm has no equivalent, no baseline)",
            "the boot vCPU's first KVM_RUN",
            |s| s.vmm_setup_ms,
        ),
        (
            "boot_to_init_ms",
            "the boot vCPU's first KVM_RUN (husk-vmm's own timer; QEMU microvm has no equivalent, no baseline)",
            "the agent's boot-timer write on the guest event port",
            |s| s.boot_to_init_ms,
        ),
    ];
    for (name, start, end, pick) in timers {
        Figure::new(name, "ms", start, end).samples(&column(husk, pick)).emit();
    }
    // Measured by this process the same way for both VMMs.
    let spawn_to_ready = "the VMM process spawned by the benchmark (same for husk-vmm and QEMU microvm)";
    let ready = "the agent's ready line seen in the VMM's console file (polled every 1 ms)";
    let side_by_side: [(&str, &str, &str, &str, &str, Pick); 3] = [
        ("start_to_ready_ms", "ms", spawn_to_ready, ready, "qemu_start_to_ready_ms", |s| {
            Some(s.start_to_ready_ms)
        }),
        // The same samples under the name of what they measure: VMM spawn to a ready guest agent.
        ("boot_to_agent_ms", "ms", spawn_to_ready, ready, "qemu_boot_to_agent_ms", |s| {
            Some(s.start_to_ready_ms)
        }),
        (
            "vmm_rss_overhead_mib",
            "MiB",
            "the agent's ready line seen in the console file: the VMM's resident memory, from /proc/<pid>/smaps",
            "minus the resident part of the guest RAM mapping (the mapping of exactly the guest's size)",
            "qemu_vmm_rss_overhead_mib",
            |s| Some(s.rss_overhead_mib),
        ),
    ];
    for (name, unit, start, end, baseline, pick) in side_by_side {
        let figure = Figure::new(name, unit, start, end).samples(&column(husk, pick));
        // QEMU is skipped when its binary is absent: then there is nothing to stand beside.
        let figure = if qemu.is_empty() {
            figure
        } else {
            figure.beside(baseline, "qemu-microvm", &column(qemu, pick))
        };
        figure.emit();
    }
}
