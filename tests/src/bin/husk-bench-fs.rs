//! virtio-fs benchmark: file workloads in the guest over husk-vmm's in-process virtio-fs share,
//! side by side with the same workloads on the shared host directory itself, in the same run. Run
//! it where guests can run (`make bench` uses `tests/vm-host-run`).
//!
//! Each workload is one shell command line, run by busybox `sh` in both columns (in the guest
//! through its debug console, on the host with `sh -c`) and timed by this process from issuing the
//! command to its completion (in the guest: its completion marker on the console; the console
//! round trip adds a few milliseconds to workloads that take seconds). Caches are dropped before the
//! read and stat workloads on both sides (guest and host page, dentry and inode caches), so reads
//! reach the host file system. Figures, median over the runs with min..max (MB = 10^6 bytes):
//! - `virtiofs_seq_write_mb_per_s`: `dd` of `--mib` MiB in 1 MiB blocks with `conv=fsync`.
//! - `virtiofs_seq_read_mb_per_s`: `dd` of that file back in 1 MiB blocks, cold.
//! - `virtiofs_create_per_s`: `--files` empty files created by the shell (no process per file).
//! - `virtiofs_stat_per_s`: `ls -l` of those files (one lstat each), cold.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use husk_tests::bench::{spread, vm_host_description, Figure};
use husk_tests::debug_console_vm::{DebugConsoleVm, VmSpec};

/// Where the guest mounts the share.
const GUEST_MOUNT: &str = "/mnt/share";
const TAG: &str = "share";
const BUSYBOX: &str = "/bin/busybox";
const DROP_CACHES: &str = "sync; echo 3 > /proc/sys/vm/drop_caches";

#[derive(Debug, Parser)]
#[command(about = "Husk virtio-fs benchmark, side by side with the host directory")]
struct Cli {
    #[arg(long)]
    vmm: PathBuf,
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: PathBuf,
    /// MiB written and read by the sequential workloads.
    #[arg(long, default_value_t = 64)]
    mib: u64,
    /// Files created and stat'ed.
    #[arg(long, default_value_t = 2000)]
    files: u64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    #[arg(long, default_value_t = 512)]
    mem_mib: u64,
    /// Give up on a boot or a workload after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

/// A workload: its figure, its unit, what one run counts (MB or files), the command over `$D`.
struct Workload {
    figure: &'static str,
    unit: &'static str,
    cold: bool,
    command: fn(&Cli) -> String,
    amount: fn(&Cli) -> f64,
    /// The unit of its [`Figure`] record.
    record_unit: &'static str,
    /// What one run does, for its record's start point.
    measures: fn(&Cli) -> String,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        figure: "virtiofs_seq_write_mb_per_s",
        unit: "MB/s",
        cold: false,
        command: |cli| format!("dd if=/dev/zero of=$D/seq bs=1M count={} conv=fsync 2>/dev/null", cli.mib),
        amount: |cli| (cli.mib << 20) as f64 / 1e6,
        record_unit: "MB/s",
        measures: |cli| {
            format!("`dd` writing {} MiB in 1 MiB blocks with conv=fsync (MB = 10^6 bytes)", cli.mib)
        },
    },
    Workload {
        figure: "virtiofs_seq_read_mb_per_s",
        unit: "MB/s",
        cold: true,
        command: |_| "dd if=$D/seq of=/dev/null bs=1M 2>/dev/null".into(),
        amount: |cli| (cli.mib << 20) as f64 / 1e6,
        record_unit: "MB/s",
        measures: |cli| format!("`dd` reading that {} MiB file in 1 MiB blocks (MB = 10^6 bytes)", cli.mib),
    },
    Workload {
        figure: "virtiofs_create_per_s",
        unit: "files/s",
        cold: false,
        command: |cli| {
            format!(
                "mkdir $D/many && i=0 && while [ $i -lt {} ]; do : > $D/many/f$i; i=$((i+1)); done",
                cli.files
            )
        },
        amount: |cli| cli.files as f64,
        record_unit: "ops/s",
        measures: |cli| {
            format!("the shell creating {} empty files, no process per file (ops = files)", cli.files)
        },
    },
    Workload {
        figure: "virtiofs_stat_per_s",
        unit: "stats/s",
        cold: true,
        command: |_| "ls -l $D/many > /dev/null".into(),
        amount: |cli| cli.files as f64,
        record_unit: "ops/s",
        measures: |cli| format!("`ls -l` of those {} files, one lstat each (ops = lstats)", cli.files),
    },
];

/// Where a command runs.
enum Side<'a> {
    Guest(&'a mut DebugConsoleVm),
    Host,
}

impl Side<'_> {
    /// Runs `command` with `D` set to `dir`; returns how long it took.
    fn run(&mut self, dir: &str, command: &str, timeout: Duration) -> Result<Duration> {
        let line = format!("D={dir}; {command}");
        match self {
            Side::Guest(vm) => vm.run_timed(&line, timeout),
            Side::Host => {
                let started = Instant::now();
                // The guest's shell is busybox: use it on the host too where it exists.
                let mut command = if Path::new(BUSYBOX).exists() {
                    let mut busybox = Command::new(BUSYBOX);
                    busybox.arg("sh");
                    busybox
                } else {
                    Command::new("sh")
                };
                let status = command.arg("-c").arg(&line).status().context("running sh")?;
                let elapsed = started.elapsed();
                ensure!(status.success(), "host: {line:?} failed with {status}");
                Ok(elapsed)
            }
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(cli.runs > 0 && cli.mib > 0 && cli.files > 0, "--runs, --mib and --files must be positive");
    let timeout = Duration::from_secs(cli.timeout_s);
    let work = tempfile::tempdir()?;
    let share = work.path().join("share");
    std::fs::create_dir(&share)?;
    let spec = VmSpec {
        vmm: cli.vmm.clone(),
        kernel: cli.kernel.clone(),
        initrd: cli.initrd.clone(),
        vcpus: cli.vcpus,
        mem_mib: cli.mem_mib,
        extra_args: vec!["--fs".into(), format!("{TAG}={}", share.display())],
    };
    let mut vm = DebugConsoleVm::boot(&spec, work.path(), timeout)?;
    let measured = measure(&cli, &mut vm, &share, timeout)
        .map_err(|err| anyhow::anyhow!("{err:#}\n{}", vm.diagnostics()));
    let stopped = vm.stop(timeout);
    let samples = measured?;
    stopped?;
    report(&cli, &samples);
    Ok(())
}

/// Per workload: (guest samples, host samples), in [`WORKLOADS`] order.
type Samples = Vec<(Vec<f64>, Vec<f64>)>;

fn measure(cli: &Cli, vm: &mut DebugConsoleVm, share: &Path, timeout: Duration) -> Result<Samples> {
    vm.run_timed(&format!("mkdir -p {GUEST_MOUNT} && mount -t virtiofs {TAG} {GUEST_MOUNT}"), timeout)?;
    vm.type_line(&format!("grep -q ' {GUEST_MOUNT} virtiofs ' /proc/mounts && echo mounted-$((40+2))"))?;
    vm.wait_for("mounted-42", timeout).context("the guest did not mount the share")?;
    let mut samples: Samples = WORKLOADS.iter().map(|_| (Vec::new(), Vec::new())).collect();
    for run in 0..cli.runs {
        let dirs = [format!("{GUEST_MOUNT}/guest-{run}"), format!("{}/host-{run}", share.display())];
        for (column, dir) in dirs.iter().enumerate() {
            let mut side = if column == 0 { Side::Guest(&mut *vm) } else { Side::Host };
            side.run(dir, "mkdir -p $D", timeout)?;
            for (index, workload) in WORKLOADS.iter().enumerate() {
                if workload.cold {
                    // The host's caches first, so the guest's reads reach the disk through them.
                    Side::Host
                        .run(dir, DROP_CACHES, timeout)
                        .context("dropping the host's caches (needs root)")?;
                    side.run(dir, DROP_CACHES, timeout)?;
                }
                let elapsed = side
                    .run(dir, &(workload.command)(cli), timeout)
                    .with_context(|| format!("{}, run {run}", workload.figure))?;
                let rate = (workload.amount)(cli) / elapsed.as_secs_f64();
                let column_samples = &mut samples[index];
                if column == 0 {
                    column_samples.0.push(rate)
                } else {
                    column_samples.1.push(rate)
                }
            }
            side.run(dir, "rm -rf $D", timeout)?;
        }
    }
    Ok(samples)
}

fn report(cli: &Cli, samples: &Samples) {
    println!(
        "virtio-fs benchmark: {} MiB sequential, {} files, {} runs, {} vCPUs, {} MiB guest; median (min..max); \
         ratio = guest over virtio-fs / host directory; VM host: {}",
        cli.mib,
        cli.files,
        cli.runs,
        cli.vcpus,
        cli.mem_mib,
        vm_host_description()
    );
    for (workload, (guest, host)) in WORKLOADS.iter().zip(samples) {
        let (g, g_min, g_max) = spread(guest);
        let (h, h_min, h_max) = spread(host);
        let unit = workload.unit;
        println!(
            "{}={g:.2} {unit} ({g_min:.2}..{g_max:.2}) host={h:.2} {unit} ({h_min:.2}..{h_max:.2}) ratio={:.4}",
            workload.figure,
            g / h
        );
    }
    emit_figures(cli, samples);
}

/// Emits each workload's record ([`Figure`]) with every run of the guest and of the host.
fn emit_figures(cli: &Cli, samples: &Samples) {
    let end = "its completion (guest: its completion marker on the console; host: `sh` exited)";
    for (workload, (guest, host)) in WORKLOADS.iter().zip(samples) {
        let cold = if workload.cold { ", after dropping the guest's and the host's caches" } else { "" };
        let start = format!(
            "{} issued (guest: typed on its debug console, over virtio-fs; host: `sh -c` spawned){cold}",
            (workload.measures)(cli)
        );
        let baseline = workload.figure.replacen("virtiofs_", "host_", 1);
        Figure::new(workload.figure, workload.record_unit, &start, end)
            .samples(guest)
            .beside(&baseline, "host directory", host)
            .emit();
    }
}
